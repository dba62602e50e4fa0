"""What move.py shows and keeps about a run (verify and rollback have files of their own).

--dry-run, --report, --delete-source,
multipart copies, progress and logging (TTY or not, --quiet, --log-file), and
no secret in the log or the report. Each test builds its state, runs move.py
(in-process against moto, or as a subprocess against moto's HTTP server) and
asserts on bucket contents, table rows, exit codes and output.
"""
from __future__ import annotations

import csv
import errno
import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import time

import pytest
from psycopg2.extensions import make_dsn

import move
from avatarmove import report
from avatarmove.copying import Boto3Engine
from avatarmove.database import Database
from conftest import (DEST, OTHER, PNG, SOURCE, body, fail_copy_of, insert_rows, keys,
                      mixed_state, move_cmd, put, rows, snapshot, subprocess_env,
                      summary, table_exists)

REAL_BOTO3_COPY = Boto3Engine.copy


# --------------------------------------------------------------------------- --dry-run


def test_dry_run_writes_nothing_and_prints_the_plan(run, s3, db, capsys):
    mixed_state(s3, db)
    before = snapshot(s3, db)

    code = run("--dry-run")
    out, err = capsys.readouterr()

    assert code == 0, out + err
    assert snapshot(s3, db) == before
    assert not table_exists(db, "avatars_move_journal")
    s = summary(out)
    assert s["dry_run"] is True  # the text says "Dry run: nothing was changed" (test_report)
    # "would_*": a dry run did none of it, and no field named for what is done says so
    assert not {"copied", "rows_only", "rows_rewritten", "deleted"} & s.keys()
    plan = {k: s[k] for k in ("listed", "would_copy", "would_rewrite_rows_only", "skipped",
                              "would_rewrite_rows", "objects_without_rows", "conflicts",
                              "failed")}
    assert plan == {"listed": 8, "would_copy": 3, "would_rewrite_rows_only": 2, "skipped": 2,
                    "would_rewrite_rows": 5, "objects_without_rows": 1, "conflicts": 1,
                    "failed": 0}
    # rows under image/ left without an object once the run is done: gone0, gone1, x
    assert s["rows_left_under_source"] == 3
    assert s["rows_outside"] == 2

    # The real run does what the dry run said.
    assert run() == 1  # the conflict
    real = summary(capsys.readouterr().out)
    assert real["copied"] == 3
    assert real["rows_only"] == 2
    assert real["skipped"] == 2
    assert real["rows_rewritten"] == 5
    assert real["objects_without_rows"] == 1
    assert real["conflicts"] == 1
    assert real["rows_left_under_source"] == 3


def test_dry_run_after_a_finished_migration_has_nothing_to_do(run, s3, db, capsys):
    put(s3, "image/a.png")
    insert_rows(db, ["image/a.png"])
    assert run() == 0
    capsys.readouterr()
    before = snapshot(s3, db)
    assert run("--dry-run") == 0
    s = summary(capsys.readouterr().out)
    assert snapshot(s3, db) == before
    assert (s["mode"], s["would_copy"], s["skipped"], s["would_rewrite_rows"]) == \
        ("dry-run", 0, 1, 0)


# --------------------------------------------------------------------------- --report


def test_report_csv_one_line_per_object(run, s3, db, capsys, tmp_path, monkeypatch):
    put(s3, "image/a.png", PNG + b"a")  # copied, 2 rows
    put(s3, "image/n.png", PNG + b"n")  # copied, no row
    for k in ("r", "d"):
        put(s3, f"image/{k}.png", PNG + k.encode())
        put(s3, f"avatar/{k}.png", PNG + k.encode(), bucket=DEST)
    put(s3, "image/x.png", PNG + b"x")  # conflict
    put(s3, "avatar/x.png", OTHER, bucket=DEST)
    put(s3, "image/f.png", PNG + b"f")  # failed
    insert_rows(db, ["image/a.png", "image/a.png", "image/r.png", "avatar/d.png",
                     "image/x.png", "image/f.png"])
    fail_copy_of(monkeypatch, "image/f.png")
    report = tmp_path / "run.csv"

    assert run("--report", str(report)) == 1
    capsys.readouterr()
    with open(report, newline="", encoding="utf-8") as f:
        lines = list(csv.reader(f))
    assert lines[0] == ["source_key", "dest_key", "action", "rows_rewritten", "error"]
    got = {line[0]: line for line in lines[1:]}
    assert len(lines) == 1 + 6 and len(got) == 6
    assert got == {
        "image/a.png": ["image/a.png", "avatar/a.png", "copied", "2", ""],
        "image/n.png": ["image/n.png", "avatar/n.png", "copied", "0", ""],
        "image/r.png": ["image/r.png", "avatar/r.png", "rows-only", "1", ""],
        "image/d.png": ["image/d.png", "avatar/d.png", "skipped", "0", ""],
        "image/x.png": ["image/x.png", "avatar/x.png", "conflict", "0", ""],
        "image/f.png": ["image/f.png", "avatar/f.png", "failed", "0",
                        "InvalidRequest: injected failure"],
    }
    assert rows(db) == ["avatar/a.png", "avatar/a.png", "avatar/r.png", "avatar/d.png",
                        "image/x.png", "image/f.png"]


# --------------------------------------------------------------------------- --delete-source


def watch_deletes(monkeypatch, s3, db, seen: list) -> None:
    """At each DeleteObjects move.py sends: the copy exists and no row points at the source."""
    real = move.make_s3_client

    def check(params, **_):
        for o in params["Delete"]["Objects"]:
            src = o["Key"]
            dst = "avatar/" + src[len("image/"):]
            assert body(s3, dst) == body(s3, src, bucket=SOURCE), f"{src} deleted before its copy"
            assert src not in rows(db), f"{src} deleted while a row still points at it"
            seen.append(src)

    def make(*args, **kwargs):
        client = real(*args, **kwargs)
        client.meta.events.register("before-parameter-build.s3.DeleteObjects", check)
        return client
    monkeypatch.setattr(move, "make_s3_client", make)


def delete_state(s3, db) -> None:
    for k in ("a", "b", "n", "r", "d", "x", "f"):
        put(s3, f"image/{k}.png", PNG + k.encode())
    for k in ("r", "d"):
        put(s3, f"avatar/{k}.png", PNG + k.encode(), bucket=DEST)
    put(s3, "avatar/x.png", OTHER, bucket=DEST)
    insert_rows(db, ["image/a.png", "image/b.png", "image/b.png", "image/r.png",
                     "avatar/d.png", "image/x.png", "image/f.png"])


def test_delete_source_only_after_copy_and_rewrite(run, s3, db, capsys, monkeypatch):
    delete_state(s3, db)
    fail_copy_of(monkeypatch, "image/f.png")
    seen: list[str] = []
    watch_deletes(monkeypatch, s3, db, seen)

    assert run("--delete-source") == 1  # a conflict and a failure
    s = summary(capsys.readouterr().out)
    assert sorted(seen) == ["image/a.png", "image/b.png", "image/d.png", "image/n.png",
                            "image/r.png"]
    assert s["deleted"] == 5
    # conflict and failure keep their source (and their rows)
    assert keys(s3, SOURCE) == ["image/f.png", "image/x.png"]
    assert rows(db) == ["avatar/a.png", "avatar/b.png", "avatar/b.png", "avatar/r.png",
                        "avatar/d.png", "image/x.png", "image/f.png"]
    assert body(s3, "avatar/x.png") == OTHER
    assert "avatar/f.png" not in keys(s3, DEST)

    # the failure heals on a rerun, and only then goes its source
    monkeypatch.setattr(Boto3Engine, "copy", REAL_BOTO3_COPY)
    assert run("--delete-source") == 1  # the conflict stays
    capsys.readouterr()
    assert keys(s3, SOURCE) == ["image/x.png"]
    assert body(s3, "avatar/f.png") == PNG + b"f"
    assert rows(db)[-1] == "avatar/f.png"


def test_without_delete_source_nothing_is_deleted(run, s3, db, capsys, monkeypatch):
    delete_state(s3, db)
    seen: list[str] = []
    watch_deletes(monkeypatch, s3, db, seen)
    before = keys(s3, SOURCE)
    assert run() == 1  # the conflict
    s = summary(capsys.readouterr().out)
    assert seen == [] and keys(s3, SOURCE) == before
    assert s["deleted"] == 0  # and the text leaves the line out (test_report)


def test_dry_run_with_delete_source_deletes_nothing(run, s3, db, capsys):
    delete_state(s3, db)
    before = snapshot(s3, db)
    assert run("--dry-run", "--delete-source") == 0
    capsys.readouterr()
    assert snapshot(s3, db) == before


@pytest.mark.slow
def test_delete_source_over_http_with_the_default_engine(cli, http_seed, db):
    ks = http_seed(4)
    put(http_seed.client, "avatar/u003.png", OTHER, bucket=DEST)  # conflict: u003 stays
    p = cli("--delete-source", "--quiet", "--json")
    assert p.code == 1, p.err
    assert summary(p.out)["deleted"] == 3
    assert keys(http_seed.client, SOURCE) == ["image/u003.png"]
    assert keys(http_seed.client, DEST) == ["avatar/" + k[len("image/"):] for k in ks]
    assert rows(db) == ["avatar/u000.png", "avatar/u001.png", "avatar/u002.png",
                        "image/u003.png"]


# --------------------------------------------------------------------------- multipart


def test_multipart_copy_keeps_bytes_type_and_metadata(run, s3, db, capsys):
    big = os.urandom(12 * 1024 ** 2)
    put(s3, "image/big.png", big, ContentType="image/png", Metadata={"owner": "u1"})
    put(s3, "image/small.png", PNG, ContentType="image/png", Metadata={"owner": "u2"})
    insert_rows(db, ["image/big.png", "image/small.png"])
    args = ("--multipart-threshold", "8388608", "--multipart-chunksize", "5242880")

    assert run(*args) == 0
    s = summary(capsys.readouterr().out)
    assert s["copied"] == 2
    h = s3.head_object(Bucket=DEST, Key="avatar/big.png")
    assert re.fullmatch(r'"[0-9a-f]{32}-3"', h["ETag"]), h["ETag"]  # 5 + 5 + 2 MiB
    assert h["ContentLength"] == len(big)
    assert h["ContentType"] == "image/png"
    assert h["Metadata"] == {"owner": "u1"}
    assert body(s3, "avatar/big.png") == big
    small = s3.head_object(Bucket=DEST, Key="avatar/small.png")
    assert "-" not in small["ETag"] and small["Metadata"] == {"owner": "u2"}
    assert rows(db) == ["avatar/big.png", "avatar/small.png"]

    assert run(*args) == 0  # done is done, though the ETags differ by design
    s = summary(capsys.readouterr().out)
    assert s["copied"] == 0 and s["skipped"] == 2
    assert s["conflicts"] == 0


# --------------------------------------------------------------------------- progress, logging


@pytest.fixture
def http_seed(endpoint, db):
    """Fill the moto server: n sources with a row each."""
    client = move.make_s3_client()

    def seed(n: int, name: str = "u") -> list[str]:
        ks = [f"image/{name}{i:03d}.png" for i in range(n)]
        for k in ks:
            put(client, k, PNG + k.encode())
        insert_rows(db, ks)
        return ks
    seed.client = client
    return seed


@pytest.mark.slow
def test_not_a_tty_no_bar_but_log_lines(cli, http_seed, db):
    http_seed(5)
    p = cli("--json")
    assert p.code == 0, p.err
    s = summary(p.out)
    assert s["run_id"] and not s["dry_run"] and s["copied"] == 5
    lines = p.err.splitlines()
    assert lines and all(re.match(r"(INFO|WARNING|ERROR) ", line) for line in lines), p.err
    assert any(re.match(r"INFO run \S+: s3://legacy-s3/image/ -> s3://production-s3/avatar/",
                        line) for line in lines), p.err
    assert "\r" not in p.err and "obj/s]" not in p.err and "%|" not in p.err


def test_periodic_progress_log_line_without_a_tty(s3, db, dsn, capsys, monkeypatch, tmp_path):
    """No terminal: a 'progress:' log line every 5 s (here: the clock says 5 s have passed)."""
    monkeypatch.chdir(tmp_path)
    for i in range(3):
        put(s3, f"image/p{i}.png", PNG + bytes([i]))
    insert_rows(db, ["image/p0.png"])
    real_init = report.Reporter.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.last_log = float("-inf")
    monkeypatch.setattr(report.Reporter, "__init__", init)
    assert move.main(["--db", dsn, "--engine", "boto3", "--json"]) == 0
    out, err = capsys.readouterr()
    s = summary(out)
    # the rate, and nothing about S3's pace when it refused nothing (no internal names)
    m = re.search(r"^INFO progress: \d+ done \(\d+ copied, \d+ rows rewritten, 0 failed\), "
                  r"\d+ obj/s$", err, re.M)
    assert m, err
    assert "window" not in err
    assert "%|" not in err
    assert s["copied"] == 3


@pytest.mark.slow
def test_quiet_prints_only_the_summary(cli, http_seed, db):
    http_seed(5)
    p = cli("--quiet", "--json")
    assert p.code == 0, p.err
    assert p.err == ""
    # summary() asserts stdout is that one JSON line and nothing else; the text
    # layout of the summary is test_report.py's
    s = summary(p.out)
    assert s["run_id"] and not s["dry_run"] and s["listed"] == 5


@pytest.mark.slow
def test_quiet_still_warns_about_conflicts(cli, http_seed, db):
    http_seed(2)
    put(http_seed.client, "avatar/u000.png", OTHER, bucket=DEST)
    p = cli("--quiet")
    assert p.code == 1
    assert re.search(r"^WARNING conflict: avatar/u000\.png exists with different content",
                     p.err, re.M), p.err
    assert "INFO" not in p.err


@pytest.mark.slow
def test_log_file_has_the_run_id_and_the_summary(cli, http_seed, db, tmp_path):
    http_seed(3)
    log_file = tmp_path / "run.log"
    p = cli("--quiet", "--json", "--log-file", str(log_file))
    assert p.code == 0, p.err
    rid = summary(p.out)["run_id"]
    text = log_file.read_text()
    assert re.search(rf"INFO MainThread run {re.escape(rid)}: ", text), text
    assert f"Run {rid}" in text  # the summary, at debug level
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", text)


def run_in_pty(args: list[str], env: dict, cwd, timeout: float = 60) -> tuple[int, str]:
    """move.py with stdin, stdout and stderr on a pseudo-terminal of 120x30."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
                            close_fds=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError as exc:
                if exc.errno == errno.EIO:  # the other side closed
                    break
                raise
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
def test_tty_shows_a_progress_bar(http_seed, dsn, db, tmp_path):
    http_seed(60)
    code, text = run_in_pty(move_cmd("--workers", "2", "--json"), subprocess_env(dsn), tmp_path)
    assert code == 0, text
    assert "migrating" in text
    assert re.search(r"\bobj/s\]", text), text
    # no total (no second listing to count the source): the count of objects done
    assert re.search(r"\b60obj\b", text), text
    assert "\r" in text  # redrawn in place
    # stdout and stderr share the terminal: the summary is the one line that is JSON
    printed = [line for line in re.split(r"[\r\n]+", text) if line.startswith("{")]
    assert len(printed) == 1, text
    assert summary(printed[0])["copied"] == 60


# --------------------------------------------------------------------------- secrets


@pytest.mark.slow
def test_log_file_and_report_hold_no_secrets(cli, http_seed, db, dsn, tmp_path):
    password = "Pg-s3cret-Xq7"
    secret_dsn = make_dsn(dsn, password=password)
    http_seed(3)
    put(http_seed.client, "avatar/u001.png", OTHER, bucket=DEST)  # a conflict, for the log
    log_file, report = tmp_path / "run.log", tmp_path / "run.csv"
    p = cli("--log-file", str(log_file), "--report", str(report), env={
        "DB_CONN_STRING": secret_dsn})
    assert p.code == 1, p.err  # the conflict
    aws_secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    texts = {"log": log_file.read_text(), "report": report.read_text(),
             "stdout": p.out, "stderr": p.err}
    assert "conflict" in texts["log"] and "conflict" in texts["report"]
    for name, text in texts.items():
        assert password not in text, name
        assert aws_secret not in text, name
    # the same with the DSN in URI form and --db, and a database that refuses
    uri = f"postgresql://postgres:{password}@127.0.0.1:1/nodb"
    p = cli("--db", uri, "--log-file", str(log_file), "--report", str(report))
    assert p.code == 2
    assert "***" in p.err
    for text in (log_file.read_text(), p.out, p.err):
        assert password not in text and aws_secret not in text


def test_delete_source_keeps_a_source_a_row_points_at_again(run, s3, db, capsys, monkeypatch):
    """No index (snapshot plan): the application points a row at an old key after
    the snapshot was taken. That source must survive --delete-source."""
    for k in ("a", "b"):
        put(s3, f"image/{k}.png", PNG + k.encode())
    insert_rows(db, ["image/a.png", "image/b.png", "other/c.png"])
    real = Database.rewrite

    def app_writes_meanwhile(self, pairs, *args):
        done = real(self, pairs, *args)
        with db.cursor() as cur:  # autocommit: the application's own transaction
            cur.execute("UPDATE avatars SET path = 'image/a.png' WHERE path = 'other/c.png'")
        return done
    monkeypatch.setattr(Database, "rewrite", app_writes_meanwhile)

    assert run("--delete-source") == 0
    captured = capsys.readouterr()
    assert summary(captured.out)["row_plan"] == "snapshot"
    assert "kept source image/a.png" in captured.err
    assert keys(s3, SOURCE) == ["image/a.png"]  # b went; a stays for its new row
    assert rows(db) == ["avatar/a.png", "avatar/b.png", "image/a.png"]

    monkeypatch.setattr(Database, "rewrite", real)
    assert run("--delete-source") == 0  # the rerun moves that row, then deletes a
    assert rows(db) == ["avatar/a.png", "avatar/b.png", "avatar/a.png"]
    assert keys(s3, SOURCE) == []
