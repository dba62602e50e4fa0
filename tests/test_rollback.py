"""The journal and --rollback: exactly the rows of one run go back, where their sources
still exist."""
from __future__ import annotations

import re

import move
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
    s = summary(capsys.readouterr().out)
    assert rows(db) == ["image/a.png", "image/a.png", "image/b.png", "avatar/c.png"]
    assert (s["mode"], s["run_id"], s["rows_restored"], s["restorable_keys"], s["refused"]) == \
        ("rollback", run1, 3, 2, 0)
    assert keys(s3, DEST) == dest_before  # copies stay

    # latest: the second run
    assert run("--rollback", "latest") == 0
    s = summary(capsys.readouterr().out)
    assert (s["run_id"], s["rows_restored"], s["restorable_keys"]) == (run2, 1, 1)
    assert rows(db) == ["image/a.png", "image/a.png", "image/b.png", "image/c.png"]
    assert all(entry[4] for entry in journal(db))

    # nothing left to roll back
    assert run("--rollback", run1) == 2
    captured = capsys.readouterr()
    assert run1 in captured.err and len(captured.err.strip().splitlines()) == 1
    assert "already rolled back" in captured.err


def test_rollback_needs_a_run_id_or_latest(run, s3, db, capsys):
    migrated(run, s3, db, capsys)
    assert run("--rollback") == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert "--rollback needs the run to undo: a run id, or 'latest'" in err
    assert rows(db) == ["avatar/a.png", "avatar/b.png", "avatar/c.png"]


def test_second_latest_refuses_instead_of_undoing_the_run_before(run, s3, db, capsys):
    """`--rollback latest` typed twice must not undo a second, older run: the
    second call changes nothing and names the older run for the user to choose."""
    run1 = migrated(run, s3, db, capsys, names=("a",))
    put(s3, "image/b.png", PNG + b"b")
    insert_rows(db, ["image/b.png"])
    assert run() == 0
    run2 = summary(capsys.readouterr().out)["run_id"]
    assert run("--rollback", "latest") == 0
    assert summary(capsys.readouterr().out)["run_id"] == run2
    assert rows(db) == ["avatar/a.png", "image/b.png"]

    assert run("--rollback", "latest") == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert f"the latest run {run2} is already rolled back" in err
    assert f"--rollback {run1} (1 row(s))" in err
    assert rows(db) == ["avatar/a.png", "image/b.png"]  # run 1 untouched


def test_rollback_dry_run_shows_the_runs_and_changes_nothing(run, s3, db, dsn, capsys):
    run1 = migrated(run, s3, db, capsys, names=("a", "b"),
                    paths=["image/a.png", "image/a.png", "image/b.png"])
    put(s3, "image/c.png", PNG + b"c")
    insert_rows(db, ["image/c.png"])
    assert run() == 0
    run2 = summary(capsys.readouterr().out)["run_id"]
    before = rows(db), journal(db)

    assert run("--rollback", run1, "--dry-run") == 0
    s = summary(capsys.readouterr().out)
    assert (rows(db), journal(db)) == before
    assert (s["mode"], s["dry_run"], s["run_id"], s["would_restore_rows"], s["restorable_keys"],
            s["refused"]) == ("rollback", True, run1, 3, 2, 0)
    assert "rows_restored" not in s
    assert [(r["run_id"], r["keys"], r["rows"], r["rolled_back_at"]) for r in s["runs"]] == \
        [(run2, 1, 1, None), (run1, 2, 3, None)]

    # the text a person reads: the run, its counts, every run in the journal
    assert move.main(["--db", dsn, "--quiet", "--engine", "boto3", "--rollback", "latest",
                      "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (rows(db), journal(db)) == before
    assert re.search(rf"^Rollback of run {run2} \(rewrote rows at [^)]+\): 1 key\(s\), up to 1 "
                     r"row\(s\) to restore; 0 key\(s\) refused$", out, re.M), out
    assert re.search(rf"^  {run1}  \S+\s+2 key\(s\)\s+3 row\(s\)  3 row\(s\) to restore$",
                     out, re.M), out
    assert out.rstrip().endswith(f"Dry run: nothing was changed. Rollback of run {run2} would "
                                 "restore up to 1 row(s) for 1 key(s); 0 key(s) refused.")


def test_rollback_text_says_what_it_restores_first_then_what_it_did(run, s3, db, dsn, capsys):
    rid = migrated(run, s3, db, capsys, names=("a", "b"),
                   paths=["image/a.png", "image/a.png", "image/b.png"])
    assert move.main(["--db", dsn, "--quiet", "--engine", "boto3", "--rollback", rid]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"Rollback of run {rid} (rewrote rows at "), lines
    assert lines[0].endswith(": 2 key(s), up to 3 row(s) to restore; 0 key(s) refused")
    assert lines[-1] == (f"Rollback of run {rid}: 3 row(s) restored for 2 key(s); 0 key(s) "
                         f"refused. Copies in s3://{DEST} were left in place.")


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
    assert summary(capsys.readouterr().out)["rows_restored"] == 2
    assert rows(db) == ["image/a.png", "image/a.png"]


def test_rollback_refused_where_the_source_is_gone(run, s3, db, dsn, capsys):
    rid = migrated(run, s3, db, capsys, names=("a", "b"),
                   paths=["image/a.png", "image/b.png", "image/b.png"])
    s3.delete_object(Bucket=SOURCE, Key="image/b.png")

    assert move.main(["--db", dsn, "--quiet", "--engine", "boto3", "--rollback", "latest"]) == 1
    out, err = capsys.readouterr()
    assert re.search(r"^REFUSED: avatar/b\.png stays: its source image/b\.png cannot be "
                     r"restored: it was deleted from s3://legacy-s3, which is not versioned",
                     out, re.M), out
    assert "avatar/a.png stays" not in out
    assert rows(db) == ["image/a.png", "avatar/b.png", "avatar/b.png"]
    assert f"Rollback of run {rid}: 1 row(s) restored for 1 key(s); 1 key(s) refused" in out
    # the last line: what happened and what to do
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"move.py: rollback of run {rid} incomplete: 1 key(s) keep their new "
                           "paths"), err
    assert f"then run --rollback {rid} again" in last

    assert run("--rollback", rid) == 1  # the same run again: still refused, nothing else
    s = summary(capsys.readouterr().out)
    assert s["refused_keys"] == [{"source_key": "image/b.png", "dest_key": "avatar/b.png",
                                  "reason": "it was deleted from s3://legacy-s3, which is not "
                                            "versioned: its bytes are gone"}]
    assert (s["rows_restored"], s["exit_code"]) == (0, 1)
    assert rows(db) == ["image/a.png", "avatar/b.png", "avatar/b.png"]


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
    assert run("--rollback", "latest") == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "no run to roll back" in err
