"""--verify: a read-only reconciliation of both buckets and the table."""
from __future__ import annotations

import csv
import re

from conftest import (DEST, OTHER, PNG, SOURCE, body, insert_rows, journal, migrated, put,
                      role_dsn, snapshot, summary, table_exists)


# --------------------------------------------------------------------------- --verify


def test_verify_clean_then_missing_copy_then_rerun_heals(run, s3, db, capsys):
    migrated(run, s3, db, capsys)
    before = snapshot(s3, db)
    assert run("--verify", as_json=False) == 0
    out = capsys.readouterr().out
    assert "0 problem(s)" in out
    assert not re.search(r"^[A-Z-]+: ", out, re.M)
    assert snapshot(s3, db) == before

    s3.delete_object(Bucket=DEST, Key="avatar/b.png")
    before = snapshot(s3, db)
    assert run("--verify", as_json=False) == 1
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
    assert run("--verify", as_json=False) == 0
    assert "0 problem(s)" in capsys.readouterr().out


def test_verify_names_each_kind_of_problem(run, s3, db, capsys):
    migrated(run, s3, db, capsys, names=("a", "b", "c", "d"))
    insert_rows(db, ["avatar/ghost.png"])  # DANGLING-ROW: no such object anywhere
    insert_rows(db, ["image/b.png"])  # NOT-REWRITTEN: a row added after the run
    put(s3, "avatar/c.png", OTHER, bucket=DEST)  # MISMATCH
    before = snapshot(s3, db)

    assert run("--verify", as_json=False) == 1
    out, err = capsys.readouterr()
    assert snapshot(s3, db) == before
    # the last line: what was found, what to do about each kind
    assert err.splitlines()[-1].startswith("move.py: verify found 3 problem(s): DANGLING-ROW 1: "
                                           "a run copies the object again"), err
    assert "NOT-REWRITTEN 1: a run rewrites them" in err.splitlines()[-1]
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


# --------------------------------------------------------------------------- rows the run left


def test_verify_finds_rows_under_the_source_prefix_whose_object_is_gone(run, s3, db, capsys):
    """A source deleted while a row still pointed at it (by hand, or by a run that
    could not see the row): the row dangles under the source prefix."""
    migrated(run, s3, db, capsys, names=("a", "b"))
    put(s3, "image/c.png")
    insert_rows(db, ["image/c.png", "image/c.png"])
    s3.delete_object(Bucket=SOURCE, Key="image/c.png")

    assert run("--verify", as_json=False) == 1
    out = capsys.readouterr().out
    assert re.search(r"^DANGLING-ROW: 2 row\(s\) point at image/c\.png, which does not exist in "
                     r"s3://legacy-s3$", out, re.M), out
    assert "1 problem(s): DANGLING-ROW 1" in out


def test_verify_finds_rows_naming_a_gone_source_in_another_form(run, s3, db, capsys):
    migrated(run, s3, db, capsys, names=("a",))
    put(s3, "image/kept.png")
    put(s3, "avatar/kept.png", bucket=DEST)
    insert_rows(db, ["https://legacy-s3.s3.amazonaws.com/image/kept.png?v=2", "image/kept.png#x",
                     "/image/gone.png", "https://cdn.example.com/legacy-s3/image/gone.png"])

    assert run("--verify", as_json=False) == 1
    out = capsys.readouterr().out
    assert re.search(r"^DANGLING-ROW: 2 row\(s\) name image/gone\.png \(as '.*'\), which does "
                     r"not exist in s3://legacy-s3$", out, re.M), out
    assert "kept.png" not in out  # the object it names exists
    assert "1 problem(s): DANGLING-ROW 1" in out


def test_verify_as_a_role_that_cannot_see_every_row_is_not_clean(run, s3, db, dsn, capsys):
    migrated(run, s3, db, capsys, names=("a", "b"))
    with role_dsn(db, dsn, "GRANT SELECT ON avatars TO {role}",
                  "ALTER TABLE avatars ENABLE ROW LEVEL SECURITY",
                  "CREATE POLICY only_a ON avatars USING (path = 'avatar/a.png')") as (reader, _):
        assert run("--db", reader, "--verify", as_json=False) == 1
    out = capsys.readouterr().out
    assert re.search(r"^INCOMPLETE: row-level security on avatars applies to role .*only_a.*"
                     r"the rows it cannot see were not checked$", out, re.M), out


# --------------------------------------------------------------------------- output


def test_an_object_not_copied_yet_is_one_problem_not_two(run, s3, db, capsys):
    migrated(run, s3, db, capsys, names=("a",))
    put(s3, "image/new.png")  # uploaded after the run, with its row: not copied yet
    insert_rows(db, ["image/new.png"])
    assert run("--verify") == 1
    s = summary(capsys.readouterr().out)
    assert s["problem_counts"] == {"MISSING-COPY": 1}
    assert [(p["kind"], p["key"]) for p in s["problems"]] == [("MISSING-COPY", "image/new.png")]


def test_the_terminal_shows_20_of_a_kind_and_report_and_json_have_all(run, s3, db, capsys,
                                                                       tmp_path):
    migrated(run, s3, db, capsys, names=("a",))
    for i in range(25):
        put(s3, f"image/late{i:02}.png", PNG + bytes([i]))
    report = tmp_path / "problems.csv"

    assert run("--verify", "--report", str(report), as_json=False) == 1
    out = capsys.readouterr().out
    shown = [line for line in out.splitlines() if line.startswith("MISSING-COPY: image/")]
    assert len(shown) == 20, out
    assert "MISSING-COPY: further MISSING-COPY problems are only in --report" in out
    assert "25 problem(s): MISSING-COPY 25" in out
    with open(report, newline="", encoding="utf-8") as f:
        lines = list(csv.DictReader(f))
    assert sorted(r["key"] for r in lines) == [f"image/late{i:02}.png" for i in range(25)]
    assert {r["kind"] for r in lines} == {"MISSING-COPY"}

    assert run("--verify") == 1
    s = summary(capsys.readouterr().out)
    assert s["problem_count"] == len(s["problems"]) == 25


def test_verify_is_right_on_a_server_that_lists_folders_first(run, s3, db, capsys, monkeypatch):
    """SeaweedFS lists a folder before its sibling files ('a/b.png' before 'a-c.png'),
    not in byte order: no row whose object exists may be called DANGLING, no copy
    MISSING, and a row that does dangle is still found."""
    from avatarmove.listing import Listing
    names = ["a-c", "a/b", "a/c/d", "a0", "b", "b/x", "b-y"]
    migrated(run, s3, db, capsys, names=names)
    insert_rows(db, ["avatar/a/ghost.png"])
    real = Listing._raw_pages

    def folder_first(self):
        for page in real(self):
            yield sorted(page, key=lambda o: o.key.split("/"))
    monkeypatch.setattr(Listing, "_raw_pages", folder_first)

    assert run("--verify") == 1
    s = summary(capsys.readouterr().out)
    assert [(p["kind"], p["key"]) for p in s["problems"]] == \
        [("DANGLING-ROW", "avatar/a/ghost.png")], s["problems"]
    assert s["checked_objects"] == len(names)
