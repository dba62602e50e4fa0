"""Regions: the region each bucket lives in, found once at start, so that every
request (copies, listings, HEADs, deletes) is sent to it and signed for it.

S3 refuses a request signed for another region than the bucket's (400
AuthorizationHeaderMalformed, "expecting 'eu-west-1'"). botocore recovers from
that answer with a second attempt; the CRT does not. Asking first costs the
HeadBucket the setup check sends anyway.
"""
from __future__ import annotations

from botocore.exceptions import ClientError

REGION_HEADER = "x-amz-bucket-region"


def region_of_answer(headers: dict | None) -> str | None:
    """x-amz-bucket-region from a HeadBucket answer: AWS sends it with 200, 301,
    400 and 403 alike ("whether access to the bucket is authorized or not")."""
    return (headers or {}).get(REGION_HEADER) or None


def location_region(constraint: str | None) -> str:
    """GetBucketLocation's LocationConstraint as a region: none for us-east-1, and
    "EU" for the buckets made in eu-west-1 before regions had names."""
    return {None: "us-east-1", "": "us-east-1", "EU": "eu-west-1"}.get(constraint, constraint)


def is_aws(endpoint_url: str | None) -> bool:
    host = (endpoint_url or "").split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    return host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn")


def discover(s3, bucket: str, headers: dict | None) -> str:
    """The bucket's region, given the headers of its HeadBucket answer.

    Without the header, AWS is asked with GetBucketLocation; an S3-compatible
    server (AWS_ENDPOINT_URL) that does not send it takes every request in the
    client's region, as before.
    """
    found = region_of_answer(headers)
    if found:
        return found
    client_region = s3.meta.region_name or "us-east-1"
    if not is_aws(s3.meta.endpoint_url):
        return client_region
    try:
        return location_region(s3.get_bucket_location(Bucket=bucket).get("LocationConstraint"))
    except ClientError:
        return client_region


class Regions:
    """bucket -> region, for the buckets of this run; the boto3 client follows it
    from route() on, the CRT engine reads it when it is made."""

    def __init__(self, default: str):
        self.default = default
        self.buckets: dict[str, str] = {}

    def __getitem__(self, bucket: str) -> str:
        return self.buckets.get(bucket, self.default)

    def __setitem__(self, bucket: str, region: str) -> None:
        self.buckets[bucket] = region

    def other(self) -> dict[str, str]:
        """The buckets outside the client's own region."""
        return {b: r for b, r in self.buckets.items() if r != self.default}


def route(s3, regions: Regions) -> None:
    """Send and sign each of the client's requests for its bucket's region.

    botocore resolves the endpoint (URL and signing region) from the AWS::Region
    builtin; setting it per request before resolution gives the regional
    endpoint on AWS, and the same AWS_ENDPOINT_URL, signed for the bucket's
    region, on a custom endpoint."""
    def set_region(builtins, params, **_):
        region = regions.buckets.get((params or {}).get("Bucket"))
        if region:
            builtins["AWS::Region"] = region
    s3.meta.events.register("before-endpoint-resolution.s3", set_region,
                            unique_id="avatarmove-bucket-region")
