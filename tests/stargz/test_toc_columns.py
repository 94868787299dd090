"""The parsed TOC kept in columns: odd values read back as written, entries
and chunks are made on access, and the memory per entry stays small."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from lazyfs.stargz import errors
from lazyfs.stargz.toc import EntryType, Toc

SHA = "sha256:" + "ab" * 32
SHA_B = "sha256:" + "cd" * 32
SHA512 = "sha512:" + "ef" * 64


def _parse(entries: list[dict], payload_size: int = 10_000) -> Toc:
    data = json.dumps({"version": 1, "entries": entries}).encode()
    return Toc.parse(data, digest="sha256:" + "0" * 64, payload_size=payload_size)


def test_odd_values_read_back_as_written() -> None:
    toc = _parse([
        {"name": "big-ids", "type": "reg", "uid": 2**70, "gid": 2**64, "mode": 0o644, "size": 3, "offset": 100,
         "digest": SHA512, "chunkDigest": SHA512, "linkName": "stated anyway", "userName": "ü",
         "modtime": "2021-05-05T05:05:05", "xattrs": {"user.k": "dg=="}},
        {"name": "inner", "type": "reg", "size": 2, "offset": 200, "innerOffset": 7, "digest": SHA, "chunkDigest": SHA_B},
        {"name": "dev", "type": "block", "devMajor": 8, "devMinor": 1},
    ])
    big = toc["big-ids"]
    assert (big.uid, big.gid, big.mode, big.uname, big.link_name) == (2**70, 2**64, 0o644, "ü", "stated anyway")
    assert (big.digest, big.chunks[0].digest, big.xattrs) == (SHA512, SHA512, {"user.k": b"v"})
    assert big.modtime == "2021-05-05T05:05:05" and big.mtime == 1620191105.0
    inner = toc["inner"].chunks[0]
    assert (inner.inner_offset, inner.digest, toc["inner"].digest) == (7, SHA_B, SHA)
    assert (toc["dev"].dev_major, toc["dev"].dev_minor, toc["dev"].type) == (8, 1, EntryType.BLOCK)
    assert toc["big-ids"].chunks[0].blob_end == 200 and inner.blob_end == 10_000
    assert toc.verifiable


def test_entries_are_made_once_while_held_and_by_number() -> None:
    toc = _parse([{"name": "a/b", "type": "reg", "size": 0}, {"name": "a/c", "type": "symlink", "linkName": "b"}])
    b = toc["a/b"]
    assert toc.get("/a/b") is b is toc["./a//b"]
    i = toc.index_of("a/b")
    assert toc.entry_at(i) is b and toc.name_at(i) == "a/b" and toc.base_at(i) == "b"
    assert [toc.base_at(k) for k in toc.children_at(toc.index_of("a"))] == ["b", "c"]
    assert toc["a"].implicit and toc.index_of("a/nope") is None and toc.index_of("../a") is None
    assert toc.link_at(toc.index_of("a/c")) == "b" and toc.link_at(i) == ""


def test_layout_is_every_chunk_in_blob_order() -> None:
    toc = _parse([  # a prioritized file written first but listed last, as some writers do
        {"name": "late", "type": "reg", "size": 4, "offset": 300, "chunkSize": 2},
        {"name": "late", "type": "chunk", "offset": 400, "chunkOffset": 2},
        {"name": "early", "type": "reg", "size": 1, "offset": 10},
    ])
    layout = toc.layout()
    assert [(c.blob_offset, c.blob_end) for c in layout] == [(10, 300), (300, 400), (400, 10_000)]
    assert list(layout.blob_offsets) == [10, 300, 400] and layout[1:] == list(layout)[1:]
    assert toc.chunks_for_range("late", 1, 2) == list(layout)[1:]


def test_a_shared_chunk_offset_names_the_first_file_that_repeats_one() -> None:
    with pytest.raises(errors.OffsetOutOfRange, match="'c'.*second chunk at blob offset 10"):
        _parse([
            {"name": "a", "type": "reg", "size": 1, "offset": 10},
            {"name": "b", "type": "reg", "size": 1, "offset": 20},
            {"name": "c", "type": "reg", "size": 1, "offset": 10},
            {"name": "d", "type": "reg", "size": 1, "offset": 20},
        ])


def test_memory_per_entry_is_small() -> None:
    """The mount keeps its TOC for its whole life: ~1 KB per entry as
    objects, ~160 bytes in columns (10k files, each one chunk and its
    32-byte digest)."""
    entries = [{"name": f"usr/lib/pkg{i // 100}", "type": "dir", "mode": 0o755} for i in range(0, 10_000, 100)]
    entries += [
        {"name": f"usr/lib/pkg{i // 100}/module_{i}.py", "type": "reg", "mode": 0o644, "size": 1000, "offset": i * 600,
         "digest": f"sha256:{i:064x}", "chunkDigest": f"sha256:{i:064x}", "modtime": "2023-11-14T22:13:20Z",
         "userName": "root", "groupName": "root"}
        for i in range(10_000)
    ]
    data = json.dumps({"version": 1, "entries": entries}).encode()
    del entries
    tracemalloc.start()
    try:
        toc = Toc.parse(data, digest="sha256:" + "0" * 64, payload_size=10_000 * 600)
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(toc) == 10_103
    assert kept / len(toc) < 200, f"{kept / len(toc):.0f} bytes per entry"
