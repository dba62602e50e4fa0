"""Regions: each bucket's region is found at start and every request is signed for it.

moto does not check the region a request is signed for; faultproxy's `regions`
answers a wrong one as AWS does (400 AuthorizationHeaderMalformed naming the
expected region, and x-amz-bucket-region on HeadBucket).
"""
from __future__ import annotations

import boto3
import pytest
from conftest import DEST, PNG, insert_rows, keys, put, rows, summary
from faultproxy import FaultProxy

import move
from avatarmove.copying import regional_netloc
from avatarmove.regions import Regions, location_region, route
from avatarmove.run import check_buckets
from avatarmove.settings import Settings

EU, US = "eu-west-1", "us-east-1"
ENGINES = pytest.mark.parametrize("engine", ["crt", "boto3"])


def cfg(source: str, dest: str) -> Settings:
    return Settings(db="", source_bucket=source, dest_bucket=dest, source_prefix="image/",
                    dest_prefix="avatar/", table="avatars", column="path")


def make_bucket(region: str, name: str, endpoint: str | None = None):
    """A bucket in `region` (moto wants CreateBucket sent to the region it names);
    returns a client of that region."""
    client = boto3.client("s3", region_name=region, endpoint_url=endpoint)
    client.create_bucket(Bucket=name, **({} if region == US else {
        "CreateBucketConfiguration": {"LocationConstraint": region}}))
    return client


# ---------------------------------------------------------------- unit


def test_location_constraint_names_the_region():
    assert [location_region(c) for c in (None, "", "EU", "eu-central-1")] == \
        [US, US, EU, "eu-central-1"]


def test_regional_host_keeps_the_form_of_the_clients_endpoint():
    assert [regional_netloc(n, EU) for n in (
        "s3.amazonaws.com", "s3.us-east-1.amazonaws.com", "s3.dualstack.us-east-1.amazonaws.com",
        "s3-fips.us-west-2.amazonaws.com")] == [
        "s3.eu-west-1.amazonaws.com", "s3.eu-west-1.amazonaws.com",
        "s3.dualstack.eu-west-1.amazonaws.com", "s3-fips.eu-west-1.amazonaws.com"]


def test_each_bucket_is_found_in_its_region_and_signed_for_it(aws_credentials):
    """check_buckets reads each bucket's region from HeadBucket; from then on the
    client signs each request for the region of the bucket it names."""
    from moto import mock_aws

    with mock_aws():
        s3 = move.make_s3_client()
        make_bucket(EU, "legacy-eu")
        make_bucket(US, "prod-us")
        signed: list[tuple[str, str]] = []
        s3.meta.events.register("request-created.s3", lambda request, operation_name, **_:
                                signed.append((operation_name, scope(request.headers))))
        regions = check_buckets(s3, cfg("legacy-eu", "prod-us"))
        assert (regions["legacy-eu"], regions["prod-us"]) == (EU, US)
        assert regions.other() == {"legacy-eu": EU}
        signed.clear()
        s3.list_objects_v2(Bucket="legacy-eu")
        s3.put_object(Bucket="legacy-eu", Key="image/a.png", Body=PNG)
        s3.copy_object(Bucket="prod-us", Key="avatar/a.png",
                       CopySource={"Bucket": "legacy-eu", "Key": "image/a.png"})
        s3.head_object(Bucket="prod-us", Key="avatar/a.png")
        s3.delete_objects(Bucket="legacy-eu", Delete={"Objects": [{"Key": "image/a.png"}]})
        # a copy is signed for the destination's region, where it is sent
        assert signed == [("ListObjectsV2", EU), ("PutObject", EU), ("CopyObject", US),
                          ("HeadObject", US), ("DeleteObjects", EU)]


def scope(headers) -> str:
    auth = headers.get("Authorization", "")
    auth = auth.decode() if isinstance(auth, bytes) else auth
    return auth.split("Credential=", 1)[1].split("/")[2]


def test_route_leaves_other_buckets_to_the_client_region(aws_credentials):
    from moto import mock_aws

    with mock_aws():
        s3 = move.make_s3_client()
        make_bucket(US, "elsewhere")
        regions = Regions("us-east-1")
        regions["legacy-eu"] = EU
        route(s3, regions)
        signed = []
        s3.meta.events.register("request-created.s3",
                                lambda request, **_: signed.append(scope(request.headers)))
        s3.list_objects_v2(Bucket="elsewhere")
        assert signed == [US]


# ---------------------------------------------------------------- end to end, through the proxy


@pytest.fixture
def regional(endpoint, db):
    """Four buckets: legacy-eu, prod-eu in eu-west-1, legacy-us, prod-us in us-east-1;
    10 sources in each legacy bucket, one row each."""
    for region, names in ((EU, ("legacy-eu", "prod-eu")), (US, ("legacy-us", "prod-us"))):
        for name in names:
            c = make_bucket(region, name, endpoint)
            if name.startswith("legacy"):
                for i in range(10):
                    c.put_object(Bucket=name, Key=f"image/{i}.png", Body=PNG + bytes([i]))
    insert_rows(db, [f"image/{i}.png" for i in range(10)])
    return {"legacy-eu": EU, "prod-eu": EU, "legacy-us": US, "prod-us": US}


@ENGINES
@pytest.mark.parametrize("source,dest", [("legacy-eu", "prod-us"), ("legacy-us", "prod-eu")],
                         ids=["eu-to-us", "us-to-eu"])
def test_cross_region_move(cli, db, endpoint, regional, engine, source, dest):
    """The client's region is us-east-1 (AWS_DEFAULT_REGION) either way. With
    --delete-source the run sends every kind of request: HeadBucket, listings,
    copies, HEADs before the deletes, deletes; none is signed for the wrong region
    once the region is known."""
    with FaultProxy(endpoint, rate=0, regions=regional) as proxy:
        p = cli("--engine", engine, "--json", "--source-bucket", source, "--dest-bucket", dest,
                "--delete-source", env={"AWS_ENDPOINT_URL": proxy.url})
    assert p.code == 0, p.out + p.err
    s = summary(p.out)
    assert (s["copied"], s["rows_rewritten"], s["failed"]) == (10, 10, 0), s
    client = move.make_s3_client()
    assert sorted(keys(client, dest)) == sorted(f"avatar/{i}.png" for i in range(10))
    assert keys(client, source) == []  # deleted: the copies were confirmed
    assert rows(db) == [f"avatar/{i}.png" for i in range(10)]
    # Only the first HeadBucket of the bucket outside us-east-1 was signed for the wrong
    # region: its answer is how the region is found (botocore retries it there).
    assert proxy.refused == {("region", "HeadBucket"): 1}, proxy.refused
    assert proxy.seen["CopyObject"] == 10


@ENGINES
def test_custom_endpoint_without_region_header_signs_for_the_client_region(
        cli, db, endpoint, engine):
    """An S3-compatible server that sends no x-amz-bucket-region (a region it does not
    keep): every request is signed for AWS_DEFAULT_REGION, as before."""
    client = move.make_s3_client()
    for i in range(3):
        put(client, f"image/{i}.png", PNG + bytes([i]))
    insert_rows(db, [f"image/{i}.png" for i in range(3)])
    with FaultProxy(endpoint, rate=0, strip_headers=("x-amz-bucket-region",)) as proxy:
        p = cli("--engine", engine, "--json", env={"AWS_ENDPOINT_URL": proxy.url,
                                                    "AWS_DEFAULT_REGION": "eu-central-1",
                                                    "AWS_REGION": "eu-central-1"})
    assert p.code == 0, p.out + p.err
    assert summary(p.out)["copied"] == 3
    assert sorted(keys(client, DEST)) == [f"avatar/{i}.png" for i in range(3)]
    assert set(proxy.signed_regions) == {"eu-central-1"}, proxy.signed_regions
