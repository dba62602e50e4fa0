"""Database: the run's one connection to PostgreSQL and everything it asks of it,
one part per module: connection (connect, retry, cancel, close), grants (what the
role may do), rowplan (names, column facts, index or snapshot, lookups), rewrite
(compare-and-set batches, rows refused or locked), counts (table-wide queries).
"""
from __future__ import annotations

import logging
import threading

import psycopg2
from psycopg2 import sql

from .connection import DEFAULT_LOCK_TIMEOUT_MS, Connection
from .counts import Counts
from .grants import Grants
from .journal import journal_table
from .pooler import check_pooler
from .rewrite import Rewrites
from .rowplan import SKIPPED_REASON, RowPlan, split_name
from .settings import Settings, UsageError, first_line, mask_dsn

log = logging.getLogger("move")


class Database(Connection, Grants, RowPlan, Rewrites, Counts):
    """Used by one thread at a time (the run's database thread)."""

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
        check_pooler(self.cfg.db, self.conn)
