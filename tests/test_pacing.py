"""The window and the pacer against a fake S3 in simulated time: fast, and the
same answer every run. Figures are counts and simulated seconds, not timings."""
from __future__ import annotations

import heapq
import random
from collections import deque

import pytest

from avatarmove.copying import backoff
from avatarmove.pacing import Pacer, Window


class FakeS3:
    """Answers after `latency` seconds; with a capacity, queueing adds latency
    (Little's law); with a rate limit, more than `rate` accepted requests in
    the last second get 503 SlowDown, as S3's per-prefix limit does."""

    def __init__(self, latency=0.05, capacity=None, rate=None, burst=None):
        self.latency, self.capacity, self.rate = latency, capacity, rate
        self.accepted: deque[float] = deque()
        self.requests = self.refused = 0
        # burst: a token bucket `burst` deep instead (bench/netproxy.py's model):
        # a full second's worth passes at once at the start
        self.burst, self.tokens, self.stamp = burst, burst, 0.0

    def answer(self, now: float, inflight: int) -> tuple[float, bool]:
        self.requests += 1
        while self.accepted and self.accepted[0] <= now - 1.0:
            self.accepted.popleft()
        if self.burst is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            refuse = self.tokens < 1.0
            self.tokens -= 0.0 if refuse else 1.0
        else:
            refuse = self.rate is not None and len(self.accepted) >= self.rate
        if refuse:
            self.refused += 1
            return self.latency, True
        self.accepted.append(now)
        queueing = inflight / self.capacity if self.capacity else 0.0
        return max(self.latency, queueing), False


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def simulate(n: int, ceiling: int, server: FakeS3, max_rate=None, slow_after=None,
             max_seconds: float = 600):
    """Copy n objects the way Migration does: at most window.size in flight,
    every request through the pacer, SlowDown answers retried after a backoff."""
    random.seed(7)
    clock = Clock()
    pacer = Pacer(max_rate, clock=clock, sleep=clock.sleep)
    window = Window(ceiling, clock=clock)
    pacer.on_throttle.append(window.throttled)
    events: list = []  # (answer time, seq, sent at, throttled, attempts)
    retries: list = []  # (due, seq, attempts)
    todo, done, inflight, seq = n, 0, 0, 0
    sizes = []
    while done < n and clock.now < max_seconds:
        while inflight < window.size and (todo or (retries and retries[0][0] <= clock.now)):
            attempts = 1
            if retries and retries[0][0] <= clock.now:
                attempts = heapq.heappop(retries)[2] + 1
            else:
                todo -= 1
            pacer.acquire()
            if slow_after is not None and done >= slow_after:
                server.latency = 0.5
            delay, throttled = server.answer(clock.now, inflight + 1)
            seq += 1
            heapq.heappush(events, (clock.now + delay, seq, clock.now, throttled, attempts))
            inflight += 1
        if not events:
            clock.now = retries[0][0]
            continue
        at, _, sent_at, throttled, attempts = heapq.heappop(events)
        clock.now = max(clock.now, at)
        inflight -= 1
        if throttled:
            pacer.throttled(sent_at)
            seq += 1
            heapq.heappush(retries, (clock.now + backoff(attempts), seq, attempts))
        else:
            pacer.accepted()
            window.succeeded(clock.now - sent_at)
            done += 1
        sizes.append(window.size)
    return clock.now, window, pacer, sizes


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


def test_slowdown_halves_the_window_and_the_run_keeps_under_the_limit():
    server = FakeS3(latency=0.01, rate=300)
    seconds, window, pacer, sizes = simulate(5000, 256, server)
    assert pacer.throttles == server.refused > 0
    assert window.throttles == server.refused
    assert server.refused <= 0.03 * server.requests, (server.refused, server.requests)
    assert seconds <= 1.15 * 5000 / 300, seconds
    assert min(sizes[len(sizes) // 2:]) < max(sizes)


@pytest.mark.parametrize("latency, rate", [(0.01, 300), (0.05, 1000), (0.05, 3500)])
def test_a_rate_limit_is_followed_closely_at_any_latency(latency, rate):
    """After a SlowDown the window keeps what the new rate needs in flight, and the
    rate creeps past the one S3 refused only slowly: close to the limit, few refused."""
    n = 17 * rate
    server = FakeS3(latency=latency, rate=rate)
    seconds, _, _, _ = simulate(n, 256, server)
    assert seconds <= 1.15 * n / rate, seconds / (n / rate)
    assert server.refused <= 0.03 * server.requests, (server.refused, server.requests)


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


def test_slowdown_lowers_the_rate_for_the_whole_run():
    clock = Clock()
    pacer = Pacer(None, clock=clock, sleep=clock.sleep)
    for _ in range(200):  # 200 accepted within the last second, then S3 says slow down
        pacer.acquire()
        pacer.accepted()
        clock.now += 0.004
    pacer.throttled()
    assert pacer.rate == pytest.approx(0.9 * 200)
    start = clock.now
    for _ in range(180):
        pacer.acquire()
    # 180 requests now take about a second, less the burst the bucket allows
    assert clock.now - start >= (180 - 0.1 * 180) / 180 * 0.95


def test_a_request_refused_at_the_new_rate_cuts_again_within_the_second():
    """S3 lets a burst through at the start, so the first cut, from the last second's
    count, is too high: a refusal of a request sent after that cut says so."""
    clock = Clock()
    pacer = Pacer(None, clock=clock, sleep=clock.sleep)
    for _ in range(540):  # a full bucket of 300 and a second's refill, all accepted
        pacer.acquire()
        pacer.accepted()
        clock.now += 1 / 540
    pacer.throttled(sent_at=clock.now - 0.001)
    first = pacer.rate
    assert first == pytest.approx(0.9 * 540, rel=0.01)
    clock.now += 0.3
    pacer.throttled(sent_at=clock.now - 0.31)  # sent before the cut: no news
    assert pacer.rate == pytest.approx(first, rel=0.05)
    pacer.throttled(sent_at=clock.now - 0.01)  # sent at the new rate, still refused
    assert pacer.rate == pytest.approx(0.8 * first, rel=0.05)


def test_a_bursting_limit_at_3500_per_s_refuses_few_at_50_ms():
    """bench/netproxy.py's and S3's model: a token bucket one second deep."""
    n = 17 * 3500
    server = FakeS3(latency=0.05, rate=3500, burst=3500)
    seconds, _, _, _ = simulate(n, 256, server)
    assert seconds <= 1.15 * n / 3500
    assert server.refused <= 0.01 * server.requests, (server.refused, server.requests)


class RisingS3(FakeS3):
    """S3 raises a prefix's limit under sustained load: `low` requests/s until
    `at` seconds, `rate` after."""

    def __init__(self, low, at, **kw):
        super().__init__(**kw)
        self.low, self.at, self.high = low, at, self.rate

    def answer(self, now: float, inflight: int) -> tuple[float, bool]:
        self.rate = self.low if now < self.at else self.high
        return super().answer(now, inflight)


def test_a_limit_that_rises_is_found_within_seconds():
    """Past the rate S3 last refused, the probe's step doubles every second
    nothing is refused: a 2% a second creep took 1.69x the ideal time here."""
    server = RisingS3(150, 3.0, latency=0.01, rate=300)
    n = 17 * 300
    ideal = 3.0 + (n - 3.0 * 150) / 300
    seconds, _, pacer, _ = simulate(n, 256, server)
    assert seconds <= 1.4 * ideal, seconds / ideal
    assert server.refused <= 0.03 * server.requests, (server.refused, server.requests)
    assert pacer.rate >= 0.85 * 300


def test_the_rate_grows_past_a_stale_refusal_when_nothing_more_is_refused():
    clock = Clock()
    pacer = Pacer(None, clock=clock, sleep=clock.sleep)
    for _ in range(200):
        pacer.acquire()
        pacer.accepted()
        clock.now += 0.005
    pacer.throttled()
    cut = pacer.rate
    start = clock.now
    while clock.now - start < 8.0:  # eight seconds of requests, all accepted
        pacer.acquire()
        pacer.accepted()
    assert pacer.rate >= 1.5 * 200, (cut, pacer.rate)
