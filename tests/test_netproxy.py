"""bench/netproxy.py: the latency / rate-limit proxy the benchmark puts in front of S3.

The upstream is a ThreadingHTTPServer on 127.0.0.1 that counts the requests it
gets and echoes what it read. Nothing here asserts on time: the tests count
requests, answers and bytes.
"""
from __future__ import annotations

import http.client
import importlib.util
import random
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# loaded by path: putting bench/ on sys.path would shadow modules named run, measure, ...
_spec = importlib.util.spec_from_file_location(
    "netproxy", Path(__file__).resolve().parent.parent / "bench" / "netproxy.py")
netproxy = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("netproxy", netproxy)
_spec.loader.exec_module(netproxy)
MessageReader, NetProxy = netproxy.MessageReader, netproxy.NetProxy
ProxyProcess = netproxy.ProxyProcess

BLOB = bytes(range(256)) * 64 + random.Random(7).randbytes(4096)  # every byte value


class _Upstream(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.seen: list[tuple[str, str, dict, bytes]] = []

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.seen)


class _Handler(BaseHTTPRequestHandler):
    """Answers every method with a fixed, Date-less response, so that answers
    through the proxy can be compared byte for byte with direct ones."""
    protocol_version = "HTTP/1.1"

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except ConnectionError:
            self.close_connection = True

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _answer(self):
        body = self._body()
        with self.server.lock:
            self.server.seen.append((self.command, self.path, dict(self.headers.items()), body))
        if self.path.startswith("/blob"):
            out = BLOB
        else:
            out = f"{self.command} {self.path} {len(body)}".encode()
        self.send_response_only(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(out)))
        self.send_header("ETag", '"0123456789abcdef"')
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def upstream():
    server = _Upstream()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def raw_exchange(port: int, request: bytes, timeout: float = 10) -> bytes:
    """Send one request, read until the answer is complete (Content-Length)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while True:
            head_end = data.find(b"\r\n\r\n")
            if head_end >= 0:
                length = int([line.split(b":", 1)[1] for line in data[:head_end].split(b"\r\n")
                              if line.lower().startswith(b"content-length:")][0])
                if len(data) >= head_end + 4 + length:
                    return data
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk


class Answer:
    def __init__(self, status: int, head: bytes, body: bytes):
        self.status, self.head, self.body = status, head, body


def read_answers(sock: socket.socket, methods: list[str]) -> list[Answer]:
    """Read one answer per method, in order, from a socket with pipelined requests."""
    f = sock.makefile("rb")
    answers = []
    for method in methods:
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = f.readline()
            assert line, "connection closed early"
            head += line
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = f.read(length) if method != "HEAD" else b""
        answers.append(Answer(int(head.split(b" ", 2)[1]), head, body))
    return answers


# ---------------------------------------------------------------- forwarding


def test_forwards_request_and_answer_byte_exactly(upstream):
    body = random.Random(1).randbytes(70_000)
    request = (b"PUT /bucket/some%20key.png?x-id=PutObject HTTP/1.1\r\n"
               b"Host: s3.example\r\nContent-Type: image/png\r\n"
               b"x-amz-meta-owner: \xc3\xa9l\xc3\xa8ve\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    get_blob = b"GET /blob HTTP/1.1\r\nHost: s3.example\r\n\r\n"
    direct = [raw_exchange(upstream.server_port, r) for r in (request, get_blob)]
    with NetProxy(("127.0.0.1", upstream.server_port), latency_ms=5) as proxy:
        proxied = [raw_exchange(proxy.port, r) for r in (request, get_blob)]
        stats = proxy.stats()
    assert proxied == direct  # the answers, byte for byte
    assert BLOB in proxied[1]
    (m1, p1, h1, b1), _, (m2, p2, h2, b2), _ = upstream.seen
    assert (m2, p2, b2) == (m1, p1, b1) == ("PUT", "/bucket/some%20key.png?x-id=PutObject", body)
    assert h2 == h1 and h1["x-amz-meta-owner"] == b"\xc3\xa9l\xc3\xa8ve".decode("latin-1")
    assert stats["forwarded"] == 2 and stats["refused"] == 0
    assert stats["bytes_up"] == len(request) + len(get_blob)
    assert stats["bytes_down"] == sum(map(len, direct))


def test_keep_alive_carries_many_requests(upstream):
    with NetProxy(f"127.0.0.1:{upstream.server_port}", latency_ms=2) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        got = []
        for i in range(6):
            method = ("GET", "PUT", "HEAD")[i % 3]
            conn.request(method, f"/b/k{i}", body=b"z" * (i * 100) if method == "PUT" else None)
            r = conn.getresponse()
            got.append((r.status, r.read()))
        conn.close()
        stats = proxy.stats()
    assert got == [(200, b"GET /b/k0 0"), (200, b"PUT /b/k1 100"), (200, b""),
                   (200, b"GET /b/k3 0"), (200, b"PUT /b/k4 400"), (200, b"")]
    assert stats["connections"] == 1
    assert stats["forwarded"] == upstream.count == 6
    assert stats["methods"] == {"GET": 2, "PUT": 2, "HEAD": 2}


def test_plain_tcp_mode_forwards_without_counting(upstream):
    with NetProxy(("127.0.0.1", upstream.server_port), latency_ms=1, http=False) as proxy:
        answer = raw_exchange(proxy.port, b"GET /blob HTTP/1.1\r\nHost: x\r\n\r\n")
        stats = proxy.stats()
    assert answer.endswith(BLOB)
    assert stats["forwarded"] == 0 and upstream.count == 1


# ---------------------------------------------------------------- rate limit


def test_above_the_rate_answers_slowdown_and_never_forwards(upstream):
    statuses, bodies = [], []
    # 3 requests of burst, then 1 a second: most of the 15 below are refused
    with NetProxy(("127.0.0.1", upstream.server_port), latency_ms=0, rate=1, burst=3) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        for i in range(15):
            method = ("PUT", "GET", "HEAD")[i % 3]
            headers = {"x-amz-copy-source": f"src/k{i}"} if method == "PUT" else {}
            conn.request(method, f"/dst/k{i}", body=b"b" * 50 if method == "PUT" else None,
                         headers=headers)
            r = conn.getresponse()
            statuses.append((method, r.status, r.reason))
            bodies.append(r.read())
        conn.close()
        stats = proxy.stats()
    refused = [i for i, (_, status, _) in enumerate(statuses) if status == 503]
    assert statuses[:3] == [("PUT", 200, "OK"), ("GET", 200, "OK"), ("HEAD", 200, "OK")]
    assert refused, statuses
    for i in refused:
        assert statuses[i][2] == "Slow Down"
        if statuses[i][0] != "HEAD":
            assert b"<Code>SlowDown</Code>" in bodies[i]
            assert b"<Message>Please reduce your request rate.</Message>" in bodies[i]
            assert f"<Resource>/dst/k{i}</Resource>".encode() in bodies[i]
        else:
            assert bodies[i] == b""
    assert stats["refused"] == len(refused)
    assert stats["forwarded"] == 15 - len(refused)
    assert upstream.count == stats["forwarded"]  # refused requests never reached it
    forwarded_paths = [path for _, path, _, _ in upstream.seen]
    assert not any(f"/dst/k{i}" in forwarded_paths for i in refused)
    assert stats["connections"] == 1  # one keep-alive connection carried all 15


def test_pipelined_requests_get_answers_in_order(upstream):
    """Refusals wait for the upstream's answers to the requests sent before them;
    refused bodies (Content-Length and chunked) are swallowed, not forwarded."""
    reqs = [
        b"PUT /p/0 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        b"PUT /p/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nx-trailer: 1\r\n\r\n",
        b"PUT /p/2 HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\nrefused",
        b"PUT /p/3 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nnope!\r\n0\r\n\r\n",
        b"HEAD /p/4 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /p/5 HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    with NetProxy(("127.0.0.1", upstream.server_port), latency_ms=3, rate=0.001,
                  burst=2) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            s.sendall(b"".join(reqs))
            answers = read_answers(s, ["PUT", "PUT", "PUT", "PUT", "HEAD", "GET"])
            # the connection is still usable after the refusals
            s.sendall(b"GET /p/6 HTTP/1.1\r\nHost: x\r\n\r\n")
            (last,) = read_answers(s, ["GET"])
        stats = proxy.stats()
    assert [a.status for a in answers] == [200, 200, 503, 503, 503, 503]
    assert answers[0].body == b"PUT /p/0 5" and answers[1].body == b"PUT /p/1 7"
    assert b"<Resource>/p/2</Resource>" in answers[2].body
    assert b"<Resource>/p/3</Resource>" in answers[3].body
    assert answers[4].body == b"" and b"<Resource>/p/5</Resource>" in answers[5].body
    assert last.status == 503
    assert [(m, p, b) for m, p, _, b in upstream.seen] == [("PUT", "/p/0", b"hello"),
                                                           ("PUT", "/p/1", b"abcdefg")]
    assert stats["forwarded"] == 2 and stats["refused"] == 5


def test_refused_expect_continue_closes_the_connection(upstream):
    with NetProxy(("127.0.0.1", upstream.server_port), latency_ms=0, rate=0.001,
                  burst=1) as proxy:
        assert raw_exchange(proxy.port, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n").startswith(
            b"HTTP/1.1 200")
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            s.sendall(b"PUT /held HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                      b"Content-Length: 10\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        stats = proxy.stats()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Slow Down") and b"Connection: close" in head
    assert b"<Code>SlowDown</Code>" in body
    assert int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) == len(body)
    assert stats["refused"] == 1 and upstream.count == stats["forwarded"] == 1


def test_read_rate_is_a_bucket_of_its_own(upstream):
    with NetProxy(("127.0.0.1", upstream.server_port), latency_ms=0, rate=0.001, burst=1,
                  read_rate=0.001, read_burst=2) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        statuses = []
        for method in ("GET", "GET", "GET", "PUT", "PUT", "HEAD"):
            conn.request(method, "/r", body=b"" if method == "PUT" else None)
            r = conn.getresponse()
            r.read()
            statuses.append(r.status)
        conn.close()
        stats = proxy.stats()
    assert statuses == [200, 200, 503, 200, 503, 503]
    assert stats["forwarded"] == upstream.count == 3 and stats["refused"] == 3


# ---------------------------------------------------------------- framing, process, CLI


def test_message_reader_frames_any_split():
    stream = (b"PUT /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
              b"PUT /b HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
              b"2\r\nxy\r\nA\r\n0123456789\r\n0\r\n\r\n"
              b"\r\nGET /c HTTP/1.1\r\nHost: h\r\n\r\n"
              b"DELETE /d HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    for step in (1, 2, 3, 7, len(stream)):
        reader, events = MessageReader(True), []
        for i in range(0, len(stream), step):
            reader.feed(stream[i:i + step], events)
        assert b"".join(chunk for _, chunk, _ in events if chunk is not None) == stream
        assert [info["target"] for kind, _, info in events if kind == "end"] == \
            ["/a", "/b", "/c", "/d"]
        assert reader.state == netproxy.HEAD


def test_message_reader_gives_up_on_garbage_but_keeps_the_bytes():
    reader, events = MessageReader(True), []
    reader.feed(b"NOT HTTP AT ALL\r\n\r\nmore", events)
    reader.feed(b" bytes", events)
    assert [kind for kind, _, _ in events] == ["raw", "raw"]
    assert b"".join(chunk for _, chunk, _ in events) == b"NOT HTTP AT ALL\r\n\r\nmore bytes"


def test_runs_as_a_child_process(upstream):
    proxy = ProxyProcess(f"127.0.0.1:{upstream.server_port}", latency_ms=1, rate=1000)
    port = proxy.start()
    try:
        assert raw_exchange(port, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n").endswith(b"GET /x 0")
        middle = proxy.stats()
    finally:
        final = proxy.stop()
    assert middle["forwarded"] == 1
    assert final["forwarded"] == 1 and final["refused"] == 0 and final["connections"] == 1


def test_upstream_down_answers_502(upstream):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    with NetProxy(("127.0.0.1", dead_port), latency_ms=0) as proxy:
        answer = raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        stats = proxy.stats()
    assert answer.startswith(b"HTTP/1.1 502")
    assert stats["upstream_failures"] == 1


def test_cli_rejects_counting_in_raw_mode(capsys):
    with pytest.raises(SystemExit):
        netproxy.parse_args(["--upstream", "127.0.0.1:1", "--raw", "--rate", "5"])
    assert "--raw" in capsys.readouterr().err


def test_stop_closes_open_connections(upstream):
    proxy = NetProxy(("127.0.0.1", upstream.server_port), latency_ms=0)
    port = proxy.start()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while not data.endswith(b"GET /x 0"):
        data += s.recv(65536)
    assert proxy.stats()["connections_open"] == 1
    stats = proxy.stop()
    assert stats["connections_open"] == 0
    try:
        assert s.recv(65536) == b""  # dropped by the stop
    except ConnectionResetError:
        pass
    s.close()
    assert not any(t.name == "netproxy" and t.is_alive() for t in threading.enumerate())
