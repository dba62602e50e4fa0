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


@dataclass
class Item:
    src: Obj
    dest_key: str
    kind: str
    dest: Obj | None = None
    action: str = ""  # the outcome, one of report.ACTIONS
    error: str = ""
    rows: int = 0
    verified: bool = False


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


def wanted(key: str, cfg: Settings) -> bool:
    """A PNG under the source prefix, in this run's shard."""
    sp = cfg.source_prefix
    return is_png(key) and key.startswith(sp) and in_shard(key[len(sp):], cfg.shard)


def plan(sources: Iterable[Obj], dests: Iterable[Obj] | None, cfg: Settings,
         src_listing: Listing | None = None, dest_listing: Listing | None = None) -> Iterator[Item]:
    """Pair each source PNG with its destination by merging two sorted listings.

    Without a destination listing (a manifest), each item is checked by its
    worker instead.
    """
    sp, dp = cfg.source_prefix, cfg.dest_prefix
    dest_iter = iter(dests) if dests is not None else None
    d = next(dest_iter, None) if dest_iter is not None else None
    for s in sources:
        if not wanted(s.key, cfg):
            continue
        dest_key = dp + s.key[len(sp):]
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
