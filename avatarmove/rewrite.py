"""Rewriting a batch of rows: a compare-and-set UPDATE and its journal entries in
one statement; rows another transaction holds are skipped, not waited for; a
batch that meets a row-level error is written again row by row under savepoints,
so each refused row is named with the database's reason and the others land."""
from __future__ import annotations

import psycopg2
from psycopg2 import sql

from .settings import first_line

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



class Rewrites:
    """The Database's rewrites."""

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
