#!/usr/bin/env python3
"""Move avatar PNGs from a legacy S3 bucket to a production bucket and rewrite
the database paths that point at them.

For every object: copy server-side first, then rewrite the rows with a
compare-and-set, so a row only ever points at an object that exists. A rerun
resumes: what is done is skipped, what is half-done is finished.

Layout, top to bottom: configuration, listing, planning, copying, database,
report, the run itself, verify/rollback, CLI.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import os
import queue
import re
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator
from urllib.parse import quote, unquote_plus, urlsplit

import boto3
import psycopg2
import psycopg2.errors
from botocore.config import Config
from botocore.exceptions import (BotoCoreError, ClientError, EndpointConnectionError,
                                 NoCredentialsError, PartialCredentialsError)
from psycopg2 import sql

log = logging.getLogger("move")

# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

#: (env var, flag dest, default)
SETTINGS = [
    ("DB_CONN_STRING", "db", None),
    ("S3_SOURCE_BUCKET_NAME", "source_bucket", "legacy-s3"),
    ("S3_DEST_BUCKET_NAME", "dest_bucket", "production-s3"),
    ("S3_OBJECT_SOURCE_PREFIX", "source_prefix", "image"),
    ("S3_OBJECT_DEST_PREFIX", "dest_prefix", "avatar"),
    ("DB_TABLE", "table", "avatars"),
    ("DB_PATH_COLUMN", "column", "path"),
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
COPY_OBJECT_LIMIT = 5 * 1024 ** 3  # CopyObject refuses sources larger than this


class UsageError(Exception):
    """Bad configuration or environment: one line to the user, exit 2."""


@dataclass
class Settings:
    db: str
    source_bucket: str
    dest_bucket: str
    source_prefix: str
    dest_prefix: str
    table: str
    column: str
    workers: int = 32
    batch_size: int = 500
    max_attempts: int = 10
    retry_mode: str = "standard"
    overwrite: bool = False
    dry_run: bool = False
    delete_source: bool = False
    create_index: bool = False
    shard: tuple[int, int] | None = None
    manifest: str | None = None
    report: str | None = None
    multipart_threshold: int = COPY_OBJECT_LIMIT
    multipart_chunksize: int = 256 * 1024 ** 2
    db_retry_seconds: float = 120.0
    progress: bool = True
    engine: str = "auto"


def normalize_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    return prefix + "/" if prefix else ""


def mask_dsn(dsn: str) -> str:
    """The DSN without its password, fit for messages and logs."""
    dsn = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", dsn, flags=re.I)


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise UsageError(f"--shard {text!r} is not I/N with 0 <= I < N (e.g. --shard 0/4)")
    return int(m.group(1)), int(m.group(2))


def in_shard(rel_key: str, shard: tuple[int, int] | None) -> bool:
    """Stable across machines and Python runs (unlike hash())."""
    if shard is None:
        return True
    digest = hashlib.blake2b(rel_key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shard[1] == shard[0]


def make_s3_client(max_attempts: int = 10, retry_mode: str = "standard", pool: int = 50):
    """The one place an S3 client is made, so tests can swap in moto.

    Region, credentials and endpoint (AWS_ENDPOINT_URL) come from boto3's
    standard chain. Retries use botocore's standard/adaptive modes, which back
    off on throttling (503 SlowDown), 5xx and dropped connections.
    """
    config = Config(
        retries={"mode": retry_mode, "total_max_attempts": max_attempts},  # "max_attempts" = retries
        max_pool_connections=pool,
        connect_timeout=10,
        read_timeout=120,
        tcp_keepalive=True,
    )
    client = boto3.session.Session().client("s3", config=config)
    client.meta.events.register("before-send.s3", _count_request)
    return client


REQUESTS = Counter()


def _count_request(**_kwargs):
    REQUESTS["s3"] += 1


# --------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Obj:
    key: str
    size: int | None = None
    etag: str | None = None


class Listing:
    """Pages of one prefix, in order, checking the order S3 promises.

    The merge in plan() relies on UTF-8 binary order (S3's documented order,
    and code point order of Python str). A server that lists otherwise (a
    file-system-backed one may list a folder before its sibling files) is
    detected here, ahead of planning, and the planner then stops trusting
    "absent" answers and checks each destination with a HEAD instead.
    """

    def __init__(self, s3, bucket: str, prefix: str, page_size: int = 1000, crt=None):
        self.s3, self.bucket, self.prefix, self.page_size = s3, bucket, prefix, page_size
        self.crt = crt
        self.ordered = True
        self.pages_read = 0

    def _raw_pages(self) -> Iterator[list[Obj]]:
        if self.crt is not None:
            token = None
            while True:
                objs, token = self.crt.list_page(self.bucket, self.prefix, token, self.page_size)
                yield objs
                if not token:
                    return
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix,
                                       PaginationConfig={"PageSize": self.page_size}):
            yield [Obj(o["Key"], o.get("Size"), (o.get("ETag") or "").strip('"') or None)
                   for o in page.get("Contents", ())]

    def pages(self) -> Iterator[list[Obj]]:
        last = None
        for page in self._raw_pages():
            self.pages_read += 1
            for o in page:
                if last is not None and o.key <= last and self.ordered:
                    self.ordered = False
                    log.warning("s3://%s lists keys out of binary order (%r after %r): "
                                "checking each destination before copying", self.bucket,
                                o.key, last)
                last = o.key
            yield page

    def __iter__(self) -> Iterator[Obj]:
        for page in self.pages():
            yield from page


def listed(listing: Listing, stop: threading.Event) -> Iterator[Obj]:
    """A listing read a few pages ahead in its own thread, so listing overlaps copying."""
    for page in prefetch(listing.pages(), 4, stop):
        yield from page


def prefetch(iterable: Iterable, depth: int, stop: threading.Event) -> Iterator:
    """Run an iterator in a thread, `depth` items ahead, so listing overlaps copying.

    The bound keeps memory flat however large the bucket is.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    end = object()

    def pump():
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(end)
        except BaseException as exc:  # re-raised where the caller waits
            q.put(exc)

    threading.Thread(target=pump, name="lister", daemon=True).start()
    while True:
        try:
            item = q.get(timeout=0.2)
        except queue.Empty:
            if stop.is_set():
                return
            continue
        if item is end:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def is_png(key: str) -> bool:
    return key.lower().endswith(".png")


def read_manifest(path: str, bucket: str, prefix: str) -> Iterator[Obj]:
    """Keys from an S3 Inventory / Batch Operations CSV (bucket,key[,...]).

    Keys there are URL-encoded, as S3 writes and expects them.
    """
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or (lineno == 1 and row[0].strip().lower() == "bucket"):
                continue
            if len(row) < 2:
                raise UsageError(f"{path}:{lineno}: expected 'bucket,key', got {','.join(row)!r}")
            if row[0] != bucket:
                raise UsageError(f"{path}:{lineno}: bucket {row[0]!r} is not the source bucket "
                                 f"{bucket!r}; fix the manifest or --source-bucket")
            key = unquote_plus(row[1])
            if key.startswith(prefix):
                yield Obj(key)


def check_manifest(path: str, bucket: str, prefix: str) -> int:
    """Read the whole manifest once before anything changes: bad input exits 2."""
    try:
        return sum(1 for _ in read_manifest(path, bucket, prefix))
    except OSError as exc:
        raise UsageError(f"cannot read manifest {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"manifest {path} is not a UTF-8 CSV: {exc}") from None


# --------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------

COPY, CHECK, DONE, CONFLICT = "copy", "check", "done", "conflict"


@dataclass
class Item:
    src: Obj
    dest_key: str
    kind: str
    dest: Obj | None = None
    action: str = ""  # final: copied / rows-only / skipped / conflict / failed
    error: str = ""
    rows: int = 0
    verified: bool = False


def same_content(src: Obj, dest: Obj) -> bool:
    """Same size, and same ETag where both are plain MD5s (multipart ETags differ by design)."""
    if src.size is not None and dest.size is not None and src.size != dest.size:
        return False
    if src.etag and dest.etag and "-" not in src.etag and "-" not in dest.etag:
        return src.etag == dest.etag
    return src.size is not None and src.size == dest.size


def plan(sources: Iterable[Obj], dests: Iterable[Obj] | None, cfg: Settings,
         src_listing: Listing | None = None, dest_listing: Listing | None = None) -> Iterator[Item]:
    """Pair each source PNG with its destination by merging two sorted listings.

    One pass, no per-object request: a rerun of a finished migration costs only
    listing pages. Without a destination listing (a manifest), each item is
    checked by its worker instead.
    """
    sp, dp = cfg.source_prefix, cfg.dest_prefix
    dest_iter = iter(dests) if dests is not None else None
    d = next(dest_iter, None) if dest_iter is not None else None
    for s in sources:
        if not is_png(s.key) or not s.key.startswith(sp):
            continue
        rel = s.key[len(sp):]
        if not in_shard(rel, cfg.shard):
            continue
        dest_key = dp + rel
        if dest_iter is None:
            yield Item(s, dest_key, CHECK)
            continue
        while d is not None and d.key < dest_key:
            d = next(dest_iter, None)
        trusted = (src_listing is None or src_listing.ordered) and \
                  (dest_listing is None or dest_listing.ordered)
        if d is not None and d.key == dest_key:
            match = d
            d = next(dest_iter, None)
            if same_content(s, match):
                yield Item(s, dest_key, DONE, match, verified=True)
            elif cfg.overwrite:
                yield Item(s, dest_key, COPY, match)
            else:
                yield Item(s, dest_key, CONFLICT, match)
        else:
            yield Item(s, dest_key, COPY if trusted else CHECK)


# --------------------------------------------------------------------------
# Copying
# --------------------------------------------------------------------------


def head(s3, bucket: str, key: str) -> dict | None:
    try:
        return s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def obj_from_head(key: str, h: dict) -> Obj:
    return Obj(key, h.get("ContentLength"), (h.get("ETag") or "").strip('"') or None)


def copy_one(s3, copier, item: Item, cfg: Settings) -> Item:
    """Runs on a worker: never prints, never raises; the result says what happened."""
    try:
        if item.kind == CHECK:
            if item.src.size is None:
                h = head(s3, cfg.source_bucket, item.src.key)
                if h is None:
                    raise LookupError("source object no longer exists")
                item.src = obj_from_head(item.src.key, h)
            h = head(s3, cfg.dest_bucket, item.dest_key)
            if h is not None:
                item.dest = obj_from_head(item.dest_key, h)
                if same_content(item.src, item.dest):
                    item.kind, item.verified = DONE, True
                    return item
                if not cfg.overwrite:
                    item.kind = CONFLICT
                    return item
            item.kind = COPY
        if cfg.dry_run:
            item.action = "copied"
            return item
        source = {"Bucket": cfg.source_bucket, "Key": item.src.key}
        if item.src.size is not None and item.src.size > cfg.multipart_threshold:
            copy_multipart(s3, item, cfg, source)
            h = head(s3, cfg.dest_bucket, item.dest_key)
            item.verified = h is not None and h.get("ContentLength") == item.src.size
        else:
            etag = copier.copy(cfg.source_bucket, item.src.key, cfg.dest_bucket, item.dest_key)
            item.verified = same_content(item.src, Obj(item.dest_key, item.src.size, etag))
        item.action = "copied"
    except (ClientError, BotoCoreError, LookupError, OSError, S3RequestError) as exc:
        item.action, item.error = "failed", describe_error(exc)
    except Exception as exc:  # a bug must fail this object, not hang the coordinator
        log.debug("unexpected error copying %s", item.src.key, exc_info=True)
        item.action, item.error = "failed", f"unexpected {type(exc).__name__}: {exc}"
    return item


def copy_multipart(s3, item: Item, cfg: Settings, source: dict) -> None:
    """Objects over 5 GiB: UploadPartCopy via s3transfer.

    s3transfer does not carry the content type and user metadata over to a
    multipart copy, so they are read once and passed explicitly.
    """
    from boto3.s3.transfer import TransferConfig

    h = head(s3, cfg.source_bucket, item.src.key)
    if h is None:
        raise LookupError("source object no longer exists")
    extra = {"Metadata": h.get("Metadata", {})}
    for name in ("ContentType", "CacheControl", "ContentDisposition", "ContentEncoding",
                 "ContentLanguage"):
        if h.get(name):
            extra[name] = h[name]
    s3.copy(source, cfg.dest_bucket, item.dest_key, ExtraArgs=extra,
            Config=TransferConfig(multipart_threshold=cfg.multipart_threshold,
                                  multipart_chunksize=cfg.multipart_chunksize,
                                  max_concurrency=4, use_threads=True))


class S3RequestError(Exception):
    """A request sent through the CRT that failed after its retries."""


class Boto3Copier:
    def __init__(self, s3):
        self.s3 = s3

    def copy(self, src_bucket: str, src_key: str, dst_bucket: str, dst_key: str) -> str | None:
        resp = self.s3.copy_object(CopySource={"Bucket": src_bucket, "Key": src_key},
                                   Bucket=dst_bucket, Key=dst_key)
        return (resp.get("CopyObjectResult", {}).get("ETag") or "").strip('"') or None


class CrtClient:
    """CopyObject and ListObjectsV2 through the AWS Common Runtime: the hot path.

    botocore spends about 2 ms of CPU building and signing each request; the
    CRT signs natively and keeps its own connection pool and retries (with
    backoff on throttling and 5xx), at a fraction of that. It also checks the
    body of a 200 response for an error, as CopyObject can fail with status 200.
    Everything else (HEAD, multipart, delete, bucket checks) stays on boto3.
    """

    def __init__(self, s3, max_attempts: int, connections: int):
        from awscrt.auth import AwsCredentials, AwsCredentialsProvider
        from awscrt.io import ClientBootstrap, DefaultHostResolver, EventLoopGroup
        from awscrt.s3 import S3Client, S3RequestTlsMode, S3RetryConfig

        credentials = s3._request_signer._credentials
        if credentials is None:
            raise NoCredentialsError()

        def current():  # boto3's object refreshes itself (roles, SSO)
            c = credentials.get_frozen_credentials()
            return AwsCredentials(c.access_key, c.secret_key, c.token)

        url = urlsplit(s3.meta.endpoint_url)
        self.region = s3.meta.region_name or "us-east-1"
        # Custom endpoints (MinIO, SeaweedFS, moto) take path-style requests.
        self.virtual_hosted = url.hostname.endswith("amazonaws.com")
        self.scheme, self.netloc = url.scheme, url.netloc
        self.pending: dict[object, object] = {}
        elg = EventLoopGroup(1)  # one native loop thread: less contention on 2 cores
        self.client = S3Client(
            bootstrap=ClientBootstrap(elg, DefaultHostResolver(elg)), region=self.region,
            tls_mode=S3RequestTlsMode.ENABLED if url.scheme == "https" else S3RequestTlsMode.DISABLED,
            credential_provider=AwsCredentialsProvider.new_delegate(current),
            max_active_connections_override=connections,
            retry_config=S3RetryConfig(max_retries=max(max_attempts - 1, 1)))

    def _send(self, method: str, bucket: str, key_path: str, query: str, headers: list,
              operation: str, done: Callable[[bytes | None, str | None], None]) -> None:
        """One signed request; done(body, error) runs on a CRT thread."""
        from awscrt.http import HttpHeaders, HttpRequest
        from awscrt.s3 import S3RequestType

        if self.virtual_hosted and "." not in bucket:
            host, path = f"{bucket}.{self.netloc}", "/" + key_path
        else:
            host, path = self.netloc, f"/{bucket}" + (f"/{key_path}" if key_path else "")
        body: list[bytes] = []
        token = object()

        def on_done(error=None, error_body=None, status_code=None, **_):
            self.pending.pop(token, None)
            if error is None:
                done(b"".join(body), None)
                return
            code = re.search(rb"<Code>([^<]*)</Code>", error_body or b"")
            message = re.search(rb"<Message>([^<]*)</Message>", error_body or b"")
            done(None, f"{code.group(1).decode() if code else status_code or error.name}: "
                       f"{message.group(1).decode() if message else error.message}")

        REQUESTS["s3"] += 1
        # Held until done: the request must outlive this call.
        self.pending[token] = self.client.make_request(
            type=S3RequestType.DEFAULT, operation_name=operation,
            request=HttpRequest(method, path + (f"?{query}" if query else ""),
                                HttpHeaders([("Host", host), *headers])),
            on_body=lambda chunk, **_: body.append(chunk), on_done=on_done)

    def _wait(self, *args) -> bytes:
        result: queue.Queue = queue.Queue()
        self._send(*args, lambda *r: result.put(r))
        body, error = result.get()
        if error:
            raise S3RequestError(error)
        return body

    def start(self, src_bucket: str, src_key: str, dst_bucket: str, dst_key: str,
              done: Callable[[str | None, str | None], None]) -> None:
        """Send one CopyObject without blocking; done(etag, error) runs on a CRT thread."""
        def finished(body: bytes | None, error: str | None) -> None:
            etag = re.search(rb"<ETag>(?:&quot;|\")?([^<&\"]*)", body or b"")
            done(etag.group(1).decode() if etag else None, error)
        self._send("PUT", dst_bucket, quote(dst_key, safe="/~"), "",
                   [("Content-Length", "0"),
                    ("x-amz-copy-source", quote(f"{src_bucket}/{src_key}", safe="/~"))],
                   "CopyObject", finished)

    def copy(self, src_bucket: str, src_key: str, dst_bucket: str, dst_key: str) -> str | None:
        result: queue.Queue = queue.Queue()
        self.start(src_bucket, src_key, dst_bucket, dst_key, lambda *r: result.put(r))
        etag, error = result.get()
        if error:
            raise S3RequestError(error)
        return etag

    def list_page(self, bucket: str, prefix: str, token: str | None,
                  max_keys: int) -> tuple[list[Obj], str | None]:
        """One ListObjectsV2 page, parsed with ElementTree.

        botocore's response parsing costs about 70 us per key, more than the
        copy itself; this reads just the three fields the planner needs.
        """
        import xml.etree.ElementTree as ET

        params = [("continuation-token", token)] if token else []
        params += [("encoding-type", "url"), ("list-type", "2"),
                   ("max-keys", str(max_keys)), ("prefix", prefix)]
        query = "&".join(f"{k}={quote(v, safe='-_.~')}" for k, v in params)
        root = ET.fromstring(self._wait("GET", bucket, "", query, [], "ListObjectsV2"))
        ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
        encoded = root.findtext(ns + "EncodingType") == "url"
        objs = []
        for c in root.iterfind(ns + "Contents"):
            key = c.findtext(ns + "Key") or ""
            objs.append(Obj(unquote_plus(key) if encoded else key,
                            int(c.findtext(ns + "Size") or 0),
                            (c.findtext(ns + "ETag") or "").strip('"') or None))
        truncated = root.findtext(ns + "IsTruncated") == "true"
        return objs, (root.findtext(ns + "NextContinuationToken") if truncated else None)


def copy_async(copier: CrtClient, item: Item, cfg: Settings, done: Callable[[Item], None]) -> None:
    """The CRT's way of copy_one: no worker thread waits; done(item) gets the outcome."""
    def finished(etag: str | None, error: str | None) -> None:
        if error:
            item.action, item.error = "failed", error
        else:
            item.action = "copied"
            item.verified = same_content(item.src, Obj(item.dest_key, item.src.size, etag))
        done(item)
    try:
        copier.start(cfg.source_bucket, item.src.key, cfg.dest_bucket, item.dest_key, finished)
    except Exception as exc:  # refused before sending (e.g. by the CRT): fail this object
        finished(None, f"{type(exc).__name__}: {exc}")


def make_copier(s3, cfg: Settings):
    """The CRT when it is installed (or asked for), boto3 otherwise."""
    if cfg.engine in ("auto", "crt"):
        try:
            return CrtClient(s3, cfg.max_attempts, cfg.workers)
        except ImportError:
            if cfg.engine == "crt":
                raise UsageError("--engine crt needs the awscrt package: pip install awscrt")
    return Boto3Copier(s3)


def copy_confirmed(s3, cfg: Settings, item: Item) -> bool:
    """Before deleting a source whose copy's ETag is not comparable (SSE-KMS,
    multipart): the copy must exist with the source's size."""
    try:
        h = head(s3, cfg.dest_bucket, item.dest_key)
    except (ClientError, BotoCoreError):
        return False
    return h is not None and item.src.size is not None and h.get("ContentLength") == item.src.size


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'Error')}: {err.get('Message', '')}".strip(": ")
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------
# Database
# --------------------------------------------------------------------------

DB_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)


JOURNAL_COLUMNS = {"id", "run_id", "old_path", "new_path", "rows", "tids", "at", "rolled_back_at"}


class Database:
    """Row lookups and compare-and-set rewrites, in batches, on one connection.

    Used from one thread only. A dropped connection (restart, network) is
    reopened and the batch retried: every statement here is idempotent.
    """

    def __init__(self, cfg: Settings, run_id: str, readonly: bool = False,
                 stop: threading.Event | None = None):
        self.cfg, self.run_id, self.readonly = cfg, run_id, readonly
        self.stop = stop or threading.Event()
        parts = cfg.table.split(".")
        self.table = sql.Identifier(*parts)
        self.table_name = cfg.table
        self.col = sql.Identifier(cfg.column)
        journal_parts = parts[:-1] + [parts[-1] + "_move_journal"]
        self.journal = sql.Identifier(*journal_parts)
        self.conn = None
        self.plan_name = "index"

    # connection ---------------------------------------------------------
    def connect(self):
        self.conn = psycopg2.connect(self.cfg.db, connect_timeout=10,
                                     application_name="move.py", keepalives=1,
                                     keepalives_idle=30, keepalives_interval=10,
                                     keepalives_count=3)
        if self.plan_name == "snapshot":
            self._build_snapshot()

    def close(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except DB_ERRORS:
                pass
            self.conn = None

    def retry(self, fn, *args):
        """Run fn(cursor, *args) in one transaction, reconnecting on connection loss."""
        deadline = time.monotonic() + self.cfg.db_retry_seconds
        delay = 0.5
        while True:
            try:
                if self.conn is None or self.conn.closed:
                    self.connect()
                with self.conn, self.conn.cursor() as cur:
                    return fn(cur, *args)
            except psycopg2.Error as exc:
                # A server that vanishes mid-statement (crash, kill, failover) surfaces
                # as a bare DatabaseError with no SQLSTATE: "server closed the connection
                # unexpectedly". Errors the server itself reported carry a pgcode.
                lost = isinstance(exc, DB_ERRORS) or (type(exc) is psycopg2.DatabaseError
                                                      and exc.pgcode is None)
                if not lost:
                    raise
                self.close()
                if time.monotonic() + delay > deadline or self.stop.is_set():
                    raise
                log.warning("database connection lost (%s); retrying in %.1fs",
                            first_line(exc), delay)
                if self.stop.wait(delay):  # Ctrl-C must not wait out two minutes of retries
                    raise
                delay = min(delay * 2, 10)

    # checks -------------------------------------------------------------
    def preflight(self) -> None:
        try:
            self.connect()
        except psycopg2.Error as exc:
            raise UsageError(f"cannot connect to the database {mask_dsn(self.cfg.db)}: "
                             f"{first_line(exc)}") from None
        with self.conn, self.conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s)", (self.quoted_table(cur),))
            if cur.fetchone()[0] is None:
                raise UsageError(f"table {self.table_name!r} does not exist; set DB_TABLE/--table "
                                 "(or run seed/seeder.py to create it)")
            cur.execute("SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                        "AND attname = %s AND NOT attisdropped AND attnum > 0",
                        (self.quoted_table(cur), self.cfg.column))
            if cur.fetchone() is None:
                raise UsageError(f"table {self.table_name!r} has no column {self.cfg.column!r}; "
                                 "set DB_PATH_COLUMN/--column")
            self.plan_name = "index" if self._has_path_index(cur) else "snapshot"

    def quoted_table(self, cur) -> str:
        return self.table.as_string(cur)

    def _has_path_index(self, cur) -> bool:
        cur.execute("""
            SELECT 1 FROM pg_index i
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
            WHERE i.indrelid = to_regclass(%s) AND a.attname = %s
              AND i.indisvalid AND i.indpred IS NULL
              AND (SELECT amname FROM pg_am JOIN pg_class c ON c.relam = pg_am.oid
                   WHERE c.oid = i.indexrelid) IN ('btree', 'hash')""",
                    (self.quoted_table(cur), self.cfg.column))
        return cur.fetchone() is not None

    def create_index(self) -> None:
        """CONCURRENTLY: the application keeps writing while it builds."""
        name = sql.Identifier(f"{self.table_name.split('.')[-1]}_{self.cfg.column}_move_idx")
        log.info("creating index on %s(%s) CONCURRENTLY", self.table_name, self.cfg.column)
        self.conn.autocommit = True
        try:
            with self.conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} ({})")
                            .format(name, self.table, self.col))
        finally:
            self.conn.autocommit = False
        self.plan_name = "index"

    def ensure_journal(self) -> None:
        """Create the journal once. Skipped when it exists: PostgreSQL checks CREATE
        privilege even for IF NOT EXISTS, and shards starting together race on it."""
        def exists(cur) -> bool:
            cur.execute("SELECT to_regclass(%s)", (self.journal.as_string(cur),))
            return cur.fetchone()[0] is not None

        def create(cur):
            if exists(cur):
                return upgrade(cur)
            cur.execute(sql.SQL("""
                CREATE TABLE IF NOT EXISTS {} (
                    id bigserial PRIMARY KEY,
                    run_id text NOT NULL,
                    old_path text NOT NULL,
                    new_path text NOT NULL,
                    rows integer NOT NULL,
                    tids tid[],
                    at timestamptz NOT NULL DEFAULT now(),
                    rolled_back_at timestamptz)""").format(self.journal))
            cur.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (run_id)").format(
                sql.Identifier(self.journal.strings[-1] + "_run_idx"), self.journal))
        def upgrade(cur):
            # A journal made by an earlier version (or an old deploy/prepare.sql)
            # lacks the row ids that rollback restores by.
            cur.execute("SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                        "AND attnum > 0 AND NOT attisdropped", (self.journal.as_string(cur),))
            missing = JOURNAL_COLUMNS - {name for (name,) in cur.fetchall()}
            if missing - {"tids"}:
                raise UsageError(f"table {self.journal.strings[-1]!r} exists but is not move.py's "
                                 f"journal (no column {', '.join(sorted(missing))}); rename it, or "
                                 "recreate it with deploy/prepare.sql")
            if missing:
                log.info("adding column tids to the journal %s", self.journal.strings[-1])
                try:
                    cur.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS tids tid[]")
                                .format(self.journal))
                except psycopg2.errors.InsufficientPrivilege:
                    raise UsageError(f"the journal {self.journal.strings[-1]!r} predates column "
                                     "tids and this role cannot add it; as its owner run: "
                                     f"ALTER TABLE {self.journal.as_string(cur)} "
                                     "ADD COLUMN tids tid[]") from None
        try:
            self.retry(create)
        except psycopg2.errors.InsufficientPrivilege as exc:
            raise UsageError(f"cannot create the journal {self.journal.strings[-1]!r}: "
                             f"{first_line(exc)}; grant CREATE on the schema, or create it "
                             "first with deploy/prepare.sql") from None
        except (psycopg2.errors.UniqueViolation, psycopg2.errors.DuplicateTable):
            # Another shard created it between our check and our CREATE.
            self.conn.rollback()
            if not self.retry(exists):
                raise

    # the no-index plan --------------------------------------------------
    def _build_snapshot(self) -> None:
        """Without an index on the path column every lookup would scan the table.

        So scan it once: the rows under either prefix go to an indexed temp
        table with their ctid, and rewrites then reach each row by TID scan.
        """
        sp, dp = self.cfg.source_prefix, self.cfg.dest_prefix
        with self.conn, self.conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS pg_temp.move_pending")
            cur.execute(sql.SQL(
                "CREATE TEMP TABLE move_pending AS SELECT ctid AS tid, {col}::text AS path "
                "FROM {table} WHERE left({col}, %s) = %s OR left({col}, %s) = %s")
                .format(col=self.col, table=self.table), (len(sp), sp, len(dp), dp))
            cur.execute("CREATE INDEX ON pg_temp.move_pending (path)")
            cur.execute("ANALYZE pg_temp.move_pending")

    def _lookup_source(self):
        return (sql.SQL("pg_temp.move_pending") if self.plan_name == "snapshot"
                else sql.SQL("(SELECT {col}::text AS path FROM {table} WHERE {col} = ANY(%(keys)s)) r")
                .format(col=self.col, table=self.table))

    # batches ------------------------------------------------------------
    def lookup(self, keys: list[str]) -> dict[str, int]:
        """How many rows point at each key (old and new keys alike)."""
        def run(cur):
            cur.execute(sql.SQL("SELECT path, count(*) FROM {} WHERE path = ANY(%(keys)s) "
                                "GROUP BY path").format(self._lookup_source()), {"keys": keys})
            return dict(cur.fetchall())
        return self.retry(run) if keys else {}

    def referenced(self, keys: list[str]) -> set[str]:
        """Keys some row points at now, read from the table itself, not the
        snapshot: a row the application set to an old key after the snapshot
        must keep its object. Without an index this scans the table."""
        def run(cur):
            cur.execute(sql.SQL("SELECT DISTINCT {col}::text FROM {table} WHERE {col} = ANY(%s)")
                        .format(col=self.col, table=self.table), (keys,))
            return {k for (k,) in cur.fetchall()}
        return self.retry(run) if keys else set()

    def rewrite(self, pairs: list[tuple[str, str]]) -> dict[str, int]:
        """Compare-and-set: only rows still holding the old key change.

        Returns rows rewritten per old key. Each rewrite is journaled in the
        same transaction with the rewritten rows' ctids, so --rollback can
        restore exactly the rows of one run.
        """
        if not pairs:
            return {}

        def run(cur):
            done = self._rewrite(cur, pairs, by_tid=self.plan_name == "snapshot")
            if self.plan_name == "snapshot":
                # A row updated by someone else since the snapshot has a new
                # ctid; reach those few by value: every key that got fewer rows
                # than the snapshot holds for it (not only keys that got none).
                cur.execute("SELECT path, count(*) FROM pg_temp.move_pending "
                            "WHERE path = ANY(%s) GROUP BY path", ([o for o, _ in pairs],))
                held = dict(cur.fetchall())
                missed = [(o, n) for o, n in pairs if done.get(o, 0) < held.get(o, 1)]
                if missed:
                    for old, count in self._rewrite(cur, missed, by_tid=False).items():
                        done[old] = done.get(old, 0) + count
            return done
        return self.retry(run)

    def _rewrite(self, cur, pairs: list[tuple[str, str]], by_tid: bool) -> dict[str, int]:
        if by_tid:
            update = sql.SQL("""
                s AS (SELECT p.tid, v.old, v.new FROM pg_temp.move_pending p
                      JOIN v ON p.path = v.old),
                u AS (UPDATE {table} t SET {col} = s.new FROM s
                      WHERE t.ctid = s.tid AND t.{col} = s.old
                      RETURNING s.old, s.new, t.ctid AS tid)""")
        else:
            update = sql.SQL("""
                u AS (UPDATE {table} t SET {col} = v.new FROM v WHERE t.{col} = v.old
                      RETURNING v.old, v.new, t.ctid AS tid)""")
        cur.execute(sql.SQL("WITH v(old, new) AS "
                            "(SELECT * FROM unnest(%(olds)s::text[], %(news)s::text[])), ")
                    + update.format(table=self.table, col=self.col) + sql.SQL("""
                INSERT INTO {journal} (run_id, old_path, new_path, rows, tids)
                SELECT %(run)s, old, new, count(*), array_agg(tid) FROM u GROUP BY old, new
                RETURNING old_path, rows""").format(journal=self.journal),
                    {"olds": [o for o, _ in pairs], "news": [n for _, n in pairs],
                     "run": self.run_id})
        return dict(cur.fetchall())

    def table_counts(self) -> tuple[int, int]:
        """(rows still under the source prefix, rows under neither prefix): one scan."""
        sp, dp = self.cfg.source_prefix, self.cfg.dest_prefix

        def run(cur):
            cur.execute(sql.SQL(
                "SELECT count(*) FILTER (WHERE left({col}, %s) = %s), "
                "count(*) FILTER (WHERE {col} IS NULL OR (left({col}, %s) <> %s "
                "AND left({col}, %s) <> %s)) FROM {table}").format(col=self.col, table=self.table),
                (len(sp), sp, len(sp), sp, len(dp), dp))
            return cur.fetchone()
        return self.retry(run)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return mask_dsn(text[0]) if text else type(exc).__name__


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


@dataclass
class Stats:
    listed: int = 0
    copied: int = 0
    rows_only: int = 0
    skipped: int = 0
    conflicts: int = 0
    failed: int = 0
    rows_rewritten: int = 0
    objects_without_rows: int = 0
    deleted: int = 0
    rows_left_under_source: int | None = None
    rows_outside: int | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> int:
        return self.copied + self.rows_only + self.skipped + self.conflicts + self.failed


ACTION_COUNTERS = {"copied": "copied", "rows-only": "rows_only", "skipped": "skipped",
                   "conflict": "conflicts", "failed": "failed"}


class Reporter:
    """The only place that writes to the terminal or the report file during a run."""

    def __init__(self, cfg: Settings, quiet: bool):
        self.cfg, self.quiet = cfg, quiet
        self.bar = None
        self.total: int | None = None
        self.report = self.report_file = None
        self.last_log = time.monotonic()
        if cfg.report:
            self.report_file = open(cfg.report, "w", newline="", encoding="utf-8")
            self.report = csv.writer(self.report_file)
            self.report.writerow(["source_key", "dest_key", "action", "rows_rewritten", "error"])
        if not quiet and cfg.progress and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=None, unit="obj", file=sys.stderr, dynamic_ncols=True,
                            desc="dry run" if cfg.dry_run else "migrating")

    def set_total(self, total: int) -> None:
        """From the counting thread; the bar itself is only touched by the main thread."""
        self.total = total

    def item(self, item: Item, stats: Stats) -> None:
        if self.report:
            self.report.writerow([item.src.key, item.dest_key, item.action, item.rows, item.error])
        if item.action == "failed":
            log.error("failed: %s -> %s: %s", item.src.key, item.dest_key, item.error)
        elif item.action == "conflict":
            log.warning("conflict: %s exists with different content (size %s, source %s); "
                        "left alone (use --overwrite)", item.dest_key,
                        item.dest.size if item.dest else "?", item.src.size)
        if self.bar is not None:
            if self.total is not None and self.bar.total != self.total:
                self.bar.total = self.total
            self.bar.update(1)
        elif not self.quiet and time.monotonic() - self.last_log >= 5:
            self.last_log = time.monotonic()
            elapsed = time.monotonic() - stats.started
            log.info("progress: %d done (%d copied, %d rows rewritten, %d failed), %.0f obj/s",
                     stats.finished, stats.copied, stats.rows_rewritten, stats.failed,
                     stats.finished / elapsed if elapsed else 0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.report_file:
            self.report_file.close()


def summary(stats: Stats, cfg: Settings, run_id: str, plan_name: str, interrupted: bool) -> str:
    elapsed = time.monotonic() - stats.started
    rate = stats.finished / elapsed if elapsed > 0 else 0.0
    title = "Dry run: nothing was changed" if cfg.dry_run else f"Run {run_id}"
    if interrupted:
        title += " (interrupted: rerun to finish)"
    verb = "to copy" if cfg.dry_run else "copied"
    rows_verb = "rows to rewrite" if cfg.dry_run else "rows rewritten"
    lines = [
        title,
        f"  listed PNGs            {stats.listed}",
        f"  {verb:<22} {stats.copied}",
        f"  {'rows only' if not cfg.dry_run else 'to rewrite rows only':<22} {stats.rows_only}",
        f"  skipped (done)         {stats.skipped}",
        f"  {rows_verb:<22} {stats.rows_rewritten}",
        f"  objects without rows   {stats.objects_without_rows}",
        f"  conflicts              {stats.conflicts}",
        f"  failed                 {stats.failed}",
    ]
    if cfg.delete_source:
        lines.append(f"  sources deleted        {stats.deleted}")
    if stats.rows_left_under_source is not None:
        lines.append(f"  rows under {cfg.source_prefix} with no object moved (table-wide): "
                     f"{stats.rows_left_under_source}")
        lines.append(f"  rows outside {cfg.source_prefix} and {cfg.dest_prefix} (untouched): "
                     f"{stats.rows_outside}")
    lines.append(f"  row plan: {plan_name}; S3 requests: {REQUESTS['s3']}")
    lines.append(f"  elapsed {elapsed:.1f}s, {rate:.0f} objects/s")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


class Interrupt:
    """First Ctrl-C/SIGTERM: stop taking work and finish cleanly. Second: leave now.

    Leaving at once is safe: rows are only written after their copy succeeded,
    in transactions the server rolls back if we vanish mid-way.
    """

    def __init__(self):
        self.event = threading.Event()
        self.previous = {}

    def install(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)

    def uninstall(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, _frame):
        if self.event.is_set():
            os.write(2, b"\nmove.py: interrupted again, exiting now\n")
            os._exit(EXIT_INTERRUPTED)
        self.event.set()
        os.write(2, b"\nmove.py: interrupted: finishing copies in flight and writing their "
                    b"rows (Ctrl-C again to exit now)\n")


def migrate(s3, copier, db: Database | None, cfg: Settings, reporter: Reporter,
            stop: threading.Event, stats: Stats) -> None:
    """List, plan, copy on a bounded pool, rewrite rows in batches; one coordinating thread."""
    if cfg.manifest:
        sources: Iterable[Obj] = read_manifest(cfg.manifest, cfg.source_bucket, cfg.source_prefix)
        items = plan(sources, None, cfg)
    else:
        crt = copier if isinstance(copier, CrtClient) else None
        src_listing = Listing(s3, cfg.source_bucket, cfg.source_prefix, crt=crt)
        dest_listing = Listing(s3, cfg.dest_bucket, cfg.dest_prefix, crt=crt)
        items = plan(listed(src_listing, stop), listed(dest_listing, stop), cfg,
                     src_listing, dest_listing)

    done_q: queue.Queue = queue.Queue()
    inflight = 0
    max_inflight = cfg.workers * 2
    batch: list[Item] = []
    deletes: list[Item] = []
    last_flush = time.monotonic()

    def finish(item: Item) -> None:
        counter = ACTION_COUNTERS[item.action]
        setattr(stats, counter, getattr(stats, counter) + 1)
        reporter.item(item, stats)

    def flush() -> None:
        nonlocal batch, last_flush
        last_flush = time.monotonic()
        if not batch:
            return
        work, batch = batch, []
        counts = db.lookup([k for i in work for k in (i.src.key, i.dest_key)])
        pending = [(i.src.key, i.dest_key) for i in work if counts.get(i.src.key)]
        rewritten = {} if cfg.dry_run else db.rewrite(pending)
        for i in work:
            i.rows = counts.get(i.src.key, 0) if cfg.dry_run else rewritten.get(i.src.key, 0)
            stats.rows_rewritten += i.rows
            if not counts.get(i.src.key) and not counts.get(i.dest_key):
                stats.objects_without_rows += 1
            if i.action != "copied":
                i.action = "rows-only" if i.rows else "skipped"
            finish(i)
            if cfg.delete_source and not cfg.dry_run and i.action in ("copied", "rows-only",
                                                                       "skipped"):
                if i.verified or copy_confirmed(s3, cfg, i):
                    deletes.append(i)
                else:
                    log.warning("kept source %s: its copy could not be verified (size or ETag "
                                "differs)", i.src.key)
        if len(deletes) >= 1000:
            delete_sources()

    def delete_sources() -> None:
        nonlocal deletes
        work, deletes = deletes, []
        for start in range(0, len(work), 1000):
            chunk = work[start:start + 1000]
            still = db.referenced([i.src.key for i in chunk])
            for i in chunk:
                if i.src.key in still:
                    log.warning("kept source %s: a row points at it again (changed during the "
                                "run); a rerun rewrites it and then deletes the source", i.src.key)
            chunk = [i for i in chunk if i.src.key not in still]
            if not chunk:
                continue
            try:
                resp = s3.delete_objects(Bucket=cfg.source_bucket, Delete={
                    "Objects": [{"Key": i.src.key} for i in chunk], "Quiet": True})
                errors = resp.get("Errors", [])
            except (ClientError, BotoCoreError) as exc:
                errors = [{"Key": i.src.key, "Message": describe_error(exc)} for i in chunk]
            for e in errors:
                log.error("could not delete source %s: %s", e.get("Key"), e.get("Message"))
            stats.deleted += len(chunk) - len(errors)

    def take(item: Item) -> None:
        nonlocal inflight
        inflight -= 1
        if item.kind == CONFLICT:
            item.action = "conflict"
            finish(item)
        elif item.action == "failed":
            finish(item)
        else:
            batch.append(item)

    def drain(block: bool) -> None:
        while inflight:
            try:
                item = done_q.get(timeout=0.2) if block else done_q.get_nowait()
            except queue.Empty:
                if not block or stop.is_set():
                    break  # not return: the flush check below must run
                if time.monotonic() - last_flush >= 1.0:
                    flush()
                continue
            take(item)
            block = False
        if len(batch) >= cfg.batch_size or time.monotonic() - last_flush >= 1.0:
            flush()

    executor = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="copy")
    try:
        for item in items:
            stats.listed += 1
            if item.kind == COPY and cfg.dry_run:
                item.action = "copied"  # would be: nothing to ask S3
                batch.append(item)
            elif item.kind in (COPY, CHECK):
                while inflight >= max_inflight and not stop.is_set():
                    drain(block=True)
                if stop.is_set():
                    break
                inflight += 1
                if (item.kind == COPY and isinstance(copier, CrtClient)
                        and (item.src.size or 0) <= cfg.multipart_threshold):
                    copy_async(copier, item, cfg, done_q.put)
                else:
                    executor.submit(copy_one, s3, copier, item, cfg).add_done_callback(
                        lambda f: f.cancelled() or done_q.put(f.result()))
            elif item.kind == DONE:
                batch.append(item)
            else:
                item.action = "conflict"
                finish(item)
            drain(block=False)
            if stop.is_set():
                break
        # Wait for what is in flight; on interrupt, only a few seconds.
        deadline = time.monotonic() + (5 if stop.is_set() else float("inf"))
        while inflight and time.monotonic() < deadline:
            try:
                take(done_q.get(timeout=0.2))
            except queue.Empty:
                pass
            if len(batch) >= cfg.batch_size:
                flush()
        if inflight:
            log.warning("%d copies still in flight were abandoned; a rerun finishes them", inflight)
        flush()
        if deletes:
            delete_sources()
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def run_migration(s3, cfg: Settings, quiet: bool, stop: threading.Event) -> int:
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    db = Database(cfg, run_id, readonly=cfg.dry_run, stop=stop)
    preflight(s3, db, cfg)
    if db.plan_name == "snapshot":
        if cfg.create_index and not cfg.dry_run:
            db.create_index()
        else:
            log.info("no index on %s(%s): one scan into an indexed snapshot, then rows are "
                     "rewritten by TID (use --create-index to build an index instead)",
                     cfg.table, cfg.column)
            db._build_snapshot()
    if not cfg.dry_run:
        db.ensure_journal()
    copier = make_copier(s3, cfg)
    log.info("%s %s: s3://%s/%s -> s3://%s/%s, %d workers, %s engine%s",
             "dry run" if cfg.dry_run else "run", run_id,
             cfg.source_bucket, cfg.source_prefix, cfg.dest_bucket, cfg.dest_prefix, cfg.workers,
             "crt" if isinstance(copier, CrtClient) else "boto3",
             f", shard {cfg.shard[0]}/{cfg.shard[1]}" if cfg.shard else "")
    stats = Stats()
    reporter = Reporter(cfg, quiet)
    if reporter.bar is not None and not cfg.manifest:
        count_in_background(s3, copier, cfg, reporter, stop)
    interrupted = False
    try:
        migrate(s3, copier, db, cfg, reporter, stop, stats)
        interrupted = stop.is_set()
        if not interrupted:
            stats.rows_left_under_source, stats.rows_outside = db.table_counts()
            if cfg.dry_run:  # the plan: what a real run would leave under the source prefix
                stats.rows_left_under_source -= stats.rows_rewritten
    finally:
        reporter.close()
        db.close()
    text = summary(stats, cfg, run_id, db.plan_name, interrupted)
    log.debug("summary:\n%s", text)  # the log file keeps it too
    print(text, flush=True)
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if stats.failed or (stats.conflicts and not cfg.dry_run) else EXIT_OK


def count_in_background(s3, copier, cfg: Settings, reporter: Reporter,
                        stop: threading.Event) -> None:
    """A second, count-only listing gives the progress bar a total and an ETA."""
    def count():
        n = 0
        try:
            crt = copier if isinstance(copier, CrtClient) else None
            for o in Listing(s3, cfg.source_bucket, cfg.source_prefix, crt=crt):
                if stop.is_set():
                    return
                n += is_png(o.key) and in_shard(o.key[len(cfg.source_prefix):], cfg.shard)
            reporter.set_total(n)
        except Exception:  # the bar just has no total
            pass
    threading.Thread(target=count, name="counter", daemon=True).start()


def preflight(s3, db: Database | None, cfg: Settings) -> None:
    """Everything that can be wrong with the setup, checked before anything changes."""
    if (cfg.source_bucket == cfg.dest_bucket and
            (cfg.source_prefix.startswith(cfg.dest_prefix) or
             cfg.dest_prefix.startswith(cfg.source_prefix))):
        raise UsageError(f"source and destination overlap (s3://{cfg.source_bucket}/"
                         f"{cfg.source_prefix} and {cfg.dest_prefix}); choose distinct prefixes")
    for role, bucket in (("source", cfg.source_bucket), ("destination", cfg.dest_bucket)):
        check_bucket(s3, role, bucket)
    if cfg.manifest:
        log.info("manifest %s: %d keys under %s", cfg.manifest,
                 check_manifest(cfg.manifest, cfg.source_bucket, cfg.source_prefix),
                 cfg.source_prefix)
    if db is not None:
        db.preflight()


def check_bucket(s3, role: str, bucket: str) -> None:
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise UsageError(f"{role} bucket {bucket!r} does not exist; check the bucket name "
                             f"and AWS_ENDPOINT_URL/region") from None
        if code in ("403", "AccessDenied", "Forbidden"):
            raise UsageError(f"no access to {role} bucket {bucket!r}; check the credentials and "
                             "the IAM policy in the README") from None
        raise UsageError(f"cannot reach {role} bucket {bucket!r}: {describe_error(exc)}") from None
    except (NoCredentialsError, PartialCredentialsError):
        raise UsageError("no AWS credentials found; set AWS_PROFILE or AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY (see .env.example)") from None
    except EndpointConnectionError as exc:
        raise UsageError(f"cannot reach S3 at {exc.kwargs.get('endpoint_url', '?')}; check "
                         "AWS_ENDPOINT_URL and the network") from None
    except BotoCoreError as exc:
        raise UsageError(f"cannot reach {role} bucket {bucket!r}: {exc}") from None


# --------------------------------------------------------------------------
# Verify and rollback
# --------------------------------------------------------------------------


def verify(s3, cfg: Settings) -> int:
    """Read-only reconciliation of both buckets and the table; one line per problem."""
    db = Database(cfg, "verify", readonly=True)
    preflight(s3, db, cfg)
    if db.plan_name == "snapshot":
        db._build_snapshot()
    problems = Counter()
    checked = 0

    def problem(kind: str, text: str) -> None:
        problems[kind] += 1
        print(f"{kind}: {text}", flush=True)

    def check_rows(pairs: list[tuple[str, str]]) -> None:
        counts = db.lookup([k for pair in pairs for k in pair])
        for old, new in pairs:
            if counts.get(old):
                problem("NOT-REWRITTEN", f"{counts[old]} row(s) still point at {old} (copy: {new})")

    stop = threading.Event()
    src_listing = Listing(s3, cfg.source_bucket, cfg.source_prefix)
    dest_listing = Listing(s3, cfg.dest_bucket, cfg.dest_prefix)
    pairs: list[tuple[str, str]] = []
    for item in plan(listed(src_listing, stop), listed(dest_listing, stop),
                     cfg, src_listing, dest_listing):
        checked += 1
        if item.kind == CHECK:
            h = head(s3, cfg.dest_bucket, item.dest_key)
            item.dest = obj_from_head(item.dest_key, h) if h else None
            item.kind = COPY if h is None else DONE if same_content(item.src, item.dest) else CONFLICT
        if item.kind == COPY:
            problem("MISSING-COPY", f"{item.src.key} has no copy at {item.dest_key}")
        elif item.kind == CONFLICT:
            problem("MISMATCH", f"{item.dest_key} (size {item.dest.size}, etag {item.dest.etag}) "
                                f"differs from {item.src.key} (size {item.src.size}, "
                                f"etag {item.src.etag})")
        pairs.append((item.src.key, item.dest_key))
        if len(pairs) >= cfg.batch_size:
            check_rows(pairs)
            pairs = []
    check_rows(pairs)

    # Every row under the destination prefix must point at an existing object:
    # both sides sorted in binary order, so one merge pass.
    dest_keys = (o.key for o in listed(Listing(s3, cfg.dest_bucket, cfg.dest_prefix), stop))
    d = next(dest_keys, None)
    rows = 0
    for path, n in db_rows_under(db, cfg.dest_prefix):
        rows += n
        while d is not None and d < path:
            d = next(dest_keys, None)
        if d != path:
            problem("DANGLING-ROW", f"{n} row(s) point at {path}, which does not exist in "
                                    f"s3://{cfg.dest_bucket}")
    db.close()
    total = sum(problems.values())
    print(f"Verify: {checked} source PNGs and {rows} rewritten rows checked; "
          f"{total} problem(s)" + (": " + ", ".join(f"{k} {v}" for k, v in sorted(problems.items()))
                                   if total else ""), flush=True)
    return EXIT_OK if total == 0 else EXIT_FAILED


def db_rows_under(db: Database, prefix: str) -> Iterator[tuple[str, int]]:
    """Distinct paths under a prefix in binary order, streamed with a server-side cursor."""
    with db.conn, db.conn.cursor(name="move_verify") as cur:
        cur.itersize = 5000
        cur.execute(sql.SQL('SELECT {col}::text COLLATE "C", count(*) FROM {table} '
                            'WHERE left({col}, %s) = %s GROUP BY 1 ORDER BY 1')
                    .format(col=db.col, table=db.table), (len(prefix), prefix))
        yield from cur


def rollback(s3, cfg: Settings, run: str) -> int:
    """Point the rows of one run back at their old keys, where those still exist."""
    db = Database(cfg, "rollback")
    preflight(s3, db, cfg)
    db.ensure_journal()
    with db.conn, db.conn.cursor() as cur:
        if run == "latest":
            cur.execute(sql.SQL("SELECT run_id FROM {} WHERE rolled_back_at IS NULL "
                                "ORDER BY at DESC, id DESC LIMIT 1").format(db.journal))
            row = cur.fetchone()
            if row is None:
                raise UsageError("no run to roll back: the journal has no rewrites left")
            run = row[0]
        cur.execute(sql.SQL("SELECT DISTINCT old_path, new_path FROM {} WHERE run_id = %s "
                            "AND rolled_back_at IS NULL").format(db.journal), (run,))
        entries = cur.fetchall()
    if not entries:
        raise UsageError(f"run {run!r} has nothing to roll back (unknown run id, or already "
                         "rolled back); list runs with: SELECT DISTINCT run_id FROM "
                         f"{db.journal.strings[-1]}")
    with ThreadPoolExecutor(cfg.workers) as pool:
        exists = list(pool.map(lambda e: head(s3, cfg.source_bucket, e[0]) is not None, entries))
    ok = [e for e, present in zip(entries, exists) if present]
    refused = [e for e, present in zip(entries, exists) if not present]
    for old, new in refused:
        print(f"REFUSED: {new} stays: its source {old} no longer exists in "
              f"s3://{cfg.source_bucket}", flush=True)
    restored = 0
    for start in range(0, len(ok), cfg.batch_size):
        chunk = ok[start:start + cfg.batch_size]

        def undo(cur):
            # The rows this run rewrote, by the ctid each got then; a row updated
            # since has moved, and is found by value (as many as the run rewrote).
            params = {"run": run, "olds": [o for o, _ in chunk]}
            cur.execute(sql.SQL("""
                WITH j AS (SELECT id, old_path, new_path, rows, tids FROM {journal}
                           WHERE run_id = %(run)s AND rolled_back_at IS NULL
                             AND old_path = ANY(%(olds)s)),
                u AS (UPDATE {table} t SET {col} = j.old_path
                      FROM j CROSS JOIN LATERAL unnest(j.tids) AS x(tid)
                      WHERE t.ctid = x.tid AND t.{col} = j.new_path RETURNING j.id)
                SELECT j.old_path, j.new_path, count(u.id), j.rows - count(u.id)
                FROM j LEFT JOIN u ON u.id = j.id
                GROUP BY j.id, j.old_path, j.new_path, j.rows""").format(
                    journal=db.journal, table=db.table, col=db.col), params)
            n = 0
            for old, new, restored, left in cur.fetchall():
                n += restored
                if left > 0:
                    cur.execute(sql.SQL("""
                        UPDATE {table} SET {col} = %s WHERE ctid = ANY(ARRAY(
                            SELECT ctid FROM {table} WHERE {col} = %s LIMIT %s))""").format(
                            table=db.table, col=db.col), (old, new, left))
                    n += cur.rowcount
            cur.execute(sql.SQL("UPDATE {} SET rolled_back_at = now() WHERE run_id = %s "
                                "AND old_path = ANY(%s)").format(db.journal),
                        (run, [o for o, _ in chunk]))
            return n
        restored += db.retry(undo)
    db.close()
    print(f"Rollback of run {run}: {restored} row(s) restored for {len(ok)} key(s); "
          f"{len(refused)} key(s) refused. Copies in s3://{cfg.dest_bucket} were left in place.",
          flush=True)
    return EXIT_FAILED if refused else EXIT_OK


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other bad input
        self.exit(EXIT_USAGE, f"{os.path.basename(self.prog)}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="move.py",
        description="Copy image/**.png from the legacy bucket to avatar/** in the production "
                    "bucket (server-side), then rewrite the database rows that point at them. "
                    "Safe to interrupt and rerun: it resumes.",
        epilog="Settings come from flags, else environment variables, else a .env file. "
               "S3 credentials, region and endpoint come from boto3's standard chain "
               "(AWS_PROFILE, AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...). Exit codes: 0 done, "
               "1 some objects failed or conflicted (rerun to resume), 2 bad input, "
               "130 interrupted.")
    g = p.add_argument_group("where")
    g.add_argument("--db", metavar="DSN", help="PostgreSQL DSN (env DB_CONN_STRING; required)")
    g.add_argument("--source-bucket", help="env S3_SOURCE_BUCKET_NAME (default legacy-s3)")
    g.add_argument("--dest-bucket", help="env S3_DEST_BUCKET_NAME (default production-s3)")
    g.add_argument("--source-prefix", help="env S3_OBJECT_SOURCE_PREFIX (default image)")
    g.add_argument("--dest-prefix", help="env S3_OBJECT_DEST_PREFIX (default avatar)")
    g.add_argument("--table", help="env DB_TABLE (default avatars; schema.table allowed)")
    g.add_argument("--column", help="env DB_PATH_COLUMN (default path)")
    g = p.add_argument_group("what")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--dry-run", action="store_true",
                   help="change nothing; print the plan (to copy, rows only, done, conflicts)")
    m.add_argument("--verify", action="store_true",
                   help="read-only check of buckets and table; exit 0 only when clean")
    m.add_argument("--rollback", nargs="?", const="latest", metavar="RUN",
                   help="restore the old paths written by run RUN (default: the latest run)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace destination objects whose content differs (default: conflict)")
    g.add_argument("--delete-source", action="store_true",
                   help="delete each source object once its copy is verified and its rows "
                        "are rewritten")
    g.add_argument("--create-index", action="store_true",
                   help="create an index on the path column (CONCURRENTLY) if there is none")
    g.add_argument("--shard", metavar="I/N",
                   help="only the keys whose stable hash falls in shard I of N (0-based)")
    g.add_argument("--manifest", metavar="CSV",
                   help="take keys from a CSV of bucket,key (S3 Inventory / Batch Operations "
                        "format, URL-encoded keys) instead of listing the bucket")
    g = p.add_argument_group("how")
    g.add_argument("--workers", type=positive_int, default=32,
                   help="concurrent copies (default 32)")
    g.add_argument("--batch-size", type=positive_int, default=500,
                   help="rows rewritten per transaction (default 500)")
    g.add_argument("--engine", choices=("auto", "crt", "boto3"), default="auto",
                   help="how copies are sent: the AWS Common Runtime (fast, native signing) "
                        "or boto3; auto picks crt when awscrt is installed")
    g.add_argument("--max-attempts", type=positive_int, default=10,
                   help="attempts per S3 request, with backoff (default 10)")
    g.add_argument("--retry-mode", choices=("standard", "adaptive"), default="standard",
                   help="botocore retry mode (default standard)")
    g.add_argument("--multipart-threshold", type=positive_int, default=COPY_OBJECT_LIMIT,
                   metavar="BYTES", help="multipart copy above this size (default 5 GiB)")
    g.add_argument("--multipart-chunksize", type=positive_int, default=256 * 1024 ** 2,
                   metavar="BYTES", help="part size of multipart copies (default 256 MiB)")
    g = p.add_argument_group("output")
    g.add_argument("--report", metavar="PATH",
                   help="write a CSV line per object: source_key, dest_key, action, "
                        "rows_rewritten, error")
    g.add_argument("--log-file", metavar="PATH", help="also log (with debug detail) to this file")
    g.add_argument("-q", "--quiet", action="store_true",
                   help="no progress, only warnings, errors and the summary")
    g.add_argument("--env-file", metavar="PATH", default=".env",
                   help="read settings from this file (default .env; missing is fine)")
    return p


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def settings_from(args: argparse.Namespace) -> Settings:
    from dotenv import dotenv_values

    file_values = dotenv_values(args.env_file) if os.path.exists(args.env_file) else {}
    # boto3 reads its own variables from the environment; .env must reach it too.
    for name, value in file_values.items():
        if name.startswith("AWS_") and value is not None:
            os.environ.setdefault(name, value)
    values = {}
    for env, dest, default in SETTINGS:
        flag = getattr(args, dest)
        values[dest] = (flag if flag is not None else
                        os.environ.get(env) or file_values.get(env) or default)
    if not values["db"]:
        raise UsageError("no database given: set DB_CONN_STRING (in the environment or .env) "
                         "or pass --db")
    for dest in ("source_bucket", "dest_bucket", "table", "column"):
        if not values[dest].strip():
            raise UsageError(f"--{dest.replace('_', '-')} must not be empty")
    values["source_prefix"] = normalize_prefix(values["source_prefix"])
    if not values["source_prefix"]:  # would take every .png in the bucket
        raise UsageError("--source-prefix must not be empty")
    values["dest_prefix"] = normalize_prefix(values["dest_prefix"])
    if args.manifest and not os.path.isfile(args.manifest):
        raise UsageError(f"manifest {args.manifest} does not exist")
    return Settings(
        **values, workers=args.workers, batch_size=args.batch_size,
        max_attempts=args.max_attempts, retry_mode=args.retry_mode, overwrite=args.overwrite,
        dry_run=args.dry_run, delete_source=args.delete_source, create_index=args.create_index,
        shard=parse_shard(args.shard) if args.shard else None, manifest=args.manifest,
        report=args.report, multipart_threshold=args.multipart_threshold,
        multipart_chunksize=max(args.multipart_chunksize, 5 * 1024 ** 2),
        progress=not args.quiet, engine=args.engine)


def setup_logging(quiet: bool, log_file: str | None) -> None:
    log.handlers.clear()
    log.setLevel(logging.DEBUG)
    log.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log.addHandler(console)
    if log_file:
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(message)s"))
        log.addHandler(fh)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    interrupt = Interrupt()
    try:
        setup_logging(args.quiet, args.log_file)
        cfg = settings_from(args)
        interrupt.install()
        s3 = make_s3_client(cfg.max_attempts, cfg.retry_mode, pool=cfg.workers + 8)
        if args.verify:
            return verify(s3, cfg)
        if args.rollback:
            return rollback(s3, cfg, args.rollback)
        return run_migration(s3, cfg, args.quiet, interrupt.event)
    except UsageError as exc:
        print(f"move.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (NoCredentialsError, PartialCredentialsError):
        print("move.py: error: no AWS credentials found; set AWS_PROFILE or AWS_ACCESS_KEY_ID "
              "and AWS_SECRET_ACCESS_KEY (see .env.example)", file=sys.stderr)
        return EXIT_USAGE
    except psycopg2.Error as exc:
        log.debug("database error", exc_info=True)  # the traceback, for the log file only
        if interrupt.event.is_set():
            print(f"move.py: interrupted while the database was unreachable "
                  f"({first_line(exc)}): the rows of the last batch stay on their sources, "
                  "whose objects still exist; rerun to resume", file=sys.stderr)
            return EXIT_INTERRUPTED
        print(f"move.py: error: database: {first_line(exc)}; rerun to resume", file=sys.stderr)
        return EXIT_FAILED
    except (ClientError, BotoCoreError, S3RequestError) as exc:
        print(f"move.py: error: S3: {mask_dsn(describe_error(exc))}; rerun to resume",
              file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"move.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        interrupt.uninstall()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if code == EXIT_INTERRUPTED:
        os._exit(code)  # don't wait for copies abandoned in flight
    sys.exit(code)
