"""Database: row lookups and compare-and-set rewrites, in batches, on one connection.

Two row plans: with an index on the path column every batch looks rows up by
value ("index"); without one, the table is scanned once into an indexed temp
table and rows are reached by ctid ("snapshot").
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Iterator

import psycopg2
import psycopg2.errors
from psycopg2 import sql

from .journal import journal_table
from .settings import Settings, UsageError, first_line, mask_dsn

log = logging.getLogger("move")

DB_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)


def connection_lost(exc: psycopg2.Error) -> bool:
    """A server that vanishes mid-statement (crash, kill, failover) surfaces as a bare
    DatabaseError with no SQLSTATE: "server closed the connection unexpectedly".
    Errors the server itself reported carry a pgcode."""
    return isinstance(exc, DB_ERRORS) or (type(exc) is psycopg2.DatabaseError
                                          and exc.pgcode is None)


class Database:
    """Used from one thread only. A dropped connection (restart, network) is
    reopened and the batch retried: every statement here is idempotent."""

    def __init__(self, cfg: Settings, run_id: str, readonly: bool = False,
                 stop: threading.Event | None = None):
        self.cfg, self.run_id, self.readonly = cfg, run_id, readonly
        self.stop = stop or threading.Event()
        self.table = sql.Identifier(*cfg.table.split("."))
        self.table_name = cfg.table
        self.col = sql.Identifier(cfg.column)
        self.journal = journal_table(cfg.table)
        self.conn = None
        self.plan_name = "index"
        self.on_connect: list = []  # run again after every reconnect (e.g. a session lock)

    # connection ---------------------------------------------------------
    def connect(self):
        self.conn = psycopg2.connect(self.cfg.db, connect_timeout=10,
                                     application_name="move.py", keepalives=1,
                                     keepalives_idle=30, keepalives_interval=10,
                                     keepalives_count=3)
        if self.plan_name == "snapshot":
            self.build_snapshot()
        for hook in self.on_connect:
            hook()

    def close(self):
        if self.conn is not None:
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

    # checks -------------------------------------------------------------
    def preflight(self) -> None:
        try:
            self.connect()
        except psycopg2.Error as exc:
            raise UsageError(f"cannot connect to the database {mask_dsn(self.cfg.db)}: "
                             f"{first_line(exc)}") from None
        with self.conn, self.conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s)", (self.quoted_table(cur),))
            if cur.fetchone()[0] is None:
                raise UsageError(f"table {self.table_name!r} does not exist; set DB_TABLE/--table "
                                 "(or run seed/seeder.py to create it)")
            cur.execute("SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                        "AND attname = %s AND NOT attisdropped AND attnum > 0",
                        (self.quoted_table(cur), self.cfg.column))
            if cur.fetchone() is None:
                raise UsageError(f"table {self.table_name!r} has no column {self.cfg.column!r}; "
                                 "set DB_PATH_COLUMN/--column")
            self.plan_name = "index" if self._has_path_index(cur) else "snapshot"

    def prepare(self, create_index: bool = False) -> None:
        """Make the row plan ready: an index (when asked to build one) or a snapshot."""
        if self.plan_name != "snapshot":
            return
        if create_index:
            self.create_index()
            return
        log.info("no index on %s(%s): one scan into an indexed snapshot, then rows are "
                 "rewritten by TID (use --create-index to build an index instead)",
                 self.table_name, self.cfg.column)
        self.build_snapshot()

    def quoted_table(self, cur) -> str:
        return self.table.as_string(cur)

    def _has_path_index(self, cur) -> bool:
        cur.execute("""
            SELECT 1 FROM pg_index i
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
            WHERE i.indrelid = to_regclass(%s) AND a.attname = %s
              AND i.indisvalid AND i.indpred IS NULL
              AND (SELECT amname FROM pg_am JOIN pg_class c ON c.relam = pg_am.oid
                   WHERE c.oid = i.indexrelid) IN ('btree', 'hash')""",
                    (self.quoted_table(cur), self.cfg.column))
        return cur.fetchone() is not None

    def create_index(self) -> None:
        """CONCURRENTLY: the application keeps writing while it builds."""
        name = sql.Identifier(f"{self.table_name.split('.')[-1]}_{self.cfg.column}_move_idx")
        log.info("creating index on %s(%s) CONCURRENTLY", self.table_name, self.cfg.column)
        self.conn.autocommit = True
        try:
            with self.conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} ({})")
                            .format(name, self.table, self.col))
        finally:
            self.conn.autocommit = False
        self.plan_name = "index"

    # the no-index plan --------------------------------------------------
    def build_snapshot(self) -> None:
        """Without an index on the path column every lookup would scan the table.

        So scan it once: the rows under either prefix go to an indexed temp
        table with their ctid, and rewrites then reach each row by TID scan.
        """
        self.plan_name = "snapshot"
        sp, dp = self.cfg.source_prefix, self.cfg.dest_prefix
        with self.conn, self.conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS pg_temp.move_pending")
            cur.execute(sql.SQL(
                "CREATE TEMP TABLE move_pending AS SELECT ctid AS tid, {col}::text AS path "
                "FROM {table} WHERE left({col}, %s) = %s OR left({col}, %s) = %s")
                .format(col=self.col, table=self.table), (len(sp), sp, len(dp), dp))
            cur.execute("CREATE INDEX ON pg_temp.move_pending (path)")
            cur.execute("ANALYZE pg_temp.move_pending")

    def _lookup_source(self):
        return (sql.SQL("pg_temp.move_pending") if self.plan_name == "snapshot"
                else sql.SQL("(SELECT {col}::text AS path FROM {table} WHERE {col} = ANY(%(keys)s)) r")
                .format(col=self.col, table=self.table))

    # batches ------------------------------------------------------------
    def lookup(self, keys: list[str]) -> dict[str, int]:
        """How many rows point at each key (old and new keys alike)."""
        def run(cur):
            cur.execute(sql.SQL("SELECT path, count(*) FROM {} WHERE path = ANY(%(keys)s) "
                                "GROUP BY path").format(self._lookup_source()), {"keys": keys})
            return dict(cur.fetchall())
        return self.retry(run) if keys else {}

    def referenced(self, keys: list[str]) -> set[str]:
        """Keys some row points at now, read from the table itself, not the
        snapshot: a row the application set to an old key after the snapshot
        must keep its object. Without an index this scans the table."""
        def run(cur):
            cur.execute(sql.SQL("SELECT DISTINCT {col}::text FROM {table} WHERE {col} = ANY(%s)")
                        .format(col=self.col, table=self.table), (keys,))
            return {k for (k,) in cur.fetchall()}
        return self.retry(run) if keys else set()

    def rewrite(self, pairs: list[tuple[str, str]]) -> dict[str, int]:
        """Compare-and-set: only rows still holding the old key change.

        Returns rows rewritten per old key. Each rewrite is journaled in the
        same transaction with the rewritten rows' ctids, so --rollback can
        restore exactly the rows of one run.
        """
        if not pairs:
            return {}

        def run(cur):
            done = self._rewrite(cur, pairs, by_tid=self.plan_name == "snapshot")
            if self.plan_name == "snapshot":
                # A row updated by someone else since the snapshot has a new
                # ctid; reach those few by value: every key that got fewer rows
                # than the snapshot holds for it (not only keys that got none).
                cur.execute("SELECT path, count(*) FROM pg_temp.move_pending "
                            "WHERE path = ANY(%s) GROUP BY path", ([o for o, _ in pairs],))
                held = dict(cur.fetchall())
                missed = [(o, n) for o, n in pairs if done.get(o, 0) < held.get(o, 1)]
                if missed:
                    for old, count in self._rewrite(cur, missed, by_tid=False).items():
                        done[old] = done.get(old, 0) + count
            return done
        return self.retry(run)

    def _rewrite(self, cur, pairs: list[tuple[str, str]], by_tid: bool) -> dict[str, int]:
        if by_tid:
            update = sql.SQL("""
                s AS (SELECT p.tid, v.old, v.new FROM pg_temp.move_pending p
                      JOIN v ON p.path = v.old),
                u AS (UPDATE {table} t SET {col} = s.new FROM s
                      WHERE t.ctid = s.tid AND t.{col} = s.old
                      RETURNING s.old, s.new, t.ctid AS tid)""")
        else:
            update = sql.SQL("""
                u AS (UPDATE {table} t SET {col} = v.new FROM v WHERE t.{col} = v.old
                      RETURNING v.old, v.new, t.ctid AS tid)""")
        cur.execute(sql.SQL("WITH v(old, new) AS "
                            "(SELECT * FROM unnest(%(olds)s::text[], %(news)s::text[])), ")
                    + update.format(table=self.table, col=self.col) + sql.SQL("""
                INSERT INTO {journal} (run_id, old_path, new_path, rows, tids)
                SELECT %(run)s, old, new, count(*), array_agg(tid) FROM u GROUP BY old, new
                RETURNING old_path, rows""").format(journal=self.journal),
                    {"olds": [o for o, _ in pairs], "news": [n for _, n in pairs],
                     "run": self.run_id})
        return dict(cur.fetchall())

    def table_counts(self) -> tuple[int, int]:
        """(rows still under the source prefix, rows under neither prefix): one scan."""
        sp, dp = self.cfg.source_prefix, self.cfg.dest_prefix

        def run(cur):
            cur.execute(sql.SQL(
                "SELECT count(*) FILTER (WHERE left({col}, %s) = %s), "
                "count(*) FILTER (WHERE {col} IS NULL OR (left({col}, %s) <> %s "
                "AND left({col}, %s) <> %s)) FROM {table}").format(col=self.col, table=self.table),
                (len(sp), sp, len(sp), sp, len(dp), dp))
            return cur.fetchone()
        return self.retry(run)

    def rows_under(self, prefix: str) -> Iterator[tuple[str, int]]:
        """Distinct paths under a prefix in binary order, streamed with a server-side cursor."""
        with self.conn, self.conn.cursor(name="move_verify") as cur:
            cur.itersize = 5000
            cur.execute(sql.SQL('SELECT {col}::text COLLATE "C", count(*) FROM {table} '
                                'WHERE left({col}, %s) = %s GROUP BY 1 ORDER BY 1')
                        .format(col=self.col, table=self.table), (len(prefix), prefix))
            yield from cur
