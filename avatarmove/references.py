"""References: which rows name a source key, in any form the tool can recognise,
and whether the role can see every row at all.

The run rewrites rows that hold a key exactly. Tables also hold keys as paths
('/image/x.png'), as URLs ('https://legacy-s3.s3.amazonaws.com/image/x.png',
'https://cdn.example.com/legacy-s3/image/x.png'), with a query string or a
fragment after them. The tool does not rewrite those (it cannot know how the
application builds them), but it never deletes an object they name.

A row names key K when its value, as is or cut at the first '?' or '#', is K or
ends with '/K'. Every key starts with the source prefix, so the candidates of a
row are the suffixes that start with the prefix at the start of the value or
after a '/': the first and the last such place are tried (a host or path that
itself contains '/image/' puts the key after the last one).
"""
from __future__ import annotations

import re

from psycopg2 import sql


def _pattern(prefix: str, last: bool) -> str:
    """A PostgreSQL regular expression whose one group is the candidate key.
    Every character that is not a letter or digit is escaped: in PostgreSQL's
    AREs a backslash before such a character stands for the character itself."""
    escaped = re.sub(r"([^A-Za-z0-9])", r"\\\1", prefix)
    return ("^.*" if last else "") + f"(?:^|/)({escaped}.*)$"


def candidates(col: sql.Composable) -> sql.Composed:
    """The four candidate keys of a row, as a LATERAL VALUES list (alias c(cand))."""
    bare = sql.SQL("split_part(split_part({col}, '?', 1), '#', 1)").format(col=col)
    return sql.SQL(
        "(VALUES (substring({col} from %(first)s)), (substring({col} from %(last)s)), "
        "(substring({bare} from %(first)s)), (substring({bare} from %(last)s))) c(cand)"
    ).format(col=col, bare=bare)


def params(prefix: str) -> dict:
    return {"prefix": prefix, "first": _pattern(prefix, False), "last": _pattern(prefix, True)}


def referenced(db, keys: list[str]) -> dict[str, str]:
    """For each of these keys that some row of the table names now, in any form,
    one value that names it (for the message). Read from the table itself, not a
    snapshot: a row the application wrote a moment ago counts. One scan of the
    rows that contain the prefix, however many keys are asked about."""
    return db.retry(lambda cur: _referenced(cur, db, keys)) if keys else {}


def _referenced(cur, db, keys: list[str]) -> dict[str, str]:
    cur.execute(sql.SQL(
        "SELECT DISTINCT ON (c.cand) c.cand, t.{col}::text FROM {table} t "
        "CROSS JOIN LATERAL {cands} WHERE strpos(t.{col}, %(prefix)s) > 0 "
        "AND c.cand = ANY(%(keys)s) ORDER BY c.cand, t.{col}"
    ).format(col=db.col, table=db.table, cands=candidates(sql.SQL("t.{}").format(db.col))),
        {**params(db.cfg.source_prefix), "keys": keys})
    return dict(cur.fetchall())


# How long the deletes wait for the table lock below; past it, the batch's sources
# are kept for a rerun rather than holding the application's writes any longer.
LOCK_WAIT = "5s"


class TableBusy(Exception):
    """The table could not be locked within LOCK_WAIT (a long transaction writes to it)."""


def unreferenced_while_locked(db, keys: list[str], delete) -> dict[str, str]:
    """Read which keys rows name and call delete(the others) in one transaction that
    holds the table in SHARE mode: no row can be made to name a key between the
    read and the delete (the application's writes wait for the deletes, a fraction
    of a second). Returns the keys rows name, as referenced() does."""
    import psycopg2.errors

    def run(cur):
        cur.execute("SET LOCAL lock_timeout = %s", (LOCK_WAIT,))
        try:
            cur.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(db.table))
        except psycopg2.errors.LockNotAvailable:
            raise TableBusy(f"{db.table_name} stayed locked by another transaction for "
                            f"{LOCK_WAIT}") from None
        named = _referenced(cur, db, keys)
        delete([k for k in keys if k not in named])
        return named
    return db.retry(run) if keys else {}


def other_forms_sql(db) -> sql.Composed:
    """Rows that name a key under the source prefix in a form the run does not
    rewrite: not starting with the prefix (a leading '/', a URL), or with a query
    string or fragment after the key."""
    return sql.SQL(
        "strpos({col}, %(prefix)s) > 0 AND substring({col} from %(first)s) IS NOT NULL "
        "AND (left({col}, length(%(prefix)s)) <> %(prefix)s OR {col} ~ '[?#]')"
    ).format(col=db.col)


def other_form_rows(db) -> int:
    """How many rows name a source key in a form the run does not rewrite: one scan."""
    query = sql.SQL("SELECT count(*) FROM {table} WHERE ").format(table=db.table) \
        + other_forms_sql(db)

    def run(cur):
        cur.execute(query, params(db.cfg.source_prefix))
        return cur.fetchone()[0]
    return db.retry(run)


def other_form_keys(db):
    """(key, rows, one value) for every source key rows name in another form, in
    binary order of the key: verify checks that each still exists."""
    query = sql.SQL(
        'SELECT k COLLATE "C", count(*), min(v) FROM (SELECT substring(split_part(split_part('
        "{col}, '?', 1), '#', 1) from %(first)s) AS k, {col}::text AS v FROM {table} WHERE "
    ).format(col=db.col, table=db.table) + other_forms_sql(db) + sql.SQL(
        ") x WHERE k IS NOT NULL GROUP BY 1 ORDER BY 1")

    def run(cur):
        cur.execute(query, params(db.cfg.source_prefix))
        return cur.fetchall()
    return db.retry(run)


# ---------------------------------------------------------------- row-level security


def hidden_rows(db) -> str | None:
    """Why this role may not see every row of the table (row-level security that
    applies to it), as words for a message; None when it sees them all.

    row_security_active() is PostgreSQL's own answer for the current role: false
    for the owner (unless FORCE ROW LEVEL SECURITY), a superuser or a BYPASSRLS
    role."""
    def run(cur):
        cur.execute("SELECT row_security_active(c.oid), c.relforcerowsecurity, "
                    "coalesce(array_agg(quote_ident(p.polname) ORDER BY p.polname) "
                    "FILTER (WHERE p.polname IS NOT NULL), '{}'), current_user, "
                    "quote_ident(current_user), pg_get_userbyid(c.relowner) "
                    "FROM pg_class c LEFT JOIN pg_policy p ON p.polrelid = c.oid "
                    "WHERE c.oid = to_regclass(%s) GROUP BY c.oid",
                    (db.table.as_string(cur),))
        return cur.fetchone()
    found = db.retry(run)
    if not found or not found[0]:
        return None
    _, forced, policies, role, quoted_role, owner = found
    what = (f"policies {', '.join(policies)}" if len(policies) > 1 else
            f"policy {policies[0]}" if policies else "no policy: it sees no row at all")
    forced_words = ", FORCE ROW LEVEL SECURITY" if forced else ""
    return (f'row-level security on {db.table_name} applies to role "{role}" ({what}'
            f'{forced_words}); it may not see every row. Run as the table\'s owner "{owner}"'
            + (" (with FORCE, even the owner is subject to it: use a BYPASSRLS role)"
               if forced else "") +
            f" or a role with BYPASSRLS (ALTER ROLE {quoted_role} BYPASSRLS)")
