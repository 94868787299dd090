"""One remote layer, ready to mount: TOC read, chunk store, prefetch — the
pieces a lazy mount wires together, started and stopped in the right order.

    layer = RemoteLayer.open(RegistryBlobSource(repo, digest), digest, ChunkCache(dir), toc_digest=toc)
    layer.start()                # prioritized files, then the background walk
    fs = ...(layer.reader.toc, layer.store)
    layer.status()               # for the mount's status query
    layer.close()                # prefetch stopped first, then the fetch threads
"""

from __future__ import annotations

from .cache import ChunkCache
from .fetcher import FetchConfig, RemoteChunks
from .fetchslots import FetchSlots
from .prefetch import PrefetchConfig, Prefetcher, layer_chunks
from .stargz.reader import StargzReader
from .stargz.source import BlobSource


class RemoteLayer:
    """A ``StargzReader`` (footer + TOC, verified), its ``RemoteChunks`` and a ``Prefetcher``."""

    def __init__(self, reader: StargzReader, store: RemoteChunks, prefetcher: Prefetcher | None) -> None:
        self.reader = reader
        self.store = store
        self.prefetcher = prefetcher

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
    ) -> RemoteLayer:
        """Read and check the TOC (``StargzReader.open``'s errors pass through);
        ``prefetch`` None: nothing is fetched before it is read."""
        reader = StargzReader.open(source, toc_digest=toc_digest)
        store = RemoteChunks(source, blob_digest, cache, fetch, slots, layout=layer_chunks(reader.toc))
        prefetcher = Prefetcher(store, reader.toc, prefetch, background_slots) if prefetch is not None else None
        return cls(reader, store, prefetcher)

    def start(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.start()

    def status(self) -> dict[str, object]:
        """Counters of the fetcher and the cache, and prefetch progress."""
        out: dict[str, object] = {"fetch": self.store.stats()}
        if self.store.cache is not None:
            out["cache"] = self.store.cache.stats()
        if self.prefetcher is not None:
            out["prefetch"] = self.prefetcher.progress()
        return out

    def close(self, timeout: float | None = None) -> None:
        if self.prefetcher is not None:
            self.prefetcher.stop(timeout)
        self.store.close()

    def __enter__(self) -> RemoteLayer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
