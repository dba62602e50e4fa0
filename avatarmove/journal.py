"""The journal: one row per (run, old key, new key) with the ctids rewritten, so
--rollback can restore exactly the rows of one run. Its SQL lives here."""
from __future__ import annotations

import logging

import psycopg2
import psycopg2.errors
from psycopg2 import sql

from .settings import UsageError, first_line

log = logging.getLogger("move")

JOURNAL_COLUMNS = {"id", "run_id", "old_path", "new_path", "rows", "tids", "at", "rolled_back_at"}


def journal_table(table) -> sql.Identifier:
    """avatars -> avatars_move_journal, in the table's own schema (table: the
    names, schema first, or "schema.table")."""
    parts = table.split(".") if isinstance(table, str) else list(table)
    return sql.Identifier(*parts[:-1], parts[-1] + "_move_journal")


def _name(journal: sql.Identifier) -> str:
    return journal.strings[-1]


def _exists(cur, journal: sql.Identifier) -> bool:
    cur.execute("SELECT to_regclass(%s)", (journal.as_string(cur),))
    return cur.fetchone()[0] is not None


def ensure_journal(db) -> None:
    """Create the journal once. Skipped when it exists: PostgreSQL checks CREATE
    privilege even for IF NOT EXISTS, and shards starting together race on it."""
    journal = db.journal

    def create(cur):
        if _exists(cur, journal):
            return _upgrade(cur, journal)
        cur.execute(sql.SQL("""
            CREATE TABLE IF NOT EXISTS {} (
                id bigserial PRIMARY KEY,
                run_id text NOT NULL,
                old_path text NOT NULL,
                new_path text NOT NULL,
                rows integer NOT NULL,
                tids tid[],
                at timestamptz NOT NULL DEFAULT now(),
                rolled_back_at timestamptz)""").format(journal))
        cur.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (run_id)").format(
            sql.Identifier(_name(journal) + "_run_idx"), journal))
    try:
        db.retry(create)
    except psycopg2.errors.InsufficientPrivilege as exc:
        raise UsageError(f"cannot create the journal {_name(journal)!r}: "
                         f"{first_line(exc)}; grant CREATE on the schema, or create it "
                         "first with deploy/prepare.sql") from None
    except (psycopg2.errors.UniqueViolation, psycopg2.errors.DuplicateTable):
        # Another shard created it between our check and our CREATE.
        db.conn.rollback()
        if not db.retry(lambda cur: _exists(cur, journal)):
            raise


def _upgrade(cur, journal: sql.Identifier) -> None:
    """A journal made by an earlier version (or an old deploy/prepare.sql) lacks
    the row ids that rollback restores by."""
    cur.execute("SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                "AND attnum > 0 AND NOT attisdropped", (journal.as_string(cur),))
    missing = JOURNAL_COLUMNS - {name for (name,) in cur.fetchall()}
    if missing - {"tids"}:
        raise UsageError(f"table {_name(journal)!r} exists but is not move.py's "
                         f"journal (no column {', '.join(sorted(missing))}); rename it, or "
                         "recreate it with deploy/prepare.sql")
    if missing:
        log.info("adding column tids to the journal %s", _name(journal))
        try:
            cur.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS tids tid[]")
                        .format(journal))
        except psycopg2.errors.InsufficientPrivilege:
            raise UsageError(f"the journal {_name(journal)!r} predates column "
                             "tids and this role cannot add it; as its owner run: "
                             f"ALTER TABLE {journal.as_string(cur)} "
                             "ADD COLUMN tids tid[]") from None


# ---------------------------------------------------------------- rollback's SQL


def journal_runs(cur, journal: sql.Identifier) -> list[dict]:
    """Every run in the journal, latest first: what it rewrote and what of it is
    not rolled back yet. An absent journal (nothing ever rewritten) has no runs."""
    if not _exists(cur, journal):
        return []
    cur.execute(sql.SQL("""
        SELECT run_id, min(at), count(*), coalesce(sum(rows), 0),
               count(*) FILTER (WHERE rolled_back_at IS NULL),
               coalesce(sum(rows) FILTER (WHERE rolled_back_at IS NULL), 0),
               max(rolled_back_at)
        FROM {} GROUP BY run_id ORDER BY min(at) DESC, max(id) DESC""").format(journal))
    return [{"run_id": r, "at": at.isoformat(), "keys": keys, "rows": int(rows),
             "keys_left": keys_left, "rows_left": int(rows_left),
             "rolled_back_at": back.isoformat() if back and not keys_left else None}
            for r, at, keys, rows, keys_left, rows_left, back in cur.fetchall()]


def run_entries(cur, journal: sql.Identifier, run: str) -> list[tuple[str, str, int]]:
    """(old, new, rows) of the keys a run rewrote that are not rolled back yet."""
    cur.execute(sql.SQL("SELECT old_path, new_path, sum(rows) FROM {} WHERE run_id = %s "
                        "AND rolled_back_at IS NULL GROUP BY old_path, new_path "
                        "ORDER BY old_path").format(journal), (run,))
    return [(old, new, int(n)) for old, new, n in cur.fetchall()]


def undo(cur, db, run: str, olds: list[str]) -> int:
    """Point the rows one run rewrote for these old keys back at them; returns rows restored.

    The rows are found by the ctid each got then; a row updated since has
    moved, and is found by value (as many as the run rewrote).
    """
    cur.execute(sql.SQL("""
        WITH j AS (SELECT id, old_path, new_path, rows, tids FROM {journal}
                   WHERE run_id = %(run)s AND rolled_back_at IS NULL
                     AND old_path = ANY(%(olds)s)),
        u AS (UPDATE {table} t SET {col} = j.old_path
              FROM j CROSS JOIN LATERAL unnest(j.tids) AS x(tid)
              WHERE t.ctid = x.tid AND t.{col} = j.new_path RETURNING j.id)
        SELECT j.old_path, j.new_path, count(u.id), j.rows - count(u.id)
        FROM j LEFT JOIN u ON u.id = j.id
        GROUP BY j.id, j.old_path, j.new_path, j.rows""").format(
            journal=db.journal, table=db.table, col=db.col), {"run": run, "olds": olds})
    n = 0
    for old, new, restored, left in cur.fetchall():
        n += restored
        if left > 0:
            cur.execute(sql.SQL("""
                UPDATE {table} SET {col} = %s WHERE ctid = ANY(ARRAY(
                    SELECT ctid FROM {table} WHERE {col} = %s LIMIT %s))""").format(
                    table=db.table, col=db.col), (old, new, left))
            n += cur.rowcount
    cur.execute(sql.SQL("UPDATE {} SET rolled_back_at = now() WHERE run_id = %s "
                        "AND old_path = ANY(%s)").format(db.journal), (run, olds))
    return n
