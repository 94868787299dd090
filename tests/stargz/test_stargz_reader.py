"""Reading: entries, byte ranges across chunks, verification options, legacy stargz."""

from __future__ import annotations

import hashlib
import stat

import pytest
from .helpers import CHUNK, assemble, big_data, sha256, split_blob, tar_truth, to_legacy

from lazyfs.stargz import errors
from lazyfs.stargz.footer import LEGACY_FOOTER_SIZE
from lazyfs.stargz.reader import StargzReader, decode_chunk
from lazyfs.stargz.source import BytesSource, FileSource
from lazyfs.stargz.toc import EntryType
from lazyfs.stargz.verify import layer_digest, verify_contents, verify_layer_digest


@pytest.fixture
def reader(crfs_blob):
    path, result = crfs_blob
    with FileSource(path) as source:
        yield StargzReader.open(source, toc_digest=result.toc_digest, require_verified=True)


def test_every_entry_matches_the_tar(reader, layer_tar):
    truth = tar_truth(layer_tar)
    toc = reader.toc
    for name, want in truth.items():
        entry = toc[name]
        assert entry.type == want["type"], name
        assert (entry.mode, entry.uid, entry.gid) == (want["mode"], want["uid"], want["gid"]), name
        assert entry.xattrs == want["xattrs"], name
        if entry.type is EntryType.REG:
            data = reader.read(name)
            assert (len(data), hashlib.sha256(data).hexdigest()) == (want["size"], want["sha256"]), name
            assert entry.digest == "sha256:" + want["sha256"]
        if entry.type is EntryType.SYMLINK:
            assert entry.link_name == want["linkName"]
        if entry.type is EntryType.HARDLINK:
            assert entry.link_name == want["linkName"]  # already a clean path here
        if entry.type in (EntryType.CHAR, EntryType.BLOCK):
            assert (entry.dev_major, entry.dev_minor) == want["dev"]
    extra = {e.name for e in toc} - set(truth)
    assert extra == {"", ".no.prefetch.landmark", "implied", "implied/parent"}
    assert toc["implied/parent"].implicit and toc["implied/parent"].type is EntryType.DIR
    assert toc.prefetch_size is None


def test_metadata(reader):
    toc = reader.toc
    big = toc["big.bin"]
    assert (big.uname, big.gname, big.mode) == ("user", "group", 0o4755)
    assert toc["etc/hosts"].uname == "root"
    assert big.mtime == 1_700_000_000 and big.modtime == "2023-11-14T22:13:20Z"
    assert toc["dir with space/fïlé ünïcødé.txt"].size == len("héllo wörld\n".encode())
    assert big.nlink == 2 and toc["big.hard"].nlink == 2 and toc["etc/hosts"].nlink == 2
    assert toc.resolve(toc["big.hard"]) is big
    assert toc["etc"].nlink == 2 and toc["deep"].nlink == 3
    assert sorted(toc.children("etc")) == ["hosts", "hosts.hard", "link"]
    assert sorted(toc.children("/")) == sorted(
        [".no.prefetch.landmark", "abs-link", "big.bin", "big.hard", "deep", "dev", "dir with space",
         "empty", "emptydir", "etc", "exact.bin", "implied", "run", "xattr-file"]
    )
    assert toc.get("/etc/hosts") is toc["./etc/hosts"] is toc["etc/hosts"]
    assert toc.get("../etc") is None and toc.get("nope") is None


def test_chunks_tile_files(reader):
    big = reader.toc["big.bin"]
    assert [c.file_offset for c in big.chunks] == [0, CHUNK, 2 * CHUNK, 3 * CHUNK]
    assert [c.size for c in big.chunks] == [CHUNK, CHUNK, CHUNK, 1234]
    assert all(c.digest for c in big.chunks)
    offsets = [c.blob_offset for c in big.chunks]
    assert offsets == sorted(offsets)
    assert all(c.blob_end > c.blob_offset for c in big.chunks)
    assert len(reader.toc["exact.bin"].chunks) == 1 and reader.toc["empty"].chunks == ()


@pytest.mark.parametrize(
    "offset, length",
    [(0, 1), (0, CHUNK), (CHUNK - 1, 2), (CHUNK - 10, CHUNK + 20), (3 * CHUNK, 1234), (3 * CHUNK + 1000, 10_000),
     (5, 0), (10 * CHUNK, 5), (0, 10 * CHUNK)],
)
def test_ranges(reader, offset, length):
    whole = big_data(3 * CHUNK + 1234)
    assert reader.read("big.bin", offset, length) == whole[offset : offset + length]
    assert reader.read("big.hard", offset, length) == whole[offset : offset + length]


def test_chunks_for_range(reader):
    toc = reader.toc
    assert [c.file_offset for c in toc.chunks_for_range("big.bin", CHUNK - 1, 2)] == [0, CHUNK]
    assert [c.file_offset for c in toc.chunks_for_range("big.bin", CHUNK, 1)] == [CHUNK]
    assert toc.chunks_for_range("big.bin", 10 * CHUNK, 1) == []
    assert toc.chunks_for_range("empty", 0, 10) == []
    with pytest.raises(ValueError):
        toc.chunks_for_range("etc", 0, 1)


def test_decode_chunk_from_fetched_bytes(reader, crfs_blob):
    """What lazyfs does with an HTTP range: fetch compressed_range, decode."""
    blob = crfs_blob[0].read_bytes()
    chunk = reader.toc["big.bin"].chunks[2]
    offset, length = chunk.compressed_range
    assert decode_chunk(chunk, [blob[offset : offset + length]]) == big_data(3 * CHUNK + 1234)[2 * CHUNK : 3 * CHUNK]
    with pytest.raises(errors.CorruptChunk):
        decode_chunk(chunk, [blob[offset : offset + 100]])


def test_read_non_regular(reader):
    with pytest.raises(IsADirectoryError):
        reader.read("etc")
    with pytest.raises(KeyError):
        reader.read("missing")


def test_verify_contents(reader):
    report = verify_contents(reader)
    assert report.files == 9 and report.chunks == 11


def test_file_digest_mismatch_is_found(crfs_blob):
    payload, toc = split_blob(crfs_blob[0].read_bytes())
    big = next(e for e in toc["entries"] if e["name"] == "big.bin")
    big["digest"] = sha256(b"not it")
    reader = StargzReader.open(BytesSource(assemble(payload, toc)))
    with pytest.raises(errors.FileDigestMismatch):
        verify_contents(reader)


# --- legacy stargz --------------------------------------------------------------


@pytest.fixture
def legacy_blob(crfs_blob):
    return to_legacy(crfs_blob[0].read_bytes())


def test_legacy_reads_without_verification(legacy_blob, layer_tar):
    reader = StargzReader.open(BytesSource(legacy_blob))
    assert reader.footer.legacy and reader.footer.size == LEGACY_FOOTER_SIZE and reader.toc.legacy
    assert not reader.toc.verifiable
    truth = tar_truth(layer_tar)
    for name, want in truth.items():
        if want["type"] == "reg":
            assert hashlib.sha256(reader.read(name)).hexdigest() == want["sha256"]
    # single-chunk files are still checked, against their whole-file digest
    assert reader.toc["etc/hosts"].chunks[0].digest == reader.toc["etc/hosts"].digest
    assert reader.toc["big.bin"].chunks[0].digest is None


def test_legacy_refused_when_verification_required(legacy_blob):
    with pytest.raises(errors.UnverifiableLayer, match="legacy"):
        StargzReader.open(BytesSource(legacy_blob), toc_digest=sha256(StargzReader.open(BytesSource(legacy_blob)).toc_json))
    with pytest.raises(errors.UnverifiableLayer):
        StargzReader.open(BytesSource(legacy_blob), require_verified=True)
    with pytest.raises(errors.UnverifiableLayer):
        verify_contents(StargzReader.open(BytesSource(legacy_blob)))


def test_legacy_verified_as_a_whole(legacy_blob):
    source = BytesSource(legacy_blob)
    digest = sha256(legacy_blob)
    assert layer_digest(source) == digest
    verify_layer_digest(source, digest)
    with pytest.raises(errors.LayerDigestMismatch):
        verify_layer_digest(BytesSource(legacy_blob[:-1] + b"\x01"), digest)
    verify_contents(StargzReader.open(source), require_chunk_digests=False)


def test_require_verified_needs_toc_digest(crfs_blob):
    with pytest.raises(errors.UnverifiableLayer, match="no TOC digest"):
        StargzReader.open(BytesSource(crfs_blob[0].read_bytes()), require_verified=True)


def test_file_source_reads_exactly(crfs_blob):
    path = crfs_blob[0]
    with FileSource(path) as source:
        assert source.size == path.stat().st_size
        assert source.read_at(source.size - 10, 100) == path.read_bytes()[-10:]
        assert stat.S_ISREG(path.stat().st_mode)
