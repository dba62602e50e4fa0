"""The table-wide queries (avatarmove/counts.py) against a real PostgreSQL."""
from test_rewrite import add, ready


def test_table_counts_rows_left_under_the_source_and_outside_both_prefixes(db, dsn):
    add(db, "image/a.png", "image/b/c.png", "avatar/a.png", "images/x.png", "other/image/y.png",
        "", None)
    d = ready(dsn, "snapshot")
    try:
        assert d.table_counts() == (2, 4)
    finally:
        d.close()
