"""Finding the table and column, and the row plan (an index, or a snapshot), on a
real PostgreSQL: names as a user types them, close matches when nothing matches,
INVALID indexes never used, --create-index repairing the index it left invalid."""
from __future__ import annotations

import psycopg2
import pytest
from psycopg2 import sql
from psycopg2.extensions import make_dsn

from conftest import DEST, insert_rows, keys, put, rows, summary
from test_rewrite import PLANS, add, execute, moved, ready, seed


def index_state(conn, name: str):
    """(valid, ready) of an index, or None when there is none."""
    with conn.cursor() as cur:
        cur.execute("SELECT indisvalid, indisready FROM pg_index "
                    "WHERE indexrelid = to_regclass(%s)", (name,))
        got = cur.fetchone()
        return tuple(got) if got else None


def leave_invalid(conn, name: str) -> None:
    """An index as a failed CREATE INDEX CONCURRENTLY leaves it: INVALID."""
    insert_rows(conn, ["dup/x.png", "dup/x.png"])
    with pytest.raises(psycopg2.errors.UniqueViolation):
        execute(conn, f"CREATE UNIQUE INDEX CONCURRENTLY {name} ON avatars (path)")
    execute(conn, "DELETE FROM avatars WHERE path = 'dup/x.png'")
    assert index_state(conn, name)[0] is False


def test_invalid_index_is_never_taken_for_the_row_plan(run, s3, db, capsys):
    names = seed(s3, db, 4)
    leave_invalid(db, "avatars_path_idx")
    assert run() == 0
    assert summary(capsys.readouterr().out)["row_plan"] == "snapshot"
    assert rows(db) == [moved(k) for k in names]


def test_create_index_rebuilds_the_index_it_left_invalid_and_says_so(run, s3, db, capsys):
    names = seed(s3, db, 4)
    leave_invalid(db, "avatars_path_move_idx")
    assert run("--create-index") == 0
    out, err = capsys.readouterr()
    assert "the index avatars_path_move_idx, left INVALID by an earlier --create-index " \
           "that did not finish, is dropped and built again" in err, err
    assert summary(out)["row_plan"] == "index"
    assert index_state(db, "avatars_path_move_idx") == (True, True)
    assert rows(db) == [moved(k) for k in names]


def test_create_index_that_fails_drops_what_it_left_and_takes_the_snapshot(run, s3, db, dsn,
                                                                          capsys):
    """The application has a transaction open on the table; the role's lock_timeout
    cancels the concurrent build waiting for it."""
    names = seed(s3, db, 4)
    insert_rows(db, ["other/app.png"])
    app = psycopg2.connect(dsn)
    execute(app, "UPDATE avatars SET path = 'other/app2.png' WHERE path = 'other/app.png'")
    try:
        assert run("--db", make_dsn(dsn, options="-c lock_timeout=1s"), "--create-index") == 0
    finally:
        app.rollback()
        app.close()
    out, err = capsys.readouterr()
    assert "could not create the index on avatars(path) (canceling statement due to lock " \
           "timeout)" in err, err
    assert summary(out)["row_plan"] == "snapshot"
    assert rows(db) == [moved(k) for k in names] + ["other/app.png"]
    state = index_state(db, "avatars_path_move_idx")
    assert state is None or "drop it with" in err  # dropped, or the run said how
    # the next --create-index builds it, valid
    assert run("--create-index") == 0
    capsys.readouterr()
    assert index_state(db, "avatars_path_move_idx") == (True, True)


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


# --------------------------------------------------------------------------- names


@pytest.fixture
def app_tables(db, s3):
    """app."Avatars" (mixed case, in schema app, off the search path) holding the
    rows, and the seeder's empty public.avatars beside it."""
    execute(db, "CREATE SCHEMA app",
            'CREATE TABLE app."Avatars" (id serial PRIMARY KEY, "Path" varchar)',
            "INSERT INTO app.\"Avatars\" (\"Path\") VALUES ('image/a.png'), ('image/b.png')")
    put(s3, "image/a.png")
    put(s3, "image/b.png")


def app_paths(conn) -> list[str]:
    with conn.cursor() as cur:
        cur.execute('SELECT "Path" FROM app."Avatars" ORDER BY id')
        return [p for (p,) in cur.fetchall()]


@pytest.mark.parametrize("table,column", [
    ('app."Avatars"', '"Path"'),
    ("app.Avatars", "Path"),
    ('"app"."Avatars"', "Path"),
])
def test_table_and_column_as_a_user_types_them(table, column, app_tables, run, s3, db, capsys):
    assert run("--table", table, "--column", column) == 0, capsys.readouterr().err
    assert summary(capsys.readouterr().out)["rows_rewritten"] == 2
    assert app_paths(db) == ["avatar/a.png", "avatar/b.png"]
    assert keys(s3, DEST) == ["avatar/a.png", "avatar/b.png"]
    with db.cursor() as cur:
        cur.execute(sql.SQL("SELECT to_regclass(%s)"), ('app."Avatars_move_journal"',))
        assert cur.fetchone()[0] is not None


def test_unquoted_name_folds_to_lower_case_as_postgresql_does(run, s3, db, capsys):
    names = seed(s3, db, 2)
    assert run("--table", "AVATARS", "--column", "PATH") == 0, capsys.readouterr().err
    assert rows(db) == [moved(k) for k in names]


@pytest.mark.parametrize("table,said", [
    ("Avatar", 'close matches: app."Avatars", public.avatars'),
    ("app.avatar", 'close matches: app."Avatars", public.avatars'),
])
def test_table_not_found_lists_close_matches_and_no_seeder(table, said, app_tables, run, db,
                                                          capsys, copy_requests):
    assert run("--table", table) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"table {table!r} does not exist; {said}" in err, err
    assert "seeder" not in err  # a database with tables is not a fresh test database
    assert copy_requests == [] and app_paths(db) == ["image/a.png", "image/b.png"]


def test_column_not_found_lists_close_matches(app_tables, run, db, capsys):
    assert run("--table", 'app."Avatars"', "--column", "paths") == 2
    err = capsys.readouterr().err
    assert 'has no column \'paths\'; close matches: "Path"; set DB_PATH_COLUMN' in err, err


def test_seeder_suggested_only_on_an_empty_database(run, dsn, capsys):
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        assert run("--table", "avatars") == 2
        err = capsys.readouterr().err
        assert "run seed/seeder.py" in err, err
    finally:
        conn.close()
