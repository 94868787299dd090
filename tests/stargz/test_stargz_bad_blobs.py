"""Bad blobs give typed errors, never a crash, a hang or a huge allocation."""

from __future__ import annotations

import json
import random
import tarfile
import zlib

import pytest
from .helpers import assemble, file_members, sha256, split_blob, toc_member

from lazyfs.stargz import errors
from lazyfs.stargz.footer import FOOTER_SIZE, encode_footer, parse_footer
from lazyfs.stargz.gzipmember import gzip_member
from lazyfs.stargz.limits import Limits
from lazyfs.stargz.reader import StargzReader
from lazyfs.stargz.source import BytesSource
from lazyfs.stargz.toc import EntryType


def open_blob(blob: bytes, **kwargs) -> StargzReader:
    return StargzReader.open(BytesSource(blob), **kwargs)


def one_file_blob(name: str = "f", data: bytes = b"hello\n", **entry) -> tuple[bytes, dict]:
    """A valid blob with one regular file, and its TOC for tampering."""
    header, body = file_members(name, data)
    toc_entry = {"name": name, "type": "reg", "size": len(data), "offset": len(header), "chunkDigest": sha256(data)}
    toc_entry.update(entry)
    return header + body, {"version": 1, "entries": [toc_entry]}


def test_valid_hand_built_blob_opens():
    payload, toc = one_file_blob()
    reader = open_blob(assemble(payload, toc))
    assert reader.read("f") == b"hello\n"


# --- footer -------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 46, 50])
def test_truncated_blob(size):
    payload, toc = one_file_blob()
    blob = assemble(payload, toc)
    with pytest.raises(errors.InvalidFooter):
        open_blob(blob[:size])


def test_blob_cut_short_loses_footer():
    payload, toc = one_file_blob()
    with pytest.raises(errors.InvalidFooter):
        open_blob(assemble(payload, toc)[:-3])


@pytest.mark.parametrize(
    "position, value",
    [(0, 0x1E), (3, 0x00), (12, ord("X")), (14, 23), (16, ord("g")), (39, ord("Q")), (41, 0), (44, 1), (50, 9)],
    ids=["magic", "flags", "subfield-id", "subfield-len", "hex-offset", "magic-STARGZ", "deflate", "crc", "isize"],
)
def test_corrupt_footer(position, value):
    footer = bytearray(encode_footer(100))
    footer[position] = value
    with pytest.raises(errors.InvalidFooter):
        parse_footer(bytes(footer))


def test_footer_offset_must_be_before_footer():
    payload, toc = one_file_blob()
    blob = assemble(payload, toc)
    bogus = blob[:-FOOTER_SIZE] + encode_footer(len(blob))
    with pytest.raises(errors.InvalidFooter):
        open_blob(bogus)


def test_non_hex_offset_with_sign_is_refused():
    footer = bytearray(encode_footer(100))
    footer[16] = ord("+")  # Go's ParseInt would take it; we do not
    with pytest.raises(errors.InvalidFooter):
        parse_footer(bytes(footer))


# --- TOC ----------------------------------------------------------------------


def test_toc_not_json():
    with pytest.raises(errors.InvalidToc, match="not JSON"):
        open_blob(assemble(b"", b"{this is not json"))


@pytest.mark.parametrize("toc", [b"[]", b'{"entries": {}}', b'{"version": "1", "entries": []}', b'{"entries": [1]}'])
def test_toc_wrong_shape(toc):
    with pytest.raises(errors.InvalidToc):
        open_blob(assemble(b"", toc))


def test_toc_member_with_other_name():
    toc = json.dumps({"version": 1, "entries": []}).encode()
    blob = gzip_member(toc_member(toc, name="other.json"), 6) + encode_footer(0)
    with pytest.raises(errors.InvalidToc, match="other.json"):
        open_blob(blob)


def test_toc_not_gzip():
    blob = b"garbage, not gzip at all" * 10 + encode_footer(0)
    with pytest.raises(errors.InvalidToc):
        open_blob(blob)


def test_toc_gzip_truncated():
    toc = json.dumps({"version": 1, "entries": [{"name": "x" * 1000, "type": "dir"}]}).encode()
    member = gzip_member(toc_member(toc), 6)
    with pytest.raises(errors.InvalidToc):
        open_blob(member[: len(member) // 2] + encode_footer(0))


def test_toc_json_over_cap():
    toc = {"version": 1, "entries": [{"name": f"dir{i}", "type": "dir"} for i in range(100)]}
    blob = assemble(b"", toc)
    open_blob(blob)  # fine by default
    with pytest.raises(errors.TocTooLarge):
        open_blob(blob, limits=Limits(max_toc_size=1000))


def test_toc_bomb_is_refused_before_decompressing():
    """512 MiB of JSON whitespace compresses to 0.5 MiB; the header's size field gives it away."""
    size = 512 << 20
    info = tarfile.TarInfo("stargz.index.json")
    info.size, info.mode = size, 0
    deflater = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [deflater.compress(info.tobuf(tarfile.USTAR_FORMAT))]
    block = b" " * (1 << 20)
    for _ in range(size >> 20):
        parts.append(deflater.compress(block))
    parts.append(deflater.flush())
    member = b"".join(parts)
    assert len(member) < 1 << 20
    with pytest.raises(errors.TocTooLarge):
        open_blob(member + encode_footer(0), limits=Limits(max_toc_size=16 << 20))


def test_compressed_toc_over_cap():
    payload = bytes(3 << 20)
    with pytest.raises(errors.TocTooLarge):
        open_blob(payload + encode_footer(0), limits=Limits(max_toc_size=1 << 20))


# --- entries ----------------------------------------------------------------------


def toc_of(*entries: dict) -> dict:
    return {"version": 1, "entries": list(entries)}


@pytest.mark.parametrize(
    "name", ["../etc/passwd", "a/../../x", "a/..", "/etc/passwd", "/", "a\x00b", "..", "./../x"]
)
def test_unsafe_names(name):
    with pytest.raises(errors.UnsafePath):
        open_blob(assemble(b"", toc_of({"name": name, "type": "dir"})))


@pytest.mark.parametrize("target", ["../outside", "/etc/passwd", "a\x00"])
def test_unsafe_hardlink_target(target):
    toc = toc_of({"name": "f", "type": "reg"}, {"name": "l", "type": "hardlink", "linkName": target})
    with pytest.raises(errors.InvalidEntry):
        open_blob(assemble(b"", toc))


def test_symlink_target_may_be_absolute_but_not_nul():
    reader = open_blob(assemble(b"", toc_of({"name": "l", "type": "symlink", "linkName": "/etc/passwd"})))
    assert reader.toc["l"].link_name == "/etc/passwd"
    with pytest.raises(errors.InvalidEntry):
        open_blob(assemble(b"", toc_of({"name": "l", "type": "symlink", "linkName": "a\x00b"})))


@pytest.mark.parametrize("second", ["a", "./a", "a/", "/a".lstrip("/"), ".//a"])
def test_duplicate_names(second):
    toc = toc_of({"name": "a", "type": "dir"}, {"name": second, "type": "dir"})
    with pytest.raises(errors.DuplicateEntry):
        open_blob(assemble(b"", toc))


def test_hardlink_to_missing_target():
    toc = toc_of({"name": "l", "type": "hardlink", "linkName": "nowhere"})
    with pytest.raises(errors.MissingLinkTarget):
        open_blob(assemble(b"", toc))


def test_hardlink_to_directory():
    toc = toc_of({"name": "d", "type": "dir"}, {"name": "l", "type": "hardlink", "linkName": "d"})
    with pytest.raises(errors.MissingLinkTarget):
        open_blob(assemble(b"", toc))


def test_hardlink_cycle():
    toc = toc_of(
        {"name": "a", "type": "hardlink", "linkName": "b"}, {"name": "b", "type": "hardlink", "linkName": "a"}
    )
    with pytest.raises(errors.MissingLinkTarget, match="cycle"):
        open_blob(assemble(b"", toc))


def test_entry_below_a_file():
    toc = toc_of({"name": "f", "type": "reg"}, {"name": "f/x", "type": "reg"})
    with pytest.raises(errors.InvalidEntry, match="not a directory"):
        open_blob(assemble(b"", toc))


def test_entry_below_a_symlink():
    toc = toc_of({"name": "s", "type": "symlink", "linkName": "/etc"}, {"name": "s/passwd", "type": "reg"})
    with pytest.raises(errors.InvalidEntry, match="not a directory"):
        open_blob(assemble(b"", toc))


@pytest.mark.parametrize(
    "entry",
    [
        {"name": "x", "type": "socket"},
        {"name": "x", "type": "reg", "size": "12"},
        {"name": "x", "type": "reg", "size": -1},
        {"name": "x", "type": "reg", "size": True},
        {"name": "x", "type": "dir", "mode": 1.5},
        {"name": 7, "type": "dir"},
        {"name": "x", "type": "dir", "xattrs": {"user.a": "not base64!"}},
        {"name": "x", "type": "dir", "xattrs": ["user.a"]},
        {"name": "x", "type": "dir", "modtime": "yesterday"},
        {"name": "x", "type": "reg", "digest": "md5:abc"},
        {"name": "", "type": "reg"},
    ],
    ids=lambda e: json.dumps(e)[:40],
)
def test_malformed_entry(entry):
    with pytest.raises(errors.InvalidEntry):
        open_blob(assemble(b"", toc_of(entry)))


def test_offset_outside_payload():
    payload, toc = one_file_blob()
    toc["entries"][0]["offset"] = len(payload) + 10
    with pytest.raises(errors.OffsetOutOfRange):
        open_blob(assemble(payload, toc))


def test_two_chunks_at_one_offset():
    payload, toc = one_file_blob()
    second = dict(toc["entries"][0], name="g")
    toc["entries"].append(second)
    with pytest.raises(errors.OffsetOutOfRange, match="second chunk"):
        open_blob(assemble(payload, toc))


@pytest.mark.parametrize(
    "entries",
    [
        # chunks cover 4 of 10 bytes
        [{"name": "f", "type": "reg", "size": 10, "offset": 1, "chunkSize": 4}],
        # a gap between chunks
        [
            {"name": "f", "type": "reg", "size": 10, "offset": 1, "chunkSize": 4},
            {"name": "f", "type": "chunk", "offset": 2, "chunkOffset": 5, "chunkSize": 5},
        ],
        # a chunk past the end of the file
        [
            {"name": "f", "type": "reg", "size": 10, "offset": 1, "chunkSize": 4},
            {"name": "f", "type": "chunk", "offset": 2, "chunkOffset": 4, "chunkSize": 9},
        ],
        # the first chunk does not start at 0
        [{"name": "f", "type": "reg", "size": 10, "offset": 1, "chunkOffset": 3}],
        # a chunk of an empty file
        [{"name": "f", "type": "reg", "size": 0}, {"name": "f", "type": "chunk", "offset": 2, "chunkSize": 1}],
    ],
    ids=["short", "gap", "overrun", "first-not-zero", "empty-file-chunk"],
)
def test_sizes_do_not_add_up(entries):
    with pytest.raises(errors.SizeMismatch):
        open_blob(assemble(bytes(100), toc_of(*entries)))


def test_chunk_without_file():
    toc = toc_of({"name": "d", "type": "dir"}, {"name": "d", "type": "chunk", "offset": 1, "chunkSize": 1})
    with pytest.raises(errors.InvalidEntry, match="does not follow"):
        open_blob(assemble(bytes(10), toc))


def test_chunk_of_another_file():
    toc = toc_of(
        {"name": "f", "type": "reg", "size": 2, "offset": 1, "chunkSize": 1},
        {"name": "g", "type": "chunk", "offset": 2, "chunkOffset": 1},
    )
    with pytest.raises(errors.InvalidEntry, match="follows"):
        open_blob(assemble(bytes(10), toc))


def test_chunk_over_memory_cap():
    toc = toc_of({"name": "f", "type": "reg", "size": 1 << 30, "offset": 1})
    with pytest.raises(errors.ChunkTooLarge):
        open_blob(assemble(bytes(10), toc))


# --- contents ------------------------------------------------------------------------


def test_chunk_digest_mismatch():
    payload, toc = one_file_blob(chunkDigest=sha256(b"something else"))
    reader = open_blob(assemble(payload, toc))
    with pytest.raises(errors.ChunkDigestMismatch):
        reader.read("f")


def test_corrupt_chunk_bytes(crfs_blob):
    path, result = crfs_blob
    blob = bytearray(path.read_bytes())
    reader = open_blob(bytes(blob), toc_digest=result.toc_digest)
    chunk = reader.toc["big.bin"].chunks[1]
    blob[chunk.blob_offset + 40] ^= 0xFF  # inside the deflate data
    reader = open_blob(bytes(blob), toc_digest=result.toc_digest)
    with pytest.raises((errors.ChunkDigestMismatch, errors.CorruptChunk)):
        reader.read_chunk(chunk)
    assert reader.read("etc/hosts") == b"127.0.0.1 localhost\n"  # the rest still reads


def test_declared_size_larger_than_data():
    payload, toc = one_file_blob(size=5000, chunkDigest="")
    reader = open_blob(assemble(payload, toc))
    with pytest.raises(errors.CorruptChunk):
        reader.read("f")


def test_offset_pointing_at_non_gzip():
    payload, toc = one_file_blob(offset=3)
    reader = open_blob(assemble(payload, toc))
    with pytest.raises(errors.CorruptChunk):
        reader.read("f")


def test_toc_digest_mismatch(crfs_blob):
    path, result = crfs_blob
    with pytest.raises(errors.TocDigestMismatch):
        open_blob(path.read_bytes(), toc_digest=sha256(b"another toc"))


def test_missing_chunk_digest_with_toc_digest(crfs_blob):
    path, _ = crfs_blob
    payload, toc = split_blob(path.read_bytes())
    del next(e for e in toc["entries"] if e["type"] == "chunk")["chunkDigest"]
    blob = assemble(payload, toc)
    digest = sha256(StargzReader.open(BytesSource(blob)).toc_json)
    with pytest.raises(errors.UnverifiableLayer):
        open_blob(blob, toc_digest=digest)


def test_mutated_blobs_only_raise_stargz_errors(crfs_blob):
    """Random byte flips anywhere: opening and reading everything either works
    or raises a StargzError; nothing else escapes."""
    path, result = crfs_blob
    original = path.read_bytes()
    rnd = random.Random(42)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(150):
        blob = bytearray(original)
        # bias towards the TOC and footer, where the structure is
        region = rnd.choice([(0, len(blob)), (len(blob) - 3000, len(blob))])
        for _ in range(rnd.randint(1, 4)):
            blob[rnd.randrange(*region)] = rnd.randrange(256)
        try:
            reader = open_blob(bytes(blob))
            for entry in reader.toc:
                if entry.type is EntryType.REG:
                    reader.read(entry.name)
            outcomes["ok"] += 1
        except errors.StargzError:
            outcomes["error"] += 1
    assert outcomes["error"] > 0
