"""The benchmark's results: one Row per tool, rounds combined, the Markdown report,
and its section of docs/benchmarks.md (one section per network model, between markers)."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

SOURCE, DEST, SRC, DST = "legacy-s3", "production-s3", "image/", "avatar/"
# the loopback section's markers carry no model name (tests/test_readme.py looks for them)
MARKERS = {"loopback": ("<!-- bench:start -->", "<!-- bench:end -->")}


def markers(model: str) -> tuple[str, str]:
    return MARKERS.get(model, (f"<!-- bench:{model}:start -->", f"<!-- bench:{model}:end -->"))


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
    requests: int | None = None   # S3 requests: the proxy's count, else move.py's own
    slowdowns: int | None = None  # 503 SlowDown answers the proxy gave this tool

    @classmethod
    def of(cls, tool: str, what: str, run, expected: int) -> "Row":
        """A row from one measured run (bench/run.py's Run)."""
        return cls(tool, what, run.seconds, None, expected, run.rss_kib, run.rc, cpu=run.cpu,
                   server_cpu=run.server_cpu, requests=run.requests, slowdowns=run.slowdowns)

    @property
    def rate(self) -> float | None:
        return self.moved / self.seconds if self.seconds and self.moved else None


def median_of(rows: list[Row], attr: str):
    vals = [getattr(r, attr) for r in rows if getattr(r, attr) is not None]
    return statistics.median(vals) if vals else None


def combine(rounds: list[list[Row]]) -> list[Row]:
    """One row per tool: median time, CPU and requests, highest RSS, fewest objects,
    notes of the first round plus any problem of a later one."""
    if len(rounds) == 1:
        return rounds[0]
    out = []
    for first in rounds[0]:
        same = [r for rows in rounds for r in rows if r.tool == first.tool]
        secs = [r.seconds for r in same if r.seconds is not None]
        rss = [r.rss_kib for r in same if r.rss_kib is not None]
        moved = [r.moved for r in same if r.moved is not None]
        row = Row(first.tool, first.what, median_of(same, "seconds"),
                  min(moved) if moved else None, first.expected, max(rss) if rss else None,
                  next((r.rc for r in same if r.rc), first.rc), first.rows, list(first.notes),
                  all(r.ok for r in same), keeps=first.keeps)
        for i, r in enumerate(same[1:], 2):
            if r.rc or not r.ok or r.moved != first.moved:
                row.notes += [f"(round {i}) {n}" for n in r.notes]
        row.spread = (min(secs), max(secs)) if len(secs) > 1 else None
        for attr in ("cpu", "server_cpu", "requests", "slowdowns"):
            setattr(row, attr, median_of(same, attr))
        out.append(row)
    return out


def fmt(x, spec: str = ".2f", none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def network_text(ctx: dict) -> str:
    net, pg = ctx["network"], ("pgserver's" if ctx["embedded_pg"] else "TEST_DATABASE_URL's")
    servers = f"S3 is SeaweedFS `weed mini` and PostgreSQL is {pg}, both on this machine"
    if net["model"] == "loopback":
        return (f"{servers} (loopback and Unix socket), so times measure the tools and the "
                f"servers, not a network.")
    model = []
    if net["latency_ms"]:
        model.append(f"holds every chunk {net['latency_ms']:g} ms each way (a request costs "
                     f"about {2 * net['latency_ms']:g} ms more, like a round trip to S3)")
    if net["rate"]:
        model.append(f"admits {net['rate']:g} requests/s (a token bucket one second deep) and "
                     f"answers `503 SlowDown` above that, as S3 does per prefix")
    return (f"{servers}; network model **{net['model']}**: every tool talks to S3 through "
            f"bench/netproxy.py, which {' and '.join(model) or 'forwards as is'}. The proxy "
            f"counts each tool's S3 requests and the SlowDown answers it gave.")


def intro(ctx: dict) -> str:
    return (f"Measured {ctx['date']} by `make bench` ({ctx['command']}): "
            f"N = {ctx['n']:,} avatars (PNGs of {ctx['avg_size']:,} bytes on average, "
            f"{ctx['nested']} of them in sub-folders"
            + (", each next to a sibling listed out of byte order" if ctx["order_clash"] else "")
            + f"), on {ctx['machine']}. {network_text(ctx)} "
            f"Every tool copies `{SOURCE}/{SRC}` to `{DEST}/{DST}` "
            f"server-side from the same seeded source; the destination is emptied and the "
            f"rows reset between tools. Peak RSS is the tool process's high-water mark "
            f"(wait4 of the process and the children it waited for; a launcher running "
            f"`true` measures {ctx['floor'] / 1024:.0f} MiB, the floor). CPU is the tool's "
            f"user + system seconds (wait4), S3 server CPU what SeaweedFS spent meanwhile "
            f"(/proc): on 2 cores the two compete, so a tool's own CPU slows the server."
            + (f" Each tool ran {ctx['repeat']} times, in rounds: wall time is the median "
               f"(fastest-slowest), peak RSS the highest." if ctx["repeat"] > 1 else ""))


def tools_table(rows: list[Row], networked: bool) -> list[str]:
    move = next((r for r in rows if r.tool == "move.py" and r.seconds), None)
    extra = " | S3 requests | SlowDown answers" if networked else ""
    out = ["| Tool | Does | Objects in destination | Wall time (s) | Objects/s "
           "| Time vs move.py | CPU (s) | S3 server CPU (s) | Peak RSS (MiB) | Rows rewritten "
           f"| Keeps type / metadata{extra} |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
           + ("---:|---:|" if networked else "")]
    for r in rows:
        ratio = f"{r.seconds / move.seconds:.2f}x" if move and r.seconds else "n/a"
        moved = "n/a" if r.moved is None else f"{r.moved:,}"
        if r.moved is not None and r.moved != r.expected:
            moved += f" of {r.expected:,} **(short)**"
        elif r.moved is not None and not r.ok:
            moved += " **(wrong keys)**"
        spread = f" ({r.spread[0]:.2f}-{r.spread[1]:.2f})" if r.spread else ""
        keeps = "/".join("yes" if k else "**no**" for k in r.keeps) if r.keeps else "n/a"
        out.append(f"| {r.tool} | {r.what} | {moved} | {fmt(r.seconds)}{spread} "
                   f"| {fmt(r.rate, '.0f')} | {ratio} | {fmt(r.cpu)} | {fmt(r.server_cpu)} "
                   f"| {fmt(r.rss_kib and r.rss_kib / 1024, '.0f')} | {r.rows} | {keeps}"
                   + (f" | {fmt(r.requests, ',.0f')} | {fmt(r.slowdowns, ',.0f')}"
                      if networked else "") + " |")
    s5 = next((r for r in rows if r.tool == "s5cmd cp" and r.seconds), None)
    if move and s5:
        out += ["", f"move.py against s5cmd: {move.seconds / s5.seconds:.2f}x its wall time "
                    f"({move.seconds:.2f} s against {s5.seconds:.2f} s)."]
    return out + [""]


def markdown(ctx: dict, rows: list[Row], rerun: dict | None, scale: dict | None,
             sizes: list[dict], order: dict | None) -> str:
    out = [intro(ctx), ""] + tools_table(rows, ctx["network"]["model"] != "loopback")
    notes = [f"- {r.tool}: {n}" for r in rows for n in r.notes]
    if notes:
        out += notes + [""]
    if scale:
        out += [f"**Table size.** move.py moving the same {scale['objects']:,} objects "
                f"(and rewriting their {scale['objects']:,} rows) with no index on `path`:", "",
                "| Table | Rows | Wall time (s) | Peak RSS (MiB) | Row plan |",
                "|---|---:|---:|---:|---|"]
        out += [f"| {t['name']} | {t['rows']:,} | {fmt(t['seconds'])} "
                f"| {fmt(t['rss_kib'] / 1024, '.0f')} | {t['plan']} |" for t in scale["tables"]]
        out += ["", f"Ratio {scale['tables'][1]['rows']:,} rows / {scale['tables'][0]['rows']:,} "
                    f"rows: {scale['ratio']:.2f}x.", ""]
    if sizes:
        out += ["**Memory with size.** One move.py run per size, each on its own seeded "
                "bucket and table:", "",
                "| Objects | Wall time (s) | Objects/s | Peak RSS (MiB) |", "|---:|---:|---:|---:|"]
        out += [f"| {s['n']:,} | {fmt(s['seconds'])} | {fmt(s['n'] / s['seconds'], '.0f')} "
                f"| {fmt(s['rss_kib'] / 1024, '.0f')} |" for s in sizes]
        out.append("")
    if order and ctx["network"]["model"] == "loopback":  # SeaweedFS's, whatever the network
        verdict = "in UTF-8 binary order" if order["binary"] else "**not** in UTF-8 binary order"
        out += [f"**Listing order.** SeaweedFS returns ListObjectsV2 keys {verdict}: for "
                f"{', '.join('`' + k + '`' for k in order['keys'])} it lists "
                f"{', '.join('`' + k + '`' for k in order['listed'])}"
                + ("" if order["binary"] else
                   " (directory by directory, a folder before the files that share its "
                   "name as a prefix), where byte order would be "
                   + ", ".join('`' + k + '`' for k in order['sorted'])) + ".", ""]
    out += ["Versions: " + ", ".join(f"{k} {v}" for k, v in ctx["versions"].items()) + ".", ""]
    return "\n".join(out)


def write_section(path: Path, body: str, model: str = "loopback") -> None:
    """Replace this model's section of docs/benchmarks.md; a model's first section goes
    after the last one there is, so each model keeps its own figures."""
    start, end = markers(model)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        ends = [text.rfind(e) + len(e) for _, e in
                [markers(m) for m in ("loopback", "latency", "ratelimit")] if e in text]
        if ends:
            at = max(ends)
            text = text[:at] + f"\n\n{block}" + text[at:]
        else:
            text = (text.rstrip("\n") or "# Benchmarks") + f"\n\n{block}\n"
    tmp = path.with_suffix(".md.bench-tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
