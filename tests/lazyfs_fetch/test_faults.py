"""RemoteChunks when the registry misbehaves: transient faults are retried
by the client and the read succeeds; persistent ones, stalls and corrupted
bytes end in ChunkUnavailable within the configured bound; bytes that fail
verification are never returned nor cached."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from harness.proc import free_port
from lazyfs.cache import ChunkCache
from lazyfs.chunks import ChunkUnavailable
from lazyfs.fetcher import FetchConfig, RemoteChunks
from lazyfs.registry import RegistryClient
from lazyfs.remote_source import RegistryBlobSource
from lazyfs.stargz import BytesSource, StargzReader
from lazyfs.stargz.toc import ChunkRef

from .conftest import BIG, REPO, Layer, Remote, client_config

BLOB_GET = r"^GET /v2/.*/blobs/"


def first_chunks(remote: Remote, n: int = 3) -> tuple[list[ChunkRef], bytes]:
    reader = remote.reader()
    chunks = list(reader.toc[BIG].chunks[:n])
    want = remote.layer.files[BIG][: sum(c.size for c in chunks)]
    return chunks, want


@pytest.mark.parametrize(
    "kind, kw",
    [("reset", {}), ("status", {"status": 503}), ("truncate", {"keep": 0.3}), ("status", {"status": 500})],
)
def test_transient_faults_are_retried(remote: Remote, tmp_path: Path, kind: str, kw: dict) -> None:
    chunks, want = first_chunks(remote)
    remote.proxy.clear()
    remote.proxy.add(kind, BLOB_GET, times=2, **kw)
    with RemoteChunks(remote.source(), remote.layer.digest, ChunkCache(tmp_path)) as store:
        assert b"".join(store.get_many(chunks)) == want
        assert store.stats()["errors"] == 0
    assert len(remote.blob_gets()) == 3


def test_persistent_503_fails_within_the_retry_budget(remote: Remote, tmp_path: Path) -> None:
    chunks, _ = first_chunks(remote)
    remote.proxy.add("status", BLOB_GET, times=1000, status=503)
    cache = ChunkCache(tmp_path)
    with RemoteChunks(remote.source(), remote.layer.digest, cache) as store:
        started = time.monotonic()
        with pytest.raises(ChunkUnavailable):
            store.get_many(chunks)
        assert time.monotonic() - started < 6  # client budget: 4 attempts / 5 s
        assert store.stats()["errors"] == 1
    assert not any(cache.contains(remote.layer.digest, c) for c in chunks)


def test_stall_beyond_the_deadline_fails_the_read_in_time(remote: Remote, tmp_path: Path) -> None:
    chunks, want = first_chunks(remote)
    remote.proxy.clear()
    remote.proxy.add("stall", BLOB_GET, times=1, delay=2.0)
    cache = ChunkCache(tmp_path)
    with RemoteChunks(remote.source(), remote.layer.digest, cache, FetchConfig(deadline=0.5)) as store:
        started = time.monotonic()
        with pytest.raises(ChunkUnavailable, match="within"):
            store.get_many(chunks)
        assert time.monotonic() - started < 1.0
        assert store.stats()["timeouts"] == 1
        # The stalled fetch still completes and lands in the cache.
        until = time.monotonic() + 5
        while store.stats()["in_flight"] and time.monotonic() < until:
            time.sleep(0.05)
        assert b"".join(store.get_many(chunks)) == want
    assert len(remote.blob_gets()) == 1


def test_unreachable_registry_fails_within_the_bound(layer: Layer, tmp_path: Path) -> None:
    with RegistryClient(client_config(retry_budget=1.0, connect_timeout=0.5)) as client:
        repo = client.repository(f"127.0.0.1:{free_port()}/{REPO}")
        source = RegistryBlobSource(repo, layer.digest, layer.build.size)
        reader_chunks = _big_chunks(layer)[:2]
        with RemoteChunks(source, layer.digest, ChunkCache(tmp_path), FetchConfig(deadline=5)) as store:
            started = time.monotonic()
            with pytest.raises(ChunkUnavailable):
                store.get_many(reader_chunks)
            assert time.monotonic() - started < 3


def _big_chunks(layer: Layer) -> list[ChunkRef]:
    return list(StargzReader.open(BytesSource(layer.data)).toc[BIG].chunks)


def test_corruption_once_is_refetched_and_counted(remote: Remote, tmp_path: Path) -> None:
    chunks, want = first_chunks(remote)
    remote.proxy.clear()
    remote.proxy.add("corrupt", BLOB_GET, times=1)
    with RemoteChunks(remote.source(), remote.layer.digest, ChunkCache(tmp_path)) as store:
        assert b"".join(store.get_many(chunks)) == want
        stats = store.stats()
    assert stats["digest_failures"] == 1 and stats["requests"] == 2


def test_persistent_corruption_is_never_served_nor_cached(remote: Remote, tmp_path: Path) -> None:
    chunks, want = first_chunks(remote, 1)
    remote.proxy.add("corrupt", BLOB_GET, times=1000)
    cache = ChunkCache(tmp_path)
    with RemoteChunks(remote.source(), remote.layer.digest, cache) as store:
        for _ in range(2):
            with pytest.raises(ChunkUnavailable, match="verification"):
                store.get_many(chunks)
        assert store.stats()["digest_failures"] == 4
    assert not cache.contains(remote.layer.digest, chunks[0])
    assert cache.stats()["stored"] == 0


def test_wrong_digest_is_a_mismatch_not_served(layer: Layer, tmp_path: Path) -> None:
    """Bytes that decompress fine but hash wrong (a tampered blob, not the wire)."""
    good = _big_chunks(layer)[2]
    forged = dataclasses.replace(good, digest="sha256:" + "0" * 64)
    cache = ChunkCache(tmp_path)
    with RemoteChunks(BytesSource(layer.data), layer.digest, cache) as store:
        with pytest.raises(ChunkUnavailable):
            store.get_many([forged])
        assert store.stats()["digest_failures"] == 2
        assert not cache.contains(layer.digest, good)
        assert len(store.get_many([good])[0]) == good.size
    assert cache.contains(layer.digest, good)
