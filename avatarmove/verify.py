"""Verify: a read-only reconciliation of both buckets and the table, one line per problem."""
from __future__ import annotations

import threading
from collections import Counter

from .copying import Boto3Engine
from .database import Database
from .identity import NeedsCustomerKey, described, identical
from .listing import Listing, listed
from .planning import CHECK, CONFLICT, COPY, DONE, plan
from .run import preflight
from .settings import EXIT_FAILED, EXIT_OK, Settings


class Problems:
    def __init__(self):
        self.counts: Counter[str] = Counter()

    def __call__(self, kind: str, text: str) -> None:
        self.counts[kind] += 1
        print(f"{kind}: {text}", flush=True)

    def line(self) -> str:
        total = sum(self.counts.values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        return f"{total} problem(s)" + (f": {detail}" if total else "")


def verify(s3, cfg: Settings) -> int:
    db = Database(cfg, "verify", readonly=True)
    preflight(s3, db, cfg)
    if db.plan_name == "snapshot":
        db.build_snapshot()
    problem = Problems()
    checked = check_objects(s3, db, cfg, problem)
    rows = check_rows_under_dest(s3, db, cfg, problem)
    db.close()
    print(f"Verify: {checked} source PNGs and {rows} rewritten rows checked; {problem.line()}",
          flush=True)
    return EXIT_OK if not problem.counts else EXIT_FAILED


def check_objects(s3, db: Database, cfg: Settings, problem: Problems) -> int:
    """Every source PNG has an equal copy, and no row still points at the source."""
    def check_rows(pairs: list[tuple[str, str]]) -> None:
        counts = db.lookup([k for pair in pairs for k in pair])
        for old, new in pairs:
            if counts.get(old):
                problem("NOT-REWRITTEN", f"{counts[old]} row(s) still point at {old} (copy: {new})")

    engine, stop = Boto3Engine(s3), threading.Event()
    src = Listing(engine, cfg.source_bucket, cfg.source_prefix)
    dest = Listing(engine, cfg.dest_bucket, cfg.dest_prefix)
    pairs: list[tuple[str, str]] = []
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
                                 f"(SSE-C): its copy {item.dest_key} cannot be compared")
                item.kind = DONE
        if item.kind == COPY:
            problem("MISSING-COPY", f"{item.src.key} has no copy at {item.dest_key}")
        elif item.kind == CONFLICT:
            problem("MISMATCH", f"{item.dest_key} (size {item.dest.size}, etag {item.dest.etag}) "
                                f"differs from {item.src.key} (size {item.src.size}, "
                                f"etag {item.src.etag})")
        pairs.append((item.src.key, item.dest_key))
        if len(pairs) >= cfg.batch_size:
            check_rows(pairs)
            pairs = []
    check_rows(pairs)
    return checked


def check_rows_under_dest(s3, db: Database, cfg: Settings, problem: Problems) -> int:
    """Every row under the destination prefix points at an existing object: both
    sides sorted in binary order, so one merge pass."""
    stop = threading.Event()
    dest_keys = (o.key for o in listed(Listing(Boto3Engine(s3), cfg.dest_bucket,
                                               cfg.dest_prefix), stop))
    d = next(dest_keys, None)
    rows = 0
    for path, n in db.rows_under(cfg.dest_prefix):
        rows += n
        while d is not None and d < path:
            d = next(dest_keys, None)
        if d != path:
            problem("DANGLING-ROW", f"{n} row(s) point at {path}, which does not exist in "
                                    f"s3://{cfg.dest_bucket}")
    return rows
