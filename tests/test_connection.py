"""The run's session with PostgreSQL while the database blocks it: Ctrl-C works
within seconds and no backend keeps the run's lock, a run killed with kill -9 does
not leave its backend holding the lock, and timeouts are named as what they are.
move.py runs as a subprocess against moto's HTTP server; another session holds the
table ACCESS EXCLUSIVE, so every statement on it waits, as behind a long migration.
"""
from __future__ import annotations

import signal
import time

import psycopg2
from psycopg2.extensions import make_dsn

from conftest import Bg, insert_rows, put, rows, summary, wait_until


def seed_http(client, conn, n: int = 5) -> list[str]:
    names = [f"image/p{i:03d}.png" for i in range(n)]
    for k in names:
        put(client, k, b"\x89PNG" + k.encode())
    insert_rows(conn, names)
    return names


def run_lock_holders(conn) -> list[int]:
    """Backends holding an advisory lock (the run's one-run-at-a-time lock)."""
    with conn.cursor() as cur:
        cur.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted")
        return [pid for (pid,) in cur.fetchall()]


def waiting_runs(conn) -> list[int]:
    with conn.cursor() as cur:
        cur.execute("SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'move.py %' "
                    "AND wait_event_type = 'Lock'")
        return [pid for (pid,) in cur.fetchall()]


def table_locked(dsn: str):
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute("LOCK TABLE avatars IN ACCESS EXCLUSIVE MODE")
    return conn


def client_of(endpoint):
    import move
    return move.make_s3_client()


def test_ctrl_c_while_the_database_blocks_exits_in_seconds_and_frees_the_lock(
        db, dsn, endpoint, tmp_path):
    client = client_of(endpoint)
    names = seed_http(client, db)
    app = table_locked(dsn)
    try:
        run = Bg(tmp_path, dsn, "--engine", "boto3")
        run.wait_until(lambda: waiting_runs(db), what="the run waits on the table")
        sent = time.monotonic()
        run.proc.send_signal(signal.SIGINT)
        code = run.wait(30)
        took = time.monotonic() - sent
        assert code == 130, run.err
        assert took < 10, f"{took:.1f} s"
        # while the application still holds the table, no backend keeps the run's lock
        wait_until(lambda: not run_lock_holders(db), "the run's lock is released", timeout=10)
    finally:
        app.close()
    assert rows(db) == names
    print(f"\nCtrl-C while blocked: exit {code} after {took:.2f} s")


def test_kill_9_while_the_database_blocks_leaves_no_lock_behind(db, dsn, endpoint, tmp_path):
    client = client_of(endpoint)
    names = seed_http(client, db)
    app = table_locked(dsn)
    try:
        run = Bg(tmp_path, dsn, "--engine", "boto3")
        run.wait_until(lambda: waiting_runs(db) and run_lock_holders(db),
                       what="the run waits on the table, holding its lock")
        run.proc.kill()
        run.proc.wait()
        killed = time.monotonic()
        # the backend notices its client is gone while it waits, and ends
        wait_until(lambda: not run_lock_holders(db), "the killed run's lock is released",
                   timeout=20)
        took = time.monotonic() - killed
    finally:
        app.close()
    again = Bg(tmp_path, dsn, "--engine", "boto3")
    assert again.wait() == 0, again.err
    assert summary(again.out)["rows_rewritten"] == len(names)
    print(f"\nkill -9 while blocked: lock released {took:.2f} s later")


def test_statement_timeout_outside_a_rewrite_is_named(db, dsn, endpoint, tmp_path):
    """The snapshot scan canceled at a role's statement_timeout: exit 1, named, and
    no two minutes of reconnecting."""
    client = client_of(endpoint)
    seed_http(client, db)
    app = table_locked(dsn)
    try:
        t0 = time.monotonic()
        run = Bg(tmp_path, make_dsn(dsn, options="-c statement_timeout=1500"),
                 "--engine", "boto3")
        code = run.wait(60)
        took = time.monotonic() - t0
    finally:
        app.close()
    assert code == 1, run.err
    last = run.err.strip().splitlines()[-1]
    assert "canceling statement due to statement timeout" in last, run.err
    assert "statement_timeout" in last and "ALTER ROLE" in last, last
    assert "connection lost" not in run.err
    assert took < 30
