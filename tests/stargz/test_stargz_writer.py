"""Writing: layout, reported digests, determinism, prioritized files, bad input, memory."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from .helpers import CHUNK, REPO, tar_truth, write_layer_tar

from lazyfs.stargz import errors
from lazyfs.stargz.reader import StargzReader
from lazyfs.stargz.source import FileSource
from lazyfs.stargz.toc import EntryType
from lazyfs.stargz.writer import build


def test_reported_digests(crfs_blob):
    path, result = crfs_blob
    blob = path.read_bytes()
    uncompressed = gzip.decompress(blob)
    assert result.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert result.size == len(blob)
    # like the reference, diffID covers the whole decompressed blob, TOC member included
    assert result.diff_id == "sha256:" + hashlib.sha256(uncompressed).hexdigest()
    assert result.uncompressed_size == len(uncompressed)
    with FileSource(path) as source:
        reader = StargzReader.open(source)
        assert result.toc_digest == "sha256:" + hashlib.sha256(reader.toc_json).hexdigest()


def test_blob_is_a_plain_tar_gz(crfs_blob, layer_tar):
    with tarfile.open(crfs_blob[0]) as tf:
        names = tf.getnames()
        assert names[0] == ".no.prefetch.landmark" and names[-1] == "stargz.index.json"
        hosts = tf.extractfile("etc/hosts").read()
    assert hosts == b"127.0.0.1 localhost\n"
    assert set(names) - set(tar_truth(layer_tar)) == {".no.prefetch.landmark", "stargz.index.json"}


def test_gzip_headers_are_fixed(crfs_blob):
    blob = crfs_blob[0].read_bytes()
    with FileSource(crfs_blob[0]) as source:
        reader = StargzReader.open(source)
    starts = [0, reader.footer.toc_offset] + [c.blob_offset for e in reader.toc for c in e.chunks]
    for start in starts:
        header = blob[start : start + 10]
        assert header[:4] == b"\x1f\x8b\x08\x00" and header[4:8] == bytes(4) and header[9] == 255, start


def test_deterministic(layer_tar, crfs_blob, tmp_path):
    one = build(layer_tar, tmp_path / "one", chunk_size=CHUNK, workers=1)
    three = build(layer_tar, tmp_path / "three", chunk_size=CHUNK, workers=3)
    assert one == three == crfs_blob[1]
    assert (tmp_path / "one").read_bytes() == (tmp_path / "three").read_bytes() == crfs_blob[0].read_bytes()
    # the same layer written again, at another time and place, is the same tar
    again = write_layer_tar(tmp_path / "again.tar")
    assert build(again, tmp_path / "again", chunk_size=CHUNK) == one


def test_gzipped_input(layer_tar, crfs_blob, tmp_path):
    gz = tmp_path / "layer.tar.gz"
    gz.write_bytes(gzip.compress(layer_tar.read_bytes(), mtime=0))
    assert build(gz, tmp_path / "out", chunk_size=CHUNK) == crfs_blob[1]


def test_rebuilding_a_blob_drops_old_toc_and_landmark(crfs_blob, tmp_path):
    """An eStargz blob is a tar.gz: converting it again gives the same layer."""
    rebuilt = build(crfs_blob[0], tmp_path / "again", chunk_size=CHUNK)
    assert rebuilt.toc_digest == crfs_blob[1].toc_digest


def toc_names(path: Path) -> list[str]:
    with FileSource(path) as source:
        return [e["name"] for e in json.loads(StargzReader.open(source).toc_json)["entries"] if e["type"] != "chunk"]


def test_prioritized_files(layer_tar, tmp_path):
    out = tmp_path / "prio"
    build(layer_tar, out, chunk_size=CHUNK, prioritized=["/etc/link", "big.hard", "./deep/" + "d" * 70])
    names = toc_names(out)
    first = names[: names.index(".prefetch.landmark")]
    # parents before children, a hardlink's target before the link, in the given order
    assert first == ["etc/", "etc/link", "big.bin", "big.hard", "deep/", "deep/" + "d" * 70 + "/"]
    assert ".no.prefetch.landmark" not in names
    with FileSource(out) as source:
        toc = StargzReader.open(source).toc
    landmark = toc[".prefetch.landmark"]
    assert toc.prefetch_size == landmark.chunks[0].blob_offset
    assert all(c.blob_offset < toc.prefetch_size for c in toc["big.bin"].chunks)
    assert toc["etc/hosts"].chunks[0].blob_offset > toc.prefetch_size


def test_prioritized_file_missing(layer_tar, tmp_path):
    with pytest.raises(errors.PrioritizedFileNotFound):
        build(layer_tar, tmp_path / "x", prioritized=["no/such/file"])
    assert not (tmp_path / "x").exists()


def tar_of(tmp_path: Path, *members: tuple[str, bytes, dict]) -> Path:
    path = tmp_path / "in.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, attrs in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            data = attrs.pop("data", b"")
            for key, value in attrs.items():
                setattr(info, key, value)
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(data))
    return path


def test_duplicates_keep_the_last(tmp_path):
    src = tar_of(
        tmp_path,
        ("a", tarfile.REGTYPE, {"data": b"first"}),
        ("b", tarfile.REGTYPE, {"data": b"b"}),
        ("./a", tarfile.REGTYPE, {"data": b"second"}),
    )
    build(src, tmp_path / "out")
    with FileSource(tmp_path / "out") as source:
        reader = StargzReader.open(source)
        assert reader.read("a") == b"second"
    assert toc_names(tmp_path / "out") == [".no.prefetch.landmark", "b", "./a"]


def test_tiny_chunks(tmp_path):
    src = tar_of(tmp_path, ("f", tarfile.REGTYPE, {"data": b"0123456789"}))
    build(src, tmp_path / "out", chunk_size=3)
    with FileSource(tmp_path / "out") as source:
        reader = StargzReader.open(source, require_verified=True, toc_digest=build(src, tmp_path / "o2", chunk_size=3).toc_digest)
        assert [c.size for c in reader.toc["f"].chunks] == [3, 3, 3, 1]
        assert reader.read("f", 2, 5) == b"23456"


@pytest.mark.parametrize(
    "members, error",
    [
        ((("../escape", tarfile.REGTYPE, {}),), errors.UnsupportedEntry),
        ((("/abs", tarfile.REGTYPE, {}),), errors.UnsupportedEntry),
        ((("l", tarfile.LNKTYPE, {"linkname": "missing"}),), errors.UnsupportedEntry),
        ((("l", tarfile.LNKTYPE, {"linkname": "../x"}),), errors.UnsupportedEntry),
        ((("f", tarfile.REGTYPE, {}), ("f/x", tarfile.REGTYPE, {})), errors.UnsupportedEntry),
        ((("v", tarfile.GNUTYPE_LONGNAME[:0] + b"V", {}),), errors.UnsupportedEntry),
    ],
    ids=["dotdot", "absolute", "dangling-hardlink", "unsafe-hardlink", "below-a-file", "volume-label"],
)
def test_bad_input_entries(tmp_path, members, error):
    src = tar_of(tmp_path, *[(n, k, dict(a)) for n, k, a in members])
    with pytest.raises(error):
        build(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_a_tar(tmp_path):
    src = tmp_path / "junk"
    src.write_bytes(b"this is not a tar archive" * 100)
    with pytest.raises(errors.InvalidInputTar):
        build(src, tmp_path / "out")
    src.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(errors.InvalidInputTar):
        build(src, tmp_path / "out")


def test_corrupt_header_after_the_first(layer_tar, tmp_path):
    data = bytearray(layer_tar.read_bytes())
    second = data.index(b"etc/hosts")  # a later member's header
    data[second + 148 : second + 156] = b"9999999\0"  # its checksum
    src = tmp_path / "bad.tar"
    src.write_bytes(bytes(data))
    with pytest.raises(errors.InvalidInputTar, match="corrupt tar header"):
        build(src, tmp_path / "out")


def test_truncated_tar(layer_tar, tmp_path):
    src = tmp_path / "cut.tar"
    src.write_bytes(layer_tar.read_bytes()[:20_000])  # inside big.bin's data
    with pytest.raises(errors.InvalidInputTar):
        build(src, tmp_path / "out")


MEMORY_PROBE = """
import resource, sys, tarfile
from lazyfs.stargz.writer import build
build(sys.argv[1], sys.argv[2], chunk_size=1 << 20, level=1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB
"""


def write_big_tar(path: Path, megabytes: int) -> Path:
    piece = b"".join(b"%08d some text, compressible but not all zeros\n" % i for i in range(22_000))[: 1 << 20]
    with open(path, "wb") as f:
        for n in range(4):
            info = tarfile.TarInfo(f"file{n}")
            info.size = (megabytes << 20) // 4
            f.write(info.tobuf(tarfile.PAX_FORMAT))
            for _ in range(megabytes // 4):
                f.write(piece)
        f.write(bytes(1024))
    return path


def peak_rss_kib(src: Path, dst: Path) -> int:
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(src), str(dst)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout)


def test_memory_does_not_grow_with_layer_size(tmp_path):
    small = peak_rss_kib(write_big_tar(tmp_path / "small.tar", 8), tmp_path / "small.esgz")
    large = peak_rss_kib(write_big_tar(tmp_path / "large.tar", 160), tmp_path / "large.esgz")
    assert large - small < 24 * 1024, (small, large)  # 152 MiB more input, < 24 MiB more memory
    with FileSource(tmp_path / "large.esgz") as source:
        reader = StargzReader.open(source)
        assert reader.toc["file3"].type is EntryType.REG and len(reader.toc["file3"].chunks) == 40
