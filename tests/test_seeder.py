"""seed/seeder.py as a user runs it: a subprocess against moto's HTTP server and
a fresh PostgreSQL database."""
from __future__ import annotations

import os
import re
import struct
import zlib

import psycopg2
import pytest
from psycopg2 import sql

import move
from conftest import keys

pytestmark = pytest.mark.slow  # seed/seeder.py as a subprocess against moto's HTTP server

SIGNATURE = b"\x89PNG\r\n\x1a\n"
FRESH = {"S3_SOURCE_BUCKET_NAME": "seed-legacy", "S3_DEST_BUCKET_NAME": "seed-prod"}


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a well-formed PNG: signature, chunk CRCs, IHDR first, pixel data
    that inflates to exactly the size IHDR announces, IEND last."""
    assert data[:8] == SIGNATURE
    pos, chunks, idat = 8, [], b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, payload = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + payload) & 0xFFFFFFFF, kind
        chunks.append((kind, payload))
        if kind == b"IDAT":
            idat += payload
        pos += 12 + length
    assert pos == len(data)
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, color, _, _, _ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color) == (8, 2)  # 8-bit RGB
    assert len(zlib.decompress(idat)) == height * (1 + 3 * width)
    return width, height


def connect(dsn: str):
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    return conn


def table_rows(conn, table: str, column: str) -> list[str]:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT {} FROM {} ORDER BY id").format(
            sql.Identifier(column), sql.Identifier(table)))
        return [r[0] for r in cur.fetchall()]


def columns(conn, table: str) -> dict[str, str]:
    with conn.cursor() as cur:
        cur.execute("SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_name = %s", (table,))
        return dict(cur.fetchall())


def bucket_exists(client, bucket: str) -> bool:
    return any(b["Name"] == bucket for b in client.list_buckets()["Buckets"])


def table_exists(conn, table: str) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)", (sql.Identifier(table).as_string(cur),))
        return cur.fetchone()[0] is not None


@pytest.mark.parametrize("settings", [
    # flags, environment, then: prefix, table, column the seeder must use; run it twice
    ([], {}, "image/", "avatars", "path", True),
    (["--source-prefix", "legacy/avatars", "--table", "Avatar Images", "--column", "Path"], {},
     "legacy/avatars/", "Avatar Images", "Path", False),
    ([], {"S3_OBJECT_SOURCE_PREFIX": "pics", "DB_TABLE": "users_pics", "DB_PATH_COLUMN": "key"},
     "pics/", "users_pics", "key", False),
], ids=["defaults-twice", "flags", "environment"])
def test_creates_buckets_and_table_and_uploads_n_pngs(settings, cli, dsn):
    flags, env, prefix, table, column, twice = settings
    client = move.make_s3_client()
    conn = connect(dsn)
    assert not bucket_exists(client, "seed-legacy") and not bucket_exists(client, "seed-prod")
    assert not table_exists(conn, table)

    p = cli("12", *flags, script="seed/seeder.py", env={**FRESH, **env})

    assert p.code == 0, p.out + p.err
    assert p.err == ""
    assert re.fullmatch(rf"seeded 12 avatars into s3://seed-legacy/{re.escape(prefix)} and 12 "
                        rf"rows into {re.escape(table)} in \d+\.\ds\n", p.out), p.out
    assert bucket_exists(client, "seed-prod") and keys(client, "seed-prod") == []
    assert columns(conn, table) == {"id": "integer", column: "character varying"}
    first = keys(client, "seed-legacy")
    assert len(first) == len(set(first)) == 12
    names = set()
    for k in first:
        m = re.fullmatch(rf"{re.escape(prefix)}([a-z][a-z0-9_'-]*)-([0-9a-f]{{10}})\.png", k)
        assert m, k
        assert len(re.findall("[a-z]", m.group(1))) >= 3, k  # a user name, not a number
        names.add(m.group(1))
    assert len(names) >= 2  # generated, not one fixed name
    bodies = set()
    for k in first:
        got = client.get_object(Bucket="seed-legacy", Key=k)
        data = got["Body"].read()
        assert png_size(data) == (64, 64), k
        assert got["ContentType"] == "image/png"
        bodies.add(data)
    assert len(bodies) == 12  # an identicon per key
    assert sorted(table_rows(conn, table, column)) == sorted(first)

    if twice:  # a second run adds N more: 2N objects and rows, all names distinct
        p = cli("12", *flags, script="seed/seeder.py", env={**FRESH, **env})
        assert p.code == 0, p.out + p.err
        both = keys(client, "seed-legacy")
        assert len(both) == len(set(both)) == 24 and set(first) < set(both)
        assert sorted(table_rows(conn, table, column)) == sorted(both)
    conn.close()


def test_avatar_file_uploads_its_exact_bytes(cli, dsn, tmp_path):
    avatar = SIGNATURE + os.urandom(300)
    (tmp_path / "me.png").write_bytes(avatar)
    client = move.make_s3_client()

    p = cli("5", "--avatar-file", "me.png", script="seed/seeder.py", env=FRESH)

    assert p.code == 0, p.out + p.err
    ks = keys(client, "seed-legacy")
    assert len(ks) == 5
    for k in ks:
        assert client.get_object(Bucket="seed-legacy", Key=k)["Body"].read() == avatar
    conn = connect(dsn)
    assert sorted(table_rows(conn, "avatars", "path")) == sorted(ks)
    conn.close()


BAD = {
    # arguments, environment, files, expected in the message
    "count-not-a-number": (["abc"], {}, {}, "argument count: 'abc' is not a whole number"),
    "count-zero": (["0"], {}, {}, "argument count: '0' must be at least 1"),
    "avatar-file-missing": (["5", "--avatar-file", "missing.png"], {}, {}, "missing.png"),
    "avatar-file-not-png": (["5", "--avatar-file", "me.gif"], {}, {"me.gif": b"GIF89a\x01\x00"},
                            "me.gif is not a PNG file"),
    "db-unreachable": (["5"], {"DB_CONN_STRING": "postgresql://u:pw-Secret-9@127.0.0.1:1/x"},
                       {}, "cannot connect to the database postgresql://u:***@127.0.0.1:1/x"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line(case, cli, dsn, tmp_path):
    args, env, files, fragment = BAD[case]
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)

    p = cli(*args, script="seed/seeder.py", env={**FRESH, **env})

    assert p.code == 2, p.out + p.err
    assert p.out == "" and "Traceback" not in p.err
    assert p.err.endswith("\n") and p.err.count("\n") == 1, p.err
    assert p.err.startswith("seeder.py: error: "), p.err
    assert fragment in p.err
    assert "pw-Secret-9" not in p.err
    client = move.make_s3_client()
    assert not bucket_exists(client, "seed-legacy") and not bucket_exists(client, "seed-prod")
    conn = connect(dsn)
    assert not table_exists(conn, "avatars")
    conn.close()
