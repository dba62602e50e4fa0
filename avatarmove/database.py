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


# What a row's rewrite can meet that concerns that row alone: its new value does not
# fit (class 22: too long for the column), a constraint refuses it (23: a unique index
# already holding the new key), a trigger raises (P0001, P0004), a view's or policy's
# check refuses the new row (44, and 42501 "new row violates row-level security").
REFUSED, WAIT = "refused", "wait"


def row_error(exc: psycopg2.Error) -> str | None:
    """REFUSED for an error that concerns the rows of the statement, WAIT for one a
    later attempt may not meet (another session's lock), None for the others (a
    lost connection, a revoked grant, a read-only database: the whole run's)."""
    code = exc.pgcode or ""
    message = (exc.diag.message_primary or "") if exc.diag else ""
    if code[:2] in ("22", "23", "44") or code in ("P0001", "P0004"):
        return REFUSED
    if code == "42501" and "row-level security" in message:
        return REFUSED
    if code == "57014" and "statement timeout" in message:
        return REFUSED  # too slow even alone: named, and the others go on
    if code in ("55P03", "40P01", "40001"):  # lock timeout, deadlock, serialization
        return WAIT
    return None


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


DEFAULT_LOCK_TIMEOUT_MS = 2000
SKIPPED_REASON = ("the database left the row as it was, without an error (a trigger returned "
                  "NULL for it, or a rule or policy skipped it)")


def split_name(text: str, flag: str) -> list[tuple[str, bool]]:
    """`app."Avatars"` -> [("app", False), ("Avatars", True)]: (name, quoted) per dot."""
    parts, i, n = [], 0, len(text)
    while True:
        if i < n and text[i] == '"':
            j, name = i + 1, ""
            while True:
                k = text.find('"', j)
                if k < 0:
                    raise UsageError(f"{flag} {text!r}: unbalanced double quote")
                name += text[j:k]
                if text[k + 1:k + 2] == '"':  # "" inside quotes is one "
                    name, j = name + '"', k + 2
                    continue
                i = k + 1
                break
            parts.append((name, True))
        else:
            j = text.find(".", i)
            j = n if j < 0 else j
            name = text[i:j].strip()
            if '"' in name:
                raise UsageError(f"{flag} {text!r}: a double quote inside a name")
            parts.append((name, False))
            i = j
        if not parts[-1][0]:
            raise UsageError(f"{flag} {text!r} has an empty name")
        if i >= n:
            return parts
        if text[i] != ".":
            raise UsageError(f"{flag} {text!r}: expected a dot after a quoted name")
        i += 1


def candidates(parts: list[tuple[str, bool]]) -> list[tuple[str, ...]]:
    """The names a user's spelling can mean, most literal first: a quoted part as
    written; an unquoted one as typed, then folded to lower case."""
    options = [[name] if quoted or name == name.lower() else [name, name.lower()]
               for name, quoted in parts]
    out: list[tuple[str, ...]] = [()]
    for choice in options:
        out = [prefix + (c,) for prefix in out for c in choice]
    return out


class Rewritten(dict):
    """Rows rewritten per old key; .refused and .waiting: old key -> the reason."""

    def __init__(self, *args):
        super().__init__(*args)
        self.refused: dict[str, str] = {}
        self.waiting: dict[str, str] = {}

    @classmethod
    def failed(cls, pairs: list[tuple[str, str]], kind: str, exc: psycopg2.Error):
        result = cls()
        target = result.waiting if kind == WAIT else result.refused
        why = (f"another session holds a lock the rewrite needs ({first_line(exc)})"
               if kind == WAIT else first_line(exc))
        for old, _ in pairs:
            target[old] = why
        return result

    def merge(self, other: "Rewritten") -> None:
        for key, n in other.items():
            self[key] = self.get(key, 0) + n
        self.refused.update(other.refused)
        self.waiting.update(other.waiting)


class Database:
    """Used by one thread at a time. A dropped connection (restart, network) is
    reopened and the batch retried: every statement here is idempotent."""

    def __init__(self, cfg: Settings, run_id: str, readonly: bool = False,
                 stop: threading.Event | None = None):
        self.cfg, self.run_id, self.readonly = cfg, run_id, readonly
        self.stop = stop or threading.Event()
        # As typed until preflight() finds the table and column the names mean.
        self.table = sql.Identifier(*[n for n, _ in split_name(cfg.table, "--table")])
        self.table_name = cfg.table
        self.col = sql.Identifier(cfg.column)
        self.journal = journal_table(self.table.strings)
        self.conn = None
        self.plan_name = "index"
        self.lock_timeout_ms = DEFAULT_LOCK_TIMEOUT_MS
        self.width: int | None = None  # varchar(n)/char(n): the most characters a path may have
        self.col_type = "text"
        self.unique_index: str | None = None  # a unique index on the path column alone
        self.skipped_reason = SKIPPED_REASON
        self.on_connect: list = []  # run again after every reconnect (e.g. a session lock)

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

    # checks -------------------------------------------------------------
    def preflight(self) -> None:
        try:
            self.connect()
        except psycopg2.Error as exc:
            raise UsageError(f"cannot connect to the database {mask_dsn(self.cfg.db)}: "
                             f"{first_line(exc)}") from None
        with self.conn, self.conn.cursor() as cur:
            self._find_table(cur)
            self._find_column(cur)
            self._describe_column(cur)
            self.plan_name = "index" if self._has_path_index(cur) else "snapshot"
            if self.plan_name == "snapshot" and self.readonly and not self._can_snapshot(cur):
                # A dry run or verify must work on a read replica: look rows up by
                # value instead, at the cost of a table scan per batch.
                log.warning("no index on %s(%s) and no temp table possible here (read-only "
                            "database or no TEMPORARY privilege): every batch scans the table",
                            self.table_name, self.column)
                self.plan_name = "scan"
        self._check_pooler()

    # names --------------------------------------------------------------
    def _find_table(self, cur) -> None:
        """The table --table names, typed as a user would: `app."Avatars"` (quoted:
        exactly), `app.Avatars` (as typed, else folded to lower case as PostgreSQL
        folds an unquoted name). Not found: the close matches, by schema and case."""
        parts = split_name(self.cfg.table, "--table")
        if len(parts) > 2:
            raise UsageError(f"--table {self.cfg.table!r} has {len(parts)} parts; give "
                             "table or schema.table")
        for names in candidates(parts):
            cur.execute("SELECT to_regclass(%s)::oid", (sql.Identifier(*names).as_string(cur),))
            oid = cur.fetchone()[0]
            if oid is not None:
                self.table = sql.Identifier(*names)
                self.journal = journal_table(names)
                cur.execute("SELECT %s::regclass::text", (oid,))
                self.table_name = cur.fetchone()[0]
                return
        name = parts[-1][0]
        cur.execute(r"""
            SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p', 'v', 'f')
              AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\_%%'
              AND (lower(c.relname) = lower(%(n)s)
                   OR (length(%(n)s) >= 3 AND strpos(lower(c.relname), lower(%(n)s)) > 0))
            ORDER BY lower(c.relname) <> lower(%(n)s), 1 LIMIT 5""", {"n": name})
        close = [m for (m,) in cur.fetchall()]
        if close:
            raise UsageError(f"table {self.cfg.table!r} does not exist; close matches: "
                             f"{', '.join(close)}; set DB_TABLE/--table to one of them "
                             """(a mixed-case name in double quotes: --table 'app."Avatars"')""")
        cur.execute("SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n "
                    "ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') "
                    "AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%%')")
        empty = not cur.fetchone()[0]
        raise UsageError(f"table {self.cfg.table!r} does not exist, nor any of a similar name "
                         "in any schema; set DB_TABLE/--table"
                         + (" (or, for a test database, run seed/seeder.py to create it)"
                            if empty else ""))

    def _find_column(self, cur) -> None:
        parts = split_name(self.column, "--column")
        if len(parts) != 1:
            raise UsageError(f"--column {self.column!r} is not one column name")
        cur.execute("SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                    "AND NOT attisdropped AND attnum > 0", (self.quoted_table(cur),))
        columns = [c for (c,) in cur.fetchall()]
        for (name,) in candidates(parts):
            if name in columns:
                self.col = sql.Identifier(name)
                return
        name = parts[0][0].lower()
        close = [c for c in columns if c.lower() == name
                 or (len(name) >= 3 and (name in c.lower() or c.lower() in name))]
        quoted = [sql.Identifier(c).as_string(cur) if c != c.lower() else c for c in close]
        raise UsageError(f"table {self.table_name!r} has no column {self.column!r}"
                         + (f"; close matches: {', '.join(quoted)}" if close else "")
                         + "; set DB_PATH_COLUMN/--column")

    def _describe_column(self, cur) -> None:
        """What the database will refuse or skip, known before any row is written: a
        column narrower than some new paths, a unique index, BEFORE UPDATE triggers."""
        table = self.quoted_table(cur)
        cur.execute("""
            SELECT format_type(a.atttypid, a.atttypmod),
                   CASE WHEN a.atttypid IN ('varchar'::regtype, 'bpchar'::regtype)
                        AND a.atttypmod > 4 THEN a.atttypmod - 4 END,
                   (SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                    WHERE i.indrelid = a.attrelid AND i.indisunique AND i.indnkeyatts = 1
                      AND i.indkey[0] = a.attnum AND i.indpred IS NULL AND i.indisvalid
                    ORDER BY 1 LIMIT 1),
                   (SELECT string_agg(quote_ident(tgname), ', ' ORDER BY tgname) FROM pg_trigger
                    WHERE tgrelid = a.attrelid AND NOT tgisinternal AND tgenabled <> 'D'
                      AND tgtype & 19 = 19),  -- ROW (1), BEFORE (2), UPDATE (16)
                   (SELECT relrowsecurity FROM pg_class WHERE oid = a.attrelid)
            FROM pg_attribute a WHERE a.attrelid = to_regclass(%s) AND a.attname = %s""",
                    (table, self.col.strings[0]))
        self.col_type, self.width, self.unique_index, triggers, rls = cur.fetchone()
        causes = []
        if triggers:
            causes.append(f"a BEFORE UPDATE trigger ({triggers}) returned NULL for it")
        if rls:
            causes.append("a row-level security policy hides it from this role's UPDATE")
        if causes:
            self.skipped_reason = (f"the database left the row as it was, without an error: "
                                   f"{' or '.join(causes)}")

    def warn_foreseen(self) -> None:
        """Rows the database will refuse, said before the first copy: new paths longer
        than the column allows, new paths a unique index already holds (one scan)."""
        if self.width is None and self.unique_index is None:
            return
        sp, dp = self.cfg.source_prefix, self.cfg.dest_prefix
        new = sql.SQL("(%(dp)s || substr(a.{col}, %(n)s + 1))").format(col=self.col)
        taken = (sql.SQL("EXISTS (SELECT 1 FROM {table} b WHERE b.{col} = {new})").format(
            table=self.table, col=self.col, new=new) if self.unique_index else sql.SQL("false"))
        long = (sql.SQL("length({new}) > %(w)s").format(new=new) if self.width is not None
                else sql.SQL("false"))

        def run(cur):
            cur.execute(sql.SQL("""
                SELECT count(*) FILTER (WHERE {long}), min(a.{col}) FILTER (WHERE {long}),
                       count(*) FILTER (WHERE {taken}), min(a.{col}) FILTER (WHERE {taken})
                FROM {table} a WHERE left(a.{col}, %(n)s) = %(sp)s""").format(
                    long=long, taken=taken, col=self.col, table=self.table),
                {"dp": dp, "sp": sp, "n": len(sp), "w": self.width or 0})
            return cur.fetchone()
        too_long, long_example, clash, clash_example = self.retry(run)
        if too_long:
            log.warning("%d row(s) under %s would get a path longer than %s allows (%s, e.g. "
                        "%s): they will not be rewritten; widen the column first (ALTER TABLE "
                        "%s ALTER COLUMN %s TYPE text)", too_long, sp, self.col.strings[0],
                        self.col_type, long_example, self.table_name, self.col.strings[0])
        if clash:
            log.warning("%d row(s) under %s would get a path another row already holds, which "
                        "the unique index %s refuses (e.g. %s): they will not be rewritten; "
                        "resolve those duplicates first", clash, sp, self.unique_index,
                        clash_example)

    # poolers ------------------------------------------------------------
    def _check_pooler(self) -> None:
        """A transaction-mode pooler (PgBouncer pool_mode=transaction or statement)
        hands each transaction whatever server session is free: the run's lock, its
        snapshot and its session settings would land on sessions that are not its
        own, and outlive it. Two connections open at once never share a server
        session, except through such a pooler: ask each for its backend pid, in
        turns, and compare."""
        other = psycopg2.connect(self.cfg.db, connect_timeout=10, application_name="move.py")
        try:
            other.autocommit = True
            seen: list[set[int]] = [set(), set()]
            for _ in range(3):
                for n, conn in enumerate((self.conn, other)):
                    with conn.cursor() as cur:
                        cur.execute("SELECT pg_backend_pid()")
                        seen[n].add(cur.fetchone()[0])
                    if conn is self.conn:
                        self.conn.commit()
        finally:
            other.close()
        shared = seen[0] & seen[1]
        if shared:
            raise UsageError(
                f"DB_CONN_STRING {mask_dsn(self.cfg.db)} goes through a transaction-mode "
                f"pooler (two connections were given the same server session, backend pid "
                f"{min(shared)}: PgBouncer with pool_mode=transaction or statement); move.py "
                "keeps a lock and a snapshot in its session for the whole run: connect to "
                "PostgreSQL directly, or through a session-mode pool (pool_mode=session)")

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
                    "has_column_privilege(%s, %s, 'UPDATE')", (table, table, self.column))
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
                                f"the snapshot: no index on {self.column})",
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
                 self.table_name, self.column)
        self.build_snapshot()

    @property
    def column(self) -> str:
        return self.col.strings[0]

    def quoted_table(self, cur) -> str:
        return self.table.as_string(cur)

    def _has_path_index(self, cur) -> bool:
        cur.execute("""
            SELECT 1 FROM pg_index i
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
            WHERE i.indrelid = to_regclass(%s) AND a.attname = %s
              AND i.indisvalid AND i.indisready AND i.indislive AND i.indpred IS NULL
              AND (SELECT amname FROM pg_am JOIN pg_class c ON c.relam = pg_am.oid
                   WHERE c.oid = i.indexrelid) IN ('btree', 'hash')""",
                    (self.quoted_table(cur), self.column))
        return cur.fetchone() is not None

    def create_index(self) -> None:
        """CONCURRENTLY: the application keeps writing while it builds.

        A build that fails or is interrupted leaves an INVALID index behind, which
        PostgreSQL keeps up to date but never reads from: ours is dropped and built
        again, and one that fails now is dropped and the run takes the snapshot."""
        table = self.table.strings[-1]
        name = sql.Identifier(*self.table.strings[:-1], f"{table}_{self.column}_move_idx")
        log.info("creating index on %s(%s) CONCURRENTLY", self.table_name, self.column)
        self.conn.autocommit = True
        try:
            with self.conn.cursor() as cur:
                if self._index_invalid(cur, name):
                    log.warning("the index %s, left INVALID by an earlier --create-index that "
                                "did not finish, is dropped and built again",
                                ".".join(name.strings))
                    cur.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(name))
                try:
                    cur.execute(sql.SQL("CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} ({})")
                                .format(sql.Identifier(name.strings[-1]), self.table, self.col))
                    failed = None if not self._index_invalid(cur, name) else "left INVALID"
                except psycopg2.Error as exc:
                    if connection_lost(exc) or self.stop.is_set():
                        raise  # the next --create-index drops what this one left
                    failed = first_line(exc)
                dropped = "dropped the INVALID index the attempt left"
                if failed:
                    try:
                        cur.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}")
                                    .format(name))
                    except psycopg2.Error as exc:
                        if connection_lost(exc) or self.stop.is_set():
                            raise
                        dropped = (f"the INVALID index it left could not be dropped now "
                                   f"({first_line(exc)}): it is never used, the next "
                                   "--create-index drops and builds it again, or drop it "
                                   f"with DROP INDEX CONCURRENTLY {name.as_string(cur)}")
        finally:
            self.conn.autocommit = False
        if failed:
            log.warning("could not create the index on %s(%s) (%s); %s; this run scans the "
                        "table once into a snapshot instead", self.table_name, self.column,
                        failed, dropped)
            self.build_snapshot()
            return
        self.plan_name = "index"

    def _index_invalid(self, cur, name: sql.Identifier) -> bool:
        cur.execute("SELECT NOT (indisvalid AND indisready) FROM pg_index "
                    "WHERE indexrelid = to_regclass(%s)", (name.as_string(cur),))
        got = cur.fetchone()
        return bool(got and got[0])

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

    def rewrite(self, pairs: list[tuple[str, str]],
                expected: dict[str, int] | None = None) -> "Rewritten":
        """Compare-and-set: only rows still holding the old key change.

        Returns rows rewritten per old key (expected: rows the lookup found per old
        key). Each rewrite is journaled in the same transaction with the rewritten
        rows' ctids, so --rollback can restore exactly the rows of one run.

        A row the database refuses (too long for the column, a unique index, a
        trigger's exception, a policy) is named in .refused with the database's
        reason; the others are written. A row another transaction holds locked is
        skipped, not waited for, and named in .waiting: the caller tries it again.
        """
        if not pairs:
            return Rewritten()

        def run(cur):
            # SET LOCAL before the savepoint: rolling back to it must not undo it.
            cur.execute("SET LOCAL lock_timeout = %s; SAVEPOINT move_batch",
                        (self.lock_timeout_ms,))
            try:
                return self._rewrite_batch(cur, pairs, expected)
            except psycopg2.Error as exc:
                kind = row_error(exc)
                if kind is None or self.stop.is_set():
                    raise
                cur.execute("ROLLBACK TO SAVEPOINT move_batch")
                if kind == WAIT or len(pairs) == 1:
                    return Rewritten.failed(pairs, kind, exc)
            # One row at a time, each under its own savepoint: the good rows land
            # and each bad one is named with its own reason.
            result = Rewritten()
            for pair in pairs:
                cur.execute("SAVEPOINT move_row")
                try:
                    one = self._rewrite_batch(cur, [pair], expected)
                    cur.execute("RELEASE SAVEPOINT move_row")
                except psycopg2.Error as exc:
                    kind = row_error(exc)
                    if kind is None or self.stop.is_set():
                        raise
                    cur.execute("ROLLBACK TO SAVEPOINT move_row")
                    one = Rewritten.failed([pair], kind, exc)
                result.merge(one)
            return result
        return self.retry(run)

    def _rewrite_batch(self, cur, pairs: list[tuple[str, str]],
                       expected: dict[str, int] | None) -> "Rewritten":
        by_tid = self.plan_name == "snapshot"
        done = self._rewrite(cur, pairs, by_tid=by_tid)
        if by_tid:
            # A row updated by someone else since the snapshot has a new
            # ctid; reach those few by value: every key that got fewer rows
            # than the snapshot holds for it (not only keys that got none).
            cur.execute("SELECT path, count(*) FROM pg_temp.move_pending "
                        "WHERE path = ANY(%s) GROUP BY path", ([o for o, _ in pairs],))
            expected = dict(cur.fetchall())
            missed = [(o, n) for o, n in pairs if done.get(o, 0) < expected.get(o, 1)]
            if missed:
                for old, count in self._rewrite(cur, missed, by_tid=False).items():
                    done[old] = done.get(old, 0) + count
        result = Rewritten(done)
        short = [(o, n) for o, n in pairs if done.get(o, 0) < (expected or {}).get(o, 1)]
        if short:
            self._why_not(cur, short, result)
        return result

    def _why_not(self, cur, short: list[tuple[str, str]], result: "Rewritten") -> None:
        """Keys that got fewer rows than were looked up: rows another transaction
        holds locked (skipped), or rows the UPDATE left as they were (a trigger
        returned NULL), or rows changed meanwhile (nothing to do)."""
        cur.execute(sql.SQL("""
            WITH mine AS (SELECT {col}::text AS path FROM {table}
                          WHERE {col} = ANY(%(keys)s) FOR UPDATE SKIP LOCKED)
            SELECT a.path, a.n, (SELECT count(*) FROM mine WHERE mine.path = a.path)
            FROM (SELECT {col}::text AS path, count(*) AS n FROM {table}
                  WHERE {col} = ANY(%(keys)s) GROUP BY 1) a""").format(
                col=self.col, table=self.table), {"keys": [o for o, _ in short]})
        free = []
        for path, still, lockable in cur.fetchall():
            if still > lockable:
                result.waiting[path] = (f"{still - lockable} row(s) locked by another "
                                        "transaction")
            if lockable:
                free.append(path)
        if not free:
            return
        # Locked by us now: an UPDATE that still changes nothing was skipped by the
        # database itself. (One that does change them met rows set meanwhile.)
        again = [(o, n) for o, n in short if o in free]
        for old, count in self._rewrite(cur, again, by_tid=False).items():
            result[old] = result.get(old, 0) + count
        cur.execute(sql.SQL("SELECT {col}::text, count(*) FROM {table} WHERE {col} = ANY(%s) "
                            "GROUP BY 1").format(col=self.col, table=self.table), (free,))
        for path, _ in cur.fetchall():
            result.refused[path] = self.skipped_reason

    def _rewrite(self, cur, pairs: list[tuple[str, str]], by_tid: bool) -> dict[str, int]:
        cur.execute(*self.rewrite_statement(pairs, by_tid))
        return dict(cur.fetchall())

    def rewrite_statement(self, pairs: list[tuple[str, str]],
                          by_tid: bool) -> tuple[sql.Composed, dict]:
        """The UPDATE of one batch and its journal entries, with its parameters.

        Rows another transaction holds are skipped (SKIP LOCKED), not waited for:
        a row the application keeps locked delays that row alone."""
        if by_tid:
            # MATERIALIZED keeps the batch's keys joined to the snapshot first. Inlined,
            # t.path = s.old = p.path let the planner join the whole table to the whole
            # snapshot, misjudge that as one row, and compare it with every key of the
            # batch: 2.5 million comparisons, 0.7 s, per batch of 500 on a bloated table.
            # LATERAL locks each row by TID, and the UPDATE reaches the locked rows by
            # their TIDs (= ANY): joined, the planner hashed the whole table instead.
            update = sql.SQL("""
                s AS MATERIALIZED (SELECT p.tid, v.old, v.new FROM pg_temp.move_pending p
                      JOIN v ON p.path = v.old),
                l AS MATERIALIZED (SELECT t.tid, s.old, s.new FROM s CROSS JOIN LATERAL
                      (SELECT x.ctid AS tid FROM {table} x WHERE x.ctid = s.tid
                       AND x.{col} = s.old FOR UPDATE SKIP LOCKED) t),
                u AS (UPDATE {table} t SET {col} = l.new FROM l
                      WHERE t.ctid = ANY(ARRAY(SELECT tid FROM l))
                      AND t.ctid = l.tid AND t.{col} = l.old
                      RETURNING l.old, l.new, t.ctid AS tid)""")
        else:
            update = sql.SQL("""
                l AS MATERIALIZED (SELECT t.ctid AS tid, v.old, v.new FROM {table} t
                      JOIN v ON t.{col} = v.old FOR UPDATE OF t SKIP LOCKED),
                u AS (UPDATE {table} t SET {col} = l.new FROM l
                      WHERE t.ctid = ANY(ARRAY(SELECT tid FROM l))
                      AND t.ctid = l.tid AND t.{col} = l.old
                      RETURNING l.old, l.new, t.ctid AS tid)""")
        return (sql.SQL("WITH v(old, new) AS "
                        "(SELECT * FROM unnest(%(olds)s::text[], %(news)s::text[])), ")
                + update.format(table=self.table, col=self.col) + sql.SQL("""
                INSERT INTO {journal} (run_id, old_path, new_path, rows, tids)
                SELECT %(run)s, old, new, count(*), array_agg(tid) FROM u GROUP BY old, new
                RETURNING old_path, rows""").format(journal=self.journal),
                {"olds": [o for o, _ in pairs], "news": [n for _, n in pairs],
                 "run": self.run_id})

    def foresee(self, pairs: list[tuple[str, str]], counts: dict[str, int]) -> "Rewritten":
        """What a dry run can tell without writing: new keys too long for the
        column, and new keys a unique index already holds."""
        result = Rewritten()
        for old, new in pairs:
            if self.width is not None and len(new) > self.width:
                result.refused[old] = f"value too long for type {self.col_type}"
            elif self.unique_index and counts.get(new):
                result.refused[old] = (f'duplicate key value violates unique constraint '
                                       f'"{self.unique_index}" (a row already holds {new})')
        return result

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
