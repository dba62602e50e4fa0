"""Access survives the move: a copy is readable by whoever could read its source.

AWS, CopyObject: "When you copy an object, the ACL metadata is not preserved and is
set to private by default." moto keeps ACLs, Object Ownership and Block Public
Access but enforces neither of the two; tests/awsmodel.py refuses ACLs as AWS does.
move.py runs as a subprocess with each engine, through the model.
"""
from __future__ import annotations

import json

import pytest

import move
from avatarmove.access import canned
from awsmodel import AwsModel
from conftest import DEST, PNG, SOURCE, insert_rows, keys, rows, summary
from conftest import moto_backend as backend
from faultproxy import FaultProxy

ENGINES = pytest.mark.parametrize("engine", ["crt", "boto3"])
N = 30
OWNER = {"Type": "CanonicalUser", "ID": "owner-id"}
ALL = {"Type": "Group", "URI": "http://acs.amazonaws.com/groups/global/AllUsers"}
AUTH = {"Type": "Group", "URI": "http://acs.amazonaws.com/groups/global/AuthenticatedUsers"}


@pytest.mark.parametrize("grants,acl", [
    ([(OWNER, "FULL_CONTROL")], "private"),
    ([(OWNER, "FULL_CONTROL"), (ALL, "READ")], "public-read"),
    ([(OWNER, "FULL_CONTROL"), (ALL, "READ"), (ALL, "WRITE")], "public-read-write"),
    ([(OWNER, "FULL_CONTROL"), (AUTH, "READ")], "authenticated-read"),
    ([(OWNER, "FULL_CONTROL"), ({"Type": "CanonicalUser", "ID": "someone"}, "READ")], "custom"),
])
def test_grants_are_named_as_their_canned_acl(grants, acl):
    assert canned([{"Grantee": g, "Permission": p} for g, p in grants], "owner-id") == acl


def public(client, bucket: str, key: str) -> bool:
    grants = client.get_object_acl(Bucket=bucket, Key=key)["Grants"]
    return any(g["Grantee"].get("URI", "").endswith("/AllUsers") and g["Permission"] == "READ"
               for g in grants)


@pytest.fixture
def sources(endpoint, db):
    """N source avatars, public-read unless a test says otherwise, one row each."""
    client = move.make_s3_client()

    def make(acl: str = "public-read") -> list[str]:
        names = [f"image/u{i:05d}.png" for i in range(N)]
        for k in names:
            client.put_object(Bucket=SOURCE, Key=k, Body=PNG + k.encode(), ACL=acl)
        insert_rows(db, names)
        return names
    make.client = client
    return make


def run_through_model(cli, *args: str):
    model = AwsModel(backend())
    with FaultProxy(move.os.environ["AWS_ENDPOINT_URL"], rate=0, model=model) as proxy:
        p = cli(*args, env={"AWS_ENDPOINT_URL": proxy.url})
    return p, proxy, model


@ENGINES
def test_public_sources_stay_public_where_the_destination_takes_acls(engine, sources, cli, db):
    names = sources()
    client = sources.client
    p, proxy, model = run_through_model(cli, "--engine", engine, "--json")
    assert p.code == 0, p.out + p.err
    assert summary(p.out)["copied"] == N
    copies = keys(client, DEST)
    assert len(copies) == N and all(public(client, DEST, k) for k in copies)
    # found out from a handful of requests: 5 sampled ACLs, not one per object
    assert proxy.seen["GET"] == 5, proxy.seen
    assert not model.refused

    verify = cli("--verify")
    assert verify.code == 0, verify.out + verify.err
    # a copy made private afterwards is found by verify's sample
    for k in copies:
        client.put_object_acl(Bucket=DEST, Key=k, ACL="private")
    verify = cli("--verify")
    assert verify.code == 1 and "LESS-READABLE" in verify.out, verify.out
    assert rows(db) == ["avatar/" + k[6:] for k in names]


@ENGINES
@pytest.mark.parametrize("setting", ["BucketOwnerEnforced", "BlockPublicAcls",
                                     "IgnorePublicAcls"])
def test_destination_that_cannot_keep_them_public_stops_before_any_copy(engine, setting,
                                                                       sources, cli, db):
    names = sources()
    client = sources.client
    if setting == "BucketOwnerEnforced":
        client.put_bucket_ownership_controls(Bucket=DEST, OwnershipControls={
            "Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]})
    else:
        client.put_public_access_block(Bucket=DEST, PublicAccessBlockConfiguration={
            setting: True})
    p, proxy, _ = run_through_model(cli, "--engine", engine, "--json")
    assert p.code == 2, p.out + p.err
    assert proxy.seen["CopyObject"] == 0 and keys(client, DEST) == [] and rows(db) == names
    line = p.err.strip().splitlines()[-1]
    assert setting in line and "--acl private" in line, p.err
    policy = json.loads(line[line.index("{"):line.rindex("}") + 1])
    assert policy["Statement"][0]["Resource"] == f"arn:aws:s3:::{DEST}/avatar/*"
    assert policy["Statement"][0]["Principal"] == "*"

    # public-read asked for explicitly: S3 would refuse (or ignore) it, so still no copy
    p, proxy, _ = run_through_model(cli, "--engine", engine, "--acl", "public-read")
    assert p.code == 2 and proxy.seen["CopyObject"] == 0, p.out + p.err

    # the user's choice: private copies are fine (readable through the policy, say)
    p, proxy, model = run_through_model(cli, "--engine", engine, "--acl", "private", "--json")
    assert p.code == 0, p.out + p.err
    assert summary(p.out)["copied"] == N and not model.refused
    assert rows(db) == ["avatar/" + k[6:] for k in names]


@ENGINES
def test_private_sources_need_no_acl_and_acl_flag_sets_one(engine, sources, cli, db):
    sources("private")
    client = sources.client
    client.put_bucket_ownership_controls(Bucket=DEST, OwnershipControls={
        "Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]})
    p, _, model = run_through_model(cli, "--engine", engine, "--json")
    assert p.code == 0 and summary(p.out)["copied"] == N, p.out + p.err
    assert not model.refused

    # another destination prefix, --acl public-read on a bucket that takes ACLs
    client.delete_bucket_ownership_controls(Bucket=DEST)
    with db.cursor() as cur:
        cur.execute("UPDATE avatars SET path = replace(path, 'avatar/', 'image/')")
    p, _, model = run_through_model(cli, "--engine", engine, "--json", "--acl", "public-read",
                                    "--dest-prefix", "public")
    assert p.code == 0 and summary(p.out)["copied"] == N, p.out + p.err
    assert all(public(client, DEST, k) for k in keys(client, DEST, "public/"))
    assert not any(public(client, DEST, k) for k in keys(client, DEST, "avatar/"))
