"""Identity on encrypted buckets: a rerun knows its own copies, verify passes on them,
and a destination with other content is still a conflict.

moto gives every object the MD5 of its data as ETag; AWS does not for SSE-KMS and
SSE-C objects, and an SSE-KMS copy's ETag differs from its source's. move.py runs
as a subprocess, with each engine, through tests/awsmodel.py (in FaultProxy),
which answers as AWS does.
"""
from __future__ import annotations

import re

import pytest

import move
from awsmodel import AwsModel
from conftest import DEST, PNG, SOURCE, insert_rows, listing, rows, summary
from conftest import moto_backend as backend
from faultproxy import FaultProxy

ENGINES = pytest.mark.parametrize("engine", ["crt", "boto3"])

KMS_KEY = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555"

# Each side as it is encrypted: (how the sources are put, the destination bucket's default)
CASES = {
    "sse-kms-source": ({"encryption": "aws:kms", "kms_key_id": KMS_KEY}, None),
    "sse-kms-destination": ({}, {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": KMS_KEY}),
    "bucket-key-destination": ({}, {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": KMS_KEY,
                                    "bucket_key": True}),
    "sse-kms-both": ({"encryption": "aws:kms", "kms_key_id": KMS_KEY, "bucket_key_enabled": True},
                     {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": KMS_KEY}),
    "sse-s3-both": ({"encryption": "AES256"}, {"SSEAlgorithm": "AES256"}),
}

N = 12


def content(i: int, other: bool = False) -> bytes:
    return PNG + (b"X" if other else b"u") + f"{i:05d}".encode()


@pytest.fixture
def encrypted(endpoint, db, request):
    """Sources and the destination encrypted as the case says, N rows on the sources."""
    put, default = CASES[request.param]
    client = move.make_s3_client()
    if default is not None:
        rule = {"ApplyServerSideEncryptionByDefault": {
            k: v for k, v in default.items() if k != "bucket_key"}}
        if default.get("bucket_key"):
            rule["BucketKeyEnabled"] = True
        client.put_bucket_encryption(Bucket=DEST,
                                     ServerSideEncryptionConfiguration={"Rules": [rule]})
    be = backend()
    names = [f"image/u{i:05d}.png" for i in range(N)]
    for i, k in enumerate(names):
        be.put_object(SOURCE, k, content(i), **put)
    insert_rows(db, names)
    return request.param, names


@ENGINES
@pytest.mark.parametrize("encrypted", list(CASES), indirect=True)
def test_encryption_does_not_break_resume_or_verify(engine, encrypted, cli, db, endpoint):
    case, names = encrypted
    model = AwsModel(backend())
    with FaultProxy(endpoint, rate=0, model=model) as proxy:
        env = {"AWS_ENDPOINT_URL": proxy.url}
        first = cli("--engine", engine, "--json", env=env)
        assert first.code == 0, first.out + first.err
        assert summary(first.out)["copied"] == N
        src, dst = listing(model_client(proxy), SOURCE), listing(model_client(proxy), DEST)
        if case != "sse-s3-both":  # what AWS shows: the copies' ETags are not their sources'
            assert all(src[k] != dst["avatar/" + k[6:]] for k in names)

        # an interruption after the copies, before their rows: the rows are on the source
        with db.cursor() as cur:
            cur.execute("UPDATE avatars SET path = replace(path, 'avatar/', 'image/')")
        again = cli("--engine", engine, "--json", env=env)
        assert again.code == 0, again.out + again.err
        s = summary(again.out)
        assert (s["copied"], s["conflicts"], s["rows_only"], s["failed"]) == (0, 0, N, 0), s
        assert rows(db) == ["avatar/" + k[6:] for k in names]

        done = cli("--engine", engine, "--json", env=env)  # a finished migration
        s = summary(done.out)
        assert done.code == 0 and (s["copied"], s["conflicts"], s["skipped"]) == (0, 0, N), s

        verify = cli("--verify", env=env)
        assert verify.code == 0, verify.out + verify.err
        assert "0 problem(s)" in verify.out

        # a destination object with other content, of the same size, stays a conflict
        other = backend().get_object(DEST, "avatar/u00003.png")
        backend().put_object(DEST, "avatar/u00003.png", content(3, other=True),
                             encryption=other.encryption, kms_key_id=other.kms_key_id)
        with db.cursor() as cur:
            cur.execute("UPDATE avatars SET path = 'image/u00003.png' "
                        "WHERE path = 'avatar/u00003.png'")
        clash = cli("--engine", engine, "--json", env=env)
        s = summary(clash.out)
        assert clash.code == 1 and (s["conflicts"], s["copied"]) == (1, 0), clash.out + clash.err
        assert rows(db)[3] == "image/u00003.png"
        assert backend().get_object(DEST, "avatar/u00003.png").value == content(3, other=True)
        verify = cli("--verify", env=env)
        assert verify.code == 1 and re.search(r"MISMATCH 1\b", verify.out), verify.out
    print(f"\n{engine} {case}: {proxy.requests} requests through the model; "
          f"{dict(proxy.seen)}")


def model_client(proxy: FaultProxy):
    """A client that sees S3 through the model, as move.py does."""
    import boto3
    return boto3.client("s3", endpoint_url=proxy.url)


@ENGINES
def test_sse_c_sources_are_their_own_kind(engine, cli, db, endpoint):
    """SSE-C objects list like any other; HEAD answers 400 and CopyObject InvalidRequest
    without their key (awsmodel). A dry run counts them apart from those to copy; a run
    skips each after one refused copy, leaves its rows, says what to do, exits 1."""
    model = AwsModel(backend())
    names = [f"image/u{i:05d}.png" for i in range(6)]
    for i, k in enumerate(names):
        backend().put_object(SOURCE, k, content(i))
    model.sse_c |= {(SOURCE, names[1]), (SOURCE, names[4])}
    insert_rows(db, names)
    with FaultProxy(endpoint, rate=0, model=model) as proxy:
        env = {"AWS_ENDPOINT_URL": proxy.url}
        dry = cli("--engine", engine, "--dry-run", "--json", env=env)
        s = summary(dry.out)
        assert dry.code == 0 and (s["sse_c"], s["would_copy"]) == (2, 4), dry.out + dry.err
        assert proxy.seen["CopyObject"] == 0

        p = cli("--engine", engine, "--json", "--max-attempts", "3", env=env)
        s = summary(p.out)
        assert p.code == 1, p.out + p.err
        assert (s["sse_c"], s["copied"], s["failed"], s["stopped"]) == (2, 4, 0, None), s
        assert model.refused["CopyObject", "InvalidRequest"] == 2  # one request each
        assert rows(db) == [("image/" if i in (1, 4) else "avatar/") + f"u{i:05d}.png"
                            for i in range(6)]
        lines = [line for line in p.err.splitlines() if "SSE-C:" in line]
        assert len(lines) == 2 and all("--copy-source-sse-customer-key" in line
                                       for line in lines), p.err

        again = cli("--engine", engine, "--json", env=env)
        s = summary(again.out)
        assert again.code == 1 and (s["sse_c"], s["copied"], s["skipped"]) == (2, 0, 4), s
