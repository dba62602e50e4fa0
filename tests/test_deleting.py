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
