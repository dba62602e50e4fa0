"""The journal and --rollback: exactly the rows of one run go back, where their sources
still exist."""
from __future__ import annotations

import re

from conftest import (DEST, PNG, SOURCE, insert_rows, journal, keys, migrated, put, rows,
                      summary)


# --------------------------------------------------------------------------- journal, --rollback


def test_journal_has_one_entry_per_rewritten_key_with_the_run_id(run, s3, db, capsys):
    rid = migrated(run, s3, db, capsys, names=("a", "b", "n"),  # n has no row
                   paths=["image/a.png", "image/a.png", "image/b.png"])
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", rid)
    assert journal(db) == [(rid, "image/a.png", "avatar/a.png", 2, False),
                           (rid, "image/b.png", "avatar/b.png", 1, False)]
    # a rerun rewrites nothing, so journals nothing
    assert run() == 0
    capsys.readouterr()
    assert len(journal(db)) == 2


def test_rollback_latest_and_a_specific_run(run, s3, db, capsys):
    run1 = migrated(run, s3, db, capsys, names=("a", "b"),
                    paths=["image/a.png", "image/a.png", "image/b.png"])
    put(s3, "image/c.png", PNG + b"c")
    insert_rows(db, ["image/c.png"])
    assert run() == 0
    run2 = summary(capsys.readouterr().out)["run_id"]
    assert run1 != run2
    assert rows(db) == ["avatar/a.png", "avatar/a.png", "avatar/b.png", "avatar/c.png"]
    dest_before = keys(s3, DEST)

    # the first run, by id: only its keys
    assert run("--rollback", run1) == 0
    out = capsys.readouterr().out
    assert rows(db) == ["image/a.png", "image/a.png", "image/b.png", "avatar/c.png"]
    assert re.search(rf"^Rollback of run {run1}: 3 row\(s\) restored for 2 key\(s\); "
                     r"0 key\(s\) refused\.", out, re.M), out
    assert keys(s3, DEST) == dest_before  # copies stay

    # latest: the second run (the first one is rolled back already)
    assert run("--rollback") == 0
    out = capsys.readouterr().out
    assert f"Rollback of run {run2}: 1 row(s) restored for 1 key(s)" in out
    assert rows(db) == ["image/a.png", "image/a.png", "image/b.png", "image/c.png"]
    assert all(entry[4] for entry in journal(db))

    # nothing left to roll back
    assert run("--rollback", run1) == 2
    captured = capsys.readouterr()
    assert run1 in captured.err and len(captured.err.strip().splitlines()) == 1


def test_rollback_latest_picks_the_latest_run(run, s3, db, capsys):
    put(s3, "image/a.png", PNG + b"a")
    insert_rows(db, ["image/a.png"])
    assert run() == 0
    capsys.readouterr()
    put(s3, "image/b.png", PNG + b"b")
    insert_rows(db, ["image/b.png"])
    assert run() == 0
    run2 = summary(capsys.readouterr().out)["run_id"]
    assert run("--rollback") == 0
    assert f"Rollback of run {run2}:" in capsys.readouterr().out
    assert rows(db) == ["avatar/a.png", "image/b.png"]


def test_rollback_of_one_run_leaves_another_runs_rows_on_the_same_key(run, s3, db, capsys):
    put(s3, "image/a.png")
    insert_rows(db, ["image/a.png"])
    assert run() == 0
    capsys.readouterr()
    insert_rows(db, ["image/a.png"])  # the application writes an old-style path later
    assert run() == 0
    run2 = summary(capsys.readouterr().out)["run_id"]
    assert run("--rollback", run2) == 0
    capsys.readouterr()
    assert rows(db) == ["avatar/a.png", "image/a.png"]  # run 1's row (id 1) stays


def test_rollback_finds_rows_the_application_touched_since(run, s3, db, capsys):
    """A row updated after the run has a new ctid: it is found by value instead."""
    put(s3, "image/a.png")
    insert_rows(db, ["image/a.png", "image/a.png"])
    assert run() == 0
    rid = summary(capsys.readouterr().out)["run_id"]
    with db.cursor() as cur:
        cur.execute("UPDATE avatars SET path = path WHERE id = 2")  # moves the tuple
    assert run("--rollback", rid) == 0
    assert f"Rollback of run {rid}: 2 row(s) restored" in capsys.readouterr().out
    assert rows(db) == ["image/a.png", "image/a.png"]


def test_rollback_refused_where_the_source_is_gone(run, s3, db, capsys):
    rid = migrated(run, s3, db, capsys, names=("a", "b"),
                   paths=["image/a.png", "image/b.png", "image/b.png"])
    s3.delete_object(Bucket=SOURCE, Key="image/b.png")

    assert run("--rollback") == 1
    out = capsys.readouterr().out
    assert re.search(r"^REFUSED: avatar/b\.png stays: its source image/b\.png no longer exists",
                     out, re.M), out
    assert "avatar/a.png stays" not in out
    assert rows(db) == ["image/a.png", "avatar/b.png", "avatar/b.png"]
    assert f"Rollback of run {rid}: 1 row(s) restored for 1 key(s); 1 key(s) refused" in out


def test_rollback_unknown_run_id_is_one_line_exit_2(run, s3, db, capsys):
    put(s3, "image/a.png")
    insert_rows(db, ["image/a.png"])
    assert run() == 0
    capsys.readouterr()
    assert run("--rollback", "20000101T000000Z-nosuch") == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and "20000101T000000Z-nosuch" in err, err
    assert err.startswith("move.py: error: ")
    assert rows(db) == ["avatar/a.png"]


def test_rollback_with_an_empty_journal_exit_2(run, s3, db, capsys):
    assert run("--rollback") == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "no run to roll back" in err
