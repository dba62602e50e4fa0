"""One run at a time per piece of work (avatarmove/lock.py), on a real PostgreSQL.

A second run of the same migration stops before copying anything and names the
first; shards of one migration run side by side; --dry-run and --verify take no
lock; a run that lost its connection takes its lock again, or stops if another
run took it meanwhile. Runs are caught mid-way by holding a row they must
rewrite (conftest.row_locked), never by timing.
"""
from __future__ import annotations

import contextlib
import threading
import uuid
from pathlib import Path

import psycopg2
import pytest
from psycopg2.extensions import make_dsn

from avatarmove.database import Database
from avatarmove.lock import wanted
from avatarmove.settings import Settings
from conftest import Bg
from conftest import (DEST, PNG, SOURCE, assert_consistent, insert_rows, journal_exists, keys,
                      moto_backend, new_key_held, put, row_locked, rows, run_backends,
                      wait_until)

OTHER_RUN = ("20990101T000000Z-feed01", "4242", "otherhost")


def app_name(run_id: str, pid: str, host: str) -> str:
    return f"move.py {run_id} {pid}@{host}"


def holder_named(err: str, run_id: str, pid: str, host: str) -> bool:
    return f"run {run_id}, pid {pid} on host {host}, since " in err


def migration_locks(conn, dsn: str, shard: tuple[int, int] | None = None):
    """The locks a run of these settings takes: (key, shared) each."""
    cfg = Settings(db=dsn, source_bucket=SOURCE, dest_bucket=DEST, source_prefix="image/",
                   dest_prefix="avatar/", table="avatars", column="path", shard=shard)
    with conn.cursor() as cur:
        cur.execute("SELECT 'avatars'::regclass::oid")
        return wanted(Database(cfg, "test"), cur.fetchone()[0])


@contextlib.contextmanager
def held_by_another_run(conn, dsn: str, run=OTHER_RUN, user: str | None = None):
    """A session holding the migration's lock as a run would, named as a run names itself."""
    other = psycopg2.connect(make_dsn(dsn, application_name=app_name(*run),
                                      **({"user": user} if user else {})))
    other.autocommit = True
    with other.cursor() as cur:
        for key, shared in migration_locks(conn, dsn):
            cur.execute("SELECT pg_advisory_lock_shared(%s)" if shared
                        else "SELECT pg_advisory_lock(%s)", (key,))
    try:
        yield
    finally:
        other.close()


def seed(conn, n: int) -> list[str]:
    """n source objects (straight into moto, no HTTP) and a row for each."""
    names = [f"image/u{i:04d}.png" for i in range(n)]
    backend = moto_backend()
    for k in names:
        backend.put_object(SOURCE, k, PNG + k.encode())
    with conn.cursor() as cur:
        cur.execute("INSERT INTO avatars (path) SELECT unnest(%s::text[])", (names,))
    return names


def moved(names: list[str]) -> list[str]:
    return ["avatar/" + k[len("image/"):] for k in names]


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- in-process


def test_a_second_run_stops_before_copying_and_names_the_first(run, s3, db, dsn, capsys,
                                                               copy_requests):
    put(s3, "image/a.png")
    insert_rows(db, ["image/a.png"])
    with held_by_another_run(db, dsn):
        assert run() == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith("move.py: error: another move.py run is already working on "
                          "avatars.path (image/ -> avatar/): "), err
    assert holder_named(err, *OTHER_RUN), err
    assert copy_requests == [] and keys(s3, DEST) == []
    assert not journal_exists(db) and rows(db) == ["image/a.png"]


def test_holder_in_sessions_the_role_may_not_see_is_named_as_far_as_visible(run, s3, db, dsn,
                                                                            capsys):
    """A role sees little of other roles' sessions in pg_stat_activity (no start
    time): what it cannot see is "unknown", and it still stops."""
    put(s3, "image/a.png")
    insert_rows(db, ["image/a.png"])
    runner, holder = (f"lock_{who}_{uuid.uuid4().hex[:8]}" for who in ("runner", "holder"))
    with db.cursor() as cur:  # roles are cluster-wide: unique names, dropped after
        cur.execute(f"CREATE ROLE {runner} LOGIN; CREATE ROLE {holder} LOGIN; "
                    f"GRANT SELECT, UPDATE ON avatars TO {runner}; "
                    f"GRANT CREATE ON SCHEMA public TO {runner}")
    try:
        with held_by_another_run(db, dsn, user=holder):
            assert run("--db", make_dsn(dsn, user=runner)) == 2
    finally:
        with db.cursor() as cur:
            cur.execute(f"DROP OWNED BY {runner}; DROP ROLE {runner}; DROP ROLE {holder}")
    err = one_line(capsys.readouterr().err)
    assert "since unknown" in err and keys(s3, DEST) == []


def test_dry_run_and_verify_take_no_lock(run, s3, db, dsn, capsys, copy_requests):
    names = [f"image/{c}.png" for c in "abc"]
    for k in names:
        put(s3, k, PNG + k.encode())
    insert_rows(db, names)
    assert run() == 0
    with held_by_another_run(db, dsn):
        assert run("--dry-run") == 0
        assert run("--verify") == 0
        assert run() == 2  # the lock is really held: a real run stops
    assert len(copy_requests) == len(names)
    assert rows(db) == moved(names)


def test_rollback_takes_the_lock_too(run, s3, db, dsn, capsys):
    names = [f"image/{c}.png" for c in "ab"]
    for k in names:
        put(s3, k, PNG + k.encode())
    insert_rows(db, names)
    assert run() == 0
    capsys.readouterr()
    with held_by_another_run(db, dsn):
        assert run("--rollback", "latest") == 2
        assert holder_named(one_line(capsys.readouterr().err), *OTHER_RUN)
        assert rows(db) == moved(names)
    assert run("--rollback", "latest") == 0
    assert rows(db) == names


# --------------------------------------------------------------------------- subprocesses


def background(tmp_path: Path, dsn: str, *args: str) -> Bg:
    """move.py --json as a subprocess (stdout is the summary), output to files."""
    return Bg(tmp_path, dsn, "--quiet", "--engine", "boto3", *args)


def running_run(conn) -> tuple[int, tuple[str, str, str]]:
    """(backend pid, (run id, pid, host)) of the one run holding its lock."""
    with conn.cursor() as cur:
        cur.execute("SELECT pid, application_name FROM pg_stat_activity "
                    "WHERE datname = current_database() AND application_name LIKE 'move.py %'")
        (backend, app), = cur.fetchall()
    run_id, rest = app.split(" ", 2)[1:]
    pid, host = rest.split("@", 1)
    return backend, (run_id, pid, host)


@pytest.fixture
def client(endpoint):
    import move
    return move.make_s3_client()


N = 200
RUN = ("--workers", "2", "--batch-size", "20")


def test_two_runs_at_once_copy_each_object_once(db, dsn, client, tmp_path, copy_requests):
    names = seed(db, N)
    with row_locked(dsn, names[0]):  # the first run waits in its first batch
        first = background(tmp_path, dsn, *RUN)
        wait_until(lambda: run_backends(db, waiting=True), "the first run waits", first.alive)
        _, holder = running_run(db)
        second = background(tmp_path, dsn, *RUN)
        assert second.wait() == 2
        assert holder[1] == str(first.proc.pid)
        assert holder_named(one_line(second.err), *holder), second.err
        assert first.alive()
    assert first.wait() == 0, first.err
    assert first.summary["copied"] == N
    assert len(copy_requests) == N, "some object was copied twice"
    assert len(keys(client, DEST)) == N and rows(db) == moved(names)


def test_shards_run_side_by_side_but_not_beside_a_run_of_the_whole(db, dsn, client, tmp_path,
                                                                  copy_requests):
    names = seed(db, N)
    # the shard holding this key waits in its first batch
    with new_key_held(dsn, names[0], "avatar/" + names[0].split("/", 1)[1]):
        shards = [background(tmp_path, dsn, *RUN, "--shard", f"{i}/2") for i in range(2)]
        wait_until(lambda: not all(s.alive() for s in shards), "one shard finishes")
        done = next(s for s in shards if not s.alive())
        waiting = next(s for s in shards if s.alive())
        wait_until(lambda: run_backends(db, waiting=True), "the other shard waits",
                   waiting.alive)
        assert done.wait() == 0, done.err  # it ran beside the other, which holds its lock
        shard = "0/2" if waiting is shards[0] else "1/2"
        _, holder = running_run(db)
        whole = background(tmp_path, dsn, *RUN)
        same_shard = background(tmp_path, dsn, *RUN, "--shard", shard)
        for other in (whole, same_shard):
            assert other.wait() == 2
            assert holder_named(one_line(other.err), *holder), other.err
        assert waiting.alive()
    assert waiting.wait() == 0, waiting.err
    assert done.summary["copied"] + waiting.summary["copied"] == N
    assert len(copy_requests) == N
    assert rows(db) == moved(names)


THIEF = ("20990101T000000Z-cafe01", "777", "thief")


def test_run_that_lost_its_lock_to_another_run_stops(db, dsn, client, tmp_path):
    names = seed(db, 40)
    with row_locked(dsn, names[0]):
        run = background(tmp_path, dsn, "--workers", "1", "--batch-size", "5")
        wait_until(lambda: run_backends(db, waiting=True), "the run waits", run.alive)
        backend, _ = running_run(db)
        # Another run queues for the lock; it gets it the moment the run's session ends.
        (key, _), = migration_locks(db, dsn)
        thief = psycopg2.connect(make_dsn(dsn, application_name=app_name(*THIEF)))
        thief.autocommit = True
        took = threading.Thread(target=lambda: thief.cursor().execute(
            "SELECT pg_advisory_lock(%s)", (key,)))
        took.start()
        try:
            wait_until(lambda: waiting_for_lock(db, app_name(*THIEF)), "the other run queues")
            with db.cursor() as cur:
                cur.execute("SELECT pg_terminate_backend(%s)", (backend,))
            took.join(60)
            assert run.wait() == 1
        finally:
            thief.close()
    err = run.err
    assert "rerun to resume" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("move.py: error: lost the connection to the database, and with it "
                           "the lock"), err
    assert holder_named(last, *THIEF), err
    assert assert_consistent(db, client, names) < len(names)


def waiting_for_lock(conn, application_name: str) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_stat_activity WHERE application_name = %s "
                    "AND wait_event_type = 'Lock'", (application_name,))
        return cur.fetchone() is not None


def test_run_that_lost_its_connection_takes_its_lock_again_and_finishes(db, dsn, client,
                                                                        tmp_path, copy_requests):
    names = seed(db, 40)
    with row_locked(dsn, names[0]):
        run = background(tmp_path, dsn, "--workers", "1", "--batch-size", "5")
        wait_until(lambda: run_backends(db, waiting=True), "the run waits", run.alive)
        backend, _ = running_run(db)
        with db.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (backend,))
        # Back, with its lock, at the same batch: waiting on the same row again.
        wait_until(lambda: [b for b in run_backends(db, waiting=True) if b != backend],
                   "the run reconnects", run.alive)
        new_backend, _ = running_run(db)
        with db.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                        "AND granted AND pid = %s", (new_backend,))
            assert cur.fetchone()[0] == 1
    assert run.wait() == 0, run.err
    assert len(copy_requests) == len(names)
    assert rows(db) == moved(names)
