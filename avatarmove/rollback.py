"""Rollback: point the rows of one run back at their old keys, where those still exist.

Copies stay in the destination bucket: the application may already serve them.
The run is named (a run id, or `latest`) and shown before anything changes;
`latest` never means an older run because the newest one is already rolled
back: that must be asked for by name.
"""
from __future__ import annotations

import logging
import sys
from concurrent.futures import ThreadPoolExecutor

from .copying import head
from .database import Database
from .deleting import recover, source_versioning
from .journal import ensure_journal, journal_runs, run_entries, undo
from .lock import take as take_lock
from .report import RollbackSummary
from .run import preflight, settings_source
from .settings import EXIT_FAILED, EXIT_OK, Settings, UsageError

log = logging.getLogger("move")


def choose(runs: list[dict], wanted: str, journal: str) -> dict:
    """The run to roll back, or a UsageError saying why none is and what to type."""
    if not runs:
        raise UsageError(f"no run to roll back: the journal {journal} has no rewrites")
    left = [r for r in runs if r["keys_left"]]
    if wanted == "latest":
        run = runs[0]
        if not run["keys_left"]:
            earlier = (f"; to undo an earlier run, name it: --rollback {left[0]['run_id']} "
                       f"({left[0]['rows_left']} row(s)), after a look with --dry-run"
                       if left else "; no earlier run has rows left to restore")
            raise UsageError(f"the latest run {run['run_id']} is already rolled back "
                             f"({run['rolled_back_at']}): nothing changed{earlier}")
        return run
    run = next((r for r in runs if r["run_id"] == wanted), None)
    if run is None:
        raise UsageError(f"run {wanted!r} is not in the journal {journal} (it rewrote no rows, "
                         "or the id is mistyped); `--rollback latest --dry-run` shows the runs")
    if not run["keys_left"]:
        raise UsageError(f"run {wanted!r} has nothing to roll back: already rolled back "
                         f"({run['rolled_back_at']})")
    return run


def rollback(s3, cfg: Settings, wanted: str) -> int:
    db = Database(cfg, "rollback", readonly=cfg.dry_run)
    preflight(s3, db, cfg)
    log.info("rollback: settings from %s", settings_source(cfg))
    if not cfg.dry_run:  # a dry run only reads: no lock, no journal created
        db.check_writable(rollback=True)
        take_lock(db)  # a rollback racing a run of the same work is as bad as two runs
        ensure_journal(db)
    journal = ".".join(db.journal.strings)
    runs = db.retry(lambda cur: journal_runs(cur, db.journal))
    try:
        run = choose(runs, wanted, journal)
    except UsageError:
        db.close()
        raise
    entries = db.retry(lambda cur: run_entries(cur, db.journal, run["run_id"]))
    versioning: list = []  # asked once, and only when a source is missing

    def why_not(entry) -> str | None:
        """None when the source exists, or can be (was, unless a dry run) brought back
        from its noncurrent versions; else why not."""
        if head(s3, cfg.source_bucket, entry[0]) is not None:
            return None
        if not versioning:
            versioning.append(source_versioning(s3, cfg.source_bucket))
        return recover(s3, cfg, entry[0], versioning[0], restore=not cfg.dry_run)
    with ThreadPoolExecutor(min(cfg.workers, 64)) as pool:
        reasons = list(pool.map(why_not, entries))
    ok = [e for e, why in zip(entries, reasons) if why is None]
    refused = [(*e, why) for e, why in zip(entries, reasons) if why is not None]
    result = RollbackSummary(
        dry_run=cfg.dry_run, run_id=run["run_id"], run_at=run["at"], keys=len(entries),
        restorable_keys=len(ok), restorable_rows=sum(n for _, _, n in ok),
        refused=len(refused),
        refused_keys=[{"source_key": old, "dest_key": new, "reason": why}
                      for old, new, _, why in refused],
        runs=runs, source_bucket=cfg.source_bucket, dest_bucket=cfg.dest_bucket)
    if not cfg.json:
        print(result.preview_text(), flush=True)
    if not cfg.dry_run:
        restored = 0
        for start in range(0, len(ok), cfg.batch_size):
            olds = [o for o, _, _ in ok[start:start + cfg.batch_size]]
            restored += db.retry(lambda cur, olds=olds: undo(cur, db, run["run_id"], olds))
        result.rows_restored = restored
    db.close()
    code = EXIT_FAILED if refused and not cfg.dry_run else EXIT_OK
    result.exit_code = code
    print(result.to_json() if cfg.json else result.to_text(), flush=True)
    if code != EXIT_OK:
        print(f"move.py: {result.verdict()}", file=sys.stderr, flush=True)
    return code

