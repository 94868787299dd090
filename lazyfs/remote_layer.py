"""One remote layer, ready to mount: TOC read, chunk store, prefetch — the
pieces a lazy mount wires together, started and stopped in the right order.

    layer = RemoteLayer.open(RegistryBlobSource(repo, digest), digest, ChunkCache(dir), toc_digest=toc)
    layer.start()                # prioritized files, then the background walk
    fs = ...(layer.reader.toc, layer.store)
    layer.status()               # for the mount's status query
    # prefetch_ranges=[(off, n), ...]: fetched while the TOC is read (``HintedFetch``)
    layer.close()                # prefetch stopped first, then the fetch threads
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from .cache import ChunkCache
from .chunks import ChunkUnavailable
from .fetcher import ChunkKey, FetchConfig, RemoteChunks, chunk_key
from .fetchslots import FetchSlots
from .prefetch import PrefetchConfig, Prefetcher, layer_chunks
from .stargz.reader import StargzReader
from .stargz.source import BlobSource, read_exactly
from .stargz.toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, ChunkRef

log = logging.getLogger(__name__)

Ranges = Sequence[tuple[int, int]]
# bytes asked for in one hinted request (several ranges in one, if small);
# requests fetched before the TOC is there are held until it is: at most
# ``workers`` of them in memory at once
HINT_BATCH_BYTES = 8 << 20
HINT_BATCH_RANGES = 64


def hint_batches(ranges: Ranges, batch_bytes: int = HINT_BATCH_BYTES, max_ranges: int = HINT_BATCH_RANGES) -> list[list[tuple[int, int]]]:
    """``ranges`` (sorted) cut into requests of at most ``batch_bytes``
    bytes and ``max_ranges`` ranges each, in blob order."""
    batches: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    size = 0
    for offset, length in ranges:
        while length > 0:
            room = batch_bytes - size
            if room <= 0 or len(current) >= max_ranges:
                batches.append(current)
                current, size, room = [], 0, batch_bytes
            n = min(length, room)
            current.append((offset, n))
            size += n
            offset, length = offset + n, length - n
    if current:
        batches.append(current)
    return batches


class HintedFetch:
    """Blob ranges the layer's descriptor says to prefetch, fetched from the
    moment the layer is opened, in parallel with its footer and TOC.

    Until the TOC is there (``attach``), the bytes cannot be checked: the
    first ``workers`` requests go out blind and their bytes wait. ``attach``
    claims every chunk of those requests in the store (reads of them wait
    for these bytes instead of asking again); then each chunk lying wholly
    in the fetched bytes is verified like any fetched chunk and cached, the
    bytes dropped. Chunks that fail verification, straddle a request's edge
    or belong to a failed request go the ordinary way (fetched again,
    verified, retried). The later requests start after ``attach`` and are
    ordinary fetches of the chunks still missing in their ranges. Nothing
    here fails the mount: errors are logged and counted."""

    def __init__(
        self,
        read_ranges: Callable[[list[tuple[int, int]]], list[bytes]],
        ranges: Ranges,
        *,
        blob_digest: str = "",
        slots: FetchSlots | None = None,
        deadline: float = 60.0,
        workers: int = 2,
        batch_bytes: int = HINT_BATCH_BYTES,
    ) -> None:
        self.ranges = list(ranges)
        self.blob_digest = blob_digest
        self._read = read_ranges
        self._slots = slots
        self._deadline = deadline
        self._batches = hint_batches(self.ranges, batch_bytes)
        self._lock = threading.Lock()
        self._next = 0
        self._attached = threading.Event()  # set by attach (or close)
        self._blind: set[int] = set()  # batches requested before attach
        self._claims: dict[int, tuple[list[ChunkRef], dict[ChunkKey, Future[bytes]]]] = {}
        self._wanted: list[list[ChunkRef]] = [[] for _ in self._batches]  # per batch, from attach
        self._store: RemoteChunks | None = None
        self._cancelled = False
        self._stats = dict.fromkeys(
            ("requests", "bytes_fetched", "chunks_taken", "chunks_rejected", "chunks_refetched", "errors"), 0)
        self._state = "fetching" if self._batches else "done"
        self._threads = [
            threading.Thread(target=self._work, name=f"lazyfs-hint-{i}", daemon=True)
            for i in range(max(1, min(workers, len(self._batches))))
        ] if self._batches else []
        self._running = len(self._threads)
        for thread in self._threads:
            thread.start()

    @classmethod
    def from_source(cls, source: BlobSource, ranges: Ranges, **kw: object) -> HintedFetch:
        """Ranges read with ``source.read_at`` (any ``BlobSource``)."""
        return cls(lambda rs: [read_exactly(source, off, n) for off, n in rs], ranges, **kw)  # type: ignore[arg-type]

    def covered(self, chunks: Sequence[ChunkRef]) -> list[ChunkRef]:
        """Those of ``chunks`` (blob order) that overlap a hinted range."""
        out = []
        starts = [off for off, _ in self.ranges]
        for chunk in chunks:
            off, length = chunk.compressed_range
            i = bisect.bisect_right(starts, off + length - 1) - 1
            if i >= 0 and self.ranges[i][0] + self.ranges[i][1] > off:
                out.append(chunk)
        return out

    def attach(self, store: RemoteChunks, blob_size: int) -> bool:
        """The TOC is verified and ``store`` knows the layer's chunks: the
        fetched bytes may be used now. True if the hint brings any chunk of
        this blob (it then replaces the prefetcher's priority request); False
        if it is not valid for the blob (then it is dropped) or covers none."""
        if self.ranges and self.ranges[-1][0] + self.ranges[-1][1] > blob_size:
            log.warning("blob %s: prefetch hint goes beyond the %d-byte blob: ignored", self.blob_digest, blob_size)
            self.close(0)
            return False
        # each chunk a hinted range touches belongs to the last batch starting at or before it
        batch_starts = [batch[0][0] for batch in self._batches]
        for chunk in self.covered(store.layout):
            self._wanted[max(0, bisect.bisect_right(batch_starts, chunk.blob_offset) - 1)].append(chunk)
        with self._lock:
            if self._cancelled:
                return False
            self._store = store
            blind = sorted(self._blind)
        for i in blind:
            futs = store.claim_missing(self._wanted[i])
            self._claims[i] = ([c for c in self._wanted[i] if chunk_key(c) in futs], futs)
        self._attached.set()
        return any(self._wanted)

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {"state": self._state, "ranges": len(self.ranges),
                    "bytes": sum(n for _, n in self.ranges), **self._stats}

    def wait(self, timeout: float | None = None) -> bool:
        """Until every request is done; False on timeout."""
        for thread in self._threads:
            thread.join(timeout)
        return not any(t.is_alive() for t in self._threads)

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop: no new request; one on the wire finishes (its bytes dropped)."""
        with self._lock:
            self._cancelled = True
            if self._state == "fetching":
                self._state = "stopped"
        self._attached.set()
        if timeout != 0:
            self.wait(timeout)

    # --- the threads -----------------------------------------------------------

    def _add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._stats[name] += n

    def _work(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._cancelled or self._next >= len(self._batches):
                        break
                    i = self._next
                    self._next += 1
                    blind = self._store is None
                    if blind:
                        self._blind.add(i)
                if blind:
                    self._blind_batch(i)
                else:
                    self._batch(i)
        except Exception:  # noqa: BLE001 - a hint must never take the mount down
            log.exception("blob %s: prefetch hint failed", self.blob_digest)
            self._add("errors")
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0 and self._state == "fetching":
                    self._state = "done"

    def _blind_batch(self, i: int) -> None:
        batch = self._batches[i]
        data: list[bytes] | None = None
        try:
            self._add("requests")
            with self._slots.held(self._deadline) if self._slots else contextlib.nullcontext():
                data = self._read(batch)
            self._add("bytes_fetched", sum(len(d) for d in data))
        except Exception as exc:  # noqa: BLE001 - any failure: the ordinary path fetches instead
            log.warning("blob %s: hinted request of %d range(s) failed: %s", self.blob_digest, len(batch), exc)
            self._add("errors")
        self._attached.wait()
        with self._lock:
            store, cancelled = self._store, self._cancelled
        if store is None:
            return  # closed (or the hint invalid) before the TOC was there
        claimed, futs = self._claims.pop(i, ([], {}))
        if cancelled:
            store.abandon(claimed, futs, "layer closed")
            return
        try:
            pieces = [(off, d) for (off, _), d in zip(batch, data)] if data is not None else []
            taken, rest = store.settle(pieces, claimed, futs)
            self._add("chunks_taken", len(taken))
            inside = [c for c in rest if c.digest and any(
                off <= c.blob_offset and c.blob_offset + c.compressed_range[1] <= off + len(d) for off, d in pieces)]
            self._add("chunks_rejected", len(inside))  # failed verification: never served
            if rest:
                self._add("chunks_refetched", len(rest))
                del data, pieces  # not held while fetching again
                store.fetch_claimed(rest, futs)
            # chunks of the batch that were local or in flight at attach: nothing to do
        finally:  # a claimed chunk is always answered (no-op for those that were)
            store.abandon(claimed, futs, "prefetch hint failed")

    def _batch(self, i: int) -> None:
        with self._lock:
            store = self._store
        if store is not None:
            self._fetch_missing(store, self._wanted[i])

    def _fetch_missing(self, store: RemoteChunks, chunks: list[ChunkRef]) -> None:
        missing = [c for c in chunks if not store.is_local(c)]
        if not missing:
            return
        try:
            store.fetch(missing, max_span=None)
        except ChunkUnavailable as exc:
            log.warning("blob %s: hinted chunks not fetched: %s", self.blob_digest, exc)
            self._add("errors")
            return
        self._add("requests")
        self._add("chunks_taken", len(missing))
        self._add("bytes_fetched", sum(c.compressed_range[1] for c in missing))


class RemoteLayer:
    """A ``StargzReader`` (footer + TOC, verified), its ``RemoteChunks``, a
    ``Prefetcher`` and the layer's prefetch hint (``HintedFetch``), if any."""

    def __init__(
        self, reader: StargzReader, store: RemoteChunks, prefetcher: Prefetcher | None, hint: HintedFetch | None = None,
    ) -> None:
        self.reader = reader
        self.store = store
        self.prefetcher = prefetcher
        self.hint = hint
        self._not_local_at: tuple[int, int] | None = None  # store counters when a scan last found a chunk missing

    @classmethod
    def open(
        cls,
        source: BlobSource,
        blob_digest: str,
        cache: ChunkCache | None,
        *,
        toc_digest: str | None = None,
        fetch: FetchConfig = FetchConfig(),
        prefetch: PrefetchConfig | None = PrefetchConfig(),
        slots: FetchSlots | None = None,
        background_slots: FetchSlots | None = None,
        prefetch_ranges: Ranges | None = None,
        hint: HintedFetch | None = None,
    ) -> RemoteLayer:
        """Read and check the TOC (``StargzReader.open``'s errors pass through);
        ``prefetch`` None: nothing is fetched before it is read.

        ``prefetch_ranges`` (blob byte ranges, from the layer's descriptor)
        start being fetched right away, while the TOC is read (``HintedFetch``
        over ``source``); ``hint``: one the caller started even earlier. A
        hint that applies to the blob replaces the prefetcher's priority
        request (the prioritized files): it names the bytes to fetch first."""
        if hint is None and prefetch_ranges:
            hint = HintedFetch.from_source(source, prefetch_ranges, blob_digest=blob_digest, slots=slots,
                                           deadline=fetch.deadline, workers=min(2, fetch.max_concurrent))
        try:
            reader = StargzReader.open(source, toc_digest=toc_digest)
            store = RemoteChunks(source, blob_digest, cache, fetch, slots, layout=layer_chunks(reader.toc))
            hinted = hint.attach(store, source.size) if hint is not None else False
        except BaseException:
            if hint is not None:
                hint.close()
            raise
        prefetcher = Prefetcher(store, reader.toc, prefetch, background_slots, hinted=hinted) if prefetch is not None else None
        return cls(reader, store, prefetcher, hint)

    def start(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.start()

    def fully_local(self) -> bool:
        """Whether every chunk a read can ask for is in the cache (a read can
        no longer cause a fetch; the format's landmark files, which no read
        sees, do not count). Asks the cache about each chunk unless the
        prefetcher has seen them all, or this layer has cached or found
        nothing since such a scan last failed (called again and again, it
        must not stat every chunk each time; chunks another process caches
        for the same blob are then seen at this layer's next cache event)."""
        if self.prefetcher is not None and self.prefetcher.progress()["percent"] >= 100.0:
            return True
        if self.store.cache is None:
            return False
        # nothing cached or found in the cache since the last scan found a
        # chunk missing: no need to ask the cache about every chunk again
        counters = self.store.stats()
        seen = (counters["chunks_cached"], counters["chunks_from_cache"])
        if seen == self._not_local_at:
            return False
        toc = self.reader.toc
        unseen = {chunk_key(c) for name in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK)
                  if (entry := toc.get(name)) is not None for c in entry.chunks}
        local = all(self.store.is_local(c) for c in self.store.layout if chunk_key(c) not in unseen)
        if not local:
            self._not_local_at = seen
        return local

    def status(self) -> dict[str, object]:
        """Counters of the fetcher and the cache, and prefetch progress."""
        out: dict[str, object] = {"fetch": self.store.stats()}
        if self.store.cache is not None:
            out["cache"] = self.store.cache.stats()
        if self.prefetcher is not None:
            out["prefetch"] = self.prefetcher.progress()
        if self.hint is not None:
            out["hint"] = self.hint.stats()
        return out

    def close(self, timeout: float | None = None) -> None:
        if self.hint is not None:
            self.hint.close(timeout)
        if self.prefetcher is not None:
            self.prefetcher.stop(timeout)
        self.store.close()

    def __enter__(self) -> RemoteLayer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
