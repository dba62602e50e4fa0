"""avatarmove.report: the summary as data (to_json, what --json prints), its text
rendering (what a person reads), the counters, and the per-item CSV report.

Every other test reads a run's figures from --json; the text summary is checked
here only, once through move.main() and once per variant through to_text().
"""
from __future__ import annotations

import csv
import io
import dataclasses
import json
import re
import sys

import pytest

import move
from avatarmove.listing import Obj
from avatarmove.planning import COPY, Item
from avatarmove.report import ACTION_COUNTERS, Reporter, Stats, Summary
from avatarmove.settings import Settings
from conftest import PNG, ROOT, SOURCE, insert_rows, put, summary

# The keys `move.py --json` promises (others may be added, none taken away).
JSON_KEYS = {"run_id", "dry_run", "interrupted", "listed", "copied", "rows_only", "skipped",
             "rows_rewritten", "objects_without_rows", "conflicts", "failed", "deleted",
             "elapsed_s", "requests", "row_plan", "rows_left_under_source", "rows_outside"}


def settings(**kw) -> Settings:
    base = dict(db="", source_bucket="src", dest_bucket="dst", source_prefix="image/",
                dest_prefix="avatar/", table="avatars", column="path")
    base.update(kw)
    return Settings(**base)


def a_summary(**kw) -> Summary:
    figures = dict(run_id="20250101T000000Z-abc123", dry_run=False, interrupted=False,
                   listed=11, copied=3, rows_only=2, skipped=4, rows_rewritten=7,
                   objects_without_rows=1, conflicts=1, failed=1, deleted=0, elapsed_s=2.0,
                   requests=19, row_plan="snapshot")
    figures.update(kw)
    return Summary(**figures)


# --------------------------------------------------------------------------- to_json


def test_to_json_is_one_line_with_every_documented_key_and_its_value():
    s = a_summary(rows_left_under_source=5, rows_outside=6)
    text = s.to_json()
    assert "\n" not in text  # one line: `move.py --json | jq` and line-based log shippers
    d = json.loads(text)
    assert JSON_KEYS <= d.keys()
    assert {k: d[k] for k in JSON_KEYS} == {
        "run_id": "20250101T000000Z-abc123", "dry_run": False, "interrupted": False,
        "listed": 11, "copied": 3, "rows_only": 2, "skipped": 4, "rows_rewritten": 7,
        "objects_without_rows": 1, "conflicts": 1, "failed": 1, "deleted": 0,
        "elapsed_s": 2.0, "requests": 19, "row_plan": "snapshot",
        "rows_left_under_source": 5, "rows_outside": 6}


def test_to_json_table_counts_unknown_are_null():
    """An interrupted run does not count the table: null, not a misleading 0."""
    d = json.loads(a_summary(interrupted=True).to_json())
    assert d["interrupted"] is True
    assert d["rows_left_under_source"] is None and d["rows_outside"] is None


def test_summary_of_takes_the_counters_of_the_run():
    stats = Stats(listed=5, copied=2, rows_only=1, skipped=1, conflicts=1, rows_rewritten=3,
                  objects_without_rows=1, rows_left_under_source=0, rows_outside=2)
    d = json.loads(Summary.of(stats, settings(dry_run=True), "rid", "index", 42,
                              interrupted=False).to_json())
    assert {k: d[k] for k in ("run_id", "dry_run", "listed", "would_copy",
                              "would_rewrite_rows_only", "skipped", "conflicts", "failed",
                              "would_rewrite_rows", "objects_without_rows",
                              "requests", "row_plan", "rows_left_under_source",
                              "rows_outside")} == {
        "run_id": "rid", "dry_run": True, "listed": 5, "would_copy": 2,
        "would_rewrite_rows_only": 1, "skipped": 1, "conflicts": 1, "failed": 0,
        "would_rewrite_rows": 3,
        "objects_without_rows": 1, "requests": 42, "row_plan": "index",
        "rows_left_under_source": 0, "rows_outside": 2}
    assert d["elapsed_s"] >= 0


def test_to_json_says_why_a_run_stopped_and_what_it_could_not_copy():
    stats = Stats(listed=160, copied=100, failed=57, archived=2, key_too_long=1,
                  stopped=STOPPED)
    for code in ["AccessDenied"] * 56 + ["SlowDown"]:
        stats.failed_by_code[code] += 1
    d = json.loads(Summary.of(stats, settings(), "rid", "index", 160, False).to_json())
    assert {k: d[k] for k in ("archived", "key_too_long", "failed", "failed_by_code",
                              "stopped")} == {
        "archived": 2, "key_too_long": 1, "failed": 57,
        "failed_by_code": {"AccessDenied": 56, "SlowDown": 1}, "stopped": STOPPED}
    d = json.loads(a_summary().to_json())  # a run that did not stop
    assert (d["stopped"], d["failed_by_code"], d["archived"], d["key_too_long"]) == \
        (None, {}, 0, 0)


# --------------------------------------------------------------------------- to_text


def figure(text: str, label: str) -> int:
    """The number after a label in the text summary (this file only)."""
    m = re.search(rf"^  {re.escape(label)}:?\s+(\d+)$", text, re.M)
    assert m, f"no {label!r} in:\n{text}"
    return int(m.group(1))


def test_default_output_is_the_text_summary(s3, db, dsn, capsys, monkeypatch, tmp_path):
    """What a person running move.py reads: a title with the run id, then one
    indented line per figure, with the same figures --json gives."""
    monkeypatch.chdir(tmp_path)
    for k in ("a", "b", "c", "d", "e"):
        put(s3, f"image/{k}.png", PNG + k.encode())
    insert_rows(db, ["image/a.png", "image/a.png", "image/gone.png", "other/x.png"])

    assert move.main(["--db", dsn, "--quiet", "--engine", "boto3"]) == 0
    out, err = capsys.readouterr()

    assert err == ""
    assert re.match(r"Run \S+\n  listed PNGs +5\n", out), out
    assert all(line.startswith(("Run ", "  ")) for line in out.splitlines()), out
    assert {label: figure(out, label) for label in (
        "listed PNGs", "copied", "rows only", "skipped (done)", "rows rewritten",
        "objects without rows", "conflicts", "failed",
        "rows under image/ with no object moved (table-wide)",
        "rows outside image/ and avatar/ (untouched)")} == {
        "listed PNGs": 5, "copied": 5, "rows only": 0, "skipped (done)": 0,
        "rows rewritten": 2, "objects without rows": 4, "conflicts": 0, "failed": 0,
        "rows under image/ with no object moved (table-wide)": 1,
        "rows outside image/ and avatar/ (untouched)": 1}
    assert re.search(r"^  row plan: snapshot; S3 requests: \d+", out, re.M), out
    assert "sources deleted" not in out  # only with --delete-source

    # the rerun's JSON and text agree on what a rerun does
    assert move.main(["--db", dsn, "--quiet", "--engine", "boto3", "--json"]) == 0
    s = summary(capsys.readouterr().out)
    assert (s["copied"], s["skipped"], s["rows_rewritten"]) == (0, 5, 0)


STOPPED = ("stopped after 50 copies in a row failed with errors a rerun cannot cure "
           "(AccessDenied 50): check the IAM policy (and the bucket policies) for s3:GetObject "
           "on src/image/* and s3:PutObject on dst/avatar/*")

TEXT = {
    # variant: (summary fields, settings, lines that must be there, text that must not)
    "run": ({}, {},
            ["Run 20250101T000000Z-abc123", "  copied                 3",
             "  rows only              2", "  rows rewritten         7"],
            ["Dry run", "interrupted", "sources deleted", "table-wide"]),
    "dry-run": ({"dry_run": True}, {},
                ["Dry run: nothing was changed", "  to copy                3",
                 "  to rewrite rows only   2", "  rows to rewrite        7"],
                ["Run 2025", "  copied ", "rows rewritten"]),
    "interrupted": ({"interrupted": True}, {},
                    ["Run 20250101T000000Z-abc123 (interrupted: rerun to finish)"], []),
    "delete-source": ({"deleted": 9}, {"delete_source": True},
                      ["  sources deleted        9"], []),
    "table-counts": ({"rows_left_under_source": 5, "rows_outside": 6}, {},
                     ["  rows under image/ with no object moved (table-wide): 5",
                      "  rows outside image/ and avatar/ (untouched): 6"], []),
    "uncopyable": ({"archived": 2, "key_too_long": 1}, {},
                   ["  archived (restore first) 2", "  key too long           1"],
                   ["failures by code", "stopped"]),
    # a rerun would meet the same errors: no "rerun" anywhere, even if also interrupted
    "stopped": ({"stopped": STOPPED, "failed": 57, "failed_by_code": {"AccessDenied": 57},
                 "interrupted": True}, {},
                ["Run 20250101T000000Z-abc123 (stopped: errors a rerun cannot cure, see below)",
                 "  failed 57 AccessDenied 57",
                 "  " + STOPPED], ["rerun to", "interrupted"]),
}


@pytest.mark.parametrize("variant", list(TEXT))
def test_to_text_labels(variant):
    fields, cfg, present, absent = TEXT[variant]
    text = a_summary(**fields).to_text(settings(**cfg))
    lines = ["  " + " ".join(line.split()) if line.startswith("  ") else line
             for line in text.splitlines()]  # the spacing is test_to_text_aligns' business
    for line in present:
        line = "  " + " ".join(line.split()) if line.startswith("  ") else line
        assert line in lines, f"{line!r} not in:\n{text}"
    for fragment in absent:
        assert fragment not in text, f"{fragment!r} in:\n{text}"
    assert re.search(r"^  row plan: snapshot; S3 requests: 19\b", text, re.M), text
    assert re.search(r"^  elapsed 2\.0s, \d+ objects/s$", text, re.M), text


def test_to_text_aligns_labels_and_figures():
    """Labels in one column, figures right-aligned in the next, whatever their widths."""
    text = a_summary(listed=123456, archived=2, failed=1,
                     failed_by_code={"SlowDown": 1}).to_text(settings(delete_source=True))
    rows = [line for line in text.splitlines()[1:]
            if re.match(r"  \S.*?  +\d+(  .*)?$", line) and ":" not in line.split("  ")[1]]
    assert len(rows) >= 12, text
    ends = {re.match(r"(  \S.*?  +\d+)", line).end() for line in rows}
    starts = {len(line) - len(line[2:].lstrip(" ")) for line in rows}
    assert len(ends) == 1, text  # every figure ends in the same column
    assert starts == {2}, text
    assert "  failed" in text and re.search(r"^  failed +1  SlowDown 1$", text, re.M), text


# --------------------------------------------------------------------------- Stats


def item(action: str, key: str = "image/a.png", rows: int = 0, error: str = "") -> Item:
    it = Item(Obj(key, 3), "avatar/" + key[len("image/"):], COPY)
    it.action, it.rows, it.error = action, rows, error
    return it


@pytest.mark.parametrize("action,counter", sorted(ACTION_COUNTERS.items()))
def test_stats_count_adds_one_to_the_actions_counter_only(action, counter):
    stats = Stats()
    before = dataclasses.asdict(stats)
    stats.count(item(action))
    stats.count(item(action, "image/b.png"))
    after = dataclasses.asdict(stats)
    assert after[counter] == before[counter] + 2
    changed = {k for k in after if after[k] != before[k]} - {counter}
    # a failure may also be tallied by its error code, a row not rewritten by its
    # reason, a copy by its storage class; no other counter moves
    assert changed <= {"failed_by_code", "not_rewritten_by_reason", "storage_classes"}, changed
    assert stats.finished == 2


# --------------------------------------------------------------------------- Reporter


def test_reporter_writes_the_csv_header_and_one_line_per_item(tmp_path):
    path = tmp_path / "report.csv"
    reporter = Reporter(settings(report=str(path), progress=False), quiet=True)
    stats = Stats()
    items = [item("copied", "image/a.png", rows=2),
             item("rows-only", "image/sub/b c.png", rows=1),
             item("skipped", "image/d.png"),
             item("failed", "image/f,quoted\".png", error="InternalError: boom, twice")]
    for it in items:
        stats.count(it)
        reporter.item(it, stats)
    reporter.close()

    with open(path, newline="", encoding="utf-8") as f:
        lines = list(csv.reader(f))
    assert lines == [
        ["source_key", "dest_key", "action", "rows_rewritten", "error"],
        ["image/a.png", "avatar/a.png", "copied", "2", ""],
        ["image/sub/b c.png", "avatar/sub/b c.png", "rows-only", "1", ""],
        ["image/d.png", "avatar/d.png", "skipped", "0", ""],
        ["image/f,quoted\".png", "avatar/f,quoted\".png", "failed", "0",
         "InternalError: boom, twice"],
    ]


def test_reporter_without_report_writes_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reporter = Reporter(settings(progress=False), quiet=True)
    reporter.item(item("copied"), Stats())
    reporter.close()
    assert list(tmp_path.iterdir()) == []


def test_reporter_shows_the_first_per_object_lines_and_keeps_all_in_the_log_file(tmp_path,
                                                                                  capsys):
    """Thousands of identical failure lines bury the one that says what to do: the terminal
    gets TERMINAL_LINES of each kind, then one line; the log file and the report get all."""
    from avatarmove.report import TERMINAL_LINES
    from avatarmove.settings import log, setup_logging
    setup_logging(quiet=True, log_file=str(tmp_path / "move.log"))
    try:
        reporter = Reporter(settings(report=str(tmp_path / "r.csv"), progress=False),
                            quiet=True)
        stats = Stats()
        n = TERMINAL_LINES + 15
        for i in range(n):
            for action, error in (("failed", "AccessDenied: Access Denied"),
                                  ("archived", "storage class GLACIER")):
                it = item(action, f"image/{action}{i:03d}.png", error=error)
                stats.count(it)
                reporter.item(it, stats)
        reporter.close()
    finally:
        for h in list(log.handlers):
            h.close()
        log.handlers.clear()
    err = capsys.readouterr().err.splitlines()
    assert len([x for x in err if x.startswith("ERROR failed: ")]) == TERMINAL_LINES
    assert len([x for x in err if x.startswith("WARNING archived: ")]) == TERMINAL_LINES
    assert [x for x in err if "further" in x] == [
        "ERROR further per-object failures are only in --report and --log-file",
        "WARNING further per-object archived objects are only in --report and --log-file"]
    logged = (tmp_path / "move.log").read_text(encoding="utf-8")
    assert logged.count("ERROR MainThread failed: ") == n
    assert logged.count("WARNING MainThread archived: ") == n
    with open(tmp_path / "r.csv", newline="", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 2 * n


# --------------------------------------------------------------------------- the JSON schema
# docs/summary.schema.json is what scripts rely on: every mode's real output is
# validated against it, strictly (no field it does not name, none it names missing).

SCHEMA_PATH = ROOT / "docs" / "summary.schema.json"


def schema_for(name: str | None = None) -> dict:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return schema if name is None else {"$defs": schema["$defs"], "$ref": f"#/$defs/{name}"}


def assert_valid(doc: dict, name: str) -> None:
    from jsonschema import Draft202012Validator
    whole = [schema_for()] if name not in ("object", "problem") else []  # lines of --jsonl
    for schema in [schema_for(name), *whole]:  # its own mode's, then the whole
        errors = sorted(Draft202012Validator(schema).iter_errors(doc), key=str)
        assert not errors, f"{name}: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_schema_is_a_valid_json_schema():
    from jsonschema import Draft202012Validator
    Draft202012Validator.check_schema(schema_for())


def test_every_mode_prints_json_the_schema_describes(run, s3, db, tmp_path, capsys,
                                                     monkeypatch):
    from conftest import fail_copy_of, mixed_state
    mixed_state(s3, db)  # copies, rows only, done, a conflict, rows without objects
    fail_copy_of(monkeypatch, "image/c2.png")

    assert run("--dry-run", "--jsonl", str(tmp_path / "plan.jsonl")) == 0
    plan = summary(capsys.readouterr().out)
    assert_valid(plan, "dry-run")
    assert (plan["mode"], plan["would_copy"], plan["exit_code"], plan["verdict"]) == \
        ("dry-run", 3, 0, None)
    records = jsonl(tmp_path / "plan.jsonl")
    assert len(records) == plan["listed"]
    for r in records:
        assert_valid(r, "object")
    assert sorted(r["source_key"] for r in records if r["action"] == "would-copy") == \
        ["image/c0.png", "image/c1.png", "image/c2.png"]

    assert run("--jsonl", str(tmp_path / "run.jsonl")) == 1  # the conflict, the failure
    done = summary(capsys.readouterr().out)
    assert_valid(done, "run")
    assert (done["copied"], done["conflicts"], done["failed"], done["exit_code"]) == (2, 1, 1, 1)
    assert done["verdict"].startswith("incomplete: 1 copy failed (InvalidRequest 1)")
    records = jsonl(tmp_path / "run.jsonl")
    for r in records:
        assert_valid(r, "object")
    assert {r["source_key"]: r["action"] for r in records}["image/c2.png"] == "failed"

    assert run("--verify", "--jsonl", str(tmp_path / "verify.jsonl")) == 1
    checked = summary(capsys.readouterr().out)
    assert_valid(checked, "verify")
    assert checked["problem_count"] == len(checked["problems"]) == sum(
        checked["problem_counts"].values()) > 0
    assert jsonl(tmp_path / "verify.jsonl") == checked["problems"]

    assert run("--rollback", done["run_id"], "--dry-run") == 0
    preview = summary(capsys.readouterr().out)
    assert_valid(preview, "rollback-dry-run")
    assert run("--rollback", "latest") == 0
    undone = summary(capsys.readouterr().out)
    assert_valid(undone, "rollback")
    assert undone["rows_restored"] == preview["would_restore_rows"] == done["rows_rewritten"]


def test_every_field_in_the_schema_is_explained_in_docs_json_md():
    text = (ROOT / "docs" / "json.md").read_text(encoding="utf-8")
    names = {name for d in schema_for()["$defs"].values() for name in d.get("properties", {})}
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert not missing, f"docs/json.md does not explain {missing}"


# --------------------------------------------------------------------------- the terminal


class Tty(io.StringIO):
    """stderr as a terminal: the progress bar is drawn."""

    def isatty(self) -> bool:
        return True


def test_log_lines_never_land_inside_the_progress_bar(run, s3, db, dsn, monkeypatch,
                                                      tmp_path):
    """Lines logged while the bar is drawn (by any thread) start on a line of their
    own: never 'migrating: 0obj [00:00, ?obj/s]INFO no index on ...'."""
    from avatarmove.listing import Listing
    for k in ("a", "b", "c"):
        put(s3, f"image/{k}.png", PNG + k.encode())
    insert_rows(db, ["image/a.png", "image/b.png"])
    listings = []
    real = Listing._raw_pages

    def counted(self):
        listings.append(self.bucket)
        return real(self)
    monkeypatch.setattr(Listing, "_raw_pages", counted)
    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)

    assert move.main(["--db", dsn, "--engine", "boto3", "--json"]) == 0  # not --quiet
    err = tty.getvalue()
    assert "migrating" in err and "INFO no index on avatars(path)" in err, err
    assert not re.search(r"[^\r\n]INFO ", err), err  # every log line starts a line
    # the bar's total would cost a second full listing of the source: there is none
    assert listings.count(SOURCE) == 1, listings
