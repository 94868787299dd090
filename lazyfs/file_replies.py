"""READ replies straight from a chunk's cache file.

A read of a chunk that is on local disk used to go through memory: a
worker thread read the 4 MiB chunk file into a fresh buffer, and pyfuse3
copied the requested piece of it into /dev/fuse. With the patched pyfuse3
(``pyfuse3.FileRange``, third_party/pyfuse3) the reply names the cache
file and the range instead, and libfuse splices it from the file's page
cache into the request (or reads it into a buffer of its own where it
cannot splice): no chunk buffer, no thread hop, no copy through Python.

The reply is written in the trio loop's thread, so the range must be in
the page cache by then, or the loop would wait for the disk: checked with
``RWF_NOWAIT`` reads of its first and last byte, and brought in by a worker
thread when it is not. The memo's read-ahead of local chunks
(``ChunkMemo.advise_local``) has the kernel read the next chunk files
ahead, so a sequential reader rarely waits.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pyfuse3
import trio

from .stargz.toc import ChunkRef

SUPPORTED = hasattr(pyfuse3, "FileRange") and hasattr(os, "RWF_NOWAIT")
ENV_SWITCH = "CRFS_LAZYFS_FILE_REPLIES"  # "0": every read goes through the memo


@dataclass
class FileReplyStats:
    file_replies: int = 0  # READs answered from a cache file
    file_reply_bytes: int = 0
    file_replies_not_cached: int = 0  # of those, ranges a worker thread read into the page cache first


class FileReplies:
    """Makes ``pyfuse3.FileRange`` replies for reads inside one local chunk;
    ``open_local`` is the store's (an fd of the chunk's checked bytes, or None)."""

    def __init__(self, open_local: Callable[[ChunkRef], int | None]) -> None:
        self._open_local = open_local
        self._probe = bytearray(1)
        self.stats = FileReplyStats()

    async def reply(self, chunk: ChunkRef, start: int, end: int) -> pyfuse3.FileRange | None:
        """Bytes ``[start, end)`` of the file ``chunk`` belongs to, as a
        reply from the chunk's cache file; None when the chunk is not local.
        A range not all in the page cache yet is read into it by a worker
        thread first (the read-ahead was behind), never by the trio loop."""
        fd = self._open_local(chunk)
        if fd is None:
            return None
        lo, hi = start - chunk.file_offset, end - chunk.file_offset
        try:
            if not self._cached(fd, lo, hi):
                self.stats.file_replies_not_cached += 1
                await trio.to_thread.run_sync(_fill_page_cache, fd, lo, hi)
                if not self._cached(fd, lo, hi):  # evicted at once: unlikely; the memo's way
                    os.close(fd)
                    return None
        except BaseException:
            os.close(fd)
            raise
        self.stats.file_replies += 1
        self.stats.file_reply_bytes += hi - lo
        return pyfuse3.FileRange(fd, lo, hi - lo)  # pyfuse3 closes fd after the reply

    def _cached(self, fd: int, lo: int, hi: int) -> bool:
        """Whether the first and the last byte of ``[lo, hi)`` are in the page cache."""
        try:
            return (os.preadv(fd, [self._probe], lo, os.RWF_NOWAIT) == 1
                    and os.preadv(fd, [self._probe], hi - 1, os.RWF_NOWAIT) == 1)
        except OSError:  # BlockingIOError: not cached
            return False


def _fill_page_cache(fd: int, lo: int, hi: int) -> None:
    """Bring ``[lo, hi)`` of ``fd`` into the page cache (a worker thread's
    job: it waits for the disk): the kernel is asked for the range, then one
    byte per page-cache read-ahead window is read, each waiting for its I/O."""
    os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)
    probe = bytearray(1)
    for offset in range(lo, hi, 64 << 10):
        os.preadv(fd, [probe], offset)
    os.preadv(fd, [probe], hi - 1)


def enabled_for(store: object) -> bool:
    """Whether reads of ``store``'s layer may be answered from cache files:
    the patched pyfuse3, a store with ``open_local`` and ``advise_local``,
    and not switched off (``CRFS_LAZYFS_FILE_REPLIES=0``)."""
    return (SUPPORTED and os.environ.get(ENV_SWITCH, "1") != "0"
            and callable(getattr(store, "open_local", None)) and callable(getattr(store, "advise_local", None)))
