"""Finding the table and column a user named, what the database will refuse or
skip (column width, unique index, triggers, policies), and the row plan: with an
index on the path column every batch looks rows up by value ("index"); without
one, the table is scanned once into an indexed temp table and rows are reached
by ctid ("snapshot"); on a read-only database without one, by value ("scan")."""
from __future__ import annotations

import logging

import psycopg2
from psycopg2 import sql

from .connection import connection_lost
from .journal import journal_table
from .rewrite import Rewritten
from .settings import UsageError, first_line

log = logging.getLogger("move")

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



class RowPlan:
    """The Database's names, column facts and row plan."""

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

    def _can_snapshot(self, cur) -> bool:
        cur.execute("SELECT NOT current_setting('transaction_read_only')::bool "
                    "AND has_database_privilege(current_database(), 'TEMPORARY')")
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
