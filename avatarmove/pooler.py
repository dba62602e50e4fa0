"""Transaction poolers: found before the first copy (exit 2), since a run keeps its
lock, its snapshot and its settings in one session for its whole length."""
from __future__ import annotations

import psycopg2

from .settings import UsageError, mask_dsn


def check_pooler(dsn: str, mine) -> None:
    """A transaction-mode pooler (PgBouncer pool_mode=transaction or statement)
    hands each transaction whatever server session is free: the run's lock, its
    snapshot and its session settings would land on sessions that are not its
    own, and outlive it. Two connections open at once never share a server
    session, except through such a pooler: ask each for its backend pid, in
    turns, and compare."""
    other = psycopg2.connect(dsn, connect_timeout=10, application_name="move.py")
    try:
        other.autocommit = True
        seen: list[set[int]] = [set(), set()]
        for _ in range(3):
            for n, conn in enumerate((mine, other)):
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_backend_pid()")
                    seen[n].add(cur.fetchone()[0])
                if conn is mine:
                    conn.commit()  # ends the transaction: a pooler may hand the session on
    finally:
        other.close()
    shared = seen[0] & seen[1]
    if shared:
        raise UsageError(
            f"DB_CONN_STRING {mask_dsn(dsn)} goes through a transaction-mode "
            f"pooler (two connections were given the same server session, backend pid "
            f"{min(shared)}: PgBouncer with pool_mode=transaction or statement); move.py "
            "keeps a lock and a snapshot in its session for the whole run: connect to "
            "PostgreSQL directly, or through a session-mode pool (pool_mode=session)")
