"""The table-wide queries of a run's summary, of --delete-source and of --verify:
rows left under the source, keys rows point at now, rows under a prefix."""
from __future__ import annotations

from typing import Iterator

from psycopg2 import sql


class Counts:
    """The Database's table-wide queries (read from the table itself, never the
    snapshot)."""

    def referenced(self, keys: list[str]) -> set[str]:
        """Keys some row points at now, read from the table itself, not the
        snapshot: a row the application set to an old key after the snapshot
        must keep its object. Without an index this scans the table."""
        def run(cur):
            cur.execute(sql.SQL("SELECT DISTINCT {col}::text FROM {table} WHERE {col} = ANY(%s)")
                        .format(col=self.col, table=self.table), (keys,))
            return {k for (k,) in cur.fetchall()}
        return self.retry(run) if keys else set()

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
