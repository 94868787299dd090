"""RemoteChunks against a real registry: reads fetch only what they need,
once; the cache serves repeats (also to another instance, as another mount
process would be); neighbours share one request; sources for the footer/TOC."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

from lazyfs.cache import CacheConfig, ChunkCache
from lazyfs.fetcher import FetchConfig, RemoteChunks, plan_spans
from lazyfs.remote_source import HttpBlobSource
from lazyfs.stargz import BytesSource, StargzReader
from lazyfs.stargz.toc import ChunkRef

from .conftest import BIG, Layer, Remote

SMALL = "small/3/f061.txt"


def read_file(store: RemoteChunks, reader: StargzReader, path: str) -> bytes:
    entry = reader.toc[path]
    return b"".join(store.get_many(reader.toc.chunks_for_range(path, 0, entry.size)))


def test_small_file_fetches_a_small_part_then_nothing(remote: Remote, tmp_path: Path) -> None:
    reader = remote.reader()  # footer + TOC through the registry
    remote.proxy.clear()
    cache_dir = tmp_path / "cache"
    with RemoteChunks(remote.source(), remote.layer.digest, ChunkCache(cache_dir)) as store:
        assert read_file(store, reader, SMALL) == remote.layer.files[SMALL]
        assert len(remote.blob_gets()) == 1
        assert remote.bytes_requested() < remote.layer.build.size // 50
        assert read_file(store, reader, SMALL) == remote.layer.files[SMALL]
        assert len(remote.blob_gets()) == 1
        assert store.stats()["chunks_from_cache"] == 1
    # A new store over a new cache object on the same directory: another process.
    with RemoteChunks(remote.source(), remote.layer.digest, ChunkCache(cache_dir)) as other:
        assert read_file(other, reader, SMALL) == remote.layer.files[SMALL]
        assert other.stats()["requests"] == 0
    assert len(remote.blob_gets()) == 1


def test_whole_multichunk_file_is_one_request(remote: Remote, tmp_path: Path) -> None:
    reader = remote.reader()
    assert len(reader.toc[BIG].chunks) > 10
    remote.proxy.clear()
    with RemoteChunks(remote.source(), remote.layer.digest, ChunkCache(tmp_path)) as store:
        assert read_file(store, reader, BIG) == remote.layer.files[BIG]
        stats = store.stats()
    assert len(remote.blob_gets()) == 1
    assert stats["requests"] == 1 and stats["chunks_fetched"] == len(reader.toc[BIG].chunks)


def test_concurrent_reads_of_one_chunk_make_one_request(remote: Remote, tmp_path: Path) -> None:
    reader = remote.reader()
    chunk = reader.toc[BIG].chunks[5]
    remote.proxy.clear()
    remote.proxy.add("stall", r"^GET /v2/.*/blobs/", delay=0.3)  # all readers overlap
    start = threading.Barrier(8)
    results: list[bytes] = []
    with RemoteChunks(remote.source(), remote.layer.digest, ChunkCache(tmp_path)) as store:
        def read() -> None:
            start.wait()
            results.extend(store.get_many([chunk]))
        threads = [threading.Thread(target=read) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        stats = store.stats()
    want = remote.layer.files[BIG][chunk.file_offset : chunk.file_offset + chunk.size]
    assert results == [want] * 8
    assert len(remote.blob_gets()) == 1
    assert stats["requests"] == 1 and stats["chunks_joined"] + stats["chunks_from_cache"] == 7


def test_without_cache_every_read_fetches(remote: Remote) -> None:
    reader = remote.reader()
    remote.proxy.clear()
    with RemoteChunks(remote.source(), remote.layer.digest, None) as store:
        for _ in range(2):
            assert read_file(store, reader, SMALL) == remote.layer.files[SMALL]
    assert len(remote.blob_gets()) == 2


def test_http_blob_source_reads_a_plain_url(remote: Remote, tmp_path: Path) -> None:
    url = f"http://{remote.proxy.host}/v2/fetch/layer/blobs/{remote.layer.digest}"
    source = HttpBlobSource(url)
    try:
        assert source.size == remote.layer.build.size
        reader = StargzReader.open(source, toc_digest=remote.layer.build.toc_digest)
        with RemoteChunks(source, remote.layer.digest, ChunkCache(tmp_path)) as store:
            assert read_file(store, reader, "etc/app.conf") == remote.layer.files["etc/app.conf"]
    finally:
        source.close()


def _ref(offset: int, length: int) -> ChunkRef:
    return ChunkRef(file_offset=0, size=1, blob_offset=offset, blob_end=offset + length)


def test_plan_spans_merges_neighbours_within_gap_and_limit() -> None:
    chunks = [_ref(0, 100), _ref(100, 100), _ref(250, 50), _ref(1000, 10), _ref(1010, 500)]
    spans = plan_spans(list(reversed(chunks)), gap=50, max_span=None)
    assert [(s.offset, s.end, len(s.chunks)) for s in spans] == [(0, 300, 3), (1000, 1510, 2)]
    spans = plan_spans(chunks, gap=0, max_span=250)
    assert [(s.offset, s.end) for s in spans] == [(0, 200), (250, 300), (1000, 1010), (1010, 1510)]


def test_layer_has_what_the_tests_assume(layer: Layer) -> None:
    assert layer.build.size > 2 << 20
    assert len(layer.files) > 100


def test_a_bounded_cache_evicts_and_evicted_chunks_are_fetched_again(remote: Remote, tmp_path: Path) -> None:
    reader = remote.reader()
    cache = ChunkCache(tmp_path, CacheConfig(max_bytes=300_000))
    with RemoteChunks(remote.source(), remote.layer.digest, cache) as store:
        assert read_file(store, reader, BIG) == remote.layer.files[BIG]  # 1.3 MB through a 300 kB cache
        assert cache.usage() <= 300_000 and cache.stats()["evicted"] > 0
        first = reader.toc[BIG].chunks[0]
        assert not cache.contains(remote.layer.digest, first)
        remote.proxy.clear()
        assert store.get_many([first])[0] == remote.layer.files[BIG][: first.size]
        assert len(remote.blob_gets()) == 1


def test_http_blob_source_retries_transient_failures(remote: Remote) -> None:
    url = f"http://{remote.proxy.host}/v2/fetch/layer/blobs/{remote.layer.digest}"
    remote.proxy.add("status", r"^GET /v2/.*/blobs/", times=2, status=503)
    source = HttpBlobSource(url, retry_budget=5)
    try:
        remote.proxy.add("reset", r"^GET /v2/.*/blobs/", times=1)
        assert source.read_at(0, 100) == remote.layer.data[:100]
    finally:
        source.close()
    assert len(remote.blob_gets()) == 5


def test_chunks_without_digest_are_served_but_not_cached_unless_allowed(layer: Layer, tmp_path: Path) -> None:
    """Legacy stargz: nothing proves such a chunk right, so it is not kept."""
    good = StargzReader.open(BytesSource(layer.data)).toc[BIG].chunks[1]
    legacy = dataclasses.replace(good, digest=None)
    want = layer.files[BIG][legacy.file_offset : legacy.file_offset + legacy.size]
    for allowed in (False, True):
        cache = ChunkCache(tmp_path / str(allowed))
        with RemoteChunks(BytesSource(layer.data), layer.digest, cache, FetchConfig(cache_unverified=allowed)) as store:
            assert store.get_many([legacy]) == [want]
        assert cache.contains(layer.digest, legacy) is allowed


def test_a_broken_cache_entry_makes_a_slower_read_not_a_failed_one(layer: Layer, tmp_path: Path) -> None:
    chunk = StargzReader.open(BytesSource(layer.data)).toc[BIG].chunks[0]
    cache = ChunkCache(tmp_path)
    cache.path_for(layer.digest, chunk).mkdir(parents=True)  # unreadable and unreplaceable
    with RemoteChunks(BytesSource(layer.data), layer.digest, cache) as store:
        for _ in range(2):
            assert store.get_many([chunk]) == [layer.files[BIG][: chunk.size]]
        stats = store.stats()
        assert stats["requests"] == 2 and stats["errors"] == 0 and stats["chunks_cached"] == 0


def test_read_around_brings_the_next_small_files_in_the_same_request(remote: Remote, tmp_path: Path) -> None:
    """Start-up reads small files one by one, mostly neighbours in the blob:
    each request also brings what follows it (``read_around`` bytes), so the
    next file is already in the cache; with read_around=0 it is not."""
    from lazyfs.prefetch import layer_chunks

    toc = remote.reader().toc
    small = sorted((e for e in toc if e.name.startswith("small/") and e.chunks), key=lambda e: e.chunks[0].blob_offset)
    first, following = small[0], small[1:6]
    for around, expect_more in ((256 << 10, 0), (0, len(following))):  # (256 KiB: the five files for sure)
        remote.proxy.clear()
        with RemoteChunks(remote.source(), remote.layer.digest, ChunkCache(tmp_path / str(around)),
                          FetchConfig(read_around=around), layout=layer_chunks(toc)) as store:
            assert b"".join(store.get_many(first.chunks)) == remote.layer.files[first.name]
            assert len(remote.blob_gets()) == 1
            for entry in following:
                assert b"".join(store.get_many(entry.chunks)) == remote.layer.files[entry.name]
            assert len(remote.blob_gets()) == 1 + expect_more
            if around:
                assert store.stats()["chunks_read_around"] >= len(following)
