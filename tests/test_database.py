"""The Database layer against a real PostgreSQL."""
import contextlib
import threading
import uuid

import psycopg2
import pytest

from avatarmove.database import Database
from avatarmove.journal import JOURNAL_COLUMNS, ensure_journal
from avatarmove.settings import Settings, UsageError
from conftest import journal_exists


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
    """A journal entry that cannot be written takes the row changes of its batch
    with it: no row is ever rewritten without the entry --rollback needs."""
    add(db, "image/a.png", "image/b.png")
    d = ready(dsn, plan)
    with db.cursor() as cur:  # the journal refuses b's entry (a constraint the test adds)
        cur.execute("ALTER TABLE avatars_move_journal ADD CONSTRAINT no_b "
                    "CHECK (old_path <> 'image/b.png')")
    try:
        with pytest.raises(psycopg2.errors.CheckViolation):
            d.rewrite([("image/a.png", "avatar/a.png"), ("image/b.png", "avatar/b.png")])
        assert paths(db) == ["image/a.png", "image/b.png"]  # a's change went too
        assert journal_entries(db) == []
        # the connection is usable again, and a batch the journal takes commits
        assert d.rewrite([("image/a.png", "avatar/a.png")]) == {"image/a.png": 1}
    finally:
        d.close()
    assert paths(db) == ["avatar/a.png", "image/b.png"]
    assert [e[1:4] for e in journal_entries(db)] == [("image/a.png", "avatar/a.png", 1)]


def test_table_counts_rows_left_under_the_source_and_outside_both_prefixes(db, dsn):
    add(db, "image/a.png", "image/b/c.png", "avatar/a.png", "images/x.png", "other/image/y.png",
        "", None)
    d = ready(dsn, "snapshot")
    try:
        assert d.table_counts() == (2, 4)
    finally:
        d.close()
