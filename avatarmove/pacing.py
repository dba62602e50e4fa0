"""Pacing: how many copies are in flight, and how many requests per second go out.

Two controls, both adapting to what S3 answers:

- Window: the number of copies in flight, additive increase and
  multiplicative decrease as TCP does. It starts small and doubles per round
  trip (slow start) while throughput keeps growing, then grows by one per
  round trip. A 503 SlowDown halves it; a sharp rise in latency (the server
  slowing down) cuts it by a fifth. Latency that is merely high does not hold
  it: S3's latency varies from request to request, and a server kept busy
  (SeaweedFS here) spends less CPU per copy with more in flight. --workers is
  its ceiling.
- Pacer: a token bucket over every request the run sends (copies, listings,
  HEADs, deletes). --max-rate caps it; a SlowDown lowers the rate for the
  whole run to what S3 accepted in the last second, instead of only retrying
  the one request; a request refused although sent at that new rate cuts it
  again by a fifth. The rate then grows back, slowly past where S3 said no,
  faster the longer nothing more is refused.

Both are driven by the clock passed in, so tests run them against a fake
server in simulated time.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from botocore.exceptions import BotoCoreError, ClientError

log = logging.getLogger("move")

# Codes that say "slow down" rather than "this request is wrong".
THROTTLE_CODES = {"SlowDown", "503", "RequestLimitExceeded", "Throttling", "ThrottlingException",
                  "TooManyRequests", "TooManyRequestsException", "ServiceUnavailable"}


# Answers worth another attempt besides throttling: a server error, a timeout.
SERVER_ERRORS = {"InternalError", "RequestTimeout", "500", "502", "504", "BadGateway",
                 "GatewayTimeout", "RequestTimeTooSkewed", "OperationAborted"}
# No answer at all (botocore's exception names; the CRT's are AWS_ERROR_*).
NO_ANSWER = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
             "ConnectTimeoutError", "ConnectionError", "HTTPClientError", "IncompleteReadError",
             "ResponseStreamingError", "ProxyConnectionError"}


class S3RequestError(Exception):
    """A request that failed: S3's error code, and the HTTP status when S3 answered."""

    def __init__(self, message: str, code: str = "", status: int | None = None):
        super().__init__(message)
        self.code, self.status = code, status


def retryable(code: str, status: int | None = None) -> bool:
    """Worth another attempt: throttling, a server error, or no answer at all."""
    return (code in THROTTLE_CODES or code in SERVER_ERRORS or code in NO_ANSWER
            or code.startswith("AWS_") or (code.isdigit() and int(code) >= 500)
            or (status is not None and status >= 500))


def backoff(attempt: int) -> float:
    """Full jitter, as botocore's standard mode: up to 50 ms, 100 ms, ... 20 s."""
    return random.uniform(0, min(20.0, 0.05 * 2 ** (attempt - 1)))


def classify(exc: BaseException) -> tuple[str, int | None]:
    """An exception from a request: (S3's error code or the exception's name, HTTP status
    if S3 answered at all)."""
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(exc.response.get("Error", {}).get("Code", "") or status or ""), status
    if isinstance(exc, S3RequestError):
        return exc.code, exc.status
    return type(exc).__name__, None


@dataclass
class Answer:
    """One attempt of one request, as the request path saw it go and come back."""
    value: Any = None
    error: str = ""  # "" when S3 accepted the request
    code: str = ""
    status: int | None = None
    sent_at: float = 0.0  # when it left: after the pacer's wait, not before
    answered_at: float = 0.0

    @property
    def latency(self) -> float:
        return self.answered_at - self.sent_at


class RequestPath:
    """The one way a request of the run goes out, for both engines and every kind of
    request: the token first (the pacer), then the time it leaves, then one attempt,
    then what came back told to the pacer, then the retry policy.

    call() runs a blocking request to its end, retries included (listings, HEADs,
    deletes, bucket checks, multipart parts). start() sends one attempt without
    blocking (the run's copies); the run retries those off the window, with
    retry_after()'s policy, so a copy waiting out its backoff holds no place.
    """

    def __init__(self, pacer: Pacer, max_attempts: int = 10,
                 clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], None] | None = None):
        self.pacer, self.max_attempts = pacer, max_attempts
        self.clock = clock or pacer.clock
        self.sleep = sleep or pacer.sleep

    def retry_after(self, attempts: int, code: str, status: int | None = None) -> float | None:
        """Seconds to wait before the next attempt, or None: give up."""
        if attempts >= self.max_attempts or not retryable(code, status):
            return None
        return backoff(attempts)

    def observe(self, sent_at: float, code: str, status: int | None) -> None:
        """An answer to a request that left at sent_at ("" code: accepted)."""
        if code in THROTTLE_CODES or status == 503:
            self.pacer.throttled(sent_at)
        elif not code or status is not None:
            self.pacer.accepted()  # answered, and not "slow down": says "not over the limit"
        # else no answer at all (a dropped connection): says nothing about the rate

    def start(self, send: Callable[[Callable[[Any, BaseException | None], None]], None],
              done: Callable[[Answer], None]) -> None:
        """One attempt: send(reply) must not block, and call reply(value, failure) once,
        from any thread."""
        self.pacer.acquire()
        sent_at = self.clock()

        def reply(value: Any, failure: BaseException | None) -> None:
            now = self.clock()
            if failure is None:
                self.observe(sent_at, "", None)
                done(Answer(value, sent_at=sent_at, answered_at=now))
                return
            code, status = classify(failure)
            self.observe(sent_at, code, status)
            done(Answer(None, describe(failure), code, status, sent_at, now))
        send(reply)

    def call(self, request: Callable[[], Any]) -> Any:
        """request() until it succeeds or the retry policy gives up (then its error)."""
        attempts = 0
        while True:
            attempts += 1
            self.pacer.acquire()
            sent_at = self.clock()
            try:
                value = request()
            except (ClientError, BotoCoreError, S3RequestError, OSError) as exc:
                code, status = classify(exc)
                self.observe(sent_at, code, status)
                wait = self.retry_after(attempts, code, status)
                if wait is None:
                    raise
                self.sleep(wait)
                continue
            self.observe(sent_at, "", None)
            return value

    def client(self, raw) -> PacedClient:
        return PacedClient(raw, self)


def describe(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'Error')}: {err.get('Message', '')}".strip(": ")
    return f"{type(exc).__name__}: {exc}"


class PacedClient:
    """A boto3 S3 client whose every operation goes through a RequestPath: give it a
    client that makes one attempt per call (make_s3_client(1)). What is not an
    operation (meta, exceptions, paginators' models) is the client's own."""

    def __init__(self, raw, path: RequestPath):
        self.raw, self.path = raw, path
        self._operations = raw.meta.method_to_api_mapping

    def __getattr__(self, name: str):
        attr = getattr(self.raw, name)
        if name not in self._operations:
            return attr

        def operation(*args, **kwargs):
            return self.path.call(lambda: attr(*args, **kwargs))
        operation.__name__ = name
        return operation

    def copy(self, CopySource, Bucket, Key, **kwargs):  # noqa: N803 (boto3's names)
        """boto3's managed (multipart) copy, its part requests through the path too."""
        from boto3.s3.inject import copy
        return copy(self, CopySource, Bucket, Key, **kwargs)


class Window:
    """The adaptive number of copies in flight. Used by the coordinating thread;
    throttled() may also come from boto3's threads, hence the lock."""

    SLOW_START_EXIT_GAIN = 1.10  # leave slow start when a doubling bought less than 10%
    LATENCY_RISE = 2.0           # short-term latency over long-term that means "slowing down"
    LATENCY_RISE_MIN_S = 0.010   # ...and by at least this much: loopback queueing is not S3
    MIN_ROUND_S = 0.050          # slow start doubles at most this often

    def __init__(self, ceiling: int, start: int = 16, floor: int = 2,
                 clock: Callable[[], float] = time.monotonic):
        self.ceiling = max(1, ceiling)
        self.floor = min(floor, self.ceiling)
        self.limit = float(max(self.floor, min(start, self.ceiling)))
        self.ssthresh = float(self.ceiling)
        self.clock = clock
        self.srtt: float | None = None  # short-term smoothed latency
        self.lrtt: float | None = None  # long-term smoothed latency
        self.last_cut = float("-inf")
        self.throttles = 0
        self.cuts = {"slowdown": 0, "latency": 0}
        self.peak = int(self.limit)
        self._lock = threading.Lock()
        self._epoch_start = clock()
        self._epoch_done = 0
        self._epoch_rate: float | None = None
        self._round_start = clock()
        self._round_base = self.limit

    @property
    def size(self) -> int:
        return max(self.floor, min(self.ceiling, int(self.limit)))

    def succeeded(self, latency: float) -> None:
        with self._lock:
            self._observe(latency)
            now = self.clock()
            self._end_epoch(now)
            if (self.srtt > self.LATENCY_RISE * self.lrtt
                    and self.srtt - self.lrtt > self.LATENCY_RISE_MIN_S
                    and now - self.last_cut > self.srtt):
                self._cut(0.8, now)
                self.cuts["latency"] += 1
            elif self.limit < self.ssthresh:
                # Slow start: double per round trip, but no faster than per MIN_ROUND_S,
                # so a fast loopback does not reach the ceiling before the first answer
                # of a throttling server can say slow down.
                if now - self._round_start >= max(self.srtt, self.MIN_ROUND_S):
                    self._round_start, self._round_base = now, self.limit
                if self.limit < 2 * self._round_base:
                    self.limit += 1.0
            else:
                self.limit += 1.0 / self.limit
            self.limit = min(self.limit, float(self.ceiling))
            self.peak = max(self.peak, self.size)

    def throttled(self, rate: float | None = None) -> None:
        """S3 answered SlowDown: halve, at most once per round trip; but keep what
        the pacer's new `rate` needs in flight at the current latency (Little's
        law), or the two cuts together would send well under the rate S3 takes."""
        with self._lock:
            self.throttles += 1
            now = self.clock()
            if now - self.last_cut > (self.srtt or 0.05):
                self._cut(0.5, now)
                if rate is not None and self.srtt is not None:
                    self.limit = min(max(self.limit, rate * self.srtt * 1.25), self.limit * 2)
                    self.ssthresh = self.limit
                self.cuts["slowdown"] += 1

    def _cut(self, factor: float, now: float) -> None:
        self.limit = max(float(self.floor), self.limit * factor)
        self.ssthresh = self.limit
        self.last_cut = now

    def _observe(self, latency: float) -> None:
        if self.srtt is None:
            self.srtt = self.lrtt = latency
            return
        self.srtt += (latency - self.srtt) / 8
        self.lrtt += (latency - self.lrtt) / 64

    def _end_epoch(self, now: float) -> None:
        """About one round trip's worth of completions: did throughput still grow?"""
        self._epoch_done += 1
        elapsed = now - self._epoch_start
        if self._epoch_done < self.size or elapsed < max(self.srtt or 0.0, 0.005):
            return
        rate = self._epoch_done / elapsed
        if (self.limit < self.ssthresh and self._epoch_rate is not None
                and rate < self._epoch_rate * self.SLOW_START_EXIT_GAIN):
            self.ssthresh = self.limit  # the server no longer turns more in flight into more done
        self._epoch_rate, self._epoch_start, self._epoch_done = rate, now, 0


class Pacer:
    """A token bucket over every request, plus the run's request counters.

    acquire() is called from any thread right before a request goes out;
    it blocks while the bucket is empty.
    """

    RECOVERY_PER_S = 0.10  # after a cut, the rate grows back by 10% a second...
    PROBE_PER_S = 0.02     # ...and by 2% once near the rate S3 last refused,
    PROBE_DOUBLING_S = 1.0  # a step that doubles every second nothing is refused,
    PROBE_MAX_PER_S = 0.10  # up to 10% a second
    AGAIN_AFTER_S = 0.25   # a request sent this long after a cut and refused: cut again

    def __init__(self, max_rate: float | None = None, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.max_rate = max_rate
        self.rate = max_rate  # None: no limit until S3 says slow down
        self.burst = burst
        self.clock, self.sleep = clock, sleep
        self.sent = 0
        self.throttles = 0
        self._lock = threading.Lock()
        self._next = clock()
        self._last_cut = float("-inf")
        self._last_grow = clock()
        self._ok: deque[float] = deque()  # times of accepted requests, last second
        self._refused_at: float | None = None  # the rate at which S3 last said slow down
        self._probing_since: float | None = None
        # e.g. the Window's throttled(), given the new rate
        self.on_throttle: list[Callable[[float | None], None]] = []

    def acquire(self) -> None:
        with self._lock:
            self.sent += 1
            if self.rate is None:
                return
            now = self.clock()
            self._grow(now)
            interval = 1.0 / self.rate
            burst = self.burst if self.burst is not None else max(1.0, self.rate / 10)
            self._next = max(self._next, now - (burst - 1) * interval)
            wait = self._next - now
            self._next += interval
        if wait > 0:
            self.sleep(wait)

    def accepted(self) -> None:
        """A request S3 answered without throttling."""
        with self._lock:
            now = self.clock()
            self._ok.append(now)
            while self._ok and self._ok[0] < now - 1.0:
                self._ok.popleft()

    def throttled(self, sent_at: float | None = None) -> None:
        """SlowDown: from now on, send no faster than S3 accepted in the last second.

        `sent_at`, when the caller knows it, is when the refused request left."""
        with self._lock:
            self.throttles += 1
            now = self.clock()
            since = now - self._last_cut
            # Refused although sent at the rate of the last cut: that rate is still
            # too high. Right after the start it is, as S3 lets a burst through and
            # the first second's count includes it.
            if (sent_at is not None and sent_at >= self._last_cut + self.AGAIN_AFTER_S
                    and self.AGAIN_AFTER_S <= since < 1.0 and self.rate is not None):
                was = self.rate
                self.rate = max(1.0, 0.8 * was)
                self._refused_at = was
                self._last_cut = self._last_grow = now
                self._probing_since = None
                log.debug("SlowDown at the new rate: rate %.0f/s -> %.0f/s", was, self.rate)
            # one cut per second: the answers to one burst arrive together
            elif since >= 1.0:
                while self._ok and self._ok[0] < now - 1.0:
                    self._ok.popleft()
                accepted = max(1.0, float(len(self._ok)))
                was = self.rate
                current = was if was is not None else accepted
                # Never below 70% at once: right after a pause little was accepted.
                self.rate = max(1.0, 0.7 * current, 0.9 * min(current, accepted))
                self._refused_at = current
                if self._ok:  # as if the last second's requests had been sent at the new rate
                    self._next = max(self._next, self._ok[0] + len(self._ok) / self.rate)
                self._last_cut = self._last_grow = now
                self._probing_since = None
                log.debug("SlowDown: %d accepted in the last second; rate %s -> %.0f/s",
                          len(self._ok), f"{was:.0f}/s" if was else "unlimited",
                          self.rate)
        for listener in self.on_throttle:
            listener(self.rate)

    def _grow(self, now: float) -> None:
        if self.rate is None or now - self._last_grow < 0.1:
            return
        # Quickly back to where S3 refused, then slowly past it, as a burst of
        # refusals is the price of each probe over the limit. But S3 raises a
        # prefix's limit under sustained load, and a first cut made while the
        # window was still growing comes in low: the longer nothing is refused,
        # the less that old limit says, so the probe's step doubles every second.
        near = self._refused_at is not None and self.rate >= 0.95 * self._refused_at
        if not near:
            per_s = self.RECOVERY_PER_S
        else:
            if self._probing_since is None:
                self._probing_since = now
            per_s = min(self.PROBE_MAX_PER_S, self.PROBE_PER_S * 2 ** (
                (now - self._probing_since) / self.PROBE_DOUBLING_S))
        self.rate += self.rate * per_s * (now - self._last_grow)
        self._last_grow = now
        if self.max_rate is not None:
            self.rate = min(self.rate, self.max_rate)
