"""Rollback: point the rows of one run back at their old keys, where those still exist.

Copies stay in the destination bucket: the application may already serve them.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from .copying import head
from .database import Database
from .journal import ensure_journal, latest_run, run_entries, undo
from .lock import take as take_lock
from .run import preflight
from .settings import EXIT_FAILED, EXIT_OK, Settings, UsageError


def rollback(s3, cfg: Settings, run: str) -> int:
    db = Database(cfg, "rollback")
    preflight(s3, db, cfg)
    db.check_writable(rollback=True)
    take_lock(db)  # a rollback racing a run of the same work is as bad as two runs
    ensure_journal(db)
    with db.conn, db.conn.cursor() as cur:
        if run == "latest":
            run = latest_run(cur, db.journal)
            if run is None:
                raise UsageError("no run to roll back: the journal has no rewrites left")
        entries = run_entries(cur, db.journal, run)
    if not entries:
        raise UsageError(f"run {run!r} has nothing to roll back (unknown run id, or already "
                         "rolled back); list runs with: SELECT DISTINCT run_id FROM "
                         f"{db.journal.strings[-1]}")
    with ThreadPoolExecutor(cfg.workers) as pool:
        exists = list(pool.map(lambda e: head(s3, cfg.source_bucket, e[0]) is not None, entries))
    ok = [e for e, present in zip(entries, exists) if present]
    refused = [e for e, present in zip(entries, exists) if not present]
    for old, new in refused:
        print(f"REFUSED: {new} stays: its source {old} no longer exists in "
              f"s3://{cfg.source_bucket}", flush=True)
    restored = 0
    for start in range(0, len(ok), cfg.batch_size):
        olds = [o for o, _ in ok[start:start + cfg.batch_size]]
        restored += db.retry(lambda cur, olds=olds: undo(cur, db, run, olds))
    db.close()
    print(f"Rollback of run {run}: {restored} row(s) restored for {len(ok)} key(s); "
          f"{len(refused)} key(s) refused. Copies in s3://{cfg.dest_bucket} were left in place.",
          flush=True)
    return EXIT_FAILED if refused else EXIT_OK
