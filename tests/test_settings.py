"""Bad input and configuration, as the user meets them.

Every bad input: exit 2, exactly one line on stderr starting 'move.py: error:',
no traceback, and nothing changed (no copy, no row rewritten, no journal).
The whole table runs in-process (move.main against mock_aws); the cases a user
is likeliest to hit also run as a real subprocess against moto's HTTP server.
Then which setting wins (flag, environment, .env), and --help.
"""
from __future__ import annotations

import socket
import subprocess
import sys

import psycopg2
import pytest

import move
from conftest import (DEST, PNG, ROOT, SOURCE, fake_aws_env, insert_rows, journal_exists, keys,
                      listing, put, rows)

SECRET = "Sup3r-s3cret-pw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]








def state(client, conn) -> tuple:
    """Everything a run could change."""
    return listing(client, SOURCE), listing(client, DEST), rows(conn), journal_exists(conn)


def fill(client, conn) -> None:
    put(client, "image/a.png", PNG + b"a")
    put(client, "image/sub/b.png", PNG + b"b")
    insert_rows(conn, ["image/a.png", "image/sub/b.png", "image/sub/b.png"])


def assert_one_error_line(code: int, out: str, err: str, fragment: str) -> None:
    assert code == 2, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in err and "Traceback" not in out
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line:\n{err}"
    assert err.startswith("move.py: error: "), err
    assert fragment in err, f"{fragment!r} not in:\n{err}"


# id: (arguments, environment, files in the working directory, expected in the message)
BAD = {
    "no-db": ([], {"DB_CONN_STRING": ""}, {}, "no database given"),
    "db-unreachable": ([], {"DB_CONN_STRING":
                            "postgresql://mover:" + SECRET + "@127.0.0.1:{port}/app"},
                       {}, "cannot connect to the database postgresql://mover:***@127.0.0.1:"),
    "db-unreachable-keywords": ([], {"DB_CONN_STRING": "host=127.0.0.1 port={port} user=mover "
                                     "password=" + SECRET + " dbname=app"},
                                {}, "cannot connect to the database"),
    "db-malformed": ([], {"DB_CONN_STRING": "this is not a dsn"}, {},
                     "cannot connect to the database"),
    "table-missing": (["--table", "nosuch"], {}, {}, "table 'nosuch' does not exist"),
    "column-missing": (["--column", "nosuch"], {}, {}, "has no column 'nosuch'"),
    "source-bucket-missing": (["--source-bucket", "no-such-legacy"], {}, {},
                              "source bucket 'no-such-legacy' does not exist"),
    "dest-bucket-missing": (["--dest-bucket", "no-such-prod"], {}, {},
                            "destination bucket 'no-such-prod' does not exist"),
    "dest-bucket-missing-env": ([], {"S3_DEST_BUCKET_NAME": "no-such-prod"}, {},
                                "destination bucket 'no-such-prod' does not exist"),
    # checked at the same time, reported in this order whichever answers first
    "source-bucket-and-table-missing": (["--source-bucket", "no-such-legacy", "--table",
                                         "nosuch"], {}, {},
                                        "source bucket 'no-such-legacy' does not exist"),
    "dest-bucket-empty": (["--dest-bucket", " "], {}, {}, "--dest-bucket must not be empty"),
    "shard-5/4": (["--shard", "5/4"], {}, {}, "--shard '5/4'"),
    "shard-4/4": (["--shard", "4/4"], {}, {}, "--shard '4/4'"),
    "shard-x": (["--shard", "x"], {}, {}, "--shard 'x'"),
    "shard-0/0": (["--shard", "0/0"], {}, {}, "--shard '0/0'"),
    "workers-0": (["--workers", "0"], {}, {}, "argument --workers: '0' must be at least 1"),
    "workers-x": (["--workers", "x"], {}, {}, "argument --workers: 'x' is not a whole number"),
    "max-rate-0": (["--max-rate", "0"], {}, {},
                   "argument --max-rate: '0' must be a number above 0"),
    "max-rate-negative": (["--max-rate", "-5"], {}, {},
                          "argument --max-rate: '-5' must be a number above 0"),
    "max-rate-x": (["--max-rate", "fast"], {}, {}, "argument --max-rate: 'fast' is not a number"),
    "max-rate-nan": (["--max-rate", "nan"], {}, {},
                     "argument --max-rate: 'nan' must be a number above 0"),
    "max-rate-inf": (["--max-rate", "inf"], {}, {},
                     "argument --max-rate: 'inf' must be a number above 0"),
    "engine-unknown": (["--engine", "fast"], {}, {}, "argument --engine: invalid choice"),
    "dry-run-and-verify": (["--dry-run", "--verify"], {}, {},
                           "--dry-run is not allowed with --verify"),
    "verify-and-rollback": (["--verify", "--rollback", "latest"], {}, {},
                            "not allowed with argument"),
    # a prefix of a flag is not that flag: --del must not mean --delete-source
    "abbreviated-flag": (["--del"], {}, {}, "unrecognized arguments: --del"),
    "abbreviated-flags": (["--over", "--worker", "8"], {}, {},
                          "unrecognized arguments: --over --worker 8"),
    "rollback-without-run": (["--rollback"], {}, {}, "--rollback needs the run to undo"),
    "report-dir-missing": (["--report", "/nonexistent/dir/r.csv"], {}, {},
                           "--report /nonexistent/dir/r.csv: directory /nonexistent/dir does "
                           "not exist"),
    "report-is-a-directory": (["--report", "."], {}, {}, "--report . is a directory"),
    "log-file-dir-missing": (["--log-file", "nodir/move.log"], {}, {},
                             "--log-file nodir/move.log: directory "),
    "env-file-missing": (["--env-file", "missing.env"], {}, {},
                         "--env-file missing.env: no such file"),
    "aws-profile-missing": ([], {"AWS_PROFILE": "nope"}, {},
                            "AWS_PROFILE='nope' names no profile in /nonexistent or "
                            "/nonexistent"),
    # the error names the .env it read: the bad setting may have come from there
    "aws-profile-missing-in-dotenv": ([], {}, {".env": b"AWS_PROFILE=nope\n"},
                                      "AWS_PROFILE='nope' names no profile"),
    "dotenv-named-in-error": ([], {}, {".env": b"S3_SOURCE_BUCKET_NAME=no-such-legacy\n"},
                              "source bucket 'no-such-legacy' does not exist; check the bucket "
                              "name and AWS_ENDPOINT_URL/region (settings read from "),
    "manifest-missing": (["--manifest", "missing.csv"], {}, {},
                         "manifest missing.csv does not exist"),
    "manifest-bad-header": (["--manifest", "m.csv"], {},
                            {"m.csv": b"Bucket;Key\nlegacy-s3;image/a.png\n"},
                            "m.csv:1: expected 'bucket,key'"),
    "manifest-short-row": (["--manifest", "m.csv"], {},
                           {"m.csv": b"legacy-s3,image/a.png\nlegacy-s3\n"},
                           "m.csv:2: expected 'bucket,key'"),
    "manifest-other-bucket": (["--manifest", "m.csv"], {},
                              {"m.csv": b"bucket,key\nlegacy-s3,image/a.png\n"
                                        b"production-s3,image/sub/b.png\n"},
                              "m.csv:3: bucket 'production-s3' is not the source bucket"),
    "manifest-not-utf8": (["--manifest", "m.csv"], {},
                          {"m.csv": b"legacy-s3,image/a.png\nlegacy-s3,image/\xff.png\n"},
                          "is not a UTF-8 CSV"),
    "manifest-is-a-directory": (["--manifest", "."], {}, {}, "manifest . does not exist"),
    "same-bucket-same-prefix": (["--dest-bucket", SOURCE, "--dest-prefix", "image"], {}, {},
                                "source and destination overlap"),
    "same-bucket-nested-prefix": (["--dest-bucket", SOURCE, "--dest-prefix", "image/sub"], {},
                                  {}, "source and destination overlap"),
    "same-bucket-source-inside-dest": (["--dest-bucket", SOURCE, "--source-prefix",
                                        "avatar/old", "--dest-prefix", "avatar"], {}, {},
                                       "source and destination overlap"),
    "unknown-flag": (["--frobnicate"], {}, {}, "unrecognized arguments: --frobnicate"),
    "source-prefix-empty": (["--source-prefix", ""], {}, {}, "--source-prefix must not be empty"),
    "source-prefix-slash": (["--source-prefix", "/"], {}, {},
                            "--source-prefix must not be empty"),
}

# the ones a user most likely meets first, also through a real process and HTTP
SUBPROCESS = ["no-db", "db-unreachable", "source-bucket-missing", "unknown-flag",
              "abbreviated-flags", "aws-profile-missing-in-dotenv", "report-dir-missing"]


def main(*args: str) -> int:
    """move.main() as `python move.py` runs it: argparse's exit becomes the exit code.
    --engine boto3: mock_aws patches botocore only."""
    try:
        return move.main(["--engine", "boto3", *args])
    except SystemExit as exc:
        return exc.code


def prepare(case: str, tmp_path) -> tuple[list[str], dict[str, str]]:
    args, env, files, _ = BAD[case]
    port = free_port()
    env = {k: v.format(port=port) for k, v in env.items()}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return list(args), env


class TestBadInputInProcess:
    """One moto and one database for the whole table: a bad input changes nothing, so
    every case starts from the same state (and checks that it still is)."""

    @pytest.fixture(scope="class")
    def world(self, pg):
        from moto import mock_aws

        dsn = pg.new_database()
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE avatars (id SERIAL PRIMARY KEY, path VARCHAR)")
        with pytest.MonkeyPatch.context() as mp:
            fake_aws_env(mp)
            with mock_aws():
                client = move.make_s3_client()
                client.create_bucket(Bucket=SOURCE)
                client.create_bucket(Bucket=DEST)
                fill(client, conn)
                yield client, conn, dsn
        conn.close()
        pg.drop_database(dsn)

    @pytest.mark.parametrize("case", list(BAD))
    def test_bad_input(self, case, world, tmp_path, monkeypatch, capsys):
        client, conn, dsn = world
        before = state(client, conn)
        monkeypatch.chdir(tmp_path)
        args, env = prepare(case, tmp_path)
        monkeypatch.setenv("DB_CONN_STRING", dsn)
        monkeypatch.setenv("AWS_PROFILE", "")  # restored after: a .env's AWS_* reach os.environ
        monkeypatch.delenv("AWS_PROFILE")
        for name, value in env.items():
            monkeypatch.setenv(name, value)

        code = main(*args)
        out, err = capsys.readouterr()

        assert_one_error_line(code, out, err, BAD[case][3])
        assert SECRET not in err
        assert state(client, conn) == before


@pytest.mark.slow
@pytest.mark.parametrize("case", SUBPROCESS)
def test_bad_input_as_a_subprocess(case, cli, db, tmp_path):
    client = move.make_s3_client()
    fill(client, db)
    before = state(client, db)
    args, env = prepare(case, tmp_path)

    p = cli(*args, env=env)

    assert_one_error_line(p.code, p.out, p.err, BAD[case][3])
    assert SECRET not in p.err
    assert state(client, db) == before


@pytest.mark.slow
def test_no_aws_credentials(cli, db, tmp_path):
    client = move.make_s3_client()
    fill(client, db)
    before = state(client, db)
    p = cli(env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
                 "AWS_EC2_METADATA_DISABLED": "true"})
    assert_one_error_line(p.code, p.out, p.err, "no AWS credentials found")
    assert state(client, db) == before


def test_wrong_aws_credentials(s3, db, dsn, tmp_path, monkeypatch, capsys):
    """moto checks the access key against its IAM when IAM authentication is on."""
    try:
        from moto.core.authorization import enable_iam_authentication
    except ImportError:
        pytest.skip("this moto cannot check credentials")
    fill(s3, db)
    before = state(s3, db)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")

    with enable_iam_authentication():
        code = main("--db", dsn)
    out, err = capsys.readouterr()

    assert_one_error_line(code, out, err, "source bucket 'legacy-s3'")
    assert "InvalidAccessKeyId" in err or "no access" in err
    assert "wrong-secret" not in err
    assert state(s3, db) == before


# --------------------------------------------------------------------------- precedence

BUCKETS = ["dotenv-bucket", "env-bucket", "flag-bucket", "envfile-bucket"]
DOTENV = "S3_DEST_BUCKET_NAME=dotenv-bucket\n"

PRECEDENCE = {
    # files, environment, flags, the destination bucket that must be used
    "dotenv-in-cwd": ({".env": DOTENV + "DB_CONN_STRING='{dsn}'\n"}, {"DB_CONN_STRING": ""}, [],
                      "dotenv-bucket"),
    "env-beats-dotenv": ({".env": DOTENV}, {"S3_DEST_BUCKET_NAME": "env-bucket"}, [],
                         "env-bucket"),
    "flag-beats-env-and-dotenv": ({".env": DOTENV}, {"S3_DEST_BUCKET_NAME": "env-bucket"},
                                  ["--dest-bucket", "flag-bucket"], "flag-bucket"),
    "env-file-instead-of-dotenv": ({".env": DOTENV,
                                    "conf.env": "S3_DEST_BUCKET_NAME=envfile-bucket\n"}, {},
                                   ["--env-file", "conf.env"], "envfile-bucket"),
}


@pytest.mark.parametrize("case", list(PRECEDENCE))
def test_config_precedence(case, s3, db, dsn, tmp_path, monkeypatch, capsys):
    files, env, flags, expected = PRECEDENCE[case]
    for bucket in BUCKETS:
        s3.create_bucket(Bucket=bucket)
    fill(s3, db)
    for name, content in files.items():
        (tmp_path / name).write_text(content.replace("{dsn}", dsn))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DB_CONN_STRING", dsn)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    code = main("--quiet", *flags)

    assert code == 0, capsys.readouterr()
    for bucket in BUCKETS + [DEST]:
        want = ["avatar/a.png", "avatar/sub/b.png"] if bucket == expected else []
        assert keys(s3, bucket) == want, bucket
    assert rows(db) == ["avatar/a.png", "avatar/sub/b.png", "avatar/sub/b.png"]


@pytest.mark.slow
def test_help_exits_0_and_changes_nothing(cli, db, tmp_path):
    client = move.make_s3_client()
    fill(client, db)
    before = state(client, db)
    p = cli("--help")
    assert p.code == 0
    assert p.err == ""
    assert p.out.startswith("usage: move.py ")
    for flag in ("--db", "--source-bucket", "--dest-bucket", "--shard", "--manifest",
                 "--overwrite", "--create-index", "--env-file"):
        assert flag in p.out
    assert "Exit codes: 0 done" in " ".join(p.out.split())
    assert state(client, db) == before


@pytest.mark.slow
def test_help_needs_no_configuration(tmp_path):
    """--help works before anything is set up: no DSN, no credentials, no server."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, str(ROOT / "move.py"), "--help"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "" and p.stdout.startswith("usage: move.py ")
