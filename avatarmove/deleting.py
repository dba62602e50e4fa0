"""Deleting sources (--delete-source): only what nothing can still need.

A source object goes only when all of these hold, checked in this order, right
before its delete:
1. its copy is confirmed (same size, and the same ETag where ETags compare);
2. it is still the object that was listed and copied: a HEAD shows the ETag the
   listing gave, and the delete itself is conditional on that ETag (S3's
   conditional deletes), so an upload in the moment between the two still wins;
3. no row of the table names it, in any form the tool recognises (the exact
   key, a leading '/', a URL, a query string: see references.py), read from the
   table itself in the transaction that holds it in SHARE mode while the deletes
   go out, so that the application cannot point a row at a source in between
   (its writes wait a fraction of a second).

A source replaced since its copy ("changed since copy") is kept, and copied
again over its copy: the rows already rewritten point at the copy, and must show
the picture the application uploaded last, not the one it replaced. A rerun
deletes that source once it is unchanged.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import psycopg2.errors
from botocore.exceptions import BotoCoreError, ClientError

from . import copying, references
from .copying import copy_confirmed, describe_error, error_code, head
from .identity import from_head
from .planning import COPY, Item
from .report import COPIED, Reporter, Stats
from .settings import Settings

log = logging.getLogger("move")

# Keys whose references are read in one scan of the table: the scan costs the
# same for one key or ten thousand.
CHECK_BATCH = 10_000
DELETE_BATCH = 1000  # DeleteObjects' limit
# Answers of a server that does not take DeleteObjects' per-object ETag (an
# S3-compatible server): the delete is sent again without it; the HEAD of step 2
# has checked the ETag a moment before.
NO_CONDITIONS = {"MalformedXML", "NotImplemented", "InvalidArgument", "InvalidRequest"}


def source_versioning(s3, bucket: str) -> str | None:
    """'Enabled' or 'Suspended' for a versioned bucket, None for one never
    versioned, 'unknown' when the role may not ask."""
    try:
        return s3.get_bucket_versioning(Bucket=bucket).get("Status")
    except (ClientError, BotoCoreError) as exc:
        log.debug("GetBucketVersioning on %s: %s", bucket, describe_error(exc))
        return "unknown"


def versioning_warning(cfg: Settings, status: str | None) -> str | None:
    """What --delete-source means for this source bucket, said before anything is deleted."""
    if status in ("Enabled", "Suspended"):
        return (f"s3://{cfg.source_bucket} is versioned ({status.lower()}): --delete-source "
                "adds a delete marker per source; the data stays as noncurrent versions "
                "(storage is not freed, nothing is erased) until a lifecycle rule "
                "(NoncurrentVersionExpiration) expires them; --rollback can restore them "
                "until then")
    if status == "unknown":
        return (f"cannot tell whether s3://{cfg.source_bucket} is versioned (no "
                "s3:GetBucketVersioning): if it is not, deleted sources are gone for good")
    return None


class Deleter:
    """Collects the items whose rows are written and deletes their sources in
    batches. Runs on the coordinating thread; `on_db(fn, *args)` runs fn on the
    database thread (the only one that uses the Database during a run)."""

    def __init__(self, s3, engine, db, cfg: Settings, stats: Stats, reporter: Reporter,
                 on_db: Callable):
        self.s3, self.engine, self.db, self.cfg = s3, engine, db, cfg
        self.stats, self.reporter, self.on_db = stats, reporter, on_db
        self.pending: list[Item] = []
        self.conditional = True  # until the server refuses DeleteObjects' ETag condition
        self.locking = True  # until the role turns out unable to lock the table

    def add(self, item: Item) -> None:
        if item.verified or copy_confirmed(self.s3, self.cfg, item):
            self.pending.append(item)
        else:
            self.keep(item, "its copy could not be verified (size or ETag differs)")

    @property
    def due(self) -> bool:
        return len(self.pending) >= CHECK_BATCH

    def keep(self, item: Item, why: str) -> None:
        self.stats.sources_kept += 1
        log.warning("kept source %s: %s", item.src.key, why,
                    extra={"terminal": self.stats.sources_kept <= 20})

    def flush(self) -> None:
        work, self.pending = self.pending, []
        for start in range(0, len(work), CHECK_BATCH):
            self.delete(work[start:start + CHECK_BATCH])

    def delete(self, work: list[Item]) -> None:
        heads = head_all(self.s3, self.cfg.source_bucket, [i.src.key for i in work],
                         self.cfg.workers)
        unchanged = {i.src.key: i for i, h in zip(work, heads) if self.unchanged(i, h)}
        outcomes: list[tuple[int, list]] = []

        def send(keys: list[str]) -> None:  # on the database thread, the table locked
            chunks = [[unchanged[k] for k in keys[s:s + DELETE_BATCH]]
                      for s in range(0, len(keys), DELETE_BATCH)]
            with ThreadPoolExecutor(max(1, min(len(chunks), 10)),
                                    thread_name_prefix="delete") as pool:
                outcomes.extend(pool.map(self.delete_objects, chunks))
        keys = list(unchanged)
        try:
            named = self.named_then_deleted(keys, send)
        except references.TableBusy as exc:
            for i in unchanged.values():
                self.keep(i, f"{exc}; kept for a rerun")
            return
        for key, value in named.items():
            self.keep(unchanged[key], f"a row of {self.cfg.table} names it ({value!r}); rows "
                                      "holding the exact key are rewritten by a rerun, other "
                                      "forms keep their source")
        for deleted, errors in outcomes:
            self.stats.deleted += deleted
            for item, code, message in errors:
                if code == "PreconditionFailed":  # replaced after the HEAD
                    h = head(self.s3, self.cfg.source_bucket, item.src.key)
                    if h is not None:
                        self.changed(item, from_head(item.src.key, h))
                elif code != "NoSuchKey":  # NoSuchKey: gone in the meantime
                    log.error("could not delete source %s: %s", item.src.key, message)

    def named_then_deleted(self, keys: list[str], send) -> dict[str, str]:
        """The keys rows name; send(the others) deletes them, in the same transaction
        that holds the table, so that no row can come to name one in between."""
        if self.locking:
            try:
                return self.on_db(references.unreferenced_while_locked, self.db, keys, send)
            except psycopg2.errors.InsufficientPrivilege:
                self.locking = False
                log.warning("%s cannot be locked by this role (LOCK TABLE ... IN SHARE MODE "
                            "needs UPDATE on the whole table): a row the application points "
                            "at a source in the moment between the check and its delete "
                            "would dangle; grant UPDATE ON %s to close that gap",
                            self.cfg.table, self.cfg.table)
        named = self.on_db(references.referenced, self.db, keys)
        send([k for k in keys if k not in named])
        return named

    def unchanged(self, item: Item, h: dict | Exception | None) -> bool:
        """Step 2: the source is still the object listed (and copied)."""
        if isinstance(h, Exception):
            self.keep(item, f"cannot read it before deleting ({describe_error(h)})")
            return False
        if h is None:
            return False  # gone already (another shard's run, or the application)
        if not item.src.etag:
            self.keep(item, "no ETag was known for it when it was copied")
            return False
        now = from_head(item.src.key, h)
        if now.etag != item.src.etag:
            self.changed(item, now)
            return False
        return True

    def delete_objects(self, chunk: list[Item]) -> tuple[int, list[tuple[Item, str, str]]]:
        """One DeleteObjects: (sources deleted, (item, code, message) for the others)."""
        by_key = {i.src.key: i for i in chunk}
        try:
            errors = self.send_delete(chunk)
        except (ClientError, BotoCoreError) as exc:
            errors = [{"Key": i.src.key, "Code": error_code(exc),
                       "Message": describe_error(exc)} for i in chunk]
        failed = [(by_key[e["Key"]], e.get("Code", ""), e.get("Message", ""))
                  for e in errors if e.get("Key") in by_key]
        return len(chunk) - len(failed), failed

    def send_delete(self, chunk: list[Item]) -> list[dict]:
        objects = [{"Key": i.src.key, **({"ETag": f'"{i.src.etag}"'} if self.conditional else {})}
                   for i in chunk]
        try:
            resp = self.s3.delete_objects(Bucket=self.cfg.source_bucket,
                                          Delete={"Objects": objects, "Quiet": True})
        except ClientError as exc:
            if not self.conditional or error_code(exc) not in NO_CONDITIONS:
                raise
            log.info("s3://%s does not take conditional deletes (%s): deleting after the "
                     "ETag check alone", self.cfg.source_bucket, describe_error(exc))
            self.conditional = False
            return self.send_delete(chunk)
        return resp.get("Errors", [])

    def changed(self, item: Item, now) -> None:
        """Replaced since its copy: keep it, and copy the new picture over the copy,
        which the rewritten rows point at."""
        again = Item(src=now, dest_key=item.dest_key, kind=COPY)
        copying.copy_one(self.s3, self.engine, again, self.cfg)
        if again.action == COPIED:
            what = f"copied again to {item.dest_key}; source kept, a rerun deletes it"
        else:
            what = (f"copying it again to {item.dest_key} failed ({again.error}): rows that "
                    "point at the copy show the picture it replaced; rerun")
            self.stats.failed += 1
        self.stats.changed_since_copy += 1
        self.reporter.changed(item, what, self.stats)


def head_all(s3, bucket: str, keys: list[str], workers: int) -> list[dict | Exception | None]:
    """HEAD many keys at once: each answer, None for a missing key, or the error."""
    def one(key: str):
        try:
            return head(s3, bucket, key)
        except (ClientError, BotoCoreError) as exc:
            return exc
    with ThreadPoolExecutor(max(1, min(workers, 32)), thread_name_prefix="head") as pool:
        return list(pool.map(one, keys))


def recover(s3, cfg: Settings, key: str, versioning: str | None,
            restore: bool = True) -> str | None:
    """For --rollback: bring back a source that --delete-source deleted from a
    versioned bucket, by copying its newest version over the delete marker (the
    versions stay as they are). None once it is back (or, with restore False, when
    it could be); else why it cannot be."""
    if versioning not in ("Enabled", "Suspended"):
        return (f"it was deleted from s3://{cfg.source_bucket}, which is not versioned"
                + (" (or the role may not ask: s3:GetBucketVersioning)"
                   if versioning == "unknown" else "") + ": its bytes are gone")
    try:
        page = s3.list_object_versions(Bucket=cfg.source_bucket, Prefix=key, MaxKeys=100)
    except (ClientError, BotoCoreError) as exc:
        return (f"cannot list its versions ({describe_error(exc)}; needs "
                "s3:ListBucketVersions)")
    versions = [v for v in page.get("Versions", ()) if v["Key"] == key]
    if not versions:
        return (f"no version of it is left in s3://{cfg.source_bucket} (expired by a "
                "lifecycle rule, or deleted version by version)")
    newest = max(versions, key=lambda v: v["LastModified"])
    if not restore:
        return None
    try:
        s3.copy_object(Bucket=cfg.source_bucket, Key=key, CopySource={
            "Bucket": cfg.source_bucket, "Key": key, "VersionId": newest["VersionId"]})
    except (ClientError, BotoCoreError) as exc:
        return (f"its version {newest['VersionId']} is there but could not be restored "
                f"({describe_error(exc)}; needs s3:GetObjectVersion and s3:PutObject)")
    log.info("restored %s from its version %s", key, newest["VersionId"])
    return None
