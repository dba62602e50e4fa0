"""A small failing HTTP proxy for S3 fault injection in tests.

A ThreadingHTTPServer on 127.0.0.1 (port 0) in front of an S3 endpoint (the
moto server). For a seeded random share of requests it answers 503 SlowDown or
500 InternalError with an S3 XML error body (or, for CopyObject, 200 OK with an
InternalError body, as S3 may), or drops the connection without answering:
before forwarding, or after forwarding, so the request took effect and only
the answer is lost. Everything else is forwarded as is: method, path, query,
headers and body.

    with FaultProxy(upstream, rate=0.1, seed=7) as proxy:
        env["AWS_ENDPOINT_URL"] = proxy.url
        ...
    assert proxy.injected() > 0

Targeted faults:
  operations      random faults only for these operations (CopyObject, HeadBucket,
                  HeadObject, ListObjects, ...)
  fail_first      {operation: n}: the first n requests of that operation fail
  fail_copy_keys  every CopyObject to these destination keys fails (503 SlowDown)
  deny_after      {operation: n}: every request of that operation after the first n is
                  answered 403 AccessDenied (a permission revoked mid-run)
  max_key_bytes   refuse longer keys with 400 KeyTooLongError, as S3 does (moto doesn't)
  latency         seconds added to every request
  stall_copies    an Event: once set, CopyObject requests wait for `release`, then
                  are forwarded (copies that land after their client is gone)
  model           answers as AWS does where moto does not model it (tests/awsmodel.py):
                  model.refuse(request) -> (status, code, message) or None, before
                  forwarding; model.rewrite(request, status, headers, data) -> (headers,
                  data), after. request is a Request (method, bucket, key, query, headers).
  intercept       intercept(handler, body) -> bool: answers a request itself when it
                  returns True (an S3 behaviour moto does not model: see s3conditions.py)

As AWS answers where moto does not check (each counted in `refused`):
  regions         {bucket: region}: a request on that bucket signed for another region
                  is refused as S3 refuses it (400 AuthorizationHeaderMalformed naming
                  the expected region; HeadBucket: 400 with x-amz-bucket-region)
  requester_pays  buckets whose requests must say x-amz-request-payer: requester, else
                  403 AccessDenied
  strip_headers   answer headers removed (an S3-compatible server that sends fewer)
Seen: `signed_regions` counts the region each request was signed for.
"""
from __future__ import annotations

import http.client
import random
import re
import socket
import threading
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

SLOWDOWN = "slowdown"          # 503 SlowDown
INTERNAL = "internal"          # 500 InternalError
DROP_BEFORE = "drop-before"    # connection closed, request never reached S3
DROP_AFTER = "drop-after"      # request reached S3, the answer is lost
OK_ERROR = "200-error"         # CopyObject only: 200 OK whose body is an InternalError
DENIED = "access-denied"       # 403 AccessDenied (deny_after only, never random)
MODES = (SLOWDOWN, INTERNAL, DROP_BEFORE, DROP_AFTER)

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "transfer-encoding", "upgrade", "expect", "content-length"}

ERRORS = {
    SLOWDOWN: (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    INTERNAL: (500, "Internal Server Error", "InternalError",
               "We encountered an internal error. Please try again."),
    DENIED: (403, "Forbidden", "AccessDenied", "Access Denied"),
}


@dataclass
class Request:
    """What a model sees of one request (path-style: /bucket/key?query)."""
    method: str
    operation: str
    bucket: str
    key: str
    query: str
    headers: dict  # lower-cased names


def error_body(code: str, message: str, resource: str, extra: str = "") -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><Resource>{resource}</Resource>{extra}"
            f"<RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId></Error>").encode()


# The scope of a SigV4 Authorization header: Credential=AKID/20260101/eu-west-1/s3/aws4_request
SIGNED_REGION = re.compile(r"Credential=[^/,]+/\d{8}/([^/,]+)/s3/aws4_request")


def signed_region(authorization: str | None) -> str | None:
    found = SIGNED_REGION.search(authorization or "")
    return found.group(1) if found else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client gone away (killed): fine
        pass


class FaultProxy:
    def __init__(self, upstream: str, rate: float = 0.1, seed: int = 0,
                 modes: tuple[str, ...] = MODES, fail_copy_keys: tuple[str, ...] = (),
                 latency: float = 0.0, operations: tuple[str, ...] | None = None,
                 fail_first: dict[str, int] | None = None, max_key_bytes: int | None = None,
                 deny_after: dict[str, int] | None = None, model=None, intercept=None,
                 regions: dict[str, str] | None = None, requester_pays: tuple[str, ...] = (),
                 strip_headers: tuple[str, ...] = ()):
        parts = urlsplit(upstream)
        self.intercept = intercept
        self.upstream = (parts.hostname, parts.port)
        self.rate, self.modes, self.latency = rate, modes, latency
        self.fail_copy_keys = set(fail_copy_keys)
        self.operations = operations  # only these get random faults (None: all)
        self.fail_first = dict(fail_first or {})  # operation -> first n requests fail
        self.deny_after = dict(deny_after or {})  # operation -> requests after n are denied
        self.seen: Counter = Counter()  # operation -> requests
        self.model = model
        self.max_key_bytes = max_key_bytes  # S3 refuses longer keys (moto does not)
        self.too_long = 0
        self.regions = dict(regions or {})
        self.requester_pays = set(requester_pays)
        self.refused: Counter = Counter()  # (reason, operation) -> requests refused as AWS does
        self.payer_seen: Counter = Counter()  # operation -> requests with x-amz-request-payer
        self.signed_regions: Counter = Counter()  # region in the signature -> requests
        self.strip_headers = {h.lower() for h in strip_headers}
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter = Counter()       # fault mode -> times injected
        self.by_operation: Counter = Counter()  # (operation, mode) -> times injected
        self.requests = 0
        self.stall_copies = threading.Event()
        self.release = threading.Event()
        self.stalled = 0
        self.server = _Server(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="faultproxy",
                                       daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def injected(self) -> int:
        with self.lock:
            return sum(self.counts.values())

    def start(self) -> "FaultProxy":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------
    def _decide(self, operation: str, bucket_key: str) -> str | None:
        with self.lock:
            self.requests += 1
            self.seen[operation] += 1
            if self.seen[operation] <= self.fail_first.get(operation, 0):
                mode = self.modes[(self.seen[operation] - 1) % len(self.modes)]
                if mode == OK_ERROR and operation != "CopyObject":
                    mode = INTERNAL
            elif self.seen[operation] > self.deny_after.get(operation, float("inf")):
                mode = DENIED
            elif operation == "CopyObject" and bucket_key.split("/", 1)[-1] in self.fail_copy_keys:
                mode = SLOWDOWN
            elif (self.rate and (self.operations is None or operation in self.operations)
                  and self.random.random() < self.rate):
                mode = self.random.choice(self.modes)
                if mode == OK_ERROR and operation != "CopyObject":
                    mode = INTERNAL
            else:
                return None
            self.counts[mode] += 1
            self.by_operation[operation, mode] += 1
            return mode

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in separate writes

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _operation(self) -> tuple[str, str]:
                path = unquote(urlsplit(self.path).path).lstrip("/")
                query = urlsplit(self.path).query
                if self.command == "PUT" and "x-amz-copy-source" in self.headers:
                    return "CopyObject", path
                bucket_only = "/" not in path.rstrip("/")
                if self.command == "GET" and bucket_only:
                    listing = "list-type" in query or not query
                    return ("ListObjects" if listing else "GetBucket"), path
                if self.command == "HEAD":
                    return ("HeadBucket" if bucket_only else "HeadObject"), path
                return self.command, path

            def _drop(self) -> None:
                self.close_connection = True
                try:
                    # RST rather than FIN: the client sees the connection reset
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            upstream = None  # one keep-alive connection per client connection

            def _forward(self, body: bytes):
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                for attempt in (1, 2):  # a stale keep-alive connection gets one fresh retry
                    if self.upstream is None:
                        self.upstream = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                    try:
                        self.upstream.request(self.command, self.path, body=body or None,
                                              headers=headers)
                        resp = self.upstream.getresponse()
                        data = resp.read()
                        if resp.will_close:
                            self.upstream.close()
                            self.upstream = None
                        return resp.status, resp.reason, resp.getheaders(), data
                    except (http.client.HTTPException, OSError):
                        self.upstream.close()
                        self.upstream = None
                        if attempt == 2:
                            raise

            def finish(self):
                super().finish()
                if self.upstream is not None:
                    self.upstream.close()

            def _refuse(self, status: int, reason: str, data: bytes, headers=()) -> None:
                self.send_response_only(status, reason)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _as_aws(self, operation: str, bucket_key: str) -> bool:
                """Refuse what AWS refuses and moto lets through; True when answered."""
                bucket = bucket_key.split("/", 1)[0]
                query = urlsplit(self.path).query
                payer = self.headers.get("x-amz-request-payer", "").lower() == "requester"
                if payer:
                    with proxy.lock:
                        proxy.payer_seen[operation] += 1
                expected = proxy.regions.get(bucket)
                signed = signed_region(self.headers.get("Authorization"))
                with proxy.lock:
                    proxy.signed_regions[signed] += 1
                # GetBucketLocation is let through: AWS answers it outside the bucket's
                # Region too ("In other Regions, the bucket policy doesn't apply").
                if expected and signed and signed != expected and query != "location":
                    with proxy.lock:
                        proxy.refused["region", operation] += 1
                    # AWS, HeadBucket: "calls to the HeadBucket operation always return the
                    # bucket's location through an HTTP response header, whether access to
                    # the bucket is authorized or not", and "the HEAD request returns a
                    # generic 400 Bad Request ... A message body is not included". Other
                    # requests signed for the wrong Region are refused with a body naming
                    # it: "The authorization header is malformed; the region 'us-east-1' is
                    # wrong; expecting 'eu-west-1'", <Region>eu-west-1</Region>.
                    message = (f"The authorization header is malformed; the region "
                               f"'{signed}' is wrong; expecting '{expected}'")
                    data = b"" if self.command == "HEAD" else error_body(
                        "AuthorizationHeaderMalformed", message, "/" + bucket_key,
                        f"<Region>{expected}</Region>")
                    self._refuse(400, "Bad Request", data, [("x-amz-bucket-region", expected)])
                    return True
                # a copy reads its source: that bucket's owner is asked to pay too
                source = unquote(self.headers.get("x-amz-copy-source", "")).lstrip("/")
                named = {bucket, source.split("/", 1)[0]} if source else {bucket}
                if named & proxy.requester_pays and not payer:
                    with proxy.lock:
                        proxy.refused["requester-pays", operation] += 1
                    # AWS (Downloading objects from Requester Pays buckets): "For DELETE,
                    # GET, HEAD, POST, and PUT requests, include x-amz-request-payer :
                    # requester in the header ... If x-amz-request-payer is not in the
                    # request, Amazon S3 returns a 403 error".
                    self._refuse(403, "Forbidden", error_body(
                        "AccessDenied", "Access Denied", "/" + bucket_key),
                        [("x-amz-bucket-region", expected)] if expected else [])
                    return True
                return False

            def _handle(self):
                body = self._body()
                if proxy.intercept is not None and proxy.intercept(self, body):
                    return
                operation, bucket_key = self._operation()
                if self._as_aws(operation, bucket_key):
                    return
                mode = proxy._decide(operation, bucket_key)
                if operation == "CopyObject" and proxy.stall_copies.is_set():
                    with proxy.lock:
                        proxy.stalled += 1
                    proxy.release.wait(120)
                key = bucket_key.split("/", 1)[1] if "/" in bucket_key else ""
                if proxy.max_key_bytes and len(key.encode()) > proxy.max_key_bytes:
                    with proxy.lock:
                        proxy.too_long += 1
                    data = error_body("KeyTooLongError", "Your key is too long", "/" + bucket_key)
                    self.send_response_only(400, "Bad Request")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    return
                if proxy.latency:
                    threading.Event().wait(proxy.latency)
                request = None
                if proxy.model is not None:
                    bucket, _, rest = bucket_key.partition("/")
                    request = Request(self.command, operation, bucket, rest,
                                      urlsplit(self.path).query,
                                      {k.lower(): v for k, v in self.headers.items()})
                    refused = proxy.model.refuse(request)
                    if refused is not None:
                        status, code, message = refused
                        data = error_body(code, message, "/" + bucket_key)
                        self.send_response_only(status)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length",
                                         "0" if self.command == "HEAD" else str(len(data)))
                        self.end_headers()
                        if self.command != "HEAD":
                            self.wfile.write(data)
                        return
                if mode == DROP_BEFORE:
                    return self._drop()
                if mode in ERRORS or mode == OK_ERROR:
                    status, reason, code, message = ERRORS.get(
                        mode, (200, "OK") + ERRORS[INTERNAL][2:])
                    data = error_body(code, message, "/" + bucket_key)
                    self.send_response_only(status, reason)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    return
                try:
                    status, reason, headers, data = self._forward(body)
                except (http.client.HTTPException, OSError):
                    return self._drop()
                if mode == DROP_AFTER:
                    return self._drop()
                if request is not None:
                    headers, data = proxy.model.rewrite(request, status, headers, data)
                self.send_response_only(status, reason)
                length = None
                for name, value in headers:
                    if name.lower() == "content-length":
                        length = value
                    elif name.lower() not in HOP_BY_HOP | proxy.strip_headers:
                        self.send_header(name, value)
                if self.command == "HEAD":
                    self.send_header("Content-Length", length or "0")
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD" and data:
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler
