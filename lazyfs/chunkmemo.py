"""Recently read chunks in memory, and one fetch per chunk at a time.

The kernel reads a file in pieces of at most 128 KiB (and readahead issues
several at once), while a chunk is up to 4 MiB: without this, a sequential
read of one chunk would fetch, decompress and verify it some 32 times. The
memo keeps the last few chunks (bounded in bytes; the disk cache of
remote layers is behind it) and makes concurrent reads of the same chunk
wait for one fetch. It lives in the trio thread, so it needs no locks; the
blocking ``ChunkStore`` runs in a worker thread.

Read-ahead: ``read_ahead`` starts loading chunks a sequential reader will
want next (the same ``ChunkStore``, a worker thread, at most
``DEFAULT_READAHEAD_INFLIGHT`` at a time), so that loading chunk N+1
overlaps serving chunk N. Chunks the store already has on local disk (its
``is_local``, when it has one: the chunk cache of a remote layer) cost a
disk read and no request, so more of them are read ahead at once
(``DEFAULT_LOCAL_READAHEAD_INFLIGHT``): reading one 4 MiB chunk file at a
time keeps the disk at about 1 GB/s, well under what a cold sequential read
of a plain file gets. It never delays a read: a read of a chunk being
read ahead waits for that one load instead of starting another, and when a
read-ahead fails the error is dropped and the read fetches (and reports) it
itself.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice

import trio

from .chunks import ChunkStore, ChunkUnavailable
from .stargz.toc import ChunkRef

DEFAULT_MEMO_BYTES = 16 << 20  # per mount: four 4 MiB chunks (a sequential reader needs two: current + read-ahead)
DEFAULT_READAHEAD_INFLIGHT = 1  # read-ahead loads running at once, per mount
# ... and of chunks already on local disk (a sequential reader's next three
# 4 MiB chunks: with the current one, what DEFAULT_MEMO_BYTES holds)
DEFAULT_LOCAL_READAHEAD_INFLIGHT = 3

_EVICT_SCAN = 8  # oldest held chunks looked at for one that was read (see _hold)
_ADVISED_KEPT = 64  # chunks advised lately, not advised again (their pages stay in the page cache a while)

_Key = tuple[int, int]  # (blob_offset, inner_offset): unique per chunk in a layer


@dataclass
class MemoStats:
    chunks_fetched: int = 0  # chunks asked of the store
    bytes_fetched: int = 0  # their uncompressed size
    memo_hits: int = 0
    fetch_errors: int = 0
    readahead_started: int = 0  # chunks read ahead (also counted in chunks_fetched when loaded)
    readahead_local: int = 0  # of those, chunks the store had on local disk
    readahead_errors: int = 0  # read-ahead loads that failed (ignored; the read retries)


class _Pending:
    """A fetch in flight that other readers of the same chunk wait for."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: ChunkUnavailable | None = None  # never set for a read-ahead


class ChunkMemo:
    """Verified chunks of one layer for the filesystem's trio loop."""

    def __init__(
        self, store: ChunkStore, max_bytes: int = DEFAULT_MEMO_BYTES, *,
        readahead_inflight: int = DEFAULT_READAHEAD_INFLIGHT,
        local_readahead_inflight: int = DEFAULT_LOCAL_READAHEAD_INFLIGHT,
    ) -> None:
        self._store = store
        self._max_bytes = max_bytes
        self._held: OrderedDict[_Key, bytes] = OrderedDict()
        self._held_bytes = 0
        # held chunks a read-ahead brought that no read has used yet: evicted
        # only after the others, else a sequential reader's next chunk would
        # go before the one it is reading (touched last)
        self._unread: set[_Key] = set()
        self._pending: dict[_Key, _Pending] = {}
        self._readahead_max = readahead_inflight
        self._readahead_running = 0  # all read-aheads in flight
        self._local_readahead_max = local_readahead_inflight
        self._local_readahead_running = 0  # of those, of chunks that were local
        # the store's "is this chunk on local disk" (a stat, no read of the chunk), if it has one
        self._is_local: Callable[[ChunkRef], bool] | None = getattr(store, "is_local", None)
        # set by a reader that takes local chunks from their files (lazyfs.file_replies): a
        # read-ahead of a local chunk then only has the kernel read its file ahead
        self.advise_local: Callable[[ChunkRef], bool] | None = None
        self._advised: OrderedDict[_Key, None] = OrderedDict()  # the last _ADVISED_KEPT chunks advised
        self.stats = MemoStats()

    def holds(self, chunk: ChunkRef) -> bool:
        """Whether ``chunk``'s bytes are in memory now."""
        return _key(chunk) in self._held

    def read_ahead(self, chunks: Sequence[ChunkRef], *, remote: int | None = None) -> None:
        """Start loading those of ``chunks`` that are neither held nor being
        loaded, in the background, in order; never waits. A chunk the store
        has on local disk goes while fewer than ``local_readahead_inflight``
        local read-aheads run; any other only while it is among the first
        ``remote`` of ``chunks`` (None: all) and fewer than
        ``readahead_inflight`` such read-aheads run. Stops at the first chunk
        it may not start. Call from the trio thread."""
        for index, chunk in enumerate(chunks):
            if self._readahead_running >= self._readahead_max + self._local_readahead_max:
                return  # every slot taken: not even a stat
            key = _key(chunk)
            if key in self._held or key in self._pending or key in self._advised or chunk.size > self._max_bytes:
                continue
            local = self._local(chunk)
            if local:
                if self._local_readahead_running >= self._local_readahead_max:
                    return
            elif (remote is not None and index >= remote) or (
                    self._readahead_running - self._local_readahead_running >= self._readahead_max):
                return
            pending = self._pending[key] = _Pending()
            self._readahead_running += 1
            self._local_readahead_running += local
            self.stats.readahead_started += 1
            self.stats.readahead_local += local
            try:
                trio.lowlevel.spawn_system_task(self._load_ahead, chunk, pending, local, name="lazyfs-readahead")
            except BaseException:
                self._readahead_running -= 1
                self._local_readahead_running -= local
                del self._pending[key]
                pending.done.set()
                raise

    def _local(self, chunk: ChunkRef) -> bool:
        """Whether the store has ``chunk`` on local disk (False when it cannot say)."""
        if self._is_local is None:
            return False
        try:
            return bool(self._is_local(chunk))
        except Exception:  # noqa: BLE001 - only a hint: treated as remote
            return False

    async def _load_ahead(self, chunk: ChunkRef, pending: _Pending, local: bool = False) -> None:
        key = _key(chunk)
        try:
            if local and self.advise_local is not None:
                await self._advise_ahead(chunk, self.advise_local)
            else:
                await self._hold_ahead(chunk)
        except Exception:  # noqa: BLE001 - ignored: a read of this chunk fetches it again and reports
            self.stats.readahead_errors += 1
        finally:
            self._readahead_running -= 1
            self._local_readahead_running -= local
            if self._pending.get(key) is pending:
                del self._pending[key]
            pending.done.set()  # waiters find the chunk held, or fetch it themselves

    async def _hold_ahead(self, chunk: ChunkRef) -> None:
        # abandon_on_cancel: an unmount does not wait for a read-ahead
        datas = await trio.to_thread.run_sync(self._store.get_many, [chunk], abandon_on_cancel=True)
        if len(datas) != 1 or len(datas[0]) != chunk.size:
            raise ChunkUnavailable("store returned the wrong chunk")
        self.stats.chunks_fetched += 1
        self.stats.bytes_fetched += len(datas[0])
        self._hold(_key(chunk), datas[0], unread=True)

    async def _advise_ahead(self, chunk: ChunkRef, advise: Callable[[ChunkRef], bool]) -> None:
        """A local chunk's read-ahead for ``advise_local``: its file into the
        page cache, nothing held here."""
        if not await trio.to_thread.run_sync(advise, chunk, abandon_on_cancel=True):
            raise ChunkUnavailable("not on local disk any more")  # gone meanwhile: a read fetches it
        self._advised[_key(chunk)] = None
        while len(self._advised) > _ADVISED_KEPT:
            self._advised.popitem(last=False)

    async def read(self, chunks: Sequence[ChunkRef], offset: int, end: int) -> bytes | memoryview:
        """Bytes ``[offset, end)`` of a file whose ``chunks`` (in file order)
        cover them; raises ``ChunkUnavailable``. Within one chunk (nearly
        every read) a ``memoryview`` of the held bytes, not a copy: a
        chunk's bytes never change."""
        if not chunks:
            return b""
        parts = []
        for chunk, data in zip(chunks, await self.get_many(chunks)):
            lo = max(offset - chunk.file_offset, 0)
            hi = min(end - chunk.file_offset, chunk.size)
            parts.append(memoryview(data)[lo:hi])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def get_many(self, chunks: Sequence[ChunkRef]) -> list[bytes]:
        """The bytes of each chunk, in order; raises ``ChunkUnavailable``."""
        found: dict[_Key, bytes] = {}
        waits: list[tuple[_Key, _Pending]] = []
        missing: list[ChunkRef] = []
        for chunk in chunks:
            key = _key(chunk)
            if key in found:
                continue
            data = self._held.get(key)
            if data is not None:
                self._held.move_to_end(key)
                self._unread.discard(key)
                self.stats.memo_hits += 1
                found[key] = data
            elif key in self._pending:
                waits.append((key, self._pending[key]))
            else:
                missing.append(chunk)
        if missing:
            found.update(await self._fetch(missing))
        for key, pending in waits:
            await pending.done.wait()
            if pending.error is not None:
                raise pending.error
            data = self._held.get(key)
            self._unread.discard(key)
            if data is None:  # evicted again, or a read-ahead that failed: get it ourselves
                chunk = next(c for c in chunks if _key(c) == key)
                data = (await self.get_many([chunk]))[0]
            found[key] = data
        return [found[_key(c)] for c in chunks]

    async def _fetch(self, chunks: list[ChunkRef]) -> dict[_Key, bytes]:
        mine = {_key(c): _Pending() for c in chunks}
        self._pending.update(mine)
        try:
            datas = await trio.to_thread.run_sync(self._store.get_many, chunks)
            if len(datas) != len(chunks):
                raise ChunkUnavailable(f"store returned {len(datas)} chunks for {len(chunks)}")
        except ChunkUnavailable as exc:
            self.stats.fetch_errors += 1
            for pending in mine.values():
                pending.error = exc
            raise
        finally:
            for key, pending in mine.items():
                if self._pending.get(key) is pending:
                    del self._pending[key]
                pending.done.set()
        self.stats.chunks_fetched += len(chunks)
        fetched = {}
        for chunk, data in zip(chunks, datas):
            self.stats.bytes_fetched += len(data)
            fetched[_key(chunk)] = data
            self._hold(_key(chunk), data)
        return fetched

    def _hold(self, key: _Key, data: bytes, *, unread: bool = False) -> None:
        """Keep ``data``; evict least recently used chunks over the limit,
        those read ahead and not read yet last, the one just added never."""
        if len(data) > self._max_bytes or key in self._held:
            return
        self._held[key] = data
        self._held_bytes += len(data)
        if unread:
            self._unread.add(key)
        while self._held_bytes > self._max_bytes:
            # among the few oldest (small chunks may be many): the first one read, else the oldest
            oldest = [k for k in islice(self._held, _EVICT_SCAN + 1) if k != key][:_EVICT_SCAN]
            victim = next((k for k in oldest if k not in self._unread), oldest[0])
            self._held_bytes -= len(self._held.pop(victim))
            self._unread.discard(victim)


def _key(chunk: ChunkRef) -> _Key:
    return chunk.blob_offset, chunk.inner_offset
