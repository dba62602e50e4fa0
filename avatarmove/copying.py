"""Copying: the S3 client, and two engines behind one interface (Engine).

An engine sends ONE attempt of a request, nothing more: no token, no retry, no
bookkeeping. pacing.RequestPath wraps every attempt of either engine, and every
boto3 call (PacedClient), with the token, the time it left, the observation of
the answer and the retry policy. The CRT engine is the hot path; the boto3
engine is the fallback and what in-process tests run (moto patches botocore,
which the CRT bypasses). HEAD, multipart, delete and bucket checks stay on
boto3 in both cases.
"""
from __future__ import annotations

import logging
import queue
import re
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable
from urllib.parse import quote, unquote_plus, urlsplit

import boto3
import botocore.loaders
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from .identity import NeedsCustomerKey, described, identical
from .listing import Obj
from .pacing import (SERVER_ERRORS, THROTTLE_CODES, PacedClient, RequestPath,  # noqa: F401
                     S3RequestError, backoff, describe, retryable)
from .planning import (ARCHIVED_CLASSES, CHECK, CONFLICT, COPY, DONE, SKIP_ARCHIVED, Item,
                       archived, needs_restore, same_content, sse_c)
from .settings import Settings, UsageError

log = logging.getLogger("move")

#: reply(value, failure): an engine's answer to one attempt; failure None means success.
Reply = Callable[[Any, "BaseException | None"], None]


_LOADERS: dict = {}


def aws_session(**kwargs) -> boto3.session.Session:
    """A new session (credentials and settings read afresh from the environment)
    sharing this process's one data loader: every botocore session otherwise parses
    the S3 service model's JSON again, about 40 ms each time."""
    core = botocore.session.get_session()
    path = core.get_config_variable("data_path")
    if path not in _LOADERS:
        _LOADERS[path] = botocore.loaders.create_loader(path)
    core.register_component("data_loader", _LOADERS[path])
    return boto3.session.Session(botocore_session=core, **kwargs)


def make_s3_client(max_attempts: int = 10, retry_mode: str = "standard", pool: int = 50,
                   session: boto3.session.Session | None = None, request_payer: bool = False):
    """The one place an S3 client is made, so tests can swap in moto.

    Region, credentials and endpoint (AWS_ENDPOINT_URL) come from boto3's
    standard chain. The run makes its client with max_attempts=1 and wraps it
    in a PacedClient, whose RequestPath retries; others (test fixtures, tools)
    keep botocore's standard retries.
    """
    config = Config(
        # botocore's "max_attempts" counts retries; "total_max_attempts" counts attempts
        retries={"mode": retry_mode, "total_max_attempts": max_attempts},
        max_pool_connections=pool,
        connect_timeout=10,
        read_timeout=120,
        tcp_keepalive=True,
    )
    client = (session or aws_session()).client("s3", config=config)
    # Signed with the rest of the request, so added before signing.
    client.meta.events.register("before-sign.s3.CopyObject", _lock_ready)
    if request_payer:
        client.meta.events.register("before-sign.s3", _requester_pays)
    return client


# A CopyObject has no body; this is the MD5 of that empty body. S3 asks uploads into a
# bucket with Object Lock default retention for one: "The Content-MD5 or
# x-amz-sdk-checksum-algorithm header is required for any request to upload an object
# with a retention period configured using Amazon S3 Object Lock" (PutObject API
# reference); moto refuses a CopyObject there without it. It is true of every copy
# (S3 checks Content-MD5 against the body it received), so every copy carries it.
EMPTY_BODY_MD5 = "1B2M2Y8AsgTpgAmY7PhCfg=="
# Requester Pays buckets: "For DELETE, GET, HEAD, POST, and PUT requests, include
# x-amz-request-payer : requester in the header"; without it S3 answers 403.
REQUESTER_PAYS = ("x-amz-request-payer", "requester")


def _lock_ready(request, **_) -> None:
    if "Content-MD5" not in request.headers:
        request.headers["Content-MD5"] = EMPTY_BODY_MD5


def _requester_pays(request, **_) -> None:
    request.headers[REQUESTER_PAYS[0]] = REQUESTER_PAYS[1]


def copy_class(src: Obj, cfg: Settings) -> str | None:
    """The storage class of src's copy: --storage-class, else the source's own (S3
    makes a copy STANDARD unless told otherwise). None: STANDARD, nothing to send.

    A restored GLACIER or DEEP_ARCHIVE source is the exception: it was restored to be
    read, and a copy made in its class would be archived again, unreadable."""
    chosen = cfg.storage_class or (None if src.storage_class in ARCHIVED_CLASSES
                                   else src.storage_class)
    return None if chosen in (None, "", "STANDARD") else chosen


# aws-c-s3 sizes its connection pool once, from the throughput target:
# ideal connections = max(10, ceil(throughput_target_gbps / 0.4)), and
# max_active_connections_override can only lower that. Its default, 10 Gbps, is
# 25 connections: about 450 copies/s at a 50 ms round trip, whatever is in flight.
CRT_GBPS_PER_CONNECTION = 100.0 / 250

# The CRT answers these without the response's status or body.
CRT_ERRORS = {"AWS_ERROR_S3_SLOW_DOWN": "SlowDown", "AWS_ERROR_S3_INTERNAL_ERROR": "InternalError",
              "AWS_ERROR_S3_REQUEST_TIME_TOO_SKEWED": "RequestTimeTooSkewed"}

# Read from answers on the CRT's thread, once per copy: compiled once.
CODE = re.compile(rb"<Code>([^<]*)</Code>")
MESSAGE = re.compile(rb"<Message>([^<]*)</Message>")
ETAG = re.compile(rb"<ETag>(?:&quot;|\")?([^<&\"]*)")
# Characters a key keeps in a request path; quote() costs about 8 us a call, and
# most keys need none of it.
PLAIN_KEY = re.compile(r"[A-Za-z0-9_.~/-]*")


def quote_key(key: str) -> str:
    return key if PLAIN_KEY.fullmatch(key) else quote(key, safe="/~")


def describe_error(exc: BaseException) -> str:
    return describe(exc)


def error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    if isinstance(exc, S3RequestError):
        return exc.code
    return type(exc).__name__


def head(s3, bucket: str, key: str) -> dict | None:
    try:
        return s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def restored(status: dict | None) -> bool:
    """A listing's RestoreStatus: present once a restore was asked for, and without
    IsRestoreInProgress once the restored copy can be read (until RestoreExpiryDate)."""
    return bool(status) and not status.get("IsRestoreInProgress") and \
        bool(status.get("RestoreExpiryDate"))


# ---------------------------------------------------------------- engines


class Engine(ABC):
    """One attempt of a request, nothing more: the RequestPath around it takes the
    token, stamps when it left, tells the pacer what came back and retries."""
    name: str
    copy_acl: str | None = None  # the canned ACL every copy is sent with (access.decide)

    @abstractmethod
    def start(self, src_bucket: str, src_key: str, dst_bucket: str, dst_key: str,
              reply: Reply, storage_class: str | None = None) -> None:
        """Send one CopyObject without blocking; reply(etag, failure) once, from any thread.
        storage_class: the copy's (copy_class); None leaves S3's default, STANDARD."""

    @abstractmethod
    def copy(self, src_bucket: str, src_key: str, dst_bucket: str, dst_key: str,
             storage_class: str | None = None) -> str | None:
        """One CopyObject, blocking: the copy's ETag, or its error raised."""

    @abstractmethod
    def list_page(self, bucket: str, prefix: str, token: str | None,
                  max_keys: int) -> tuple[list[Obj], str | None]:
        """One ListObjectsV2 page, blocking: its objects and the next page's token."""

    @abstractmethod
    def close(self) -> None:
        """Copies not sent yet are dropped (the run has ended or was interrupted)."""


class Paced:
    """What Listing reads: an engine's pages through the request path."""

    def __init__(self, engine: Engine, path: RequestPath):
        self.engine, self.path = engine, path

    def list_page(self, bucket: str, prefix: str, token: str | None,
                  max_keys: int) -> tuple[list[Obj], str | None]:
        return self.path.call(lambda: self.engine.list_page(bucket, prefix, token, max_keys))


class Boto3Engine(Engine):
    """Through a boto3 client, one call per attempt: the run gives it the one-attempt
    client (the RequestPath retries); verify gives it a PacedClient."""
    name = "boto3"

    def __init__(self, s3, threads: int = 16):
        self.s3, self.threads = s3, threads
        self._pool: ThreadPoolExecutor | None = None

    def start(self, src_bucket: str, src_key: str, dst_bucket: str, dst_key: str,
              reply: Reply, storage_class: str | None = None) -> None:
        # botocore blocks: a thread waits for each copy in flight
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="copy")
        self._pool.submit(self._answer, src_bucket, src_key, dst_bucket, dst_key, reply,
                          storage_class)

    def _answer(self, src_bucket: str, src_key: str, dst_bucket: str, dst_key: str,
                reply: Reply, storage_class: str | None) -> None:
        try:
            etag = self.copy(src_bucket, src_key, dst_bucket, dst_key, storage_class)
        except Exception as exc:  # a bug fails this copy, never the coordinator's wait
            if not isinstance(exc, (ClientError, BotoCoreError, OSError)):
                log.debug("unexpected error copying %s", src_key, exc_info=True)
                exc = S3RequestError(f"unexpected {type(exc).__name__}: {exc}",
                                     type(exc).__name__)
            reply(None, exc)
        else:
            reply(etag, None)

    def copy(self, src_bucket: str, src_key: str, dst_bucket: str, dst_key: str,
             storage_class: str | None = None) -> str | None:
        extra = {"StorageClass": storage_class} if storage_class else {}
        if self.copy_acl:
            extra["ACL"] = self.copy_acl
        resp = self.s3.copy_object(CopySource={"Bucket": src_bucket, "Key": src_key},
                                   Bucket=dst_bucket, Key=dst_key, **extra)
        return (resp.get("CopyObjectResult", {}).get("ETag") or "").strip('"') or None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def list_page(self, bucket: str, prefix: str, token: str | None,
                  max_keys: int) -> tuple[list[Obj], str | None]:
        # RestoreStatus: an archived object that was restored can be copied (planning).
        params = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": max_keys,
                  "OptionalObjectAttributes": ["RestoreStatus"]}
        if token:
            params["ContinuationToken"] = token
        page = self.s3.list_objects_v2(**params)
        objs = [Obj(o["Key"], o.get("Size"), (o.get("ETag") or "").strip('"') or None,
                    o.get("StorageClass"), restored(o.get("RestoreStatus")))
                for o in page.get("Contents", ())]
        return objs, page.get("NextContinuationToken") if page.get("IsTruncated") else None


class CrtEngine(Engine):
    """CopyObject and ListObjectsV2 through the AWS Common Runtime.

    botocore spends about 2 ms of CPU building and signing each request; the
    CRT signs natively and keeps its own connection pool, at a fraction of
    that. It also checks the body of a 200 response for an error, as
    CopyObject can fail with status 200.

    The CRT's own retries are off: a retry it made would hide the SlowDown
    that should slow the whole run down, and the RequestPath retries.
    """
    name = "crt"

    def __init__(self, s3, connections: int, session: boto3.session.Session | None = None,
                 regions=None, request_payer: bool = False):
        from awscrt.http import HttpHeaders, HttpRequest
        from awscrt.io import ClientBootstrap, DefaultHostResolver, EventLoopGroup
        from awscrt.s3 import (S3Client, S3RequestTlsMode, S3RequestType, S3RetryConfig,
                               S3RetryMode, create_default_s3_signing_config)

        # kept here: an import statement in _send would run once per request
        self.headers_type, self.request_type = HttpHeaders, HttpRequest
        self.default_type = S3RequestType.DEFAULT

        # First, before any native object exists: one dropped while NoCredentialsError
        # unwinds runs awscrt's shutdown callback with the exception set (SystemError).
        credentials = crt_credentials(session or aws_session())
        url = urlsplit(s3.meta.endpoint_url)
        self.region = s3.meta.region_name or "us-east-1"
        # Custom endpoints (MinIO, SeaweedFS, moto) take path-style requests.
        self.virtual_hosted = url.hostname.endswith("amazonaws.com")
        self.scheme, self.netloc = url.scheme, url.netloc
        # Buckets in another region than the client's (regions.Regions): their own
        # host on AWS, and their own signing region everywhere.
        self.netlocs: dict[str, str] = {}
        self.signing: dict[str, object] = {}
        for bucket, region in (regions.other().items() if regions is not None else ()):
            if self.virtual_hosted:
                self.netlocs[bucket] = regional_netloc(url.netloc, region)
            self.signing[bucket] = create_default_s3_signing_config(
                region=region, credential_provider=credentials)
        # Sent with every request, as the boto3 client does (make_s3_client).
        self.always = [REQUESTER_PAYS] if request_payer else []
        self.pending: dict[object, object] = {}
        elg = EventLoopGroup(1)  # one native loop thread: less contention on 2 cores
        self.client = S3Client(
            bootstrap=ClientBootstrap(elg, DefaultHostResolver(elg)), region=self.region,
            tls_mode=(S3RequestTlsMode.ENABLED if url.scheme == "https"
                      else S3RequestTlsMode.DISABLED),
            credential_provider=credentials,
            throughput_target_gbps=crt_throughput_target(connections),
            max_active_connections_override=connections,  # exact, despite float rounding
            # A high target also raises the CRT's part-buffer ceiling (to GiBs); a
            # CopyObject has no body to buffer.
            memory_limit=256 * 1024 ** 2,
            retry_config=S3RetryConfig(retry_mode=S3RetryMode.NONE))

    def _send(self, method: str, bucket: str, key_path: str, query: str, headers: list,
              operation: str, reply: Reply) -> None:
        """One signed request; reply(body, failure) runs on a CRT thread."""
        netloc = self.netlocs.get(bucket, self.netloc)
        if self.virtual_hosted and "." not in bucket:
            host, path = f"{bucket}.{netloc}", "/" + key_path
        else:
            host, path = netloc, f"/{bucket}" + (f"/{key_path}" if key_path else "")
        body: list[bytes] = []
        token = object()

        def on_done(error=None, error_body=None, status_code=None, **_):
            self.pending.pop(token, None)
            if error is None:
                reply(b"".join(body), None)
                return
            found = CODE.search(error_body or b"")
            message = MESSAGE.search(error_body or b"")
            code = (found.group(1).decode() if found else
                    CRT_ERRORS.get(error.name) or str(status_code or error.name))
            text = message.group(1).decode() if message else error.message
            reply(None, S3RequestError(f"{code}: {text}", code, status_code or None))

        # Held until done: the request must outlive this call.
        self.pending[token] = self.client.make_request(
            type=self.default_type, operation_name=operation,
            signing_config=self.signing.get(bucket),
            request=self.request_type(method, path + (f"?{query}" if query else ""),
                                      self.headers_type([("Host", host), *headers,
                                                         *self.always])),
            on_body=lambda chunk, **_: body.append(chunk), on_done=on_done)

    def close(self) -> None:
        pass  # copies in flight finish on the CRT's threads; nothing is queued here

    def _wait(self, *args) -> bytes:
        """One blocking attempt."""
        answer: queue.SimpleQueue = queue.SimpleQueue()
        self._send(*args, lambda value, failure: answer.put((value, failure)))
        value, failure = answer.get()
        if failure is not None:
            raise failure
        return value

    def start(self, src_bucket: str, src_key: str, dst_bucket: str, dst_key: str,
              reply: Reply, storage_class: str | None = None) -> None:
        def finished(body: bytes | None, failure: BaseException | None) -> None:
            etag = ETAG.search(body or b"")
            reply(etag.group(1).decode() if etag else None, failure)
        headers = [("Content-Length", "0"), ("Content-MD5", EMPTY_BODY_MD5),
                   ("x-amz-copy-source", quote_key(f"{src_bucket}/{src_key}"))]
        if storage_class:
            headers.append(("x-amz-storage-class", storage_class))
        if self.copy_acl:
            headers.append(("x-amz-acl", self.copy_acl))
        self._send("PUT", dst_bucket, quote_key(dst_key), "", headers, "CopyObject", finished)

    def copy(self, src_bucket: str, src_key: str, dst_bucket: str, dst_key: str,
             storage_class: str | None = None) -> str | None:
        answer: queue.SimpleQueue = queue.SimpleQueue()
        self.start(src_bucket, src_key, dst_bucket, dst_key,
                   lambda value, failure: answer.put((value, failure)), storage_class)
        value, failure = answer.get()
        if failure is not None:
            raise failure
        return value

    def list_page(self, bucket: str, prefix: str, token: str | None,
                  max_keys: int) -> tuple[list[Obj], str | None]:
        """One ListObjectsV2 page, parsed with ElementTree.

        botocore's response parsing costs about 70 us per key, more than the
        copy itself; this reads just the fields the planner needs.
        """
        import xml.etree.ElementTree as ET

        params = [("continuation-token", token)] if token else []
        params += [("encoding-type", "url"), ("list-type", "2"),
                   ("max-keys", str(max_keys)), ("prefix", prefix)]
        query = "&".join(f"{k}={quote(v, safe='-_.~')}" for k, v in params)
        root = ET.fromstring(self._wait("GET", bucket, "", query,
                                        [("x-amz-optional-object-attributes", "RestoreStatus")],
                                        "ListObjectsV2"))
        ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
        encoded = root.findtext(ns + "EncodingType") == "url"
        objs = []
        for c in root.iterfind(ns + "Contents"):
            key = c.findtext(ns + "Key") or ""
            status = c.find(ns + "RestoreStatus")
            objs.append(Obj(unquote_plus(key) if encoded else key,
                            int(c.findtext(ns + "Size") or 0),
                            (c.findtext(ns + "ETag") or "").strip('"') or None,
                            c.findtext(ns + "StorageClass"),
                            status is not None and restored({
                                "IsRestoreInProgress":
                                    status.findtext(ns + "IsRestoreInProgress") == "true",
                                "RestoreExpiryDate": status.findtext(ns + "RestoreExpiryDate")})))
        truncated = root.findtext(ns + "IsTruncated") == "true"
        return objs, (root.findtext(ns + "NextContinuationToken") if truncated else None)


def crt_credentials(session: boto3.session.Session):
    """The boto3 session's credentials (the same chain as the boto3 client) for the CRT.

    Keys that never change (environment, a static profile) are handed over once:
    a delegate costs a call into Python, under the GIL, for every request signed.
    Credentials that refresh themselves (roles, SSO) go through the delegate.
    """
    from awscrt.auth import AwsCredentials, AwsCredentialsProvider
    from botocore.credentials import RefreshableCredentials

    credentials = session.get_credentials()
    if credentials is None:
        raise NoCredentialsError()
    if not isinstance(credentials, RefreshableCredentials):
        return AwsCredentialsProvider.new_static(credentials.access_key, credentials.secret_key,
                                                 credentials.token)

    def current():
        c = credentials.get_frozen_credentials()
        return AwsCredentials(c.access_key, c.secret_key, c.token)
    return AwsCredentialsProvider.new_delegate(current)


def regional_netloc(netloc: str, region: str) -> str:
    """The S3 endpoint of `region`, in the form of the client's own AWS endpoint
    (s3.amazonaws.com, s3.us-east-1.amazonaws.com, s3.dualstack.eu-west-1..., s3-fips...)."""
    labels = netloc.split(".")
    rest = labels[1:]
    at = next((i for i, label in enumerate(rest) if label.count("-") >= 2 and label[-1].isdigit()),
              None)
    if at is not None:
        rest[at] = region
    else:  # the global endpoint (s3.amazonaws.com) names no region
        rest.insert(0, region)
    return ".".join([labels[0], *rest])


def crt_throughput_target(connections: int) -> float:
    """The throughput_target_gbps that makes the CRT open `connections` connections
    (README: "What capped the CRT under latency")."""
    return max(10, connections) * CRT_GBPS_PER_CONNECTION


def make_engine(s3, cfg: Settings, session: boto3.session.Session | None = None,
                regions=None) -> Engine:
    """The CRT when it is installed (or asked for), boto3 otherwise. `s3` makes one
    attempt per call (the run's RequestPath retries around the engine). `regions`
    (regions.Regions): where each bucket is; the boto3 client follows it already."""
    if cfg.engine in ("auto", "crt"):
        try:
            return CrtEngine(s3, cfg.workers, session, regions, cfg.request_payer)
        except ImportError:
            if cfg.engine == "crt":
                raise UsageError("--engine crt needs the awscrt package: "
                                 "pip install awscrt") from None
    return Boto3Engine(s3, cfg.workers)


# ---------------------------------------------------------------- one copy


def copy_one(s3: PacedClient, engine: Engine, item: Item, cfg: Settings) -> Item:
    """Runs on a worker: never prints, never raises; the result says what happened.
    Every request, the copy included, goes through s3's RequestPath (retried there)."""
    try:
        if item.kind == CHECK:
            if item.src.size is None:
                src = described(s3, cfg.source_bucket, item.src.key)
                if src is None:
                    raise LookupError("source object no longer exists")
                item.src = src
            dest = described(s3, cfg.dest_bucket, item.dest_key)
            if dest is not None:
                item.dest = dest
                if identical(s3, cfg.source_bucket, item.src, cfg.dest_bucket, dest):
                    item.kind, item.verified = DONE, True
                    return item
                if not cfg.overwrite:
                    item.kind = CONFLICT
                    return item
            item.kind = COPY
            if needs_restore(item.src):  # known only now (a manifest's item, once HEAD said)
                item.kind = item.action = SKIP_ARCHIVED
                item.error = archived(item.src, item.dest_key).error
                return item
        elif cfg.dry_run and item.src.encryption is None:
            # The listing cannot tell an SSE-C object; a real run learns it from the
            # copy's refusal, a dry run (which sends none) from a HEAD.
            src = described(s3, cfg.source_bucket, item.src.key)
            if src is None:
                raise LookupError("source object no longer exists")
            item.src = src if src.size is not None else item.src
            if src.encryption == "SSE-C":
                raise NeedsCustomerKey(src.key)
        if cfg.dry_run:
            item.action = "copied"
            return item
        if item.src.size is not None and item.src.size > cfg.multipart_threshold:
            copy_multipart(s3, item, cfg)
            h = head(s3, cfg.dest_bucket, item.dest_key)
            item.verified = h is not None and h.get("ContentLength") == item.src.size
        else:
            etag = s3.path.call(lambda: engine.copy(cfg.source_bucket, item.src.key,
                                                    cfg.dest_bucket, item.dest_key,
                                                    copy_class(item.src, cfg)))
            item.verified = same_content(item.src, Obj(item.dest_key, item.src.size, etag)) is True
        item.action = "copied"
    except NeedsCustomerKey:
        sse_c(item)
    except (ClientError, BotoCoreError, LookupError, OSError, S3RequestError) as exc:
        item.action, item.error, item.code = "failed", describe_error(exc), error_code(exc)
    except Exception as exc:  # a bug must fail this object, not hang the coordinator
        log.debug("unexpected error copying %s", item.src.key, exc_info=True)
        item.action, item.error = "failed", f"unexpected {type(exc).__name__}: {exc}"
    return item


def copy_answered(item: Item, answer) -> None:
    """What one CopyObject's answer (pacing.Answer) means for its item."""
    if answer.error:
        item.action, item.error, item.code = "failed", answer.error, answer.code
    else:
        item.action, item.error, item.code = "copied", "", ""
        item.verified = same_content(item.src, Obj(item.dest_key, item.src.size,
                                                   answer.value)) is True


# What a multipart copy must be told to keep: a single CopyObject copies these itself.
CONTENT_FIELDS = ("ContentType", "CacheControl", "ContentDisposition", "ContentEncoding",
                  "ContentLanguage", "Expires")
# A source's checksum algorithm, from its HEAD's Checksum<ALGORITHM> field.
CHECKSUM_ALGORITHMS = ("CRC64NVME", "CRC32C", "CRC32", "SHA256", "SHA1")
# The CRCs can be one checksum of the whole object however it is cut into parts.
FULL_OBJECT_ALGORITHMS = ("CRC64NVME", "CRC32C", "CRC32")
MAX_PARTS = 10_000  # S3's limit on the parts of one upload


def copy_multipart(s3, item: Item, cfg: Settings) -> None:
    """Objects over --multipart-threshold: CreateMultipartUpload, one UploadPartCopy
    per part (4 at a time), CompleteMultipartUpload, each through s3's RequestPath.

    A single CopyObject keeps the source's content headers, metadata, tags and
    checksum by itself; a multipart copy keeps only what it is given, so all of it is
    read from the source (HEAD, GetObjectTagging) and given. The tags go with the
    upload, so the copy never exists without them. A source with a CRC checksum of
    the whole object gets the same (ChecksumType FULL_OBJECT): the copy's checksum is
    the source's value. SHA checksums of a multipart object are per part
    (COMPOSITE), so the copy's value differs though its algorithm is kept. Each part
    is read only if the source still has the ETag it had (CopySourceIfMatch). A failed
    copy aborts its upload: no parts are left to pay for.
    """
    from urllib.parse import urlencode

    try:
        h = s3.head_object(Bucket=cfg.source_bucket, Key=item.src.key, ChecksumMode="ENABLED")
    except ClientError as exc:
        if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            raise LookupError("source object no longer exists") from None
        raise
    size, etag = h["ContentLength"], h.get("ETag")
    extra: dict = {"Metadata": h.get("Metadata", {})}
    extra.update({name: h[name] for name in CONTENT_FIELDS if h.get(name)})
    if copy_class(item.src, cfg):
        extra["StorageClass"] = copy_class(item.src, cfg)
    if cfg.copy_acl:  # S3 copies no ACL (access.py)
        extra["ACL"] = cfg.copy_acl
    tags = s3.get_object_tagging(Bucket=cfg.source_bucket, Key=item.src.key).get("TagSet", [])
    if tags:
        extra["Tagging"] = urlencode([(t["Key"], t["Value"]) for t in tags])
    algorithm = next((a for a in CHECKSUM_ALGORITHMS if h.get(f"Checksum{a}")), None)
    whole = {}
    if algorithm:
        extra["ChecksumAlgorithm"] = algorithm
        if algorithm in FULL_OBJECT_ALGORITHMS and (h.get("ChecksumType") != "COMPOSITE"
                                                    or algorithm == "CRC64NVME"):
            whole = {"ChecksumType": "FULL_OBJECT"}
    upload = s3.create_multipart_upload(Bucket=cfg.dest_bucket, Key=item.dest_key, **extra,
                                        **whole)["UploadId"]
    chunk = max(cfg.multipart_chunksize, -(-size // MAX_PARTS))
    source = {"Bucket": cfg.source_bucket, "Key": item.src.key}

    def part(number: int) -> dict:
        first = (number - 1) * chunk
        answer = s3.upload_part_copy(
            Bucket=cfg.dest_bucket, Key=item.dest_key, UploadId=upload, PartNumber=number,
            CopySource=source, CopySourceRange=f"bytes={first}-{min(first + chunk, size) - 1}",
            **({"CopySourceIfMatch": etag} if etag else {}))["CopyPartResult"]
        done = {"PartNumber": number, "ETag": answer["ETag"]}
        if algorithm and answer.get(f"Checksum{algorithm}"):
            done[f"Checksum{algorithm}"] = answer[f"Checksum{algorithm}"]
        return done
    try:
        with ThreadPoolExecutor(4, thread_name_prefix="part") as pool:
            parts = list(pool.map(part, range(1, -(-size // chunk) + 1)))
        s3.complete_multipart_upload(Bucket=cfg.dest_bucket, Key=item.dest_key, UploadId=upload,
                                     MultipartUpload={"Parts": parts}, **whole)
    except BaseException:
        try:
            s3.abort_multipart_upload(Bucket=cfg.dest_bucket, Key=item.dest_key, UploadId=upload)
        except (ClientError, BotoCoreError):
            log.warning("could not abort the multipart upload of %s (id %s): abort it to stop "
                        "paying for its parts", item.dest_key, upload)
        raise


def copy_confirmed(s3, cfg: Settings, item: Item) -> bool:
    """Before deleting a source whose copy's answer did not prove it equal (SSE-KMS,
    multipart): the copy must hold the source's data (identity.identical)."""
    try:
        dest = described(s3, cfg.dest_bucket, item.dest_key)
        return dest is not None and item.src.size is not None and \
            identical(s3, cfg.source_bucket, item.src, cfg.dest_bucket, dest)
    except (ClientError, BotoCoreError, NeedsCustomerKey, OSError):
        return False
