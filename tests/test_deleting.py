"""--delete-source deletes a source only when nothing can still need it: rows the
role cannot see, rows that name the key in another form, and a source replaced
after its copy all keep it (deleting.py, references.py)."""
from __future__ import annotations

import csv

import pytest

from avatarmove import deleting
from conftest import (DEST, PNG, SOURCE, body, insert_rows, journal_exists, keys, put,
                      role_dsn, rows, snapshot, summary)
from faultproxy import FaultProxy
from s3conditions import ConditionalDeletes
from test_faults import own_pg  # noqa: F401  (a fixture: a PostgreSQL this file restarts)

NAMES = ("a", "b", "c", "d", "e", "f", "g", "h")
GRANTS = ("GRANT SELECT, UPDATE ON avatars TO {role}", "GRANT CREATE ON SCHEMA public TO {role}")
OWNER = ("ALTER TABLE avatars OWNER TO {role}", "GRANT CREATE ON SCHEMA public TO {role}")
# Row-level security that hides one row (image/h.png) from whoever it applies to.
HIDE_H = ("ALTER TABLE avatars ENABLE ROW LEVEL SECURITY",
          "CREATE POLICY not_h ON avatars USING (path IS DISTINCT FROM 'image/h.png')")


def filled(s3, db, names=NAMES) -> list[str]:
    ks = [f"image/{n}.png" for n in names]
    for k in ks:
        put(s3, k, PNG + k.encode())
    insert_rows(db, ks)
    return ks


# ---------------------------------------------------------------- rows the role cannot see


@pytest.mark.parametrize("setup, refused", [
    pytest.param(GRANTS + HIDE_H, True, id="policy-applies-to-a-non-owner"),
    pytest.param(OWNER + HIDE_H + ("ALTER TABLE avatars FORCE ROW LEVEL SECURITY",), True,
                 id="owner-forced"),
    pytest.param(OWNER + HIDE_H, False, id="owner"),
    pytest.param(GRANTS + HIDE_H + ("ALTER ROLE {role} BYPASSRLS",), False, id="bypassrls"),
])
def test_delete_source_refuses_a_role_that_cannot_see_every_row(run, s3, db, dsn, capsys,
                                                                 setup, refused):
    filled(s3, db)
    with role_dsn(db, dsn, *setup) as (mover, role):
        before = snapshot(s3, db)
        code = run("--db", mover, "--delete-source")
        out, err = capsys.readouterr()
        if refused:
            assert code == 2
            assert len(err.strip().splitlines()) == 1, err
            assert "row-level security" in err and "not_h" in err and "BYPASSRLS" in err
            assert f'"{role}"' in err
            assert snapshot(s3, db) == before  # nothing copied, no row changed
            assert not journal_exists(db)
        else:
            assert code == 0, err
            assert summary(out)["deleted"] == len(NAMES)
            assert keys(s3, SOURCE) == []
            assert rows(db) == [f"avatar/{n}.png" for n in NAMES]


def test_a_run_as_a_role_rls_limits_says_so_and_keeps_the_hidden_rows_source(run, s3, db, dsn,
                                                                              capsys):
    filled(s3, db)
    with role_dsn(db, dsn, *GRANTS, *HIDE_H) as (mover, _):
        assert run("--db", mover) == 0
    out, err = capsys.readouterr()
    s = summary(out)
    assert "row-level security" in s["hidden_rows"] and "not_h" in s["hidden_rows"]
    assert "row-level security" in err
    assert rows(db) == [f"avatar/{n}.png" for n in NAMES[:-1]] + ["image/h.png"]
    assert "image/h.png" in keys(s3, SOURCE)


# ---------------------------------------------------------------- rows naming a key in another form


OTHER_FORMS = {
    "b": "/image/b.png",
    "c": "https://legacy-s3.s3.amazonaws.com/image/c.png",
    "d": "https://cdn.example.com/legacy-s3/image/d.png?v=3",
    "e": "image/e.png#large",
    "f": "s3://legacy-s3/image/f.png",
}


def test_rows_naming_a_key_in_another_form_keep_their_source(run, s3, db, capsys):
    for n in NAMES:
        put(s3, f"image/{n}.png", PNG + n.encode())
    paths = ["image/a.png", *OTHER_FORMS.values(), "elsewhere/image-g.png"]  # h: no row
    insert_rows(db, paths)

    assert run("--dry-run", "--delete-source") == 0
    assert summary(capsys.readouterr().out)["rows_other_forms"] == len(OTHER_FORMS)

    assert run("--delete-source") == 0
    out, err = capsys.readouterr()
    s = summary(out)
    assert s["rows_other_forms"] == len(OTHER_FORMS)
    assert s["deleted"] == 3 and s["sources_kept"] == len(OTHER_FORMS)
    # a (rewritten), g and h (no row names them) went; every source a row names stayed
    assert keys(s3, SOURCE) == [f"image/{n}.png" for n in OTHER_FORMS]
    assert rows(db) == ["avatar/a.png", *OTHER_FORMS.values(), "elsewhere/image-g.png"]
    assert "kept source image/d.png: a row of avatars names it" in err


def test_the_summary_text_names_rows_in_other_forms(s3, db, dsn, capsys, monkeypatch, tmp_path):
    import move
    monkeypatch.chdir(tmp_path)
    put(s3, "image/a.png")
    insert_rows(db, ["/image/a.png"])
    assert move.main(["--db", dsn, "--quiet", "--engine", "boto3"]) == 0
    out = capsys.readouterr().out
    assert "keys in another form (a URL, a leading /, ?query): 1, not rewritten" in out


# ---------------------------------------------------------------- a source replaced after its copy


def test_a_source_replaced_after_its_copy_is_kept_and_copied_again(run, s3, db, capsys,
                                                                   monkeypatch, tmp_path):
    filled(s3, db, "abc")
    new = PNG + b"the picture uploaded last"
    real = deleting.head_all

    def application_uploads_first(s3_, bucket, ks, workers):
        put(s3, "image/b.png", new)  # after move.py copied it, before it deletes
        return real(s3_, bucket, ks, workers)
    monkeypatch.setattr(deleting, "head_all", application_uploads_first)
    report = tmp_path / "r.csv"

    assert run("--delete-source", "--report", str(report)) == 0
    out, err = capsys.readouterr()
    s = summary(out)
    assert s["changed_since_copy"] == 1 and s["deleted"] == 2
    assert keys(s3, SOURCE) == ["image/b.png"]
    assert body(s3, "image/b.png", bucket=SOURCE) == new  # the upload survives
    assert body(s3, "avatar/b.png") == new  # and the row's object shows it
    assert rows(db) == ["avatar/a.png", "avatar/b.png", "avatar/c.png"]
    assert "changed since copy: image/b.png" in err
    lines = list(csv.reader(report.open()))
    assert ["image/b.png", "avatar/b.png", "changed-since-copy"] in [r[:3] for r in lines]

    monkeypatch.setattr(deleting, "head_all", real)
    assert run("--delete-source") == 0  # unchanged now: the rerun deletes it
    assert summary(capsys.readouterr().out)["deleted"] == 1
    assert keys(s3, SOURCE) == []
    assert body(s3, "avatar/b.png") == new


@pytest.mark.slow
def test_an_upload_between_the_check_and_the_delete_is_kept(cli, db, endpoint, moto):
    """The delete is conditional on the ETag that was copied: S3 refuses the delete of
    an object replaced a moment before it (a proxy answers as AWS documents, since
    moto ignores the condition)."""
    import move
    client = move.make_s3_client()
    ks = [f"image/u{i}.png" for i in range(5)]
    for k in ks:
        put(client, k, PNG + k.encode())
    insert_rows(db, ks)
    new = PNG + b"uploaded during the delete"
    cond = ConditionalDeletes(before=lambda: put(client, "image/u3.png", new))
    with FaultProxy(endpoint, rate=0, intercept=cond) as proxy:
        p = cli("--delete-source", "--json", env={"AWS_ENDPOINT_URL": proxy.url})
    assert p.code == 0, p.err
    assert cond.conditional == 5 and cond.refused == ["image/u3.png"]
    s = summary(p.out)
    assert s["deleted"] == 4 and s["changed_since_copy"] == 1
    assert keys(client, SOURCE) == ["image/u3.png"]
    assert body(client, "image/u3.png", bucket=SOURCE) == new
    assert body(client, "avatar/u3.png", bucket=DEST) == new
    assert rows(db) == [k.replace("image/", "avatar/") for k in ks]


# ---------------------------------------------------------------- a versioned source bucket


def test_versioned_source_is_said_up_front_and_rollback_restores_from_versions(run, s3, db,
                                                                              capsys):
    s3.put_bucket_versioning(Bucket=SOURCE, VersioningConfiguration={"Status": "Enabled"})
    filled(s3, db, "abc")

    assert run("--dry-run", "--delete-source") == 0
    err = capsys.readouterr().err
    assert "is versioned (enabled): --delete-source adds a delete marker" in err
    assert "NoncurrentVersionExpiration" in err

    assert run("--delete-source") == 0
    out, err = capsys.readouterr()
    rid = summary(out)["run_id"]
    assert "is versioned (enabled)" in err
    assert keys(s3, SOURCE) == []  # current versions gone, noncurrent ones kept
    versions = s3.list_object_versions(Bucket=SOURCE)
    assert sorted(v["Key"] for v in versions["Versions"]) == ["image/a.png", "image/b.png",
                                                              "image/c.png"]

    assert run("--rollback", rid) == 0
    back = summary(capsys.readouterr().out)
    assert back["refused"] == 0 and back["rows_restored"] == 3
    assert rows(db) == ["image/a.png", "image/b.png", "image/c.png"]
    for k in ("a", "b", "c"):  # each row points at an object with its own bytes again
        assert body(s3, f"image/{k}.png", bucket=SOURCE) == PNG + f"image/{k}.png".encode()


def test_rollback_says_why_a_version_is_not_there(run, s3, db, capsys):
    s3.put_bucket_versioning(Bucket=SOURCE, VersioningConfiguration={"Status": "Enabled"})
    filled(s3, db, "ab")
    assert run("--delete-source") == 0
    rid = summary(capsys.readouterr().out)["run_id"]
    for v in s3.list_object_versions(Bucket=SOURCE, Prefix="image/b.png")["Versions"]:
        s3.delete_object(Bucket=SOURCE, Key=v["Key"], VersionId=v["VersionId"])  # expired

    assert run("--rollback", rid) == 1
    back = summary(capsys.readouterr().out)
    assert [k["source_key"] for k in back["refused_keys"]] == ["image/b.png"]
    assert back["refused_keys"][0]["reason"].startswith(
        "no version of it is left in s3://legacy-s3")
    assert rows(db) == ["image/a.png", "avatar/b.png"]


# ---------------------------------------------------------------- faults with --delete-source


def objects(bucket: str) -> dict[str, bytes]:
    """key -> bytes, read from moto's backend (its server runs in this process)."""
    from conftest import moto_backend
    return {k: v.value for k, v in moto_backend().get_bucket(bucket).keys.items()}


def assert_nothing_lost(conn, written: dict[str, bytes]) -> None:
    """No row points at a missing object, and the last bytes written under every
    source key survive: in the source, or as its copy (a deleted source only ever
    has a faithful copy)."""
    src, dst = objects(SOURCE), objects(DEST)
    dangling = [p for p in rows(conn)
                if p is None or (p not in dst if p.startswith("avatar/") else p not in src)]
    assert not dangling, f"{len(dangling)} row(s) point at a missing object: {dangling[:5]}"
    lost = [k for k, b in written.items()
            if src.get(k) != b and dst.get("avatar/" + k[len("image/"):]) != b]
    assert not lost, f"{len(lost)} upload(s) lost: {lost[:5]}"


def seeded(conn, n: int) -> dict[str, bytes]:
    from test_faults import body_of, seed
    return {k: body_of(k) for k in seed(conn, n)}


N_FAULT = 1500


@pytest.mark.slow
def test_kill_9_between_copies_and_deletes_then_rerun(db, dsn, endpoint, tmp_path):
    from conftest import Bg
    written = seeded(db, N_FAULT)
    with FaultProxy(endpoint, rate=0, latency=0.002) as proxy:
        run = Bg(tmp_path, dsn, "--delete-source", "--workers", "8",
                 env={"AWS_ENDPOINT_URL": proxy.url})
        # the HEADs right before the deletes: every copy is made, no source deleted yet
        run.wait_until(lambda: proxy.seen["HeadObject"] >= 200, what="the checks before deletes")
        run.proc.kill()
        run.proc.wait(10)
    assert_nothing_lost(db, written)
    assert len(objects(SOURCE)) > 0
    again = Bg(tmp_path, dsn, "--delete-source", "--workers", "8")
    assert again.wait() == 0, again.out + again.err
    assert_nothing_lost(db, written)
    assert objects(SOURCE) == {} and len(objects(DEST)) == N_FAULT
    assert summary(again.out)["deleted"] == N_FAULT


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_stopped_mid_copy_then_rerun(sig, db, dsn, endpoint, tmp_path):
    import signal as signals

    from conftest import Bg
    from test_faults import dest_count
    written = seeded(db, N_FAULT)
    run = Bg(tmp_path, dsn, "--delete-source", "--workers", "4")
    run.wait_until(lambda: dest_count() >= 300, what="copies under way")
    run.proc.send_signal(getattr(signals, sig))
    run.proc.wait(15)
    assert_nothing_lost(db, written)
    again = Bg(tmp_path, dsn, "--delete-source", "--workers", "8")
    assert again.wait() == 0, again.out + again.err
    assert_nothing_lost(db, written)
    assert objects(SOURCE) == {} and rows(db) == sorted(
        "avatar/" + k[len("image/"):] for k in written)


@pytest.mark.slow
def test_postgres_restart_with_delete_source(own_pg, endpoint, tmp_path):  # noqa: F811
    import psycopg2

    from conftest import Bg
    from test_faults import restart_pg
    dsn = own_pg.get_uri()
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE avatars (id SERIAL PRIMARY KEY, path VARCHAR)")
    written = seeded(conn, N_FAULT)
    conn.close()  # the restart ends it
    with FaultProxy(endpoint, rate=0, latency=0.004) as proxy:
        run = Bg(tmp_path, dsn, "--delete-source", "--batch-size", "50", "--workers", "4",
                 env={"AWS_ENDPOINT_URL": proxy.url})
        run.wait_until(lambda: proxy.seen["CopyObject"] >= 500, what="500 copies")
        restart_pg(own_pg, "immediate")
        code = run.wait()
    assert code == 0, run.out + run.err
    assert "database connection lost" in run.err
    conn = psycopg2.connect(dsn)
    assert_nothing_lost(conn, written)
    assert objects(SOURCE) == {}
    conn.close()


@pytest.mark.slow
def test_live_application_during_a_delete_source_run(db, dsn, endpoint, tmp_path):
    """The application uploads new avatars, replaces copied ones and moves rows while
    the run copies and deletes: after a rerun no row points at a missing object and
    no upload is lost."""
    import random
    import threading

    from conftest import Bg, moto_backend
    from test_faults import dest_count
    written = seeded(db, N_FAULT)
    keys_ = sorted(written)
    stop = threading.Event()
    lock = threading.Lock()
    rnd = random.Random(5)

    def application():
        be, n = moto_backend(), 0
        conn = __import__("psycopg2").connect(dsn)
        conn.autocommit = True
        while not stop.is_set():
            n += 1
            with lock:
                if n % 3 == 0:  # a new avatar, and its row
                    k = f"image/new{n:05d}.png"
                    written[k] = PNG + k.encode()
                    be.put_object(SOURCE, k, written[k])
                    insert_rows(conn, [k])
                elif n % 3 == 1:  # a user replaces their picture under the same key
                    k = rnd.choice(keys_)
                    written[k] = PNG + f"{k} v{n}".encode()
                    be.put_object(SOURCE, k, written[k])
                    with conn.cursor() as cur:  # ...and the application points the row at it
                        cur.execute("UPDATE avatars SET path = %s WHERE path = %s",
                                    (k, "avatar/" + k[len("image/"):]))
            stop.wait(0.005)
        conn.close()

    # S3 refuses the delete of an object replaced since its ETag was read (moto does not)
    with FaultProxy(endpoint, rate=0, latency=0.002, intercept=ConditionalDeletes()) as proxy:
        run = Bg(tmp_path, dsn, "--delete-source", "--workers", "8",
                 env={"AWS_ENDPOINT_URL": proxy.url})
        run.wait_until(lambda: dest_count() >= 100, what="copies under way")
        app = threading.Thread(target=application)
        app.start()
        code = run.wait()
        stop.set()
        app.join()
    assert code in (0, 1), run.out + run.err  # 1: a picture replaced after its delete conflicts
    with lock:
        assert_nothing_lost(db, written)
    with FaultProxy(endpoint, rate=0, intercept=ConditionalDeletes()) as proxy:
        again = Bg(tmp_path, dsn, "--delete-source", "--workers", "8",
                   env={"AWS_ENDPOINT_URL": proxy.url})
        assert again.wait() in (0, 1), again.out + again.err
    assert_nothing_lost(db, written)
    print(f"\nlive application: {len(written) - N_FAULT} new uploads; first run "
          f"{summary(run.out)}; rerun {summary(again.out)}")
