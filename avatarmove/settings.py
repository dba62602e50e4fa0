"""Settings: flags, then environment variables, then a .env file.

Bad input here is a UsageError: one line for the user, exit code 2, and
nothing has been touched yet.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from dataclasses import dataclass

log = logging.getLogger("move")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
COPY_OBJECT_LIMIT = 5 * 1024 ** 3  # CopyObject refuses sources larger than this
# The storage classes CopyObject's x-amz-storage-class takes (S3 API reference).
STORAGE_CLASSES = ("STANDARD", "REDUCED_REDUNDANCY", "STANDARD_IA", "ONEZONE_IA",
                   "INTELLIGENT_TIERING", "GLACIER", "DEEP_ARCHIVE", "GLACIER_IR", "OUTPOSTS",
                   "EXPRESS_ONEZONE", "SNOW")

#: (env var, flag dest, default)
SETTINGS = [
    ("DB_CONN_STRING", "db", None),
    ("S3_SOURCE_BUCKET_NAME", "source_bucket", "legacy-s3"),
    ("S3_DEST_BUCKET_NAME", "dest_bucket", "production-s3"),
    ("S3_OBJECT_SOURCE_PREFIX", "source_prefix", "image"),
    ("S3_OBJECT_DEST_PREFIX", "dest_prefix", "avatar"),
    ("DB_TABLE", "table", "avatars"),
    ("DB_PATH_COLUMN", "column", "path"),
]


class UsageError(Exception):
    """Bad configuration or environment: one line to the user, exit 2."""


@dataclass
class Settings:
    db: str
    source_bucket: str
    dest_bucket: str
    source_prefix: str
    dest_prefix: str
    table: str
    column: str
    workers: int = 256
    batch_size: int = 500
    max_attempts: int = 10
    retry_mode: str = "standard"
    overwrite: bool = False
    dry_run: bool = False
    delete_source: bool = False
    create_index: bool = False
    shard: tuple[int, int] | None = None
    manifest: str | None = None
    report: str | None = None
    jsonl: str | None = None
    multipart_threshold: int = COPY_OBJECT_LIMIT
    multipart_chunksize: int = 256 * 1024 ** 2
    db_retry_seconds: float = 120.0
    progress: bool = True
    engine: str = "auto"
    json: bool = False
    max_rate: float | None = None
    env_file: str | None = None  # the .env file read, by full path
    lock_wait: float = 30.0  # seconds a row locked by another transaction is waited for
    storage_class: str | None = None  # every copy's class (--storage-class); None: the source's
    request_payer: bool = False  # --request-payer: x-amz-request-payer: requester on every request
    acl: str | None = None  # --acl: the canned ACL the user chose for every copy
    copy_acl: str | None = None  # what copies are sent with, decided by access.decide()


def normalize_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    return prefix + "/" if prefix else ""


def mask_dsn(dsn: str) -> str:
    """The DSN without its password, fit for messages and logs."""
    dsn = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", dsn, flags=re.I)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return mask_dsn(text[0]) if text else type(exc).__name__


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise UsageError(f"--shard {text!r} is not I/N with 0 <= I < N (e.g. --shard 0/4)")
    return int(m.group(1)), int(m.group(2))


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other bad input
        self.exit(EXIT_USAGE, f"{os.path.basename(self.prog)}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number above 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a prefix of a flag is an error, not that flag. Abbreviations
    # would make `--del` mean --delete-source, and a later flag sharing the prefix
    # would silently change what an old command line does.
    p = Parser(
        prog="move.py", allow_abbrev=False,
        description="Copy image/**.png from the legacy bucket to avatar/** in the production "
                    "bucket (server-side), then rewrite the database rows that point at them. "
                    "Safe to interrupt and rerun: it resumes.",
        epilog="Settings come from flags, else environment variables, else a .env file. "
               "S3 credentials, region and endpoint come from boto3's standard chain "
               "(AWS_PROFILE, AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...). Exit codes: 0 done, "
               "1 incomplete: objects failed, conflicted or cannot be copied as they are "
               "(archived, key too long), or the run stopped on an error; the error lines "
               "and the summary say whether a rerun resumes or what to fix first, "
               "2 bad input, 130 interrupted (rerun to resume).")
    g = p.add_argument_group("where")
    g.add_argument("--db", metavar="DSN", help="PostgreSQL DSN (env DB_CONN_STRING; required)")
    g.add_argument("--source-bucket", help="env S3_SOURCE_BUCKET_NAME (default legacy-s3)")
    g.add_argument("--dest-bucket", help="env S3_DEST_BUCKET_NAME (default production-s3)")
    g.add_argument("--source-prefix", help="env S3_OBJECT_SOURCE_PREFIX (default image)")
    g.add_argument("--dest-prefix", help="env S3_OBJECT_DEST_PREFIX (default avatar)")
    g.add_argument("--table", help="env DB_TABLE (default avatars; schema.table allowed)")
    g.add_argument("--column", help="env DB_PATH_COLUMN (default path)")
    g = p.add_argument_group("what")
    g.add_argument("--dry-run", action="store_true",
                   help="change nothing; print the plan (to copy, rows only, done, conflicts); "
                        "with --rollback, what it would restore")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--verify", action="store_true",
                   help="read-only check of buckets and table; exit 0 only when clean")
    m.add_argument("--rollback", nargs="?", const="", metavar="RUN",
                   help="restore the old paths written by run RUN: a run id, or 'latest' (the "
                        "latest run that rewrote rows; refused once it is rolled back)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace destination objects whose content differs (default: conflict)")
    g.add_argument("--delete-source", action="store_true",
                   help="delete each source object once its copy is verified and its rows "
                        "are rewritten")
    g.add_argument("--create-index", action="store_true",
                   help="create an index on the path column (CONCURRENTLY) if there is none")
    g.add_argument("--shard", metavar="I/N",
                   help="only the keys whose stable hash falls in shard I of N (0-based)")
    g.add_argument("--manifest", metavar="CSV",
                   help="take keys from a CSV of bucket,key (S3 Inventory / Batch Operations "
                        "format, URL-encoded keys) instead of listing the bucket")
    g = p.add_argument_group("how")
    g.add_argument("--workers", type=positive_int, default=256,
                   help="ceiling of concurrent copies (default 256, enough to fill a 50 ms link "
                        "at S3's 3,500 writes/s); below it the number adapts: it grows while "
                        "throughput grows and backs off on 503 SlowDown or rising latency")
    g.add_argument("--max-rate", type=positive_number, metavar="N",
                   help="at most N S3 requests per second, copies, listings and checks "
                        "together (default: no cap; a SlowDown lowers the rate either way), "
                        "to leave room under the prefix for the live application")
    g.add_argument("--batch-size", type=positive_int, default=500,
                   help="rows rewritten per transaction (default 500)")
    g.add_argument("--lock-wait", type=positive_number, default=30.0, metavar="SECONDS",
                   help="how long rows another transaction holds locked are tried again, "
                        "while the rest of the run goes on, before they are reported as not "
                        "rewritten (default 30)")
    g.add_argument("--engine", choices=("auto", "crt", "boto3"), default="auto",
                   help="how copies are sent: the AWS Common Runtime (fast, native signing) "
                        "or boto3; auto picks crt when awscrt is installed")
    g.add_argument("--acl", choices=("private", "public-read", "public-read-write",
                                      "authenticated-read", "aws-exec-read",
                                      "bucket-owner-read", "bucket-owner-full-control"),
                   help="canned ACL for every copy (S3 does not copy ACLs). Default: the "
                        "sources' own, found from a sample; a run whose public sources "
                        "would get private copies stops first and says what to do. "
                        "--acl private: owner-only copies are fine")
    g.add_argument("--max-attempts", type=positive_int, default=10,
                   help="attempts per S3 request, with backoff (default 10)")
    g.add_argument("--retry-mode", choices=("standard", "adaptive"), default="standard",
                   help="botocore retry mode (default standard)")
    g.add_argument("--multipart-threshold", type=positive_int, default=COPY_OBJECT_LIMIT,
                   metavar="BYTES", help="multipart copy above this size (default 5 GiB)")
    g.add_argument("--multipart-chunksize", type=positive_int, default=256 * 1024 ** 2,
                   metavar="BYTES", help="part size of multipart copies (default 256 MiB)")
    g.add_argument("--storage-class", choices=STORAGE_CLASSES, metavar="CLASS",
                   help="storage class of every copy (default: each copy keeps its source's "
                        "class, e.g. STANDARD_IA, INTELLIGENT_TIERING, GLACIER_IR)")
    g.add_argument("--request-payer", action="store_true",
                   help="the buckets are Requester Pays and this account pays: send "
                        "x-amz-request-payer: requester with every request")
    g = p.add_argument_group("output")
    g.add_argument("--report", metavar="PATH",
                   help="write a CSV line per object: source_key, dest_key, action, "
                        "rows_rewritten, error (with --verify: one per problem)")
    g.add_argument("--jsonl", metavar="PATH",
                   help="write a JSON object per line: per object, or per problem with "
                        "--verify (see docs/json.md)")
    g.add_argument("--log-file", metavar="PATH", help="also log (with debug detail) to this file")
    g.add_argument("--json", action="store_true",
                   help="print the summary (of a run, dry run, verify or rollback) as one JSON "
                        "object on stdout instead of text; schema in docs/summary.schema.json")
    g.add_argument("-q", "--quiet", action="store_true",
                   help="no progress, only warnings, errors and the summary")
    g.add_argument("--env-file", metavar="PATH",
                   help="read settings from this file (default: .env in the current directory, "
                        "if there is one)")
    return p


def check_output_path(flag: str, path: str | None) -> None:
    """A file the run will write, checked before anything changes: found unwritable
    only when it is opened, the run would stop after taking the lock."""
    if not path:
        return
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a directory; give the path of a file")
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: directory {parent} does not exist; create it or "
                         "choose another path")
    if not os.access(path if os.path.exists(path) else parent, os.W_OK):
        raise UsageError(f"{flag} {path}: not writable by this user; choose another path")


def check_aws_profile() -> None:
    """A named profile that is in neither AWS file fails the first S3 request with
    ProfileNotFound; found here, it is a setting to fix (exit 2), not a fault."""
    import botocore.session

    core = botocore.session.Session()
    name = core.get_config_variable("profile")
    if not name or name in core.available_profiles:
        return
    var = next((v for v in ("AWS_DEFAULT_PROFILE", "AWS_PROFILE") if os.environ.get(v) == name),
               "AWS_PROFILE")
    files = " or ".join(os.path.expanduser(core.get_config_variable(c))
                        for c in ("config_file", "credentials_file"))
    raise UsageError(f"{var}={name!r} names no profile in {files}; set it to one that exists "
                     f"(aws configure list-profiles) or unset it")


def settings_from(args: argparse.Namespace) -> Settings:
    from dotenv import dotenv_values

    if args.env_file and not os.path.isfile(args.env_file):
        raise UsageError(f"--env-file {args.env_file}: no such file")
    env_file = args.env_file or ".env"
    file_values = {}
    args.env_file_read = None  # by full path: a run from another directory reads another .env
    if os.path.isfile(env_file):
        file_values = dotenv_values(env_file)
        args.env_file_read = os.path.abspath(env_file)
    # boto3 reads its own variables from the environment; .env must reach it too.
    for name, value in file_values.items():
        if name.startswith("AWS_") and value is not None:
            os.environ.setdefault(name, value)
    values = {}
    for env, dest, default in SETTINGS:
        flag = getattr(args, dest)
        values[dest] = (flag if flag is not None else
                        os.environ.get(env) or file_values.get(env) or default)
    if not values["db"]:
        raise UsageError("no database given: set DB_CONN_STRING (in the environment or .env) "
                         "or pass --db")
    for dest in ("source_bucket", "dest_bucket", "table", "column"):
        if not values[dest].strip():
            raise UsageError(f"--{dest.replace('_', '-')} must not be empty")
    values["source_prefix"] = normalize_prefix(values["source_prefix"])
    if not values["source_prefix"]:  # would take every .png in the bucket
        raise UsageError("--source-prefix must not be empty")
    values["dest_prefix"] = normalize_prefix(values["dest_prefix"])
    if args.manifest and not os.path.isfile(args.manifest):
        raise UsageError(f"manifest {args.manifest} does not exist")
    if args.rollback == "":
        raise UsageError("--rollback needs the run to undo: a run id, or 'latest'; "
                         "`--rollback latest --dry-run` shows the runs and changes nothing")
    if args.dry_run and args.verify:
        raise UsageError("--dry-run is not allowed with --verify: --verify changes nothing "
                         "already")
    check_output_path("--report", args.report)
    check_output_path("--jsonl", args.jsonl)
    check_aws_profile()
    return Settings(
        **values, workers=args.workers, batch_size=args.batch_size,
        max_attempts=args.max_attempts, retry_mode=args.retry_mode, overwrite=args.overwrite,
        dry_run=args.dry_run, delete_source=args.delete_source, create_index=args.create_index,
        shard=parse_shard(args.shard) if args.shard else None, manifest=args.manifest,
        report=args.report, jsonl=args.jsonl, multipart_threshold=args.multipart_threshold,
        multipart_chunksize=max(args.multipart_chunksize, 5 * 1024 ** 2),
        progress=not args.quiet, engine=args.engine, json=args.json, max_rate=args.max_rate,
        env_file=args.env_file_read, lock_wait=args.lock_wait,
        storage_class=args.storage_class, request_payer=args.request_payer, acl=args.acl)


def setup_logging(quiet: bool, log_file: str | None) -> None:
    check_output_path("--log-file", log_file)
    log.handlers.clear()
    log.setLevel(logging.DEBUG)
    log.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    # Per-object lines past the first few of their kind are for the log file only (Reporter).
    console.addFilter(lambda record: getattr(record, "terminal", True))
    log.addHandler(console)
    if log_file:
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(message)s"))
        log.addHandler(fh)
