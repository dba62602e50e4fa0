"""avatarmove.planning: pure code, so these tests need neither S3 nor PostgreSQL.

plan() pairs each source with its destination, same_content() decides whether a
destination already holds the source, in_shard() splits keys between machines.
"""
from __future__ import annotations

import pytest

from avatarmove.listing import Obj
from avatarmove.planning import (CHECK, CONFLICT, COPY, DONE, SKIP_ARCHIVED, SKIP_KEY_TOO_LONG,
                                 in_shard, plan, same_content)
from avatarmove.settings import Settings


def settings(**kw) -> Settings:
    base = dict(db="", source_bucket="src", dest_bucket="dst", source_prefix="image/",
                dest_prefix="avatar/", table="avatars", column="path")
    base.update(kw)
    return Settings(**base)


def test_plan_copies_a_missing_destination_and_skips_a_present_one():
    sources = [Obj("image/a.png", 3, "e1"), Obj("image/b.png", 4, "e2")]
    dests = [Obj("avatar/a.png", 3, "e1")]
    items = list(plan(sources, dests, settings()))
    assert [(i.src.key, i.dest_key, i.kind) for i in items] == [
        ("image/a.png", "avatar/a.png", DONE),
        ("image/b.png", "avatar/b.png", COPY),
    ]


# --------------------------------------------------------------------------- uncopyable objects


def test_archived_sources_are_skipped_unless_restored_or_already_copied():
    """GLACIER and DEEP_ARCHIVE need a restore before CopyObject can read them; the other
    classes copy as they are. An archived source whose copy is there is done all the same."""
    sources = [Obj("image/a.png", 3, "e1", "GLACIER"),
               Obj("image/b.png", 3, "e2", "DEEP_ARCHIVE"),
               Obj("image/c.png", 3, "e3", "GLACIER", restored=True),
               Obj("image/d.png", 3, "e4", "GLACIER"),
               Obj("image/e.png", 3, "e5", "GLACIER"),
               Obj("image/f.png", 3, "e6", "GLACIER_IR"),
               Obj("image/g.png", 3, "e7", "INTELLIGENT_TIERING"),
               Obj("image/h.png", 3, "e8", "STANDARD_IA"),
               Obj("image/i.png", 3, "e9", None)]
    dests = [Obj("avatar/d.png", 3, "e4"),  # the copy is there: done
             Obj("avatar/e.png", 9, "other")]  # another object is there: a conflict
    kinds = {i.src.key[len("image/"):]: i.kind for i in plan(sources, dests, settings())}
    assert kinds == {"a.png": SKIP_ARCHIVED, "b.png": SKIP_ARCHIVED, "c.png": COPY,
                     "d.png": DONE, "e.png": CONFLICT, "f.png": COPY, "g.png": COPY,
                     "h.png": COPY, "i.png": COPY}
    # --overwrite would replace e.png with its source, which cannot be read yet
    over = {i.src.key: i for i in plan(sources, dests, settings(overwrite=True))}
    assert over["image/e.png"].kind == SKIP_ARCHIVED
    assert "GLACIER" in over["image/a.png"].error and "restored" in over["image/a.png"].error


LIMIT = 1024  # S3's key limit, in UTF-8 bytes


@pytest.mark.parametrize("char", ["k", "é", "日", "😀"])
def test_destination_key_over_1024_bytes_is_skipped(char):
    """The limit is in UTF-8 bytes, not characters; image/ -> avatar/ adds one byte."""
    def rest_of(dest_bytes: int) -> str:  # a rest whose destination key has this many bytes
        pad = dest_bytes - len("avatar/.png") - 1
        return "x" * (pad % len(char.encode())) + char * (pad // len(char.encode())) + "z.png"

    at, over = rest_of(LIMIT), rest_of(LIMIT + 1)
    assert len(("avatar/" + at).encode()) == LIMIT
    assert len(("avatar/" + over).encode()) == LIMIT + 1
    sources = sorted([Obj("image/" + at, 3, "e1"), Obj("image/" + over, 3, "e2")],
                     key=lambda o: o.key)
    for dests in ([], None):  # a listing, and a manifest (no destination listing)
        items = {i.dest_key: i for i in plan(sources, dests, settings())}
        assert items["avatar/" + at].kind in (COPY, CHECK)
        assert items["avatar/" + over].kind == SKIP_KEY_TOO_LONG
        assert "1,025 bytes" in items["avatar/" + over].error


def test_a_longer_destination_prefix_makes_keys_too_long():
    src = Obj("image/" + "k" * (LIMIT - len("avatar/") - 4) + ".png", 3, "e1")
    assert len(("avatar/" + src.key[len("image/"):]).encode()) == LIMIT
    assert [i.kind for i in plan([src], [], settings())] == [COPY]
    assert [i.kind for i in plan([src], [], settings(dest_prefix="avatars/"))] == \
        [SKIP_KEY_TOO_LONG]


# --------------------------------------------------------------------------- plan(): pairing

# A source listing: PNGs (any case, any depth) under image/, and what is never planned.
LISTED = [Obj("image/a.png", 3, "ea"), Obj("image/b.png", 3, "eb"),
          Obj("image/c.png", 3, "ec"), Obj("image/d.PNG", 3, "ed"),
          Obj("image/readme.txt", 3, "et"), Obj("image/sub/", 0, "es"),
          Obj("image/sub/deep/e.png", 3, "ee"), Obj("image/x.png.bak", 3, "eg")]
OUTSIDE = [Obj("images/f.png", 3, "ef"), Obj("other/image/g.png", 3, "eh")]

PAIRING = {
    # case: (destination listing or None for a manifest, settings, source listing ordered,
    #        {source key: (kind, destination key, paired destination's ETag)})
    "nothing-copied-yet": ([], {}, True, {
        "image/a.png": (COPY, "avatar/a.png", None), "image/b.png": (COPY, "avatar/b.png", None),
        "image/c.png": (COPY, "avatar/c.png", None), "image/d.PNG": (COPY, "avatar/d.PNG", None),
        "image/sub/deep/e.png": (COPY, "avatar/sub/deep/e.png", None)}),
    "done-conflict-copy": (
        [Obj("avatar/a.png", 3, "ea"), Obj("avatar/b.png", 3, "other"),
         Obj("avatar/c.png", 4, "ec"), Obj("avatar/zzz.png", 3, "ez")], {}, True, {
            "image/a.png": (DONE, "avatar/a.png", "ea"),
            # the same size, another ETag: maybe SSE-KMS, the worker finds out
            "image/b.png": (CHECK, "avatar/b.png", "other"),
            "image/c.png": (CONFLICT, "avatar/c.png", "ec"),
            "image/d.PNG": (COPY, "avatar/d.PNG", None),
            "image/sub/deep/e.png": (COPY, "avatar/sub/deep/e.png", None)}),
    "overwrite": (
        [Obj("avatar/a.png", 3, "ea"), Obj("avatar/b.png", 3, "other")],
        {"overwrite": True}, True, {
            "image/a.png": (DONE, "avatar/a.png", "ea"),
            "image/b.png": (CHECK, "avatar/b.png", "other"),
            "image/c.png": (COPY, "avatar/c.png", None),
            "image/d.PNG": (COPY, "avatar/d.PNG", None),
            "image/sub/deep/e.png": (COPY, "avatar/sub/deep/e.png", None)}),
    # a listing out of binary order: "absent" cannot be trusted, each is checked;
    # what was found is still found
    "unordered-listing": ([Obj("avatar/a.png", 3, "ea")], {}, False, {
        "image/a.png": (DONE, "avatar/a.png", "ea"), "image/b.png": (CHECK, "avatar/b.png", None),
        "image/c.png": (CHECK, "avatar/c.png", None), "image/d.PNG": (CHECK, "avatar/d.PNG", None),
        "image/sub/deep/e.png": (CHECK, "avatar/sub/deep/e.png", None)}),
    # a manifest: no destination listing at all, each item is checked by its worker
    "manifest": (None, {}, True, {
        "image/a.png": (CHECK, "avatar/a.png", None), "image/b.png": (CHECK, "avatar/b.png", None),
        "image/c.png": (CHECK, "avatar/c.png", None), "image/d.PNG": (CHECK, "avatar/d.PNG", None),
        "image/sub/deep/e.png": (CHECK, "avatar/sub/deep/e.png", None)}),
}


class _Listing:
    """What plan() reads of a Listing: whether its order held."""

    def __init__(self, ordered: bool):
        self.ordered = ordered


@pytest.mark.parametrize("case", list(PAIRING))
def test_plan_pairs_each_source_png_with_its_destination(case):
    dests, cfg, ordered, want = PAIRING[case]
    sources = sorted(LISTED + OUTSIDE, key=lambda o: o.key)
    items = list(plan(sources, dests, settings(**cfg), src_listing=_Listing(ordered),
                      dest_listing=_Listing(True)))
    got = {i.src.key: (i.kind, i.dest_key, i.dest.etag if i.dest else None) for i in items}
    assert got == want
    assert [i.src.key for i in items] == sorted(want)  # in listing order, each once
    assert all(i.verified == (i.kind == DONE) for i in items)


def test_plan_with_another_prefix_pair_keeps_the_rest_of_the_key():
    sources = [Obj("old/pics/u1/a.png", 1), Obj("old/pics2/b.png", 1), Obj("old/x.png", 1)]
    items = list(plan(sources, [], settings(source_prefix="old/pics/", dest_prefix="new/")))
    assert [(i.src.key, i.dest_key) for i in items] == [("old/pics/u1/a.png", "new/u1/a.png")]


@pytest.mark.parametrize("n", [2, 3, 5])
def test_plan_with_a_shard_keeps_only_that_shards_keys(n):
    sources = [Obj(f"image/k{i:03d}.png", 1) for i in range(60)]
    shares = []
    for i in range(n):
        items = list(plan(sources, [], settings(shard=(i, n))))
        assert all(in_shard(it.src.key[len("image/"):], (i, n)) for it in items)
        shares.append({it.src.key for it in items})
    assert sum(len(s) for s in shares) == len(sources)  # pairwise disjoint
    assert set().union(*shares) == {o.key for o in sources}
    assert all(shares), "a shard got none of 60 keys"


# --------------------------------------------------------------------------- same_content()

SAME_CONTENT = [
    # (source size, ETag, destination size, ETag, same?: True, False or None: cannot tell)
    (3, '"aa"', 3, '"aa"', True),  # same size, same ETag
    (3, '"aa"', 4, '"aa"', False),  # another size
    # listed ETags that differ prove nothing: SSE-KMS gives a copy another ETag
    (3, '"aa"', 3, '"bb"', None),
    (3, '"aa"', 3, '"cc-3"', None),  # a multipart copy: its ETag differs by design
    (3, '"aa-2"', 3, '"cc-3"', None),  # both multipart
    (3, '"aa-2"', 3, '"aa-2"', True),  # the same parts' MD5s, the same size
    (3, '"aa-2"', 4, '"aa-2"', False),  # multipart, another size
    (3, None, 3, '"aa"', None),  # no ETag to compare: the size alone proves nothing
    (3, None, 4, None, False),
    (None, '"aa"', 3, '"aa"', True),  # a manifest gives no size: same MD5 is enough
    (None, '"aa"', 3, '"bb"', None),
    (None, None, 3, '"aa"', None),  # nothing known
    (None, '"aa-2"', 3, '"aa-2"', None),  # multipart ETags alone name parts, not bytes
    (3, '"aa"', None, None, None),
]


@pytest.mark.parametrize("src_size,src_etag,dest_size,dest_etag,same", SAME_CONTENT)
def test_same_content(src_size, src_etag, dest_size, dest_etag, same):
    assert same_content(Obj("image/a.png", src_size, src_etag),
                        Obj("avatar/a.png", dest_size, dest_etag)) is same


# What a HEAD adds: how each is encrypted (so whether its ETag is an MD5), its checksum.
HEADED = [
    # (source encryption, checksum, destination encryption, checksum, same?)
    ("AES256", None, "AES256", None, False),  # two MD5 ETags that differ: different data
    ("none", None, "AES256", None, False),
    ("aws:kms", None, "AES256", None, None),  # an SSE-KMS ETag is no MD5: cannot tell
    ("AES256", None, "aws:kms", None, None),
    ("SSE-C", None, "AES256", None, None),
    ("aws:kms", ("CRC32", "x"), "AES256", ("CRC32", "x"), True),  # S3's checksums decide
    ("AES256", ("CRC32", "x"), "AES256", ("CRC32", "y"), False),
    ("aws:kms", ("CRC32", "x"), "aws:kms", ("SHA256", "x"), None),  # not comparable
]


@pytest.mark.parametrize("src_enc,src_sum,dest_enc,dest_sum,same", HEADED)
def test_same_content_after_a_head(src_enc, src_sum, dest_enc, dest_sum, same):
    assert same_content(Obj("image/a.png", 3, "aa", encryption=src_enc, checksum=src_sum),
                        Obj("avatar/a.png", 3, "bb", encryption=dest_enc,
                            checksum=dest_sum)) is same


# --------------------------------------------------------------------------- in_shard()

SHARD_KEYS = ["a.png", "sub/b.png", "ü ñ+%.png", "日本/😀.png", "x" * 300 + ".png", "UP.PNG"]


@pytest.mark.parametrize("n,expected", [(2, [0, 0, 0, 0, 1, 0]), (3, [2, 1, 2, 0, 2, 0]),
                                        (4, [2, 2, 0, 2, 3, 0]), (7, [2, 0, 1, 1, 0, 6])])
def test_in_shard_is_stable(n, expected):
    """Pinned: shards of one migration run on several machines and may be rerun after
    an upgrade; a key that changed shard in between would be in none or in two."""
    assert [next(i for i in range(n) if in_shard(k, (i, n))) for k in SHARD_KEYS] == expected


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 16])
def test_in_shard_puts_every_key_in_exactly_one_shard(n):
    keys = SHARD_KEYS + [f"u{i}/{i * 7919}.png" for i in range(500)]
    for k in keys:
        assert sum(in_shard(k, (i, n)) for i in range(n)) == 1, k
    if n > 1:  # and spreads them: no shard is empty or holds nearly everything
        counts = [sum(in_shard(k, (i, n)) for k in keys) for i in range(n)]
        assert min(counts) > len(keys) / n / 2, counts


def test_in_shard_without_a_shard_takes_every_key():
    assert all(in_shard(k, None) for k in SHARD_KEYS)
