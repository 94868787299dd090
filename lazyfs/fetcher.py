"""Chunks of a remote layer, fetched on demand: the ``ChunkStore`` of a lazy mount.

A read's chunks come from the shared ``ChunkCache`` when they are there;
the rest are fetched with as few Range requests as possible (neighbouring
chunks, and chunks a small gap apart, are merged into one range),
decompressed and verified with ``decode_chunk``, stored, returned.

Why the machinery:
- FUSE issues reads from many threads, often for the same chunk (readahead,
  several processes reading one file): a chunk being fetched has one
  in-flight future, and everyone who needs it waits on that one.
- A read must never hang: every ``get_many`` has a deadline; past it the
  read fails with ``ChunkUnavailable`` (the fetch itself goes on, bounded by
  the registry client's own retry budget, and its result is still cached).
- Bytes that fail verification are never returned nor cached; the range is
  fetched once more (a flipped bit on the wire is not a poisoned blob), then
  the read fails.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

from .cache import ChunkCache
from .chunks import ChunkUnavailable
from .fetchslots import FetchSlots
from .stargz.errors import FormatError, VerificationError
from .stargz.reader import decode_chunk
from .stargz.source import BlobSource, read_exactly
from .stargz.toc import ChunkLayout, ChunkRef

log = logging.getLogger(__name__)

ChunkKey = tuple[int, int, int]  # (blob_offset, inner_offset, size)


def chunk_key(chunk: ChunkRef) -> ChunkKey:
    return chunk.blob_offset, chunk.inner_offset, chunk.size


@dataclass(frozen=True)
class FetchConfig:
    """``max_concurrent``: range requests in flight at once (foreground).
    ``deadline``: seconds one ``get_many`` may take before ChunkUnavailable.
    ``gap``: chunks at most this many blob bytes apart share one request.
    ``max_span``: no foreground request asks for more than this (unless a
    single chunk is larger). ``read_around``: see below. ``verify_retries``: refetches of a range whose
    bytes failed verification. ``cache_unverified``: also cache chunks that
    have no digest (legacy stargz); only for a blob verified some other way."""

    max_concurrent: int = 4
    deadline: float = 60.0
    # a foreground request also brings the chunks that follow it in the blob
    # (other small files of the same directory, usually), up to this many
    # compressed bytes: one round trip instead of one per file at start-up
    read_around: int = 64 << 10
    gap: int = 32 << 10
    max_span: int = 4 << 20
    verify_retries: int = 1
    cache_unverified: bool = False


@dataclass(frozen=True)
class Span:
    """One Range request: ``[offset, end)`` of the blob, covering ``chunks``."""

    offset: int
    end: int
    chunks: tuple[ChunkRef, ...]

    @property
    def length(self) -> int:
        return self.end - self.offset


def plan_spans(chunks: Sequence[ChunkRef], gap: int, max_span: int | None) -> list[Span]:
    """Group chunks (any order, no duplicates) into ranges: a chunk joins the
    previous range when it starts within ``gap`` of its end and the range
    stays within ``max_span`` bytes (None: no limit)."""
    spans: list[Span] = []
    start = end = 0
    group: list[ChunkRef] = []
    for chunk in sorted(chunks, key=lambda c: c.blob_offset):
        off, length = chunk.compressed_range
        fits = max_span is None or max(end, off + length) - start <= max_span
        if group and off - end <= gap and fits:
            group.append(chunk)
            end = max(end, off + length)
            continue
        if group:
            spans.append(Span(start, end, tuple(group)))
        start, end, group = off, off + length, [chunk]
    if group:
        spans.append(Span(start, end, tuple(group)))
    return spans


class _Counters:
    """The numbers ``stats()`` reports; one lock, no globals."""

    NAMES = (
        "requests", "bytes_fetched", "chunks_fetched", "chunks_cached", "chunks_from_cache",
        "chunks_joined", "chunks_read_around", "errors", "digest_failures", "timeouts",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(self.NAMES, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


class RemoteChunks:
    """``ChunkStore`` over a remote blob (any ``BlobSource``) and a ``ChunkCache``.

    ``blob_digest`` keys the cache: it must be the digest of the blob the
    source reads. ``cache`` None means no cache (every miss is a fetch).
    """

    def __init__(
        self,
        source: BlobSource,
        blob_digest: str,
        cache: ChunkCache | None,
        config: FetchConfig = FetchConfig(),
        slots: FetchSlots | None = None,
        layout: Sequence[ChunkRef] = (),
    ) -> None:
        self.source = source
        # every chunk of the layer in blob order (``prefetch.layer_chunks``),
        # for read-around and the prefetcher (empty: none)
        # (a Toc's ChunkLayout as it is: it makes ChunkRefs only when indexed)
        self.layout: Sequence[ChunkRef] = layout if isinstance(layout, ChunkLayout) else tuple(layout)
        self._layout_offsets: Sequence[int] = (
            layout.blob_offsets if isinstance(layout, ChunkLayout) else [c.blob_offset for c in self.layout])
        self.slots = slots  # the host-wide cap on requests in flight, if any
        self.blob_digest = blob_digest
        self.cache = cache
        self.config = config
        self._counters = _Counters()
        self._lock = threading.Lock()
        self._inflight: dict[ChunkKey, Future[bytes]] = {}
        self._reads = 0  # foreground get_many calls waiting on fetches
        self._last_read = time.monotonic()  # when a foreground get_many last ended
        self._idle = threading.Condition(self._lock)
        self._pool = ThreadPoolExecutor(max_workers=config.max_concurrent, thread_name_prefix="lazyfs-fetch")
        self._closed = False

    # --- the ChunkStore interface ------------------------------------------

    def get_many(self, chunks: Sequence[ChunkRef]) -> list[bytes]:
        """Verified bytes of each chunk, in order, within ``config.deadline``."""
        deadline = time.monotonic() + self.config.deadline
        with self._foreground():
            waits, owned = self._claim(chunks)
            if owned and self.layout and self.config.read_around > 0:
                for chunk, fut in self._claim_around(owned):
                    owned.append(chunk)
                    waits[chunk_key(chunk)] = fut
            for span in plan_spans(owned, self.config.gap, self.config.max_span):
                try:
                    self._pool.submit(self._fetch_span, span, waits)
                except RuntimeError:  # closed meanwhile
                    self._fail(span.chunks, waits, ChunkUnavailable("chunk store is closed"))
            wanted = {chunk_key(c) for c in chunks}
            got = {key: self._wait(fut, deadline) for key, fut in waits.items() if key in wanted}
        return [got[chunk_key(c)] for c in chunks]

    # --- for the prefetcher --------------------------------------------------

    def fetch(self, chunks: Sequence[ChunkRef], *, max_span: int | None = None) -> None:
        """Make ``chunks`` local, fetching in the calling thread (``max_span``
        None: one request for all the missing ones if they are neighbours)."""
        deadline = time.monotonic() + self.config.deadline
        waits, owned = self._claim(chunks)
        for span in plan_spans(owned, self.config.gap, max_span):
            self._fetch_span(span, waits)
        for fut in waits.values():
            self._wait(fut, deadline)

    def keep(self, offset: int, data: bytes) -> int:
        """Verify and cache every chunk lying wholly in ``data`` (blob bytes
        at ``offset``, fetched for another reason: the tail read when the
        layer was opened) instead of throwing them away; how many."""
        if self.cache is None or not self.layout:
            return 0
        kept = 0
        end = offset + len(data)
        for chunk in self.layout[bisect.bisect_left(self._layout_offsets, offset):]:
            off, length = chunk.compressed_range
            if off + length > end:
                break
            if not chunk.digest or self.cache.contains(self.blob_digest, chunk):
                continue
            try:
                plain = decode_chunk(chunk, [data[off - offset : off - offset + length]])
            except (VerificationError, FormatError) as exc:
                log.warning("blob %s: chunk at %d in the opening read failed verification: %s", self.blob_digest, off, exc)
                continue
            if self.cache.put(self.blob_digest, chunk, plain):
                kept += 1
        self._counters.add("chunks_cached", kept)
        return kept

    # --- for bytes fetched before the TOC was known (the prefetch hint) ------

    def claim_missing(self, chunks: Sequence[ChunkRef]) -> dict[ChunkKey, Future[bytes]]:
        """In-flight futures for the ``chunks`` that are neither local nor
        being fetched: reads of them wait for the caller, which must answer
        every one (``settle`` / ``fetch_claimed`` / ``abandon``)."""
        if self._closed:
            return {}
        wanted = [c for c in chunks if not self.is_local(c)]
        owned: dict[ChunkKey, Future[bytes]] = {}
        with self._lock:
            for chunk in wanted:
                key = chunk_key(chunk)
                if key not in self._inflight and key not in owned:
                    owned[key] = self._inflight[key] = Future()
        return owned

    def settle(
        self, pieces: Sequence[tuple[int, bytes]], chunks: Sequence[ChunkRef], futs: dict[ChunkKey, Future[bytes]],
    ) -> tuple[list[ChunkRef], list[ChunkRef]]:
        """Claimed ``chunks`` lying wholly in one of ``pieces`` ((offset,
        bytes) of the blob, from an unverified source) are decoded and
        verified like fetched ones, cached and answered; returns (taken, the
        rest: failed verification or not covered, still unanswered)."""
        taken: list[ChunkRef] = []
        rest: list[ChunkRef] = []
        starts = [off for off, _ in pieces]
        for chunk in chunks:
            off, length = chunk.compressed_range
            i = bisect.bisect_right(starts, off) - 1
            if i < 0 or not chunk.digest or off + length > pieces[i][0] + len(pieces[i][1]):
                rest.append(chunk)
                continue
            lo = off - pieces[i][0]
            try:
                data = decode_chunk(chunk, [pieces[i][1][lo : lo + length]])
            except (VerificationError, FormatError) as exc:
                self._counters.add("digest_failures")
                log.error("blob %s: hinted chunk at %d failed verification (fetched again): %s", self.blob_digest, off, exc)
                rest.append(chunk)
                continue
            if self.cache is not None and self.cache.put(self.blob_digest, chunk, data):
                self._counters.add("chunks_cached")
            self._resolve(chunk, futs, data)
            taken.append(chunk)
        return taken, rest

    def fetch_claimed(self, chunks: Sequence[ChunkRef], futs: dict[ChunkKey, Future[bytes]]) -> bool:
        """Fetch claimed ``chunks`` the ordinary way, in the calling thread
        (with the verification retries); every future is answered. True if all arrived."""
        for span in plan_spans(chunks, self.config.gap, self.config.max_span):
            self._fetch_span(span, futs)
        return all(futs[chunk_key(c)].done() and futs[chunk_key(c)].exception() is None for c in chunks)

    def abandon(self, chunks: Sequence[ChunkRef], futs: dict[ChunkKey, Future[bytes]], why: str) -> None:
        self._fail(chunks, futs, ChunkUnavailable(f"blob {self.blob_digest}: {why}"))

    def is_local(self, chunk: ChunkRef) -> bool:
        return self.cache is not None and self.cache.contains(self.blob_digest, chunk)

    def open_local(self, chunk: ChunkRef) -> int | None:
        """An fd of the chunk's verified bytes on local disk (``ChunkCache.open_checked``)."""
        return self.cache.open_checked(self.blob_digest, chunk) if self.cache is not None else None

    def advise_local(self, chunk: ChunkRef) -> bool:
        """Have the kernel read the chunk's cache file ahead (``ChunkCache.advise``)."""
        return self.cache is not None and self.cache.advise(self.blob_digest, chunk)

    def idle_seconds(self) -> float:
        """Seconds since a foreground read last fetched (0 while one does)."""
        with self._lock:
            return 0.0 if self._reads else time.monotonic() - self._last_read

    def wait_for_no_reads(self, timeout: float | None = None) -> bool:
        """Block while foreground reads are fetching; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._reads == 0, timeout)

    # --- status and lifecycle ----------------------------------------------

    def stats(self) -> dict[str, int]:
        out = self._counters.snapshot()
        with self._lock:
            out["in_flight"] = len(self._inflight)
        return out

    def close(self, wait: bool = True) -> None:
        """Stop the fetch threads (``wait``: let running fetches finish)."""
        self._closed = True
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def __enter__(self) -> RemoteChunks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -----------------------------------------------------------

    @contextmanager
    def _foreground(self) -> Iterator[None]:
        with self._lock:
            self._reads += 1
        try:
            yield
        finally:
            with self._idle:
                self._reads -= 1
                self._last_read = time.monotonic()
                if self._reads == 0:
                    self._idle.notify_all()

    def _claim(self, chunks: Sequence[ChunkRef]) -> tuple[dict[ChunkKey, Future[bytes]], list[ChunkRef]]:
        """A future for every distinct chunk; the ones this call owns (no one
        else is fetching them) are looked up in the cache and, if missing,
        returned to be fetched. Checking the cache only after claiming means
        a chunk finished by someone else meanwhile is seen in the cache."""
        if self._closed:
            raise ChunkUnavailable("chunk store is closed")
        waits: dict[ChunkKey, Future[bytes]] = {}
        mine: list[ChunkRef] = []
        with self._lock:
            for chunk in chunks:
                key = chunk_key(chunk)
                if key in waits:
                    continue
                fut = self._inflight.get(key)
                if fut is None:
                    fut = self._inflight[key] = Future()
                    mine.append(chunk)
                else:
                    self._counters.add("chunks_joined")
                waits[key] = fut
        owned: list[ChunkRef] = []
        try:
            for chunk in mine:
                data = self.cache.get(self.blob_digest, chunk) if self.cache is not None else None
                if data is None:
                    owned.append(chunk)
                else:
                    self._counters.add("chunks_from_cache")
                    self._resolve(chunk, waits, data)
        except BaseException as exc:  # a claimed future must never be left unanswered
            self._fail(mine, waits, ChunkUnavailable(f"blob {self.blob_digest}: cache lookup failed: {exc!r}"))
            raise
        return waits, owned

    def _claim_around(self, owned: Sequence[ChunkRef]) -> list[tuple[ChunkRef, Future[bytes]]]:
        """Chunks right after the ones being fetched, in blob order, that
        nobody has or is fetching, within ``read_around`` bytes in all and
        ``gap`` of each other: they ride along in the same request (and go
        to the cache), so that reading the next small file costs nothing."""
        budget = self.config.read_around
        extra: list[tuple[ChunkRef, Future[bytes]]] = []
        taken = {chunk_key(c) for c in owned}
        for span in plan_spans(owned, self.config.gap, None):
            i = bisect.bisect_right(self._layout_offsets, span.chunks[-1].blob_offset)
            end = span.end
            while i < len(self.layout) and budget > 0:
                chunk = self.layout[i]
                off, length = chunk.compressed_range
                if off - end > self.config.gap or length > budget:
                    break
                key = chunk_key(chunk)
                i += 1
                end = max(end, off + length)
                if key in taken:
                    continue
                if self.is_local(chunk):
                    continue  # in the cache: the gap it leaves is still bridged
                with self._lock:
                    if key in self._inflight:
                        continue
                    fut = self._inflight[key] = Future()
                taken.add(key)
                extra.append((chunk, fut))
                budget -= length
        if extra:
            self._counters.add("chunks_read_around", len(extra))
        return extra

    def _wait(self, fut: Future[bytes], deadline: float) -> bytes:
        try:
            return fut.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            self._counters.add("timeouts")
            raise ChunkUnavailable(
                f"blob {self.blob_digest}: chunk not fetched within {self.config.deadline:g}s"
            ) from None

    def _resolve(
        self, chunk: ChunkRef, futs: dict[ChunkKey, Future[bytes]], data: bytes | None, error: BaseException | None = None
    ) -> None:
        """Answer the future this caller owns for ``chunk`` (once) and retire it."""
        key = chunk_key(chunk)
        fut = futs[key]
        with self._lock:
            if self._inflight.get(key) is fut:
                del self._inflight[key]
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(data)  # type: ignore[arg-type]

    def _fetch_span(self, span: Span, futs: dict[ChunkKey, Future[bytes]]) -> None:
        """Fetch, verify, cache and resolve every chunk of ``span``; every
        future it owns is resolved, whatever happens."""
        pending = list(span.chunks)
        try:
            for attempt in range(self.config.verify_retries + 1):
                for part in plan_spans(pending, self.config.gap, None) if attempt else [span]:
                    pending = [c for c in pending if c not in part.chunks] + self._fetch_once(part, futs)
                if not pending:
                    return
            self._counters.add("errors")
            self._fail(pending, futs, ChunkUnavailable(
                f"blob {self.blob_digest}: {len(pending)} chunk(s) failed verification "
                f"{self.config.verify_retries + 1} time(s); not served"
            ))
        except ChunkUnavailable as exc:
            self._counters.add("errors")
            self._fail(pending, futs, exc)
        except BaseException as exc:  # never leave a waiter without an answer
            self._counters.add("errors")
            self._fail(pending, futs, ChunkUnavailable(f"blob {self.blob_digest}: {exc!r}"))
            raise

    def _fetch_once(self, span: Span, futs: dict[ChunkKey, Future[bytes]]) -> list[ChunkRef]:
        """One request for ``span``; returns the chunks that failed verification."""
        self._counters.add("requests")
        try:
            with self.slots.held(self.config.deadline) if self.slots else contextlib.nullcontext():
                raw = read_exactly(self.source, span.offset, span.length)
        except Exception as exc:  # noqa: BLE001 - any source failure is an unreadable range
            log.warning("blob %s: range %d+%d failed: %s", self.blob_digest, span.offset, span.length, exc)
            raise ChunkUnavailable(f"blob {self.blob_digest}: range {span.offset}+{span.length}: {exc}") from exc
        self._counters.add("bytes_fetched", len(raw))
        bad = []
        for chunk in span.chunks:
            off, length = chunk.compressed_range
            lo = off - span.offset
            try:
                data = decode_chunk(chunk, [raw[lo : lo + length]])
            except (VerificationError, FormatError) as exc:
                self._counters.add("digest_failures")
                log.error("blob %s: chunk at %d failed verification: %s", self.blob_digest, off, exc)
                bad.append(chunk)
                continue
            self._counters.add("chunks_fetched")
            if self.cache is not None and (chunk.digest or self.config.cache_unverified):
                if self.cache.put(self.blob_digest, chunk, data):
                    self._counters.add("chunks_cached")
            self._resolve(chunk, futs, data)
        return bad

    def _fail(self, chunks: Sequence[ChunkRef], futs: dict[ChunkKey, Future[bytes]], error: BaseException) -> None:
        for chunk in chunks:
            self._resolve(chunk, futs, None, error)
