"""Through a real PgBouncer (conftest.pgbouncer: the Debian package's binary, on
127.0.0.1). A run keeps its lock and its snapshot in its session: in transaction
mode those would land on pooled server sessions that are not its own and outlive
it, so the run stops before its first copy (exit 2) and names the fix; in session
mode it works, and no lock outlives the run.
"""
from __future__ import annotations

from conftest import DEST, journal_exists, keys, rows, summary
from test_rewrite import moved, seed


def advisory_locks(conn) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        return cur.fetchone()[0]


def test_transaction_pool_is_found_before_the_first_copy(pgbouncer, run, s3, db, capsys,
                                                         copy_requests):
    names = seed(s3, db, 5)
    through = pgbouncer("transaction")
    for args in ((), ("--dry-run",)):
        assert run("--db", through, *args) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert "goes through a transaction-mode pooler" in err, err
        assert "connect to PostgreSQL directly, or through a session-mode pool " \
               "(pool_mode=session)" in err, err
    assert copy_requests == [] and keys(s3, DEST) == []
    assert rows(db) == names and not journal_exists(db)
    assert advisory_locks(db) == 0


def test_session_pool_works_and_no_lock_outlives_the_run(pgbouncer, run, s3, db, capsys):
    names = seed(s3, db, 5)
    through = pgbouncer("session")
    assert run("--db", through) == 0, capsys.readouterr().err
    assert summary(capsys.readouterr().out)["rows_rewritten"] == 5
    assert rows(db) == [moved(k) for k in names]
    assert advisory_locks(db) == 0  # the pooled server session kept no lock
    # and the next run, direct, is not refused by a lock of the last one
    assert run() == 0
