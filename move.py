#!/usr/bin/env python3
"""Move avatar PNGs from a legacy S3 bucket to a production bucket and rewrite
the database paths that point at them.

For every object: copy server-side first, then rewrite the rows with a
compare-and-set, so a row only ever points at an object that exists. A rerun
resumes: what is done is skipped, what is half-done is finished.

This file is the command. The stages live in the avatarmove package, one
module each, in the order the data goes through them: settings, listing,
planning, copying, database (connection, grants, rowplan, rewrite, counts),
journal, run, report, verify, rollback.
"""
from __future__ import annotations

import os
import sys

import psycopg2
from botocore.exceptions import (BotoCoreError, ClientError, NoCredentialsError,
                                 PartialCredentialsError, ProfileNotFound)

from avatarmove.copying import (S3RequestError, aws_session, describe_error, error_code,
                                make_s3_client)
from avatarmove.incurable import hint, is_incurable
from avatarmove.pacing import Pacer, RequestPath
from avatarmove.connection import connection_lost, what_to_fix
from avatarmove.lock import LockLost
from avatarmove.rollback import rollback
from avatarmove.run import Interrupt, run_migration
from avatarmove.settings import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, UsageError,
                                 build_parser, first_line, log, mask_dsn, settings_from,
                                 setup_logging)
from avatarmove.verify import verify


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    interrupt = Interrupt()
    cfg = None
    try:
        setup_logging(args.quiet, args.log_file)
        cfg = settings_from(args)
        interrupt.install()
        path = RequestPath(Pacer(max_rate=cfg.max_rate), cfg.max_attempts)
        session = aws_session()  # one credential chain for the boto3 client and the CRT
        # One attempt per call: the request path retries, paces and observes every one.
        s3 = path.client(make_s3_client(1, cfg.retry_mode, pool=cfg.workers + 8,
                                        session=session, request_payer=cfg.request_payer))
        if args.verify:
            return verify(s3, cfg)
        if args.rollback:
            return rollback(s3, cfg, args.rollback)
        return run_migration(s3, cfg, args.quiet, interrupt.event, session)
    except UsageError as exc:
        read = getattr(args, "env_file_read", None)  # a setting may have come from there
        print(f"move.py: error: {exc}" + (f" (settings read from {read})" if read else ""),
              file=sys.stderr)
        return EXIT_USAGE
    except (NoCredentialsError, PartialCredentialsError):
        print("move.py: error: no AWS credentials found; set AWS_PROFILE or AWS_ACCESS_KEY_ID "
              "and AWS_SECRET_ACCESS_KEY (see .env.example)", file=sys.stderr)
        return EXIT_USAGE
    except ProfileNotFound as exc:  # settings_from checks first; this is the backstop
        print(f"move.py: error: AWS_PROFILE: {exc}; set it to a profile that exists "
              "(aws configure list-profiles) or unset it", file=sys.stderr)
        return EXIT_USAGE
    except LockLost as exc:
        print(f"move.py: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except psycopg2.Error as exc:
        log.debug("database error", exc_info=True)  # the traceback, for the log file only
        fix = what_to_fix(exc)
        if fix:  # a rerun alone would fail the same way: say what to fix, not "rerun"
            print(f"move.py: error: database: {first_line(exc)}: {fix}", file=sys.stderr)
            return EXIT_FAILED
        if interrupt.event.is_set():
            what = "unreachable" if connection_lost(exc) else "busy (canceled)"
            print(f"move.py: interrupted while the database was {what} "
                  f"({first_line(exc)}): the rows of the last batch stay on their sources, "
                  "whose objects still exist; rerun to resume", file=sys.stderr)
            return EXIT_INTERRUPTED
        print(f"move.py: error: database: {first_line(exc)}; rerun to resume", file=sys.stderr)
        return EXIT_FAILED
    except (ClientError, BotoCoreError, S3RequestError) as exc:
        code = error_code(exc)
        # A revoked permission or a deleted bucket answers a rerun the same way.
        then = (f"a rerun cannot cure this: {hint(code, cfg, copying=False)}"
                if is_incurable(code) else "rerun to resume")
        print(f"move.py: error: S3: {mask_dsn(describe_error(exc))}; {then}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"move.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        interrupt.uninstall()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if code == EXIT_INTERRUPTED:
        os._exit(code)  # don't wait for copies abandoned in flight
    sys.exit(code)
