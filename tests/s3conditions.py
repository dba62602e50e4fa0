"""S3's conditional deletes, which moto does not model, as a FaultProxy intercept.

AWS, "How to perform conditional deletes" (Amazon S3 User Guide):
  "You can perform conditional deletes using the DeleteObject or DeleteObjects API
  operations in S3 general purpose and directory buckets. [...] If the ETag value
  of an object in an S3 bucket doesn't match with the ETag that you provide during
  the delete operation, the operation fails. For conditionally deleting multiple
  objects using the DeleteObjects operation, you must provide the ETag value in the
  ETag element of the object in the XML request body."
  "If the ETag doesn't match, the delete operation fails and results in a 412
  Precondition Failed response. [...] If the precondition fails, the response for
  that object is captured in an <Error> element of the response body."
moto 5 ignores the ETag element and deletes whatever is there.

    cond = ConditionalDeletes(before=lambda: ...)   # before: the application's upload
    with FaultProxy(endpoint, rate=0, intercept=cond) as proxy: ...
"""
from __future__ import annotations

import base64
import hashlib
import threading
import xml.etree.ElementTree as ET
from urllib.parse import unquote, urlsplit

S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"


class ConditionalDeletes:
    def __init__(self, before=None):
        self.before = before  # called once per DeleteObjects, before its conditions are read
        self.refused: list[str] = []  # keys answered PreconditionFailed
        self.conditional = 0  # objects that came with an ETag condition
        self.lock = threading.Lock()

    def __call__(self, handler, body: bytes) -> bool:
        parts = urlsplit(handler.path)
        if handler.command != "POST" or "delete" not in parts.query.split("&"):
            return False
        bucket = unquote(parts.path).strip("/")
        if self.before is not None:
            self.before()
        root = ET.fromstring(body)
        ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
        kept, errors = [], []
        for obj in root.iter(ns + "Object"):
            key, etag = obj.findtext(ns + "Key"), obj.findtext(ns + "ETag")
            if etag is not None:
                with self.lock:
                    self.conditional += 1
                current = self.etag(handler, bucket, key)
                if current is None:
                    errors.append((key, "NoSuchKey", "The specified key does not exist."))
                    continue
                if current.strip('"') != etag.strip('"'):
                    with self.lock:
                        self.refused.append(key)
                    errors.append((key, "PreconditionFailed",
                                   "At least one of the pre-conditions you specified did not "
                                   "hold"))
                    continue
            kept.append(key)
        deleted_xml = b""
        if kept:
            forward = ("<Delete><Quiet>true</Quiet>" + "".join(
                f"<Object><Key>{escape(k)}</Key></Object>" for k in kept) + "</Delete>").encode()
            for name in list(handler.headers.keys()):
                if name.lower().startswith(("x-amz-checksum", "x-amz-sdk-checksum",
                                            "content-md5")):
                    del handler.headers[name]
            handler.headers["Content-MD5"] = base64.b64encode(
                hashlib.md5(forward).digest()).decode()
            status, _, _, data = handler._forward(forward)
            if status != 200:
                return self.answer(handler, status, data)
            inner = ET.fromstring(data)
            deleted_xml = b"".join(ET.tostring(e) for e in inner)
        out = (f'<?xml version="1.0" encoding="UTF-8"?><DeleteResult xmlns="{S3_NS}">'.encode()
               + deleted_xml + "".join(
                   f"<Error><Key>{escape(k)}</Key><Code>{c}</Code><Message>{m}</Message></Error>"
                   for k, c, m in errors).encode() + b"</DeleteResult>")
        return self.answer(handler, 200, out)

    def etag(self, handler, bucket: str, key: str) -> str | None:
        """The object's ETag now, read from moto's backend (its server runs in this
        process), as S3 reads it to evaluate the condition."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends
        obj = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].get_object(bucket, key)
        return obj.etag if obj is not None else None

    @staticmethod
    def answer(handler, status: int, data: bytes) -> bool:
        handler.send_response_only(status)
        handler.send_header("Content-Type", "application/xml")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
        return True


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
