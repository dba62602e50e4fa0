"""avatarmove.listing: manifests, listing order detection and the read-ahead thread.

In-process only: a manifest is a file in tmp_path, an engine is a small stand-in
with list_page() (the interface Listing documents), S3 is never contacted.
"""
from __future__ import annotations

from avatarmove.listing import Obj, read_manifest


def test_read_manifest_decodes_url_encoded_keys(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("src,image/a%20b+c.png\n", encoding="utf-8")
    assert list(read_manifest(str(manifest), "src", "image/")) == [Obj("image/a b c.png")]
