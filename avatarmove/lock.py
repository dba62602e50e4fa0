"""One run at a time per piece of work: a PostgreSQL session advisory lock.

Two runs of the same migration at once both list the destination before the
other's copies land, so both copy everything. The lock is keyed on what makes
two runs the same work: the table, the column, both prefixes and the shard.
The whole migration (no --shard, or --rollback) takes its key exclusively; a
shard takes it shared plus its own shard key exclusively, so shards run side by
side but never beside a run of the whole, nor beside a second run of themselves.

The lock lives on the Database's own connection: a run that loses its
connection loses the lock with it, takes it again on reconnect, and stops if
another run took it meanwhile.

Advisory locks carry no data: the holder is named through its connection's
application_name, "move.py <run id> <pid>@<host>".
"""
from __future__ import annotations

import hashlib
import os
import re
import socket

from .settings import UsageError

APP_NAME_LIMIT = 63  # bytes; PostgreSQL truncates longer names (NAMEDATALEN - 1)
HOLDER = re.compile(r"^move\.py (\S+) (\d+)@(.*)$")


class LockLost(Exception):
    """Another run took this run's lock while its connection was down. Not a
    psycopg2.Error, so Database.retry does not take it for a lost connection
    and retry: it ends the run (exit 1)."""


def lock_key(*fields: str) -> int:
    """A stable signed 64-bit key (pg_advisory_lock's bigint) for these fields."""
    digest = hashlib.blake2b("\0".join(fields).encode(), digest_size=8,
                             person=b"move.py lock").digest()
    return int.from_bytes(digest, "big", signed=True)


def application_name(run_id: str) -> str:
    head = f"move.py {run_id} {os.getpid()}@"
    room = max(APP_NAME_LIMIT - len(head.encode()), 0)
    return head + socket.gethostname().encode()[:room].decode(errors="ignore")


def wanted(db, table_oid: int) -> list[tuple[int, bool]]:
    """(key, shared) for each lock this run needs, in the order they are taken.

    The table by OID: "avatars" and "public.avatars" are the same work."""
    cfg = db.cfg
    whole = (str(table_oid), db.column, cfg.source_prefix, cfg.dest_prefix)
    if not cfg.shard:
        return [(lock_key(*whole), False)]
    shard = f"shard {cfg.shard[0]}/{cfg.shard[1]}"
    return [(lock_key(*whole), True), (lock_key(*whole, shard), False)]


def take(db) -> None:
    """Take the lock now (held by another run: UsageError, exit 2, nothing
    changed yet) and again after every reconnect (LockLost, exit 1)."""
    name = application_name(db.run_id)
    locks = db.retry(lambda cur: wanted(db, _table_oid(cur, db)))
    holder = db.retry(lambda cur: _acquire(cur, locks, name))
    if holder:
        raise UsageError(f"another move.py run is already working on {_work(db)}: {holder}; "
                         "wait for it to end (or stop it), then run again")

    def again() -> None:
        with db.conn, db.conn.cursor() as cur:
            holder = _acquire(cur, locks, name)
        if holder:
            raise LockLost(f"lost the connection to the database, and with it the lock on "
                           f"{_work(db)}; another run took it meanwhile: {holder}. This run "
                           "stopped so that one run at a time works on it; the rows it wrote "
                           "are consistent and that run carries on with the rest")
    db.on_connect.append(again)


def _table_oid(cur, db) -> int:
    cur.execute("SELECT to_regclass(%s)::oid", (db.quoted_table(cur),))
    return cur.fetchone()[0]


def _work(db) -> str:
    cfg = db.cfg
    shard = f", shard {cfg.shard[0]}/{cfg.shard[1]}" if cfg.shard else ""
    return f"{db.table_name}.{db.column} ({cfg.source_prefix} -> {cfg.dest_prefix}{shard})"


def _acquire(cur, locks: list[tuple[int, bool]], name: str) -> str | None:
    """Try every lock without waiting; None when all are held, else who holds one
    (and none is kept). Never waiting means two runs cannot deadlock."""
    # Named first, so a run that fails on our lock a moment later finds who we are.
    cur.execute("SELECT set_config('application_name', %s, false)", (name,))
    got: list[tuple[int, bool]] = []
    for key, shared in locks:
        cur.execute("SELECT pg_try_advisory_lock_shared(%s)" if shared
                    else "SELECT pg_try_advisory_lock(%s)", (key,))
        if cur.fetchone()[0]:
            got.append((key, shared))
            continue
        holder = _holder(cur, key)
        for k, s in got:  # session locks outlive a rollback: release them by hand
            cur.execute("SELECT pg_advisory_unlock_shared(%s)" if s
                        else "SELECT pg_advisory_unlock(%s)", (k,))
        cur.execute("SELECT set_config('application_name', 'move.py', false)")
        return holder
    return None


def _holder(cur, key: int) -> str:
    """Who holds the lock on key, from pg_locks and pg_stat_activity. A role may not
    see other roles' sessions there (NULL columns): those parts are "unknown"."""
    cur.execute("""
        SELECT l.pid, a.application_name, a.backend_start
        FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted AND l.pid <> pg_backend_pid()
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.classid::bigint = %s AND l.objid::bigint = %s AND l.objsubid = 1
        ORDER BY a.backend_start NULLS LAST, l.pid""",
                ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF))
    found = cur.fetchall()
    if not found:
        return "a run that has just ended (try again)"
    backend_pid, app, since = found[0]
    m = HOLDER.match(app or "")
    run_id, pid, host = m.groups() if m else ("unknown", "unknown", "unknown")
    who = "a --rollback" if run_id == "rollback" else f"run {run_id}"
    when = since.strftime("%Y-%m-%d %H:%M:%S %Z").strip() if since else "unknown"
    text = (f"{who}, pid {pid} on host {host}, since {when} "
            f"(database backend pid {backend_pid})")
    if len(found) > 1:
        text += f" and {len(found) - 1} other run(s)"
    return text
