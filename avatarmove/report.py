"""Report: what happened to each object (typed outcomes), the run's counters, and
the summary as data, rendered as JSON or text at the edge. The Reporter is the
only thing that writes to the terminal or the report file during a run."""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field

from .planning import Item
from .settings import Settings

log = logging.getLogger("move")

# An item's outcome (Item.action) and the counter it adds to.
COPIED, ROWS_ONLY, SKIPPED, CONFLICT, FAILED = "copied", "rows-only", "skipped", "conflict", "failed"
ACTION_COUNTERS = {COPIED: "copied", ROWS_ONLY: "rows_only", SKIPPED: "skipped",
                   CONFLICT: "conflicts", FAILED: "failed"}


@dataclass
class Stats:
    listed: int = 0
    copied: int = 0
    rows_only: int = 0
    skipped: int = 0
    conflicts: int = 0
    failed: int = 0
    rows_rewritten: int = 0
    objects_without_rows: int = 0
    deleted: int = 0
    rows_left_under_source: int | None = None
    rows_outside: int | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> int:
        return self.copied + self.rows_only + self.skipped + self.conflicts + self.failed

    def count(self, item: Item) -> None:
        name = ACTION_COUNTERS[item.action]
        setattr(self, name, getattr(self, name) + 1)


@dataclass
class Summary:
    """What one run did: `--json` prints exactly this."""
    run_id: str
    dry_run: bool
    interrupted: bool
    listed: int
    copied: int
    rows_only: int
    skipped: int
    rows_rewritten: int
    objects_without_rows: int
    conflicts: int
    failed: int
    deleted: int
    elapsed_s: float
    requests: int
    row_plan: str
    rows_left_under_source: int | None = None
    rows_outside: int | None = None

    @classmethod
    def of(cls, stats: Stats, cfg: Settings, run_id: str, row_plan: str, requests: int,
           interrupted: bool) -> "Summary":
        return cls(run_id=run_id, dry_run=cfg.dry_run, interrupted=interrupted,
                   listed=stats.listed, copied=stats.copied, rows_only=stats.rows_only,
                   skipped=stats.skipped, rows_rewritten=stats.rows_rewritten,
                   objects_without_rows=stats.objects_without_rows, conflicts=stats.conflicts,
                   failed=stats.failed, deleted=stats.deleted,
                   elapsed_s=round(time.monotonic() - stats.started, 3), requests=requests,
                   row_plan=row_plan, rows_left_under_source=stats.rows_left_under_source,
                   rows_outside=stats.rows_outside)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=False)

    def to_text(self, cfg: Settings) -> str:
        finished = self.copied + self.rows_only + self.skipped + self.conflicts + self.failed
        rate = finished / self.elapsed_s if self.elapsed_s > 0 else 0.0
        title = "Dry run: nothing was changed" if self.dry_run else f"Run {self.run_id}"
        if self.interrupted:
            title += " (interrupted: rerun to finish)"
        verb = "to copy" if self.dry_run else "copied"
        rows_verb = "rows to rewrite" if self.dry_run else "rows rewritten"
        lines = [
            title,
            f"  listed PNGs            {self.listed}",
            f"  {verb:<22} {self.copied}",
            f"  {'rows only' if not self.dry_run else 'to rewrite rows only':<22} {self.rows_only}",
            f"  skipped (done)         {self.skipped}",
            f"  {rows_verb:<22} {self.rows_rewritten}",
            f"  objects without rows   {self.objects_without_rows}",
            f"  conflicts              {self.conflicts}",
            f"  failed                 {self.failed}",
        ]
        if cfg.delete_source:
            lines.append(f"  sources deleted        {self.deleted}")
        if self.rows_left_under_source is not None:
            lines.append(f"  rows under {cfg.source_prefix} with no object moved (table-wide): "
                         f"{self.rows_left_under_source}")
            lines.append(f"  rows outside {cfg.source_prefix} and {cfg.dest_prefix} (untouched): "
                         f"{self.rows_outside}")
        lines.append(f"  row plan: {self.row_plan}; S3 requests: {self.requests}")
        lines.append(f"  elapsed {self.elapsed_s:.1f}s, {rate:.0f} objects/s")
        return "\n".join(lines)


class Reporter:
    def __init__(self, cfg: Settings, quiet: bool):
        self.cfg, self.quiet = cfg, quiet
        self.bar = None
        self.total: int | None = None
        self.report = self.report_file = None
        self.last_log = time.monotonic()
        if cfg.report:
            self.report_file = open(cfg.report, "w", newline="", encoding="utf-8")
            self.report = csv.writer(self.report_file)
            self.report.writerow(["source_key", "dest_key", "action", "rows_rewritten", "error"])
        if not quiet and cfg.progress and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=None, unit="obj", file=sys.stderr, dynamic_ncols=True,
                            desc="dry run" if cfg.dry_run else "migrating")

    def set_total(self, total: int) -> None:
        """From the counting thread; the bar itself is only touched by the main thread."""
        self.total = total

    def item(self, item: Item, stats: Stats) -> None:
        if self.report:
            self.report.writerow([item.src.key, item.dest_key, item.action, item.rows, item.error])
        if item.action == FAILED:
            log.error("failed: %s -> %s: %s", item.src.key, item.dest_key, item.error)
        elif item.action == CONFLICT:
            log.warning("conflict: %s exists with different content (size %s, source %s); "
                        "left alone (use --overwrite)", item.dest_key,
                        item.dest.size if item.dest else "?", item.src.size)
        if self.bar is not None:
            if self.total is not None and self.bar.total != self.total:
                self.bar.total = self.total
            self.bar.update(1)
        elif not self.quiet and time.monotonic() - self.last_log >= 5:
            self.last_log = time.monotonic()
            elapsed = time.monotonic() - stats.started
            log.info("progress: %d done (%d copied, %d rows rewritten, %d failed), %.0f obj/s",
                     stats.finished, stats.copied, stats.rows_rewritten, stats.failed,
                     stats.finished / elapsed if elapsed else 0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.report_file:
            self.report_file.close()
