"""avatarmove.planning: pure code, so these tests need neither S3 nor PostgreSQL.

plan() pairs each source with its destination, same_content() decides whether a
destination already holds the source, in_shard() splits keys between machines.
"""
from __future__ import annotations

from avatarmove.listing import Obj
from avatarmove.planning import COPY, DONE, plan
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
