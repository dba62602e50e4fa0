"""Access: copies readable by whoever could read their sources.

AWS, CopyObject: "When you copy an object, the ACL metadata is not preserved and
is set to private by default. Only the owner has full access control. To
override the default ACL setting, specify a new ACL when you generate a copy
request." So the ACL copies are sent with is chosen once, before the first copy,
from a handful of requests: a sample of the sources' ACLs, and whether the
destination takes ACLs at all (Object Ownership, Block Public Access). Where it
cannot keep public sources public, the run stops before copying, with the
bucket policy that would, unless --acl says what the copies get.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass

from botocore.exceptions import ClientError

from .listing import is_png
from .planning import ARCHIVED_CLASSES
from .settings import Settings, UsageError

log = logging.getLogger("move")

# The canned ACLs aws-cli's --acl accepts for objects.
CANNED_ACLS = ("private", "public-read", "public-read-write", "authenticated-read",
               "aws-exec-read", "bucket-owner-read", "bucket-owner-full-control")
# Readable by others than the bucket's account: what the copies must keep.
PUBLIC_ACLS = ("public-read", "public-read-write", "authenticated-read")
ALL_USERS = "http://acs.amazonaws.com/groups/global/AllUsers"
AUTHENTICATED_USERS = "http://acs.amazonaws.com/groups/global/AuthenticatedUsers"

SAMPLE = 5  # source ACLs read: a handful of requests, whatever the bucket holds
SAMPLE_FROM = 1000  # spread over the first listing page


@dataclass
class Destination:
    """Whether the destination bucket takes ACLs, as far as it would say."""
    ownership: str | None = None  # BucketOwnerEnforced, BucketOwnerPreferred, ObjectWriter
    block_public_acls: bool = False
    ignore_public_acls: bool = False
    block_public_policy: bool = False

    @property
    def acls_disabled(self) -> bool:
        return self.ownership == "BucketOwnerEnforced"


def canned(grants: list[dict], owner_id: str | None) -> str:
    """The canned ACL these grants are, or "custom"."""
    have = set()
    for g in grants:
        grantee, perm = g.get("Grantee", {}), g.get("Permission")
        if grantee.get("Type") == "CanonicalUser" and grantee.get("ID") == owner_id:
            if perm == "FULL_CONTROL":
                continue
            have.add(("owner", perm))
        elif grantee.get("URI") == ALL_USERS:
            have.add(("all", perm))
        elif grantee.get("URI") == AUTHENTICATED_USERS:
            have.add(("auth", perm))
        else:
            have.add(("other", perm))
    return {frozenset(): "private",
            frozenset({("all", "READ")}): "public-read",
            frozenset({("all", "READ"), ("all", "WRITE")}): "public-read-write",
            frozenset({("auth", "READ")}): "authenticated-read"}.get(frozenset(have), "custom")


def object_acl(s3, bucket: str, key: str) -> str:
    acl = s3.get_object_acl(Bucket=bucket, Key=key)
    return canned(acl.get("Grants", []), acl.get("Owner", {}).get("ID"))


def sample_sources(s3, cfg: Settings) -> Counter:
    """Canned ACL -> how many of a few source PNGs have it (none: nothing to copy)."""
    try:
        page = s3.list_objects_v2(Bucket=cfg.source_bucket, Prefix=cfg.source_prefix,
                                  MaxKeys=SAMPLE_FROM, OptionalObjectAttributes=["RestoreStatus"])
    except ClientError as exc:  # the run's own listing meets it too, and says what to do
        log.debug("no source ACL sample: listing failed: %s", _code(exc))
        return Counter()
    # archived objects are never copied as they are (and moto refuses their ACL)
    found = [o["Key"] for o in page.get("Contents", ()) if is_png(o["Key"]) and
             o.get("StorageClass") not in ARCHIVED_CLASSES]
    step = max(1, len(found) // SAMPLE)
    kinds: Counter = Counter()
    for key in found[::step][:SAMPLE]:
        try:
            kinds[object_acl(s3, cfg.source_bucket, key)] += 1
        except ClientError as exc:
            if _code(exc) in ("AccessDenied", "403"):
                raise
            log.debug("no ACL for %s in the sample: %s", key, _code(exc))  # e.g. deleted since
    return kinds


def destination(s3, bucket: str) -> Destination:
    """Object Ownership and Block Public Access of a bucket. Neither set: ACLs work
    (older buckets); one this role may not read: assumed not to block."""
    d = Destination()
    try:
        rules = s3.get_bucket_ownership_controls(Bucket=bucket)["OwnershipControls"]["Rules"]
        d.ownership = rules[0].get("ObjectOwnership") if rules else None
    except ClientError as exc:
        if _code(exc) in ("AccessDenied", "403"):
            log.warning("cannot read the Object Ownership of s3://%s (%s): assuming it takes "
                        "ACLs; grant s3:GetBucketOwnershipControls to have it checked",
                        bucket, _code(exc))
    try:
        block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
        d.block_public_acls = bool(block.get("BlockPublicAcls"))
        d.ignore_public_acls = bool(block.get("IgnorePublicAcls"))
        d.block_public_policy = bool(block.get("BlockPublicPolicy") or
                                     block.get("RestrictPublicBuckets"))
    except ClientError as exc:
        if _code(exc) in ("AccessDenied", "403"):
            log.warning("cannot read the Block Public Access settings of s3://%s (%s): "
                        "assuming none; grant s3:GetBucketPublicAccessBlock to have them "
                        "checked", bucket, _code(exc))
    return d


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def read_policy(cfg: Settings, acl: str) -> str:
    """The bucket policy that gives the copies the read access `acl` gave the sources."""
    principal = {"AWS": "*"} if acl == "authenticated-read" else "*"
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Sid": "ReadAvatars", "Effect": "Allow", "Principal": principal,
        "Action": "s3:GetObject",
        "Resource": f"arn:aws:s3:::{cfg.dest_bucket}/{cfg.dest_prefix}*"}]},
        separators=(",", ":"))


def refusal(d: Destination, acl: str) -> str | None:
    """Why the destination would refuse, or ignore, copies sent with `acl`."""
    if d.acls_disabled and acl != "bucket-owner-full-control":
        return "has ACLs disabled (Object Ownership BucketOwnerEnforced)"
    if acl in PUBLIC_ACLS and d.block_public_acls:
        return "blocks public ACLs (Block Public Access: BlockPublicAcls)"
    if acl in PUBLIC_ACLS and d.ignore_public_acls:
        return "ignores public ACLs (Block Public Access: IgnorePublicAcls)"
    return None


def decide(s3, cfg: Settings) -> str | None:
    """The canned ACL every copy is sent with (None: none, so private), or UsageError
    when the destination cannot keep public sources public and --acl said nothing."""
    dest = destination(s3, cfg.dest_bucket)
    if cfg.acl == "private":  # the user's choice; sent as no ACL, which any bucket takes
        return None
    if cfg.acl:
        why = refusal(dest, cfg.acl)
        if why:
            raise UsageError(f"--acl {cfg.acl}: s3://{cfg.dest_bucket} {why}, so S3 would "
                             f"refuse or ignore it on every copy; use --acl private and, for "
                             f"public reads, this bucket policy: {read_policy(cfg, cfg.acl)}")
        return cfg.acl
    try:
        found = sample_sources(s3, cfg)
    except ClientError as exc:
        raise UsageError(f"cannot read the ACLs of source objects ({_code(exc)}): grant "
                         f"s3:GetObjectAcl on {cfg.source_bucket}/{cfg.source_prefix}*, or "
                         "choose what the copies get with --acl (--acl private: owner "
                         "only)") from None
    kinds = sorted(found)
    seen = ", ".join(f"{n} {k}" for k, n in found.most_common())
    if not kinds or kinds == ["private"]:
        return None
    if len(kinds) > 1 or kinds[0] == "custom":
        what = "different ACLs" if len(kinds) > 1 else "grants no canned ACL makes"
        raise UsageError(f"source objects have {what} ({seen} of {sum(found.values())} "
                         "sampled): S3 does not copy ACLs, and every copy gets the one --acl "
                         "names; choose one (e.g. --acl public-read, or --acl private)")
    acl = kinds[0]
    why = refusal(dest, acl)
    if why and acl in PUBLIC_ACLS:
        policy_note = (" (and turn off BlockPublicPolicy and RestrictPublicBuckets there)"
                       if dest.block_public_policy else "")
        raise UsageError(
            f"source objects are {acl} ({seen} sampled) but s3://{cfg.dest_bucket} {why}: "
            f"copies would not be readable as their sources are. Add this bucket policy"
            f"{policy_note}: {read_policy(cfg, acl)} then rerun with --acl private, or pass "
            "--acl private if private copies are fine")
    if why:  # an ACL that grants nothing public (e.g. bucket-owner-read): private is the same
        return None
    log.info("source objects are %s (%s sampled): copies get --acl %s", acl, seen, acl)
    return acl


# Who can read an object with this ACL, besides its bucket's account.
READERS = {"public-read": {"everyone", "any AWS account"},
           "public-read-write": {"everyone", "any AWS account"},
           "authenticated-read": {"any AWS account"}}


def policy_is_public(s3, bucket: str) -> bool:
    """A bucket policy that lets anyone read (GetBucketPolicyStatus), e.g. the one the
    preflight suggests for a bucket with ACLs disabled."""
    try:
        return bool(s3.get_bucket_policy_status(Bucket=bucket)["PolicyStatus"]["IsPublic"])
    except ClientError:  # no policy (NoSuchBucketPolicy), or not allowed to ask
        return False


def less_readable(s3, cfg: Settings, pairs: list[tuple[str, str]]) -> list[tuple[str, str, str,
                                                                                  str]]:
    """Of a sample of (source key, copy key), each whose copy fewer can read than its
    source: (source key, its ACL, copy key, its ACL)."""
    public = policy_is_public(s3, cfg.dest_bucket)
    out = []
    for src_key, dest_key in pairs:
        src_acl = object_acl(s3, cfg.source_bucket, src_key)
        wanted = READERS.get(src_acl, set())
        if not wanted or public:
            continue
        dest_acl = object_acl(s3, cfg.dest_bucket, dest_key)
        if not wanted <= READERS.get(dest_acl, set()):
            out.append((src_key, src_acl, dest_key, dest_acl))
    return out
