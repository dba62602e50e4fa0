"""Fault injection: each fault is injected for real and the migration survives it.

The rule checked after every fault: a row only ever points at an object that
exists (rows under avatar/ have their copy, rows still under image/ have their
source), every source object is still there, no row is lost or duplicated,
and a rerun finishes the job.

  1. S3 throttling / 5xx / dropped connections: tests/faultproxy.py in front of
     the moto server.
  2. PostgreSQL restarted (pg_ctl restart -m fast) mid-run: a dedicated
     embedded server.
  3. kill -9 early, in the middle, late, and several times in a row.
  4. SIGINT / SIGTERM, a second SIGINT, in-flight copies abandoned.
  5. Hostile key names (hypothesis).
  6. Secrets (DB password, AWS secret key) never reach output, log or report.
  7. Errors a rerun cannot cure (a permission revoked mid-run) stop the run.
"""
from __future__ import annotations

import csv
import re
import signal
import socket
import time
from pathlib import Path
from urllib.parse import quote

import psycopg2
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st
from psycopg2.extensions import make_dsn

from conftest import (DEST, PNG, SOURCE, insert_rows, keys, listing, put, rows,
                      summary)
from conftest import Bg
from conftest import moto_backend as backend
from devtools.sandbox import SandboxError, start_postgres
from faultproxy import DENIED, DROP_AFTER, DROP_BEFORE, INTERNAL, OK_ERROR, SLOWDOWN, FaultProxy

import move

# kills, restarts and fault proxies around move.py as a subprocess: make test only
pytestmark = pytest.mark.slow

# --------------------------------------------------------------------------- helpers





def body_of(key: str) -> bytes:
    return PNG + key.encode("utf-8")


def seed(conn, n: int, name: str = "u") -> list[str]:
    """n source objects (straight into moto, no HTTP) and one row for each."""
    be = backend()
    keys_ = [f"image/{name}{i:05d}.png" for i in range(n)]
    for k in keys_:
        be.put_object(SOURCE, k, body_of(k))
    with conn.cursor() as cur:
        cur.execute("INSERT INTO avatars (path) SELECT unnest(%s::text[])", (keys_,))
    return keys_


def dest_count() -> int:
    return len(backend().get_bucket(DEST).keys)





def check_invariant(conn, client, source_keys: list[str]) -> tuple[int, int]:
    """The rule that must never break. Returns (rows rewritten, objects in the destination)."""
    src, dst = listing(client, SOURCE), listing(client, DEST)
    paths = rows(conn)
    missing_sources = sorted(set(source_keys) - set(src))
    assert not missing_sources, f"source objects lost: {missing_sources[:5]}"
    dangling = []
    for p in paths:
        if p.startswith("avatar/"):
            if p not in dst or dst[p] != src.get("image/" + p[len("avatar/"):]):
                dangling.append(p)
        elif p.startswith("image/"):
            if p not in src:
                dangling.append(p)
        else:
            dangling.append(p)
    assert not dangling, f"{len(dangling)} row(s) point at a missing object: {dangling[:5]}"
    # no row lost, duplicated or pointed at another object
    rel = sorted(p.split("/", 1)[1] for p in paths)
    assert rel == sorted(k.split("/", 1)[1] for k in source_keys)
    for k, etag in dst.items():  # whatever landed is a faithful copy
        assert etag == src["image/" + k[len("avatar/"):]], k
    return sum(p.startswith("avatar/") for p in paths), len(dst)


def assert_all_done(conn, client, source_keys: list[str]) -> None:
    rewritten, copies = check_invariant(conn, client, source_keys)
    assert rewritten == len(source_keys) and copies == len(source_keys)


def settle(count=dest_count, quiet: float = 0.3, timeout: float = 10) -> int:
    """Wait until a counter stops moving (copies S3 had accepted finish landing)."""
    last, since = count(), time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


@pytest.fixture
def client(endpoint):
    """A plain client straight at moto (not through any proxy)."""
    return move.make_s3_client()


# --------------------------------------------------------------------------- 1. S3 faults


ENGINES = pytest.mark.parametrize("engine", ["auto", "boto3"], ids=["crt", "boto3"])


@ENGINES
def test_s3_throttling_5xx_and_dropped_connections_are_retried(engine, cli, db, endpoint, client):
    source_keys = seed(db, 300)
    with FaultProxy(endpoint, rate=0.10, seed=20240601) as proxy:
        p = cli("--workers", "8", "--engine", engine, "--json",
                env={"AWS_ENDPOINT_URL": proxy.url}, timeout=180)
    assert p.code == 0, p.out + p.err
    assert summary(p.out)["copied"] == 300 and summary(p.out)["failed"] == 0
    assert summary(p.out)["rows_rewritten"] == 300
    assert_all_done(db, client, source_keys)
    # the faults really happened, of every kind, and hit the copies themselves
    assert proxy.injected() > 0
    assert all(proxy.counts[m] > 0 for m in (SLOWDOWN, INTERNAL, DROP_BEFORE, DROP_AFTER)), \
        proxy.counts
    assert sum(n for (op, _), n in proxy.by_operation.items() if op == "CopyObject") > 0
    print(f"\n{engine}: S3 faults injected: {dict(proxy.counts)} over {proxy.requests} requests; "
          f"by operation: {dict(proxy.by_operation)}")


@ENGINES
def test_s3_one_key_always_failing_is_reported_and_rerun_finishes(engine, cli, db, endpoint,
                                                                    client):
    source_keys = seed(db, 20)
    bad = "avatar/u00007.png"
    with FaultProxy(endpoint, rate=0, fail_copy_keys=(bad,)) as proxy:
        p = cli("--workers", "4", "--max-attempts", "3", "--engine", engine, "--json",
                env={"AWS_ENDPOINT_URL": proxy.url})
    assert p.code == 1, p.out + p.err
    # --max-attempts 3 means 3 attempts, every one refused
    assert proxy.by_operation["CopyObject", SLOWDOWN] == 3, proxy.by_operation
    assert summary(p.out)["failed"] == 1 and summary(p.out)["copied"] == 19
    assert re.search(r"ERROR failed: image/u00007.png -> avatar/u00007.png: .*slow.?down",
                     p.err, re.I), p.err
    paths = rows(db)
    assert paths[7] == "image/u00007.png"
    assert all(x.startswith("avatar/") for i, x in enumerate(paths) if i != 7)
    assert bad not in keys(client, DEST)
    check_invariant(db, client, source_keys)

    again = cli("--json")  # healthy endpoint
    assert again.code == 0, again.out + again.err
    assert summary(again.out)["copied"] == 1 and summary(again.out)["skipped"] == 19
    assert_all_done(db, client, source_keys)


@ENGINES
def test_copy_answered_200_with_an_error_body_is_not_success(engine, cli, db, endpoint, client):
    """S3 may answer CopyObject 200 OK and put the error in the body: the copy did not happen,
    and a row rewritten on the strength of it would point at nothing."""
    source_keys = seed(db, 200)
    with FaultProxy(endpoint, rate=0.15, seed=11, modes=(OK_ERROR,),
                    operations=("CopyObject",)) as proxy:
        p = cli("--workers", "8", "--engine", engine, env={"AWS_ENDPOINT_URL": proxy.url})
    assert proxy.counts[OK_ERROR] > 0
    assert p.code == 0, p.out + p.err
    assert_all_done(db, client, source_keys)


def test_listing_and_bucket_checks_are_retried(cli, db, endpoint, client):
    """The first requests of each kind fail: preflight HEADs, then source and destination
    listing pages (several pages each, listed on prefetch threads)."""
    source_keys = seed(db, 1500)
    for k in source_keys[:1100]:  # a destination listing of two pages too
        backend().put_object(DEST, "avatar/" + k[len("image/"):], body_of(k))
    first = {"HeadBucket": 2, "ListObjects": 4}
    with FaultProxy(endpoint, rate=0, fail_first=first) as proxy:
        p = cli("--workers", "8", "--json", env={"AWS_ENDPOINT_URL": proxy.url})
    assert p.code == 0, p.out + p.err
    assert sum(proxy.by_operation[op, m] for op in first for m in proxy.modes) == 6
    assert proxy.seen["ListObjects"] >= 2 + 2 + 4  # 2 + 2 pages, plus the failed attempts
    assert summary(p.out)["copied"] == 400 and summary(p.out)["rows_only"] == 1100
    assert_all_done(db, client, source_keys)


# --------------------------------------------------------------------------- 2. PostgreSQL restart


@pytest.fixture
def own_pg():
    """A dedicated embedded PostgreSQL (never TEST_DATABASE_URL's: it is restarted and
    stopped here), as pgserver's handle: get_uri(), pgdata, log, system_user."""
    try:
        pg = start_postgres(embedded=True)
    except SandboxError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield pg.server
    finally:
        pg.stop()


def postmaster_pid(datadir: Path) -> list[str]:
    """postmaster.pid: pid, datadir, start time, port, socket dir, listen address, ..."""
    return (datadir / "postmaster.pid").read_text().splitlines()


def restart_pg(server, mode: str = "fast") -> None:
    """fast: the server ends sessions politely; immediate: as if it crashed."""
    from pgserver._commands import pg_ctl
    pg_ctl(["-w", "-t", "60", "-m", mode, "-l", str(server.log), "restart"],
           pgdata=server.pgdata, user=server.system_user, timeout=90)


@pytest.mark.parametrize("row_plan,mode", [("snapshot", "fast"), ("index", "fast"),
                                           ("snapshot", "immediate")])
def test_postgres_restart_mid_run(row_plan, mode, own_pg, endpoint, client, tmp_path):
    dsn = own_pg.get_uri()
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE avatars (id SERIAL PRIMARY KEY, path VARCHAR)")
        if row_plan == "index":
            cur.execute("CREATE INDEX ON avatars (path)")
    source_keys = seed(conn, 2000)
    conn.close()
    before = postmaster_pid(own_pg.pgdata)

    def rewritten() -> int:
        c = psycopg2.connect(dsn, connect_timeout=2)
        try:
            with c, c.cursor() as cur:
                cur.execute("SELECT count(*) FROM avatars WHERE path LIKE 'avatar/%'")
                return cur.fetchone()[0]
        finally:
            c.close()

    # a little latency per S3 request keeps the run long enough to be cut three times
    restarts = []  # (rows rewritten, objects copied) at each restart
    with FaultProxy(endpoint, rate=0, latency=0.004) as proxy:
        run = Bg(tmp_path, dsn, "--batch-size", "50", "--workers", "4",
                 env={"AWS_ENDPOINT_URL": proxy.url})
        for threshold in (100, 800, 1400):
            run.wait_until(lambda t=threshold: rewritten() >= t, what=f"{threshold} rows rewritten")
            copied = dest_count()
            restart_pg(own_pg, mode)
            restarts.append((rewritten(), copied))
            assert run.proc.poll() is None, "the run ended before the restart"
            now = postmaster_pid(own_pg.pgdata)
            assert now[0] != before[0], "the server did not restart"
            assert now[3:5] == before[3:5], "the server came back on another port/socket"
            before = now
        code = run.wait()
    # rows were being rewritten batch by batch while copies were still under way
    assert all(r < 2000 and c < 2000 for r, c in restarts), restarts
    assert code == 0, run.out + run.err
    # the run really lived through each restart
    assert run.err.count("database connection lost") >= 3, run.err
    assert summary(run.out)["row_plan"] == row_plan
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        assert_all_done(conn, client, source_keys)
    finally:
        conn.close()
    print(f"\n{row_plan}: PostgreSQL restarted at (rows, copies) {restarts}; "
          f"reconnects: {run.err.count('database connection lost')}")


def test_ctrl_c_while_postgres_is_down_exits_130_at_once(own_pg, endpoint, client, tmp_path):
    """Ctrl-C must not wait out two minutes of reconnect attempts."""
    from pgserver._commands import pg_ctl
    dsn = own_pg.get_uri()
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE avatars (id SERIAL PRIMARY KEY, path VARCHAR)")
    source_keys = seed(conn, 1000)
    conn.close()
    with FaultProxy(endpoint, rate=0, latency=0.004) as proxy:
        run = Bg(tmp_path, dsn, "--batch-size", "50", "--workers", "4",
                 "--log-file", str(tmp_path / "run.log"), env={"AWS_ENDPOINT_URL": proxy.url})
        run.wait_until(lambda: dest_count() >= 100, what="100 copies")
        socket_dir = postmaster_pid(own_pg.pgdata)[4]
        pg_ctl(["-w", "-t", "60", "-m", "immediate", "stop"], pgdata=own_pg.pgdata,
               user=own_pg.system_user, timeout=90)
        run.wait_until(lambda: "database connection lost" in run.err, what="a lost connection")
        sent = time.monotonic()
        run.proc.send_signal(signal.SIGINT)
        code = run.wait(timeout=30)
        took = time.monotonic() - sent
    assert code == 130, run.out + run.err
    assert took < 10, f"exit took {took:.1f}s"
    assert "interrupted while the database was unreachable" in run.err
    assert "Traceback" not in run.err
    pg_ctl(["-w", "-t", "60", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(own_pg.log),
            "start"], pgdata=own_pg.pgdata,
           user=own_pg.system_user, timeout=90)
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        check_invariant(conn, client, source_keys)  # no row points at a missing object
        rerun = Bg(tmp_path, dsn, env={"AWS_ENDPOINT_URL": endpoint})
        assert rerun.wait() == 0, rerun.out + rerun.err
        assert_all_done(conn, client, source_keys)
    finally:
        conn.close()


# --------------------------------------------------------------------------- 3. kill -9


N_KILL = 1500


@pytest.mark.parametrize("at", [0.05, 0.40, 0.80], ids=["early", "middle", "late"])
def test_kill_9_then_rerun(at, db, dsn, endpoint, client, tmp_path):
    source_keys = seed(db, N_KILL)
    run = Bg(tmp_path, dsn, "--workers", "8", "--batch-size", "100")
    run.wait_until(lambda: dest_count() >= at * N_KILL, what=f"{at:.0%} copied")
    run.proc.send_signal(signal.SIGKILL)
    assert run.proc.wait(10) == -signal.SIGKILL
    present = settle()
    rewritten, copies = check_invariant(db, client, source_keys)
    assert copies < N_KILL, "the run finished before the kill"
    if at >= 0.4:  # rows follow the copies batch by batch, not all at the end
        assert rewritten >= copies // 4, (rewritten, copies)

    again = Bg(tmp_path, dsn, "--workers", "8")
    assert again.wait() == 0, again.out + again.err
    assert_all_done(db, client, source_keys)
    # the rerun re-copied only what was not done
    assert summary(again.out)["copied"] == N_KILL - present < N_KILL
    assert summary(again.out)["skipped"] + summary(again.out)["rows_only"] == present
    assert summary(again.out)["rows_rewritten"] == N_KILL - rewritten
    print(f"\nkill -9 at {present}/{N_KILL} copied, {rewritten} rows rewritten; "
          f"rerun copied {N_KILL - present}")


def test_several_kills_in_a_row(db, dsn, endpoint, client, tmp_path):
    source_keys = seed(db, N_KILL)
    seen = []
    for at in (0.10, 0.30, 0.55, 0.85):
        run = Bg(tmp_path, dsn, "--workers", "8", "--batch-size", "100")
        run.wait_until(lambda at=at: dest_count() >= at * N_KILL, what=f"{at:.0%} copied")
        run.proc.kill()
        run.proc.wait(10)
        settle()
        seen.append(check_invariant(db, client, source_keys))
        assert seen[-1][1] < N_KILL
    final = Bg(tmp_path, dsn, "--workers", "8")
    assert final.wait() == 0, final.out + final.err
    assert_all_done(db, client, source_keys)
    assert summary(final.out)["copied"] == N_KILL - seen[-1][1]
    print(f"\nkills at (rows rewritten, copies): {seen}")


# --------------------------------------------------------------------------- 4. SIGINT / SIGTERM

N_SIG = 3000


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_cleanly_then_rerun(sig, db, dsn, endpoint, client, tmp_path):
    source_keys = seed(db, N_SIG)
    run = Bg(tmp_path, dsn, "--workers", "4")
    run.wait_until(lambda: dest_count() >= 300, what="copies under way")
    sent = time.monotonic()
    run.proc.send_signal(sig)
    code = run.wait(15)
    took = time.monotonic() - sent
    assert code == 130, run.out + run.err
    assert took < 10
    assert summary(run.out)["interrupted"] is True
    settle()
    rewritten, copies = check_invariant(db, client, source_keys)
    assert copies < N_SIG, "the run finished before the signal"
    # what was copied before the signal got its rows written on the way out
    assert summary(run.out)["rows_rewritten"] == rewritten

    again = Bg(tmp_path, dsn, "--workers", "8")
    assert again.wait() == 0, again.out + again.err
    assert_all_done(db, client, source_keys)
    assert summary(again.out)["copied"] == N_SIG - copies
    print(f"\n{sig.name}: exit 130 after {took:.2f}s with {copies} copied, "
          f"{rewritten} rows rewritten")


def test_second_sigint_exits_at_once(db, dsn, endpoint, client, tmp_path):
    source_keys = seed(db, N_SIG)
    with FaultProxy(endpoint, rate=0) as proxy:
        run = Bg(tmp_path, dsn, "--workers", "4", env={"AWS_ENDPOINT_URL": proxy.url})
        run.wait_until(lambda: dest_count() >= 300, what="copies under way")
        proxy.stall_copies.set()  # copies in flight now hang: the first Ctrl-C waits for them
        run.wait_until(lambda: proxy.stalled >= 4, what="copies stalled")
        run.proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert run.proc.poll() is None, "the first SIGINT should wait for copies in flight"
        sent = time.monotonic()
        run.proc.send_signal(signal.SIGINT)
        code = run.wait(10)
        took = time.monotonic() - sent
        assert code == 130 and took < 1.5, (code, took, run.err)
        assert "interrupted again, exiting now" in run.err
        proxy.release.set()  # the abandoned copies now land, without their rows
        settle()
    check_invariant(db, client, source_keys)
    again = Bg(tmp_path, dsn, "--workers", "8")
    assert again.wait() == 0, again.out + again.err
    assert_all_done(db, client, source_keys)
    print(f"\nsecond SIGINT: exit 130 after {took:.2f}s")


@ENGINES
def test_sigterm_abandons_stuck_copies_after_5s(engine, db, dsn, endpoint, client, tmp_path):
    source_keys = seed(db, 1000)
    with FaultProxy(endpoint, rate=0) as proxy:
        run = Bg(tmp_path, dsn, "--workers", "4", "--engine", engine,
                 env={"AWS_ENDPOINT_URL": proxy.url})
        run.wait_until(lambda: dest_count() >= 100, what="copies under way")
        proxy.stall_copies.set()
        run.wait_until(lambda: proxy.stalled >= 4, what="copies stalled")
        sent = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        code = run.wait(15)
        took = time.monotonic() - sent
        assert code == 130, run.out + run.err
        assert 4 <= took < 10
        assert summary(run.out)["interrupted"] is True and "abandoned" in run.err
        check_invariant(db, client, source_keys)
        before = dest_count()
        proxy.release.set()  # the abandoned copies complete after the process is gone
        after = settle()
    assert after > before  # objects without a row rewrite: allowed
    check_invariant(db, client, source_keys)
    again = Bg(tmp_path, dsn, "--workers", "8")
    assert again.wait() == 0, again.out + again.err
    assert_all_done(db, client, source_keys)
    assert summary(again.out)["rows_only"] >= after - before


# --------------------------------------------------------------------------- 5. hostile keys

SPECIALS = [" ", "  ", "+", "%", "%2F", "%20", "%%", "//", "=", "?", "#", "&", "~", ";", ",",
            "..", "./", "@", "!", "*", "'", '"', "(", ")", "[", "]", "{", "}", "$", "\\", "^",
            "é", "e\u0301", "ü", "日本語", "😀", "\u200b", "ß", "Ω", "\u00a0", "\u202e", "ﬁ"]
PNG_EXT = st.sampled_from([".png", ".PNG", ".Png"])
LIMIT = 1024  # S3's key limit, in UTF-8 bytes


def _fit(char: str, ext: str, head: str) -> str:
    """A rest whose destination key avatar/<rest> is exactly at S3's limit or just under."""
    room = LIMIT - len(("avatar/" + head + ext).encode())
    return head + char * (room // len(char.encode())) + ext


piece = st.one_of(st.sampled_from(SPECIALS),
                  st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1,
                          max_size=6))
rest_short = st.builds(lambda parts, ext: "".join(parts) + ext,
                       st.lists(piece, min_size=1, max_size=8), PNG_EXT)
rest_long = st.builds(_fit, st.sampled_from(["a", "é", "日", "😀", "%", "/", " "]), PNG_EXT,
                      st.sampled_from(["", "x/", "a b+c/", "%2F/"]))
rests = st.lists(st.one_of(rest_short, rest_long), min_size=1, max_size=6,
                 unique=True).filter(
    lambda rs: all(len(("avatar/" + r).encode()) <= LIMIT for r in rs))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@example(rest_list=["a b+c=d?e#f%20g.png", "x//y.PNG", "日本/😀 %.png",
          "z" * (LIMIT - len("avatar/") - 4) + ".png"])
@given(rest_list=rests)
def test_hostile_keys(rest_list, run, s3, db):
    """In-process (mock_aws), so the boto3 engine."""
    hostile_setup(s3, db, rest_list)
    assert run() == 0
    hostile_check(s3, db, rest_list)


def hostile_setup(s3, db, rest_list):
    for bucket in (SOURCE, DEST):  # fresh state for each example
        for k in keys(s3, bucket):
            s3.delete_object(Bucket=bucket, Key=k)
    with db.cursor() as cur:
        cur.execute("TRUNCATE avatars")
    for r in rest_list:
        put(s3, "image/" + r, body=body_of(r))
    put(s3, "image/" + rest_list[0] + ".txt")  # not a PNG: left alone
    insert_rows(db, ["image/" + r for r in rest_list])


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@example(rest_list=["a b+c=d?e#f%20g.png", "x//y.PNG", "日本/😀 %.png", "../up.png", "./dot.png",
                    "z" * (LIMIT - len("avatar/") - 4) + ".png"])
@given(rest_list=rests)
def test_hostile_keys_default_engine_over_http(rest_list, cli, client, db):
    """move.py as a subprocess against the moto server: the default engine (the CRT when
    installed), which builds its own CopyObject requests."""
    hostile_setup(client, db, rest_list)
    p = cli("--quiet", "--json")
    assert p.code == 0, p.out + p.err
    assert summary(p.out)["copied"] == len(rest_list)
    hostile_check(client, db, rest_list)


def hostile_check(s3, db, rest_list):
    for r in rest_list:
        got = s3.get_object(Bucket=DEST, Key="avatar/" + r)["Body"].read()
        assert got == body_of(r), r
    assert sorted(keys(s3, DEST)) == sorted("avatar/" + r for r in rest_list)
    assert rows(db) == ["avatar/" + r for r in rest_list]
    assert len(keys(s3, SOURCE)) == len(rest_list) + 1  # sources kept


@ENGINES
def test_source_key_at_the_limit_has_no_legal_destination(engine, cli, db, endpoint, client,
                                                           tmp_path):
    """image/ -> avatar/ adds a byte: a 1,024-byte source key maps to a 1,025-byte key that S3
    refuses (KeyTooLongError; the proxy enforces S3's limit, moto does not). The plan sees it
    from the listing: that object is skipped as "key too long" without a request (no retries
    into a certain refusal), its row stays put, the rest moves, and the run exits 1 because
    it is incomplete. A rerun cannot cure it, and does not say it would."""
    longest = "image/" + "k" * (LIMIT - len("image/") - 4) + ".png"
    assert len(longest.encode()) == LIMIT
    source_keys = seed(db, 5) + [longest]
    backend().put_object(SOURCE, longest, body_of(longest))
    insert_rows(db, [longest])
    with FaultProxy(endpoint, rate=0, max_key_bytes=LIMIT) as proxy:
        p = cli("--engine", engine, "--max-attempts", "2", "--json", "--report", "report.csv",
                env={"AWS_ENDPOINT_URL": proxy.url})
    # Was `proxy.too_long >= 1` (the copy was sent and refused): now no request is sent.
    assert proxy.too_long == 0 and proxy.seen["CopyObject"] == 5
    assert p.code == 1, p.out + p.err
    # Was `failed == 1`: the object now has its own heading, and nothing failed.
    s = summary(p.out)
    assert (s["key_too_long"], s["failed"], s["copied"]) == (1, 0, 5)
    assert "KeyTooLong" in p.err
    assert "rerun to resume" not in p.err
    with open(tmp_path / "report.csv", newline="", encoding="utf-8") as f:
        assert [r["action"] for r in csv.DictReader(f) if r["source_key"] == longest] == \
            ["key-too-long"]
    assert rows(db)[-1] == longest
    rewritten, copies = check_invariant(db, client, source_keys)
    assert rewritten == copies == 5


# --------------------------------------------------------------------------- 6. secrets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outputs(p, tmp_path: Path) -> str:
    text = p.out + p.err
    for name in ("move.log", "report.csv"):
        f = tmp_path / name
        if f.exists():
            text += f.read_text(encoding="utf-8")
    return text


PASSWORDS = ["Sup3r-Secr3t-pw", "p@ss:w/rd#1?=&x", "with space 'and' quotes"]


@pytest.mark.parametrize("form", ["url", "keywords"])
@pytest.mark.parametrize("password", PASSWORDS, ids=["plain", "special", "spaces"])
def test_db_password_never_shown(form, password, cli, db, endpoint, tmp_path):
    port = free_port()
    if form == "url":
        bad = f"postgresql://mover:{quote(password, safe='')}@127.0.0.1:{port}/avatars"
    else:
        bad = make_dsn(host="127.0.0.1", port=port, user="mover", password=password,
                       dbname="avatars")
    p = cli("--log-file", "move.log", "--report", "report.csv", env={"DB_CONN_STRING": bad})
    assert p.code == 2, p.out + p.err
    assert "cannot connect to the database" in p.err
    text = outputs(p, tmp_path)
    for secret in {password, quote(password, safe=""), quote(password)}:
        assert secret not in text, f"password leaked:\n{text}"


def test_aws_secret_and_db_password_never_shown(cli, db, dsn, endpoint, tmp_path):
    """A full run, with failures logged, while both secrets are set."""
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzSECRETKEY"
    password = "Db-Passw0rd-Hunter2"
    seed(db, 30)
    with FaultProxy(endpoint, rate=0.1, seed=3, fail_copy_keys=("avatar/u00003.png",)) as proxy:
        p = cli("--log-file", "move.log", "--report", "report.csv", "--max-attempts", "3",
                env={"AWS_ENDPOINT_URL": proxy.url, "AWS_SECRET_ACCESS_KEY": secret,
                     "DB_CONN_STRING": make_dsn(dsn, password=password)})
    assert p.code == 1, p.out + p.err
    assert "u00003" in (tmp_path / "move.log").read_text()
    assert len((tmp_path / "report.csv").read_text().splitlines()) == 31
    text = outputs(p, tmp_path)
    assert secret not in text and password not in text
    assert secret[:16] not in text and secret[-16:] not in text


# --------------------------------------------------------------------------- 7. incurable errors


@ENGINES
def test_copies_denied_for_good_stop_the_run(engine, cli, db, endpoint, client, tmp_path):
    """Write permission revoked mid-run: every CopyObject after the first N is answered 403
    AccessDenied, as S3 does. Retrying or sending the rest of the bucket cannot help: the run
    stops after STOP_AFTER such failures in a row, finishes what is in flight, writes the
    rows of the N copies, says once what failed and what to do, and exits 1. The terminal
    gets the first few per-object lines; the report and the log file get every one."""
    from avatarmove.incurable import STOP_AFTER
    from avatarmove.report import TERMINAL_LINES
    n, total, workers = 100, 1000, 4
    source_keys = seed(db, total)
    with FaultProxy(endpoint, rate=0, deny_after={"CopyObject": n}) as proxy:
        p = cli("--workers", str(workers), "--engine", engine, "--json", "--report",
                "report.csv", "--log-file", "move.log", env={"AWS_ENDPOINT_URL": proxy.url})
    assert p.code == 1, p.out + p.err
    sent, denied = proxy.seen["CopyObject"], proxy.by_operation["CopyObject", DENIED]
    # In flight at once: at most 2 x --workers (the window's ceiling, with slack). Bound:
    # the N that succeeded, a window sent before the last success that lost the race to
    # the proxy, STOP_AFTER in a row, and the window in flight when the run stopped.
    window = 2 * workers
    assert sent == n + denied
    assert n + STOP_AFTER <= sent <= n + STOP_AFTER + 2 * window, (sent, p.err[-2000:])

    s = summary(p.out)
    assert s["copied"] == n and s["failed"] == denied
    assert s["failed_by_code"] == {"AccessDenied": denied}
    assert s["listed"] < total  # it stopped taking work
    assert s["stopped"] == (
        f"stopped after {STOP_AFTER} copies in a row failed with errors a rerun cannot cure "
        f"(AccessDenied {STOP_AFTER}): check the IAM policy (and the bucket policies) for "
        f"s3:GetObject on {SOURCE}/image/* and s3:PutObject on {DEST}/avatar/*; a Requester "
        "Pays bucket answers so without --request-payer")

    # Said once, last; never "rerun to resume"; per-object lines bounded on the terminal.
    err = p.err.splitlines()
    assert [line for line in err if "stopped after" in line] == \
        [f"move.py: error: {s['stopped']}"] and err[-1].startswith("move.py: error: stopped")
    assert "rerun to resume" not in p.err
    assert len([line for line in err if "ERROR failed: image/" in line]) == TERMINAL_LINES
    assert [line for line in err if "further per-object" in line] == \
        ["ERROR further per-object failures are only in --report and --log-file"]

    with open(tmp_path / "report.csv", newline="", encoding="utf-8") as f:
        report = list(csv.DictReader(f))
    failed = {r["source_key"] for r in report if r["action"] == "failed"}
    assert len(failed) == denied and all("AccessDenied" in r["error"] for r in report
                                          if r["action"] == "failed")
    assert sum(r["action"] == "copied" for r in report) == n and len(report) == s["listed"]
    logged = (tmp_path / "move.log").read_text(encoding="utf-8")
    assert {k for k in failed if f"failed: {k} -> " in logged} == failed

    # The N copies got their rows; every other row still points at its source.
    rewritten, copies = check_invariant(db, client, source_keys)
    assert rewritten == copies == n
    print(f"\n{engine}: stopped after {sent} CopyObject requests ({n} succeeded, {denied} "
          f"denied) of {total}; {s['listed']} listed; stderr {len(err)} lines, "
          f"{TERMINAL_LINES} of them per-object failures")

    again = cli("--json")  # permission back: the rerun finishes the job
    assert again.code == 0, again.out + again.err
    assert summary(again.out)["copied"] == total - n
    assert_all_done(db, client, source_keys)
