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


def what_to_fix(exc: psycopg2.Error) -> str | None:
    """For an error a rerun cannot cure (the checks at start passed, then the
    database changed under the run): what to fix first. None for the others."""
    if isinstance(exc, psycopg2.errors.InsufficientPrivilege):
        return ("the role lost a privilege it had at the start; the rows written so far are "
                "consistent (each points at an object that exists); grant it again (see the "
                "README's PostgreSQL permissions), then run move.py again")
    if isinstance(exc, psycopg2.errors.ReadOnlySqlTransaction):
        return ("the database turned read-only during the run (a failover to a standby, or "
                "default_transaction_read_only set); the rows written so far are consistent; "
                "point DB_CONN_STRING at the primary, then run move.py again")
    return None


class Database:
    """Used by one thread at a time. A dropped connection (restart, network) is
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
        for hook in self.on_connect:  # first: no snapshot scan for a run that must stop
            hook()
        if self.plan_name == "snapshot":
            self.build_snapshot()

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
            if self.plan_name == "snapshot" and self.readonly and not self._can_snapshot(cur):
                # A dry run or verify must work on a read replica: look rows up by
                # value instead, at the cost of a table scan per batch.
                log.warning("no index on %s(%s) and no temp table possible here (read-only "
                            "database or no TEMPORARY privilege): every batch scans the table",
                            self.table_name, self.cfg.column)
                self.plan_name = "scan"

    def _can_snapshot(self, cur) -> bool:
        cur.execute("SELECT NOT current_setting('transaction_read_only')::bool "
                    "AND has_database_privilege(current_database(), 'TEMPORARY')")
        return cur.fetchone()[0]

    def check_writable(self, rollback: bool = False) -> None:
        """Everything a run (or a rollback) will write with, checked before it copies
        anything: a run that copies 500 objects and then may not write their rows
        has started what it cannot finish. Every problem goes in one line, each
        missing grant as the SQL to run."""
        with self.conn, self.conn.cursor() as cur:
            problems = self._read_only(cur)
            missing = self._missing_grants(cur, rollback)
            if missing:
                cur.execute("SELECT current_user, quote_ident(current_user)")
                role, quoted_role = cur.fetchone()
                what = ", ".join(phrase for phrase, _ in missing)
                grants = "; ".join(f"{grant} TO {quoted_role}" for _, grant in missing)
                problems.append(f'role "{role}" may not {what}; grant '
                                f"{'it' if len(missing) == 1 else 'them'}: {grants}")
            if (self.cfg.create_index and self.plan_name == "snapshot" and not rollback
                    and not self._owns_table(cur)):
                problems.append(f"--create-index needs the owner of \"{self.table_name}\": run "
                                "it as the owner, or have the owner run CREATE INDEX "
                                f"CONCURRENTLY ON {self.quoted_table(cur)} "
                                f"({self.col.as_string(cur)})")
        if problems:
            raise UsageError("; and ".join(problems))

    @staticmethod
    def _read_only(cur) -> list[str]:
        # A fresh transaction: transaction_read_only then shows default_transaction_read_only.
        cur.execute("SELECT pg_is_in_recovery(), current_setting('transaction_read_only')::bool")
        standby, read_only = cur.fetchone()
        if standby:
            return ["the database is a standby in recovery (read-only) and this run writes "
                    "rows; point DB_CONN_STRING at the primary"]
        if read_only:
            return ["the database session is read-only (default_transaction_read_only is on: "
                    "a read replica, or set for this role or database) and this run writes "
                    "rows; point DB_CONN_STRING at the primary"]
        return []

    @staticmethod
    def _quote(cur, expr: str, *args) -> str:
        """A name as PostgreSQL would write it in SQL (quoted only when it must be)."""
        cur.execute(f"SELECT quote_ident({expr})", args)
        return cur.fetchone()[0]

    def _missing_grants(self, cur, rollback: bool) -> list[tuple[str, str]]:
        """(what the role may not do, the GRANT that lets it) for each missing grant."""
        table = self.quoted_table(cur)
        qtable = ".".join(self._quote(cur, "%s", p) for p in self.table.strings)
        missing = []
        cur.execute("SELECT has_table_privilege(%s, 'SELECT'), "
                    # UPDATE of the path column alone is enough: a column-level grant will do
                    "has_column_privilege(%s, %s, 'UPDATE')", (table, table, self.cfg.column))
        privs = [p for p, ok in zip(("SELECT", "UPDATE"), cur.fetchone()) if not ok]
        if privs:
            missing.append((f'{", ".join(privs)} table "{self.table_name}"',
                            f"GRANT {', '.join(privs)} ON {qtable}"))
        journal = self.journal.as_string(cur)
        jname = ".".join(self.journal.strings)
        qjournal = ".".join(self._quote(cur, "%s", p) for p in self.journal.strings)
        cur.execute("SELECT to_regclass(%s)", (journal,))
        if cur.fetchone()[0] is not None:
            # The run inserts (RETURNING: SELECT) and its rollback updates rolled_back_at.
            needed = ("SELECT", "UPDATE") if rollback else ("SELECT", "INSERT", "UPDATE")
            cur.execute("SELECT " + ", ".join(f"has_table_privilege(%s, '{p}')" for p in needed),
                        (journal,) * len(needed))
            privs = [p for p, ok in zip(needed, cur.fetchone()) if not ok]
            if privs:
                missing.append((f'{", ".join(privs)} table "{jname}"',
                                f"GRANT {', '.join(privs)} ON {qjournal}"))
            # INSERT takes the next id from the journal's sequence: USAGE (or UPDATE) on it.
            cur.execute("SELECT s, has_sequence_privilege(s, 'USAGE, UPDATE') "
                        "FROM pg_get_serial_sequence(%s, 'id') AS s WHERE s IS NOT NULL",
                        (journal,))
            seq = cur.fetchone()
            if seq and not seq[1] and not rollback:
                missing.append((f'use the journal\'s sequence "{seq[0]}"',
                                f"GRANT USAGE ON SEQUENCE {seq[0]}"))
        elif not rollback:
            # The first run creates the journal, in the schema its name resolves to.
            schema = self.journal.strings[0] if len(self.journal.strings) > 1 else None
            cur.execute("SELECT s, has_schema_privilege(s, 'CREATE') FROM "
                        "(SELECT coalesce(%s, current_schema()) AS s) x", (schema,))
            schema, ok = cur.fetchone()
            if not ok:
                missing.append((f'CREATE in schema "{schema}" (to create the journal '
                                f'"{jname}")',
                                f"GRANT CREATE ON SCHEMA {self._quote(cur, '%s', schema)}"))
        if self.plan_name == "snapshot" and not self.cfg.create_index and not rollback:
            # No index on the path column: the run's snapshot is a TEMP table.
            cur.execute("SELECT current_database(), "
                        "has_database_privilege(current_database(), 'TEMPORARY')")
            database, ok = cur.fetchone()
            if not ok:
                quoted = self._quote(cur, "%s", database)
                missing.append((f'create TEMPORARY tables in database "{database}" (for '
                                f"the snapshot: no index on {self.cfg.column})",
                                f"GRANT TEMPORARY ON DATABASE {quoted}"))
        return missing

    def _owns_table(self, cur) -> bool:
        cur.execute("SELECT pg_has_role(relowner, 'USAGE') FROM pg_class "
                    "WHERE oid = to_regclass(%s)", (self.quoted_table(cur),))
        return cur.fetchone()[0]

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
                else sql.SQL("(SELECT {col}::text AS path FROM {table} "
                             "WHERE {col} = ANY(%(keys)s)) r")
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
        cur.execute(*self.rewrite_statement(pairs, by_tid))
        return dict(cur.fetchall())

    def rewrite_statement(self, pairs: list[tuple[str, str]],
                          by_tid: bool) -> tuple[sql.Composed, dict]:
        """The UPDATE of one batch and its journal entries, with its parameters."""
        if by_tid:
            # MATERIALIZED keeps the batch's keys joined to the snapshot first. Inlined,
            # t.path = s.old = p.path let the planner join the whole table to the whole
            # snapshot, misjudge that as one row, and compare it with every key of the
            # batch: 2.5 million comparisons, 0.7 s, per batch of 500 on a bloated table.
            update = sql.SQL("""
                s AS MATERIALIZED (SELECT p.tid, v.old, v.new FROM pg_temp.move_pending p
                      JOIN v ON p.path = v.old),
                u AS (UPDATE {table} t SET {col} = s.new FROM s
                      WHERE t.ctid = s.tid AND t.{col} = s.old
                      RETURNING s.old, s.new, t.ctid AS tid)""")
        else:
            update = sql.SQL("""
                u AS (UPDATE {table} t SET {col} = v.new FROM v WHERE t.{col} = v.old
                      RETURNING v.old, v.new, t.ctid AS tid)""")
        return (sql.SQL("WITH v(old, new) AS "
                        "(SELECT * FROM unnest(%(olds)s::text[], %(news)s::text[])), ")
                + update.format(table=self.table, col=self.col) + sql.SQL("""
                INSERT INTO {journal} (run_id, old_path, new_path, rows, tids)
                SELECT %(run)s, old, new, count(*), array_agg(tid) FROM u GROUP BY old, new
                RETURNING old_path, rows""").format(journal=self.journal),
                {"olds": [o for o, _ in pairs], "news": [n for _, n in pairs],
                 "run": self.run_id})

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
