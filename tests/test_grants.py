"""What the role may do (avatarmove/grants.py), against a real PostgreSQL: a role or
database that could copy but not finish stops before the first copy and names the
grants; one that loses a grant, or turns read-only, mid-run stops saying what to fix."""
import json
import threading

import psycopg2
import pytest
from psycopg2 import sql

from avatarmove.database import Database
from avatarmove.journal import ensure_journal
from conftest import (DEST, PNG, assert_consistent, insert_rows, journal_exists, keys, put,
                      row_locked, rows, run_backends, wait_until)
from test_database import as_role, settings


# ------------------------------------------- nothing starts that cannot finish
# Each case: a role (or a database) that could copy but not finish the run.
# move.py must stop before the first copy: exit 2, one line naming the grant
# to run, no CopyObject sent, no journal created, no row changed.


def seed(s3, conn, n: int = 6) -> list[str]:
    names = [f"image/p{i:03d}.png" for i in range(n)]
    for k in names:
        put(s3, k, PNG + k.encode())
    insert_rows(conn, names)
    return names


def role_of(limited: Database) -> str:
    return psycopg2.extensions.parse_dsn(limited.cfg.db)["user"]


def create_journal(dsn: str) -> None:
    owner = Database(settings(dsn), "setup")
    owner.preflight()
    ensure_journal(owner)
    owner.close()


def revoke_temporary(conn) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT current_database()")
        cur.execute(sql.SQL("REVOKE TEMPORARY ON DATABASE {} FROM PUBLIC")
                    .format(sql.Identifier(cur.fetchone()[0])))


def database_name(conn) -> str:
    with conn.cursor() as cur:
        cur.execute("SELECT current_database()")
        return cur.fetchone()[0]


JOURNAL_GRANTS = ("SELECT, UPDATE ON avatars", "SELECT, UPDATE ON avatars_move_journal",
                  "USAGE ON SEQUENCE avatars_move_journal_id_seq")
PREFLIGHT = {
    "no UPDATE": dict(
        grants=("SELECT ON avatars", "CREATE ON SCHEMA public"),
        said=['may not UPDATE table "avatars";', "grant it: GRANT UPDATE ON avatars TO {role}"]),
    "no INSERT on the journal": dict(
        journal=True, grants=JOURNAL_GRANTS,
        said=['may not INSERT table "avatars_move_journal"',
              "GRANT INSERT ON avatars_move_journal TO {role}"]),
    "no USAGE on the journal's sequence": dict(
        journal=True, grants=JOURNAL_GRANTS[:1] + ("SELECT, INSERT, UPDATE ON "
                                                   "avatars_move_journal",),
        said=["GRANT USAGE ON SEQUENCE public.avatars_move_journal_id_seq TO {role}"]),
    "no CREATE and no journal": dict(
        grants=("SELECT, UPDATE ON avatars",),
        said=['may not CREATE in schema "public"', "GRANT CREATE ON SCHEMA public TO {role}"]),
    "no TEMPORARY and no index": dict(
        no_temp=True, grants=("SELECT, UPDATE ON avatars", "CREATE ON SCHEMA public"),
        said=["may not create TEMPORARY tables", "GRANT TEMPORARY ON DATABASE {db} TO {role}"]),
    "several at once": dict(
        no_temp=True, grants=("SELECT ON avatars",),
        said=["grant them: GRANT UPDATE ON avatars TO {role}; "
              "GRANT CREATE ON SCHEMA public TO {role}; GRANT TEMPORARY ON DATABASE {db} "
              "TO {role}"]),
}


@pytest.mark.parametrize("case", PREFLIGHT.values(), ids=PREFLIGHT)
def test_a_role_that_could_not_finish_stops_before_the_first_copy(case, run, s3, db, dsn,
                                                                  capsys, copy_requests):
    names = seed(s3, db)
    if case.get("journal"):
        create_journal(dsn)
    if case.get("no_temp"):
        revoke_temporary(db)
    with as_role(db, dsn, *case["grants"], revoke_create=True) as limited:
        assert run("--db", limited.cfg.db) == 2
        role = role_of(limited)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f'move.py: error: role "{role}" may not '), err
    for text in case["said"]:
        assert text.format(role=role, db=database_name(db)) in err, err
    assert copy_requests == [] and keys(s3, DEST) == []
    assert journal_exists(db) == bool(case.get("journal"))
    assert rows(db) == names


def test_without_temporary_an_index_on_the_path_column_is_enough(run, s3, db, dsn, capsys,
                                                                 copy_requests):
    """The snapshot (a TEMP table) is only for a table without an index on the path."""
    names = seed(s3, db)
    with db.cursor() as cur:
        cur.execute("CREATE INDEX ON avatars (path)")
    revoke_temporary(db)
    with as_role(db, dsn, "SELECT, UPDATE ON avatars", "CREATE ON SCHEMA public",
                 revoke_create=True) as limited:
        assert run("--db", limited.cfg.db) == 0, capsys.readouterr().err
    moved = ["avatar/" + k[len("image/"):] for k in names]
    assert keys(s3, DEST) == moved and rows(db) == moved
    assert len(copy_requests) == len(names)


def test_update_granted_on_the_path_column_alone_is_enough(run, s3, db, dsn, capsys):
    names = seed(s3, db)
    with as_role(db, dsn, "SELECT ON avatars", "UPDATE (path) ON avatars",
                 "CREATE ON SCHEMA public", revoke_create=True) as limited:
        assert run("--db", limited.cfg.db) == 0, capsys.readouterr().err
    assert rows(db) == ["avatar/" + k[len("image/"):] for k in names]


def read_only(dsn: str) -> str:
    """A session the way a read replica gives it: every transaction read-only."""
    return psycopg2.extensions.make_dsn(dsn, options="-c default_transaction_read_only=on")


def test_read_only_database_stops_before_the_first_copy_but_dry_run_works(run, s3, db, dsn,
                                                                         capsys, copy_requests):
    names = seed(s3, db)
    assert run("--db", read_only(dsn)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "read-only" in err and "point DB_CONN_STRING at the primary" in err
    assert copy_requests == [] and keys(s3, DEST) == []
    assert not journal_exists(db) and rows(db) == names

    # A dry run only reads: it works on the replica, even without an index
    # (no temp table possible there: it looks rows up by value).
    assert run("--db", read_only(dsn), "--dry-run", "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["would_copy"], plan["would_rewrite_rows"]) == (len(names), len(names))
    assert copy_requests == [] and keys(s3, DEST) == [] and rows(db) == names


# Errors the checks at start could not foresee: the database changes under a
# running run. The run stops with exit 1 and says what to fix, never "rerun to
# resume" (a rerun alone would fail the same way); the rows it wrote are consistent.


def in_background(run, *args: str):
    """move.main() on a thread (moto in-process is process-wide); .result when done."""
    thread = threading.Thread(target=lambda: setattr(thread, "result", run(*args)), daemon=True)
    thread.start()
    return thread


def test_privilege_revoked_during_the_run_exit_1_says_what_to_grant(run, s3, db, dsn, capsys):
    names = seed(s3, db, 12)
    with as_role(db, dsn, "SELECT, UPDATE ON avatars", "CREATE ON SCHEMA public",
                 revoke_create=True) as limited:
        with row_locked(dsn, names[0]):
            t = in_background(run, "--db", limited.cfg.db, "--workers", "1", "--batch-size", "2")
            wait_until(lambda: run_backends(db, waiting=True), "the first batch waits",
                       t.is_alive)
            with db.cursor() as cur:
                cur.execute(f"REVOKE UPDATE ON avatars FROM {role_of(limited)}")
        # The waiting batch gives up its lock wait and, tried again, is refused.
        t.join(120)
    assert t.result == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("move.py: error: database: permission denied for table avatars"), err
    assert "grant it again" in err and "rerun to resume" not in err
    assert assert_consistent(db, s3, names) < len(names)


def test_database_turned_read_only_during_the_run_exit_1_says_where_to_point(run, s3, db, dsn,
                                                                            capsys):
    names = seed(s3, db, 12)
    with row_locked(dsn, names[0]):
        t = in_background(run, "--workers", "1", "--batch-size", "2")
        wait_until(lambda: run_backends(db, waiting=True), "the first batch waits", t.is_alive)
        with db.cursor() as cur:  # a failover: the run reconnects to a read-only server
            cur.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on")
                        .format(sql.Identifier(database_name(db))))
            cur.execute("SELECT pg_terminate_backend(%s)", (run_backends(db)[0],))
        t.join(120)
    assert t.result == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "read-only" in err and "point DB_CONN_STRING at the primary" in err, err
    assert "rerun to resume" not in err
    assert assert_consistent(db, s3, names) < len(names)
