#!/usr/bin/env python3
"""A guided tour of move.py against a throwaway sandbox: `make demo`.

Starts a real PostgreSQL (pgserver, embedded, data in .demo/pg; or
TEST_DATABASE_URL) and an S3 server (moto) on 127.0.0.1 with
devtools.sandbox, seeds avatars with the real seed/seeder.py, then runs the
real move.py: a full run, an interrupted run, the resume, --verify and
--dry-run. Nothing touches your AWS account: every AWS_*/DB_*/S3_* variable of
yours is replaced, and the children run in .demo/ (so no .env is read).
The figures the tour checks come from `move.py --json`.
"""
from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.sandbox import (SandboxError, list_keys, parse_summary, s3_client,  # noqa: E402
                              start_moto, start_postgres)

DEMO = ROOT / ".demo"
SOURCE, DEST = "legacy-s3", "production-s3"
SEED = 500
MEANING = {0: "done", 1: "some objects failed or conflicted: rerun", 2: "bad input",
           130: "interrupted: rerun to resume"}

TTY = sys.stdout.isatty()
CHILDREN: list[subprocess.Popen] = []  # move.py/seeder runs, waited for on the way out


def bold(text: str) -> str:
    return f"\033[1m{text}\033[0m" if TTY else text


def header(title: str, *explain: str) -> None:
    print("\n" + bold(f"== {title} =="), flush=True)
    for line in explain:
        print(f"   {line}", flush=True)


def say(text: str) -> None:
    print(f"   {text}", flush=True)


class DemoError(Exception):
    pass


class Box:
    """The sandbox as the tour uses it: a database, moto, the children's environment."""

    def __init__(self) -> None:
        self.pg = self.moto = self.s3 = None
        self.dsn = ""
        self.env: dict[str, str] = {}

    def start(self) -> None:
        started = time.monotonic()
        DEMO.mkdir(exist_ok=True)
        self.pg = start_postgres(DEMO)
        self.dsn = self.pg.new_database("demo")
        from psycopg2.extensions import parse_dsn
        where = f"data in {DEMO.name}/pg" if self.pg.embedded else "TEST_DATABASE_URL"
        say(f"PostgreSQL   database {parse_dsn(self.dsn)['dbname']}  ({where})")
        self.moto = start_moto()
        say(f"S3 (moto)    {self.moto.endpoint}  (in memory; buckets {SOURCE} and {DEST})")
        self.env = self.moto.env(self.dsn, S3_SOURCE_BUCKET_NAME=SOURCE,
                                 S3_DEST_BUCKET_NAME=DEST, S3_OBJECT_SOURCE_PREFIX="image",
                                 S3_OBJECT_DEST_PREFIX="avatar", DB_TABLE="avatars",
                                 DB_PATH_COLUMN="path")
        self.s3 = s3_client(self.moto.endpoint)
        say(f"ready in {time.monotonic() - started:.1f}s")

    def stop(self) -> None:
        for server in (self.moto, self.pg):
            if server is not None:
                server.stop()


# ---------------------------------------------------------------- looking at the state


def count_keys(box: Box, bucket: str, prefix: str) -> int:
    return len(list_keys(box.s3, bucket, prefix))


def query(box: Box, statement: str, params=None) -> list[tuple]:
    import psycopg2
    conn = psycopg2.connect(box.dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall()
    finally:
        conn.close()


def show_state(box: Box) -> dict[str, int]:
    rows_image, rows_avatar = query(
        box, "SELECT count(*) FILTER (WHERE path LIKE 'image/%'), "
             "count(*) FILTER (WHERE path LIKE 'avatar/%') FROM avatars")[0]
    st = {"src": count_keys(box, SOURCE, "image/"), "dest": count_keys(box, DEST, "avatar/"),
          "rows_image": rows_image, "rows_avatar": rows_avatar}
    say(f"now: s3://{SOURCE}/image/ {st['src']} objects | s3://{DEST}/avatar/ {st['dest']} "
        f"objects | avatars rows: {st['rows_avatar']} -> avatar/..., "
        f"{st['rows_image']} -> image/...")
    return st


def sample_rows(box: Box, prefix: str, n: int = 2) -> list[str]:
    return [r[0] for r in query(box, "SELECT path FROM avatars WHERE path LIKE %s "
                                     "ORDER BY id LIMIT %s", (prefix + "%", n))]


# ---------------------------------------------------------------- running the real tools


def start(box: Box, script: str, *args: str) -> subprocess.Popen:
    """Run a real script from .demo/; stderr (progress, log lines) goes straight to
    the terminal, stdout is echoed by finish() and kept."""
    print(f"\n   $ python3 {' '.join([script, *map(shlex.quote, args)])}", flush=True)
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=DEMO,
                            env=box.env, stdout=subprocess.PIPE, text=True, bufsize=1)
    CHILDREN.append(proc)
    return proc


def fold(text: str, width: int = 96) -> list[str]:
    """A JSON summary is one long line: fold it between its fields for the terminal."""
    try:
        fields = json.loads(text) if text.startswith("{") else None
    except ValueError:
        fields = None
    if not isinstance(fields, dict) or len(text) <= width:
        return [text]
    lines, line = [], "{"
    for i, (k, v) in enumerate(fields.items()):
        item = f"{json.dumps(k)}: {json.dumps(v)}" + ("}" if i == len(fields) - 1 else ",")
        if len(line) + len(item) + 1 > width and line.strip():
            lines.append(line)
            line = " "
        line += ("" if line in ("{", " ") else " ") + item
    return lines + [line]


def finish(proc: subprocess.Popen, expect: int) -> str:
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        for part in fold(line.rstrip("\n")):
            print("   | " + part, flush=True)
    code = proc.wait()
    say(bold(f"exit code {code} ({MEANING.get(code, '?')})"))
    if code != expect:
        raise DemoError(f"expected exit code {expect}, got {code}")
    return "".join(lines)


def run(box: Box, script: str, *args: str, expect: int = 0) -> str:
    return finish(start(box, script, *args), expect)


def summary(out: str) -> dict:
    try:
        return parse_summary(out)
    except SandboxError as exc:
        raise DemoError(str(exc)) from None


def expect_figure(result: dict, key: str, want: int) -> None:
    if result.get(key) != want:
        raise DemoError(f"expected {key} = {want}, the JSON summary says {result.get(key)}")


# ---------------------------------------------------------------- the tour


def tour(box: Box) -> None:
    header(f"1. seed {SEED} avatars",
           f"seed/seeder.py uploads {SEED} PNGs to s3://{SOURCE}/image/ and inserts one "
           "avatars row per file.")
    run(box, "seed/seeder.py", str(SEED))
    say(f"a few rows: {', '.join(sample_rows(box, 'image/'))}")
    show_state(box)

    header("2. migrate them",
           f"move.py copies each object server-side to s3://{DEST}/avatar/, then rewrites",
           "its rows (compare-and-set). There is no index on avatars.path, so it uses the",
           "'snapshot' row plan: one table scan, then each row is reached by its TID.")
    run(box, "move.py")
    say(f"the same rows now: {', '.join(sample_rows(box, 'avatar/'))}")
    before = show_state(box)
    if before["dest"] != SEED or before["rows_avatar"] != SEED:
        raise DemoError(f"expected {SEED} objects and rows moved, see the state above")

    header(f"3. seed {SEED} more", "New users keep uploading to the old place meanwhile.")
    run(box, "seed/seeder.py", str(SEED))
    show_state(box)

    half = before["dest"] + SEED // 2
    header("4. migrate again, and interrupt it halfway (like Ctrl-C)",
           f"The demo sends SIGINT once {half - before['dest']} of the {SEED} new objects "
           "are in the destination.",
           "move.py stops taking work, finishes the copies in flight, writes their rows,",
           "prints its summary and exits 130. (--workers 4 only slows it down enough to "
           "watch.)",
           "From here on the runs add --json: the same summary as one JSON object, which "
           "is what scripts read.")
    proc = start(box, "move.py", "--json", "--workers", "4")
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if count_keys(box, DEST, "avatar/") >= half:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    else:
        proc.kill()
        finish(proc, proc.wait())
        raise DemoError("the run finished (or hung) before it could be interrupted halfway")
    interrupted = summary(finish(proc, expect=130))
    if not interrupted.get("interrupted"):
        raise DemoError("the JSON summary of the interrupted run says interrupted: false")
    mid = show_state(box)
    say("Every row that points at avatar/ has its object there; the others still point "
        "at image/, which exists.")

    header("5. run it again: it resumes",
           "Objects already copied are recognized by listing (same size and ETag) and "
           "skipped;", "only the rest is copied.")
    resumed = summary(run(box, "move.py", "--json"))
    expect_figure(resumed, "copied", 2 * SEED - mid["dest"])
    say(bold(f"resumed: {interrupted['copied']} copied before the interrupt, "
             f"{resumed['copied']} now, {resumed.get('skipped')} skipped"))
    show_state(box)

    header("6. verify",
           "Read-only: every source PNG has an identical copy, no row still points at a",
           "source, and every avatar/ row points at an object that exists. Exit 0 = clean.")
    run(box, "move.py", "--verify")

    header("7. dry run: nothing left to do",
           "--dry-run changes nothing and prints the plan; after a finished migration every",
           "object is skipped (done) and there is nothing to copy.")
    dry = summary(run(box, "move.py", "--dry-run", "--json"))
    expect_figure(dry, "copied", 0)
    expect_figure(dry, "skipped", 2 * SEED)


def main() -> int:
    started = time.monotonic()
    print(bold("move.py demo") + f": a throwaway sandbox under {DEMO.relative_to(ROOT)}/, "
          "nothing leaves 127.0.0.1.")
    header("0. start PostgreSQL and S3 on 127.0.0.1")
    box = Box()

    def on_term(_signum, _frame):  # kill <demo>: clean up like Ctrl-C
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    code = 0
    try:
        box.start()
        tour(box)
        header("done", f"in {time.monotonic() - started:.0f}s. Next: read README.md, "
               "then `make test`.")
    except SandboxError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("\ndemo: interrupted; stopping the sandbox", file=sys.stderr)
        code = 130
    except DemoError as exc:
        print(f"\ndemo: FAILED: {exc}", file=sys.stderr)
        code = 1
    finally:
        # A Ctrl-C reached our children too; let them write their summaries
        # before the servers they talk to go away.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        wait_children()
        box.stop()
    return code


def wait_children() -> None:
    for p in CHILDREN:
        if p.poll() is None:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


if __name__ == "__main__":
    sys.exit(main())
