"""Recently read chunks in memory, and one fetch per chunk at a time.

The kernel reads a file in pieces of at most 128 KiB (and readahead issues
several at once), while a chunk is up to 4 MiB: without this, a sequential
read of one chunk would fetch, decompress and verify it some 32 times. The
memo keeps the last few chunks (bounded in bytes; the disk cache of
remote layers is behind it, and re-verifies on every read) and makes concurrent
reads of the same chunk wait for one fetch. It lives in the trio thread,
so it needs no locks; the blocking ``ChunkStore`` runs in a worker thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from .chunks import ChunkStore, ChunkUnavailable
from .stargz.toc import ChunkRef

DEFAULT_MEMO_BYTES = 32 << 20  # per mount: eight 4 MiB chunks

_Key = tuple[int, int]  # (blob_offset, inner_offset): unique per chunk in a layer


@dataclass
class MemoStats:
    chunks_fetched: int = 0  # chunks asked of the store
    bytes_fetched: int = 0  # their uncompressed size
    memo_hits: int = 0
    fetch_errors: int = 0


class _Pending:
    """A fetch in flight that other readers of the same chunk wait for."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: ChunkUnavailable | None = None


class ChunkMemo:
    """Verified chunks of one layer for the filesystem's trio loop."""

    def __init__(self, store: ChunkStore, max_bytes: int = DEFAULT_MEMO_BYTES) -> None:
        self._store = store
        self._max_bytes = max_bytes
        self._held: OrderedDict[_Key, bytes] = OrderedDict()
        self._held_bytes = 0
        self._pending: dict[_Key, _Pending] = {}
        self.stats = MemoStats()

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
            if data is None:  # already evicted again: fetch it ourselves
                chunk = next(c for c in chunks if _key(c) == key)
                data = (await self._fetch([chunk]))[key]
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
                del self._pending[key]
                pending.done.set()
        self.stats.chunks_fetched += len(chunks)
        fetched = {}
        for chunk, data in zip(chunks, datas):
            self.stats.bytes_fetched += len(data)
            fetched[_key(chunk)] = data
            self._hold(_key(chunk), data)
        return fetched

    def _hold(self, key: _Key, data: bytes) -> None:
        if len(data) > self._max_bytes or key in self._held:
            return
        self._held[key] = data
        self._held_bytes += len(data)
        while self._held_bytes > self._max_bytes:
            _, old = self._held.popitem(last=False)
            self._held_bytes -= len(old)


def _key(chunk: ChunkRef) -> _Key:
    return chunk.blob_offset, chunk.inner_offset
