"""avatarmove.report: the summary as data (to_json, what --json prints), its text
rendering (what a person reads), the counters, and the per-item CSV report.
"""
from __future__ import annotations

import json

from avatarmove.report import Summary


def test_summary_to_json_is_one_object_with_every_field():
    s = Summary(run_id="r1", dry_run=False, interrupted=False, listed=3, copied=2, rows_only=1,
                skipped=0, rows_rewritten=3, objects_without_rows=0, conflicts=0, failed=0,
                deleted=0, elapsed_s=1.5, requests=7, row_plan="batched")
    d = json.loads(s.to_json())
    assert d["run_id"] == "r1" and d["copied"] == 2 and d["rows_only"] == 1
    assert d["requests"] == 7 and d["rows_left_under_source"] is None
