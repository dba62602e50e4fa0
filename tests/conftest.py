"""Stacked fixtures: credentials, then buckets, then filled buckets; a real
PostgreSQL (embedded pgserver, or TEST_DATABASE_URL) with a fresh database per
test; moto in-process for unit tests and as a threaded HTTP server for runs of
move.py as a subprocess. The servers and the children's environment come from
devtools/sandbox.py, as for the demo and the bench.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql
from psycopg2.extensions import make_dsn, parse_dsn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import move  # noqa: E402
from devtools.sandbox import (SandboxError, child_env, move_argv, start_moto,  # noqa: E402
                              start_postgres)

SOURCE, DEST = "legacy-s3", "production-s3"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24  # enough of a PNG for S3's purposes


def pytest_collection_modifyitems(config, items):
    """A test that needs moto's HTTP server runs move.py end to end (a subprocess, or
    real HTTP to the CRT): it is slow whether or not its author marked it, and
    `make check` (-m "not slow") must stay under a minute as tests are added."""
    for item in items:
        if "moto_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


# ---------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def pg():
    """The session's PostgreSQL (devtools.sandbox.Postgres): TEST_DATABASE_URL when
    set, else an embedded one. One that cannot start fails each test that needs it
    with the sandbox's one line (what failed, what to do), not a traceback."""
    try:
        server = start_postgres()
    except SandboxError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_server_dsn(pg):
    """The admin DSN of the session's PostgreSQL."""
    return pg.dsn


class Databases:
    """Fresh databases made ahead, and used ones dropped behind, on a thread of their
    own: CREATE and DROP DATABASE cost PostgreSQL a few tenths of a second each,
    which then overlap with the tests (the other core) instead of adding to them."""

    def __init__(self, pg, ahead: int = 3):
        self.pg = pg
        self.ready: queue.Queue = queue.Queue(maxsize=ahead)  # DSNs, or the error making one
        self.used: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._work, name="databases", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while not self.stopping.is_set():
            if not self.ready.full():  # a test may be waiting: making comes first
                try:
                    self.ready.put(self.pg.new_database())
                except Exception as exc:  # noqa: BLE001 - handed to the test that takes it
                    self.ready.put(exc)
                    self.stopping.wait(1)
                continue
            try:
                self._drop(self.used.get(timeout=0.05))
            except queue.Empty:
                pass

    def _drop(self, url: str) -> None:
        try:
            self.pg.drop_database(url)
        except Exception:  # noqa: BLE001 - the server's own cleanup drops what is left
            pass

    def take(self) -> str:
        got = self.ready.get(timeout=120)
        if isinstance(got, Exception):
            raise got
        return got

    def give_back(self, url: str) -> None:
        self.used.put(url)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=60)
        for q in (self.used, self.ready):
            while not q.empty():
                got = q.get_nowait()
                if isinstance(got, str):
                    self._drop(got)


@pytest.fixture(scope="session")
def databases(pg):
    pool = Databases(pg)
    yield pool
    pool.close()


@pytest.fixture
def dsn(databases):
    """A fresh, empty database for one test, dropped afterwards."""
    url = databases.take()
    yield url
    databases.give_back(url)


@pytest.fixture
def db(dsn):
    """A connection to the test database with the seeder's schema."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE avatars (id SERIAL PRIMARY KEY, path VARCHAR)")
    yield conn
    conn.close()


def rows(conn, table="avatars", column="path") -> list[str]:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT {} FROM {} ORDER BY id").format(
            sql.Identifier(column), sql.Identifier(table)))
        return [r[0] for r in cur.fetchall()]


def insert_rows(conn, paths, table="avatars", column="path") -> None:
    with conn.cursor() as cur:
        for p in paths:
            cur.execute(sql.SQL("INSERT INTO {} ({}) VALUES (%s)").format(
                sql.Identifier(table), sql.Identifier(column)), (p,))


# ---------------------------------------------------------------- PgBouncer


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def pgbouncer(dsn):
    """start(pool_mode) -> a DSN to the test database through a real PgBouncer (the
    Debian package's binary) on 127.0.0.1, in that pool mode; stopped afterwards."""
    import pwd
    import shutil
    binary = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if binary is None and not os.environ.get("CI"):
        pytest.fail("pgbouncer is not installed: apt-get install -y pgbouncer "
                    "(.ci/run installs it)", pytrace=False)
    assert binary, "pgbouncer is not installed: .ci/run installs it (apt-get install pgbouncer)"
    procs, dirs = [], []
    params = parse_dsn(dsn)

    def start(pool_mode: str) -> str:
        import tempfile
        port = free_port()
        # not under pytest's tmp_path: PgBouncer may run as another user (below)
        work = Path(tempfile.mkdtemp(prefix="pgbouncer", dir="/tmp"))
        dirs.append(work)
        work.chmod(0o777)
        server = " ".join(f"{k}={params[k]}" for k in ("host", "port", "user", "password")
                          if params.get(k))
        (work / "users.txt").write_text(f'"{params.get("user", "postgres")}" ""\n')
        (work / "pgbouncer.ini").write_text(f"""[databases]
{params["dbname"]} = {server} dbname={params["dbname"]}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {work / "users.txt"}
pool_mode = {pool_mode}
default_pool_size = 4
logfile = {work / "pgbouncer.log"}
""")
        argv = [binary, str(work / "pgbouncer.ini")]
        host = params.get("host", "")
        if os.geteuid() == 0:
            # PgBouncer will not run as root: as the owner of the server's socket directory
            owner = os.stat(host).st_uid if host.startswith("/") else 65534
            argv[1:1] = ["-u", pwd.getpwuid(owner).pw_name]
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
        url = psycopg2.extensions.make_dsn(host="127.0.0.1", port=port, dbname=params["dbname"],
                                           user=params.get("user", "postgres"))
        deadline = time.monotonic() + 20
        while True:
            try:
                psycopg2.connect(url, connect_timeout=2).close()
                return url
            except psycopg2.OperationalError:
                if procs[-1].poll() is not None or time.monotonic() > deadline:
                    log = work / "pgbouncer.log"
                    pytest.fail(f"pgbouncer did not start: {procs[-1].stderr.read()[:500]} "
                                f"{log.read_text()[-500:] if log.exists() else ''}")
                time.sleep(0.1)
    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)
    for work in dirs:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- S3


def fake_aws_env(mp: pytest.MonkeyPatch) -> None:
    """This process's environment as sandbox.child_env() makes a child's: fake
    credentials, nothing from the machine's own AWS setup, and none of move.py's
    settings (DB_*, S3_*) from the caller's environment."""
    env = child_env()
    for name in list(os.environ):
        if name not in env:
            mp.delenv(name)
    for name, value in env.items():
        mp.setenv(name, value)


@pytest.fixture
def aws_credentials(monkeypatch):
    fake_aws_env(monkeypatch)


@pytest.fixture
def s3(aws_credentials):
    """In-process moto with both buckets."""
    from moto import mock_aws

    with mock_aws():
        client = move.make_s3_client()
        client.create_bucket(Bucket=SOURCE)
        client.create_bucket(Bucket=DEST)
        yield client


def put(client, key, body=PNG, bucket=SOURCE, **extra):
    client.put_object(Bucket=bucket, Key=key, Body=body, **extra)


def keys(client, bucket=DEST, prefix="") -> list[str]:
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", ())]
    return out


def listing(client, bucket: str) -> dict[str, str]:
    """key -> ETag, as S3 lists it."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out.update({o["Key"]: o["ETag"] for o in page.get("Contents", ())})
    return out


def body(client, key: str, bucket: str = DEST) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def moto_backend():
    """moto's S3 backend, in-process (mock_aws) or behind the threaded server
    (same process as pytest): for seeding thousands of keys without HTTP."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    return s3_backends[DEFAULT_ACCOUNT_ID]["aws"]


def summary(out: str) -> dict:
    """The summary of a run made with --json: stdout is exactly one JSON object.

    Tests read the numbers from here, never from the text a person reads (that
    rendering is tested once, in test_report.py), so a relabelled or realigned
    line breaks no test that is about what a run did."""
    lines = out.splitlines()
    assert len(lines) == 1, f"expected one JSON line on stdout, got:\n{out}"
    return json.loads(lines[0])


def journal_exists(conn) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('avatars_move_journal')")
        return cur.fetchone()[0] is not None


@pytest.fixture
def run(s3, dsn, monkeypatch, tmp_path):
    """move.main() in-process against moto and the test database, with --json
    (as_json=False: the text a person reads): read what a migration did with
    summary(capsys.readouterr().out)."""
    monkeypatch.chdir(tmp_path)  # no stray .env

    def _run(*args: str, as_json: bool = True) -> int:
        # mock_aws patches botocore; the CRT engine would bypass it.
        return move.main(["--db", dsn, "--quiet", "--engine", "boto3",
                          *(["--json"] if as_json else []), *args])
    return _run


# ---------------------------------------------------------------- subprocess runs


@pytest.fixture(scope="session")
def moto():
    """moto's threaded HTTP server on loopback (devtools.sandbox.MotoServer)."""
    try:
        server = start_moto()
    except SandboxError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_server(moto):
    """The URL of moto's HTTP server, for move.py run as a subprocess."""
    return moto.endpoint


@pytest.fixture
def endpoint(moto, moto_server, aws_credentials, monkeypatch):
    """An empty moto server with both buckets; AWS_ENDPOINT_URL points at it."""
    moto.reset()
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    client = move.make_s3_client()
    client.create_bucket(Bucket=SOURCE)
    client.create_bucket(Bucket=DEST)
    return moto_server


@dataclass
class Proc:
    code: int
    out: str
    err: str


def subprocess_env(dsn: str | None, **extra: str) -> dict[str, str]:
    """A child's environment (sandbox.child_env: nothing from the machine's AWS,
    DB_* or S3_* settings), pointed at the S3 endpoint the test set up (the
    endpoint fixture's AWS_ENDPOINT_URL); `extra` overrides, e.g. a fault proxy."""
    return child_env(dsn, os.environ.get("AWS_ENDPOINT_URL"), **extra)


def move_cmd(*args: str) -> list[str]:
    return move_argv(*args)


@pytest.fixture
def cli(endpoint, dsn, tmp_path):
    """Run move.py (or the seeder) as a user would: a subprocess, real HTTP, real DB."""

    def _cli(*args: str, script: str = "move.py", env: dict | None = None,
             timeout: float = 120) -> Proc:
        p = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=tmp_path,
                           env=subprocess_env(dsn, **(env or {})), capture_output=True,
                           text=True, timeout=timeout)
        return Proc(p.returncode, p.stdout, p.stderr)
    return _cli


def dsn_password(dsn: str) -> str | None:
    return parse_dsn(dsn).get("password")


@pytest.fixture
def copy_requests(monkeypatch):
    """Every CopyObject moto serves, counted server-side: (source key, destination
    key) per request, from move.py in-process or as a subprocess through the HTTP
    server (which runs in this process). Patched on the class, so it survives
    moto's resets."""
    from moto.s3.models import S3Backend

    seen: list[tuple[str, str]] = []
    real = S3Backend.copy_object

    def copy_object(self, src_key, dest_bucket_name, dest_key_name, *args, **kwargs):
        seen.append((src_key.name, dest_key_name))
        return real(self, src_key, dest_bucket_name, dest_key_name, *args, **kwargs)
    monkeypatch.setattr(S3Backend, "copy_object", copy_object)
    return seen


# ---------------------------------------------------------------- a run caught mid-way


@contextlib.contextmanager
def row_locked(dsn: str, path: str):
    """Hold the table against writes (LOCK TABLE ... IN SHARE MODE, which reads pass):
    the run's batch that would rewrite `path` waits there, and keeps trying again while
    the rest of the run waits behind it, so a test finds the run mid-way without racing
    it. (A row held FOR UPDATE is skipped, not waited for: see test_locks.py.)"""
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute("LOCK TABLE avatars IN SHARE MODE")
    try:
        yield
    finally:
        conn.rollback()
        conn.close()


@contextlib.contextmanager
def new_key_held(dsn: str, path: str, new: str):
    """Make the rewrite of one key alone wait: a unique index on the path, and an open
    transaction that inserted the key's new path. The run's UPDATE waits for that
    transaction to end (a lock wait on that key, not on the table), gives up at its
    lock timeout and tries again, until the transaction ends (rolled back here)."""
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute("CREATE UNIQUE INDEX IF NOT EXISTS avatars_path_uniq ON avatars (path)")
        conn.commit()
        cur.execute("INSERT INTO avatars (path) VALUES (%s)", (new,))
    try:
        yield
    finally:
        conn.rollback()
        conn.close()


def wait_until(cond, what: str, alive=lambda: True, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert alive(), f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def run_backends(conn, waiting: bool = False) -> list[int]:
    """Backend pids of runs holding their lock (application_name "move.py <run> ...")."""
    with conn.cursor() as cur:
        cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name LIKE 'move.py %' "
                    + ("AND wait_event_type = 'Lock'" if waiting else ""))
        return [pid for (pid,) in cur.fetchall()]


def assert_consistent(conn, client, names: list[str]) -> int:
    """Every row points at an object that exists; returns rows rewritten."""
    dest, paths = set(keys(client, DEST)), rows(conn)
    assert [p.split("/", 1)[1] for p in paths] == [k.split("/", 1)[1] for k in names]
    assert all(p in dest for p in paths if p.startswith("avatar/"))
    return sum(p.startswith("avatar/") for p in paths)


class Bg:
    """move.py --json as a background subprocess, output to files (no pipe to fill):
    summary(bg.out) is what the run did."""

    def __init__(self, tmp_path: Path, dsn: str, *args: str, env: dict | None = None):
        n = len(list(tmp_path.glob("out*.txt")))
        self.out_path, self.err_path = tmp_path / f"out{n}.txt", tmp_path / f"err{n}.txt"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(move_cmd("--json", *args), cwd=tmp_path, stdout=out,
                                         stderr=err, env=subprocess_env(dsn, **(env or {})))

    def wait_until(self, cond, timeout: float = 60, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.proc.poll() is not None:
                pytest.fail(f"move.py ended (exit {self.proc.returncode}) before {what}:\n"
                            f"{self.out}\n{self.err}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.02)

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"move.py still running after {timeout}s:\n{self.out}\n{self.err}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def summary(self) -> dict:
        return summary(self.out)

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    @property
    def err(self) -> str:
        return self.err_path.read_text()


# ---------------------------------------------------------------- states and views shared by the
# dry-run, verify, rollback and report tests

OTHER = PNG + b"other content"


def journal(conn) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute("SELECT run_id, old_path, new_path, rows, rolled_back_at IS NOT NULL "
                    "FROM avatars_move_journal ORDER BY old_path, id")
        return cur.fetchall()


def table_exists(conn, name: str) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)", (name,))
        return cur.fetchone()[0] is not None





def snapshot(client, conn) -> tuple:
    """Everything a run could change: both buckets (key, ETag) and the table."""
    def listing(bucket):
        out = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            out += [(o["Key"], o["ETag"]) for o in page.get("Contents", ())]
        return out
    return listing(SOURCE), listing(DEST), rows(conn)


def fail_copy_of(monkeypatch, *failing: str) -> None:
    """The copy engine's CopyObject fails (as S3 answers a request it will never take:
    400 InvalidRequest, not retried) for the given source keys, works for the rest.
    Undo with monkeypatch.setattr(Boto3Engine, "copy", REAL_BOTO3_COPY)."""
    from botocore.exceptions import ClientError

    from avatarmove.copying import Boto3Engine
    real = Boto3Engine.copy

    def copy(self, src_bucket, src_key, dst_bucket, dst_key, storage_class=None):
        if src_key in failing:
            raise ClientError({"Error": {"Code": "InvalidRequest", "Message": "injected failure"},
                               "ResponseMetadata": {"HTTPStatusCode": 400}}, "CopyObject")
        return real(self, src_bucket, src_key, dst_bucket, dst_key, storage_class)
    monkeypatch.setattr(Boto3Engine, "copy", copy)


def mixed_state(s3, db) -> None:
    """3 to copy, 2 rows-only, 2 done, 1 conflict, 2 rows without objects, 1 row elsewhere.

    to copy:   c0 (1 row), c1 (2 rows), c2 (no row)
    rows only: r0, r1 (identical copy exists, 1 row each still on image/)
    done:      d0, d1 (identical copy exists, rows already on avatar/)
    conflict:  x (avatar/x.png differs; 1 row on image/)
    no object: rows image/gone0.png, image/gone1.png
    elsewhere: a row outside both prefixes, and a NULL
    plus a non-PNG under image/ that is never listed as a PNG
    """
    for k in ("c0", "c1", "c2", "r0", "r1", "d0", "d1", "x"):
        put(s3, f"image/{k}.png", PNG + k.encode())
    for k in ("r0", "r1", "d0", "d1"):
        put(s3, f"avatar/{k}.png", PNG + k.encode(), bucket=DEST)
    put(s3, "avatar/x.png", OTHER, bucket=DEST)
    put(s3, "image/readme.txt", b"not a png")
    insert_rows(db, ["image/c0.png", "image/c1.png", "image/c1.png", "image/r0.png",
                     "image/r1.png", "avatar/d0.png", "avatar/d1.png", "image/x.png",
                     "image/gone0.png", "image/gone1.png", "elsewhere/y.png", None])


def migrated(run, s3, db, capsys, names=("a", "b", "c"), paths=None) -> str:
    """Objects image/<name>.png, rows at `paths` (one per name by default), one
    successful run; returns its run id."""
    for n in names:
        put(s3, f"image/{n}.png", PNG + n.encode())
    insert_rows(db, [f"image/{n}.png" for n in names] if paths is None else paths)
    assert run() == 0
    return summary(capsys.readouterr().out)["run_id"]


@contextlib.contextmanager
def role_dsn(conn, dsn: str, *statements: str, name: str = "mover"):
    """A new login role for one test (roles are cluster-wide: a unique name, dropped
    after) and a DSN that logs in as it. `statements` run as the admin first, with
    {role} standing for the role's name: "GRANT SELECT, UPDATE ON avatars TO {role}"."""
    role = f"{name}_{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex  # for a TEST_DATABASE_URL server that asks for one
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(role)),
                    (password,))
        for statement in statements:
            cur.execute(statement.format(role=role))
    try:
        yield make_dsn(dsn, user=role, password=password), role
    finally:
        with conn.cursor() as cur:
            # A backend of the role that is still exiting drops its temp tables while
            # REASSIGN OWNED reads them ("could not open relation with OID").
            def gone():
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (role,))
                return cur.fetchone()[0] == 0
            wait_until(gone, f"the sessions of role {role} to end", timeout=30)
            cur.execute(sql.SQL("REASSIGN OWNED BY {0} TO current_user; DROP OWNED BY {0}; "
                                "DROP ROLE {0}").format(sql.Identifier(role)))
