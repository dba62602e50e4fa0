"""The Database layer against a real PostgreSQL."""
import contextlib
import json
import threading
import uuid

import psycopg2
import pytest
from psycopg2 import sql

from avatarmove.database import Database
from avatarmove.journal import JOURNAL_COLUMNS, ensure_journal
from avatarmove.settings import Settings, UsageError
from conftest import (DEST, PNG, assert_consistent, insert_rows, journal_exists, keys, put,
                      row_locked, rows, run_backends, wait_until)


def settings(dsn: str) -> Settings:
    return Settings(db=dsn, source_bucket="legacy-s3", dest_bucket="production-s3",
                         source_prefix="image/", dest_prefix="avatar/", table="avatars",
                         column="path")





@contextlib.contextmanager
def as_role(db, dsn: str, *grants: str, revoke_create: bool = False):
    """A Database logged in as a new role holding only the given grants
    ("SELECT, UPDATE ON avatars", ...); the role is dropped afterwards."""
    role = "migrator_" + uuid.uuid4().hex[:8]  # roles are cluster-wide
    with db.cursor() as cur:
        cur.execute(f"CREATE ROLE {role} LOGIN")
        if revoke_create:
            cur.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        for grant in grants:
            cur.execute(f"GRANT {grant} TO {role}")
    limited = Database(settings(psycopg2.extensions.make_dsn(dsn, user=role)), "r")
    try:
        limited.preflight()
        yield limited
    finally:
        limited.close()
        with db.cursor() as cur:
            cur.execute(f"DROP OWNED BY {role}")
            cur.execute(f"DROP ROLE {role}")


def test_shards_starting_together_all_get_the_journal(db, dsn):
    """N shards of a Kubernetes Job start at the same moment: none may fail on
    the race to create the journal table."""
    errors = []

    def start(i):
        d = Database(settings(dsn), f"run-{i}")
        try:
            d.preflight()
            ensure_journal(d)
        except psycopg2.Error as exc:
            errors.append(exc)
        finally:
            d.close()

    for _ in range(5):
        with db.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS avatars_move_journal")
        threads = [threading.Thread(target=start, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert journal_exists(db)
    assert errors == []


def test_existing_journal_needs_no_create_privilege(db, dsn):
    """A migration role without CREATE on the schema works once the journal exists."""
    move_db = Database(settings(dsn), "setup")
    move_db.preflight()
    ensure_journal(move_db)
    move_db.close()
    with as_role(db, dsn, "SELECT, UPDATE ON avatars",
                 "SELECT, INSERT, UPDATE ON avatars_move_journal",
                 "USAGE ON SEQUENCE avatars_move_journal_id_seq", revoke_create=True) as limited:
        ensure_journal(limited)  # must not raise "permission denied for schema public"


OLD_JOURNAL = """CREATE TABLE avatars_move_journal (
    id bigserial PRIMARY KEY, run_id text NOT NULL, old_path text NOT NULL,
    new_path text NOT NULL, rows integer NOT NULL,
    at timestamptz NOT NULL DEFAULT now(), rolled_back_at timestamptz)"""


def journal_columns(conn) -> set[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT column_name FROM information_schema.columns "
                    "WHERE table_name = 'avatars_move_journal'")
        return {name for (name,) in cur.fetchall()}


def test_journal_from_an_earlier_version_gets_its_row_ids_column(db, dsn):
    """A journal made by an earlier move.py (or prepare.sql) had no tids: the
    run adds the column and then journals rewrites, instead of failing on
    every batch."""
    with db.cursor() as cur:
        cur.execute(OLD_JOURNAL)
        cur.execute("INSERT INTO avatars (path) VALUES ('image/a.png')")
    d = Database(settings(dsn), "upgrade")
    ensure_journal(d)
    assert d.rewrite([("image/a.png", "avatar/a.png")]) == {"image/a.png": 1}
    d.close()
    assert journal_columns(db) == JOURNAL_COLUMNS
    with db.cursor() as cur:
        cur.execute("SELECT old_path, cardinality(tids) FROM avatars_move_journal")
        assert cur.fetchall() == [("image/a.png", 1)]


def test_old_journal_the_role_cannot_alter_is_a_clear_usage_error(db, dsn):
    with db.cursor() as cur:
        cur.execute(OLD_JOURNAL)
    with as_role(db, dsn, "SELECT, UPDATE ON avatars",
                 "SELECT, INSERT, UPDATE ON avatars_move_journal") as limited:
        with pytest.raises(UsageError) as exc:
            ensure_journal(limited)
    assert "ADD COLUMN tids tid[]" in str(exc.value) and "owner" in str(exc.value)
    assert "tids" not in journal_columns(db)


def test_no_journal_and_no_create_privilege_says_what_to_grant(db, dsn):
    with as_role(db, dsn, "SELECT, UPDATE ON avatars", revoke_create=True) as limited:
        with pytest.raises(UsageError) as exc:
            ensure_journal(limited)
    assert "grant CREATE on the schema" in str(exc.value)
    assert "deploy/prepare.sql" in str(exc.value)
    assert not journal_exists(db)


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


# --------------------------------------------------------------------------- lookup, rewrite

PLANS = ["index", "snapshot"]


def ready(dsn: str, plan: str, run_id: str = "run-1") -> Database:
    """A Database as a run has it before its first batch, on the given row plan."""
    if plan == "index":
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE INDEX IF NOT EXISTS avatars_path_idx ON avatars (path)")
        conn.close()
    d = Database(settings(dsn), run_id)
    d.preflight()
    d.prepare()
    ensure_journal(d)
    assert d.plan_name == plan
    return d


def paths(conn) -> list:
    with conn.cursor() as cur:
        cur.execute("SELECT path FROM avatars ORDER BY id")
        return [p for (p,) in cur.fetchall()]


def add(conn, *values) -> None:
    with conn.cursor() as cur:
        for v in values:
            cur.execute("INSERT INTO avatars (path) VALUES (%s)", (v,))


def journal_entries(conn) -> list[tuple]:
    """(run, old, new, rows, sorted ctids), sorted: one batch's entries have no order."""
    with conn.cursor() as cur:
        cur.execute("SELECT run_id, old_path, new_path, rows, tids::text[] "
                    "FROM avatars_move_journal")
        return sorted((*e[:4], sorted(e[4])) for e in cur.fetchall())


def ctids(conn, ids) -> list[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT ctid::text FROM avatars WHERE id = ANY(%s)", (ids,))
        return sorted(t for (t,) in cur.fetchall())


@pytest.mark.parametrize("plan", PLANS)
def test_lookup_counts_the_rows_pointing_at_each_key(plan, db, dsn):
    add(db, "image/a.png", "image/a.png", "image/a.png", "avatar/b.png", "image/c.png",
        "image/a.png ", "IMAGE/a.png", "other/d.png", None)
    d = ready(dsn, plan)
    try:
        got = d.lookup(["image/a.png", "avatar/b.png", "image/c.png", "image/none.png",
                        "other/d.png"])
        # exact keys only; a key no row holds is absent. (The snapshot holds only the
        # rows under the two prefixes: a key outside them is never looked up by a run.)
        expected = {"image/a.png": 3, "avatar/b.png": 1, "image/c.png": 1}
        if plan == "index":
            expected["other/d.png"] = 1
        assert got == expected
        assert d.lookup([]) == {}
    finally:
        d.close()


@pytest.mark.parametrize("plan", PLANS)
def test_rewrite_changes_only_rows_still_holding_the_old_key(plan, db, dsn):
    add(db, "image/a.png", "image/a.png", "image/b.png", "image/c.png",  # ids 1-4
        "image/a.png ", "image/A.png", "image/a.pn", "avatar/a.png")      # ids 5-8
    d = ready(dsn, plan)
    try:
        with db.cursor() as cur:  # the application, after the snapshot, before the batch
            cur.execute("UPDATE avatars SET path = 'image/new.png' WHERE id = 3")  # b: moved on
            cur.execute("UPDATE avatars SET path = path WHERE id = 2")  # same value, new ctid
            cur.execute("UPDATE avatars SET path = 'image/c.png' WHERE id = 8")  # a second c
        done = d.rewrite([("image/a.png", "avatar/a.png"), ("image/b.png", "avatar/b.png"),
                          ("image/c.png", "avatar/c.png"), ("image/none.png", "avatar/none.png")])
    finally:
        d.close()
    # b's row no longer held b: left alone; a key that got no row is absent. A row the
    # application pointed at an old key after the snapshot (id 8) is not in it: that
    # plan leaves it to the next run (whose snapshot has it); by index it is found.
    late = "avatar/c.png" if plan == "index" else "image/c.png"
    assert done == {"image/a.png": 2, "image/c.png": 2 if plan == "index" else 1}
    assert paths(db) == ["avatar/a.png", "avatar/a.png", "image/new.png", "avatar/c.png",
                         "image/a.png ", "image/A.png", "image/a.pn", late]


@pytest.mark.parametrize("plan", PLANS)
def test_rewrite_journals_each_key_with_the_rows_it_changed(plan, db, dsn):
    add(db, "image/a.png", "other/x.png", "image/a.png", "image/b.png", "image/gone.png")
    d = ready(dsn, plan, run_id="run-7")
    try:
        assert d.rewrite([("image/a.png", "avatar/a.png"), ("image/b.png", "avatar/b.png"),
                          ("image/none.png", "avatar/none.png")]) == {"image/a.png": 2,
                                                                      "image/b.png": 1}
    finally:
        d.close()
    # one entry per key that changed rows, naming exactly those rows (for --rollback)
    assert journal_entries(db) == [
        ("run-7", "image/a.png", "avatar/a.png", 2, ctids(db, [1, 3])),
        ("run-7", "image/b.png", "avatar/b.png", 1, ctids(db, [4])),
    ]


@pytest.mark.parametrize("plan", PLANS)
def test_rewrite_and_its_journal_entry_commit_together(plan, db, dsn):
    """A journal entry that cannot be written takes its row's change with it: no row
    is ever rewritten without the entry --rollback needs. The other rows of the batch
    are written, each with its entry."""
    add(db, "image/a.png", "image/b.png")
    d = ready(dsn, plan)
    with db.cursor() as cur:  # the journal refuses b's entry (a constraint the test adds)
        cur.execute("ALTER TABLE avatars_move_journal ADD CONSTRAINT no_b "
                    "CHECK (old_path <> 'image/b.png')")
    try:
        done = d.rewrite([("image/a.png", "avatar/a.png"), ("image/b.png", "avatar/b.png")])
        assert done == {"image/a.png": 1}
        assert list(done.refused) == ["image/b.png"]
        assert 'violates check constraint "no_b"' in done.refused["image/b.png"]
    finally:
        d.close()
    assert paths(db) == ["avatar/a.png", "image/b.png"]
    assert [e[1:4] for e in journal_entries(db)] == [("image/a.png", "avatar/a.png", 1)]


def rows_examined(node: dict) -> int:
    """Rows each node of an EXPLAIN ANALYZE plan returned or filtered away, all loops."""
    own = (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)
           + node.get("Rows Removed by Join Filter", 0)) * node.get("Actual Loops", 1)
    return own + sum(rows_examined(child) for child in node.get("Plans", ()))


def test_a_batch_is_matched_to_its_own_rows_not_the_whole_snapshot(db, dsn):
    """On a table spread over many pages (fillfactor stands in for bloat), with
    statistics from before the paths changed, the planner once joined the whole
    table to the whole snapshot, took that for one row, and compared it with every
    key of the batch: 2.5 million rows, 0.7 s of the database's CPU per batch."""
    n, batch = 5000, 500
    with db.cursor() as cur:
        cur.execute("ALTER TABLE avatars SET (fillfactor = 10)")
        cur.execute("INSERT INTO avatars (path) SELECT format('avatar/u%%s.png', i) "
                    "FROM generate_series(1, %s) i", (n,))
        cur.execute("VACUUM ANALYZE avatars")
        cur.execute("UPDATE avatars SET path = replace(path, 'avatar/', 'image/')")
    d = ready(dsn, "snapshot")
    try:
        query, params = d.rewrite_statement(
            [(f"image/u{i}.png", f"avatar/u{i}.png") for i in range(1, batch + 1)], by_tid=True)
        with d.conn, d.conn.cursor() as cur:
            cur.execute(sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) ") + query, params)
            plan = cur.fetchone()[0][0]["Plan"]
    finally:
        d.close()
    assert rows(db).count("avatar/u1.png") == 1
    assert sum(p.startswith("avatar/") for p in rows(db)) == batch
    assert rows_examined(plan) < 5 * n  # a few passes over the snapshot, not one per key


def test_table_counts_rows_left_under_the_source_and_outside_both_prefixes(db, dsn):
    add(db, "image/a.png", "image/b/c.png", "avatar/a.png", "images/x.png", "other/image/y.png",
        "", None)
    d = ready(dsn, "snapshot")
    try:
        assert d.table_counts() == (2, 4)
    finally:
        d.close()
