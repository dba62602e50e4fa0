"""The run: list, plan, copy on a bounded window, rewrite rows in batches.

One coordinating thread owns all state (the Migration's attributes); copies
finish on worker or CRT threads and come back through one queue.
"""
from __future__ import annotations

import gc
import heapq
import logging
import os
import queue
import signal
import sys
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Iterator

from botocore.exceptions import (BotoCoreError, ClientError, EndpointConnectionError,
                                 NoCredentialsError, PartialCredentialsError)

from . import copying, references
from .copying import Engine, Paced, copy_answered, copy_class, describe_error, make_engine
from .database import Database
from .deleting import Deleter, source_versioning, versioning_warning
from .journal import ensure_journal
from .lock import take as take_lock
from .listing import Listing, Obj, check_manifest, listed, read_manifest
from .pacing import Answer, PacedClient, RequestPath, Window, fmt_rate
from .incurable import ARCHIVED_CODES, Streak, is_incurable
from .access import decide as decide_access
from .identity import sse_c_refused
from .planning import (CHECK, CONFLICT, COPY, DONE, SKIP_ARCHIVED, UNCOPYABLE, Item, plan, sse_c)
from .regions import Regions, discover, route
from .report import (COPIED, FAILED, NOT_REWRITTEN, ROWS_ONLY, SKIPPED, Reporter, Stats,
                     Summary)
from .settings import EXIT_INTERRUPTED, Settings, UsageError

log = logging.getLogger("move")


class Interrupt:
    """First Ctrl-C/SIGTERM: stop taking work and finish cleanly. Second: leave now.

    Leaving at once is safe: rows are only written after their copy succeeded,
    in transactions the server rolls back if we vanish mid-way.
    """

    def __init__(self):
        self.event = threading.Event()
        self.previous = {}

    def install(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)

    def uninstall(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, _frame):
        if self.event.is_set():
            os.write(2, b"\nmove.py: interrupted again, exiting now\n")
            os._exit(EXIT_INTERRUPTED)
        self.event.set()
        os.write(2, b"\nmove.py: interrupted: finishing copies in flight and writing their "
                    b"rows (Ctrl-C again to exit now)\n")


class Migration:
    """One pass over the plan. The window of copies in flight is bounded, so
    memory stays flat and the listing is never read far ahead of the copies.

    Time is the request path's clock, and answers come back through `answers`
    (a queue: put, get(timeout), get_nowait): tests drive this loop in simulated
    time with a fake engine."""

    def __init__(self, s3: PacedClient, engine: Engine, db: Database, cfg: Settings,
                 reporter: Reporter, stop: threading.Event, stats: Stats,
                 path: RequestPath | None = None, answers=None):
        self.s3, self.engine, self.db, self.cfg = s3, engine, db, cfg
        self.reporter, self.stop, self.stats = reporter, stop, stats
        self.path = path or s3.path
        self.clock, self.sleep = self.path.clock, self.path.sleep
        # SimpleQueue: C, no Condition to notify; it carries every copy's answer:
        # (item, Answer) for a copy sent here, (item, None) for a copy_one's result
        self.done_q = answers if answers is not None else queue.SimpleQueue()
        self.inflight = 0
        # --workers is the ceiling; how many copies are in flight adapts below it.
        self.window = Window(ceiling=cfg.workers, clock=self.clock)
        self.retries: list[tuple[float, int, Item]] = []  # (due, seq, item), a heap
        self.retry_seq = 0
        self.batch: list[Item] = []
        self.last_flush = self.clock()
        self.executor = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="check")
        self.streak = Streak()  # copies failing with errors a rerun cannot cure
        self.held_after = 0  # while held: a copy sent after this one that succeeds releases
        self.flushes, self.flush_s = 0, 0.0  # batches of rows written, and the time they took
        # Writing rows blocks on the database: a thread of its own, so copies go on meanwhile.
        self.db_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rows")
        self.writes: deque[Future] = deque()
        self.deleter = (Deleter(s3, engine, db, cfg, stats, reporter,
                                lambda fn, *args: self.db_thread.submit(fn, *args).result())
                        if cfg.delete_source and not cfg.dry_run else None)
        # Items whose rows another transaction holds locked: tried again every few
        # seconds while the run goes on, until --lock-wait has passed for them.
        self.held: list[Item] = []
        self.held_due = 0.0
        self.held_said = 0.0

    def run(self, items: Iterable[Item]) -> None:
        # The row plan (a scan into a snapshot, or an index build) is the database
        # thread's first job: the first copies go out meanwhile, and no batch of rows
        # is written before it is ready. On a large table the scan takes seconds.
        self.writes.append(self.db_thread.submit(self.prepare_rows))
        ended = threading.Event()
        threading.Thread(target=self.cancel_when_stopped, args=(ended,), name="db-cancel",
                         daemon=True).start()
        try:
            for item in items:
                self.stats.listed += 1
                item.seq = self.stats.listed
                if item.kind in UNCOPYABLE:  # found by planning: no request, rows left alone
                    item.action = item.kind
                    self.finish(item)
                else:
                    self.dispatch(item)
                self.drain(block=False)
                if self.stop.is_set() or self.stats.stopped:
                    break  # stopped: what is in flight finishes and gets its rows below
            self.wait_in_flight()
            self.flush()
            self.collect_rows(wait=True)
            self.wait_for_held()
            if self.deleter:
                self.deleter.flush()
        finally:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.engine.close()
            self.db_thread.shutdown(wait=True, cancel_futures=True)
            ended.set()

    def cancel_when_stopped(self, ended: threading.Event) -> None:
        """Ctrl-C while the database thread waits on the server (a lock, a long scan, an
        index build): the rows of copies in flight get a few seconds to be written,
        then the statement is canceled, so the run ends within seconds and its
        session, and the lock it holds, with it."""
        self.stop.wait()
        while not ended.wait(3):
            self.db.cancel()

    def dispatch(self, item: Item) -> None:
        if item.kind in (COPY, CHECK):  # a dry run's copies HEAD their source (SSE-C?)
            self.wait_for_room()
            if not self.stop.is_set():
                self.send(item)
        elif item.kind == DONE:
            self.batch.append(item)
        else:
            item.action = CONFLICT
            self.finish(item)

    def wait_for_room(self) -> None:
        while self.inflight >= self.window.size and not self.stop.is_set():
            self.drain(block=True)

    def send(self, item: Item) -> None:
        """A plain copy goes out as one attempt through the request path, its answer
        back on done_q; anything else (HEADs first, a multipart copy) is copy_one's,
        on a worker, each of its requests through the same path."""
        self.inflight += 1
        item.attempts += 1
        cfg = self.cfg
        if item.kind == COPY and not cfg.dry_run and \
                (item.src.size or 0) <= cfg.multipart_threshold:
            self.path.start(
                lambda reply: self.engine.start(cfg.source_bucket, item.src.key,
                                                cfg.dest_bucket, item.dest_key, reply,
                                                copy_class(item.src, cfg)),
                lambda answer: self.done_q.put((item, answer)))
        else:
            item.sent_at = self.clock()
            self.executor.submit(copying.copy_one, self.s3, self.engine, item, cfg) \
                .add_done_callback(lambda f: f.cancelled() or self.done_q.put((item, None)))

    def take(self, done: tuple[Item, Answer | None]) -> None:
        item, answer = done
        self.inflight -= 1
        if answer is not None:
            copy_answered(item, answer)
            if answer.error and self.retry_later(item, answer):
                return
            latency = answer.latency
        else:
            latency = self.clock() - item.sent_at
        if item.action and item.action != FAILED:
            self.window.succeeded(latency)
            rate = self.path.pacer.rate
            if rate is not None:
                self.window.at_least(1.5 * rate * self.window.srtt)
        self.judge(item)
        if item.kind == CONFLICT:
            item.action = CONFLICT
            self.finish(item)
        elif item.action == FAILED or item.action in UNCOPYABLE:
            self.finish(item)
        else:
            self.batch.append(item)

    def judge(self, item: Item) -> None:
        """A copy's final answer: archived, or one more step towards stopping the run."""
        if item.action == FAILED and item.code in ARCHIVED_CODES:
            # archived in a way the listing does not show (Intelligent-Tiering's archive
            # tiers): no retry, restoring is what cures it
            item.kind = item.action = SKIP_ARCHIVED
        elif item.action == FAILED and sse_c_refused(item.code, item.error):
            sse_c(item)  # the copy was refused for want of the object's own key
        elif item.action == COPIED and not self.cfg.dry_run:
            self.streak.succeeded(item.seq)
            if item.seq > self.held_after:
                self.window.release()
        elif item.action == FAILED:
            self.streak.failed(item.seq, item.code)
            if is_incurable(item.code):
                # at once, not after STOP_AFTER of them: until a copy sent after this
                # one succeeds (as Streak counts), send as few as can be into what may
                # be a wall
                self.window.hold()
                self.held_after = max(self.held_after, item.seq)
            if self.streak.full and not self.stats.stopped:
                self.stats.stopped = self.streak.reason(self.cfg)
                log.debug("stopping: %s; %d copies in flight", self.stats.stopped, self.inflight)

    def retry_later(self, item: Item, answer: Answer) -> bool:
        """A copy worth another attempt (the request path's policy) goes on the retry
        heap after its backoff, without holding a place in the window meanwhile."""
        wait = self.path.retry_after(item.attempts, answer.code, answer.status)
        if wait is None:
            return False
        item.action = item.error = ""
        self.retry_seq += 1
        heapq.heappush(self.retries, (self.clock() + wait, self.retry_seq, item))
        return True

    def send_due_retries(self) -> float:
        """Send the retries whose backoff is over; returns seconds to the next one."""
        while self.retries and not self.stop.is_set():
            due, _, item = self.retries[0]
            wait = due - self.clock()
            if wait > 0:
                return wait
            if self.inflight >= self.window.size:
                return 0.05
            heapq.heappop(self.retries)
            self.send(item)
        return 0.2

    def drain(self, block: bool) -> None:
        while self.inflight or self.retries:
            timeout = min(0.2, self.send_due_retries())
            if not self.inflight:
                if not block or self.stop.is_set():
                    break
                self.sleep(timeout)
                continue
            try:
                done = self.done_q.get(timeout=timeout) if block else self.done_q.get_nowait()
            except queue.Empty:
                if not block or self.stop.is_set():
                    break  # not return: the flush check below must run
                if self.clock() - self.last_flush >= 1.0:
                    self.flush()
                continue
            self.take(done)
            block = False
        self.requeue_held()
        if len(self.batch) >= self.cfg.batch_size or self.clock() - self.last_flush >= 1.0:
            self.flush()
        self.collect_rows()

    def wait_in_flight(self) -> None:
        """Wait for what is in flight; on interrupt, only a few seconds."""
        deadline = self.clock() + (5 if self.stop.is_set() else float("inf"))
        while (self.inflight or self.retries) and self.clock() < deadline:
            timeout = max(0.001, min(0.2, self.send_due_retries()))
            if self.stop.is_set():
                self.retries.clear()  # not sent yet: a rerun copies them
            if not self.inflight:
                if self.retries:
                    self.sleep(timeout)
                continue
            try:
                self.take(self.done_q.get(timeout=timeout))
            except queue.Empty:
                pass
            if len(self.batch) >= self.cfg.batch_size:
                self.flush()
            self.collect_rows()
        if self.inflight:
            log.warning("%d copies still in flight were abandoned; a rerun finishes them",
                        self.inflight)

    def finish(self, item: Item) -> None:
        self.stats.count(item)
        self.reporter.item(item, self.stats)

    def flush(self) -> None:
        """Hand the copies done so far to the database thread, so copies keep going
        while their rows are written; at most two batches wait there."""
        self.last_flush = self.clock()
        if not self.batch:
            return
        work, self.batch = self.batch, []
        while len(self.writes) >= 2:
            self.finish_rows(*self.writes.popleft().result())
        self.writes.append(self.db_thread.submit(self.write_rows, work))

    def prepare_rows(self) -> tuple[list[Item], dict, dict]:
        """The database thread's first job, queued with the batches so that its error
        is re-raised where theirs are; it reports as an empty batch."""
        self.db.prepare(create_index=self.cfg.create_index and not self.cfg.dry_run)
        return [], {}, {}

    def write_rows(self, work: list[Item]):
        """On the database thread, the only one that uses the Database during the run:
        look the rows up, rewrite them (compare-and-set), never print."""
        t0 = time.monotonic()
        counts = self.db.lookup([k for i in work for k in (i.src.key, i.dest_key)])
        pending = [(i.src.key, i.dest_key) for i in work if counts.get(i.src.key)]
        rewritten = (self.db.foresee(pending, counts) if self.cfg.dry_run
                     else self.db.rewrite(pending, counts))
        self.flush_s += time.monotonic() - t0
        return work, counts, rewritten

    def collect_rows(self, wait: bool = False) -> None:
        """Report the batches the database thread has written (errors re-raised here)."""
        while self.writes and (wait or self.writes[0].done()):
            self.finish_rows(*self.writes.popleft().result())

    def finish_rows(self, work: list[Item], counts: dict, rewritten: dict) -> None:
        cfg, stats = self.cfg, self.stats
        refused = getattr(rewritten, "refused", {})
        waiting = getattr(rewritten, "waiting", {})
        self.flushes += bool(work)
        now = time.monotonic()
        for i in work:
            key = i.src.key
            got = ((0 if key in refused else counts.get(key, 0)) if cfg.dry_run
                   else rewritten.get(key, 0))
            i.rows += got
            stats.rows_rewritten += got
            if key in waiting and key not in refused:
                i.waiting_since = i.waiting_since or now
                if now - i.waiting_since < cfg.lock_wait and not self.stop.is_set():
                    self.held.append(i)  # its other rows, if any, are written already
                    continue
                if self.stop.is_set():
                    continue  # interrupted: left on its source, a rerun rewrites it
                refused[key] = (f"{waiting[key]} for more than {cfg.lock_wait:g} s "
                                "(--lock-wait)")
            if not i.rows and not counts.get(key) and not counts.get(i.dest_key):
                stats.objects_without_rows += 1
            if key in refused:
                # Its copy is there (or was already); its rows stay on the source,
                # whose object is kept: never deleted, whatever --delete-source says.
                i.action, i.error = NOT_REWRITTEN, refused[key]
                self.finish(i)
                continue
            if i.action != COPIED:
                i.action = ROWS_ONLY if i.rows else SKIPPED
            self.finish(i)
            if self.deleter:
                self.deleter.add(i)
        if self.deleter and self.deleter.due:
            self.deleter.flush()
        if waiting:
            self.say_held()

    def say_held(self) -> None:
        """Which rows the run waits for and since when: once when found, then every
        10 s while any are held."""
        now = time.monotonic()
        if not self.held or now - self.held_said < 10:
            return
        self.held_said = now
        longest = now - min(i.waiting_since for i in self.held)
        names = ", ".join(sorted(i.src.key for i in self.held)[:5])
        more = f" and {len(self.held) - 5} more" if len(self.held) > 5 else ""
        log.warning("waiting for the rows of %d object(s) that another transaction holds "
                    "locked (%s%s), for %.0f s so far; copying goes on; they are tried again "
                    "every 2 s, and reported as not rewritten after %g s (--lock-wait)",
                    len(self.held), names, more, longest, self.cfg.lock_wait)

    def requeue_held(self) -> None:
        """Held items go back into the next batch every 2 s."""
        if self.held and time.monotonic() >= self.held_due:
            self.held_due = time.monotonic() + 2.0
            self.batch.extend(self.held)
            self.held = []

    def wait_for_held(self) -> None:
        """At the end: rows still held are tried until --lock-wait has passed for them."""
        while self.held and not self.stop.is_set():
            self.stop.wait(max(0.0, self.held_due - time.monotonic()))
            self.requeue_held()
            self.flush()
            self.collect_rows(wait=True)
        if self.held:
            log.warning("the rows of %d object(s) another transaction holds locked stay on "
                        "their sources; a rerun rewrites them", len(self.held))
            self.held = []



def work(engine: Paced, cfg: Settings, stop: threading.Event) -> Iterator[Item]:
    """The plan, item by item: the manifest's keys, or both listings merged. The
    listings' threads start now (see prefetch)."""
    if cfg.manifest:
        sources: Iterable[Obj] = read_manifest(cfg.manifest, cfg.source_bucket, cfg.source_prefix)
        return plan(sources, None, cfg)
    src = Listing(engine, cfg.source_bucket, cfg.source_prefix)
    dest = Listing(engine, cfg.dest_bucket, cfg.dest_prefix)
    return plan(listed(src, stop), listed(dest, stop), cfg, src, dest)


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def run_migration(s3: PacedClient, cfg: Settings, quiet: bool, stop: threading.Event,
                  session=None) -> int:
    """s3: the run's client, every call through its RequestPath (s3.path)."""
    run_id = new_run_id()
    db = Database(cfg, run_id, readonly=cfg.dry_run, stop=stop)
    pacer = s3.path.pacer
    # First: the listings below must be sent to, and signed for, each bucket's region.
    regions = check_buckets(s3, cfg)
    engine = make_engine(s3.raw, cfg, session, regions)
    pages = Paced(engine, s3.path)
    # Listing only reads: its first pages (and the engine's first connections) come
    # while the checks below run, instead of after them. Should another run end in
    # the moment before this one takes the lock, its last copies are missing from
    # this destination listing and are copied again, with the same content.
    items = work(pages, cfg, stop)
    preflight(s3, db, cfg, buckets=False, access=True)
    engine.copy_acl = cfg.copy_acl
    hidden = references.hidden_rows(db)
    if hidden and cfg.delete_source:
        # A source only rows it cannot see still name would be deleted under them.
        raise UsageError(f"--delete-source refused: {hidden}; or run without --delete-source")
    if hidden:
        log.warning("%s: rows it cannot see are not rewritten", hidden)
    if cfg.delete_source:
        warning = versioning_warning(cfg, source_versioning(s3, cfg.source_bucket))
        if warning:
            log.warning("%s", warning)
    db.warn_foreseen()
    if not cfg.dry_run:  # a dry run only reads, and may run beside a real run
        db.check_writable()
        take_lock(db)
        ensure_journal(db)
    log.info("%s %s: s3://%s/%s -> s3://%s/%s, %d workers, %s engine%s; settings from %s",
             "dry run" if cfg.dry_run else "run", run_id,
             cfg.source_bucket, cfg.source_prefix, cfg.dest_bucket, cfg.dest_prefix, cfg.workers,
             engine.name, f", shard {cfg.shard[0]}/{cfg.shard[1]}" if cfg.shard else "",
             settings_source(cfg))
    stats = Stats(hidden_rows=hidden)
    # The bar has no total: a total would take a second full listing of the source.
    reporter = Reporter(cfg, quiet)
    interrupted = False
    try:
        migration = Migration(s3, engine, db, cfg, reporter, stop, stats)
        reporter.pacer = pacer
        # What exists now (modules, botocore's service model) lives as long as the run:
        # out of the collector's sight, full collections do not walk it again and again.
        gc.freeze()
        # A copy allocates a few dozen objects and frees nearly all of them by reference
        # count: a young-generation collection every 700 allocations (the default) finds
        # little, so collect less often while copies go out.
        thresholds = gc.get_threshold()
        gc.set_threshold(20_000, *thresholds[1:])
        try:
            migration.run(items)
        finally:
            gc.set_threshold(*thresholds)
        stats.window_peak = migration.window.peak
        w = migration.window
        log.debug("copies in flight: peak %d, last %d; cut %d times on latency (%.0f ms now, "
                  "%.0f ms long-term); rate %s, cut %d times for a limit (%s), background "
                  "refusals %.2f%%; %d row batches took %.2f s", w.peak, w.size,
                  w.cuts["latency"], (w.srtt or 0) * 1000, (w.lrtt or 0) * 1000,
                  fmt_rate(pacer.rate), pacer.cuts, fmt_rate(pacer.limit),
                  100 * pacer.background, migration.flushes, migration.flush_s)
        interrupted = stop.is_set()
        if not interrupted:
            stats.rows_left_under_source, stats.rows_outside = db.table_counts()
            stats.rows_other_forms = references.other_form_rows(db)
            if cfg.dry_run:  # the plan: what a real run would leave under the source prefix
                stats.rows_left_under_source -= stats.rows_rewritten
    finally:
        reporter.close()
        db.close()
    stats.slowdowns = pacer.throttles
    stats.pacing = pacer.verdict()
    summary = Summary.of(stats, cfg, run_id, db.plan_name, pacer.sent, interrupted)
    text = summary.to_text(cfg)
    log.debug("summary:\n%s", text)  # the log file keeps it too
    print(summary.to_json() if cfg.json else text, flush=True)
    verdict = summary.verdict()
    if verdict:  # once, last, where a person looks: what happened, what to do
        print(f"move.py: {verdict}", file=sys.stderr, flush=True)
    return summary.exit_code()


def settings_source(cfg: Settings) -> str:
    return f"{cfg.env_file}, the environment and flags" if cfg.env_file else \
        "the environment and flags (no .env read)"


def preflight(s3, db: Database | None, cfg: Settings, buckets: bool = True,
              access: bool = False) -> None:
    """Everything that can be wrong with the setup, checked before anything changes.

    The two buckets, the manifest and the database are checked at the same time:
    each check mostly waits on a round trip, and in a row they held up the first
    copy by three. A failure is reported as if they had run in this order.
    `buckets=False`: check_buckets() ran already."""
    checks = [lambda: check_buckets(s3, cfg)] if buckets else [lambda: None]
    if cfg.manifest:
        checks.append(lambda: log.info(
            "manifest %s: %d keys under %s", cfg.manifest,
            check_manifest(cfg.manifest, cfg.source_bucket, cfg.source_prefix),
            cfg.source_prefix))
    if db is not None:
        checks.append(db.preflight)
    if access:  # the ACL copies get (access.py): a handful of requests
        checks.append(lambda: setattr(cfg, "copy_acl", decide_access(s3, cfg)))
    together(checks)


def check_buckets(s3, cfg: Settings) -> Regions:
    """Both buckets exist and answer; their regions, which the client follows from
    now on (see regions.route)."""
    if (cfg.source_bucket == cfg.dest_bucket and
            (cfg.source_prefix.startswith(cfg.dest_prefix) or
             cfg.dest_prefix.startswith(cfg.source_prefix))):
        raise UsageError(f"source and destination overlap (s3://{cfg.source_bucket}/"
                         f"{cfg.source_prefix} and {cfg.dest_prefix}); choose distinct prefixes")
    regions = Regions(s3.meta.region_name or "us-east-1")
    found = together([lambda: check_bucket(s3, "source", cfg.source_bucket, cfg),
                      lambda: check_bucket(s3, "destination", cfg.dest_bucket, cfg)])
    regions[cfg.source_bucket], regions[cfg.dest_bucket] = found
    route(s3, regions)
    for bucket, region in regions.other().items():
        log.info("s3://%s is in %s: its requests are sent there", bucket, region)
    return regions


def together(calls: list) -> list:
    """Run the calls at once; once all have ended, re-raise the first failure in
    the order given (so the message does not depend on which answer came back
    first), else return their results in that order."""
    with ThreadPoolExecutor(len(calls), thread_name_prefix="preflight") as pool:
        futures = [pool.submit(call) for call in calls]
    return [future.result() for future in futures]


def check_bucket(s3, role: str, bucket: str, cfg: Settings | None = None) -> str:
    """HeadBucket: the bucket exists and we may list it; returns its region."""
    try:
        answer = s3.head_bucket(Bucket=bucket)
        return discover(s3, bucket, answer.get("ResponseMetadata", {}).get("HTTPHeaders"))
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise UsageError(f"{role} bucket {bucket!r} does not exist; check the bucket name "
                             f"and AWS_ENDPOINT_URL/region") from None
        if code in ("403", "AccessDenied", "Forbidden"):
            payer = "" if cfg is None or cfg.request_payer else (
                "; if it is a Requester Pays bucket (S3 answers 403 to requests that do not "
                "say who pays), pass --request-payer")
            raise UsageError(f"no access to {role} bucket {bucket!r}; check the credentials and "
                             f"the IAM policy in the README{payer}") from None
        raise UsageError(f"cannot reach {role} bucket {bucket!r}: {describe_error(exc)}") from None
    except (NoCredentialsError, PartialCredentialsError):
        raise UsageError("no AWS credentials found; set AWS_PROFILE or AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY (see .env.example)") from None
    except EndpointConnectionError as exc:
        raise UsageError(f"cannot reach S3 at {exc.kwargs.get('endpoint_url', '?')}; check "
                         "AWS_ENDPOINT_URL and the network") from None
    except BotoCoreError as exc:
        raise UsageError(f"cannot reach {role} bucket {bucket!r}: {exc}") from None
