#!/usr/bin/env python3
"""The first sketch of the migration, kept as a baseline for the benchmark.

One ListObjects call (so at most one page: 1,000 keys), one thread per
object, and for each object: CopyObject, then on its own new database
connection a SELECT of the rows holding the key, an UPDATE per row and a
COMMIT. No retries, no resume, no batching, no limit on threads or
connections. Not for real use: bench/run.py times it next to move.py.

Settings from the environment, like move.py: DB_CONN_STRING,
S3_SOURCE_BUCKET_NAME, S3_DEST_BUCKET_NAME, AWS_* (endpoint, keys, region).
Prints one summary line; exits 1 when any object failed.
"""
from __future__ import annotations

import os
import sys
import threading
import time

import boto3
import psycopg2

SOURCE_PREFIX, DEST_PREFIX = "image/", "avatar/"


def main() -> int:
    dsn = os.environ["DB_CONN_STRING"]
    source = os.environ.get("S3_SOURCE_BUCKET_NAME", "legacy-s3")
    dest = os.environ.get("S3_DEST_BUCKET_NAME", "production-s3")
    s3 = boto3.client("s3")
    started = time.monotonic()

    resp = s3.list_objects(Bucket=source, Prefix=SOURCE_PREFIX)
    keys = [o["Key"] for o in resp.get("Contents", [])]

    lock = threading.Lock()
    counts = {"copied": 0, "rows": 0, "errors": 0}
    first_error: list[str] = []

    def fail(key: str, exc: Exception) -> None:
        with lock:
            counts["errors"] += 1
            if not first_error:
                first_error.append(
                    f"{key}: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}")

    def move_one(key: str) -> None:
        new_key = DEST_PREFIX + key[len(SOURCE_PREFIX):]
        try:
            s3.copy_object(Bucket=dest, Key=new_key, CopySource={"Bucket": source, "Key": key})
        except Exception as exc:  # noqa: BLE001 - a sketch: count and go on
            fail(key, exc)
            return
        with lock:
            counts["copied"] += 1
        try:
            conn = psycopg2.connect(dsn)
            try:
                cur = conn.cursor()
                cur.execute("SELECT id FROM avatars WHERE path = %s", (key,))
                ids = [row[0] for row in cur.fetchall()]
                for row_id in ids:
                    cur.execute("UPDATE avatars SET path = %s WHERE id = %s", (new_key, row_id))
                conn.commit()
            finally:
                conn.close()
            with lock:
                counts["rows"] += len(ids)
        except Exception as exc:  # noqa: BLE001
            fail(key, exc)

    threads = [threading.Thread(target=move_one, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    elapsed = time.monotonic() - started
    print(f"naive: listed {len(keys)} (one page, truncated={bool(resp.get('IsTruncated'))}), "
          f"copied {counts['copied']}, rows updated {counts['rows']}, "
          f"errors {counts['errors']}, {elapsed:.1f}s")
    if first_error:
        print(f"naive: first error: {first_error[0]}")
    return 1 if counts["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
