"""The window and the pacer against a fake S3 in simulated time: fast, and the
same answer every run. Figures are counts and simulated seconds, not timings.

simulate() drives the run's real loop (run.Migration) with a fake engine: the
request path, the retry heap, the window and the pacer are the ones a run uses;
only the clock, the answer queue and S3 are simulated."""
from __future__ import annotations

import heapq
import queue
import random
import threading
from collections import deque

import pytest

from avatarmove.copying import Engine
from avatarmove.listing import Obj
from avatarmove.pacing import Pacer, RequestPath, S3RequestError
from avatarmove.planning import COPY, Item
from avatarmove.report import Reporter, Stats
from avatarmove.run import Migration
from avatarmove.settings import Settings

SLOWDOWN, INTERNAL, DROPPED, DENIED = "SlowDown", "InternalError", "dropped", "AccessDenied"


class FakeS3:
    """Answers after `latency` seconds; with a capacity, queueing adds latency
    (Little's law); with a rate limit, more than `rate` accepted requests in
    the last second get 503 SlowDown, as S3's per-prefix limit does; `random`
    refuses that share of requests whatever the rate (S3 rescaling a prefix, an
    S3-compatible server under load), answered as `random_as`."""

    def __init__(self, latency=0.05, capacity=None, rate=None, burst=None, random=0.0,
                 random_as=SLOWDOWN, seed=11):
        self.latency, self.capacity, self.rate = latency, capacity, rate
        self.accepted: deque[float] = deque()
        self.requests = self.refused = self.accepted_count = 0
        self.faults: dict[str, int] = {}
        # burst: a token bucket `burst` seconds deep instead (bench/netproxy.py's
        # model): that many seconds' worth pass at once at the start
        self.burst, self.tokens, self.stamp = burst, None, 0.0
        self.random, self.random_as = random, random_as
        self.dice = __import__("random").Random(seed)

    def limit(self, now: float) -> float | None:
        return self.rate

    def answer(self, now: float, inflight: int) -> tuple[float, str]:
        """(seconds until the answer, "" or the fault)"""
        self.requests += 1
        rate = self.limit(now)
        while self.accepted and self.accepted[0] <= now - 1.0:
            self.accepted.popleft()
        if self.random and self.dice.random() < self.random:
            self.faults[self.random_as] = self.faults.get(self.random_as, 0) + 1
            return self.latency, self.random_as
        if rate is None:
            refuse = False
        elif self.burst is not None:
            depth = max(1.0, self.burst * rate)
            if self.tokens is None:
                self.tokens = depth
            self.tokens = min(depth, self.tokens + (now - self.stamp) * rate)
            self.stamp = now
            refuse = self.tokens < 1.0
            self.tokens -= 0.0 if refuse else 1.0
        else:
            refuse = len(self.accepted) >= rate
        if refuse:
            self.refused += 1
            return self.latency, SLOWDOWN
        self.accepted.append(now)
        self.accepted_count += 1
        queueing = inflight / self.capacity if self.capacity else 0.0
        return max(self.latency, queueing), ""


class Clock:
    def __init__(self):
        self.now = 0.0
        self.answers: Answers | None = None

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        """Replies due meanwhile arrive at their time, as on the CRT's threads."""
        end = self.now + max(0.0, seconds)
        while self.answers is not None and self.answers.due and self.answers.due[0][0] <= end:
            self.answers._deliver()
        self.now = end


class Answers:
    """Migration's answer queue in simulated time. The fake engine schedules each
    reply; waiting on the queue moves the clock to the next reply due (or by the
    timeout), and delivers it: its reply runs then, as a CRT thread's would."""

    def __init__(self, clock: Clock):
        self.clock = clock
        clock.answers = self
        self.due: list = []  # (time, seq, reply)
        self.ready: deque = deque()
        self.seq = 0

    def schedule(self, at: float, reply) -> None:
        self.seq += 1
        heapq.heappush(self.due, (at, self.seq, reply))

    def put(self, x) -> None:
        self.ready.append(x)

    def _deliver(self) -> None:
        at, _, reply = heapq.heappop(self.due)
        self.clock.now = max(self.clock.now, at)
        reply()

    def get_nowait(self):
        while not self.ready and self.due and self.due[0][0] <= self.clock.now:
            self._deliver()
        if not self.ready:
            raise queue.Empty
        return self.ready.popleft()

    def get(self, timeout: float | None = None):
        deadline = self.clock.now + (timeout if timeout is not None else float("inf"))
        while not self.ready and self.due and self.due[0][0] <= deadline:
            self._deliver()
        if not self.ready:
            self.clock.now = max(self.clock.now, deadline)
            raise queue.Empty
        return self.ready.popleft()


class FakeEngine(Engine):
    """CopyObject against a FakeS3 in simulated time: one attempt per start()."""
    name = "fake"

    def __init__(self, server: FakeS3, clock: Clock, answers: Answers, slow_after=None):
        self.server, self.clock, self.answers = server, clock, answers
        self.inflight = self.done = 0
        self.slow_after = slow_after
        self.on_answer = None  # called after each answer (the test records the window)

    def start(self, src_bucket, src_key, dst_bucket, dst_key, reply,
              storage_class=None) -> None:
        if self.slow_after is not None and self.done >= self.slow_after:
            self.server.latency = 0.5
        self.inflight += 1
        delay, fault = self.server.answer(self.clock.now, self.inflight)

        def answered():
            self.inflight -= 1
            if not fault:
                self.done += 1
                reply("etag", None)
            elif fault == DROPPED:
                reply(None, S3RequestError("AWS_IO_SOCKET_CLOSED: connection closed",
                                           "AWS_IO_SOCKET_CLOSED", None))
            else:
                status = {SLOWDOWN: 503, INTERNAL: 500, DENIED: 403}[fault]
                reply(None, S3RequestError(f"{fault}: simulated", fault, status))
            if self.on_answer:
                self.on_answer()
        self.answers.schedule(self.clock.now + delay, answered)

    def copy(self, *_):
        raise AssertionError("the simulation copies through start()")

    def list_page(self, *_):
        raise AssertionError("the simulation lists nothing")

    def close(self) -> None:
        pass


class NoRows:
    """The database side of the run, with no rows to rewrite: the simulation is
    about requests (the row path has its own tests against PostgreSQL)."""
    plan_name = "index"

    def prepare(self, create_index=False):
        pass

    def lookup(self, keys):
        return {}

    def rewrite(self, pairs, expected=None):
        return {}

    def cancel(self):
        pass

    def referenced(self, keys):
        return set()


def simulate(n: int, ceiling: int, server: FakeS3, max_rate=None, slow_after=None,
             max_seconds: float = 600, max_attempts: int = 10):
    """Copy n objects through the run's real loop (Migration) against `server`.
    Returns (simulated seconds, the window, the pacer, the window's size after each
    answer); the Migration is at simulate.last."""
    random.seed(7)
    clock = Clock()
    answers = Answers(clock)
    pacer = Pacer(max_rate, clock=clock, sleep=clock.sleep)
    path = RequestPath(pacer, max_attempts, clock=clock, sleep=clock.sleep)
    engine = FakeEngine(server, clock, answers, slow_after)
    cfg = Settings(db="", source_bucket="legacy", dest_bucket="prod", source_prefix="image/",
                   dest_prefix="avatar/", table="avatars", column="path", workers=ceiling,
                   max_attempts=max_attempts, progress=False)
    stats = Stats()
    migration = Migration(None, engine, NoRows(), cfg, Reporter(cfg, quiet=True),
                          threading.Event(), stats, path, answers)
    sizes: list[int] = []
    engine.on_answer = lambda: sizes.append(migration.window.size)

    def items():
        for i in range(n):
            if clock.now > max_seconds:
                return
            key = f"u{i:06d}.png"
            yield Item(Obj("image/" + key, 1000, "etag"), "avatar/" + key, COPY)
    migration.run(items())
    simulate.last = migration
    assert stats.copied + stats.failed == stats.listed
    return clock.now, migration.window, pacer, sizes


def test_window_grows_to_the_ceiling_when_the_server_keeps_up():
    seconds, window, _, sizes = simulate(5000, 256, FakeS3(latency=0.05))
    assert sizes[0] <= 32 < max(sizes) == 256
    # 5,000 copies at 50 ms with up to 256 in flight: close to 5000 / 256 round trips
    assert seconds < 2 * 5000 / 256 * 0.05


@pytest.mark.parametrize("ceiling", [32, 64, 128])
def test_doubling_the_ceiling_cuts_the_time_under_latency(ceiling):
    slow, *_ = simulate(5000, ceiling, FakeS3(latency=0.05))
    fast, *_ = simulate(5000, ceiling * 2, FakeS3(latency=0.05))
    assert slow / fast >= 1.5, (ceiling, slow, fast)


def test_window_stops_growing_where_the_server_saturates():
    """A server that turns at most 1,000 copies/s: more in flight only queues."""
    _, window, _, sizes = simulate(5000, 1024, FakeS3(latency=0.005, capacity=1000))
    assert window.peak < 1024
    assert sizes[-1] < 256


def test_rising_latency_shrinks_the_window():
    _, window, _, sizes = simulate(3000, 256, FakeS3(latency=0.05), slow_after=1500)
    before = sizes[1400]
    assert window.size < before


def test_max_rate_holds_the_rate():
    """Count requests per simulated second: never more than the rate plus the burst."""
    clock = Clock()
    pacer = Pacer(50, clock=clock, sleep=clock.sleep)
    stamps = []
    for _ in range(1000):
        pacer.acquire()
        stamps.append(clock.now)
    assert pacer.sent == 1000
    per_second = [sum(1 for t in stamps if s <= t < s + 1) for s in range(int(stamps[-1]))]
    assert max(per_second) <= 50 + pacer.max_rate / 10
    assert 1000 / 50 * 0.9 <= stamps[-1] <= 1000 / 50 * 1.1


class ChangingS3(FakeS3):
    """A limit that changes mid-run: S3 raising a prefix's limit under load, or another
    tenant starting on the same prefix."""

    def __init__(self, before, after, at, **kw):
        super().__init__(rate=before, **kw)
        self.before, self.after, self.at = before, after, at
        self.accepted_after: list[float] = []

    def limit(self, now: float) -> float | None:
        return self.before if now < self.at else self.after

    def answer(self, now: float, inflight: int) -> tuple[float, str]:
        delay, fault = super().answer(now, inflight)
        if now >= self.at and not fault:
            self.accepted_after.append(now)
        return delay, fault

    def reached(self, share: float = 0.9) -> float:
        """Seconds from the change to the first half second S3 accepted at least `share`
        of the new limit."""
        import bisect
        acc, t = self.accepted_after, self.at
        while t < acc[-1]:
            i, j = bisect.bisect_left(acc, t), bisect.bisect_left(acc, t + 0.5)
            if (j - i) / 0.5 >= share * self.after:
                return t - self.at
            t += 0.05
        return float("inf")


# --------------------------------------------------------------------------- the targets
# (the table: each figure in simulated time, against the same run without
# refusals, or against the least time a limit allows, N / limit)


@pytest.fixture(scope="module")
def unrefused():
    return simulate(20000, 256, FakeS3(latency=0.05))[0]


@pytest.mark.parametrize("share, most", [(0.001, 1.05), (0.01, 1.10), (0.05, 1.25),
                                         (0.10, 1.40)])
def test_random_refusals_are_retried_and_the_pace_is_kept(unrefused, share, most):
    """SlowDowns that come whatever the rate (S3 rescaling a prefix, an S3-compatible
    server under load): retried, and the run goes on at its pace."""
    server = FakeS3(latency=0.05, random=share)
    seconds, _, pacer, _ = simulate(20000, 256, server)
    assert seconds <= most * unrefused, seconds / unrefused
    assert pacer.rate is None and pacer.limit is None  # no limit imagined
    assert pacer.background == pytest.approx(share, rel=0.25)
    assert server.faults[SLOWDOWN] > 0 and simulate.last.stats.copied == 20000


@pytest.mark.parametrize("fault", [INTERNAL, DROPPED])
def test_server_errors_and_dropped_connections_never_lower_the_pace(unrefused, fault):
    server = FakeS3(latency=0.05, random=0.10, random_as=fault)
    seconds, _, pacer, _ = simulate(20000, 256, server)
    assert (pacer.rate, pacer.cuts, pacer.throttles) == (None, 0, 0)
    assert seconds <= 1.4 * unrefused
    assert server.faults[fault] > 1000 and simulate.last.stats.copied == 20000


@pytest.mark.parametrize("rate, burst, n", [(300, 0.1, 5100), (300, 0.5, 5100),
                                            (3500, 0.1, 35000), (3500, 0.5, 35000),
                                            (3500, 1.0, 35000)])
def test_a_limit_is_found_and_kept_just_under(rate, burst, n):
    """A per-prefix limit, a token bucket `burst` seconds deep as S3's: the highest
    rate S3 takes is found, and the run stays just under it."""
    server = FakeS3(latency=0.05, rate=rate, burst=burst)
    seconds, _, pacer, _ = simulate(n, 256, server)
    assert seconds <= 1.1 * n / rate, seconds / (n / rate)
    assert server.refused <= 0.03 * server.requests, (server.refused, server.requests)
    assert pacer.limit is not None and pacer.background < 0.01


@pytest.mark.parametrize("rate, burst, n", [(300, 0.1, 5100), (300, 1.0, 5100),
                                            (3500, 1.0, 35000)])
def test_a_limit_is_found_above_random_refusals(rate, burst, n):
    server = FakeS3(latency=0.05, rate=rate, burst=burst, random=0.01)
    seconds, _, pacer, _ = simulate(n, 256, server)
    assert seconds <= 1.15 * n / rate, seconds / (n / rate)
    assert pacer.limit is not None


@pytest.mark.parametrize("before, after", [(1750, 3500), (300, 600)])
def test_a_limit_that_doubles_is_reached_within_3_s(before, after):
    server = ChangingS3(before, after, 5.0, latency=0.05, burst=0.2)
    simulate(5 * before + 10 * after, 256, server)
    assert server.reached() <= 3.0, server.reached()


@pytest.mark.parametrize("before, after", [(3500, 1750), (600, 300)])
def test_a_limit_that_halves_is_followed_without_a_storm(before, after):
    server = ChangingS3(before, after, 5.0, latency=0.05, burst=0.2)
    simulate(5 * before + 10 * after, 256, server)
    assert server.refused <= 0.03 * server.requests, (server.refused, server.requests)
    assert server.reached() <= 0.5


# --------------------------------------------------------------------------- the request path


def test_the_time_a_request_left_is_after_the_pacers_wait():
    """Under --max-rate the pacer holds requests back; the window must see S3's
    latency, not S3's plus the pacer's wait (else it reads a queue it made itself
    as the server slowing down)."""
    seconds, window, pacer, _ = simulate(1000, 256, FakeS3(latency=0.05), max_rate=100)
    assert seconds == pytest.approx(1000 / 100, rel=0.1)
    assert window.srtt == pytest.approx(0.05, rel=0.01)


def test_every_kind_of_request_is_paced_observed_and_retried_in_one_place(s3):
    """A PacedClient over a one-attempt client: a HEAD, a listing and a copy refused
    with SlowDown twice each are retried by the request path, each refusal reaches
    the pacer, and each attempt takes a token; a 404 is an answer, not retried."""
    from botocore.awsrequest import AWSResponse

    from avatarmove.copying import make_s3_client
    from conftest import DEST, SOURCE, put

    put(s3, "image/a.png")
    raw = make_s3_client(1)
    refused: dict[str, int] = {}

    def slow_down(model, params, **_):
        if refused.get(model.name, 0) < 2:
            refused[model.name] = refused.get(model.name, 0) + 1
            return AWSResponse(params.get("url", ""), 503, {}, None), {
                "Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
                "ResponseMetadata": {"HTTPStatusCode": 503}}
        return None
    raw.meta.events.register("before-call.s3", slow_down)
    random.seed(7)
    clock = Clock()
    pacer = Pacer(clock=clock, sleep=clock.sleep)
    paced = RequestPath(pacer, 10, clock=clock, sleep=clock.sleep).client(raw)

    assert paced.head_object(Bucket=SOURCE, Key="image/a.png")["ContentLength"] > 0
    assert [o["Key"] for o in paced.list_objects_v2(Bucket=SOURCE)["Contents"]] == \
        ["image/a.png"]
    paced.copy_object(CopySource={"Bucket": SOURCE, "Key": "image/a.png"}, Bucket=DEST,
                      Key="avatar/a.png")
    assert refused == {"HeadObject": 2, "ListObjectsV2": 2, "CopyObject": 2}
    assert (pacer.sent, pacer.throttles) == (9, 6)
    assert clock.now > 0  # the backoffs were waited out (in simulated time)

    from botocore.exceptions import ClientError
    with pytest.raises(ClientError):
        paced.head_object(Bucket=SOURCE, Key="image/missing.png")
    assert (pacer.sent, pacer.throttles) == (10, 6)
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=DEST)["Contents"]] == ["avatar/a.png"]


# --------------------------------------------------------------------------- errors no rerun cures


class RevokedS3(FakeS3):
    """Write permission revoked after `ok` copies: every CopyObject after is answered
    403 AccessDenied, as S3 does."""

    def __init__(self, ok: int, **kw):
        super().__init__(**kw)
        self.ok, self.denied_at, self.sent_after = ok, None, 0

    def answer(self, now: float, inflight: int) -> tuple[float, str]:
        if self.denied_at is not None and now > self.denied_at:
            self.sent_after += 1  # sent after the first denial came back
        # latencies that vary, as S3's do: answers and new requests interleave
        jitter = self.dice.uniform(0.5, 1.5)
        if self.accepted_count >= self.ok:
            self.requests += 1
            return self.latency * jitter, DENIED
        delay, fault = super().answer(now, inflight)
        return delay * jitter, fault


def test_a_revoked_permission_stops_the_run_with_few_requests_sent_into_it():
    """The first AccessDenied answers hold the window at its floor: the copies in
    flight then come back, and only a few more go out before the run stops."""
    from avatarmove.incurable import STOP_AFTER
    server = RevokedS3(2000, latency=0.05)
    engine_reply = FakeEngine.start

    def start(self, *args):
        reply = args[-1]

        def seen(value, failure, reply=reply):
            if failure is not None and server.denied_at is None:
                server.denied_at = self.clock.now
            reply(value, failure)
        engine_reply(self, *args[:-1], seen)
    FakeEngine.start = start
    try:
        simulate(10000, 256, server)
    finally:
        FakeEngine.start = engine_reply
    migration = simulate.last
    doomed = server.requests - 2000
    print(f"\nrevoked after 2,000: {doomed} copies denied, {server.sent_after} of them sent "
          f"after the first denial came back; {migration.stats.listed} listed")
    assert migration.stats.stopped and migration.stats.copied == 2000
    assert migration.window.held > 0
    assert server.sent_after <= 10
    assert doomed <= 256 + 10 and doomed >= STOP_AFTER


def test_a_few_keys_denied_cost_a_moment_not_the_pace(unrefused):
    """1% of the keys refused for good (a key's own policy): each holds the window
    only until a copy sent after it succeeds."""
    server = FakeS3(latency=0.05, random=0.01, random_as=DENIED)
    seconds, window, _, _ = simulate(20000, 256, server)
    migration = simulate.last
    assert migration.stats.failed == server.faults[DENIED] > 100 and not migration.stats.stopped
    assert window.held > 100
    assert seconds <= 1.1 * unrefused, seconds / unrefused


# --------------------------------------------------------------------------- in a user's words


def test_the_summary_says_what_slowed_the_run_in_a_users_words():
    from avatarmove.report import Summary
    _, _, pacer, _ = simulate(10000, 256, FakeS3(latency=0.05, random=0.04))
    assert pacer.verdict() == "S3 is refusing 4% of requests at random: retrying, pace kept"
    _, _, pacer, _ = simulate(35000, 256, FakeS3(latency=0.05, rate=3500, burst=0.5))
    said = pacer.verdict()
    assert said and said.startswith("S3 limits this prefix near 3,") and "requests/s" in said
    stats = simulate.last.stats
    stats.pacing = said
    cfg = simulate.last.cfg
    text = Summary.of(stats, cfg, "run", "index", pacer.sent, False).to_text(cfg)
    assert f"  pace: {said}" in text.splitlines()
    _, _, pacer, _ = simulate(2000, 256, FakeS3(latency=0.05))
    assert pacer.verdict() is None
