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
from collections import Counter
from dataclasses import dataclass, field

from .planning import SKIP_ARCHIVED, SKIP_KEY_TOO_LONG, SKIP_SSE_C, Item
from .settings import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, Settings

log = logging.getLogger("move")

# An item's outcome (Item.action) and the counter it adds to.
COPIED, ROWS_ONLY, SKIPPED = "copied", "rows-only", "skipped"
CONFLICT, FAILED = "conflict", "failed"
# Not an outcome of the copy but a later event of --delete-source: the source was
# replaced after its copy, so it is kept and copied again (deleting.py).
CHANGED = "changed-since-copy"
# Copied (or already there), but the database refused to rewrite its rows: they stay on
# the source, whose object is kept (even with --delete-source).
NOT_REWRITTEN = "row-not-rewritten"
# Objects that cannot be copied as they are (planning's kinds): skipped, rows left alone.
ARCHIVED, KEY_TOO_LONG, SSE_C = SKIP_ARCHIVED, SKIP_KEY_TOO_LONG, SKIP_SSE_C
ACTION_COUNTERS = {COPIED: "copied", ROWS_ONLY: "rows_only", SKIPPED: "skipped",
                   CONFLICT: "conflicts", FAILED: "failed", ARCHIVED: "archived",
                   KEY_TOO_LONG: "key_too_long", SSE_C: "sse_c",
                   NOT_REWRITTEN: "not_rewritten"}

# --json's layout, documented in docs/json.md and docs/summary.schema.json. Raised when
# a field is renamed, removed or changes meaning; new fields do not raise it.
SCHEMA_VERSION = 1

# A dry run changed nothing: its counters say what a run would do, under names that
# cannot be read as done. (deleted has no counterpart: a dry run deletes nothing.)
DRY_RUN_NAMES = {"copied": "would_copy", "rows_only": "would_rewrite_rows_only",
                 "rows_rewritten": "would_rewrite_rows"}

# Per-object lines of one kind that reach the terminal; the rest go only to --report
# and --log-file. Thousands of identical lines hide the one line that matters.
TERMINAL_LINES = 20


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else many or word + 's'}"


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
    slowdowns: int = 0
    window_peak: int = 0
    pacing: str | None = None  # what slowed the run, in a user's words (pacing.Pacer.verdict)
    rows_left_under_source: int | None = None
    rows_outside: int | None = None
    started: float = field(default_factory=time.monotonic)
    archived: int = 0
    key_too_long: int = 0
    sse_c: int = 0
    not_rewritten: int = 0  # objects whose rows the database refused (or kept locked)
    not_rewritten_by_reason: Counter = field(default_factory=Counter)
    failed_by_code: Counter = field(default_factory=Counter)
    stopped: str | None = None  # why the run stopped taking work (errors a rerun cannot cure)
    changed_since_copy: int = 0  # --delete-source: sources replaced after their copy, kept
    sources_kept: int = 0  # --delete-source: sources kept for another reason (see the log)
    rows_other_forms: int | None = None  # rows naming a source key as a URL, '/key', 'key?v'
    hidden_rows: str | None = None  # row-level security hides rows from this role: why
    storage_classes: Counter = field(default_factory=Counter)  # copied (to copy): source class

    @property
    def finished(self) -> int:
        return (self.copied + self.rows_only + self.skipped + self.conflicts + self.failed
                + self.archived + self.key_too_long + self.sse_c
                + self.not_rewritten)

    def count(self, item: Item) -> None:
        name = ACTION_COUNTERS[item.action]
        setattr(self, name, getattr(self, name) + 1)
        if item.action == FAILED:
            self.failed_by_code[item.code or "unknown"] += 1
        elif item.action == NOT_REWRITTEN:
            self.not_rewritten_by_reason[item.error] += 1
        elif item.action == COPIED:
            self.storage_classes[item.src.storage_class or "STANDARD"] += 1


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
    slowdowns: int = 0  # 503 SlowDown answers received, retried ones included
    window_peak: int = 0  # most copies in flight at once
    pacing: str | None = None  # what S3's answers slowed: a limit found, random refusals
    rows_left_under_source: int | None = None
    rows_outside: int | None = None
    archived: int = 0  # archived (GLACIER, DEEP_ARCHIVE): restore first
    key_too_long: int = 0  # destination key over S3's 1,024 bytes
    sse_c: int = 0  # encrypted with a customer-provided key (SSE-C): copy with the key
    failed_by_code: dict[str, int] = field(default_factory=dict)  # S3 error code -> objects
    not_rewritten: int = 0  # objects whose rows the database refused: rows left on the source
    not_rewritten_by_reason: dict[str, int] = field(default_factory=dict)  # reason -> objects
    stopped: str | None = None  # set when errors a rerun cannot cure stopped the run
    changed_since_copy: int = 0  # sources replaced after their copy: kept, copied again
    sources_kept: int = 0  # sources --delete-source kept for another reason
    rows_other_forms: int | None = None  # rows naming a source key in a form not rewritten
    hidden_rows: str | None = None  # set when row-level security hides rows from the role
    # objects copied (a dry run: to copy) by their source's storage class
    storage_classes: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, stats: Stats, cfg: Settings, run_id: str, row_plan: str, requests: int,
           interrupted: bool) -> "Summary":
        return cls(run_id=run_id, dry_run=cfg.dry_run, interrupted=interrupted,
                   listed=stats.listed, copied=stats.copied, rows_only=stats.rows_only,
                   skipped=stats.skipped, rows_rewritten=stats.rows_rewritten,
                   objects_without_rows=stats.objects_without_rows, conflicts=stats.conflicts,
                   failed=stats.failed, deleted=stats.deleted,
                   elapsed_s=round(time.monotonic() - stats.started, 3), requests=requests,
                   slowdowns=stats.slowdowns, window_peak=stats.window_peak, row_plan=row_plan,
                   pacing=stats.pacing,
                   rows_left_under_source=stats.rows_left_under_source,
                   rows_outside=stats.rows_outside, archived=stats.archived,
                   key_too_long=stats.key_too_long, sse_c=stats.sse_c,
                   not_rewritten=stats.not_rewritten,
                   not_rewritten_by_reason=dict(stats.not_rewritten_by_reason.most_common()),
                   failed_by_code=dict(stats.failed_by_code.most_common()),
                   stopped=stats.stopped, changed_since_copy=stats.changed_since_copy,
                   sources_kept=stats.sources_kept, rows_other_forms=stats.rows_other_forms,
                   hidden_rows=stats.hidden_rows,
                   storage_classes=dict(sorted(stats.storage_classes.items())))

    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        # A dry run shows conflicts and uncopyable objects in its counts, and exits 0.
        incomplete = self.failed or self.stopped or (not self.dry_run and (
            self.conflicts or self.archived or self.key_too_long or self.sse_c
            or self.not_rewritten))
        return EXIT_FAILED if incomplete else EXIT_OK

    def verdict(self) -> str | None:
        """The last line of a run that did not finish: what happened, what to do."""
        if self.stopped:
            return f"error: {self.stopped}"
        if self.interrupted:
            return ("interrupted: the copies in flight were finished and their rows written "
                    "(every row points at an object that exists); rerun the same command to "
                    "resume")
        parts = []
        if self.failed:
            codes = ", ".join(f"{code} {n}" for code, n in self.failed_by_code.items())
            what = plural(self.failed, "copy", "copies") + " failed"
            parts.append(f"{what} ({codes}): a rerun retries them" if codes else
                         f"{what}: a rerun retries them")
        if not self.dry_run:
            if self.conflicts:
                parts.append(f"{plural(self.conflicts, 'conflict')}: the destination object "
                             "exists with other content and was left alone; compare (--report "
                             "lists them), then rerun with --overwrite to replace them")
            if self.archived:
                parts.append(f"{plural(self.archived, 'object')} archived: restore them "
                             "(aws s3api restore-object), then rerun")
            if self.key_too_long:
                parts.append(f"{plural(self.key_too_long, 'key')} too long for the "
                             "destination: rename those objects or choose a shorter --dest-prefix")
            if self.sse_c:
                parts.append(f"{plural(self.sse_c, 'object')} encrypted with a customer key "
                             "(SSE-C): copy them with their key, or have them re-encrypted "
                             "with SSE-S3 or SSE-KMS, then rerun")
            if self.not_rewritten:
                reasons = "; ".join(f"{why} ({n})" for why, n
                                    in list(self.not_rewritten_by_reason.items())[:3])
                if len(self.not_rewritten_by_reason) > 3:
                    reasons += f"; and {len(self.not_rewritten_by_reason) - 3} other reason(s)"
                parts.append(f"the rows of {plural(self.not_rewritten, 'object')} were not "
                             f"rewritten: {reasons}: their objects are copied; fix what the "
                             "database said (widen the column, clear the duplicate key, the "
                             "trigger or policy that refuses them, or end the session holding "
                             "them locked), then run again: it rewrites just those rows")
        if not parts:
            return None
        return ("incomplete: " + "; ".join(parts) + ". Their rows still point at their sources, "
                "which exist")

    def to_dict(self) -> dict:
        d = {"schema_version": SCHEMA_VERSION, "mode": "dry-run" if self.dry_run else "run",
             **dataclasses.asdict(self), "exit_code": self.exit_code(),
             "verdict": self.verdict()}
        if self.dry_run:
            d = {DRY_RUN_NAMES.get(k, k): v for k, v in d.items() if k != "deleted"}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)

    def to_text(self, cfg: Settings) -> str:
        finished = (self.copied + self.rows_only + self.skipped + self.conflicts + self.failed
                    + self.archived + self.key_too_long + self.sse_c
                    + self.not_rewritten)
        rate = finished / self.elapsed_s if self.elapsed_s > 0 else 0.0
        title = "Dry run: nothing was changed" if self.dry_run else f"Run {self.run_id}"
        if self.stopped:  # a rerun would meet the same errors: no "rerun" here
            title += " (stopped: errors a rerun cannot cure, see below)"
        elif self.interrupted:
            title += " (interrupted: rerun to finish)"
        dry = self.dry_run
        # (label, figure, note): one column of labels, one of right-aligned figures
        counters = [
            ("listed PNGs", self.listed, ""),
            ("to copy" if dry else "copied", self.copied, ""),
            ("to rewrite rows only" if dry else "rows only", self.rows_only, ""),
            ("skipped (done)", self.skipped, ""),
            ("rows to rewrite" if dry else "rows rewritten", self.rows_rewritten, ""),
            ("objects without rows", self.objects_without_rows, ""),
            ("conflicts", self.conflicts, ""),
            ("archived (restore first)", self.archived, ""),
            ("key too long", self.key_too_long, ""),
            ("SSE-C (need their key)", self.sse_c, ""),
            ("failed", self.failed, ", ".join(f"{code} {n}"
                                               for code, n in self.failed_by_code.items())),
        ]
        if self.not_rewritten:
            counters.append(("rows would not be rewritten" if dry else "rows not rewritten",
                             self.not_rewritten, "objects, rows left on the source: " + ", ".join(
                                 f"{why} {n}" for why, n in self.not_rewritten_by_reason.items())))
        if cfg.delete_source:
            counters += [("sources deleted", self.deleted, ""),
                         ("changed since copy", self.changed_since_copy, "kept, copied again"),
                         ("sources kept", self.sources_kept,
                          "still named by a row, or copy unconfirmed")]
        width = max(len(label) for label, _, _ in counters)
        digits = max(len(str(n)) for _, n, _ in counters)
        lines = [title] + [f"  {label:<{width}}  {n:>{digits}}" + (f"  {note}" if note else "")
                           for label, n, note in counters]
        if self.storage_classes:
            kept = (f"copies in {cfg.storage_class} (--storage-class)" if cfg.storage_class
                    else "copies keep their source's class")
            lines.append("  storage classes: " + ", ".join(
                f"{name} {n}" for name, n in self.storage_classes.items()) + f" ({kept})")
        if self.rows_left_under_source is not None:
            lines.append(f"  rows under {cfg.source_prefix} with no object moved (table-wide): "
                         f"{self.rows_left_under_source}")
            lines.append(f"  rows outside {cfg.source_prefix} and {cfg.dest_prefix} (untouched): "
                         f"{self.rows_outside}")
        if self.rows_other_forms:
            lines.append(f"  rows naming {cfg.source_prefix} keys in another form (a URL, a "
                         f"leading /, ?query): {self.rows_other_forms}, not rewritten; the "
                         "sources they name are never deleted")
        if self.hidden_rows:
            lines.append(f"  rows this role cannot see were not rewritten: {self.hidden_rows}")
        lines.append(f"  row plan: {self.row_plan}; S3 requests: {self.requests} "
                     f"({self.slowdowns} SlowDown); copies in flight up to {self.window_peak}")
        if self.pacing:
            lines.append(f"  pace: {self.pacing}")
        lines.append(f"  elapsed {self.elapsed_s:.1f}s, {rate:.0f} objects/s")
        if self.stopped:
            lines.append(f"  {self.stopped}")
        return "\n".join(lines)


@dataclass
class RollbackSummary:
    """What --rollback restores (or would): shown before it changes anything, then
    the outcome; `--json` prints to_json()."""
    dry_run: bool
    run_id: str
    run_at: str
    keys: int  # keys of the run not rolled back yet
    restorable_keys: int  # of those, the ones whose source object still exists
    restorable_rows: int  # rows the journal has for them: at most this many are restored
    refused: int
    refused_keys: list[dict]
    runs: list[dict]  # every run in the journal, latest first
    source_bucket: str
    dest_bucket: str
    rows_restored: int | None = None
    exit_code: int = EXIT_OK

    def preview_text(self) -> str:
        lines = [f"Rollback of run {self.run_id} (rewrote rows at {self.run_at}): "
                 f"{self.restorable_keys} key(s), up to {self.restorable_rows} row(s) to restore; "
                 f"{self.refused} key(s) refused"]
        if self.dry_run:
            lines.append("Runs in the journal, latest first:")
            for r in self.runs[:TERMINAL_LINES]:
                state = (f"rolled back {r['rolled_back_at']}" if r["rolled_back_at"] else
                         f"{r['rows_left']} row(s) to restore")
                lines.append(f"  {r['run_id']}  {r['at']}  {r['keys']:>9} key(s) "
                             f"{r['rows']:>9} row(s)  {state}")
            if len(self.runs) > TERMINAL_LINES:
                lines.append(f"  and {len(self.runs) - TERMINAL_LINES} earlier runs (all in "
                             "--json)")
        for k in self.refused_keys[:TERMINAL_LINES]:
            lines.append(f"REFUSED: {k['dest_key']} stays: its source {k['source_key']} "
                         f"cannot be restored: {k['reason']}")
        if self.refused > TERMINAL_LINES:
            lines.append(f"REFUSED: and {self.refused - TERMINAL_LINES} more (every one is in "
                         "--json)")
        return "\n".join(lines)

    def to_text(self) -> str:
        if self.dry_run:
            return (f"Dry run: nothing was changed. Rollback of run {self.run_id} would restore "
                    f"up to {self.restorable_rows} row(s) for {self.restorable_keys} key(s); "
                    f"{self.refused} key(s) refused.")
        return (f"Rollback of run {self.run_id}: {self.rows_restored} row(s) restored for "
                f"{self.restorable_keys} key(s); {self.refused} key(s) refused. Copies in "
                f"s3://{self.dest_bucket} were left in place.")

    def verdict(self) -> str | None:
        if not self.refused or self.dry_run:
            return None
        return (f"rollback of run {self.run_id} incomplete: {self.refused} key(s) keep their "
                f"new paths, their sources cannot be restored in s3://{self.source_bucket} "
                f"(the copies in s3://{self.dest_bucket} still serve them); restore those "
                "source objects, "
                f"then run --rollback {self.run_id} again")

    def to_dict(self) -> dict:
        d = {"schema_version": SCHEMA_VERSION, "mode": "rollback", "dry_run": self.dry_run,
             "run_id": self.run_id, "run_at": self.run_at, "keys": self.keys,
             "restorable_keys": self.restorable_keys}
        if self.dry_run:
            d["would_restore_rows"] = self.restorable_rows
        else:
            d["rows_restored"] = self.rows_restored
        d.update(refused=self.refused, refused_keys=self.refused_keys, runs=self.runs,
                 exit_code=self.exit_code, verdict=self.verdict())
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


# A dry run's per-object actions, named like its counters (DRY_RUN_NAMES).
DRY_RUN_ACTIONS = {COPIED: "would-copy", ROWS_ONLY: "would-rewrite-rows-only"}


def object_record(item: Item, dry_run: bool) -> dict:
    """One line of --jsonl: what happened to one object (schema: $defs/object)."""
    action = DRY_RUN_ACTIONS.get(item.action, item.action) if dry_run else item.action
    return {"source_key": item.src.key, "dest_key": item.dest_key, "action": action,
            "rows": item.rows, "error": item.error or None}


class AboveTheBar(logging.StreamHandler):
    """Writes each line with tqdm.write: the bar is cleared, the line written, the
    bar redrawn below it; a plain write would land in the middle of the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - as logging.StreamHandler does
            self.handleError(record)


def above_the_bar(logger: logging.Logger) -> list[tuple[logging.Handler, logging.Handler]]:
    """Swap the logger's terminal handlers for ones that write above the bar, with the
    same level, format and filters (what tqdm's logging_redirect_tqdm does, less the
    level it drops: the logger passes DEBUG on for --log-file). Returns the swaps."""
    swaps = []
    for handler in list(logger.handlers):
        if type(handler) is logging.StreamHandler and getattr(handler, "stream", None) in (
                sys.stderr, sys.stdout):
            mine = AboveTheBar(handler.stream)
            mine.setLevel(handler.level)
            mine.setFormatter(handler.formatter)
            for f in handler.filters:
                mine.addFilter(f)
            logger.removeHandler(handler)
            logger.addHandler(mine)
            swaps.append((mine, handler))
    return swaps


class Reporter:
    def __init__(self, cfg: Settings, quiet: bool):
        self.cfg, self.quiet = cfg, quiet
        self.bar = None
        self.report = self.report_file = self.jsonl = None
        self.last_log = time.monotonic()
        self.pacer = None  # the run's Pacer: the progress line says what slows the run
        self.shown: Counter = Counter()  # per-object lines logged, by action
        if cfg.report:
            self.report_file = open(cfg.report, "w", newline="", encoding="utf-8")
            self.report = csv.writer(self.report_file)
            self.report.writerow(["source_key", "dest_key", "action", "rows_rewritten", "error"])
        if cfg.jsonl:
            self.jsonl = open(cfg.jsonl, "w", encoding="utf-8")
        self.console: list[tuple[logging.Handler, logging.Handler]] = []
        if not quiet and cfg.progress and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=None, unit="obj", file=sys.stderr, dynamic_ncols=True,
                            desc="dry run" if cfg.dry_run else "migrating")
            self.console = above_the_bar(log)

    def item(self, item: Item, stats: Stats) -> None:
        if self.report:
            self.report.writerow([item.src.key, item.dest_key, item.action, item.rows, item.error])
        if self.jsonl:
            self.jsonl.write(json.dumps(object_record(item, self.cfg.dry_run)) + "\n")
        if item.action == FAILED:
            self.per_object(logging.ERROR, item, "failed: %s -> %s: %s", item.src.key,
                            item.dest_key, item.error)
        elif item.action == CONFLICT:
            self.per_object(logging.WARNING, item, "conflict: %s exists with different content "
                            "(size %s, source %s); left alone (use --overwrite)", item.dest_key,
                            item.dest.size if item.dest else "?", item.src.size)
        elif item.action == ARCHIVED:
            self.per_object(logging.WARNING, item, "archived: %s -> %s: %s: skipped, its rows "
                            "stay on the source; restore the object (aws s3api restore-object), "
                            "then rerun", item.src.key, item.dest_key, item.error)
        elif item.action == NOT_REWRITTEN:
            self.per_object(logging.ERROR, item, "row %s: %s: %s",
                            "would not be rewritten" if self.cfg.dry_run else "not rewritten",
                            item.src.key, item.error)
        elif item.action == KEY_TOO_LONG:
            self.per_object(logging.WARNING, item, "key too long: %s -> %s: %s: skipped, its rows "
                            "stay on the source; a rerun cannot copy it: rename the source "
                            "object or choose a shorter --dest-prefix", item.src.key,
                            item.dest_key, item.error)
        elif item.action == SSE_C:
            self.per_object(logging.WARNING, item, "SSE-C: %s -> %s: %s: skipped, its rows stay "
                            "on the source; copy it with its key (aws s3api copy-object "
                            "--copy-source-sse-customer-algorithm AES256 "
                            "--copy-source-sse-customer-key ...), or have its owner re-encrypt "
                            "it with SSE-S3 or SSE-KMS, then rerun", item.src.key, item.dest_key,
                            item.error)
        if self.bar is not None:
            if self.pacer is not None and self.bar.n % 50 == 0:
                self.bar.set_postfix_str(self.pacer.verdict() or "", refresh=False)
            self.bar.update(1)
        elif not self.quiet and time.monotonic() - self.last_log >= 5:
            self.last_log = time.monotonic()
            elapsed = time.monotonic() - stats.started
            said = self.pacer.verdict() if self.pacer is not None else None
            log.info("progress: %d done (%d copied, %d rows rewritten, %d failed), %.0f obj/s%s",
                     stats.finished, stats.copied, stats.rows_rewritten, stats.failed,
                     stats.finished / elapsed if elapsed else 0, f"; {said}" if said else "")

    def changed(self, item: Item, what: str, stats: Stats) -> None:
        """--delete-source found the source replaced after its copy (deleting.py)."""
        if self.report:
            self.report.writerow([item.src.key, item.dest_key, CHANGED, item.rows, what])
        n = stats.changed_since_copy
        log.warning("changed since copy: %s: %s", item.src.key, what,
                    extra={"terminal": n <= TERMINAL_LINES})

    def per_object(self, level: int, item: Item, msg: str, *args) -> None:
        """One line per object: all of them to --log-file, the first TERMINAL_LINES of each
        kind to the terminal too, then one line saying where the others are."""
        self.shown[item.action] += 1
        n = self.shown[item.action]
        log.log(level, msg, *args, extra={"terminal": n <= TERMINAL_LINES})
        if n == TERMINAL_LINES + 1:
            what = {FAILED: "failures", CONFLICT: "conflicts", ARCHIVED: "archived objects",
                    KEY_TOO_LONG: "keys too long", SSE_C: "SSE-C objects",
                    NOT_REWRITTEN: "rows not rewritten"}[item.action]
            kept = [name for name, on in (("--report", self.report is not None),
                                          ("--log-file", any(isinstance(h, logging.FileHandler)
                                                             for h in log.handlers))) if on]
            if kept:
                log.log(level, "further per-object %s are only in %s", what, " and ".join(kept))
            else:
                log.log(level, "further per-object %s are not shown (pass --report PATH or "
                        "--log-file PATH to keep every one); the summary counts them", what)

    def close(self) -> None:
        for mine, theirs in self.console:
            log.removeHandler(mine)
            log.addHandler(theirs)
        self.console = []
        if self.bar is not None:
            self.bar.close()
        if self.report_file:
            self.report_file.close()
        if self.jsonl:
            self.jsonl.close()
