"""The Database against a real PostgreSQL: its journal (created once, by shards
starting together too; upgraded; the grants it needs). Its parts have their own
tests: test_connection, test_grants, test_rowplan, test_rewrite, test_counts."""
import contextlib
import threading
import uuid

import psycopg2
import pytest

from avatarmove.database import Database
from avatarmove.journal import JOURNAL_COLUMNS, ensure_journal
from avatarmove.settings import Settings, UsageError
from conftest import (journal_exists)


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
