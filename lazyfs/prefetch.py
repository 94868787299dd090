"""Prefetching a lazily mounted layer: first what the image said it needs at
start, then (optionally) everything else, slowly, so the layer ends up local.

The prioritized files are everything before the ``.prefetch.landmark`` entry
(the writer puts them first, so their chunks are one contiguous byte range):
they are fetched in one request as soon as the mount starts. The background
pass then walks the rest of the blob in modest ranges, paced by a token
bucket and yielding to reads: it starts ``start_delay`` seconds after the
mount, sends a request only when no read has fetched for ``idle`` seconds,
and with ``slots`` (one slot, shared by every layer process of the host)
only one layer's background request is on the wire at a time, so it never
makes a container's start-up reads wait behind bulk transfers.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from .chunks import ChunkUnavailable
from .fetcher import ChunkKey, RemoteChunks, chunk_key, plan_spans
from .fetchslots import FetchSlots, NoFetchSlot
from .stargz.toc import ChunkRef, Toc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefetchConfig:
    """``background``: fetch the whole layer after the prioritized files.
    ``rate``/``burst``: the background bandwidth (bytes/s) and bucket size.
    ``span``: bytes per background request. ``passes``: how many times the
    background walk retries chunks that failed. ``retry_delay``: the pause
    after a failed background request. ``start_delay``: seconds after
    ``start()`` before the background walk begins. ``idle``: seconds without a
    foreground fetch before each background request."""

    background: bool = True
    rate: float = 16 << 20
    burst: int = 2 << 20
    span: int = 1 << 20
    gap: int = 32 << 10
    passes: int = 3
    retry_delay: float = 2.0
    start_delay: float = 0.0
    idle: float = 0.0


class TokenBucket:
    """Bytes-per-second pacing. ``take`` may overdraw (a request larger than
    the bucket still goes, and the debt is paid by waiting afterwards)."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()

    def take(self, n: int, stop: threading.Event) -> bool:
        """Wait until ``n`` bytes may be sent; False if ``stop`` was set first."""
        while not stop.is_set():
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= min(n, self.burst):
                self._tokens -= n
                return True
            stop.wait((min(n, self.burst) - self._tokens) / self.rate)
        return False


def layer_chunks(toc: Toc) -> Sequence[ChunkRef]:
    """Every chunk of the layer once (hardlinks share their target's), in
    blob order; a ``ChunkLayout``, which makes the ``ChunkRef``s on access."""
    return toc.layout()


def prioritized_chunks(toc: Toc, chunks: Sequence[ChunkRef] | None = None) -> list[ChunkRef]:
    """The chunks before the ``.prefetch.landmark`` (none without one);
    ``chunks``: ``layer_chunks(toc)`` if the caller has it already."""
    limit = toc.prefetch_size
    if limit is None:
        return []
    return [c for c in (layer_chunks(toc) if chunks is None else chunks) if c.blob_offset < limit]


class Prefetcher:
    """``start()`` at mount, ``progress()`` for the status query, ``stop()`` at unmount."""

    def __init__(
        self, remote: RemoteChunks, toc: Toc, config: PrefetchConfig = PrefetchConfig(), slots: FetchSlots | None = None,
        *, hinted: bool = False,
    ) -> None:
        """``hinted``: the layer's prefetch hint (``HintedFetch``) says what
        to fetch first, in place of the prioritized files: there is no
        priority request (a hint names the bytes a start-up reads; the
        prioritized files around them would be fetched for nothing)."""
        self.remote = remote
        self.config = config
        self.slots = slots  # the host-wide background slot(s), if any
        self._chunks = remote.layout or layer_chunks(toc)  # the fetcher's, when it has them
        self._priority = [] if hinted else prioritized_chunks(toc, self._chunks)
        self._total = sum(c.size for c in self._chunks)
        self._local: set[ChunkKey] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._priority_done = threading.Event()
        self._state = "idle"
        self._failures = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("prefetcher already started")
        self._thread = threading.Thread(target=self._run, name="lazyfs-prefetch")
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the background walk; a request in progress finishes first
        (its time is bounded by the fetcher's deadline)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_priority(self, timeout: float | None = None) -> bool:
        """Block until the prioritized files were fetched (or failed)."""
        return self._priority_done.wait(timeout)

    def wait_done(self, timeout: float | None = None) -> bool:
        """Block until the prefetch thread has finished."""
        if self._thread is None:
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def progress(self) -> dict[str, object]:
        """How much of the layer is local (as far as this mount has seen)."""
        with self._lock:
            local = sum(c.size for c in self._chunks if chunk_key(c) in self._local)
            state, failures = self._state, self._failures
        percent = 100.0 if self._total == 0 else 100.0 * local / self._total
        return {
            "state": state, "local_bytes": local, "total_bytes": self._total,
            "percent": round(percent, 1), "priority_done": self._priority_done.is_set(), "failures": failures,
        }

    # --- the thread ----------------------------------------------------------

    def _run(self) -> None:
        try:
            self._set_state("priority")
            self._fetch_priority()
            self._priority_done.set()
            if self.config.background and not self._stop.is_set():
                self._set_state("background")
                self._background()
            self._set_state("stopped" if self._stop.is_set() else "done")
        except Exception:  # noqa: BLE001 - a prefetch bug must not take the mount down
            log.exception("prefetch failed")
            self._set_state("failed")
        finally:
            self._priority_done.set()

    def _fetch_priority(self) -> None:
        if not self._priority:
            return
        try:
            self.remote.fetch(self._priority, max_span=None)  # one request
        except ChunkUnavailable as exc:
            log.warning("prefetch of prioritized files failed: %s", exc)
            self._count_failure()
            return
        self._mark_local(self._priority)

    def _background(self) -> None:
        if self._stop.wait(self.config.start_delay):
            return
        bucket = TokenBucket(self.config.rate, self.config.burst)
        for _ in range(self.config.passes):
            missing = self._missing()
            if not missing:
                return
            for span in plan_spans(missing, self.config.gap, self.config.span):
                if not self._wait_for_no_reads() or not bucket.take(span.length, self._stop):
                    return
                try:
                    with self.slots.held(self.remote.config.deadline) if self.slots else contextlib.nullcontext():
                        self.remote.fetch(span.chunks, max_span=None)
                except (ChunkUnavailable, NoFetchSlot) as exc:
                    log.warning("background prefetch of %d+%d failed: %s", span.offset, span.length, exc)
                    self._count_failure()
                    if self._stop.wait(self.config.retry_delay):
                        return
                    continue
                self._mark_local(span.chunks)

    def _missing(self) -> list[ChunkRef]:
        """Chunks not yet known local; the cache is asked (a read, or another
        mount of the same blob, may have fetched them)."""
        missing, found = [], []
        for chunk in self._chunks:
            if chunk_key(chunk) in self._local:
                continue
            (found if self.remote.is_local(chunk) else missing).append(chunk)
        self._mark_local(found)
        return missing

    def _wait_for_no_reads(self) -> bool:
        """Until no read is fetching and none has for ``idle`` seconds;
        False if stopped meanwhile."""
        while not self._stop.is_set():
            if self.remote.wait_for_no_reads(timeout=0.2):
                quiet = self.remote.idle_seconds()
                if quiet >= self.config.idle:
                    return True
                self._stop.wait(self.config.idle - quiet)
        return False

    def _mark_local(self, chunks: tuple[ChunkRef, ...] | list[ChunkRef]) -> None:
        with self._lock:
            self._local.update(chunk_key(c) for c in chunks)

    def _count_failure(self) -> None:
        with self._lock:
            self._failures += 1

    def _set_state(self, state: str) -> None:
        with self._lock:
            self._state = state
