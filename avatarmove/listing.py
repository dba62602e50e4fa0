"""Listing: the pages of one prefix, read ahead in a thread; or the keys of a manifest."""
from __future__ import annotations

import csv
import logging
import queue
import threading
import weakref
from dataclasses import dataclass
from typing import Iterable, Iterator
from urllib.parse import unquote_plus

from .settings import UsageError

log = logging.getLogger("move")


@dataclass(frozen=True)
class Obj:
    key: str
    size: int | None = None
    etag: str | None = None
    storage_class: str | None = None
    # An archived object (GLACIER, DEEP_ARCHIVE) whose restored copy is readable now:
    # it can be copied until the restore expires.
    restored: bool = False
    # Known from a HEAD only (a listing does not say): "none", "AES256" (SSE-S3),
    # "aws:kms", "aws:kms:dsse" or "SSE-C"; None when not asked.
    encryption: str | None = None
    # A full-object checksum S3 computed, (algorithm, value), from a HEAD with
    # checksum mode on; None when unknown or only per part (composite, "...-N").
    checksum: tuple[str, str] | None = None


class Listing:
    """Pages of one prefix, in order, checking the order S3 promises.

    The merge in plan() relies on UTF-8 binary order (S3's documented order,
    and code point order of Python str). A server that lists otherwise (a
    file-system-backed one may list a folder before its sibling files) is
    detected here, ahead of planning, and the planner then stops trusting
    "absent" answers and checks each destination with a HEAD instead.

    `engine` is anything with list_page(bucket, prefix, token, max_keys)
    -> (objs, next_token): both copy engines are.
    """

    def __init__(self, engine, bucket: str, prefix: str, page_size: int = 1000):
        self.engine, self.bucket, self.prefix, self.page_size = engine, bucket, prefix, page_size
        self.ordered = True
        self.pages_read = 0

    def _raw_pages(self) -> Iterator[list[Obj]]:
        token = None
        while True:
            objs, token = self.engine.list_page(self.bucket, self.prefix, token, self.page_size)
            yield objs
            if not token:
                return

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
    """A listing read a few pages ahead in its own thread (started now), so listing
    overlaps copying."""
    pages = prefetch(listing.pages(), 4, stop)
    return (o for page in pages for o in page)


def prefetch(iterable: Iterable, depth: int, stop: threading.Event) -> Iterator:
    """Run an iterator in a thread, `depth` items ahead, from now on.

    The thread starts here, not at the first next(): the source and destination
    listings then ask for their first pages at the same time, one round trip
    before the first copy instead of two. The bound keeps memory flat however
    large the bucket is.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    end = object()
    left = threading.Event()  # the consumer stopped reading (a run that stopped early)

    def pump():
        try:
            for item in iterable:
                while not (stop.is_set() or left.is_set()):
                    try:
                        q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set() or left.is_set():
                    return
            q.put(end)
        except BaseException as exc:  # re-raised where the caller waits
            q.put(exc)

    threading.Thread(target=pump, name="lister", daemon=True).start()

    def read() -> Iterator:
        try:
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
        finally:  # also when the consumer drops this generator: the thread must not list on
            left.set()
    reader = read()
    weakref.finalize(reader, left.set)  # dropped before its first next(): no finally runs
    return reader


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
