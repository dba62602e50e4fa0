"""Verify: a read-only reconciliation of both buckets and the table, one line per problem."""
from __future__ import annotations

import csv
import json
import logging
import random
import sys
import threading
from collections import Counter

from botocore.exceptions import ClientError

from . import references
from .access import SAMPLE, less_readable
from .copying import Boto3Engine, head
from .database import Database
from .identity import NeedsCustomerKey, described, identical
from .listing import Listing, listed
from .planning import CHECK, CONFLICT, COPY, DONE, plan
from .run import preflight, settings_source
from .report import SCHEMA_VERSION, TERMINAL_LINES
from .settings import EXIT_FAILED, EXIT_OK, Settings

log = logging.getLogger("move")


class Problems:
    """Every problem goes to --report, --jsonl and the --json summary; the terminal
    gets the first TERMINAL_LINES of each kind (thousands of MISSING-COPY lines
    mid-migration hide the one DANGLING-ROW that matters) and the counts."""

    def __init__(self, cfg: Settings):
        self.cfg = cfg
        self.counts: Counter[str] = Counter()
        self.items: list[dict] = []  # kept only for --json
        self.report_file = self.report = self.jsonl = None
        if self.cfg.report:
            self.report_file = open(self.cfg.report, "w", newline="", encoding="utf-8")
            self.report = csv.writer(self.report_file)
            self.report.writerow(["kind", "key", "rows", "message"])
        if self.cfg.jsonl:
            self.jsonl = open(self.cfg.jsonl, "w", encoding="utf-8")

    def __call__(self, kind: str, text: str, key: str | None = None,
                 rows: int | None = None) -> None:
        self.counts[kind] += 1
        record = {"kind": kind, "key": key, "rows": rows, "message": text}
        if self.cfg.json:
            self.items.append(record)
        if self.report:
            self.report.writerow([kind, key or "", "" if rows is None else rows, text])
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
        if self.cfg.json:
            return
        n = self.counts[kind]
        if n <= TERMINAL_LINES:
            print(f"{kind}: {text}", flush=True)
        elif n == TERMINAL_LINES + 1:
            kept = " and ".join(name for name, on in (("--report", self.report),
                                                      ("--jsonl", self.jsonl)) if on)
            print(f"{kind}: further {kind} problems are " +
                  (f"only in {kept}" if kept else "not shown (pass --report PATH, --jsonl "
                   "PATH or --json to get every one)") + "; the last line counts them",
                  flush=True)

    def close(self) -> None:
        for f in (self.report_file, self.jsonl):
            if f:
                f.close()

    def line(self) -> str:
        total = sum(self.counts.values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        return f"{total} problem(s)" + (f": {detail}" if total else "")


def verify(s3, cfg: Settings) -> int:
    db = Database(cfg, "verify", readonly=True)
    preflight(s3, db, cfg)
    log.info("verify: settings from %s", settings_source(cfg))
    if db.plan_name == "snapshot":
        db.build_snapshot()
    problem = Problems(cfg)
    hidden = references.hidden_rows(db)
    if hidden:  # a clean verdict from a role that sees some rows is no verdict
        problem("INCOMPLETE", f"{hidden}: the rows it cannot see were not checked")
    checked = check_objects(s3, db, cfg, problem)
    rows = check_rows_under(s3, db, cfg.dest_bucket, cfg.dest_prefix, problem)
    rows += check_rows_under(s3, db, cfg.source_bucket, cfg.source_prefix, problem)
    rows += check_other_forms(s3, db, cfg, problem)
    db.close()
    problem.close()
    code = EXIT_OK if not problem.counts else EXIT_FAILED
    if cfg.json:
        print(json.dumps({
            "schema_version": SCHEMA_VERSION, "mode": "verify", "exit_code": code,
            "verdict": verdict(problem.counts) if problem.counts else None,
            "checked_objects": checked, "checked_rows": rows,
            "problem_count": sum(problem.counts.values()),
            "problem_counts": dict(sorted(problem.counts.items())),
            "problems": problem.items}), flush=True)
    else:
        print(f"Verify: {checked} source PNGs and {rows} rows checked; {problem.line()}",
              flush=True)
    if problem.counts:
        print(f"move.py: {verdict(problem.counts)}", file=sys.stderr, flush=True)
    return code


# What to do about each kind of problem, for the verdict line.
REMEDY = {
    "MISSING-COPY": "a run copies them",
    "NOT-REWRITTEN": "a run rewrites them",
    "MISMATCH": "compare them; a run with --overwrite replaces the copies",
    "DANGLING-ROW": "a run copies the object again where its source exists; else restore it",
}


def verdict(counts: Counter) -> str:
    total = sum(counts.values())
    what = "; ".join(f"{kind} {n}: {REMEDY.get(kind, 'see the lines above')}"
                     for kind, n in sorted(counts.items()))
    return f"verify found {total} problem(s): {what}"


def check_objects(s3, db: Database, cfg: Settings, problem: Problems) -> int:
    """Every source PNG has an equal copy, and no row still points at the source."""
    def check_rows(pairs: list[tuple[str, str]]) -> None:
        counts = db.lookup([k for pair in pairs for k in pair])
        for old, new in pairs:
            if counts.get(old):
                problem("NOT-REWRITTEN", f"{counts[old]} row(s) still point at {old} (copy: {new})",
                        key=old, rows=counts[old])

    engine, stop = Boto3Engine(s3), threading.Event()
    src = Listing(engine, cfg.source_bucket, cfg.source_prefix)
    dest = Listing(engine, cfg.dest_bucket, cfg.dest_prefix)
    pairs: list[tuple[str, str]] = []
    sample: list[tuple[str, str]] = []  # copies whose readers are checked: a few requests
    pick = random.Random(0)
    checked = 0
    for item in plan(listed(src, stop), listed(dest, stop), cfg, src, dest):
        checked += 1
        if item.kind == CHECK:  # absent from an unordered listing, or ETags that cannot tell
            item.dest = described(s3, cfg.dest_bucket, item.dest_key)
            try:
                item.kind = (COPY if item.dest is None else
                             DONE if identical(s3, cfg.source_bucket, item.src, cfg.dest_bucket,
                                               item.dest) else CONFLICT)
            except NeedsCustomerKey:
                problem("SSE-C", f"{item.src.key} is encrypted with a customer-provided key "
                                 f"(SSE-C): its copy {item.dest_key} cannot be compared",
                        key=item.src.key)
                item.kind = DONE
        if item.kind == COPY:
            problem("MISSING-COPY", f"{item.src.key} has no copy at {item.dest_key}",
                    key=item.src.key)
        elif item.kind == CONFLICT:
            problem("MISMATCH", f"{item.dest_key} (size {item.dest.size}, etag {item.dest.etag}) "
                                f"differs from {item.src.key} (size {item.src.size}, "
                                f"etag {item.src.etag})", key=item.dest_key)
        else:  # rows of an object with no good copy stay on the source by design: one problem
            pairs.append((item.src.key, item.dest_key))
            if item.kind == DONE:  # a reservoir: every copy as likely to be in the sample
                if len(sample) < SAMPLE or pick.randrange(checked) < SAMPLE:
                    if len(sample) >= SAMPLE:
                        sample.pop(pick.randrange(SAMPLE))
                    sample.append((item.src.key, item.dest_key))
        if len(pairs) >= cfg.batch_size:
            check_rows(pairs)
            pairs = []
    check_rows(pairs)
    check_readers(s3, cfg, sample, problem)
    return checked


def check_readers(s3, cfg: Settings, sample: list[tuple[str, str]], problem: Problems) -> None:
    """Copies as readable as their sources (S3 copies no ACL), on a sample."""
    try:
        found = less_readable(s3, cfg, sample)
    except ClientError as exc:
        problem("ACL-UNCHECKED", f"cannot read object ACLs ({exc.response['Error']['Code']}): "
                                 "grant s3:GetObjectAcl on both buckets to have copies' readers "
                                 "checked")
        return
    for src_key, src_acl, dest_key, dest_acl in found:
        problem("LESS-READABLE", f"{dest_key} is {dest_acl} but its source {src_key} is "
                                 f"{src_acl}: who reads the source cannot read the copy; set it "
                                 f"(aws s3api put-object-acl --acl {src_acl}) on the copies, or "
                                 "add a bucket policy (docs/s3-access-encryption.md)",
                key=dest_key)


def missing(s3, bucket: str, prefix: str, keys):
    """The (key, ...) tuples of `keys` (sorted in binary order) whose object does not
    exist: one merge pass against the bucket's listing. A key the merge does not
    find is HEADed before it is called missing: some S3-compatible servers do not
    list in binary order."""
    stop = threading.Event()
    listing = (o.key for o in listed(Listing(Boto3Engine(s3), bucket, prefix), stop))
    here = next(listing, None)
    for entry in keys:
        while here is not None and here < entry[0]:
            here = next(listing, None)
        if here != entry[0] and head(s3, bucket, entry[0]) is None:
            yield entry


def check_rows_under(s3, db: Database, bucket: str, prefix: str, problem: Problems) -> int:
    """Every row under the prefix points at an object that exists in the bucket."""
    counted = [0]

    def paths():
        for path, n in db.rows_under(prefix):
            counted[0] += n
            yield path, n
    for path, n in missing(s3, bucket, prefix, paths()):
        if "?" in path or "#" in path:
            continue  # names a key before its ?query or #fragment: check_other_forms's
        problem("DANGLING-ROW", f"{n} row(s) point at {path}, which does not exist in "
                                f"s3://{bucket}", key=path, rows=n)
    return counted[0]


def check_other_forms(s3, db: Database, cfg: Settings, problem: Problems) -> int:
    """Rows naming a source key in another form (a URL, '/key', 'key?v=2'): the
    object they name still exists."""
    entries = references.other_form_keys(db)
    for key, n, sample in missing(s3, cfg.source_bucket, cfg.source_prefix, entries):
        problem("DANGLING-ROW", f"{n} row(s) name {key} (as {sample!r}), which does not "
                                f"exist in s3://{cfg.source_bucket}", key=key, rows=n)
    return sum(n for _, n, _ in entries)
