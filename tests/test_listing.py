"""avatarmove.listing: manifests, listing order detection and the read-ahead thread.

In-process only: a manifest is a file in tmp_path; listings come from moto
(mock_aws) through the real boto3 engine, and where a server must list out of
order (which moto never does) its pages are reordered on the way.
"""
from __future__ import annotations

import gc
import itertools
import logging
import threading
import time

import pytest

from avatarmove.copying import Boto3Engine
from avatarmove.listing import Listing, Obj, check_manifest, prefetch, read_manifest
from avatarmove.settings import UsageError
from conftest import SOURCE, put

# --------------------------------------------------------------------------- manifests


def manifest(tmp_path, text: str | bytes):
    path = tmp_path / "manifest.csv"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


READ = {
    # case: (manifest text, keys read from it under image/)
    "url-encoded": ("src,image/with+space.png\nsrc,image/plus%2Bsign.png\n"
                    "src,image%2Fslash%2Fin%2Fkey.png\nsrc,image/caf%C3%A9.png\n"
                    "src,image/100%25.png\n",
                    ["image/with space.png", "image/plus+sign.png", "image/slash/in/key.png",
                     "image/café.png", "image/100%.png"]),
    "header-row": ("Bucket,Key\nsrc,image/a.png\n", ["image/a.png"]),
    "inventory-columns": ('"src","image/a.png","32","0123abcd"\n', ["image/a.png"]),
    "blank-lines": ("\nsrc,image/a.png\n\nsrc,image/b.png\n", ["image/a.png", "image/b.png"]),
    # outside the source prefix: not this migration's, skipped without an error
    "outside-prefix": ("src,other/a.png\nsrc,images/b.png\nsrc,image/c.png\n", ["image/c.png"]),
    # the filter on .png is planning's: the manifest keeps every key under the prefix
    "not-png": ("src,image/readme.txt\n", ["image/readme.txt"]),
    "empty": ("", []),
}


@pytest.mark.parametrize("case", list(READ))
def test_read_manifest(case, tmp_path):
    text, expected = READ[case]
    path = manifest(tmp_path, text)
    assert list(read_manifest(path, "src", "image/")) == [Obj(k) for k in expected]
    assert check_manifest(path, "src", "image/") == len(expected)


BAD = {
    # case: (manifest text, what the one-line message must say)
    "another-bucket": ("src,image/a.png\nother,image/b.png\n", [":2:", "'other'", "'src'"]),
    "short-row": ("src,image/a.png\nimage/b.png\n", [":2:", "expected 'bucket,key'"]),
    "header-not-first": ("src,image/a.png\nbucket,key\n", [":2:", "'bucket'"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_manifest_is_a_usage_error_naming_the_line(case, tmp_path):
    text, fragments = BAD[case]
    path = manifest(tmp_path, text)
    with pytest.raises(UsageError) as exc:
        check_manifest(path, "src", "image/")
    message = str(exc.value)
    assert "\n" not in message and message.startswith(path)
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("case", ["missing", "a-directory", "not-utf-8", "not-a-csv"])
def test_unreadable_manifest_is_one_line(case, tmp_path):
    if case == "missing":
        path, says = str(tmp_path / "nope.csv"), "cannot read manifest"
    elif case == "a-directory":
        path, says = str(tmp_path), "cannot read manifest"
    elif case == "not-utf-8":
        path, says = manifest(tmp_path, b"src,image/caf\xe9.png\n"), "is not a UTF-8 CSV"
    else:  # a field over the csv module's limit: a binary file given by mistake
        path, says = manifest(tmp_path, b"src," + b"x" * 200_000 + b"\n"), "is not a UTF-8 CSV"
    with pytest.raises(UsageError) as exc:
        check_manifest(path, "src", "image/")
    message = str(exc.value)
    assert "\n" not in message and says in message and path in message, message


# --------------------------------------------------------------------------- Listing


class FolderFirst:
    """The boto3 engine, but each page sorted as a file-system-backed server lists a
    folder: its entries before its sibling files ("a/b.png" before "a-c.png")."""

    def __init__(self, engine):
        self.engine = engine

    def list_page(self, bucket, prefix, token, max_keys):
        objs, token = self.engine.list_page(bucket, prefix, token, max_keys)
        return sorted(objs, key=lambda o: o.key.split("/")), token


def test_listing_reads_every_page_in_order(s3):
    names = [f"image/k{i:02d}.png" for i in range(7)] + ["image/z/last.png"]
    for k in names:
        put(s3, k)
    put(s3, "other/x.png")
    listing = Listing(Boto3Engine(s3), SOURCE, "image/", page_size=3)
    got = list(listing)
    assert [o.key for o in got] == names
    assert all(o.size == 32 and o.etag and '"' not in o.etag for o in got)
    assert listing.pages_read == 3 and listing.ordered


@pytest.mark.parametrize("page_size", [1000, 1], ids=["in-one-page", "across-pages"])
def test_listing_out_of_order_is_detected(page_size, s3, caplog):
    for k in ("image/a-c.png", "image/a/b.png", "image/b.png"):
        put(s3, k)
    listing = Listing(FolderFirst(Boto3Engine(s3)), SOURCE, "image/", page_size=page_size)
    with caplog.at_level(logging.WARNING, logger="move"):
        keys = [o.key for o in listing]
    if page_size == 1:  # one key a page: nothing to reorder, the order holds
        assert keys == ["image/a-c.png", "image/a/b.png", "image/b.png"]
        assert listing.ordered
        assert "out of binary order" not in caplog.text
    else:
        assert keys == ["image/a/b.png", "image/a-c.png", "image/b.png"]  # nothing lost
        assert not listing.ordered
        assert caplog.text.count("out of binary order") == 1, caplog.text  # warned once
        assert "checking each destination" in caplog.text


def test_listing_out_of_order_across_a_page_break_is_detected(s3):
    class SecondPageFirst:
        """Two pages served in the wrong order."""

        def __init__(self):
            self.pages = [([Obj("image/b.png")], "t"), ([Obj("image/a.png")], None)]

        def list_page(self, bucket, prefix, token, max_keys):
            return self.pages.pop(0)

    listing = Listing(SecondPageFirst(), SOURCE, "image/")
    assert [o.key for o in listing] == ["image/b.png", "image/a.png"]
    assert not listing.ordered and listing.pages_read == 2


# --------------------------------------------------------------------------- prefetch


def test_prefetch_yields_everything_in_order():
    stop = threading.Event()
    assert list(prefetch(iter(range(50)), 4, stop)) == list(range(50))


def test_prefetch_reraises_the_listers_error_after_what_came_before():
    def pages():
        yield "page 1"
        yield "page 2"
        raise ConnectionError("listing failed on page 3")

    got = []
    with pytest.raises(ConnectionError, match="listing failed on page 3"):
        for page in prefetch(pages(), 4, threading.Event()):
            got.append(page)
    assert got == ["page 1", "page 2"]


def test_prefetch_stops_on_the_stop_event_and_so_does_its_thread():
    """An endless lister: after stop, the consumer ends and the thread stops pulling
    (the depth bound keeps it at most a few pages ahead meanwhile)."""
    pulled = []
    lister: list[threading.Thread] = []

    def endless():
        lister.append(threading.current_thread())
        n = 0
        while True:
            pulled.append(n)
            yield n
            n += 1

    stop = threading.Event()
    it = prefetch(endless(), 2, stop)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    stop.set()
    rest = list(it)  # ends instead of waiting for an end that never comes
    assert rest == list(range(3, 3 + len(rest))) and len(rest) <= 2 + 1
    lister[0].join(timeout=30)
    assert not lister[0].is_alive(), "the lister thread kept going after stop"
    assert len(pulled) <= 3 + len(rest) + 2  # no more than the bound ahead


def test_prefetch_asks_at_once_so_two_listings_wait_one_round_trip_not_two():
    """plan() awaits the destination's first page before it reads the source: the
    source must already be asking by then, or the run waits two round trips."""
    src_asked = threading.Event()
    dest_saw_src_asking = []

    def dest_pages():
        dest_saw_src_asking.append(src_asked.wait(timeout=10))
        yield "dest page"

    def src_pages():
        src_asked.set()
        yield "src page"

    stop = threading.Event()
    src, dest = prefetch(src_pages(), 4, stop), prefetch(dest_pages(), 4, stop)
    assert next(dest) == "dest page" and next(src) == "src page"
    assert dest_saw_src_asking == [True]


def test_a_prefetch_dropped_unread_stops_its_thread():
    lister: list[threading.Thread] = []

    def endless():
        lister.append(threading.current_thread())
        yield from itertools.count()

    it = prefetch(endless(), 2, threading.Event())
    deadline = time.monotonic() + 10
    while not lister and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lister, "the lister did not start before the first next()"
    del it
    gc.collect()
    lister[0].join(timeout=30)
    assert not lister[0].is_alive(), "the lister thread kept going for a reader that is gone"
