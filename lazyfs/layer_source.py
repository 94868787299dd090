"""From a source string to what a mount serves: the TOC and a ``ChunkStore``.

Sources:
- ``/path/layer.stargz``: a local blob (``LocalChunks``, no cache needed);
- ``https://host/path/layer.stargz``: any server that honours Range;
- ``registry://host/repo@sha256:…``: a blob of a registry repository, through
  the registry client (auth, mirrors, retries).

Remote chunks go through ``lazyfs.fetcher.RemoteChunks`` and, with a cache
directory, the shared ``ChunkCache``; with ``prefetch`` the layer is fetched
in the background (prioritized files first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .chunks import ChunkStore, LocalChunks
from .stargz.reader import StargzReader
from .stargz.source import BlobSource, FileSource
from .stargz.toc import Toc

log = logging.getLogger(__name__)
REGISTRY_SCHEME = "registry://"
# A registry layer is opened with one request for its last bytes: the footer
# and a small TOC (a larger one takes one more request); file chunks in them
# go to the cache.
OPEN_TAIL_BYTES = 64 << 10


class UnsupportedSource(ValueError):
    """The source string names nothing this process can open."""


@dataclass(frozen=True)
class RemoteOptions:
    cache_dir: str | None = None  # the shared chunk cache; None: no cache
    blob_digest: str | None = None  # cache key of an https:// blob (registry blobs carry theirs)
    # the prioritized files are always fetched at mount; then, unless this
    # is off, the rest of the layer at low priority
    background_fetch: bool = True
    # it starts this many seconds after the mount, and each of its requests
    # waits until reads have not fetched for background_idle seconds
    background_delay: float = 2.0
    background_idle: float = 0.5
    # compressed bytes after each fetched range brought along (FetchConfig.read_around)
    read_around: int = 64 << 10
    # a read that cannot get its chunks within this many seconds fails with
    # EIO; registry requests are bounded by it too
    fetch_deadline: float = 60.0
    # JSON file of RegistryConfig.from_dict keys (mirrors, insecure hosts,
    # Docker config) for registry:// sources; None: the defaults
    registry_config: str | None = None
    # the host-wide cap on registry requests in flight (lazyfs.fetchslots)
    fetch_slots_dir: str | None = None
    fetch_slots: int = 16
    # RLIMIT_DATA of the mount process, MiB (None: unlimited)
    memory_limit_mib: int | None = None
    # record which files are read, in order (status "accessed"; crfs optimize)
    record_access: bool = False
    # blob byte ranges to fetch at once, while the TOC is read: "OFFSET:LENGTH,..."
    # (the layer's prefetch label, lazyfs.prefetch_hints.prefetch_hint); a bad one is ignored
    prefetch_ranges: str | None = None
    # without prefetch_ranges: the digest of an image manifest listing this
    # layer (same repository); its descriptor's prefetch annotations are the
    # hint (a layer mounted ahead of its own Prepare has no labels of its own)
    prefetch_manifest: str | None = None


@dataclass
class OpenedLayer:
    """What a mount needs from a source, and how to release it."""

    toc: Toc
    store: ChunkStore
    source: str
    closers: list[Callable[[], None]] = field(default_factory=list)
    status: Callable[[], dict[str, Any]] | None = None  # the store's own counters
    # a prefetch hint (an access profile) says what to fetch: no guessing
    # what programs will load (lazyfs.dependencies) on top of it
    hinted: bool = False
    # whether a read can no longer cause a fetch: every chunk local (a local
    # blob's always are); a bigger kernel read-ahead then costs no bytes
    fully_local: Callable[[], bool] = lambda: True

    def close(self) -> None:
        for close in reversed(self.closers):
            with contextlib.suppress(Exception):
                close()

    @property
    def is_remote(self) -> bool:
        """Whether its chunks come over the network (a local blob's do not
        need predicting)."""
        return self.status is not None

    def store_stats(self) -> dict[str, Any]:
        """The remote store's counters (fetches, cache, prefetch), if any."""
        return self.status() if self.status is not None else {}


def open_layer(source: str, *, toc_digest: str | None = None, remote: RemoteOptions = RemoteOptions()) -> OpenedLayer:
    """Fetch the footer and TOC of ``source`` (checked against ``toc_digest``)."""
    if source.startswith(("https://", "http://")):
        return _open_remote(source, _http_source(source), remote.blob_digest, toc_digest, remote, ranges=_hint_ranges(remote))
    if source.startswith(REGISTRY_SCHEME):
        slots = _fetch_slots(remote)
        blob, digest, close, hint = _registry_source(source, remote, _hint_ranges(remote), slots[0])
        return _open_remote(source, blob, digest, toc_digest, remote, [close], hint=hint, slots=slots)
    if "://" in source:
        raise UnsupportedSource(f"{source}: unknown scheme (want a path, https:// or {REGISTRY_SCHEME})")
    blob = FileSource(source)
    try:
        reader = StargzReader.open(blob, toc_digest=toc_digest)
    except BaseException:
        blob.close()
        raise
    reader.release_toc_json()  # a mount serves the parsed TOC only
    return OpenedLayer(reader.toc, LocalChunks(reader), source, [blob.close])


def preload_source(source: str) -> None:
    """Import what opening ``source`` needs (the registry client for a
    ``registry://`` or ``http(s)://`` one), so that a caller can do it before
    starting other imports in parallel with the opening."""
    if source.startswith((REGISTRY_SCHEME, "https://", "http://")):
        from . import remote_source  # noqa: F401, PLC0415
        from .registry import client  # noqa: F401, PLC0415


def _http_source(url: str) -> BlobSource:
    from .remote_source import HttpBlobSource  # noqa: PLC0415 - pulls in the HTTP client

    return HttpBlobSource(url)


def _hint_ranges(options: RemoteOptions) -> list[tuple[int, int]] | None:
    """The prefetch hint's ranges; a bad one is logged and dropped."""
    if not options.prefetch_ranges:
        return None
    from .prefetch_hints import BadPrefetchRanges, parse_prefetch_ranges  # noqa: PLC0415

    try:
        return parse_prefetch_ranges(options.prefetch_ranges)
    except BadPrefetchRanges as exc:
        log.warning("ignoring the prefetch hint %.60r: %s", options.prefetch_ranges, exc)
        return None


def _fetch_slots(options: RemoteOptions) -> tuple[Any, Any]:
    """(every request's slots, the background slot), host-wide; or (None, None)."""
    if not options.fetch_slots_dir:
        return None, None
    from .fetchslots import FetchSlots  # noqa: PLC0415

    # every request takes one of fetch_slots host-wide; background
    # requests also the single background slot: one layer at a time
    return (FetchSlots(options.fetch_slots_dir, options.fetch_slots),
            FetchSlots(os.path.join(options.fetch_slots_dir, "background"), 1))


def _registry_source(
    source: str, options: RemoteOptions, ranges: list[tuple[int, int]] | None = None, slots: Any = None,
) -> tuple[BlobSource, str, Callable[[], None], Any]:
    """The blob (its tail read already) and, with ``ranges``, the hint's
    requests started before that tail read, so that both travel at once."""
    from .registry.client import RegistryClient  # noqa: PLC0415
    from .registry.config import RegistryConfig  # noqa: PLC0415
    from .remote_layer import HintedFetch  # noqa: PLC0415
    from .remote_source import RegistryBlobSource  # noqa: PLC0415

    ref, sep, digest = source.removeprefix(REGISTRY_SCHEME).rpartition("@")
    if not sep or not digest.startswith("sha256:"):
        raise UnsupportedSource(f"{source}: want {REGISTRY_SCHEME}host/repo@sha256:…")
    deadline = options.fetch_deadline
    base = RegistryConfig()
    if options.registry_config:
        with open(options.registry_config, encoding="utf-8") as f:
            base = RegistryConfig.from_dict(json.load(f), options.registry_config)
    config = dataclasses.replace(base, read_timeout=min(base.read_timeout, deadline), retry_budget=deadline)
    client = RegistryClient(config)
    hint = None
    try:
        repo = client.repository(ref)

        def start_hint(ranges: list[tuple[int, int]]) -> Any:
            return HintedFetch(lambda rs: repo.get_ranges(digest, rs), ranges, blob_digest=digest, slots=slots,
                               deadline=deadline, workers=2)

        if ranges:
            hint = start_hint(ranges)
            blob = RegistryBlobSource(repo, digest, tail=OPEN_TAIL_BYTES)
        elif options.prefetch_manifest:
            # the manifest's round trip runs beside the tail read; the hinted
            # requests start when it is back, still long before the TOC is parsed
            looking: Future[Any] = Future()
            threading.Thread(target=_hint_from_manifest, name="hint-manifest", daemon=True,
                             args=(repo, options.prefetch_manifest, digest, start_hint, looking)).start()
            blob = RegistryBlobSource(repo, digest, tail=OPEN_TAIL_BYTES)
            hint = looking.result()
        else:
            blob = RegistryBlobSource(repo, digest, tail=OPEN_TAIL_BYTES)
        return blob, digest, client.close, hint
    except BaseException:
        if hint is not None:
            hint.close()
        client.close()
        raise


def _hint_from_manifest(
    repo: Any, manifest_digest: str, blob_digest: str, start: Callable[[list[tuple[int, int]]], Any], out: Future[Any],
) -> None:
    """``out``: a started hint from the manifest's descriptor of the blob, or
    None (no such descriptor, no hint in it, or the manifest unavailable:
    a hint never fails a mount)."""
    from .prefetch_hints import prefetch_hint_ranges  # noqa: PLC0415

    hint = None
    try:
        manifest = repo.get_manifest(manifest_digest)  # verified against its digest
        layer = next((d for d in manifest.layers if d.digest == blob_digest), None) if not manifest.is_index else None
        ranges = prefetch_hint_ranges(layer.annotations) if layer is not None else None
        if ranges:
            hint = start(ranges)
    except Exception as exc:  # noqa: BLE001 - logged; the mount goes on without a hint
        log.warning("no prefetch hint from manifest %s: %s", manifest_digest, exc)
    out.set_result(hint)


def _open_remote(
    source: str, blob: BlobSource, blob_digest: str | None, toc_digest: str | None,
    options: RemoteOptions, closers: list[Callable[[], None]] | None = None, *,
    hint: Any = None, ranges: list[tuple[int, int]] | None = None, slots: tuple[Any, Any] | None = None,
) -> OpenedLayer:
    """``lazyfs.remote_layer`` wires fetcher, cache and prefetcher; we only
    pick the cache and keep what to close. ``hint``: a ``HintedFetch``
    started already; ``ranges``: one to start."""
    from .cache import ChunkCache  # noqa: PLC0415 - remote only
    from .fetcher import FetchConfig  # noqa: PLC0415
    from .prefetch import PrefetchConfig  # noqa: PLC0415
    from .remote_layer import RemoteLayer  # noqa: PLC0415

    closers = list(closers or [])
    if hint is not None:
        closers.append(hint.close)  # stopped before the client it uses (RemoteLayer.close does it first)
    if hasattr(blob, "close"):
        closers.append(blob.close)
    try:
        cache = ChunkCache(options.cache_dir) if options.cache_dir and blob_digest else None
        slots, background_slots = _fetch_slots(options) if slots is None else slots
        prefetch = PrefetchConfig(background=options.background_fetch, start_delay=options.background_delay,
                                  idle=options.background_idle)
        remote = RemoteLayer.open(blob, blob_digest or "", cache, toc_digest=toc_digest,
                                  fetch=FetchConfig(deadline=options.fetch_deadline, read_around=options.read_around), slots=slots,
                                  background_slots=background_slots, prefetch=prefetch, prefetch_ranges=ranges, hint=hint)
        closers.append(remote.close)
        remote.reader.release_toc_json()  # a mount serves the parsed TOC only
        if hasattr(blob, "take_tail"):
            remote.store.keep(*blob.take_tail())  # file chunks the opening read brought: to the cache
        remote.start()
    except BaseException:
        for close in reversed(closers):
            with contextlib.suppress(Exception):
                close()
        raise
    return OpenedLayer(remote.reader.toc, remote.store, source, closers, status=remote.status,
                       hinted=hint is not None or bool(ranges), fully_local=remote.fully_local)
