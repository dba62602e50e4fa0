"""Identity: whether a destination object holds the same data as its source, by
what proves it, asking S3 only when the listing cannot tell.

The listing's ETags decide most pairs for free (planning.same_content). Two
that differ prove nothing on encrypted buckets: AWS gives an SSE-KMS or SSE-C
object an ETag that is not the MD5 of its data, and a copy another one than its
source. Then, in this order: a HEAD of each (with checksum mode on) tells how
each is encrypted, so plain MD5 ETags decide, or the full-object checksums S3
computed; failing both, the data itself is read and compared.
"""
from __future__ import annotations

import hashlib

from botocore.exceptions import ClientError

from .listing import Obj
from .planning import same_content

SSE_C = "SSE-C"

# What AWS answers a GET or CopyObject of an SSE-C object sent without its key:
# 400 InvalidRequest "The object was stored using a form of Server Side Encryption.
# The correct parameters must be provided to retrieve the object." A HEAD, which
# has no body, answers a bare 400 Bad Request.
SSE_C_MESSAGE = "stored using a form of server side encryption"


class NeedsCustomerKey(Exception):
    """The object is encrypted with a key its owner keeps (SSE-C): S3 reads it only
    for a request that sends that key."""


def sse_c_refused(code: str, message: str) -> bool:
    """An answer that means: this object is SSE-C and the request did not send its key."""
    return code == "InvalidRequest" and SSE_C_MESSAGE in message.lower()


def _code(exc: ClientError) -> tuple[str, str]:
    err = exc.response.get("Error", {})
    return str(err.get("Code", "")), str(err.get("Message", ""))


def from_head(key: str, h: dict) -> Obj:
    """An Obj from a HeadObject answer (made with ChecksumMode=ENABLED)."""
    checksum = None
    for name in ("CRC64NVME", "CRC32C", "CRC32", "SHA256", "SHA1"):
        value = h.get("Checksum" + name)
        # composite checksums of multipart objects ("...-N") depend on the part sizes
        if value and "-" not in value and h.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
            checksum = (name, value)
            break
    encryption = (SSE_C if h.get("SSECustomerAlgorithm") else
                  h.get("ServerSideEncryption") or "none")
    return Obj(key, h.get("ContentLength"), (h.get("ETag") or "").strip('"') or None,
               h.get("StorageClass"), 'ongoing-request="false"' in (h.get("Restore") or ""),
               encryption=encryption, checksum=checksum)


def described(s3, bucket: str, key: str) -> Obj | None:
    """What a HEAD says of one object; None when there is none. An SSE-C object
    comes back with encryption SSE-C (its size and ETag unknown)."""
    try:
        return from_head(key, s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED"))
    except ClientError as exc:
        code, _ = _code(exc)
        if code in ("404", "NoSuchKey", "NotFound"):
            return None
        if code in ("400", "BadRequest") and _sse_c(s3, bucket, key):
            return Obj(key, encryption=SSE_C)
        raise


def _sse_c(s3, bucket: str, key: str) -> bool:
    """A HEAD answered a bare 400: a one-byte GET says why, in words."""
    try:
        s3.get_object(Bucket=bucket, Key=key, Range="bytes=0-0")["Body"].close()
    except ClientError as exc:
        return sse_c_refused(*_code(exc))
    return False


def same_bytes(s3, src_bucket: str, src_key: str, dest_bucket: str, dest_key: str) -> bool:
    """Read both objects and compare (the rare pair nothing else decides)."""
    def digest(bucket: str, key: str) -> bytes:
        h = hashlib.sha256()
        stream = s3.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            for chunk in stream.iter_chunks(1024 * 1024):
                h.update(chunk)
        finally:
            stream.close()
        return h.digest()
    return digest(src_bucket, src_key) == digest(dest_bucket, dest_key)


def identical(s3, src_bucket: str, src: Obj, dest_bucket: str, dest: Obj) -> bool:
    """Same data? At no cost when the listing decides; else HEADs; else the data.
    Raises NeedsCustomerKey for an SSE-C source (nothing can read it here)."""
    same = same_content(src, dest)
    if same is not None:
        return same
    if src.encryption is None:
        src = described(s3, src_bucket, src.key) or src
    if dest.encryption is None:
        dest = described(s3, dest_bucket, dest.key) or dest
    if src.encryption == SSE_C:
        raise NeedsCustomerKey(src.key)
    if dest.encryption == SSE_C:
        return False  # not one of this tool's copies: those are never SSE-C
    same = same_content(src, dest)
    if same is not None:
        return same
    return same_bytes(s3, src_bucket, src.key, dest_bucket, dest.key)
