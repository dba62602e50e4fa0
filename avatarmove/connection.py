"""The run's connection to PostgreSQL: opening it (and its session settings),
retrying a statement when the connection is lost, cancelling one from another
thread, closing without leaving a lock behind; and which errors are a lost
connection, a timeout, or something a rerun cannot cure."""
from __future__ import annotations

import logging
import time

import psycopg2
import psycopg2.errors

from .settings import first_line

log = logging.getLogger("move")

DB_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)
DEFAULT_LOCK_TIMEOUT_MS = 2000

# SQLSTATEs of a connection that is gone or going: the server restarting or ending the
# session (57P01-57P03), and class 08. Other errors the server reported (a timeout,
# a constraint) come over a connection that still works.
GONE_CODES = ("57P01", "57P02", "57P03")


def connection_lost(exc: psycopg2.Error) -> bool:
    """A server that vanishes mid-statement (crash, kill, failover) surfaces as a bare
    DatabaseError with no SQLSTATE: "server closed the connection unexpectedly".
    Errors the server itself reported carry a pgcode: psycopg2 makes a lock or
    statement timeout an OperationalError too, and those are no lost connection."""
    code = exc.pgcode or ""
    if code:
        return code in GONE_CODES or code.startswith("08")
    return isinstance(exc, DB_ERRORS) or type(exc) is psycopg2.DatabaseError


def timeout_fix(exc: psycopg2.Error) -> str | None:
    """A statement the server canceled at a timeout: say which one, and what sets it."""
    message = (exc.diag.message_primary or "") if exc.diag else ""
    if exc.pgcode == "57014" and "statement timeout" in message:
        return ("the database's statement_timeout (set for this role, database or in "
                "DB_CONN_STRING's options) is shorter than this statement needs; raise it "
                "for the role that runs move.py (ALTER ROLE ... SET statement_timeout = "
                "'5min'), then run move.py again; the rows written so far are consistent")
    if exc.pgcode == "55P03":
        return ("another session held a lock on the table longer than the lock_timeout "
                "(set for this role, database or in DB_CONN_STRING's options); find it in "
                "pg_stat_activity (or pg_locks), wait for it to end, then run move.py "
                "again; the rows written so far are consistent")
    return None


def what_to_fix(exc: psycopg2.Error) -> str | None:
    """For an error a rerun cannot cure (the checks at start passed, then the
    database changed under the run): what to fix first. None for the others."""
    if isinstance(exc, psycopg2.errors.InsufficientPrivilege):
        return ("the role lost a privilege it had at the start; the rows written so far are "
                "consistent (each points at an object that exists); grant it again (see the "
                "README's PostgreSQL permissions), then run move.py again")
    if isinstance(exc, (psycopg2.errors.QueryCanceled, psycopg2.errors.LockNotAvailable)):
        return timeout_fix(exc)
    if isinstance(exc, psycopg2.errors.ReadOnlySqlTransaction):
        return ("the database turned read-only during the run (a failover to a standby, or "
                "default_transaction_read_only set); the rows written so far are consistent; "
                "point DB_CONN_STRING at the primary, then run move.py again")
    return None



class Connection:
    """The Database's connection part: self.conn, used by one thread at a time. A
    dropped connection (restart, network) is reopened and the statement retried:
    every statement the Database runs is idempotent."""

    # connection ---------------------------------------------------------
    def connect(self):
        self.conn = psycopg2.connect(self.cfg.db, connect_timeout=10,
                                     application_name="move.py", keepalives=1,
                                     keepalives_idle=30, keepalives_interval=10,
                                     keepalives_count=3)
        self._session()
        for hook in self.on_connect:  # first: no snapshot scan for a run that must stop
            hook()
        if self.plan_name == "snapshot":
            self.build_snapshot()

    def _session(self) -> None:
        """This run's own lock wait: a statement that waits on a lock another session
        holds gives up after a moment (or sooner, at the role's own lock_timeout), so
        the batch is tried again later instead of blocking the run. A server that
        checks for a vanished client while a statement runs (PostgreSQL 14 and later)
        is asked to: a killed run's backend must not go on holding the run's lock."""
        with self.conn.cursor() as cur:
            cur.execute("SELECT setting::int, current_setting('server_version_num')::int "
                        "FROM pg_settings WHERE name = 'lock_timeout'")
            role_ms, version = cur.fetchone()
            self.lock_timeout_ms = (min(role_ms, DEFAULT_LOCK_TIMEOUT_MS) if role_ms
                                    else DEFAULT_LOCK_TIMEOUT_MS)
            if version >= 140000:
                cur.execute("SET client_connection_check_interval = 5000")
        self.conn.commit()

    def cancel(self) -> None:
        """From another thread: cancel the statement running now (Ctrl-C)."""
        conn = self.conn
        if conn is not None and not conn.closed:
            try:
                conn.cancel()
            except psycopg2.Error:
                pass

    def close(self):
        if self.conn is not None:
            try:
                if not self.conn.closed:
                    # Released here, not left to the session's end: behind a pooler the
                    # server session lives on, and with it a lock nobody releases.
                    self.conn.rollback()
                    self.conn.autocommit = True
                    with self.conn.cursor() as cur:
                        cur.execute("SELECT pg_advisory_unlock_all()")
            except psycopg2.Error:
                pass
            try:
                self.conn.close()
            except DB_ERRORS:
                pass
            self.conn = None

    def retry(self, fn, *args):
        """Run fn(cursor, *args) in one transaction, reconnecting on connection loss."""
        deadline = time.monotonic() + self.cfg.db_retry_seconds
        delay = 0.5
        while True:
            try:
                if self.conn is None or self.conn.closed:
                    self.connect()
                with self.conn, self.conn.cursor() as cur:
                    return fn(cur, *args)
            except psycopg2.Error as exc:
                if not connection_lost(exc):
                    raise
                self.close()
                if time.monotonic() + delay > deadline or self.stop.is_set():
                    raise
                log.warning("database connection lost (%s); retrying in %.1fs",
                            first_line(exc), delay)
                if self.stop.wait(delay):  # Ctrl-C must not wait out two minutes of retries
                    raise
                delay = min(delay * 2, 10)
