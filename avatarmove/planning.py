"""Planning: pure code. Pair each source with its destination and decide what to do.

No request is sent from here: the two listings are merged in one pass, so a
rerun of a finished migration costs only listing pages.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Iterator

from .listing import Listing, Obj, is_png
from .settings import Settings

# What the plan says to do with an item (Item.kind).
COPY, CHECK, DONE, CONFLICT = "copy", "check", "done", "conflict"
# Objects CopyObject cannot copy as they are: skipped without a request, rows left on the
# source (which exists). The kind is also the item's outcome (report.ACTIONS).
SKIP_ARCHIVED, SKIP_KEY_TOO_LONG = "archived", "key-too-long"
# Encrypted with a key its owner keeps (SSE-C): no listing shows it, the copy's refusal
# (or a dry run's HEAD) does; skipped, rows left on the source.
SKIP_SSE_C = "sse-c"
UNCOPYABLE = (SKIP_ARCHIVED, SKIP_KEY_TOO_LONG, SKIP_SSE_C)

# CopyObject refuses to read these until the object is restored; the listing says so.
ARCHIVED_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})
MAX_KEY_BYTES = 1024  # S3's key limit, in UTF-8 bytes


@dataclass
class Item:
    src: Obj
    dest_key: str
    kind: str
    dest: Obj | None = None
    seq: int = 0  # its place in the plan: "in a row" for incurable errors is in this order
    action: str = ""  # the outcome, one of report.ACTIONS
    error: str = ""
    code: str = ""  # S3's error code of the last attempt, e.g. SlowDown, AccessDenied
    rows: int = 0
    verified: bool = False
    attempts: int = 0  # copies sent for this item (the coordinator retries CRT copies)
    sent_at: float = 0.0
    waiting_since: float = 0.0  # when its rows were first found locked by another transaction


def in_shard(rel_key: str, shard: tuple[int, int] | None) -> bool:
    """Stable across machines and Python runs (unlike hash())."""
    if shard is None:
        return True
    digest = hashlib.blake2b(rel_key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shard[1] == shard[0]


# How S3 stores an object decides what its ETag is. AWS (the ETag of an Object):
# "Objects created by the PUT Object, POST Object, or Copy operation, or through the
# AWS Management Console, and are encrypted by SSE-S3 or plaintext, have ETags that are
# an MD5 digest of their object data. [...] encrypted by SSE-C or SSE-KMS, have ETags
# that are not an MD5 digest of their object data. If an object is created by either
# the Multipart Upload or Part Copy operation, the ETag is not an MD5 digest,
# regardless of the method of encryption."
MD5_ETAG_ENCRYPTIONS = frozenset({"none", "AES256"})


def md5_etag(o: Obj) -> bool:
    """Its ETag is known to be the MD5 of its data: a HEAD said how it is encrypted."""
    return bool(o.etag) and "-" not in o.etag and o.encryption in MD5_ETAG_ENCRYPTIONS


def same_content(src: Obj, dest: Obj) -> bool | None:
    """True: the same data; False: different data; None: what is known cannot tell.

    A listing says neither how an object is encrypted nor its checksum, so two
    ETags that differ prove nothing by themselves (an SSE-KMS copy of the same
    data has another ETag): None, and identity.identical() asks S3 for more.
    Equal ETags do prove it: both the same MD5, or the same parts' MD5s."""
    if src.size is not None and dest.size is not None and src.size != dest.size:
        return False
    if src.checksum and dest.checksum and src.checksum[0] == dest.checksum[0]:
        return src.checksum[1] == dest.checksum[1]
    if src.etag and dest.etag and src.etag == dest.etag:
        # a multipart ETag with no size to back it names parts, not bytes
        return True if "-" not in src.etag or src.size is not None else None
    if md5_etag(src) and md5_etag(dest):
        return False
    return None


def needs_restore(src: Obj) -> bool:
    """Archived and not restored: a copy would be refused (InvalidObjectState)."""
    return src.storage_class in ARCHIVED_CLASSES and not src.restored


def key_too_long(key: str) -> bool:
    return len(key.encode("utf-8")) > MAX_KEY_BYTES


def archived(src: Obj, dest_key: str, dest: Obj | None = None) -> Item:
    return Item(src, dest_key, SKIP_ARCHIVED, dest,
                error=f"storage class {src.storage_class}, which cannot be copied until the "
                      "object is restored")


def sse_c(item: Item) -> Item:
    item.kind = item.action = SKIP_SSE_C
    item.error = ("encrypted with a customer-provided key (SSE-C), which S3 needs with every "
                  "request that reads it")
    return item


def wanted(key: str, cfg: Settings) -> bool:
    """A PNG under the source prefix, in this run's shard."""
    sp = cfg.source_prefix
    return is_png(key) and key.startswith(sp) and in_shard(key[len(sp):], cfg.shard)


def plan(sources: Iterable[Obj], dests: Iterable[Obj] | None, cfg: Settings,
         src_listing: Listing | None = None, dest_listing: Listing | None = None) -> Iterator[Item]:
    """Pair each source PNG with its destination by merging two sorted listings.

    Without a destination listing (a manifest), each item is checked by its
    worker instead.

    An object that cannot be copied as it is becomes SKIP_KEY_TOO_LONG (its
    destination key would be over S3's limit: no such copy can exist) or, where
    it would otherwise be copied, SKIP_ARCHIVED. An archived source whose copy
    is already there is DONE like any other.
    """
    sp, dp = cfg.source_prefix, cfg.dest_prefix
    dest_iter = iter(dests) if dests is not None else None
    d = next(dest_iter, None) if dest_iter is not None else None
    for s in sources:
        if not wanted(s.key, cfg):
            continue
        dest_key = dp + s.key[len(sp):]
        if key_too_long(dest_key):
            yield Item(s, dest_key, SKIP_KEY_TOO_LONG,
                       error=f"the destination key is {len(dest_key.encode()):,} bytes, over "
                             f"S3's {MAX_KEY_BYTES:,}-byte limit (S3 would answer "
                             "KeyTooLongError)")
            continue
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
            same = same_content(s, match)
            if same:
                yield Item(s, dest_key, DONE, match, verified=True)
            elif same is None:  # e.g. SSE-KMS ETags: the worker finds out (identity)
                yield Item(s, dest_key, CHECK, match)
            elif cfg.overwrite:
                yield archived(s, dest_key, match) if needs_restore(s) else \
                    Item(s, dest_key, COPY, match)
            else:
                yield Item(s, dest_key, CONFLICT, match)
        elif trusted:
            yield archived(s, dest_key) if needs_restore(s) else Item(s, dest_key, COPY)
        else:  # the copy may exist after all (done): the worker looks first
            yield Item(s, dest_key, CHECK)
