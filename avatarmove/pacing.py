"""Pacing: how many copies are in flight, how many requests per second go out,
and the one path every request takes.

- RequestPath: the token, the time a request left, one attempt through an
  engine (or a boto3 call), what came back told to the pacer, the retry policy.
- Window: the number of copies in flight, additive increase and
  multiplicative decrease as TCP does. It starts small and doubles per round
  trip (slow start) while throughput keeps growing, then grows by one per
  round trip; a sharp rise in latency (the server slowing down) cuts it by a
  fifth. Latency that is merely high does not hold it: S3's latency varies
  from request to request, and a server kept busy (SeaweedFS here) spends
  less CPU per copy with more in flight. --workers is its ceiling. SlowDown
  does not touch it: the pacer's rate holds the requests back instead.
- Pacer: a token bucket over every request the run sends (copies, listings,
  HEADs, deletes), capped by --max-rate, whose rate follows the evidence of
  S3's answers: refusals that come whatever the rate are retried and keep the
  pace; refusals that grow with the rate are a limit, found and kept just
  under (see Pacer).

All are driven by the clock passed in, so tests run them against a fake
server in simulated time.
"""
from __future__ import annotations

import logging
import math
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
            self.pacer.answered(sent_at, refused=True)
        elif not code or status is not None:
            # answered, and not "slow down" (a 500 included): not over any limit
            self.pacer.answered(sent_at, refused=False)
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
    """The adaptive number of copies in flight. Used by the coordinating thread
    (the lock keeps it safe to read from others)."""

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
        self.cuts = {"latency": 0}
        self._held: float | None = None  # the size before hold()
        self.held = 0  # times held
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
            if self._held is not None:
                return  # a copy sent before the hold: the hold stays
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

    def hold(self) -> None:
        """Errors a rerun cannot cure came back: as few copies in flight as can be,
        until release(). A revoked permission answers every copy the same way: the
        fewer sent into it, the better; a single key's refusal costs a moment."""
        with self._lock:
            if self._held is None:
                self._held = self.limit
            self.limit = float(self.floor)
            self.held += 1

    def release(self) -> None:
        """A copy sent after the hold began succeeded: back to the size before it."""
        with self._lock:
            if self._held is not None:
                self.limit, self._held = max(self.limit, self._held), None

    def at_least(self, size: float) -> None:
        """What a rate the pacer holds needs in flight (Little's law): the window never
        holds the run under the pacer's rate."""
        if size > self.limit and self._held is None:
            with self._lock:
                self.limit = min(float(self.ceiling), max(self.limit, size))
                self.peak = max(self.peak, self.size)

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
    """A token bucket over every request, its rate set by the evidence of S3's answers.

    acquire() is called from any thread right before a request goes out; it
    blocks while the bucket is empty. answered() is told every answer: when its
    request left and whether S3 said slow down.

    Answers are judged in batches (BATCH_MIN answers and BATCH_S seconds or
    more), each of requests sent since the rate last changed, so a batch speaks
    of the current rate. A batch refuses in excess when it holds clearly more
    SlowDowns than the background share predicts (three standard deviations).

    - Excess: the rate drops to just under what S3 accepted since the batch's
      first refusal (the limit, if there is one), and the next batch checks.
    - The check, sent at the lower rate: if the refused share fell (or the
      accepted share rose) with the rate, it was a limit: stay just under it,
      and probe upward (S3 raises a prefix's limit under load). If it did not,
      the refusals come whatever the rate: background, retried by the run; the
      rate goes back to where it was and the background share learns them.
    - Batches without excess teach the background share.

    500s and dropped connections are not refusals: they never lower the rate.
    """

    BATCH_MIN = 40        # answers in a batch...
    BATCH_S = 0.1         # ...over at least this long
    BATCH_MAX_S = 1.0     # a slow run's batch ends here with BATCH_FEW answers
    BATCH_FEW = 8
    PROBE_BATCH_MAX = 4000  # answers a probe's batch holds at most
    CHECK_MIN = 100       # answers, and seconds, a check takes at least before it says
    CHECK_MIN_S = 0.25    # "background" or "a limit" (it may say "still over" sooner)
    CHECK_MAX = 400       # answers a check takes at most before it decides
    BACKGROUND_MAX = 0.5  # a larger refused share is never background
    DEEP_CUT = 0.85       # a cut to this share of the rate or less can tell them apart
    Z = 4.5               # standard deviations over the background that are excess...
    Z_PROBING = 2.0       # ...and past a limit found
    UNDER = 0.97          # how far under the limit found the rate stays
    ROSE = 1.3            # an accepted share this much above before: it did rise
    MEMORY = 0.97         # per batch, how much of the background share's evidence stays
    PROBE_START = 0.04    # past the limit found, the rate grows 4% a second at first,
    PROBE_DOUBLING_S = 0.5  # the step doubling every half second nothing is refused,
    PROBE_QUICK_S = 1.0     # (or as if a second had passed, after a deep cut)
    PROBE_NEAR_MAX = 0.16   # up to 16% a second near the limit found,
    STALE = 1.10            # and, this far past it with nothing refused (it moved),
    PROBE_FAR_MAX = 1.00    # up to 100% a second

    def __init__(self, max_rate: float | None = None, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.max_rate = max_rate
        self.rate = max_rate  # None: no limit until S3 shows one
        self.burst = burst
        self.clock, self.sleep = clock, sleep
        self.sent = 0
        self.throttles = 0  # SlowDown answers, every one
        self.limit: float | None = None  # the highest rate S3 took, once a limit is found
        self.cuts = 0  # times the rate was lowered for a limit
        self._lock = threading.Lock()
        self._next = self._started = clock()
        self._last_grow = clock()
        self._probing_since = clock()
        self._quick = False
        self._since = float("-inf")  # the batch holds requests sent from here on
        self._batch: list[tuple[float, bool]] = []  # (sent at, refused)
        self._batch_start = clock()
        self._batch_refused = self._judged = 0
        # before a cut: the rate, the share refused, answers, refusals, when the probe began,
        # whether the cut was deep enough to tell background from a limit
        self._check: tuple[float | None, float, int, int, float, bool] | None = None
        self._bg_n = self._bg_k = 0.0  # the background's evidence: answers, refusals
        self._accepted: deque[float] = deque()  # answer times of the last second's acceptances

    def verdict(self) -> str | None:
        """What is slowing the run, in a user's words (None: nothing S3 said)."""
        said = []
        if self.limit is not None:
            said.append(f"S3 limits this prefix near {self.limit:,.0f} requests/s")
        if self.background >= 0.001 and self.throttles:
            share = 100 * self.background
            said.append(f"S3 is refusing {share:.0f}% of requests at random: retrying, pace kept"
                        if share >= 1 else f"S3 is refusing {share:.1f}% of requests at random: "
                        "retrying, pace kept")
        return "; ".join(said) or None

    @property
    def background(self) -> float:
        """The share of requests S3 refuses whatever the rate (0..1)."""
        return self._bg_k / self._bg_n if self._bg_n >= 1 else 0.0

    def acquire(self) -> None:
        with self._lock:
            self.sent += 1
            if self.rate is None:
                return
            now = self.clock()
            self._grow(now)
            interval = 1.0 / self.rate
            # a fortieth of a second of tokens: S3 may keep no more than a tenth of a second
            burst = self.burst if self.burst is not None else max(1.0, self.rate / 40)
            self._next = max(self._next, now - (burst - 1) * interval)
            wait = self._next - now
            self._next += interval
        if wait > 0:
            self.sleep(wait)

    def answered(self, sent_at: float, refused: bool) -> None:
        """An answer from S3 to a request that left at sent_at; refused: SlowDown."""
        with self._lock:
            now = self.clock()
            if refused:
                self.throttles += 1
            else:
                self._accepted.append(now)
                while self._accepted[0] < now - 1.0:
                    self._accepted.popleft()
            if sent_at < self._since:
                return  # sent at an earlier rate: says nothing of this one
            self._batch.append((sent_at, refused))
            self._batch_refused += refused
            fresh = len(self._batch) - self._judged
            if (fresh >= self.BATCH_MIN
                    or (now - self._batch_start >= self.BATCH_MAX_S and fresh >= self.BATCH_FEW)
                    # an excess is said at once, before the next requests go out
                    or (refused and self._check is None
                        and self._excess(len(self._batch), self._batch_refused))):
                self._judge(now)

    def _new_batch(self, now: float, rate_changed: bool) -> None:
        self._batch = []
        self._batch_refused = self._judged = 0
        self._batch_start = now
        if rate_changed:
            self._since = now
            self._last_grow = self._probing_since = now

    def _probing(self) -> bool:
        return self.limit is not None and self.rate is not None and self.rate > self.limit

    def _excess(self, n: int, k: int) -> bool:
        """k refused of n: clearly more than the background share says? Past a limit
        found, a few more are the limit's; anywhere else it takes more to tell them
        from chance."""
        p = self.background
        expected = p * n
        if self._probing():
            return k > expected + self.Z_PROBING * math.sqrt(expected * (1 - p) + 1)
        if n < self.BATCH_MIN and 2 * k < n:
            return False  # a few answers (a run's first round trips) say little
        return k > expected + self.Z * math.sqrt(expected * (1 - p) + 1) + 1

    def _judge(self, now: float) -> None:
        batch = self._batch
        n = len(batch)
        k = self._batch_refused
        probing = self._probing()
        excess = self._excess(n, k)
        share = k / n
        check = self._check
        if check is not None:
            before_rate, before_share, before_n, before_k, probing_since, deep = check
            spread = math.sqrt(before_share * (1 - before_share) * (1 / n + 1 / before_n))
            rose = 1 - share > self.ROSE * (1 - before_share)
            # A short check says only "still over": a deep bucket of S3's can hide a limit
            # for a moment.
            long_enough = n >= self.CHECK_MIN and now - self._batch_start >= self.CHECK_MIN_S
            # Still refused, as much as before (neither less nor more: more at a lower
            # rate is a limit a bucket hid before): background. More than half refused
            # is a limit whatever: a background that large is a server down.
            # (and only after a cut deep enough, or a count large enough, to tell)
            same = ((excess or k >= 3) and long_enough and not rose and deep
                    and abs(share - before_share) <= 2 * spread
                    and before_share <= self.BACKGROUND_MAX)
            differs = rose or abs(share - before_share) > 2 * spread
            if not same and not (excess and differs) and not (long_enough and not excess):
                if n < self.CHECK_MAX and now - self._batch_start < 1.0:
                    self._judged = n  # not clear yet: the check goes on at this rate
                    return
            self._check = None
            if same:
                # The share did not fall with the rate: background. Back to the rate of
                # before the cut, the probe where it was; the background share learns
                # from both batches.
                self._bg_n = self._bg_n * self.MEMORY + n + before_n
                self._bg_k = self._bg_k * self.MEMORY + k + before_k
                was, self.rate = self.rate, before_rate
                log.debug("SlowDown at %.1f%% whatever the rate: background; rate %s -> %s",
                          100 * share, fmt_rate(was), fmt_rate(self.rate))
                self._new_batch(now, rate_changed=True)
                self._probing_since = probing_since
                return
            if not excess:
                # No more than the background now: a limit, just above this rate.
                self.limit = self.rate / self.UNDER if self.rate else None
                log.debug("limit found near %s (%d of %d refused, %.0f%% before)",
                          fmt_rate(self.limit), k, n, 100 * before_share)
                self._new_batch(now, rate_changed=False)
                if before_rate is None or before_rate > 2 * self.rate:
                    # after a deep cut, this is only a floor: the probe starts quick
                    self._probing_since = now - self.PROBE_QUICK_S
                    self._quick = True
                return
            # fell, but still in excess: still over; cut again below
        if not excess:
            if now - self._batch_start < self.BATCH_S or (probing and n < self.PROBE_BATCH_MAX):
                # Too short to say "no excess" yet (an excess is said at once: at 10 ms
                # a round trip, a tenth of a second of a run's start is hundreds of
                # refusals). A probe past the limit found goes on too (a few answers
                # say little at a low rate), and its refusals are not background.
                self._judged = n
                return
            if self.limit is None or (self.rate is not None
                                      and self.rate <= self.UNDER * self.limit):
                # under no limit, or under the one found: what is refused is background
                self._bg_n = self._bg_n * self.MEMORY + n
                self._bg_k = self._bg_k * self.MEMORY + k
            self._new_batch(now, rate_changed=False)
            return
        # Excess: cut to just under what S3 accepted since the first refusal.
        # (sent at the same moment as the first refusal but accepted: S3's burst, not its
        # rate; on a real clock there are no ties)
        # Only the last quarter second: a probe's batch runs for seconds, its rate rising.
        last = max(sent for sent, _ in batch)
        first = min((sent for sent, refused in batch if refused and sent >= last - 0.25),
                    default=None)
        if first is None:
            first = min(sent for sent, refused in batch if refused)
        after = [(sent, refused) for sent, refused in batch
                 if sent > first or (refused and sent == first)]
        accepted_after = sum(1 for _, refused in after if not refused)
        span = last - first
        # what S3 accepted in the last second (or since the run's first answer)
        lately = len(self._accepted) / max(0.05, min(1.0, now - self._started))
        took = accepted_after / max(span, 0.02)
        recent = [sent for sent, _ in batch if sent >= last - 0.25]
        recent_span = last - min(recent)
        sending = len(recent) / recent_span if recent_span >= 0.02 else None
        if span < 0.05 or len(after) < self.BATCH_FEW:
            # Too short to count what S3 takes (its bucket ran dry just now): halve the
            # rate sent, or, for a probe past the limit found, halve the way back to it.
            rate_sent = sending or lately
            took = max(took, math.sqrt(self.limit * rate_sent) if probing and rate_sent > self.limit
                       else 0.5 * rate_sent)
        target = max(1.0, self.UNDER * took / max(0.05, 1 - self.background))
        current = self.rate if self.rate is not None else (sending or target / self.UNDER)
        was = self.rate
        self.rate = min(current, target)
        if self.max_rate is not None:
            self.rate = min(self.rate, self.max_rate)
        refused_after = len(after) - accepted_after
        # a background found by a later check restores the rate of before the first cut
        origin = (was, self._probing_since) if check is None else (check[0], check[4])
        # A check can tell background from a limit only after a deep cut, from a share
        # counted over a span long enough (a bucket just run dry refuses few at first).
        deep = ((self.rate <= self.DEEP_CUT * current and span >= 0.05
                 and len(after) >= self.BATCH_FEW) or len(after) >= self.CHECK_MIN)
        self._check = (origin[0], refused_after / len(after), len(after), refused_after,
                       origin[1], deep)
        self.cuts += 1
        log.debug("SlowDown: %d of %d refused; S3 took %.0f/s; rate %s -> %s", k, n, took,
                  fmt_rate(was), fmt_rate(self.rate))
        if self.rate is not None:
            # as if the requests since the first refusal had been sent at the new rate
            self._next = max(self._next, now)
        self._new_batch(now, rate_changed=True)

    def _grow(self, now: float) -> None:
        if now - self._last_grow < 0.05:
            return
        if self.rate is None or self._check is not None or self.limit is None:
            self._last_grow = now  # the probe starts after the check
            if not self._quick:
                self._probing_since = now
            return
        self._quick = False
        cap = self.PROBE_NEAR_MAX if self.rate < self.STALE * self.limit else self.PROBE_FAR_MAX
        per_s = min(cap, self.PROBE_START * 2 ** (
            (now - self._probing_since) / self.PROBE_DOUBLING_S))
        self.rate += self.rate * per_s * (now - self._last_grow)
        # A rate not used says nothing: no more than twice what S3 took lately
        # (or its token bucket, always full, lets the run's own bursts through).
        self.rate = min(self.rate, max(self.limit, 2 * len(self._accepted)))
        self._last_grow = now
        if self.max_rate is not None:
            self.rate = min(self.rate, self.max_rate)


def fmt_rate(rate: float | None) -> str:
    return "unlimited" if rate is None else f"{rate:.0f}/s"
