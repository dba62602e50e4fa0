"""Rows the database will not rewrite (avatarmove/database.py's rewrite), on a real
PostgreSQL: a column too narrow for the new path, a unique index, a trigger that
raises or skips the row, a row-level security policy, a row another transaction
keeps locked, a statement or lock timeout. Each affects its own row alone: named
by key with the database's reason, counted, left on its source (kept even with
--delete-source), and the run goes on and exits 1 saying what to fix.
"""
from __future__ import annotations

import csv
import threading
import time

import psycopg2
import pytest
from psycopg2 import sql
from psycopg2.extensions import make_dsn

from avatarmove.database import Database
from avatarmove.journal import ensure_journal
from conftest import DEST, PNG, SOURCE, insert_rows, keys, put, rows, summary, wait_until
from test_database import as_role, settings


def seed(s3, conn, n: int = 6, long_at: int | None = None) -> list[str]:
    """n objects with one row each; the one at long_at has a 255-character path, so
    its new path (avatar/ is one character longer than image/) is 256."""
    names = [f"image/p{i:03d}.png" for i in range(n)]
    if long_at is not None:
        names[long_at] = "image/" + "x" * (255 - len("image/") - len(".png")) + ".png"
    for k in names:
        put(s3, k, PNG + k.encode())
    insert_rows(conn, names)
    return names


def moved(key: str) -> str:
    return "avatar/" + key[len("image/"):]


def execute(conn, *statements: str) -> None:
    with conn.cursor() as cur:
        for statement in statements:
            cur.execute(statement)


def report(path) -> dict[str, tuple[str, str]]:
    with open(path, newline="") as f:
        return {r["source_key"]: (r["action"], r["error"]) for r in csv.DictReader(f)}


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def test_path_too_long_for_the_column_stops_only_its_row(run, s3, db, capsys, tmp_path,
                                                          copy_requests):
    execute(db, "ALTER TABLE avatars ALTER COLUMN path TYPE varchar(255)")
    names = seed(s3, db, 6, long_at=2)
    long = names[2]
    assert len(moved(long)) == 256

    # The dry run says so first: in its checks, and for the key itself.
    assert run("--dry-run") == 0
    out, err = capsys.readouterr()
    assert "1 row(s) under image/ would get a path longer than path allows " \
           "(character varying(255)" in err, err
    assert f"row would not be rewritten: {long}: value too long for type character " \
           "varying(255)" in err, err
    plan = summary(out)
    assert (plan["not_rewritten"], plan["would_rewrite_rows"]) == (1, 5)

    # --batch-size 1: the rows after it in listing order are written all the same.
    rep = tmp_path / "report.csv"
    assert run("--batch-size", "1", "--report", str(rep), "--delete-source") == 1
    out, err = capsys.readouterr()
    s = summary(out)
    assert (s["copied"], s["not_rewritten"], s["rows_rewritten"]) == (5, 1, 5)
    assert s["not_rewritten_by_reason"] == {
        "value too long for type character varying(255)": 1}
    assert f"row not rewritten: {long}: value too long for type character varying(255)" in err
    last = last_line(err)
    assert last.startswith("move.py: incomplete: the rows of 1 object were not rewritten: "
                           "value too long for type character varying(255) (1)"), err
    assert "widen the column" in last and "rerun to resume" not in err
    assert rows(db) == [long if k == long else moved(k) for k in names]
    assert report(rep)[long] == ("row-not-rewritten",
                                 "value too long for type character varying(255)")
    # its copy exists, and its source, which its row still points at, is kept
    assert moved(long) in keys(s3, DEST)
    assert keys(s3, SOURCE) == [long]

    # A rerun does only what is left: no copy, the same row named again.
    copy_requests.clear()
    assert run() == 1
    out, err = capsys.readouterr()
    s = summary(out)
    assert (s["copied"], s["rows_rewritten"], s["not_rewritten"]) == (0, 0, 1)
    assert copy_requests == []


def test_new_path_a_unique_index_already_holds(run, s3, db, capsys):
    names = seed(s3, db, 4)
    clash = names[1]
    execute(db, "CREATE UNIQUE INDEX avatars_path_key ON avatars (path)")
    insert_rows(db, [moved(clash)])  # another row already points at the new key

    assert run("--dry-run") == 0
    out, err = capsys.readouterr()
    assert "1 row(s) under image/ would get a path another row already holds, which the " \
           "unique index avatars_path_key refuses" in err, err
    assert f"row would not be rewritten: {clash}: duplicate key value violates unique " \
           'constraint "avatars_path_key"' in err, err

    assert run() == 1
    out, err = capsys.readouterr()
    s = summary(out)
    assert (s["rows_rewritten"], s["not_rewritten"]) == (3, 1)
    assert f'row not rewritten: {clash}: duplicate key value violates unique constraint ' \
           '"avatars_path_key"' in err, err
    assert rows(db) == [clash if k == clash else moved(k) for k in names] + [moved(clash)]


def test_trigger_that_raises_for_one_row_stops_only_that_row(run, s3, db, capsys):
    names = seed(s3, db, 8)
    execute(db, """
        CREATE FUNCTION moderation() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF OLD.path = 'image/p003.png' THEN
            RAISE EXCEPTION 'avatar % is locked by moderation', OLD.id;
          END IF;
          RETURN NEW;
        END $$""",
            "CREATE TRIGGER moderation BEFORE UPDATE ON avatars FOR EACH ROW "
            "EXECUTE FUNCTION moderation()")
    assert run() == 1
    out, err = capsys.readouterr()
    s = summary(out)
    assert (s["rows_rewritten"], s["not_rewritten"]) == (7, 1)
    assert "row not rewritten: image/p003.png: avatar 4 is locked by moderation" in err, err
    assert rows(db) == [k if k == "image/p003.png" else moved(k) for k in names]
    # the rerun stops at nothing either
    assert run() == 1
    assert summary(capsys.readouterr().out)["not_rewritten"] == 1


@pytest.mark.parametrize("row_plan", ["index", "snapshot"])
def test_trigger_that_skips_a_row_is_reported_not_counted_as_done(row_plan, run, s3, db,
                                                                   capsys, tmp_path):
    names = seed(s3, db, 5)
    if row_plan == "index":
        execute(db, "CREATE INDEX ON avatars (path)")
    execute(db, """
        CREATE FUNCTION keep_p001() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF OLD.path = 'image/p001.png' THEN RETURN NULL; END IF;
          RETURN NEW;
        END $$""",
            "CREATE TRIGGER keep_p001 BEFORE UPDATE ON avatars FOR EACH ROW "
            "EXECUTE FUNCTION keep_p001()")
    rep = tmp_path / "report.csv"
    assert run("--report", str(rep), "--delete-source") == 1
    out, err = capsys.readouterr()
    s = summary(out)
    assert (s["copied"], s["rows_rewritten"], s["not_rewritten"]) == (4, 4, 1)
    assert s["row_plan"] == row_plan
    assert "row not rewritten: image/p001.png: the database left the row as it was, without " \
           "an error: a BEFORE UPDATE trigger (keep_p001) returned NULL for it" in err, err
    assert report(rep)["image/p001.png"][0] == "row-not-rewritten"
    assert rows(db) == [k if k == "image/p001.png" else moved(k) for k in names]
    assert keys(s3, SOURCE) == ["image/p001.png"]  # its row still points at it


def test_row_level_security_check_refuses_some_new_paths(run, s3, db, dsn, capsys):
    names = seed(s3, db, 5)
    execute(db, "ALTER TABLE avatars ENABLE ROW LEVEL SECURITY",
            "CREATE POLICY see ON avatars FOR SELECT USING (true)",
            "CREATE POLICY move ON avatars FOR UPDATE USING (true) "
            "WITH CHECK (path <> 'avatar/p002.png')")
    with as_role(db, dsn, "SELECT, UPDATE ON avatars", "CREATE ON SCHEMA public",
                 "TEMPORARY ON DATABASE " + db.info.dbname) as limited:
        assert run("--db", limited.cfg.db) == 1
    out, err = capsys.readouterr()
    s = summary(out)
    assert (s["rows_rewritten"], s["not_rewritten"]) == (4, 1)
    assert 'row not rewritten: image/p002.png: new row violates row-level security policy ' \
           'for table "avatars"' in err, err
    assert "lost a privilege" not in err
    assert rows(db) == [k if k == "image/p002.png" else moved(k) for k in names]


# --------------------------------------------------------------------------- locks, timeouts


def in_background(run, *args: str):
    """move.main() on a thread (moto in-process is process-wide); .result when done."""
    thread = threading.Thread(target=lambda: setattr(thread, "result", run(*args)), daemon=True)
    thread.start()
    return thread


def hold_rows(dsn: str, *paths: str):
    """An application transaction holding rows FOR UPDATE (rolled back by .close())."""
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM avatars WHERE path = ANY(%s) FOR UPDATE", (list(paths),))
    return conn


@pytest.mark.parametrize("row_plan", ["index", "snapshot"])
def test_rows_locked_for_a_while_delay_only_themselves(row_plan, run, s3, db, dsn, capsys):
    names = seed(s3, db, 30)
    if row_plan == "index":
        execute(db, "CREATE INDEX ON avatars (path)")
    held = names[:3]
    app = hold_rows(dsn, *held)
    try:
        t = in_background(run, "--batch-size", "5", "--workers", "2")
        # everything else is copied and rewritten while the three are held
        wait_until(lambda: sum(p.startswith("avatar/") for p in rows(db)) == 27,
                   "the other rows are rewritten", t.is_alive)
        assert len(keys(s3, DEST)) == 30 and t.is_alive()
    finally:
        app.close()  # the application commits: the three are written on the next try
    t.join(60)
    assert t.result == 0
    out, err = capsys.readouterr()
    assert "waiting for the rows of 3 object(s) that another transaction holds locked " \
           f"({', '.join(held)})" in err, err
    assert summary(out)["rows_rewritten"] == 30
    assert rows(db) == [moved(k) for k in names]


def test_rows_locked_for_good_are_reported_after_lock_wait(run, s3, db, dsn, capsys):
    names = seed(s3, db, 10)
    app = hold_rows(dsn, names[4])
    try:
        assert run("--lock-wait", "2", "--batch-size", "3") == 1
    finally:
        app.close()
    out, err = capsys.readouterr()
    s = summary(out)
    assert (s["rows_rewritten"], s["not_rewritten"]) == (9, 1)
    assert f"row not rewritten: {names[4]}: 1 row(s) locked by another transaction for more " \
           "than 2 s (--lock-wait)" in err, err
    assert rows(db) == [k if k == names[4] else moved(k) for k in names]


def test_lock_timeout_is_named_never_a_lost_connection(run, s3, db, dsn, capsys):
    """A role with lock_timeout=1s, and the table locked against writes by another
    session for longer than --lock-wait: every row is reported as waiting for that
    lock, none as a lost connection, and nothing is retried for minutes."""
    names = seed(s3, db, 4)
    app = psycopg2.connect(dsn)
    execute(app, "LOCK TABLE avatars IN SHARE MODE")
    try:
        t0 = time.monotonic()
        assert run("--db", make_dsn(dsn, options="-c lock_timeout=1s"), "--lock-wait", "3") == 1
        took = time.monotonic() - t0
    finally:
        app.close()
    out, err = capsys.readouterr()
    s = summary(out)
    assert (s["rows_rewritten"], s["not_rewritten"]) == (0, 4)
    assert "canceling statement due to lock timeout" in err, err
    assert "connection lost" not in err
    assert took < 30, f"{took:.0f} s"  # the 2-minute reconnect loop is not entered
    assert rows(db) == names


def test_statement_timeout_names_the_slow_row_and_the_rest_go_on(run, s3, db, dsn, capsys):
    names = seed(s3, db, 6)
    execute(db, """
        CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF OLD.path = 'image/p001.png' THEN PERFORM pg_sleep(3); END IF;
          RETURN NEW;
        END $$""",
            "CREATE TRIGGER slow BEFORE UPDATE ON avatars FOR EACH ROW EXECUTE FUNCTION slow()")
    assert run("--db", make_dsn(dsn, options="-c statement_timeout=1000")) == 1
    out, err = capsys.readouterr()
    s = summary(out)
    assert (s["rows_rewritten"], s["not_rewritten"]) == (5, 1)
    assert "row not rewritten: image/p001.png: canceling statement due to statement timeout" \
           in err, err
    assert "connection lost" not in err
    assert rows(db) == [k if k == "image/p001.png" else moved(k) for k in names]


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
