#!/usr/bin/env python3
"""A guided tour of move.py against a throwaway sandbox: `make demo`.

Starts a real PostgreSQL (pgserver, embedded) and an S3 server (moto) on
127.0.0.1, seeds avatars with the real seed/seeder.py, then runs the real
move.py: a full run, an interrupted run, the resume, --verify and --dry-run.
Nothing touches your AWS account or your databases: every AWS_*/DB_*/S3_*
variable of yours is replaced, and everything written stays under .demo/.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
SOURCE, DEST = "legacy-s3", "production-s3"
SEED = 500

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


# ---------------------------------------------------------------- the sandbox


class Sandbox:
    """PostgreSQL and S3 on loopback, and the environment the children run with."""

    def __init__(self) -> None:
        self.pg = None
        self.moto = None
        self.env: dict[str, str] = {}
        self.dsn = ""

    def start(self) -> None:
        DEMO.mkdir(exist_ok=True)
        # pgserver keeps a lock file and, for long paths, its socket in the
        # "user runtime dir": keep those under .demo/ too.
        run_dir = DEMO / "run"
        run_dir.mkdir(exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(run_dir)
        import warnings
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pgserver
        import psycopg2
        from psycopg2.extensions import make_dsn

        started = time.monotonic()
        # 'stop': the server stops when this process lets go; its data stays in
        # .demo/pg, and a fresh database is made for every demo run.
        self.pg = pgserver.get_server(DEMO / "pg", cleanup_mode="stop")
        admin_dsn = self.pg.get_uri()
        admin = psycopg2.connect(admin_dsn)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("DROP DATABASE IF EXISTS demo WITH (FORCE)")
            cur.execute("CREATE DATABASE demo")
        admin.close()
        self.dsn = make_dsn(admin_dsn, dbname="demo")
        say(f"PostgreSQL   {self.dsn}  (data in .demo/pg)")

        import logging
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        from moto.server import ThreadedMotoServer
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        host, port = self.moto.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        say(f"S3 (moto)    {endpoint}  (in memory; buckets {SOURCE} and {DEST})")

        # The children get a clean, fake environment: none of the caller's
        # AWS_*, DB_* or S3_* settings, no ~/.aws files.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "DB_", "S3_"))}
        env.update({
            "AWS_ACCESS_KEY_ID": "demo",
            "AWS_SECRET_ACCESS_KEY": "demo-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_CONFIG_FILE": str(DEMO / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(DEMO / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "DB_CONN_STRING": self.dsn,
            "S3_SOURCE_BUCKET_NAME": SOURCE,
            "S3_DEST_BUCKET_NAME": DEST,
            "S3_OBJECT_SOURCE_PREFIX": "image",
            "S3_OBJECT_DEST_PREFIX": "avatar",
            "DB_TABLE": "avatars",
            "DB_PATH_COLUMN": "path",
            "PYTHONUNBUFFERED": "1",
        })
        self.env = env
        say(f"ready in {time.monotonic() - started:.1f}s")

    def s3(self):
        import boto3
        from botocore.config import Config
        return boto3.session.Session(
            aws_access_key_id="demo", aws_secret_access_key="demo-secret",
            region_name="us-east-1").client(
                "s3", endpoint_url=self.env["AWS_ENDPOINT_URL"],
                config=Config(retries={"mode": "standard", "max_attempts": 3}))

    def stop(self) -> None:
        if self.moto is not None:
            try:
                self.moto.stop()
            except Exception as exc:  # noqa: BLE001 - best effort on the way out
                print(f"demo: stopping moto: {exc}", file=sys.stderr)
            self.moto = None
        if self.pg is not None:
            try:
                self.pg.cleanup()
            except Exception as exc:  # noqa: BLE001
                print(f"demo: stopping PostgreSQL: {exc}", file=sys.stderr)
            self.pg = None


# ---------------------------------------------------------------- looking at the state


def count_keys(s3, bucket: str, prefix: str) -> int:
    n = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        n += page.get("KeyCount", 0)
    return n


def state(box: Sandbox, s3) -> dict[str, int]:
    import psycopg2
    with psycopg2.connect(box.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('avatars') IS NOT NULL")
        if cur.fetchone()[0]:
            cur.execute("SELECT count(*) FILTER (WHERE path LIKE 'image/%'), "
                        "count(*) FILTER (WHERE path LIKE 'avatar/%') FROM avatars")
            rows_image, rows_avatar = cur.fetchone()
        else:
            rows_image = rows_avatar = 0
    conn.close()
    return {"src": count_keys(s3, SOURCE, "image/"), "dest": count_keys(s3, DEST, "avatar/"),
            "rows_image": rows_image, "rows_avatar": rows_avatar}


def show_state(box: Sandbox, s3) -> dict[str, int]:
    st = state(box, s3)
    say(f"now: s3://{SOURCE}/image/ {st['src']} objects | s3://{DEST}/avatar/ {st['dest']} "
        f"objects | avatars rows: {st['rows_avatar']} -> avatar/..., "
        f"{st['rows_image']} -> image/...")
    return st


def sample_rows(box: Sandbox, prefix: str, n: int = 2) -> list[str]:
    import psycopg2
    with psycopg2.connect(box.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT path FROM avatars WHERE path LIKE %s ORDER BY id LIMIT %s",
                    (prefix + "%", n))
        out = [r[0] for r in cur.fetchall()]
    conn.close()
    return out


# ---------------------------------------------------------------- running the real tools


class Run:
    def __init__(self, code: int, out: str):
        self.code, self.out = code, out

    def number(self, label: str) -> int:
        m = re.search(rf"^\s*{re.escape(label)}\s+(\d+)\s*$", self.out, re.M)
        if not m:
            raise DemoError(f"no {label!r} line in the summary")
        return int(m.group(1))


def start(box: Sandbox, script: str, *args: str) -> subprocess.Popen:
    """Run a real script from .demo/ (so a .env in the repo is never read).

    stderr (progress bar, log lines) goes straight to the terminal; stdout (the
    summary) is echoed line by line and kept, to check the numbers.
    """
    print(f"\n   $ python3 {' '.join([script, *map(shlex.quote, args)])}", flush=True)
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=DEMO,
                            env=box.env, stdout=subprocess.PIPE, text=True, bufsize=1)
    CHILDREN.append(proc)
    return proc


def finish(proc: subprocess.Popen, expect: int) -> Run:
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        print("   | " + line.rstrip("\n"), flush=True)
        lines.append(line)
    code = proc.wait()
    meaning = {0: "done", 1: "some objects failed or conflicted: rerun", 2: "bad input",
               130: "interrupted: rerun to resume"}.get(code, "?")
    say(bold(f"exit code {code} ({meaning})"))
    if code != expect:
        raise DemoError(f"expected exit code {expect}, got {code}")
    return Run(code, "".join(lines))


def run(box: Sandbox, script: str, *args: str, expect: int = 0) -> Run:
    return finish(start(box, script, *args), expect)


# ---------------------------------------------------------------- the tour


def tour(box: Sandbox) -> None:
    s3 = box.s3()

    header(f"1. seed {SEED} avatars",
           f"seed/seeder.py uploads {SEED} PNGs to s3://{SOURCE}/image/ and inserts one "
           "avatars row per file.")
    run(box, "seed/seeder.py", str(SEED))
    say(f"a few rows: {', '.join(sample_rows(box, 'image/'))}")
    show_state(box, s3)

    header("2. migrate them",
           f"move.py copies each object server-side to s3://{DEST}/avatar/, then rewrites",
           "its rows (compare-and-set). There is no index on avatars.path, so it uses the",
           "'snapshot' row plan: one table scan, then each row is reached by its TID.")
    first = run(box, "move.py")
    if first.number("copied") != SEED:
        raise DemoError(f"expected {SEED} copies, the summary says {first.number('copied')}")
    say(f"the same rows now: {', '.join(sample_rows(box, 'avatar/'))}")
    before = show_state(box, s3)

    header(f"3. seed {SEED} more", "New users keep uploading to the old place meanwhile.")
    run(box, "seed/seeder.py", str(SEED))
    show_state(box, s3)

    half = before["dest"] + SEED // 2
    header("4. migrate again, and interrupt it halfway (like Ctrl-C)",
           f"The demo sends SIGINT once {half - before['dest']} of the {SEED} new objects "
           "are in the destination.",
           "move.py stops taking work, finishes the copies in flight, writes their rows,",
           "prints its summary and exits 130. (--workers 4 only slows it down enough to "
           "watch.)")
    proc = start(box, "move.py", "--workers", "4")
    deadline = time.monotonic() + 120
    sent = False
    while proc.poll() is None and time.monotonic() < deadline:
        if count_keys(s3, DEST, "avatar/") >= half:
            proc.send_signal(signal.SIGINT)
            sent = True
            break
        time.sleep(0.05)
    if not sent:
        proc.kill()
        finish(proc, proc.wait())
        raise DemoError("the run finished (or hung) before it could be interrupted halfway")
    interrupted = finish(proc, expect=130)
    mid = show_state(box, s3)
    say("Every row that points at avatar/ has its object there; the others still point "
        "at image/, which exists.")

    header("5. run it again: it resumes",
           "Objects already copied are recognized by listing (same size and ETag) and "
           "skipped;", "only the rest is copied.")
    resumed = run(box, "move.py")
    rest = 2 * SEED - mid["dest"]
    if resumed.number("copied") != rest:
        raise DemoError(f"expected the resume to copy {rest}, it copied "
                        f"{resumed.number('copied')}")
    say(bold(f"resumed: {interrupted.number('copied')} copied before the interrupt, "
             f"{resumed.number('copied')} now, {resumed.number('skipped (done)')} skipped"))
    show_state(box, s3)

    header("6. verify",
           "Read-only: every source PNG has an identical copy, no row still points at a",
           "source, and every avatar/ row points at an object that exists. Exit 0 = clean.")
    run(box, "move.py", "--verify")

    header("7. dry run: nothing left to do",
           "--dry-run changes nothing and prints the plan; after a finished migration it is",
           "all 'skipped (done)'.")
    dry = run(box, "move.py", "--dry-run")
    if dry.number("to copy") != 0:
        raise DemoError("the dry run still has objects to copy")


def main() -> int:
    started = time.monotonic()
    print(bold("move.py demo") + f": a throwaway sandbox under {DEMO.relative_to(ROOT)}/, "
          "nothing leaves 127.0.0.1.")
    header("0. start PostgreSQL and S3 on 127.0.0.1")
    box = Sandbox()

    def on_term(_signum, _frame):  # kill <demo>: clean up like Ctrl-C
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    code = 0
    try:
        box.start()
        tour(box)
        header("done", f"in {time.monotonic() - started:.0f}s. Next: read README.md, "
               "then `make test`.")
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
