#!/usr/bin/env python3
"""A network model for the benchmark: a TCP/HTTP proxy on 127.0.0.1 in front of S3.

On loopback every request costs a few microseconds of network, so the
benchmark measures CPU, not the thing a real migration is bound by: the round
trip to S3 and S3's per-prefix request rate. This proxy puts both back.

latency      every chunk is held `latency_ms` in each direction (default 25 ms,
             so a request/response costs about 50 ms, a real S3 round trip).
             One asyncio event loop; each direction of each connection keeps a
             FIFO of (due time, bytes), and one heap of due times with a single
             loop timer serves them all, so hundreds of connections wait in
             parallel and bytes never overtake each other within a connection.
rate         S3's per-prefix limit ("3,500 PUT/COPY/POST/DELETE and 5,500
             GET/HEAD per second"): the proxy reads HTTP/1.1 request boundaries
             on keep-alive connections (request line, headers, then a
             Content-Length or chunked body), takes one token per request from a
             token bucket (`rate` tokens/s, `burst` tokens deep, default one
             second's worth), and when the bucket is empty answers
             `503 Slow Down` with S3's XML body itself: the refused request never
             reaches the upstream and the connection stays usable. `read_rate`
             gives GET/HEAD a bucket of their own, as S3 does. Answers to
             pipelined requests keep their order: a refusal waits for the
             upstream's answers to the requests before it.

Both combine: a refused request's answer also comes back after 2 x latency.

Bodies: Content-Length and `Transfer-Encoding: chunked` bodies are framed
(aws-chunked uploads are Content-Encoding aws-chunked inside one of those two,
so they are framed too). A refused request whose body the client holds back
for `Expect: 100-continue` gets its 503 with `Connection: close` and the
connection is closed, as HTTP requires. Anything the proxy cannot frame (no
Content-Length on a response, a protocol upgrade, a malformed head) switches
that connection to raw forwarding: still delayed, no longer counted or limited.

Library use (a thread of the caller running one event loop):

    with NetProxy(("127.0.0.1", s3_port), latency_ms=25, rate=300) as proxy:
        endpoint = proxy.url          # http://127.0.0.1:<port>
        ...
        proxy.forwarded, proxy.refused, proxy.stats()

or, to keep the proxy off the caller's GIL, a child process:

    proxy = ProxyProcess("127.0.0.1:9000", latency_ms=25, rate=300)
    port = proxy.start()
    ...
    stats = proxy.stop()              # dict, as NetProxy.stats()

CLI (prints one JSON line when listening, one per SIGUSR1 and a last one on
SIGTERM/SIGINT, then exits 0):

    python bench/netproxy.py --upstream 127.0.0.1:9000 --latency-ms 25 [--rate 300]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import heapq
import itertools
import json
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from html import escape

LOOPBACK = "127.0.0.1"
HIGH_WATER = 1 << 20      # bytes queued in one direction before the sender is paused
LOW_WATER = 1 << 18
MAX_HEAD = 64 * 1024      # a request or response head longer than this: raw forwarding
SLACK = 0.0005            # deliver chunks due within 0.5 ms in the same write
READ_METHODS = frozenset({"GET", "HEAD"})
# the only headers the framing needs; everything else is forwarded unread
FRAMING_HEADERS = re.compile(
    rb"\r\n(content-length|transfer-encoding|expect|upgrade)[ \t]*:[ \t]*([^\r\n]*)", re.I)


# ---------------------------------------------------------------- S3's refusal


def slowdown_response(method: str, target: str) -> bytes:
    """`503 Slow Down` as S3 sends it: XML body, exact Content-Length (none for HEAD)."""
    request_id = secrets.token_hex(8).upper()
    resource = target.split("?", 1)[0] or "/"
    body = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            "<Message>Please reduce your request rate.</Message>"
            f"<Resource>{escape(resource)}</Resource><RequestId>{request_id}</RequestId>"
            f"<HostId>{secrets.token_urlsafe(24)}</HostId></Error>").encode()
    if method == "HEAD":
        body = b""
    head = ("HTTP/1.1 503 Slow Down\r\n"
            "Content-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"x-amz-request-id: {request_id}\r\n"
            f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S GMT', time.gmtime())}\r\n"
            "Server: AmazonS3\r\n\r\n")
    return head.encode() + body


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; one token per request."""

    def __init__(self, rate: float, burst: float | None = None):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = max(1.0, float(burst if burst is not None else rate))
        self.tokens = self.burst
        self.stamp: float | None = None

    def take(self, now: float) -> bool:
        if self.stamp is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


# ---------------------------------------------------------------- HTTP/1.1 framing

# reader states
HEAD, LENGTH, CHUNK_SIZE, CHUNK_DATA, TRAILERS, RAW = range(6)


class FramingError(Exception):
    pass


class MessageReader:
    """Splits one direction of an HTTP/1.1 connection into messages, incrementally.

    feed(data, out) appends events to out, in byte order:
      ("head", bytes, info)  a request or status line plus headers; info is a dict
      ("body", bytes, None)  body bytes (chunked framing included, as on the wire)
      ("end", None, info)    the message is complete
      ("raw", bytes, None)   bytes after the reader gave up framing (see RAW)
    Concatenating the bytes of all events gives back exactly the bytes fed.
    """

    def __init__(self, is_request: bool, framing=None):
        self.is_request = is_request
        self.framing = framing or self.default_framing  # info -> ("length", n) | ...
        self.state = HEAD
        self.buf = b""
        self.remaining = 0
        self.line = b""
        self.info: dict | None = None

    @staticmethod
    def default_framing(info: dict) -> tuple:
        headers = info["headers"]
        te = headers.get("transfer-encoding", "").lower()
        if "chunked" in te:
            return ("chunked",)
        if "content-length" in headers:
            return ("length", int(headers["content-length"]))
        if info.get("upgrade"):
            return ("raw",)
        return ("none",) if info["request"] else ("close",)

    def parse_head(self, head: bytes) -> dict:
        """The start line and the few headers that frame the message (a regex in C:
        splitting every header line in Python would cost more than the forwarding)."""
        eol = head.find(b"\r\n")
        first = head[:eol].decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        for name, value in FRAMING_HEADERS.findall(head, eol):
            name = name.decode().lower()
            value = value.decode("latin-1").strip()
            if name in headers:
                if name == "content-length" and headers[name] != value:
                    raise FramingError("conflicting Content-Length")
                value = headers[name] + ", " + value
            headers[name] = value
        if self.is_request:
            if len(first) != 3 or not first[2].startswith("HTTP/"):
                raise FramingError(f"bad request line {head[:60]!r}")
            method = first[0].upper()
            info = {"request": True, "method": method, "target": first[1],
                    "version": first[2], "headers": headers,
                    "upgrade": method == "CONNECT" or "upgrade" in headers}
        else:
            if len(first) < 2 or not first[0].startswith("HTTP/") or not first[1].isdigit():
                raise FramingError(f"bad status line {head[:60]!r}")
            status = int(first[1])
            info = {"request": False, "status": status, "headers": headers,
                    "interim": 100 <= status < 200 and status != 101,
                    "upgrade": status == 101}
        return info

    def feed(self, data: bytes, out: list) -> None:
        pos, n = 0, len(data)
        while pos < n:
            state = self.state
            if state == RAW:
                out.append(("raw", data[pos:] if pos else data, None))
                return
            if state == HEAD:
                if self.buf:
                    self.buf += data[pos:]
                else:
                    self.buf = data[pos:] if pos else data
                pos = n
                # blank lines between messages are allowed (RFC 9112, 2.2)
                while self.buf[:2] == b"\r\n":
                    out.append(("body", b"\r\n", None))
                    self.buf = self.buf[2:]
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > MAX_HEAD:
                        self.give_up(out)
                    return
                head, rest = self.buf[:end + 4], self.buf[end + 4:]
                self.buf = b""
                try:
                    info = self.parse_head(head)
                    frame = self.framing(info)
                except (FramingError, ValueError, UnicodeError):
                    self.buf = head + rest
                    self.give_up(out)
                    return
                self.info = info
                out.append(("head", head, info))
                kind = frame[0]
                if kind == "none" or (kind == "length" and frame[1] == 0):
                    out.append(("end", None, info))
                elif kind == "length":
                    if frame[1] < 0:
                        self.give_up(out, already_out=True)
                        data, pos, n = rest, 0, len(rest)
                        continue
                    self.state, self.remaining = LENGTH, frame[1]
                elif kind == "chunked":
                    self.state, self.line = CHUNK_SIZE, b""
                else:  # "close" (body until the connection closes) or "raw"
                    self.state = RAW
                data, pos, n = rest, 0, len(rest)
            elif state == LENGTH or state == CHUNK_DATA:
                take = min(self.remaining, n - pos)
                out.append(("body", data[pos:pos + take] if (pos or take < n) else data, None))
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    if state == LENGTH:
                        self.state = HEAD
                        out.append(("end", None, self.info))
                    else:
                        self.state, self.line = CHUNK_SIZE, b""
            else:  # CHUNK_SIZE or TRAILERS: line by line
                nl = data.find(b"\n", pos)
                if nl < 0:
                    self.line += data[pos:]
                    out.append(("body", data[pos:], None))
                    if len(self.line) > MAX_HEAD:
                        self.give_up(out, already_out=True)
                    return
                line = self.line + data[pos:nl + 1]
                out.append(("body", data[pos:nl + 1], None))
                pos = nl + 1
                self.line = b""
                if state == CHUNK_SIZE:
                    try:
                        size = int(line.split(b";", 1)[0].strip(), 16)
                    except ValueError:
                        self.give_up(out, already_out=True)
                        continue
                    if size == 0:
                        self.state = TRAILERS
                    else:
                        self.state, self.remaining = CHUNK_DATA, size + 2  # data + CRLF
                elif line.strip() == b"":
                    self.state = HEAD
                    out.append(("end", None, self.info))

    def give_up(self, out: list, already_out: bool = False) -> None:
        """Stop framing: what is buffered (and everything after) goes out raw."""
        if self.buf and not already_out:
            out.append(("raw", self.buf, None))
        self.buf = b""
        self.state = RAW


# ---------------------------------------------------------------- one direction


class _Pipe:
    """Bytes toward one transport, each chunk held until its due time, in order."""

    __slots__ = ("proxy", "conn", "loop", "dst", "queue", "queued", "scheduled", "src",
                 "src_paused", "dst_paused", "not_before", "closed")

    EOF = object()
    CLOSE = object()

    def __init__(self, proxy: "NetProxy", conn: "_Connection"):
        self.proxy = proxy
        self.conn = conn
        self.loop = proxy.loop
        self.dst = None            # set when the destination is connected
        self.src = None            # the transport we read these bytes from (flow control)
        self.queue: collections.deque = collections.deque()
        self.queued = 0
        self.scheduled = False     # an entry for this pipe is in the proxy's timer heap
        self.src_paused = False
        self.dst_paused = False
        self.not_before = 0.0      # no byte leaves before this time (connection set-up)
        self.closed = False

    def push(self, item, delay: float | None = None) -> None:
        """Queue bytes (or EOF/CLOSE) to leave after `delay` (default: the latency)."""
        if self.closed:
            return
        now = self.loop.time()
        start = now if self.not_before <= now else self.not_before
        when = start + (self.proxy.delay if delay is None else delay)
        if item.__class__ is bytes or isinstance(item, bytearray):
            if not item:
                return
            self.queued += len(item)
        q = self.queue
        q.append((when, item))
        if not self.scheduled and self.dst is not None:
            if when <= now and len(q) == 1:
                self.flush()
            else:
                self.proxy._schedule(self, q[0][0])
        if self.src_paused or self.queued > HIGH_WATER:
            self.flow()

    def attach(self, dst) -> None:
        self.dst = dst
        if self.queue and not self.scheduled:
            self.proxy._schedule(self, self.queue[0][0])

    def flush(self) -> None:
        q = self.queue
        if self.closed or self.dst is None:
            return
        deadline = self.loop.time() + SLACK
        out = []
        while q and q[0][0] <= deadline:
            item = q.popleft()[1]
            if item is _Pipe.EOF or item is _Pipe.CLOSE:
                self._write(out)
                out = []
                self.end(item)
                return
            out.append(item)
            self.queued -= len(item)
        self._write(out)
        if q:
            self.proxy._schedule(self, q[0][0])
        if self.src_paused:
            self.flow()

    def _write(self, out: list) -> None:
        if out and not self.dst.is_closing():
            data = out[0] if len(out) == 1 else b"".join(out)
            self.dst.write(data)

    def end(self, item) -> None:
        dst = self.dst
        if item is _Pipe.EOF and dst.can_write_eof() and not dst.is_closing():
            dst.write_eof()
            self.closed = True
            self.conn.eof_delivered()
        else:
            self.close()
            dst.close()

    def flow(self) -> None:
        """Pause the sender while this direction holds too much or its reader is slow."""
        if self.src is None:
            return
        want_pause = self.dst_paused or self.queued > HIGH_WATER
        if want_pause and not self.src_paused:
            self.src_paused = True
            if not self.src.is_closing():
                self.src.pause_reading()
        elif self.src_paused and not self.dst_paused and self.queued < LOW_WATER:
            self.src_paused = False
            if not self.src.is_closing():
                self.src.resume_reading()

    def close(self) -> None:
        self.closed = True
        self.queue.clear()
        self.queued = 0


# ---------------------------------------------------------------- one connection


class _Connection:
    """A client connection and its upstream connection."""

    def __init__(self, proxy: "NetProxy", client):
        self.proxy = proxy
        self.client = client
        self.upstream = None
        self.to_upstream = _Pipe(proxy, self)
        self.to_client = _Pipe(proxy, self)
        self.to_upstream.src = client
        self.to_client.dst = client
        self.requests = MessageReader(True) if proxy.http else None
        self.responses = (MessageReader(False, self.response_framing)
                          if proxy.limiting and proxy.http else None)
        self.slots: collections.deque = collections.deque()  # ("F", method) | ("R", bytes)
        self.admitted = True
        self.discard = False       # after a refusal that closes the connection
        self.done = False
        if proxy.handshake:
            # the TCP handshake a real network would cost: one round trip before
            # the client's first byte can even leave
            self.to_upstream.not_before = proxy.loop.time() + 2 * proxy.delay

    # -- framing of answers: HEAD and 1xx/204/304 answers have no body
    def response_framing(self, info: dict) -> tuple:
        status = info["status"]
        method = self.slots[0][1] if self.slots and self.slots[0][0] == "F" else ""
        if info["interim"] or status in (204, 304) or method == "HEAD":
            return ("none",)
        if method == "CONNECT" and 200 <= status < 300 or info["upgrade"]:
            return ("raw",)
        return MessageReader.default_framing(info)

    # -- client -> upstream
    def from_client(self, data: bytes) -> None:
        proxy = self.proxy
        proxy.bytes_up += len(data)
        if self.discard:
            return
        reader = self.requests
        if reader is None or reader.state == RAW:
            self.to_upstream.push(data)
            return
        events: list = []
        reader.feed(data, events)
        out = []
        for kind, chunk, info in events:
            if kind == "head":
                method = info["method"]
                bucket = proxy.bucket_for(method)
                self.admitted = bucket is None or bucket.take(proxy.loop.time())
                if self.admitted:
                    proxy.forwarded += 1
                    proxy.methods[method] += 1
                    if self.responses is not None:
                        self.slots.append(("F", method))
                    out.append(chunk)
                else:
                    proxy.refused += 1
                    answer = slowdown_response(method, info["target"])
                    holds_body = (info["headers"].get("expect", "").lower() == "100-continue"
                                  and reader.state != HEAD)
                    if holds_body:  # the client waits for us before sending the body
                        answer = answer.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
                    self.refuse(answer, close=holds_body)
                    if holds_body:
                        break
            elif kind == "raw":
                out.append(chunk)
                self.admitted = True  # from here on everything is forwarded as is
            elif kind == "body" and self.admitted:
                out.append(chunk)
        if out:
            self.to_upstream.push(out[0] if len(out) == 1 else b"".join(out))

    def refuse(self, answer: bytes, close: bool) -> None:
        if close:
            self.discard = True
        if self.slots:  # answers to earlier requests come first
            self.slots.append(("R", answer))
            if close:
                self.slots.append(("R", _Pipe.CLOSE))
            return
        # the request went to "S3" and the answer comes back: a full round trip
        self.to_client.push(answer, 2 * self.proxy.delay)
        if close:
            self.to_client.push(_Pipe.CLOSE, 2 * self.proxy.delay)
            self.to_upstream.close()
            if self.upstream is not None:
                self.upstream.close()

    # -- upstream -> client
    def from_upstream(self, data: bytes) -> None:
        self.proxy.bytes_down += len(data)
        reader = self.responses
        if reader is None or reader.state == RAW:
            self.to_client.push(data)
            return
        events: list = []
        reader.feed(data, events)
        out = []
        for kind, chunk, info in events:
            if chunk is not None:
                out.append(chunk)
            if kind == "end" and not info["interim"]:
                if self.slots and self.slots[0][0] == "F":
                    self.slots.popleft()
                while self.slots and self.slots[0][0] == "R":
                    answer = self.slots.popleft()[1]
                    if answer is _Pipe.CLOSE:
                        self.to_client.push(b"".join(out))
                        self.to_client.push(_Pipe.CLOSE)
                        self.to_upstream.close()
                        self.upstream.close()
                        return
                    out.append(answer)
            elif kind == "raw":
                self.slots.clear()
        if out:
            self.to_client.push(out[0] if len(out) == 1 else b"".join(out))

    # -- set-up and tear-down
    def upstream_connected(self, transport) -> None:
        self.upstream = transport
        self.to_upstream.attach(transport)
        self.to_client.src = transport

    def upstream_failed(self) -> None:
        self.proxy.upstream_failures += 1
        self.to_upstream.close()
        self.to_client.push(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n"
                            b"Connection: close\r\n\r\n", 0)
        self.to_client.push(_Pipe.CLOSE, 0)
        if self.client.is_closing():
            self.finish()

    def eof_delivered(self) -> None:
        """Both sides have half-closed and been told so: close both."""
        if self.to_client.closed and self.to_upstream.closed:
            self.client.close()
            if self.upstream is not None:
                self.upstream.close()

    def eof_from(self, side: str) -> None:
        pipe = self.to_upstream if side == "client" else self.to_client
        pipe.push(_Pipe.EOF)

    def lost(self, side: str) -> None:
        """One side is gone: deliver what the other side is owed, then close it."""
        if side == "client":
            self.to_client.close()
            self.to_upstream.push(_Pipe.CLOSE)
            if self.upstream is None:
                self.finish()
        else:
            self.to_upstream.close()
            self.to_client.push(_Pipe.CLOSE)
        if self.client.is_closing() and (self.upstream is None or self.upstream.is_closing()):
            self.finish()

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self.proxy._closed(self)

    def abort(self) -> None:
        self.to_client.close()
        self.to_upstream.close()
        for t in (self.client, self.upstream):
            if t is not None:
                t.abort()
        self.finish()


class _ClientSide(asyncio.Protocol):
    def __init__(self, proxy: "NetProxy"):
        self.proxy = proxy
        self.conn: _Connection | None = None

    def connection_made(self, transport) -> None:
        self.conn = self.proxy._opened(transport)

    def data_received(self, data: bytes) -> None:
        self.conn.from_client(data)

    def eof_received(self):
        self.conn.eof_from("client")
        return True  # keep the transport open for the answers still on their way

    def connection_lost(self, exc) -> None:
        self.conn.lost("client")

    def pause_writing(self) -> None:
        self.conn.to_client.dst_paused = True
        self.conn.to_client.flow()

    def resume_writing(self) -> None:
        self.conn.to_client.dst_paused = False
        self.conn.to_client.flow()


class _UpstreamSide(asyncio.Protocol):
    def __init__(self, conn: _Connection):
        self.conn = conn

    def connection_made(self, transport) -> None:
        self.conn.upstream_connected(transport)

    def data_received(self, data: bytes) -> None:
        self.conn.from_upstream(data)

    def eof_received(self):
        self.conn.eof_from("upstream")
        return True

    def connection_lost(self, exc) -> None:
        self.conn.lost("upstream")

    def pause_writing(self) -> None:
        self.conn.to_upstream.dst_paused = True
        self.conn.to_upstream.flow()

    def resume_writing(self) -> None:
        self.conn.to_upstream.dst_paused = False
        self.conn.to_upstream.flow()


# ---------------------------------------------------------------- the proxy


def parse_hostport(value) -> tuple[str, int]:
    if isinstance(value, tuple):
        return value[0], int(value[1])
    value = str(value)
    if "://" in value:
        value = value.split("://", 1)[1]
    value = value.split("/", 1)[0]
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


class NetProxy:
    """The proxy; see the module docstring.

    upstream     "HOST:PORT", "http://HOST:PORT" or (host, port): the S3 server
    latency_ms   delay of every chunk in each direction (0: none)
    rate         requests/s admitted before 503 SlowDown (None: no limit)
    burst        token bucket depth (default: `rate`, one second's worth)
    read_rate    own bucket for GET/HEAD (default: they share `rate`'s bucket)
    handshake    also charge one round trip for each new connection's set-up
    http         frame HTTP requests (needed to count and limit; False: plain TCP)
    """

    def __init__(self, upstream, latency_ms: float = 25.0, rate: float | None = None,
                 burst: float | None = None, read_rate: float | None = None,
                 read_burst: float | None = None, handshake: bool = False,
                 http: bool = True, host: str = LOOPBACK, port: int = 0):
        self.upstream = parse_hostport(upstream)
        if latency_ms < 0:
            raise ValueError("latency_ms must be >= 0")
        self.latency_ms = float(latency_ms)
        self.delay = self.latency_ms / 1000.0
        self.rate, self.read_rate = rate, read_rate
        self.write_bucket = TokenBucket(rate, burst) if rate else None
        self.read_bucket = TokenBucket(read_rate, read_burst) if read_rate else None
        self.limiting = self.write_bucket is not None or self.read_bucket is not None
        self.handshake = handshake
        self.http = http or self.limiting
        self.host, self.port = host, port
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server = None
        self.connections: set[_Connection] = set()
        self.thread: threading.Thread | None = None
        self._due: list = []       # heap of (due time, seq, pipe): one asyncio timer for all
        self._seq = itertools.count()
        self._timer = None
        self._timer_when = 0.0
        self._running_due = False
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.forwarded = 0          # requests sent on to the upstream
        self.refused = 0            # requests answered 503 SlowDown by the proxy
        self.methods: collections.Counter = collections.Counter()  # forwarded, by method
        self.connections_total = 0
        self.connections_peak = 0
        self.upstream_failures = 0  # upstream connections that could not be made
        self.bytes_up = 0           # from clients
        self.bytes_down = 0         # from the upstream
        self.started_at = time.monotonic()

    # -- stats
    def stats(self) -> dict:
        return {
            "listen": f"{self.host}:{self.port}",
            "upstream": f"{self.upstream[0]}:{self.upstream[1]}",
            "latency_ms": self.latency_ms, "rate": self.rate, "read_rate": self.read_rate,
            "requests": self.forwarded + self.refused,
            "forwarded": self.forwarded, "refused": self.refused,
            "methods": dict(self.methods),
            "connections": self.connections_total, "connections_open": len(self.connections),
            "connections_peak": self.connections_peak,
            "upstream_failures": self.upstream_failures,
            "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
            "seconds": round(time.monotonic() - self.started_at, 3),
        }

    def reset_stats(self) -> dict:
        """The counters so far, then zero them (e.g. between two tools of a benchmark)."""
        before = self.stats()
        open_now = len(self.connections)
        self._reset_counters()
        self.connections_peak = open_now
        return before

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def bucket_for(self, method: str) -> TokenBucket | None:
        if self.read_bucket is not None and method in READ_METHODS:
            return self.read_bucket
        return self.write_bucket

    # -- inside the event loop
    async def listen(self) -> int:
        """Start listening in the running loop; returns the port."""
        self.loop = asyncio.get_running_loop()
        self.server = await self.loop.create_server(
            lambda: _ClientSide(self), self.host, self.port, backlog=4096, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]
        self.started_at = time.monotonic()
        return self.port

    def _schedule(self, pipe: _Pipe, when: float) -> None:
        """Flush `pipe` at `when`. One heap and one loop timer for every pipe: a
        TimerHandle per chunk costs more than the chunk's forwarding."""
        pipe.scheduled = True
        heapq.heappush(self._due, (when, next(self._seq), pipe))
        if self._running_due:
            return  # _run_due sets the timer when it is done
        if self._timer is None or when < self._timer_when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_when = when
            self._timer = self.loop.call_at(when, self._run_due)

    def _run_due(self) -> None:
        self._timer = None
        due = self._due
        deadline = self.loop.time() + SLACK
        self._running_due = True
        try:
            while due and due[0][0] <= deadline:
                pipe = heapq.heappop(due)[2]
                pipe.scheduled = False
                if not pipe.closed:
                    pipe.flush()
        finally:
            self._running_due = False
        if due:
            self._timer_when = due[0][0]
            self._timer = self.loop.call_at(self._timer_when, self._run_due)

    def _opened(self, transport) -> _Connection:
        conn = _Connection(self, transport)
        self.connections.add(conn)
        self.connections_total += 1
        self.connections_peak = max(self.connections_peak, len(self.connections))
        transport.pause_reading()  # until the upstream connection is there
        self.loop.create_task(self._connect_upstream(conn))
        return conn

    async def _connect_upstream(self, conn: _Connection) -> None:
        try:
            await self.loop.create_connection(lambda: _UpstreamSide(conn), *self.upstream)
        except OSError:
            conn.upstream_failed()
            return
        if not conn.client.is_closing() and not conn.to_upstream.src_paused:
            conn.client.resume_reading()

    def _closed(self, conn: _Connection) -> None:
        self.connections.discard(conn)

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.abort()
        if self.server is not None:
            await self.server.wait_closed()
            self.server = None

    # -- in a thread of the caller
    def start(self) -> int:
        """Run the proxy's event loop in a daemon thread; returns the port."""
        if self.thread is not None:
            raise RuntimeError("already started")
        self.thread = threading.Thread(target=self._run_thread, name="netproxy", daemon=True)
        self.thread.start()
        self._started.wait(30)
        if self._start_error is not None:
            self.thread.join(5)
            self.thread = None
            raise self._start_error
        if not self._started.is_set():
            raise RuntimeError("netproxy did not start")
        return self.port

    def _run_thread(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.listen())
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._start_error = exc
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self.aclose())
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    def stop(self) -> dict:
        """Stop listening, drop the connections, end the thread; returns the stats."""
        if self.thread is not None and self.loop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
        self.thread = None
        return self.stats()

    def __enter__(self) -> "NetProxy":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------- as a child process


class ProxyProcess:
    """The CLI in a child process (its own GIL and core): start() -> port, stop() -> stats."""

    def __init__(self, upstream, latency_ms: float = 25.0, rate: float | None = None,
                 burst: float | None = None, read_rate: float | None = None,
                 read_burst: float | None = None, handshake: bool = False,
                 python: str = sys.executable):
        host, port = parse_hostport(upstream)
        self.argv = [python, os.path.abspath(__file__), "--upstream", f"{host}:{port}",
                     "--latency-ms", str(latency_ms)]
        for flag, value in (("--rate", rate), ("--burst", burst), ("--read-rate", read_rate),
                            ("--read-burst", read_burst)):
            if value is not None:
                self.argv += [flag, str(value)]
        if handshake:
            self.argv.append("--handshake")
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue = queue.Queue()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 30) -> int:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        first = self._next(timeout)
        if first is None or "port" not in first:
            self.stop()
            raise RuntimeError("netproxy did not start")
        self.port = first["port"]
        return self.port

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                pass
        self.lines.put(None)

    def _next(self, timeout: float) -> dict | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def stats(self, timeout: float = 10) -> dict | None:
        if self.proc is None or self.proc.poll() is not None:
            return None
        self.proc.send_signal(signal.SIGUSR1)
        return self._next(timeout)

    def stop(self, timeout: float = 10) -> dict | None:
        if self.proc is None:
            return None
        last = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        while True:
            item = self._next(2)
            if item is None:
                break
            last = item
        self.proc = None
        return last

    def __enter__(self) -> "ProxyProcess":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------- CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream", required=True, help="the S3 server, HOST:PORT")
    p.add_argument("--latency-ms", type=float, default=25.0,
                   help="delay of every chunk in each direction (default 25)")
    p.add_argument("--rate", type=float, default=None,
                   help="requests/s before 503 SlowDown (default: no limit)")
    p.add_argument("--burst", type=float, default=None,
                   help="token bucket depth in requests (default: one second's worth)")
    p.add_argument("--read-rate", type=float, default=None,
                   help="a separate limit for GET/HEAD (default: they count against --rate)")
    p.add_argument("--read-burst", type=float, default=None,
                   help="depth of the GET/HEAD bucket (default: one second's worth)")
    p.add_argument("--handshake", action="store_true",
                   help="also charge one round trip for each new connection")
    p.add_argument("--raw", action="store_true",
                   help="plain TCP: no HTTP framing, no counting (not with --rate)")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free)")
    args = p.parse_args(argv)
    if args.raw and (args.rate or args.read_rate):
        p.error("--raw cannot count requests: drop --rate/--read-rate")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    proxy = NetProxy(args.upstream, latency_ms=args.latency_ms, rate=args.rate, burst=args.burst,
                     read_rate=args.read_rate, read_burst=args.read_burst,
                     handshake=args.handshake, http=not args.raw,
                     port=args.port)

    def say(obj: dict) -> None:
        print(json.dumps(obj), flush=True)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, lambda: say(proxy.stats()))
        port = await proxy.listen()
        say({"event": "listening", "port": port, "url": proxy.url})
        await stop.wait()
        await proxy.aclose()
        say(proxy.stats())

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
