"""Prefetch: the prioritized files arrive in one request at mount; the
background walk makes the whole layer local, paced and yielding to reads,
and stops promptly."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from lazyfs.cache import ChunkCache
from lazyfs.fetcher import RemoteChunks
from lazyfs.prefetch import PrefetchConfig, Prefetcher, TokenBucket, layer_chunks, prioritized_chunks
from lazyfs.remote_layer import RemoteLayer
from lazyfs.stargz import BytesSource, StargzReader
from lazyfs.stargz.errors import TocDigestMismatch
from lazyfs.stargz.toc import EntryType

from .conftest import BIG, PRIORITIZED, Layer, Remote

FAST = PrefetchConfig(rate=200 << 20, burst=4 << 20, span=256 << 10)


def test_prioritized_in_one_request_then_the_whole_layer(remote: Remote, tmp_path: Path) -> None:
    reader = remote.reader()
    priority = prioritized_chunks(reader.toc)
    names = {e.name for e in reader.toc if e.type is EntryType.REG and set(e.chunks) & set(priority)}
    assert names == set(PRIORITIZED)
    remote.proxy.clear()
    cache_dir = tmp_path / "cache"
    with RemoteChunks(remote.source(), remote.layer.digest, ChunkCache(cache_dir)) as store:
        first = Prefetcher(store, reader.toc, PrefetchConfig(background=False))
        first.start()
        assert first.wait_done(10)
        progress = first.progress()
        assert progress["state"] == "done" and progress["priority_done"]
        assert 0 < progress["percent"] < 100
        assert len(remote.blob_gets()) == 1
        assert all(store.is_local(c) for c in priority)

        remote.proxy.clear()
        full = Prefetcher(store, reader.toc, FAST)
        full.start()
        assert full.wait_done(30)
        assert full.progress()["percent"] == 100.0 and full.progress()["failures"] == 0
        assert all(store.is_local(c) for c in layer_chunks(reader.toc))
        assert remote.bytes_requested() < remote.layer.build.size  # the prioritized part was not refetched
    remote.proxy.clear()
    with RemoteChunks(remote.source(), remote.layer.digest, ChunkCache(cache_dir)) as other:
        for name, data in remote.layer.files.items():
            chunks = reader.toc.chunks_for_range(name, 0, len(data))
            assert b"".join(other.get_many(chunks)) == data
    assert remote.blob_gets() == []


class GatedSource(BytesSource):
    """Holds any read that touches ``gate_offset`` until ``release`` is set;
    records the offset of every read."""

    def __init__(self, data: bytes, gate_offset: int) -> None:
        super().__init__(data)
        self.gate_offset = gate_offset
        self.entered = threading.Event()
        self.release = threading.Event()
        self.reads: list[int] = []

    def read_at(self, offset: int, length: int) -> bytes:
        self.reads.append(offset)
        if offset <= self.gate_offset < offset + length:
            self.entered.set()
            assert self.release.wait(10)
        return super().read_at(offset, length)


def test_background_waits_while_a_read_is_fetching(layer: Layer, tmp_path: Path) -> None:
    toc = StargzReader.open(BytesSource(layer.data)).toc
    gated = toc[BIG].chunks[10]
    source = GatedSource(layer.data, gated.blob_offset)
    with RemoteChunks(source, layer.digest, ChunkCache(tmp_path)) as store:
        reading = threading.Thread(target=store.get_many, args=([gated],))
        reading.start()
        assert source.entered.wait(5)
        prefetch = Prefetcher(store, toc, FAST)
        prefetch.start()
        assert prefetch.wait_priority(5)
        time.sleep(0.3)
        reads_while_blocked = len(source.reads)
        assert reads_while_blocked == 2  # the read, and the prioritized files at mount
        assert prefetch.progress()["state"] == "background"
        source.release.set()
        reading.join(5)
        assert prefetch.wait_done(30)
        assert prefetch.progress()["percent"] == 100.0
    assert len(source.reads) > reads_while_blocked


def test_stop_ends_a_slow_background_walk_promptly(layer: Layer, tmp_path: Path) -> None:
    toc = StargzReader.open(BytesSource(layer.data)).toc
    with RemoteChunks(BytesSource(layer.data), layer.digest, ChunkCache(tmp_path)) as store:
        prefetch = Prefetcher(store, toc, PrefetchConfig(rate=64 << 10, burst=64 << 10, span=64 << 10))
        prefetch.start()
        assert prefetch.wait_priority(5)
        time.sleep(0.2)
        started = time.monotonic()
        prefetch.stop(timeout=5)
        assert time.monotonic() - started < 1
        assert prefetch.wait_done(0)
        progress = prefetch.progress()
    assert progress["state"] == "stopped" and progress["percent"] < 100


def test_token_bucket_paces_to_its_rate() -> None:
    now = [0.0]
    slept: list[float] = []

    class FakeStop(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            slept.append(timeout or 0.0)
            now[0] += timeout or 0.0
            return False

    bucket = TokenBucket(rate=1000, burst=500, clock=lambda: now[0])
    stop = FakeStop()
    for _ in range(10):
        assert bucket.take(250, stop)
    # 2,500 bytes at 1,000 B/s with 500 of burst: 2 s of waiting.
    assert abs(now[0] - 2.0) < 1e-6
    assert bucket.take(2000, stop)  # larger than the bucket: goes, then is paid for
    assert not TokenBucket(1, 1).take(10, _set_event())


def _set_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


def test_remote_layer_wires_reader_store_and_prefetch(remote: Remote, tmp_path: Path) -> None:
    with pytest.raises(TocDigestMismatch):
        RemoteLayer.open(remote.source(), remote.layer.digest, None, toc_digest="sha256:" + "1" * 64)
    layer = RemoteLayer.open(
        remote.source(), remote.layer.digest, ChunkCache(tmp_path), toc_digest=remote.layer.build.toc_digest, prefetch=FAST
    )
    with layer:
        layer.start()
        assert layer.prefetcher is not None and layer.prefetcher.wait_done(30)
        status = layer.status()
        toc = layer.reader.toc
        data = b"".join(layer.store.get_many(toc.chunks_for_range("etc/app.conf", 0, 1 << 20)))
    assert data == remote.layer.files["etc/app.conf"]
    assert status["prefetch"]["percent"] == 100.0  # type: ignore[index]
    assert status["fetch"]["digest_failures"] == 0  # type: ignore[index]
    assert status["cache"]["stored"] == len(layer_chunks(toc))  # type: ignore[index]


def test_background_waits_for_its_start_delay_and_for_quiet_reads(layer: Layer, tmp_path: Path) -> None:
    """Start-up reads never queue behind bulk transfers: the walk begins
    ``start_delay`` after start and goes only when reads have been quiet for
    ``idle`` seconds."""
    reader = StargzReader.open(BytesSource(layer.data))
    config = PrefetchConfig(rate=200 << 20, burst=4 << 20, span=256 << 10, start_delay=0.6, idle=0.4)
    with RemoteChunks(BytesSource(layer.data), layer.digest, ChunkCache(tmp_path)) as store:
        prefetch = Prefetcher(store, reader.toc, config)
        started = time.monotonic()
        prefetch.start()
        big = reader.toc.chunks_for_range(BIG, 0, 1)
        # a read every 0.1 s for 1.2 s: never 0.4 s of quiet
        while time.monotonic() - started < 1.2:
            store.get_many(big)
            time.sleep(0.1)
        progress = prefetch.progress()
        assert progress["state"] == "background" and progress["local_bytes"] <= sum(c.size for c in prioritized_chunks(reader.toc)) + big[0].size
        assert prefetch.wait_done(30)
        assert prefetch.progress()["percent"] == 100.0
