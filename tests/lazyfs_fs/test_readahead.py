"""ChunkMemo read-ahead on its own (a fake store, no FUSE): the next chunk is
loaded in the background once, a read of it joins that load, the number of
loads in flight is bounded, and a failed read-ahead is dropped (the read
then fetches the chunk itself and reports its own error)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
import trio

from lazyfs.chunkmemo import ChunkMemo
from lazyfs.chunks import ChunkUnavailable
from lazyfs.stargz.toc import ChunkRef

SIZE = 1000
CHUNKS = [ChunkRef(file_offset=i * SIZE, size=SIZE, blob_offset=i * 600, blob_end=(i + 1) * 600) for i in range(6)]


class FakeStore:
    def __init__(self, fail: int = 0) -> None:
        self.calls: list[int] = []  # blob offsets asked for, in order
        self.fail = fail  # the first this many calls raise
        self.release = threading.Event()
        self.release.set()
        self._lock = threading.Lock()

    def get_many(self, chunks: Sequence[ChunkRef]) -> list[bytes]:
        self.release.wait(5)
        with self._lock:
            self.calls.extend(c.blob_offset for c in chunks)
            if self.fail:
                self.fail -= 1
                raise ChunkUnavailable("boom")
        return [bytes([c.blob_offset // 600]) * c.size for c in chunks]


async def _settle(memo: ChunkMemo) -> None:
    with trio.fail_after(5):
        while memo._readahead_running:  # noqa: SLF001
            await trio.sleep(0.01)


def test_read_ahead_loads_once_and_reads_join_it() -> None:
    store = FakeStore()
    memo = ChunkMemo(store, readahead_inflight=2)

    async def main() -> None:
        assert await memo.get_many([CHUNKS[0]]) == [b"\x00" * SIZE]
        store.release.clear()
        memo.read_ahead(CHUNKS[1:3])
        memo.read_ahead(CHUNKS[1:3])  # already loading: nothing new
        memo.read_ahead(CHUNKS[3:4])  # two in flight already: skipped
        assert memo.stats.readahead_started == 2
        store.release.set()
        assert await memo.get_many([CHUNKS[1]]) == [b"\x01" * SIZE]  # joins the read-ahead
        await _settle(memo)
        assert await memo.get_many([CHUNKS[2]]) == [b"\x02" * SIZE]
        memo.read_ahead(CHUNKS[0:3])  # all held: nothing to do
        assert memo.stats.readahead_started == 2

    trio.run(main)
    assert sorted(store.calls) == [c.blob_offset for c in CHUNKS[:3]]  # each chunk asked for once
    assert memo.stats.chunks_fetched == 3 and memo.stats.readahead_errors == 0


def test_failed_read_ahead_is_ignored_and_the_read_retries() -> None:
    store = FakeStore(fail=1)
    memo = ChunkMemo(store)

    async def main() -> None:
        memo.read_ahead(CHUNKS[1:2])
        await _settle(memo)
        assert memo.stats.readahead_errors == 1
        assert await memo.get_many([CHUNKS[1]]) == [b"\x01" * SIZE]

    trio.run(main)
    assert store.calls == [CHUNKS[1].blob_offset] * 2
    assert memo.stats.fetch_errors == 0


def test_a_read_waiting_on_a_failed_read_ahead_fetches_itself_and_reports() -> None:
    store = FakeStore(fail=2)
    memo = ChunkMemo(store)

    async def main() -> None:
        store.release.clear()
        memo.read_ahead(CHUNKS[4:5])
        store.release.set()
        with pytest.raises(ChunkUnavailable):  # the read's own fetch failed too: reported
            await memo.get_many([CHUNKS[4]])
        assert await memo.get_many([CHUNKS[4]]) == [b"\x04" * SIZE]

    trio.run(main)
    assert memo.stats.readahead_errors == 1 and memo.stats.fetch_errors == 1


class LocalStore(FakeStore):
    """A store that has some chunks on local disk (as RemoteChunks with its cache)."""

    def __init__(self, local: set[int]) -> None:
        super().__init__()
        self.local = local  # blob offsets

    def is_local(self, chunk: ChunkRef) -> bool:
        return chunk.blob_offset in self.local


def test_local_chunks_are_read_ahead_deeper_remote_ones_only_as_far_as_asked() -> None:
    store = LocalStore({c.blob_offset for c in CHUNKS[1:4]})
    memo = ChunkMemo(store, readahead_inflight=1, local_readahead_inflight=3)

    async def main() -> None:
        store.release.clear()
        memo.read_ahead(CHUNKS[1:6], remote=1)  # 1-3 local: all three; 4 remote, beyond the first: not
        assert memo.stats.readahead_started == 3 and memo.stats.readahead_local == 3
        memo.read_ahead(CHUNKS[4:6], remote=1)  # remote, the first asked for: one remote slot
        assert memo.stats.readahead_started == 4
        memo.read_ahead(CHUNKS[5:6])  # both kinds of slot taken
        assert memo.stats.readahead_started == 4
        store.release.set()
        await _settle(memo)

    trio.run(main)
    assert sorted(store.calls) == [c.blob_offset for c in CHUNKS[1:5]]


def test_a_store_without_is_local_reads_ahead_as_before() -> None:
    store = FakeStore()
    memo = ChunkMemo(store)  # one read-ahead in flight

    async def main() -> None:
        store.release.clear()
        memo.read_ahead(CHUNKS[1:4], remote=1)
        memo.read_ahead(CHUNKS[2:4])
        assert memo.stats.readahead_started == 1 and memo.stats.readahead_local == 0
        store.release.set()
        await _settle(memo)

    trio.run(main)
    assert store.calls == [CHUNKS[1].blob_offset]


def test_chunks_read_ahead_are_not_evicted_before_the_one_being_read() -> None:
    # room for four chunks: the one being read and three read ahead; the
    # chunk read before them goes first, not the next one (least recently used)
    store = LocalStore({c.blob_offset for c in CHUNKS})
    memo = ChunkMemo(store, max_bytes=4 * SIZE, local_readahead_inflight=3)

    async def main() -> None:
        await memo.get_many([CHUNKS[0]])
        memo.read_ahead(CHUNKS[1:4])
        await _settle(memo)
        await memo.get_many([CHUNKS[0]])  # chunk 0 touched after 1-3 arrived
        await memo.get_many([CHUNKS[1]])  # the reader moves on
        memo.read_ahead(CHUNKS[2:5])  # 4 arrives: 0 goes, not 2 or 3 (unread)
        await _settle(memo)
        for i in (1, 2, 3, 4):
            await memo.get_many([CHUNKS[i]])

    trio.run(main)
    assert sorted(store.calls) == [c.blob_offset for c in CHUNKS[:5]]  # nothing loaded twice
