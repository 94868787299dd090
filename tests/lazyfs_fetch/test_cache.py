"""ChunkCache on its own: atomic writes, nothing partial ever served, LRU
eviction under a size limit, several processes sharing one directory."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from pathlib import Path

import pytest

from lazyfs.cache import CacheConfig, ChunkCache
from lazyfs.stargz.toc import ChunkRef

BLOB = "sha256:" + "ab" * 32


def chunk(i: int, size: int = 1000) -> tuple[ChunkRef, bytes]:
    data = bytes([i % 256]) * size
    ref = ChunkRef(
        file_offset=0, size=size, blob_offset=i * 10_000, blob_end=i * 10_000 + 5000,
        digest="sha256:" + hashlib.sha256(data).hexdigest(),
    )
    return ref, data


def test_put_then_get_from_another_instance(tmp_path: Path) -> None:
    ref, data = chunk(1)
    ChunkCache(tmp_path).put(BLOB, ref, data)
    other = ChunkCache(tmp_path)  # another process's view: nothing in memory
    assert other.get(BLOB, ref) == data
    assert other.get("sha256:" + "cd" * 32, ref) is None  # keyed by blob too
    assert other.stats()["hits"] == 1


def test_leftover_temp_file_is_never_served(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path)
    ref, data = chunk(2)
    (tmp_path / "tmp" / "1234-1-deadbeef").write_bytes(data[:500])  # a crash mid-write
    assert cache.get(BLOB, ref) is None
    assert not cache.contains(BLOB, ref)


@pytest.mark.parametrize("bad", [b"", b"x" * 10, b"\x02" * 999 + b"\x03", b"\x02" * 1001])
def test_truncated_or_corrupt_entry_is_discarded(tmp_path: Path, bad: bytes) -> None:
    # same-length corruption (the third case) is only caught by re-hashing
    cache = ChunkCache(tmp_path, CacheConfig(verify_on_read=True))
    ref, data = chunk(2)
    path = cache.path_for(BLOB, ref)
    path.parent.mkdir(parents=True)
    path.write_bytes(bad)
    assert cache.get(BLOB, ref) is None
    assert not path.exists()
    assert cache.stats()["bad_entries"] == 1
    cache.put(BLOB, ref, data)
    assert cache.get(BLOB, ref) == data


def test_put_refuses_wrong_length(tmp_path: Path) -> None:
    ref, data = chunk(3)
    with pytest.raises(ValueError):
        ChunkCache(tmp_path).put(BLOB, ref, data[:-1])
    assert not list((tmp_path / "tmp").iterdir())


def test_lru_eviction_keeps_recently_used(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, CacheConfig(max_bytes=10_000, low_water=0.5))
    refs = []
    for i in range(10):  # exactly the limit: no eviction yet
        ref, data = chunk(i)
        cache.put(BLOB, ref, data)
        os.utime(cache.path_for(BLOB, ref), (1000 + i, 1000 + i))  # a clear age order
        refs.append(ref)
    assert all(cache.contains(BLOB, r) for r in refs)
    assert cache.get(BLOB, refs[0]) is not None  # the oldest becomes the newest
    ref, data = chunk(10)
    cache.put(BLOB, ref, data)  # 11,000 bytes > limit: evict down to 5,000
    kept = [i for i, r in enumerate(refs) if cache.contains(BLOB, r)]
    assert kept == [0, 7, 8, 9]
    assert cache.contains(BLOB, ref)
    assert cache.usage() == 5000
    assert cache.stats()["evicted"] == 6


def _writer(root: str, start: int) -> None:
    cache = ChunkCache(root, CacheConfig(max_bytes=40_000, rescan_fraction=0.05))
    for i in range(start, start + 100):
        ref, data = chunk(i)
        cache.put(BLOB, ref, data)
        cache.get(BLOB, chunk(i - 1)[0])


def test_several_processes_share_and_bound_the_cache(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), n * 100)) for n in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    cache = ChunkCache(tmp_path, CacheConfig(max_bytes=40_000))
    cache.evict()
    assert cache.usage() <= 40_000
    served = 0
    for i in range(300):  # whatever survived is whole and correct
        ref, data = chunk(i)
        got = cache.get(BLOB, ref)
        assert got in (None, data)
        served += got is not None
    assert served > 0
    assert cache.stats()["bad_entries"] == 0
    assert not list((tmp_path / "tmp").iterdir())


def test_cache_is_private_to_its_owner(tmp_path):
    import stat

    from lazyfs.cache import ChunkCache

    ChunkCache(tmp_path / "c")
    for d in ("c", "c/chunks", "c/tmp"):
        assert stat.S_IMODE((tmp_path / d).stat().st_mode) == 0o700, d


def test_same_length_corruption_from_before_this_boot_is_caught_by_default(tmp_path: Path) -> None:
    # a power loss may keep the rename of a file and not its data: a file
    # whose mtime is from before this boot is hashed once, even without verify_on_read
    cache = ChunkCache(tmp_path)
    ref, data = chunk(2)
    path = cache.path_for(BLOB, ref)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00" * len(data))
    os.utime(path, (1000, 1000))  # 1970: before any boot
    assert cache.get(BLOB, ref) is None
    assert not path.exists() and cache.stats()["bad_entries"] == 1


def test_a_good_file_from_before_this_boot_is_served_and_then_trusted(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path)
    ref, data = chunk(3)
    cache.put(BLOB, ref, data)
    path = cache.path_for(BLOB, ref)
    os.utime(path, (1000, 1000))
    assert cache.get(BLOB, ref) == data  # hashed: it is good
    assert path.stat().st_mtime > 1000  # touched: from this boot on, not hashed again
    path.write_bytes(b"\x00" * len(data))  # (a change after the check is not caught: see CacheConfig)
    assert cache.get(BLOB, ref) == b"\x00" * len(data)


def test_without_verify_after_boot_an_old_file_is_not_hashed(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, CacheConfig(verify_after_boot=False))
    ref, data = chunk(4)
    path = cache.path_for(BLOB, ref)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00" * len(data))
    os.utime(path, (1000, 1000))
    assert cache.get(BLOB, ref) == b"\x00" * len(data)


def _read_fd(fd: int) -> bytes:
    try:
        return os.pread(fd, 1 << 20, 0)
    finally:
        os.close(fd)


def test_open_checked_gives_only_what_get_would_serve_unhashed(tmp_path: Path) -> None:
    # lazyfs answers READs from the fd (lazyfs/file_replies.py): never a
    # file get() would have to hash or refuse
    cache = ChunkCache(tmp_path)
    ref, data = chunk(5)
    assert cache.open_checked(BLOB, ref) is None  # absent
    cache.put(BLOB, ref, data)
    fd = cache.open_checked(BLOB, ref)
    assert fd is not None and _read_fd(fd) == data
    path = cache.path_for(BLOB, ref)
    os.utime(path, (1000, 1000))  # from before this boot: get() hashes it first
    assert cache.open_checked(BLOB, ref) is None
    assert cache.get(BLOB, ref) == data  # hashed, good, touched
    fd = cache.open_checked(BLOB, ref)
    assert fd is not None and _read_fd(fd) == data
    path.write_bytes(data[:-1])  # short
    assert cache.open_checked(BLOB, ref) is None


def test_open_checked_declines_when_every_read_is_hashed(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, CacheConfig(verify_on_read=True))
    ref, data = chunk(6)
    cache.put(BLOB, ref, data)
    assert cache.open_checked(BLOB, ref) is None
    assert cache.get(BLOB, ref) == data


def test_advise_is_only_a_hint(tmp_path: Path) -> None:
    # the memo's local read-ahead (lazyfs/file_replies.py): not a hit, no LRU touch
    cache = ChunkCache(tmp_path)
    ref, data = chunk(7)
    assert not cache.advise(BLOB, ref)  # absent
    cache.put(BLOB, ref, data)
    path = cache.path_for(BLOB, ref)
    os.utime(path, (1000, 1000))
    assert cache.advise(BLOB, ref)
    assert cache.stats()["hits"] == 0 and path.stat().st_mtime == 1000
