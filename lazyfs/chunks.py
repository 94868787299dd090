"""Where a mounted layer's file bytes come from: verified, uncompressed chunks.

The filesystem (``lazyfs.fs``) asks a ``ChunkStore`` for the chunks that
cover a read; it neither knows nor cares whether they come from a local
blob, the on-disk chunk cache or the registry. Every implementation returns
only bytes that passed the chunk's digest check (``decode_chunk``), and
raises ``ChunkUnavailable`` (the read then fails with EIO) when it cannot,
within its own time bound.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from .stargz.reader import StargzReader
from .stargz.toc import ChunkRef


class ChunkUnavailable(Exception):
    """A chunk could not be had (fetch failed or timed out, digest mismatch)."""


class ChunkStore(Protocol):
    """Verified chunk bytes of one layer. Blocking and thread-safe."""

    def get_many(self, chunks: Sequence[ChunkRef]) -> list[bytes]:
        """The bytes of each chunk, in order; neighbours may be fetched together."""
        ...


class LocalChunks:
    """Chunks of a blob the reader can already reach (a local file)."""

    def __init__(self, reader: StargzReader) -> None:
        self._reader = reader

    def get_many(self, chunks: Sequence[ChunkRef]) -> list[bytes]:
        try:
            return [self._reader.read_chunk(c) for c in chunks]
        except Exception as exc:  # noqa: BLE001 - any failure is an unreadable chunk
            raise ChunkUnavailable(str(exc)) from exc
