"""What AWS answers where moto does not model it, for FaultProxy(model=AwsModel(...)).

moto stores how each object is encrypted, each bucket's Object Ownership and
Block Public Access settings, but answers as if none of them mattered: an
SSE-KMS object's ETag is the MD5 of its data, an SSE-C object is read without
its key, and an ACL is accepted by a bucket that has ACLs disabled. This model
reads moto's backend (the server runs in the test's process) and answers as
the AWS documentation says, quoted at each rule.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from urllib.parse import unquote, unquote_plus

from faultproxy import Request

# AWS, the ETag of an Object: "Objects created by the PUT Object, POST Object, or Copy
# operation, or through the AWS Management Console, and are encrypted by SSE-C or
# SSE-KMS, have ETags that are not an MD5 digest of their object data."
KMS = ("aws:kms", "aws:kms:dsse")

# AWS, GetObject/CopyObject of an SSE-C object without its key: 400 InvalidRequest
# "The object was stored using a form of Server Side Encryption. The correct parameters
# must be provided to retrieve the object." HeadObject: "if the HEAD request generates
# an error, it returns a generic code, such as 400 Bad Request [...]" (no body).
SSE_C_MESSAGE = ("The object was stored using a form of Server Side Encryption. The correct "
                 "parameters must be provided to retrieve the object.")

# AWS, CopyObject x-amz-acl: "If the destination bucket that you're copying objects to uses
# the bucket owner enforced setting for S3 Object Ownership, ACLs are disabled and no longer
# affect permissions. Buckets that use this setting only accept PUT requests that don't
# specify an ACL or PUT requests that specify bucket owner full control ACLs, such as the
# bucket-owner-full-control canned ACL [...]"; such a request fails with 400
# AccessControlListNotSupported "The bucket does not allow ACLs".
OWNER_FULL_CONTROL = "bucket-owner-full-control"

# AWS, Block Public Access, BlockPublicAcls: "PUT Object calls fail if the request
# includes a public ACL" (403 AccessDenied). Public canned ACLs grant AllUsers or
# AuthenticatedUsers.
PUBLIC_ACLS = ("public-read", "public-read-write", "authenticated-read")

ETAG_XML = re.compile(r"<ETag>[^<]*</ETag>")
CONTENTS = re.compile(r"<Contents>.*?</Contents>", re.S)
KEY_XML = re.compile(r"<Key>([^<]*)</Key>")


class AwsModel:
    def __init__(self, backend):
        self.backend = backend  # moto's S3 backend (conftest.moto_backend())
        self.sse_c: set[tuple[str, str]] = set()  # (bucket, key) stored with SSE-C
        self.refused: Counter = Counter()  # (operation, code) -> answers given

    # ------------------------------------------------------------ objects

    def _object(self, bucket: str, key: str):
        try:
            return self.backend.get_object(bucket, key)
        except Exception:  # noqa: BLE001 - no such bucket or key: moto answers that itself
            return None

    def etag(self, bucket: str, key: str) -> str | None:
        """The ETag AWS would give, where it is not moto's MD5: stable for one stored
        object, different for its copy (another key, another write)."""
        fake = self._object(bucket, key)
        if fake is None:
            return None
        if (bucket, key) not in self.sse_c and fake.encryption not in KMS:
            return None
        seed = f"{bucket}/{key}/{fake.etag}/{fake.last_modified_ISO8601}".encode()
        return hashlib.md5(seed).hexdigest()

    def _bucket(self, name: str):
        try:
            return self.backend.get_bucket(name)
        except Exception:  # noqa: BLE001
            return None

    # ------------------------------------------------------------ before forwarding

    def refuse(self, r: Request) -> tuple[int, str, str] | None:
        answer = self._refuse(r)
        if answer is not None:
            self.refused[r.operation, answer[1]] += 1
        return answer

    def _refuse(self, r: Request) -> tuple[int, str, str] | None:
        if r.operation == "CopyObject":
            source = unquote(r.headers["x-amz-copy-source"].split("?")[0]).lstrip("/")
            sb, _, sk = source.partition("/")
            if (sb, sk) in self.sse_c and \
                    "x-amz-copy-source-server-side-encryption-customer-algorithm" not in r.headers:
                return 400, "InvalidRequest", SSE_C_MESSAGE
        elif r.method in ("GET", "HEAD") and r.key and (r.bucket, r.key) in self.sse_c and \
                "x-amz-server-side-encryption-customer-algorithm" not in r.headers and \
                "acl" not in r.query:
            return (400, "BadRequest", "Bad Request") if r.method == "HEAD" else \
                (400, "InvalidRequest", SSE_C_MESSAGE)
        if r.method == "PUT" and r.key:
            acl = r.headers.get("x-amz-acl")
            grants = [h for h in r.headers if h.startswith("x-amz-grant-")]
            bucket = self._bucket(r.bucket)
            if bucket is None or not (acl or grants or "acl" in r.query):
                return None
            if bucket.ownership_rule == "BucketOwnerEnforced" and \
                    (grants or "acl" in r.query or acl != OWNER_FULL_CONTROL):
                return 400, "AccessControlListNotSupported", "The bucket does not allow ACLs"
            block = bucket.public_access_block
            if block is not None and block.block_public_acls and acl in PUBLIC_ACLS:
                return 403, "AccessDenied", "Access Denied"
        return None

    # ------------------------------------------------------------ after forwarding

    def rewrite(self, r: Request, status: int, headers: list, data: bytes):
        if status != 200:
            return headers, data
        if r.method in ("GET", "HEAD") and r.key and "acl" not in r.query and \
                "tagging" not in r.query:
            etag = self.etag(r.bucket, r.key)
            if etag:
                headers = [(n, f'"{etag}"' if n.lower() == "etag" else v) for n, v in headers]
        elif r.operation == "ListObjects":
            encoded = "encoding-type=url" in r.query
            text = data.decode()

            def contents(m: re.Match) -> str:
                block = m.group(0)
                key = KEY_XML.search(block).group(1)
                key = unquote_plus(key) if encoded else key.replace("&amp;", "&")
                etag = self.etag(r.bucket, key)
                return ETAG_XML.sub(f"<ETag>&quot;{etag}&quot;</ETag>", block) if etag else block
            data = CONTENTS.sub(contents, text).encode()
        elif r.operation == "CopyObject":
            etag = self.etag(r.bucket, r.key)
            if etag:
                data = ETAG_XML.sub(f"<ETag>&quot;{etag}&quot;</ETag>", data.decode()).encode()
        return headers, data
