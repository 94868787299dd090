"""The prefetch hint: blob ranges named by the layer's descriptor (labels
``containerd.io/snapshot/crfs/prefetch-ranges`` / ``.../stargz.prefetch``)
are fetched while the TOC is read, verified once it is there, and never
served unverified; a bad hint is ignored, a failed one never fails a mount."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from harness.images import push_layers_manifest
from lazyfs.cache import ChunkCache
from lazyfs.layer_source import RemoteOptions, open_layer
from lazyfs.prefetch import PrefetchConfig, layer_chunks
from lazyfs.prefetch_hints import (
    MAX_HINT_BYTES, PREFETCH_RANGES_LABEL, STARGZ_PREFETCH_LABEL, BadPrefetchRanges, parse_prefetch_ranges, prefetch_hint,
)
from lazyfs.remote_layer import RemoteLayer, hint_batches
from lazyfs.remote_source import RegistryBlobSource
from lazyfs.stargz import StargzReader
from lazyfs.stargz.source import BlobSource, BytesSource

from .conftest import REPO, Layer, Remote

# --- the label ----------------------------------------------------------------------


def test_good_ranges_parse() -> None:
    assert parse_prefetch_ranges("0:10,10:5,100:1") == [(0, 10), (10, 5), (100, 1)]
    assert parse_prefetch_ranges("7:3", blob_size=10) == [(7, 3)]


@pytest.mark.parametrize("spec", [
    "", "0", "0:", ":5", "a:1", "0:-1", "-1:5", "0:0", " 0:5", "0:5,", "0:5;6:1", "0x10:5", "1e3:5",
    "0:10,5:10",  # overlapping
    "100:1,0:10",  # unsorted
    "٣:1",  # a non-ASCII digit
])
def test_bad_ranges_are_refused(spec: str) -> None:
    with pytest.raises(BadPrefetchRanges):
        parse_prefetch_ranges(spec)


def test_huge_and_beyond_the_blob_are_refused() -> None:
    with pytest.raises(BadPrefetchRanges):
        parse_prefetch_ranges(f"0:{MAX_HINT_BYTES + 1}")
    with pytest.raises(BadPrefetchRanges):
        parse_prefetch_ranges(",".join(f"{i * 10}:1" for i in range(5000)))
    with pytest.raises(BadPrefetchRanges):
        parse_prefetch_ranges("5:6", blob_size=10)


def test_the_crfs_label_wins_and_bad_labels_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    assert prefetch_hint({}) is None
    assert prefetch_hint({STARGZ_PREFETCH_LABEL: "4096"}) == "0:4096"
    assert prefetch_hint({STARGZ_PREFETCH_LABEL: "4096", PREFETCH_RANGES_LABEL: "10:5,20:5"}) == "10:5,20:5"
    assert prefetch_hint({STARGZ_PREFETCH_LABEL: "4096", PREFETCH_RANGES_LABEL: "20:5,10:5"}) == "0:4096"
    assert prefetch_hint({PREFETCH_RANGES_LABEL: "garbage"}) is None
    assert prefetch_hint({STARGZ_PREFETCH_LABEL: "-5"}) is None
    assert prefetch_hint({STARGZ_PREFETCH_LABEL: str(10 << 30)}) is None
    assert "ignoring label" in caplog.text


def test_hints_are_cut_into_bounded_requests() -> None:
    assert hint_batches([(0, 10), (20, 5)], 100) == [[(0, 10), (20, 5)]]
    assert hint_batches([(0, 250)], 100) == [[(0, 100)], [(100, 100)], [(200, 50)]]
    assert hint_batches([(0, 60), (100, 60)], 100) == [[(0, 60), (100, 40)], [(140, 20)]]
    assert hint_batches([(i * 10, 1) for i in range(5)], 100, max_ranges=2) == [
        [(0, 1), (10, 1)], [(20, 1), (30, 1)], [(40, 1)]]


# --- in the mount process -------------------------------------------------------------


class SlowSource:
    """The layer in memory, each read taking ``delay`` s, every read recorded
    as (thread name, offset, length, start, end)."""

    def __init__(self, data: bytes, delay: float = 0.3) -> None:
        self._inner = BytesSource(data)
        self.delay = delay
        self.reads: list[tuple[str, int, int, float, float]] = []
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self._inner.size

    def read_at(self, offset: int, length: int) -> bytes:
        start = time.monotonic()
        time.sleep(self.delay)
        with self._lock:
            self.reads.append((threading.current_thread().name, offset, length, start, time.monotonic()))
        return self._inner.read_at(offset, length)


def _priority_range(layer: Layer) -> tuple[StargzReader, list[tuple[int, int]]]:
    reader = StargzReader.open(BytesSource(layer.data), toc_digest=layer.build.toc_digest)
    size = reader.toc.prefetch_size
    assert size
    return reader, [(0, size)]


def _hinted(
    source: BlobSource, layer: Layer, cache: Path, ranges: list[tuple[int, int]] | None, prefetch: PrefetchConfig | None = None,
) -> RemoteLayer:
    """``layer`` opened over ``source`` with the hint ``ranges``, chunks cached in ``cache``."""
    return RemoteLayer.open(source, layer.digest, ChunkCache(cache), toc_digest=layer.build.toc_digest,
                            prefetch=prefetch, prefetch_ranges=ranges)


def test_hinted_ranges_travel_with_the_toc_and_are_served_from_the_cache(layer: Layer, tmp_path: Path) -> None:
    reader, ranges = _priority_range(layer)
    source = SlowSource(layer.data)
    with _hinted(source, layer, tmp_path, ranges) as layer_:
        assert layer_.hint is not None and layer_.hint.wait(10)
        hinted = [r for r in source.reads if r[0].startswith("lazyfs-hint")]
        toc_reads = [r for r in source.reads if not r[0].startswith("lazyfs-hint")]
        assert [(off, n) for _, off, n, _, _ in hinted] == ranges
        assert len(toc_reads) >= 2  # footer, TOC
        # the hinted read started before the first TOC read was over: in flight together
        assert hinted[0][3] < toc_reads[0][4]
        status = layer_.status()["hint"]
        wanted = [c for c in layer_chunks(reader.toc) if c.blob_offset < ranges[0][1]]
        assert status["chunks_taken"] == len(wanted) > 0, status  # type: ignore[index]
        assert status["chunks_rejected"] == 0 and status["bytes_fetched"] == ranges[0][1]  # type: ignore[index]
        before = len(source.reads)
        for name in ("bin/app", "etc/app.conf"):
            data = b"".join(layer_.store.get_many(reader.toc.chunks_for_range(name, 0, 1 << 30)))
            assert data == layer.files[name]
        assert len(source.reads) == before  # no request: from the cache


def test_a_hint_replaces_the_landmark_prefetch(layer: Layer, tmp_path: Path) -> None:
    """With a hint, the prefetcher makes no priority request: the hint
    names the bytes a start-up reads, and the prioritized files around them
    are not fetched (``crfs optimize`` hints only the chunks it saw read)."""
    reader, ranges = _priority_range(layer)
    priority = [c for c in layer_chunks(reader.toc) if c.blob_offset < ranges[0][1]]
    half = [(0, priority[len(priority) // 2].blob_offset)]  # the first half of the prioritized chunks
    source = SlowSource(layer.data, delay=0.05)
    with _hinted(source, layer, tmp_path, half, PrefetchConfig(background=False)) as layer_:
        layer_.start()
        assert layer_.prefetcher is not None and layer_.prefetcher.wait_done(10)
        assert layer_.hint is not None and layer_.hint.wait(10)
        hinted = [c for c in priority if c.blob_offset < half[0][1]]
        assert hinted and all(layer_.store.is_local(c) for c in hinted)
        assert not any(layer_.store.is_local(c) for c in priority if c.blob_offset >= half[0][1])
    # nothing after the hint was read but the TOC
    toc_offset = reader.footer.toc_offset
    assert all(off + n <= half[0][1] or off >= toc_offset for _, off, n, _, _ in source.reads), source.reads
    # and no byte twice
    spans = sorted((off, off + n) for _, off, n, _, _ in source.reads)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans


def test_without_a_hint_the_landmark_prefetch_brings_the_prioritized_files(layer: Layer, tmp_path: Path) -> None:
    reader, ranges = _priority_range(layer)
    priority = [c for c in layer_chunks(reader.toc) if c.blob_offset < ranges[0][1]]
    with _hinted(BytesSource(layer.data), layer, tmp_path, None, PrefetchConfig(background=False)) as layer_:
        layer_.start()
        assert layer_.prefetcher is not None and layer_.prefetcher.wait_done(10)
        assert all(layer_.store.is_local(c) for c in priority)


def test_a_hint_beyond_the_blob_is_dropped(layer: Layer, tmp_path: Path) -> None:
    with _hinted(BytesSource(layer.data), layer, tmp_path, [(0, 10), (layer.build.size, 10)]) as layer_:
        assert layer_.hint is not None and layer_.hint.wait(10)
        assert layer_.status()["hint"]["chunks_taken"] == 0  # type: ignore[index]
        assert layer_.store.stats()["in_flight"] == 0 and layer_.store.stats()["chunks_cached"] == 0


def test_both_requests_are_in_flight_at_once_over_the_registry(remote: Remote, tmp_path: Path) -> None:
    """``open_layer`` starts the hinted request before the tail request
    (footer + TOC): both reach the registry before either is answered."""
    reader = remote.reader()
    size = reader.toc.prefetch_size
    remote.proxy.clear()
    remote.proxy.add("stall", r"^GET /v2/.*/blobs/", times=2, delay=1.5)
    opts = RemoteOptions(cache_dir=str(tmp_path / "cache"), background_fetch=False, prefetch_ranges=f"0:{size}",
                         fetch_deadline=10.0)
    out: list[object] = []
    opener = threading.Thread(target=lambda: out.append(open_layer(
        f"registry://{remote.proxy.host}/fetch/layer@{remote.layer.digest}",
        toc_digest=remote.layer.build.toc_digest, remote=opts)))
    opener.start()
    deadline = time.monotonic() + 1.2
    while len(remote.blob_gets()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    seen = sorted(remote.blob_gets())
    opener.join(30)
    assert seen == sorted([f"bytes=-{64 << 10}", f"bytes=0-{size - 1}"]), seen
    [opened] = out
    try:
        deadline = time.monotonic() + 10  # opening is over; the hinted request may still be arriving
        while opened.store_stats()["hint"]["state"] != "done" and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.05)
        hint = opened.store_stats()["hint"]  # type: ignore[attr-defined]
        assert hint["requests"] >= 1 and hint["bytes_fetched"] >= size, hint
        # a read of a prioritized file asks nothing more
        before = len(remote.blob_gets())
        data = b"".join(opened.store.get_many(opened.toc.chunks_for_range("etc/app.conf", 0, 1 << 20)))  # type: ignore[attr-defined]
        assert data == remote.layer.files["etc/app.conf"]
        assert len(remote.blob_gets()) == before, remote.blob_gets()
    finally:
        opened.close()  # type: ignore[attr-defined]


def _source_with_toc(remote: Remote) -> RegistryBlobSource:
    """The footer and the whole TOC (only) in the opening read: opening asks nothing more."""
    toc_offset = remote.reader().footer.toc_offset
    return RegistryBlobSource(remote.repo, remote.layer.digest, tail=remote.layer.build.size - toc_offset)


def test_reads_wait_for_the_hinted_request_instead_of_asking_again(remote: Remote, tmp_path: Path) -> None:
    reader = remote.reader()
    size = reader.toc.prefetch_size
    source = _source_with_toc(remote)
    remote.proxy.clear()
    remote.proxy.add("stall", r"^GET /v2/.*/blobs/", times=1, delay=0.8)
    with _hinted(source, remote.layer, tmp_path, [(0, size)]) as layer_:
        data = b"".join(layer_.store.get_many(reader.toc.chunks_for_range("bin/app", 0, 1 << 30)))
        assert data == remote.layer.files["bin/app"]
        assert layer_.hint is not None and layer_.hint.wait(10)
        assert remote.blob_gets() == [f"bytes=0-{size - 1}"]  # the hinted one only
        assert layer_.store.stats()["chunks_joined"] > 0


def test_corrupted_hinted_bytes_are_never_served(remote: Remote, tmp_path: Path) -> None:
    """The proxy flips the first byte of the hinted answer (the first
    chunk's): that chunk fails verification, is fetched again, and the read
    returns the right bytes; the other chunks are taken."""
    reader = remote.reader()
    chunks = layer_chunks(reader.toc)
    first = chunks[0]
    end = reader.toc.prefetch_size
    source = _source_with_toc(remote)
    remote.proxy.clear()
    remote.proxy.add("corrupt", r"^GET /v2/.*/blobs/", times=1)
    with _hinted(source, remote.layer, tmp_path, [(first.blob_offset, end - first.blob_offset)]) as layer_:
        assert layer_.hint is not None and layer_.hint.wait(10)
        hint = layer_.status()["hint"]
        wanted = [c for c in chunks if c.blob_offset < end]
        assert hint["chunks_rejected"] == 1 and hint["chunks_refetched"] == 1, hint  # type: ignore[index]
        assert hint["chunks_taken"] == len(wanted) - 1  # type: ignore[index]
        assert layer_.store.stats()["digest_failures"] >= 1
        for name in ("bin/app", "etc/app.conf"):
            data = b"".join(layer_.store.get_many(reader.toc.chunks_for_range(name, 0, 1 << 30)))
            assert data == remote.layer.files[name]
        assert len(remote.blob_gets()) == 2  # the hinted request, the one chunk again


def test_a_failed_hinted_request_falls_back_to_ordinary_fetches(remote: Remote, tmp_path: Path) -> None:
    reader = remote.reader()
    size = reader.toc.prefetch_size
    source = _source_with_toc(remote)
    remote.proxy.clear()
    remote.proxy.add("status", r"^GET /v2/.*/blobs/", times=20, status=404)
    with _hinted(source, remote.layer, tmp_path, [(0, size)]) as layer_:
        assert layer_.hint is not None and layer_.hint.wait(20)
        remote.proxy.clear()  # the registry is back
        data = b"".join(layer_.store.get_many(reader.toc.chunks_for_range("etc/app.conf", 0, 1 << 30)))
        assert data == remote.layer.files["etc/app.conf"]
        assert layer_.status()["hint"]["errors"] >= 1  # type: ignore[index]


def _push_manifest(remote: Remote, annotations: dict[str, str]) -> str:
    """An image manifest listing the layer with ``annotations``; its digest."""
    return push_layers_manifest(remote.repo, [(remote.layer.data, annotations)])


@pytest.mark.parametrize("labelled", [True, False])
def test_a_layer_without_labels_takes_its_hint_from_the_manifest(remote: Remote, tmp_path: Path, labelled: bool) -> None:
    """A layer mounted ahead of its Prepare (premount) knows only the
    image's manifest digest: the mount reads its descriptor's hint there,
    beside the tail read; a manifest without one means no hint, not a failure."""
    size = remote.reader().toc.prefetch_size
    digest = _push_manifest(remote, {PREFETCH_RANGES_LABEL: f"0:{size}"} if labelled else {})
    remote.proxy.clear()
    opts = RemoteOptions(cache_dir=str(tmp_path / "cache"), background_fetch=False, prefetch_manifest=digest,
                         fetch_deadline=10.0)
    opened = open_layer(f"registry://{remote.proxy.host}/{REPO}@{remote.layer.digest}",
                        toc_digest=remote.layer.build.toc_digest, remote=opts)
    try:
        assert remote.proxy.requests(rf"^GET /v2/.*/manifests/{digest}")
        if not labelled:
            assert "hint" not in opened.store_stats()
            return
        hint = opened.store_stats()["hint"]
        assert hint["ranges"] == 1 and hint["bytes"] == size, hint
        deadline = time.monotonic() + 10
        while opened.store_stats()["hint"]["state"] != "done" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert opened.store_stats()["hint"]["chunks_taken"] > 0
        assert f"bytes=0-{size - 1}" in remote.blob_gets()
        before = len(remote.blob_gets())
        data = b"".join(opened.store.get_many(opened.toc.chunks_for_range("etc/app.conf", 0, 1 << 20)))
        assert data == remote.layer.files["etc/app.conf"]
        assert len(remote.blob_gets()) == before
    finally:
        opened.close()


def test_an_unavailable_manifest_leaves_the_mount_without_a_hint(remote: Remote, tmp_path: Path, caplog) -> None:
    opts = RemoteOptions(cache_dir=str(tmp_path / "cache"), background_fetch=False,
                         prefetch_manifest="sha256:" + "0" * 64, fetch_deadline=3.0)
    opened = open_layer(f"registry://{remote.proxy.host}/{REPO}@{remote.layer.digest}",
                        toc_digest=remote.layer.build.toc_digest, remote=opts)
    try:
        assert "hint" not in opened.store_stats()
        assert "no prefetch hint from manifest" in caplog.text
        assert b"".join(opened.store.get_many(opened.toc.chunks_for_range("etc/app.conf", 0, 1 << 20))) == \
            remote.layer.files["etc/app.conf"]
    finally:
        opened.close()
