"""Both copy engines, end to end through real HTTP (moto's server): the CRT
sends CopyObject and ListObjectsV2 itself, so it must get every key right."""
import itertools
from datetime import datetime, timedelta, UTC

import boto3
import botocore.session
import pytest
from botocore.credentials import CredentialProvider, CredentialResolver, RefreshableCredentials

import move
from avatarmove.copying import Boto3Engine, aws_session, crt_credentials
from avatarmove.listing import Listing, Obj
from conftest import DEST, PNG, SOURCE, insert_rows, keys, moto_backend, rows, summary

TRICKY = [
    "image/plain.png",
    "image/with space.png",
    "image/plus+sign.png",
    "image/percent%20literal.png",
    "image/equals=and&amp.png",
    "image/unicodé-日本-😀.png",
    "image/deep/nested/folder/x.png",
    "image/UPPER.PNG",
    "image/a-c.png",
    "image/a/b.png",
    "image/tilde~quote'paren(1).png",
]
IGNORED = ["image/", "image/readme.txt", "image/x.png.bak", "other/x.png", "imagefoo/y.png"]


@pytest.fixture
def s3http(endpoint):
    return move.make_s3_client()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["crt", "boto3"])
def test_tricky_keys_copied_and_rows_rewritten(engine, cli, s3http, db):
    for k in TRICKY + IGNORED:
        s3http.put_object(Bucket=SOURCE, Key=k, Body=k.encode(), ContentType="image/png",
                          Metadata={"owner": "u1"})
    insert_rows(db, TRICKY + ["other/x.png"])

    p = cli("--engine", engine)

    assert p.code == 0, p.err
    expected = sorted("avatar/" + k[len("image/"):] for k in TRICKY)
    assert sorted(keys(s3http, DEST)) == expected
    for k in TRICKY:
        got = s3http.get_object(Bucket=DEST, Key="avatar/" + k[len("image/"):])
        assert got["Body"].read() == k.encode()
        assert got["ContentType"] == "image/png" and got["Metadata"] == {"owner": "u1"}
    assert rows(db) == ["avatar/" + k[len("image/"):] for k in TRICKY] + ["other/x.png"]
    # Sources stay where they were.
    assert len(keys(s3http, SOURCE)) == len(TRICKY + IGNORED)

    rerun = cli("--engine", engine, "--json")
    assert rerun.code == 0, rerun.err
    assert summary(rerun.out)["skipped"] == len(TRICKY)
    assert summary(rerun.out)["copied"] == 0


@pytest.mark.slow
def test_crt_lists_past_one_page(cli, s3http, db):
    # straight into the server's backend (same process): 2,100 PUTs over HTTP
    # took most of this test's half minute
    backend = moto_backend()
    names = [f"image/p{i:05d}.png" for i in range(2100)]
    for k in names:
        backend.put_object(SOURCE, k, b"x")
    p = cli("--engine", "crt", "--json")
    assert p.code == 0, p.err
    assert len(keys(s3http, DEST)) == 2100
    assert summary(p.out)["listed"] == 2100


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["crt", "boto3"])
def test_a_refused_copy_is_failed_and_its_row_left_alone(engine, endpoint, s3http, db, dsn,
                                                         monkeypatch, capsys):
    """An object that vanishes between listing and copy: the server answers 404."""
    s3http.put_object(Bucket=SOURCE, Key="image/ok.png", Body=b"x")
    insert_rows(db, ["image/ok.png", "image/ghost.png"])
    real = Listing._raw_pages

    def with_ghost(self):
        for page in real(self):
            if self.bucket == SOURCE:
                page = page + [Obj("image/ghost.png", 1, None)]
            yield page
    monkeypatch.setattr(Listing, "_raw_pages", with_ghost)

    code = move.main(["--db", dsn, "--quiet", "--engine", engine, "--json"])

    out, err = capsys.readouterr()
    assert code == 1
    assert summary(out)["failed"] == 1 and summary(out)["copied"] == 1
    assert "image/ghost.png" in err and "NoSuchKey" in err
    assert rows(db) == ["avatar/ok.png", "image/ghost.png"]
    assert keys(s3http, DEST) == ["avatar/ok.png"]


def test_unordered_listing_falls_back_to_checking_each_destination(s3, db, run, monkeypatch,
                                                                  caplog):
    """A server that lists a folder before its sibling files (as file-system-backed
    ones do) must not make the merge call an existing copy absent."""
    for k in ["image/a-c.png", "image/a/b.png"]:
        s3.put_object(Bucket=SOURCE, Key=k, Body=b"same")
    # a-c.png is already copied; a different object sits there -> must be a conflict.
    s3.put_object(Bucket=DEST, Key="avatar/a-c.png", Body=b"different")
    insert_rows(db, ["image/a-c.png", "image/a/b.png"])

    real = Listing._raw_pages

    def folder_first(self):
        for page in real(self):
            yield sorted(page, key=lambda o: o.key.split("/"))
    monkeypatch.setattr(Listing, "_raw_pages", folder_first)

    assert run() == 1  # the conflict
    assert s3.get_object(Bucket=DEST, Key="avatar/a-c.png")["Body"].read() == b"different"
    assert s3.get_object(Bucket=DEST, Key="avatar/a/b.png")["Body"].read() == b"same"
    assert rows(db) == ["image/a-c.png", "avatar/a/b.png"]


def test_an_unexpected_error_in_one_copy_fails_that_object_and_the_run_ends(s3, db, run,
                                                                             monkeypatch, capsys):
    """A bug in a copy must not leave the coordinator waiting forever for it."""
    for k in ["image/a.png", "image/boom.png", "image/c.png"]:
        s3.put_object(Bucket=SOURCE, Key=k, Body=b"png")
    insert_rows(db, ["image/a.png", "image/boom.png", "image/c.png"])
    real = Boto3Engine.copy

    def flaky(self, src_bucket, src_key, dst_bucket, dst_key, storage_class=None):
        if src_key == "image/boom.png":
            raise RuntimeError("simulated bug")
        return real(self, src_bucket, src_key, dst_bucket, dst_key, storage_class)
    monkeypatch.setattr(Boto3Engine, "copy", flaky)

    assert run() == 1
    err = capsys.readouterr().err
    assert "image/boom.png" in err and "simulated bug" in err
    assert keys(s3, DEST) == ["avatar/a.png", "avatar/c.png"]
    assert rows(db) == ["avatar/a.png", "image/boom.png", "avatar/c.png"]


def test_the_crt_signs_with_the_keys_of_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDFROMENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-from-env")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token-from-env")
    got = crt_credentials(aws_session()).get_credentials().result(timeout=5)
    assert (got.access_key_id, got.secret_access_key, got.session_token) == (
        "AKIDFROMENV", "secret-from-env", "token-from-env")


def test_the_crt_follows_credentials_that_refresh_themselves():
    """An assumed role or SSO: each signing must use the keys current at that time."""
    issued = (f"AKIDROTATED{n}" for n in itertools.count(1))

    def refresh():
        soon = datetime.now(UTC) + timedelta(seconds=1)  # always due for refreshing
        return {"access_key": next(issued), "secret_key": "s", "token": "t",
                "expiry_time": soon.isoformat()}

    class Rotating(CredentialProvider):
        METHOD = "rotating"

        def load(self):
            return RefreshableCredentials.create_from_metadata(refresh(), refresh, self.METHOD)

    core = botocore.session.get_session()
    core.register_component("credential_provider", CredentialResolver([Rotating()]))
    provider = crt_credentials(boto3.session.Session(botocore_session=core))
    first = provider.get_credentials().result(timeout=5).access_key_id
    second = provider.get_credentials().result(timeout=5).access_key_id
    assert first.startswith("AKIDROTATED") and second.startswith("AKIDROTATED")
    assert int(second.removeprefix("AKIDROTATED")) > int(first.removeprefix("AKIDROTATED"))


# ---------------------------------------------------------------- storage classes

CLASSES = ["STANDARD", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR",
           "REDUCED_REDUNDANCY"]


def seed_classes(client, db) -> None:
    for cls in CLASSES:
        client.put_object(Bucket=SOURCE, Key=f"image/{cls.lower()}.png", Body=PNG + cls.encode(),
                          StorageClass=cls)
    insert_rows(db, [f"image/{cls.lower()}.png" for cls in CLASSES])


def dest_classes(client) -> dict[str, str]:
    """key -> storage class, from HEAD (the listing's own answer is what is checked)."""
    return {k: client.head_object(Bucket=DEST, Key=k).get("StorageClass", "STANDARD")
            for k in keys(client, DEST)}


def test_copies_keep_their_sources_storage_class(s3, db, run, capsys):
    """The listing gives each source's class; the copy is made in it (S3 would make it
    STANDARD: a cost change on millions of objects)."""
    seed_classes(s3, db)
    assert run("--dry-run") == 0
    assert summary(capsys.readouterr().out)["storage_classes"] == {c: 1 for c in CLASSES}
    assert run() == 0
    assert summary(capsys.readouterr().out)["storage_classes"] == {c: 1 for c in CLASSES}
    assert dest_classes(s3) == {f"avatar/{c.lower()}.png": c for c in CLASSES}


def test_storage_class_flag_names_every_copys_class(s3, db, run, capsys):
    seed_classes(s3, db)
    assert run("--storage-class", "STANDARD_IA") == 0
    assert set(dest_classes(s3).values()) == {"STANDARD_IA"}
    with pytest.raises(SystemExit) as refused:  # not a class: one line, exit 2
        run("--storage-class", "FROZEN")
    assert refused.value.code == 2


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["crt", "boto3"])
def test_storage_class_kept_by_both_engines(engine, cli, s3http, db):
    seed_classes(s3http, db)
    p = cli("--engine", engine, "--json", "--dry-run")
    assert p.code == 0 and summary(p.out)["storage_classes"] == {c: 1 for c in CLASSES}, p.err
    p = cli("--engine", engine, "--json")
    assert p.code == 0, p.out + p.err
    assert dest_classes(s3http) == {f"avatar/{c.lower()}.png": c for c in CLASSES}
    assert rows(db) == [f"avatar/{c.lower()}.png" for c in CLASSES]


# ---------------------------------------------------------------- Object Lock


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["crt", "boto3"])
def test_copies_into_a_bucket_with_default_retention(engine, cli, s3http, db):
    """moto, as AWS for uploads, refuses a write into a bucket with Object Lock default
    retention without Content-MD5 or a checksum header; each copy sends the MD5 of its
    (empty) body, and lands under the bucket's retention."""
    s3http.create_bucket(Bucket="locked", ObjectLockEnabledForBucket=True)
    s3http.put_object_lock_configuration(Bucket="locked", ObjectLockConfiguration={
        "ObjectLockEnabled": "Enabled",
        "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}}})
    for i in range(3):
        s3http.put_object(Bucket=SOURCE, Key=f"image/{i}.png", Body=PNG + bytes([i]))
    insert_rows(db, [f"image/{i}.png" for i in range(3)])
    p = cli("--engine", engine, "--json", "--dest-bucket", "locked")
    assert p.code == 0, p.out + p.err
    assert summary(p.out)["copied"] == 3
    assert keys(s3http, "locked") == [f"avatar/{i}.png" for i in range(3)]
    assert s3http.head_object(Bucket="locked", Key="avatar/0.png")["ObjectLockMode"] == \
        "GOVERNANCE"
    assert rows(db) == [f"avatar/{i}.png" for i in range(3)]


# ---------------------------------------------------------------- Requester Pays


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["crt", "boto3"])
def test_requester_pays_source(engine, cli, s3http, db, endpoint):
    """moto does not enforce Requester Pays; faultproxy answers as AWS does (403 to any
    request on the bucket, a copy from it included, without x-amz-request-payer)."""
    from faultproxy import FaultProxy
    for i in range(4):
        s3http.put_object(Bucket=SOURCE, Key=f"image/{i}.png", Body=PNG + bytes([i]))
    insert_rows(db, [f"image/{i}.png" for i in range(4)])
    with FaultProxy(endpoint, rate=0, requester_pays=(SOURCE,)) as proxy:
        refused = cli("--engine", engine, "--json", env={"AWS_ENDPOINT_URL": proxy.url})
        paid = cli("--engine", engine, "--json", "--request-payer", "--delete-source",
                   env={"AWS_ENDPOINT_URL": proxy.url})
    assert refused.code == 2, refused.out + refused.err
    assert "no access to source bucket" in refused.err and "--request-payer" in refused.err
    assert paid.code == 0, paid.out + paid.err
    assert summary(paid.out)["copied"] == 4 and summary(paid.out)["deleted"] == 4
    assert keys(s3http, DEST) == [f"avatar/{i}.png" for i in range(4)]
    assert rows(db) == [f"avatar/{i}.png" for i in range(4)]
    # only the run without the flag was refused (its HeadBucket); the paid run said so on
    # every kind of request it sent
    assert proxy.refused == {("requester-pays", "HeadBucket"): 1}, proxy.refused
    assert {"HeadBucket", "ListObjects", "CopyObject", "POST"} <= set(proxy.payer_seen), \
        proxy.payer_seen


# ---------------------------------------------------------------- multipart copies

MIB = 1024 ** 2
MULTIPART = ("--multipart-threshold", str(5 * MIB), "--multipart-chunksize", str(5 * MIB))


def seed_large(client, db) -> dict[str, bytes]:
    """Two 6 MiB sources (two parts each) with everything a single copy keeps: a
    content type and other content headers, user metadata, tags, a checksum (a CRC of
    the whole object; a SHA-256)."""
    import os
    bodies = {}
    for name, algorithm in (("crc", "CRC32"), ("sha", "SHA256")):
        key = f"image/{name}.png"
        bodies[key] = PNG + os.urandom(6 * MIB)
        client.put_object(Bucket=SOURCE, Key=key, Body=bodies[key], ContentType="image/png",
                          CacheControl="max-age=60", Metadata={"owner": "u1", "v": "2"},
                          Tagging="team=avatars&pii=no", ChecksumAlgorithm=algorithm)
    insert_rows(db, list(bodies))
    return bodies


def assert_kept(client, src_key: str, dest_key: str) -> None:
    src = client.head_object(Bucket=SOURCE, Key=src_key, ChecksumMode="ENABLED")
    dest = client.head_object(Bucket=DEST, Key=dest_key, ChecksumMode="ENABLED")
    assert dest["ETag"].strip('"').endswith("-2")  # made of two parts: the multipart path
    for field in ("ContentType", "CacheControl", "Metadata", "ContentLength"):
        assert dest.get(field) == src.get(field), field
    tags = [client.get_object_tagging(Bucket=b, Key=k)["TagSet"]
            for b, k in ((SOURCE, src_key), (DEST, dest_key))]
    assert tags[1] == tags[0] and tags[0]
    if src.get("ChecksumCRC32"):  # a CRC of the whole object: the same value
        assert dest.get("ChecksumCRC32") == src["ChecksumCRC32"]
        assert dest.get("ChecksumType") == "FULL_OBJECT"
    else:  # SHA-256 of a multipart object is per part: the algorithm is kept
        assert dest.get("ChecksumSHA256")


def test_multipart_copies_keep_tags_metadata_and_checksums(s3, db, run, capsys):
    bodies = seed_large(s3, db)
    assert run(*MULTIPART) == 0
    assert summary(capsys.readouterr().out)["copied"] == 2
    for key, data in bodies.items():
        dest_key = key.replace("image/", "avatar/")
        assert_kept(s3, key, dest_key)
        assert s3.get_object(Bucket=DEST, Key=dest_key)["Body"].read() == data
    assert s3.list_multipart_uploads(Bucket=DEST).get("Uploads", []) == []


@pytest.mark.slow
def test_multipart_copy_keeps_them_with_the_crt_engine(cli, s3http, db):
    """The CRT engine hands multipart copies to boto3: the same copy, through HTTP."""
    bodies = seed_large(s3http, db)
    p = cli("--engine", "crt", "--json", *MULTIPART)
    assert p.code == 0, p.out + p.err
    for key in bodies:
        assert_kept(s3http, key, key.replace("image/", "avatar/"))
    assert rows(db) == [k.replace("image/", "avatar/") for k in bodies]
