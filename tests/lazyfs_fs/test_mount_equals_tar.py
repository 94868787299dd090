"""A mounted layer is what ``tar -x`` of the same layer leaves on disk, for
eStargz by crfs, eStargz by the Go reference and legacy stargz."""

from __future__ import annotations

import errno
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from stargz.helpers import big_data, CHUNK

from lazyfs import mount
from lazyfs.layer_source import RemoteOptions

from .helpers import assert_same_tree, force_unmount, kill, mounted, range_server, snapshot

IMPLICIT_DIRS = frozenset({"implied", "implied/parent"})  # tar makes them "now"


@pytest.fixture(params=["crfs", "go", "legacy"])
def blob(request: pytest.FixtureRequest) -> tuple[Path, str | None]:
    if request.param == "crfs":
        path, result = request.getfixturevalue("crfs_blob")
        return path, result.toc_digest
    if request.param == "go":
        return request.getfixturevalue("go_blob")
    return request.getfixturevalue("legacy_blob"), None


def test_mount_equals_tar_extraction(blob, extracted: Path, tmp_path: Path) -> None:
    path, toc_digest = blob
    expected = snapshot(extracted, skip_mtime=IMPLICIT_DIRS)
    with mounted(path, tmp_path / "mnt", toc_digest=toc_digest):
        actual = snapshot(tmp_path / "mnt", skip_mtime=IMPLICIT_DIRS)
    assert_same_tree(actual, expected)


def test_reads_at_any_offset(crfs_blob, tmp_path: Path) -> None:
    """Reads that start and end inside chunks, across chunk borders, past EOF."""
    big = big_data(3 * CHUNK + 1234)
    mnt = tmp_path / "mnt"
    with mounted(crfs_blob[0], mnt):
        fd = os.open(mnt / "big.bin", os.O_RDONLY)
        try:
            for off, length in [(0, 1), (CHUNK - 3, 7), (CHUNK, CHUNK), (5, 3 * CHUNK), (3 * CHUNK + 1000, 5000), (len(big), 10)]:
                assert os.pread(fd, length, off) == big[off : off + length], (off, length)
        finally:
            os.close(fd)


def test_read_only_and_stable_inodes(crfs_blob, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(crfs_blob[0], mnt):
        first = {p: os.lstat(mnt / p).st_ino for p in ("etc", "etc/hosts", "big.bin", "dev/null")}
        assert os.lstat(mnt / "etc/hosts.hard").st_ino == first["etc/hosts"]
        with pytest.raises(OSError) as exc:
            open(mnt / "etc/hosts", "a")
        assert exc.value.errno == errno.EROFS
        with pytest.raises(OSError):
            (mnt / "new").write_text("x")
        assert not (mnt / "stargz.index.json").exists()
        assert not (mnt / ".prefetch.landmark").exists() and not (mnt / ".no.prefetch.landmark").exists()
        assert {p: os.lstat(mnt / p).st_ino for p in first} == first
        vfs = os.statvfs(mnt)
        assert vfs.f_bavail == 0 and vfs.f_files > 20


def test_remote_layer_over_http_equals_tar(crfs_blob, extracted: Path, tmp_path: Path) -> None:
    """The same layer served by Range requests (lazyfs.remote_layer: fetcher,
    disk cache, background prefetch)."""
    path, result = crfs_blob
    remote = RemoteOptions(cache_dir=str(tmp_path / "cache"), blob_digest=result.digest)
    with range_server(path.parent) as url:
        source = f"{url}/{path.name}"
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        pid = mount.start(source, mnt, toc_digest=result.toc_digest, remote=remote)
        try:
            actual = snapshot(mnt, skip_mtime=IMPLICIT_DIRS)
            store = mount.status(mnt)["store"]
        finally:
            force_unmount(mnt)
            kill(pid)
    assert_same_tree(actual, snapshot(extracted, skip_mtime=IMPLICIT_DIRS))
    assert {"fetch", "cache", "prefetch"} <= set(store), store
    assert any((tmp_path / "cache").rglob("*")), "chunks were cached"


def test_concurrent_readers_fetch_each_chunk_once(crfs_blob, tmp_path: Path) -> None:
    big = big_data(3 * CHUNK + 1234)
    mnt = tmp_path / "mnt"
    with mounted(crfs_blob[0], mnt):
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: (mnt / "big.bin").read_bytes(), range(8)))
        assert all(r == big for r in results)
        status = mount.status(mnt)
    assert status["chunks_fetched"] == 4 and status["read_errors"] == 0
