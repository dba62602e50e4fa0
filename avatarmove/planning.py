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
UNCOPYABLE = (SKIP_ARCHIVED, SKIP_KEY_TOO_LONG)

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


def in_shard(rel_key: str, shard: tuple[int, int] | None) -> bool:
    """Stable across machines and Python runs (unlike hash())."""
    if shard is None:
        return True
    digest = hashlib.blake2b(rel_key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shard[1] == shard[0]


def same_content(src: Obj, dest: Obj) -> bool:
    """Same size, and same ETag where both are plain MD5s (multipart ETags differ by design)."""
    if src.size is not None and dest.size is not None and src.size != dest.size:
        return False
    if src.etag and dest.etag and "-" not in src.etag and "-" not in dest.etag:
        return src.etag == dest.etag
    return src.size is not None and src.size == dest.size


def needs_restore(src: Obj) -> bool:
    """Archived and not restored: a copy would be refused (InvalidObjectState)."""
    return src.storage_class in ARCHIVED_CLASSES and not src.restored


def key_too_long(key: str) -> bool:
    return len(key.encode("utf-8")) > MAX_KEY_BYTES


def archived(src: Obj, dest_key: str, dest: Obj | None = None) -> Item:
    return Item(src, dest_key, SKIP_ARCHIVED, dest,
                error=f"storage class {src.storage_class}, which cannot be copied until the "
                      "object is restored")


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
            if same_content(s, match):
                yield Item(s, dest_key, DONE, match, verified=True)
            elif cfg.overwrite:
                yield archived(s, dest_key, match) if needs_restore(s) else \
                    Item(s, dest_key, COPY, match)
            else:
                yield Item(s, dest_key, CONFLICT, match)
        elif trusted:
            yield archived(s, dest_key) if needs_restore(s) else Item(s, dest_key, COPY)
        else:  # the copy may exist after all (done): the worker looks first
            yield Item(s, dest_key, CHECK)
