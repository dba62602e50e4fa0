"""--verify: a read-only reconciliation of both buckets and the table."""
from __future__ import annotations

import re

from conftest import (DEST, OTHER, PNG, body, insert_rows, journal, migrated, put, snapshot,
                      summary, table_exists)


# --------------------------------------------------------------------------- --verify


def test_verify_clean_then_missing_copy_then_rerun_heals(run, s3, db, capsys):
    migrated(run, s3, db, capsys)
    before = snapshot(s3, db)
    assert run("--verify") == 0
    out = capsys.readouterr().out
    assert "0 problem(s)" in out
    assert not re.search(r"^[A-Z-]+: ", out, re.M)
    assert snapshot(s3, db) == before

    s3.delete_object(Bucket=DEST, Key="avatar/b.png")
    before = snapshot(s3, db)
    assert run("--verify") == 1
    out = capsys.readouterr().out
    assert snapshot(s3, db) == before  # read-only
    assert re.search(r"^MISSING-COPY: image/b\.png has no copy at avatar/b\.png$", out, re.M), out
    # its row now dangles too
    assert re.search(r"^DANGLING-ROW: 1 row\(s\) point at avatar/b\.png\b", out, re.M), out
    assert "2 problem(s)" in out

    assert run() == 0  # a normal rerun copies it again
    s = summary(capsys.readouterr().out)
    assert s["copied"] == 1 and s["skipped"] == 2
    assert body(s3, "avatar/b.png") == PNG + b"b"
    assert run("--verify") == 0
    assert "0 problem(s)" in capsys.readouterr().out


def test_verify_names_each_kind_of_problem(run, s3, db, capsys):
    migrated(run, s3, db, capsys, names=("a", "b", "c", "d"))
    insert_rows(db, ["avatar/ghost.png"])  # DANGLING-ROW: no such object anywhere
    insert_rows(db, ["image/b.png"])  # NOT-REWRITTEN: a row added after the run
    put(s3, "avatar/c.png", OTHER, bucket=DEST)  # MISMATCH
    before = snapshot(s3, db)

    assert run("--verify") == 1
    out = capsys.readouterr().out
    assert snapshot(s3, db) == before
    assert not table_exists(db, "avatars_move_journal") or len(journal(db)) == 4
    problems = [line for line in out.splitlines() if re.match(r"[A-Z-]+: ", line)]
    assert len(problems) == 3, out
    assert any(re.fullmatch(r"DANGLING-ROW: 1 row\(s\) point at avatar/ghost\.png, which does "
                            r"not exist in s3://production-s3", p) for p in problems), out
    assert any(re.fullmatch(r"NOT-REWRITTEN: 1 row\(s\) still point at image/b\.png "
                            r"\(copy: avatar/b\.png\)", p) for p in problems), out
    assert any(p.startswith("MISMATCH: avatar/c.png ") and "image/c.png" in p
               for p in problems), out
    assert re.search(r"3 problem\(s\): DANGLING-ROW 1, MISMATCH 1, NOT-REWRITTEN 1", out), out
