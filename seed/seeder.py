#!/usr/bin/env python3
"""Fill the legacy bucket and the avatars table with N new test avatars.

    python3 seed/seeder.py 500

Reads the same settings as move.py (environment, .env, flags). Creates the
bucket and the table (id SERIAL PRIMARY KEY, path VARCHAR) when missing, then
uploads N valid PNGs under the source prefix, concurrently, and inserts the N
matching rows in one transaction.
"""
from __future__ import annotations

import hashlib
import os
import struct
import sys
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psycopg2  # noqa: E402
from botocore.exceptions import BotoCoreError, ClientError  # noqa: E402
from faker import Faker  # noqa: E402
from psycopg2 import sql  # noqa: E402
from psycopg2.extras import execute_values  # noqa: E402

from avatarmove import settings  # noqa: E402
from avatarmove.copying import describe_error, make_s3_client  # noqa: E402


def png(width: int, height: int, pixels: list[bytes]) -> bytes:
    """A minimal valid RGB PNG: signature, IHDR, one IDAT, IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    raw = b"".join(b"\x00" + row for row in pixels)
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def identicon(seed: str, size: int = 64, cells: int = 8) -> bytes:
    """A symmetric block avatar, like the ones sites generate for new users."""
    digest = hashlib.sha256(seed.encode()).digest()
    fg, bg = digest[:3], b"\xf0\xf0\xf0"
    half = (cells + 1) // 2
    on = [[digest[3 + (y * half + min(x, cells - 1 - x)) % 29] & 1 for x in range(cells)]
          for y in range(cells)]
    scale = size // cells
    rows = []
    for y in range(size):
        row = b"".join(fg if on[y // scale][x // scale] else bg for x in range(size))
        rows.append(row)
    return png(size, size, rows)


def avatar_keys(n: int, prefix: str, fake: Faker) -> list[str]:
    """Realistic names, unique even across several seeding runs."""
    keys = []
    for _ in range(n):
        name = fake.user_name().lower().replace(".", "-")
        keys.append(f"{prefix}{name}-{uuid.uuid4().hex[:10]}.png")
    return keys


def ensure_bucket(s3, bucket: str) -> None:
    try:
        s3.head_bucket(Bucket=bucket)
        return
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
    region = s3.meta.region_name
    if region and region != "us-east-1":
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})
    else:
        s3.create_bucket(Bucket=bucket)


def ensure_table(conn, table: str, column: str) -> None:
    with conn, conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (id SERIAL PRIMARY KEY, {} VARCHAR)")
                    .format(sql.Identifier(*table.split(".")), sql.Identifier(column)))


def main(argv: list[str] | None = None) -> int:
    p = settings.Parser(prog="seed/seeder.py", description=__doc__.split("\n\n")[0])
    p.add_argument("count", type=settings.positive_int, help="how many avatars to add")
    p.add_argument("--avatar-file", metavar="PNG", help="upload this PNG for every avatar "
                   "instead of generated identicons")
    p.add_argument("--workers", type=settings.positive_int, default=32, help="concurrent uploads")
    for flag in ("--db", "--source-bucket", "--dest-bucket", "--source-prefix", "--table",
                 "--column"):
        p.add_argument(flag)
    # None: .env in the current directory if there is one; a named file must exist
    p.add_argument("--env-file", metavar="PATH")
    args = p.parse_args(argv)
    try:
        # move.py's own defaults, overridden by what the seeder was given.
        ns = settings.build_parser().parse_args([])
        for name, value in vars(args).items():
            setattr(ns, name, value)
        cfg = settings.settings_from(ns)
        fixed = None
        if args.avatar_file:
            with open(args.avatar_file, "rb") as f:
                fixed = f.read()
            if not fixed.startswith(b"\x89PNG\r\n\x1a\n"):
                raise settings.UsageError(f"{args.avatar_file} is not a PNG file")
        try:
            conn = psycopg2.connect(cfg.db, connect_timeout=10)
        except psycopg2.Error as exc:
            raise settings.UsageError(
                f"cannot connect to the database {settings.mask_dsn(cfg.db)}: "
                f"{settings.first_line(exc)}") from None
    except (settings.UsageError, OSError) as exc:
        print(f"seeder.py: error: {exc}", file=sys.stderr)
        return settings.EXIT_USAGE

    started = time.monotonic()
    s3 = make_s3_client(pool=args.workers + 4)
    try:
        # The destination too, so a sandbox is ready for move.py.
        for bucket in (cfg.source_bucket, cfg.dest_bucket):
            ensure_bucket(s3, bucket)
    except (ClientError, BotoCoreError) as exc:
        print(f"seeder.py: error: cannot create bucket {cfg.source_bucket!r}: "
              f"{describe_error(exc)}", file=sys.stderr)
        return settings.EXIT_USAGE
    ensure_table(conn, cfg.table, cfg.column)

    keys = avatar_keys(args.count, cfg.source_prefix, Faker())

    def upload(key: str) -> str | None:
        try:
            s3.put_object(Bucket=cfg.source_bucket, Key=key, Body=fixed or identicon(key),
                          ContentType="image/png")
            return key
        except (ClientError, BotoCoreError) as exc:
            print(f"seeder.py: upload of {key} failed: {describe_error(exc)}",
                  file=sys.stderr)
            return None

    with ThreadPoolExecutor(args.workers) as pool:
        uploaded = [k for k in pool.map(upload, keys) if k]
    with conn, conn.cursor() as cur:
        execute_values(cur, sql.SQL("INSERT INTO {} ({}) VALUES %s").format(
            sql.Identifier(*cfg.table.split(".")), sql.Identifier(cfg.column)).as_string(cur),
            [(k,) for k in uploaded], page_size=5000)
    conn.close()
    print(f"seeded {len(uploaded)} avatars into s3://{cfg.source_bucket}/{cfg.source_prefix} "
          f"and {len(uploaded)} rows into {cfg.table} in {time.monotonic() - started:.1f}s")
    return 0 if len(uploaded) == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
