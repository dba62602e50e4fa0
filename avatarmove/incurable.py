"""Errors a rerun cannot cure: which S3 answers they are, what to do instead, and
when a run of them means the whole run should stop.

Throttling, 5xx and dropped connections pass: retries, or a rerun, get through.
The codes here do not: a revoked permission, a deleted bucket, expired
credentials answer every copy the same way, however often it is sent. Sending
the rest of the bucket into them only buries the one line that matters under
thousands of identical ones.
"""
from __future__ import annotations

from collections import Counter

from .settings import Settings

#: Consecutive copies failing with an incurable error (none succeeding) that stop the run.
STOP_AFTER = 50

#: Answers to a copy that mean "this object is archived": restore it first. S3 says
#: InvalidObjectState (also for Intelligent-Tiering's archive tiers, which the
#: listing does not show); moto, and older S3 documentation, ObjectNotInActiveTierError.
ARCHIVED_CODES = frozenset({"InvalidObjectState", "ObjectNotInActiveTierError"})

_CREDENTIALS = "check the AWS credentials this runs with (AWS_PROFILE, AWS_ACCESS_KEY_ID)"
_HINTS = {
    "AllAccessDisabled": "all access to the bucket is disabled (by AWS or its owner): ask the "
                         "bucket owner",
    "NoSuchBucket": "a bucket is gone: check that {src} and {dst} still exist",
    "InvalidAccessKeyId": _CREDENTIALS,
    "SignatureDoesNotMatch": _CREDENTIALS + " (the secret key does not match the key id)",
    "ExpiredToken": "the session credentials expired: get new ones (aws sso login, a new role "
                    "session), then rerun",
    "InvalidToken": "the session token is malformed or not valid: get new credentials, then "
                    "rerun",
    "TokenRefreshRequired": "the session token must be refreshed: get new credentials, then "
                            "rerun",
    "AccountProblem": "the AWS account has a problem (billing, suspension): ask AWS support",
    "RequestTimeTooSkewed": "this machine's clock is off: fix it (NTP), then rerun",
}
_ACCESS = ("check the IAM policy (and the bucket policies) for s3:GetObject on {src}/{sp}* "
           "and s3:PutObject on {dst}/{dp}*")
_KMS = ("a KMS key of the source or destination objects is disabled, pending deletion or not "
        "granted to this role: check kms:Decrypt and kms:GenerateDataKey on it")


def is_incurable(code: str) -> bool:
    """An answer that the same request will get again, however often it is sent."""
    if code in _HINTS or code in ("AccessDenied", "Forbidden", "403"):
        return True
    return code.startswith("KMS.") and "Throttl" not in code


def hint(code: str, cfg: Settings | None, copying: bool = True) -> str:
    """What to do about an incurable error, naming this run's buckets and prefixes.
    copying: the error answered a CopyObject (else any request: a listing, a HEAD)."""
    names = dict(src=cfg.source_bucket, sp=cfg.source_prefix, dst=cfg.dest_bucket,
                 dp=cfg.dest_prefix) if cfg else \
        dict(src="the source bucket", sp="", dst="the destination bucket", dp="")
    if code.startswith("KMS."):
        return _KMS
    if code in _HINTS:
        return _HINTS[code].format(**names)
    payer = ("" if cfg is None or cfg.request_payer or code not in ("AccessDenied", "403")
             else "; a Requester Pays bucket answers so without --request-payer")
    if copying:
        return _ACCESS.format(**names) + payer
    return ("check the IAM policy (README, Permissions): s3:ListBucket on {src} and {dst}, "
            "s3:GetObject on {src}/{sp}*, s3:PutObject on {dst}/{dp}*").format(**names) + payer


class Streak:
    """Copies that failed with an incurable error, in the order they were sent, after
    the last one that succeeded.

    Sent order rather than finishing order: a success that was sent earlier but
    finishes later (it was slower) must not hide that everything sent after it
    fails, and a failure sent before the last success says nothing about now.
    So the run stops once STOP_AFTER copies sent after the last success failed
    for good, whatever the timing: at most STOP_AFTER plus the window in flight
    are sent into a wall.
    """

    def __init__(self, limit: int = STOP_AFTER):
        self.limit = limit
        self.last_ok = -1
        self.failures: list[tuple[int, str]] = []  # (sent order, code)

    def succeeded(self, seq: int) -> None:
        if seq > self.last_ok:
            self.last_ok = seq
            self.failures = [f for f in self.failures if f[0] > seq]

    def failed(self, seq: int, code: str) -> None:
        if seq > self.last_ok and is_incurable(code):
            self.failures.append((seq, code))

    @property
    def full(self) -> bool:
        return len(self.failures) >= self.limit

    def reason(self, cfg: Settings | None) -> str:
        codes = Counter(code for _, code in self.failures).most_common()
        hints = list(dict.fromkeys(hint(code, cfg) for code, _ in codes))
        return (f"stopped after {len(self.failures)} copies in a row failed with errors a rerun "
                f"cannot cure ({', '.join(f'{c} {n}' for c, n in codes)}): {'; '.join(hints)}")
