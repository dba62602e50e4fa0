import pytest

from conftest import DEST, SOURCE, insert_rows, keys, put, rows, summary


def test_moves_objects_and_rewrites_rows(run, s3, db):
    put(s3, "image/avatar-1.png")
    put(s3, "image/team/avatar-2.png")
    insert_rows(db, ["image/avatar-1.png", "image/team/avatar-2.png"])
    assert run() == 0
    assert keys(s3, DEST) == ["avatar/avatar-1.png", "avatar/team/avatar-2.png"]
    assert rows(db) == ["avatar/avatar-1.png", "avatar/team/avatar-2.png"]
    assert keys(s3, SOURCE) == ["image/avatar-1.png", "image/team/avatar-2.png"]


@pytest.mark.slow
def test_seeder_then_move_as_subprocesses(cli, db, endpoint):
    seeded = cli("25", script="seed/seeder.py")
    assert seeded.code == 0, seeded.err
    moved = cli("--json")
    assert moved.code == 0, moved.err
    assert summary(moved.out)["copied"] == 25
    assert all(p.startswith("avatar/") for p in rows(db)) and len(rows(db)) == 25
