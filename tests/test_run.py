"""What a migration run does to the buckets and the table.

In-process: move.main() against moto (mock_aws) and a fresh PostgreSQL database
per test. Each test builds a state, runs move.py and asserts on the buckets,
the rows, the exit code and the summary.
"""
from __future__ import annotations

import csv
import threading
import time

import pytest
from psycopg2 import sql

import move
from avatarmove.database import Database
from avatarmove.run import together
from avatarmove.settings import UsageError
from conftest import (DEST, PNG, SOURCE, body, insert_rows, keys, listing, moto_backend, put,
                      rows, summary)

OTHER = PNG + b"different content"


# --------------------------------------------------------------------------- helpers





def table_exists(conn, name: str) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)", (name,))
        return cur.fetchone()[0] is not None


def has_index_on_path(conn) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_indexes WHERE tablename = 'avatars' "
                    "AND indexdef LIKE '%(path)%'")
        return cur.fetchone()[0] > 0





@pytest.fixture
def copies(monkeypatch):
    """Source keys of every CopyObject move.py sends, as S3 receives them."""
    seen: list[str] = []
    real = move.make_s3_client

    def make(*args, **kwargs):
        client = real(*args, **kwargs)
        client.meta.events.register(
            "provide-client-params.s3.CopyObject",
            lambda params, **_: seen.append(params["CopySource"]["Key"]))
        return client
    monkeypatch.setattr(move, "make_s3_client", make)
    return seen


# --------------------------------------------------------------------------- volume


@pytest.mark.slow  # 2,500 objects through moto: volume, for make test
def test_more_than_one_listing_page(run, s3, db, capsys):
    n = 2500
    names = [f"image/u{i:05d}.png" for i in range(n)]
    backend = moto_backend()
    for k in names:
        backend.put_object(SOURCE, k, PNG + k.encode())
    with db.cursor() as cur:
        cur.execute("INSERT INTO avatars (path) SELECT unnest(%s::text[])", (names,))

    assert run("--workers", "32") == 0
    s = summary(capsys.readouterr().out)

    expected = ["avatar/" + k[len("image/"):] for k in names]
    assert keys(s3, DEST) == expected
    assert rows(db) == expected
    assert (s["listed"], s["copied"], s["rows_rewritten"]) \
        == (n, n, n)
    for k in ("u00000", "u01000", "u01999", "u02499"):  # either side of each page break
        assert body(s3, f"avatar/{k}.png") == PNG + f"image/{k}.png".encode()


# --------------------------------------------------------------------------- key mapping

MAPPING = {
    "nested-and-case": [("image/top.png", "avatar/top.png"),
                        ("image/a/b/c.png", "avatar/a/b/c.png"),
                        ("image/a/b.png", "avatar/a/b.png"),
                        ("image/UPPER.PNG", "avatar/UPPER.PNG"),
                        ("image/Mixed/Case.Png", "avatar/Mixed/Case.Png")],
    "not-png-and-folder-markers": [("image/x.jpg", None), ("image/x.png.txt", None),
                                   ("image/png", None), ("image/x.pngx", None),
                                   ("image/", None), ("image/sub/", None),
                                   ("image/sub/in.png", "avatar/sub/in.png")],
    "outside-prefix": [("images/x.png", None), ("other/image/x.png", None),
                       ("imagex.png", None), ("x.png", None), ("IMAGE/x.png", None),
                       ("image/in.png", "avatar/in.png")],
    "tricky": [("image/with space.png", "avatar/with space.png"),
               ("image/unicodé-日本-😀.png", "avatar/unicodé-日本-😀.png"),
               ("image/plus+sign.png", "avatar/plus+sign.png"),
               ("image/100%.png", "avatar/100%.png"),
               ("image/percent%20literal.png", "avatar/percent%20literal.png"),
               ("image/a=b&c=d.png", "avatar/a=b&c=d.png"),
               ("image/sp ace/+/%/=&.png", "avatar/sp ace/+/%/=&.png")],
}


@pytest.mark.parametrize("case", list(MAPPING))
def test_key_mapping(case, run, s3, db, capsys):
    table = MAPPING[case]
    for i, (src, _) in enumerate(table):
        content = b"" if src.endswith("/") else PNG + src.encode()
        put(s3, src, content, ContentType="image/png" if src.lower().endswith(".png")
            else "application/octet-stream",
            Metadata={"owner": f"user-{i}"}, CacheControl="max-age=60")
    insert_rows(db, [src for src, _ in table])
    source_before = listing(s3, SOURCE)

    assert run() == 0
    s = summary(capsys.readouterr().out)

    moved = [(src, dst) for src, dst in table if dst]
    assert sorted(keys(s3, DEST)) == sorted(dst for _, dst in moved)
    for i, (src, dst) in enumerate(table):
        if not dst:
            continue
        got = s3.get_object(Bucket=DEST, Key=dst)
        assert got["Body"].read() == PNG + src.encode(), dst
        assert got["ContentType"] == "image/png", dst
        assert got["Metadata"] == {"owner": f"user-{i}"}, dst
        assert got["CacheControl"] == "max-age=60", dst
    assert rows(db) == [dst or src for src, dst in table]
    assert listing(s3, SOURCE) == source_before
    assert s["listed"] == s["copied"] == len(moved)
    assert s["rows_rewritten"] == len(moved)
    assert s["rows_left_under_source"] == \
        sum(1 for src, dst in table if not dst and src.startswith("image/"))


# --------------------------------------------------------------------------- rows


def test_rows_many_per_key_missing_objects_objects_without_rows(run, s3, db, capsys):
    for k in ("a", "norow", "sub/b"):
        put(s3, f"image/{k}.png", PNG + k.encode())
    outside = ["other/image/a.png", "images/a.png", "Image/a.png", "", None]
    insert_rows(db, ["image/a.png", "image/a.png", "image/gone.png", "image/a.png",
                     "image/sub/b.png", *outside])

    assert run() == 0
    s = summary(capsys.readouterr().out)

    assert rows(db) == ["avatar/a.png", "avatar/a.png", "image/gone.png", "avatar/a.png",
                        "avatar/sub/b.png", *outside]
    assert keys(s3, DEST) == ["avatar/a.png", "avatar/norow.png", "avatar/sub/b.png"]
    assert body(s3, "avatar/norow.png") == PNG + b"norow"
    assert s["copied"] == 3
    assert s["rows_rewritten"] == 4
    assert s["objects_without_rows"] == 1
    assert s["rows_left_under_source"] == 1
    assert s["rows_outside"] == len(outside)
    assert "avatar/gone.png" not in keys(s3, DEST)


# --------------------------------------------------------------------------- compare-and-set

APP_CHANGES = {
    # what the application does to row 1 (path image/a.png) while move.py works,
    # and what row 1 must hold afterwards
    "new-upload": ("UPDATE avatars SET path = 'image/new-upload.png' WHERE id = 1",
                   "image/new-upload.png"),
    "cleared": ("UPDATE avatars SET path = NULL WHERE id = 1", None),
    # same value, new row version (new ctid): still rewritten, found by value
    "touched": ("UPDATE avatars SET path = path WHERE id = 1", "avatar/a.png"),
}


@pytest.mark.parametrize("row_plan", ["snapshot", "index"])
@pytest.mark.parametrize("change", list(APP_CHANGES))
def test_compare_and_set_leaves_rows_the_application_changed(change, row_plan, run, s3, db,
                                                            capsys, monkeypatch):
    put(s3, "image/a.png", PNG + b"a")
    put(s3, "image/b.png", PNG + b"b")
    insert_rows(db, ["image/a.png", "image/a.png", "image/b.png"])
    if row_plan == "index":
        with db.cursor() as cur:
            cur.execute("CREATE INDEX ON avatars (path)")
    statement, expected_row1 = APP_CHANGES[change]
    fired = []
    real = Database.rewrite

    def racing_rewrite(self, pairs, *args):
        # the copies are done and the rows were looked up; the application
        # writes row 1 just before the compare-and-set
        if pairs and not fired:
            with db.cursor() as cur:
                cur.execute(statement)
            fired.append(pairs)
        return real(self, pairs, *args)
    monkeypatch.setattr(Database, "rewrite", racing_rewrite)

    assert run() == 0
    s = summary(capsys.readouterr().out)

    assert fired and ("image/a.png", "avatar/a.png") in fired[0]
    assert rows(db) == [expected_row1, "avatar/a.png", "avatar/b.png"]
    assert s["rows_rewritten"] == 2 + (expected_row1 == "avatar/a.png")
    assert s["row_plan"] == row_plan
    assert keys(s3, DEST) == ["avatar/a.png", "avatar/b.png"]


def test_compare_and_set_only_rows_holding_the_old_key(run, s3, db, capsys):
    """Prefix lookalikes and near-misses of a key are other rows: never rewritten."""
    put(s3, "image/a.png", PNG + b"a")
    near = ["image/a.png ", " image/a.png", "IMAGE/a.png", "image/A.png", "image/a.PNG",
            "image//a.png", "image/a.png/", "image/a.pn"]
    insert_rows(db, ["image/a.png", *near])
    assert run() == 0
    s = summary(capsys.readouterr().out)
    assert rows(db) == ["avatar/a.png", *near]
    assert s["rows_rewritten"] == 1


# --------------------------------------------------------------------------- resume

RESUME = {
    # state before the run: (copy already there, row already rewritten)
    "done": (True, True),
    "copied-rows-not-rewritten": (True, False),
    "rewritten-copy-missing": (False, True),
    "nothing-done": (False, False),
}


@pytest.mark.parametrize("state", list(RESUME))
def test_resume(state, run, s3, db, capsys, copies, tmp_path):
    copied, rewritten = RESUME[state]
    put(s3, "image/x.png", PNG + b"x")
    put(s3, "image/y.png", PNG + b"y")  # untouched by any earlier run: copied every time
    if copied:
        put(s3, "avatar/x.png", PNG + b"x", bucket=DEST)
    insert_rows(db, ["avatar/x.png" if rewritten else "image/x.png", "image/y.png"])
    report = tmp_path / "report.csv"

    assert run("--report", str(report)) == 0
    s = summary(capsys.readouterr().out)

    assert rows(db) == ["avatar/x.png", "avatar/y.png"]
    assert body(s3, "avatar/x.png") == PNG + b"x" and body(s3, "avatar/y.png") == PNG + b"y"
    expected_copies = ["image/y.png"] + ([] if copied else ["image/x.png"])
    assert sorted(copies) == sorted(expected_copies)
    with open(report, newline="", encoding="utf-8") as f:
        actions = {line["source_key"]: (line["action"], line["rows_rewritten"])
                   for line in csv.DictReader(f)}
    want_x = {"done": ("skipped", "0"), "copied-rows-not-rewritten": ("rows-only", "1"),
              "rewritten-copy-missing": ("copied", "0"), "nothing-done": ("copied", "1")}[state]
    assert actions == {"image/x.png": want_x, "image/y.png": ("copied", "1")}
    assert s["copied"] == len(expected_copies)
    assert s["rows_only"] == (want_x[0] == "rows-only")
    assert s["skipped"] == (want_x[0] == "skipped")
    assert s["rows_rewritten"] == 1 + int(want_x[1])

    # and then everything is done: a rerun copies and rewrites nothing
    copies.clear()
    assert run() == 0
    s = summary(capsys.readouterr().out)
    assert copies == []
    assert (s["copied"], s["skipped"], s["rows_rewritten"]) \
        == (0, 2, 0)


# --------------------------------------------------------------------------- conflicts


@pytest.mark.parametrize("overwrite", [False, True], ids=["default", "overwrite"])
def test_conflict(overwrite, run, s3, db, capsys):
    put(s3, "image/x.png", PNG + b"x")
    put(s3, "image/ok.png", PNG + b"ok")
    put(s3, "avatar/x.png", OTHER, bucket=DEST)
    insert_rows(db, ["image/x.png", "image/ok.png"])

    code = run(*(["--overwrite"] if overwrite else []))
    out, err = capsys.readouterr()
    s = summary(out)

    assert body(s3, "avatar/ok.png") == PNG + b"ok"
    if overwrite:
        assert code == 0
        assert body(s3, "avatar/x.png") == PNG + b"x"
        assert rows(db) == ["avatar/x.png", "avatar/ok.png"]
        assert (s["copied"], s["conflicts"]) == (2, 0)
        assert "conflict" not in err
    else:
        assert code == 1
        assert body(s3, "avatar/x.png") == OTHER
        assert rows(db) == ["image/x.png", "avatar/ok.png"]
        assert (s["copied"], s["conflicts"]) == (1, 1)
        lines = [line for line in err.splitlines() if line.startswith("WARNING conflict")]
        assert len(lines) == 1 and "avatar/x.png" in lines[0], err
        assert "--overwrite" in lines[0]
        # the last line: what happened and what to do
        assert err.splitlines()[-1].startswith("move.py: incomplete: 1 conflict: "), err
        assert "--overwrite" in err.splitlines()[-1]
    assert listing(s3, SOURCE).keys() == {"image/x.png", "image/ok.png"}


# --------------------------------------------------------------------------- row plans

PLANS = {
    # setup, flags, plan named in the summary, index on path afterwards
    "snapshot": (None, [], "snapshot", False),
    "index": ("CREATE INDEX avatars_path_idx ON avatars (path)", [], "index", True),
    "create-index": (None, ["--create-index"], "index", True),
    "partial-index-ignored": ("CREATE INDEX avatars_path_idx ON avatars (path) "
                              "WHERE id > 1000", [], "snapshot", True),
}


@pytest.mark.parametrize("plan", list(PLANS))
def test_row_plans_same_outcome(plan, run, s3, db, dsn, capsys, monkeypatch, tmp_path):
    setup, flags, plan_name, indexed = PLANS[plan]
    for k in ("a", "b", "c/d"):
        put(s3, f"image/{k}.png", PNG + k.encode())
    insert_rows(db, ["image/a.png", "image/a.png", "image/b.png", "image/gone.png",
                     "other/a.png", "avatar/c/d.png", None])
    if setup:
        with db.cursor() as cur:
            cur.execute(setup)

    # without --quiet, to see the log line naming the plan
    monkeypatch.chdir(tmp_path)
    code = move.main(["--db", dsn, "--engine", "boto3", "--json", *flags])
    out, err = capsys.readouterr()
    s = summary(out)

    assert code == 0, err
    assert rows(db) == ["avatar/a.png", "avatar/a.png", "avatar/b.png", "image/gone.png",
                        "other/a.png", "avatar/c/d.png", None]
    assert keys(s3, DEST) == ["avatar/a.png", "avatar/b.png", "avatar/c/d.png"]
    assert s["rows_rewritten"] == 3
    assert s["row_plan"] == plan_name, out
    assert has_index_on_path(db) == indexed
    if plan == "create-index":
        assert table_exists(db, "avatars_path_move_idx")
        assert "creating index on avatars(path) CONCURRENTLY" in err
    else:
        assert not table_exists(db, "avatars_path_move_idx")
    if plan_name == "snapshot":
        assert "no index on avatars(path)" in err
    else:
        assert "no index on" not in err


# --------------------------------------------------------------------------- shards


@pytest.mark.parametrize("n", [1, 3, 4])
def test_shards_partition_the_keys(n, run, s3, db, capsys, copies):
    names = [f"image/s{i:02d}.png" for i in range(30)] + \
            [f"image/d{i}/x.png" for i in range(10)] + ["image/ü ñ+%.png", "image/UP.PNG"]
    for k in names:
        put(s3, k, PNG + k.encode())
    insert_rows(db, names)
    insert_rows(db, ["image/s00.png"])  # a second row for one key

    shares = []
    for i in range(n):
        copies.clear()
        assert run("--shard", f"{i}/{n}") == 0
        s = summary(capsys.readouterr().out)
        share = set(copies)
        assert len(share) == len(copies), "a key copied twice in one run"
        assert s["listed"] == s["copied"] == len(share)
        shares.append(share)
        # this shard's rows, and only them, are rewritten on top of earlier shards'
        done = set().union(*shares)
        assert rows(db) == [("avatar/" + p[len("image/"):]) if p in done else p
                            for p in names + ["image/s00.png"]]
        assert set(keys(s3, DEST)) == {"avatar/" + k[len("image/"):] for k in done}

    assert set().union(*shares) == set(names)
    assert sum(len(s) for s in shares) == len(names)  # pairwise disjoint
    if n > 1:
        assert all(shares), "a shard got no key out of 42"
    assert len(keys(s3, DEST)) == len(names)

    # a shard rerun, and a full run, find everything done
    copies.clear()
    assert run("--shard", f"0/{n}") == 0
    assert summary(capsys.readouterr().out)["skipped"] == len(shares[0])
    assert run() == 0
    assert summary(capsys.readouterr().out)["skipped"] == len(names)
    assert copies == []


# --------------------------------------------------------------------------- manifest

MANIFEST_KEYS = {
    # key in the bucket: as an S3 Inventory / Batch Operations CSV writes it
    "image/with space.png": "image/with+space.png",
    "image/with space2.png": "image/with%20space2.png",
    "image/plus+sign.png": "image/plus%2Bsign.png",
    "image/café.png": "image/caf%C3%A9.png",
    "image/100%.png": "image/100%25.png",
    "image/a=b&c.png": "image%2Fa%3Db%26c.png",
    "image/plain.png": "image/plain.png",
    "image/sub/plain2.png": "image/sub/plain2.png",
}
NOT_IN_MANIFEST = ["image/unlisted.png", "image/sub/unlisted.png"]


def write_manifest(path, lines: list[list[str]], quote_all: bool) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL).writerows(lines)


@pytest.mark.parametrize("style", ["batch-operations", "inventory", "with-header"])
def test_manifest_copies_only_listed_keys(style, run, s3, db, capsys, tmp_path, copies):
    for k in [*MANIFEST_KEYS, *NOT_IN_MANIFEST, "image/readme.txt", "other/x.png"]:
        put(s3, k, PNG + k.encode())
    insert_rows(db, [*MANIFEST_KEYS, *NOT_IN_MANIFEST])
    lines = [[SOURCE, enc] for enc in MANIFEST_KEYS.values()]
    lines += [[SOURCE, "image/readme.txt"], [SOURCE, "other/x.png"]]  # not PNG / outside
    if style == "inventory":  # every field quoted, more columns: size, ETag
        lines = [line + ["32", "0123abcd"] for line in lines]
    if style == "with-header":
        lines = [["bucket", "key"]] + lines
    manifest = tmp_path / "manifest.csv"
    write_manifest(manifest, lines, quote_all=style == "inventory")

    assert run("--manifest", str(manifest)) == 0
    s = summary(capsys.readouterr().out)

    assert sorted(copies) == sorted(MANIFEST_KEYS)
    assert sorted(keys(s3, DEST)) == sorted("avatar/" + k[len("image/"):] for k in MANIFEST_KEYS)
    for k in MANIFEST_KEYS:
        assert body(s3, "avatar/" + k[len("image/"):]) == PNG + k.encode()
    assert rows(db) == ["avatar/" + k[len("image/"):] for k in MANIFEST_KEYS] + NOT_IN_MANIFEST
    assert s["listed"] == s["copied"] == len(MANIFEST_KEYS)

    copies.clear()
    assert run("--manifest", str(manifest)) == 0  # resumes from a manifest too
    s = summary(capsys.readouterr().out)
    assert copies == [] and s["skipped"] == len(MANIFEST_KEYS)


def test_manifest_key_missing_from_the_bucket_fails_alone(run, s3, db, capsys, tmp_path):
    put(s3, "image/here.png", PNG)
    insert_rows(db, ["image/here.png", "image/gone.png"])
    manifest = tmp_path / "m.csv"
    write_manifest(manifest, [[SOURCE, "image/here.png"], [SOURCE, "image/gone.png"]], False)

    assert run("--manifest", str(manifest)) == 1
    out, err = capsys.readouterr()
    s = summary(out)
    assert keys(s3, DEST) == ["avatar/here.png"]
    assert rows(db) == ["avatar/here.png", "image/gone.png"]
    assert (s["copied"], s["failed"]) == (1, 1)
    assert "image/gone.png" in err


def test_manifest_naming_another_bucket_changes_nothing(run, s3, db, capsys, tmp_path):
    put(s3, "image/a.png", PNG)
    put(s3, "image/b.png", PNG)
    insert_rows(db, ["image/a.png", "image/b.png"])
    manifest = tmp_path / "m.csv"
    write_manifest(manifest, [[SOURCE, "image/a.png"], ["some-other-bucket", "image/b.png"]],
                   False)

    assert run("--manifest", str(manifest)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("move.py: error: ") and "some-other-bucket" in err
    assert f"{manifest}:2" in err
    assert keys(s3, DEST) == []
    assert rows(db) == ["image/a.png", "image/b.png"]
    assert not table_exists(db, "avatars_move_journal")


# --------------------------------------------------------------------------- nothing to do


@pytest.mark.parametrize("contents", [[], ["image/", "image/readme.txt", "other/x.png",
                                           "images/y.png"]], ids=["empty", "no-pngs"])
def test_nothing_to_do(contents, run, s3, db, capsys):
    for k in contents:
        put(s3, k, b"")
    insert_rows(db, ["image/a.png", "other/b.png"])

    assert run() == 0
    out, err = capsys.readouterr()
    s = summary(out)

    assert err == ""
    assert s["run_id"] and not s["dry_run"] and not s["interrupted"], out
    assert (s["listed"], s["copied"], s["rows_rewritten"],
            s["failed"], s["conflicts"]) == (0, 0, 0, 0, 0)
    assert s["rows_left_under_source"] == 1
    assert keys(s3, DEST) == []
    assert sorted(keys(s3, SOURCE)) == sorted(contents)
    assert rows(db) == ["image/a.png", "other/b.png"]


# --------------------------------------------------------------------------- identifiers


@pytest.mark.parametrize("how,schema,flags", [
    ("env", None, []),
    ("flags", "Media Lib", ["--create-index"]),
], ids=["env-snapshot-plan", "flags-schema-index-plan"])
def test_quoted_table_and_column(how, schema, flags, run, s3, db, capsys, monkeypatch):
    table_parts = ([schema] if schema else []) + ["Avatar Images"]
    table = sql.Identifier(*table_parts)
    with db.cursor() as cur:
        if schema:
            cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        # "path" too, lower case, as a decoy that must stay untouched
        cur.execute(sql.SQL('CREATE TABLE {} (id SERIAL PRIMARY KEY, "Path" VARCHAR, '
                            'path VARCHAR)').format(table))
        cur.execute(sql.SQL('INSERT INTO {} ("Path", path) VALUES (%s, %s), (%s, %s), '
                            '(%s, %s)').format(table),
                    ("image/a.png", "image/a.png", "image/b.png", "x", "other/c.png", "y"))
    put(s3, "image/a.png", PNG + b"a")
    put(s3, "image/b.png", PNG + b"b")
    table_setting = ".".join(table_parts)
    if how == "env":
        monkeypatch.setenv("DB_TABLE", table_setting)
        monkeypatch.setenv("DB_PATH_COLUMN", "Path")
        args = flags
    else:
        args = ["--table", table_setting, "--column", "Path", *flags]

    assert run(*args) == 0
    s = summary(capsys.readouterr().out)

    with db.cursor() as cur:
        cur.execute(sql.SQL('SELECT "Path", path FROM {} ORDER BY id').format(table))
        assert cur.fetchall() == [("avatar/a.png", "image/a.png"), ("avatar/b.png", "x"),
                                  ("other/c.png", "y")]
        cur.execute("SELECT to_regclass(%s)", (sql.Identifier(
            *table_parts[:-1], "Avatar Images_move_journal").as_string(cur),))
        assert cur.fetchone()[0] is not None
    assert s["rows_rewritten"] == 2
    assert keys(s3, DEST) == ["avatar/a.png", "avatar/b.png"]
    assert s["row_plan"] == ("index" if flags else "snapshot")
    assert rows(db) == []  # the seeder's avatars table is not touched


# --------------------------------------------------------------------------- uncopyable objects


@pytest.fixture
def answer(monkeypatch):
    """Make S3 answer some requests with an error, as S3 itself would where moto cannot
    (Intelligent-Tiering archive tiers, a revoked permission): answer[operation] =
    f(request) -> error code, or None to let the request through to moto. Answered
    requests are never retried by botocore (403s are not)."""
    rules: dict = {}
    real = move.make_s3_client

    def refuse(model, params, **_):
        rule = rules.get(model.name)
        code = rule(params) if rule else None
        if code is None:
            return None
        from botocore.awsrequest import AWSResponse
        return AWSResponse(params.get("url", ""), 403, {}, None), {
            "Error": {"Code": code, "Message": f"{code} (injected by the test)"},
            "ResponseMetadata": {"HTTPStatusCode": 403}}

    def make(*args, **kwargs):
        client = real(*args, **kwargs)
        client.meta.events.register("before-call.s3", refuse)
        return client
    monkeypatch.setattr(move, "make_s3_client", make)
    return rules


def report_actions(path) -> dict[str, tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return {line["source_key"]: (line["action"], line["error"]) for line in csv.DictReader(f)}


def test_archived_objects_are_skipped_without_a_copy(run, s3, db, capsys, copies, tmp_path):
    """GLACIER and DEEP_ARCHIVE objects cannot be copied until restored (moto refuses,
    as S3 does): skipped without a request, counted, rows left on the source, exit 1.
    One whose copy is already there is done: its rows are rewritten."""
    put(s3, "image/cold.png", PNG + b"cold", StorageClass="GLACIER")
    put(s3, "image/deep.png", PNG + b"deep", StorageClass="DEEP_ARCHIVE")
    put(s3, "image/done.png", PNG + b"done", StorageClass="GLACIER")
    put(s3, "avatar/done.png", PNG + b"done", bucket=DEST)
    put(s3, "image/warm.png", PNG + b"warm", StorageClass="GLACIER_IR")
    put(s3, "image/plain.png", PNG + b"plain")
    paths = ["image/cold.png", "image/deep.png", "image/done.png", "image/warm.png",
             "image/plain.png"]
    insert_rows(db, paths)

    assert run("--dry-run") == 0  # a dry run shows them, and changes nothing
    s = summary(capsys.readouterr().out)
    assert (s["archived"], s["would_copy"], s["would_rewrite_rows_only"]) == (2, 2, 1)
    assert copies == [] and rows(db) == paths

    report = tmp_path / "report.csv"
    assert run("--report", str(report)) == 1
    out, err = capsys.readouterr()
    s = summary(out)
    assert sorted(copies) == ["image/plain.png", "image/warm.png"]
    assert (s["archived"], s["copied"], s["rows_only"], s["failed"]) == (2, 2, 1, 0)
    assert s["stopped"] is None and s["failed_by_code"] == {}
    assert rows(db) == ["image/cold.png", "image/deep.png", "avatar/done.png",
                        "avatar/warm.png", "avatar/plain.png"]
    assert keys(s3, DEST) == ["avatar/done.png", "avatar/plain.png", "avatar/warm.png"]
    actions = report_actions(report)
    assert actions["image/cold.png"][0] == actions["image/deep.png"][0] == "archived"
    assert "GLACIER" in actions["image/cold.png"][1]
    assert "DEEP_ARCHIVE" in actions["image/deep.png"][1]
    lines = [line for line in err.splitlines() if line.startswith("WARNING archived:")]
    assert len(lines) == 2 and all("restore" in line for line in lines), err
    assert err.splitlines()[-1] == ("move.py: incomplete: 2 objects archived: restore them (aws "
                                    "s3api restore-object), then rerun. Their rows still point "
                                    "at their sources, which exist"), err

    copies.clear()  # a rerun does the same: nothing new to copy, still incomplete
    assert run() == 1
    assert copies == [] and summary(capsys.readouterr().out)["archived"] == 2


def test_restored_archived_object_is_copied(run, s3, db, capsys, copies, monkeypatch):
    """Restored (aws s3api restore-object), a GLACIER object can be copied: the listing
    says so in RestoreStatus. moto restores at once but does not list RestoreStatus, so
    the test adds it to moto's listing, as S3 would; what matters is that the run asks
    for it and acts on it."""
    put(s3, "image/thawed.png", PNG + b"thawed", StorageClass="GLACIER")
    put(s3, "image/frozen.png", PNG + b"frozen", StorageClass="GLACIER")
    s3.restore_object(Bucket=SOURCE, Key="image/thawed.png", RestoreRequest={"Days": 1})
    insert_rows(db, ["image/thawed.png", "image/frozen.png"])
    asked = []
    real = move.make_s3_client

    def add_restore_status(parsed, **_):
        for o in parsed.get("Contents", ()):
            if o.get("StorageClass") != "GLACIER":  # only the source holds any
                continue
            restore = s3.head_object(Bucket=SOURCE, Key=o["Key"]).get("Restore", "")
            if 'ongoing-request="false"' in restore:
                o["RestoreStatus"] = {"IsRestoreInProgress": False,
                                      "RestoreExpiryDate": restore.split("expiry-date=")[-1]}

    def make(*args, **kwargs):
        client = real(*args, **kwargs)
        client.meta.events.register(
            "before-call.s3.ListObjectsV2",
            lambda params, **_: asked.append(params["headers"].get(
                "x-amz-optional-object-attributes")))
        client.meta.events.register("after-call.s3.ListObjectsV2", add_restore_status)
        return client
    monkeypatch.setattr(move, "make_s3_client", make)

    assert run() == 1  # frozen.png is still archived
    s = summary(capsys.readouterr().out)
    assert copies == ["image/thawed.png"]
    assert (s["copied"], s["archived"]) == (1, 1)
    assert rows(db) == ["avatar/thawed.png", "image/frozen.png"]
    assert body(s3, "avatar/thawed.png") == PNG + b"thawed"
    assert asked and set(asked) == {"RestoreStatus"}


def test_archive_tier_answer_is_archived_without_a_retry(run, s3, db, capsys, copies, answer,
                                                          tmp_path):
    """Intelligent-Tiering's archive tiers do not show in the listing: the copy is answered
    InvalidObjectState. That object is archived, like a GLACIER one, after one request."""
    put(s3, "image/tiered.png", PNG + b"t", StorageClass="INTELLIGENT_TIERING")
    put(s3, "image/ok.png", PNG + b"ok", StorageClass="INTELLIGENT_TIERING")
    insert_rows(db, ["image/tiered.png", "image/ok.png"])
    answer["CopyObject"] = lambda req: ("InvalidObjectState" if "tiered.png" in
                                        req["headers"]["x-amz-copy-source"] else None)
    report = tmp_path / "report.csv"

    assert run("--report", str(report), "--max-attempts", "5") == 1
    s = summary(capsys.readouterr().out)
    assert sorted(copies) == ["image/ok.png", "image/tiered.png"]  # one request each
    assert (s["archived"], s["failed"], s["copied"]) == (1, 0, 1)
    assert rows(db) == ["image/tiered.png", "avatar/ok.png"]
    assert keys(s3, DEST) == ["avatar/ok.png"]
    action, error = report_actions(report)["image/tiered.png"]
    assert action == "archived" and "InvalidObjectState" in error


def test_key_too_long_is_skipped_without_a_request(run, s3, db, capsys, copies, tmp_path):
    """image/ -> avatar/ adds a byte: a 1,024-byte source key has no legal destination.
    moto does not enforce S3's limit, so a copy sent would have 'worked' here: the
    request count shows none was sent."""
    longest = "image/" + "k" * (1024 - len("image/") - 4) + ".png"
    fits = "image/" + "f" * (1024 - len("avatar/") - 4) + ".png"
    assert len(longest.encode()) == 1024 and len(("avatar/" + fits[6:]).encode()) == 1024
    for k in (longest, fits, "image/short.png"):
        put(s3, k, PNG + k.encode())
    insert_rows(db, [longest, fits, "image/short.png"])
    report = tmp_path / "report.csv"

    assert run("--dry-run") == 0
    s = summary(capsys.readouterr().out)
    assert (s["key_too_long"], s["would_copy"]) == (1, 2) and copies == []

    assert run("--report", str(report)) == 1
    out, err = capsys.readouterr()
    s = summary(out)
    assert sorted(copies) == sorted([fits, "image/short.png"])
    assert (s["key_too_long"], s["copied"], s["failed"]) == (1, 2, 0)
    assert rows(db) == [longest, "avatar/" + fits[6:], "avatar/short.png"]
    action, error = report_actions(report)[longest]
    assert action == "key-too-long" and "1,025 bytes" in error
    assert "key too long: " + longest in err and "rerun to resume" not in err


def test_listing_refused_for_good_says_what_to_fix_not_rerun(run, s3, db, capsys, answer):
    """An error a rerun cannot cure ends the run with what to do instead of 'rerun'."""
    put(s3, "image/a.png", PNG)
    insert_rows(db, ["image/a.png"])
    answer["ListObjectsV2"] = lambda req: "AccessDenied"

    assert run() == 1
    err = capsys.readouterr().err
    assert "AccessDenied" in err and "rerun to resume" not in err, err
    assert "a rerun cannot cure this: check the IAM policy" in err
    assert f"s3:ListBucket on {SOURCE}" in err
    assert rows(db) == ["image/a.png"] and keys(s3, DEST) == []


def test_listing_failing_for_now_still_says_rerun(run, s3, db, capsys, answer):
    put(s3, "image/a.png", PNG)
    insert_rows(db, ["image/a.png"])
    answer["ListObjectsV2"] = lambda req: "InternalError"

    assert run("--max-attempts", "1") == 1
    err = capsys.readouterr().err
    assert "InternalError" in err and "rerun to resume" in err, err
    assert rows(db) == ["image/a.png"]


# --------------------------------------------------------------------------- start-up


def test_setup_checks_run_at_once_and_the_first_in_order_is_reported():
    """The bucket and database checks wait on round trips, so they run together;
    the message must not depend on which answer came back first."""
    all_started = threading.Barrier(3, timeout=5)  # checked one after another: broken

    def check(name: str, fails: bool, delay: float) -> None:
        all_started.wait()
        time.sleep(delay)
        if fails:
            raise UsageError(f"{name} is wrong")
    with pytest.raises(UsageError, match="^destination bucket is wrong$"):
        together([lambda: check("source bucket", False, 0.0),
                  lambda: check("destination bucket", True, 0.2),
                  lambda: check("database", True, 0.0)])
