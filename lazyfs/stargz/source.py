"""Random access to a blob: the only thing the reader needs from storage.

The reader never assumes the whole blob is at hand, so that lazyfs can back
it by HTTP Range requests and a chunk cache; here are the local file and
in-memory implementations.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

from .errors import BlobReadError


@runtime_checkable
class BlobSource(Protocol):
    """A blob of known size that can be read at any offset."""

    @property
    def size(self) -> int: ...

    def read_at(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` (fewer only past the end)."""
        ...


def read_exactly(source: BlobSource, offset: int, length: int) -> bytes:
    """``source.read_at`` that turns a short read into a typed error."""
    if offset < 0 or length < 0 or offset + length > source.size:
        raise BlobReadError(f"range {offset}+{length} is outside the {source.size}-byte blob")
    data = source.read_at(offset, length)
    if len(data) != length:
        raise BlobReadError(f"read {len(data)} of {length} bytes at offset {offset}")
    return data


class FileSource:
    """A local blob file, read with ``pread`` (safe to share between threads)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._size = os.fstat(self._fd).st_size
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        parts = []
        while length > 0:
            part = os.pread(self._fd, length, offset)
            if not part:
                break
            parts.append(part)
            offset += len(part)
            length -= len(part)
        return b"".join(parts)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BytesSource:
    """A blob held in memory (tests, small blobs)."""

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)

    @property
    def size(self) -> int:
        return len(self._data)

    def read_at(self, offset: int, length: int) -> bytes:
        return self._data[offset : offset + length]
