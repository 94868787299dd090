"""Verified, uncompressed chunks on disk, shared by every mount and process.

One file per chunk, ``ROOT/chunks/<blob-hex[:2]>/<blob-hex>/<offset>-<inner>-<size>``:
a blob's bytes are fixed by its digest, so the chunk's place in the blob
names its content. Files are written to ``ROOT/tmp`` and renamed into place,
so a reader (in any process) sees a whole chunk or none; what a crash may
still leave behind (a temp file, a file truncated by a power loss before it
reached the disk) is never served, because ``get`` checks the length before
returning anything, and the digest of a file last written or used before
this boot (a power loss may have left one of the right length holding
zeros or stale blocks: nothing is fsynced) or, with
``CacheConfig.verify_on_read``, of every one. Only chunks that passed
``decode_chunk``'s digest check are ever stored.

The cache is bounded: ``get`` touches a file's mtime, and when the bytes on
disk exceed ``max_bytes`` the least recently used files are removed (one
process at a time, under an ``flock``; a reader that loses the race to an
eviction just sees a miss).
"""

from __future__ import annotations

import errno
import fcntl
import hmac
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .stargz.digest import digest_of, new_hasher
from .stargz.toc import ChunkRef

log = logging.getLogger(__name__)

_TMP_MAX_AGE = 600.0  # seconds before an orphaned temp file is removed
_BOOT_MARGIN = 60.0  # seconds after the boot time in which an mtime still counts as "before this boot"
_TOUCH_AFTER = 60.0  # open_checked moves a chunk up the LRU only when its mtime is older than this


class CacheError(Exception):
    """The cache directory cannot be used at all (not a crash-leftover)."""


@dataclass(frozen=True)
class CacheConfig:
    """``max_bytes``: the size limit; eviction brings usage down to
    ``low_water`` of it. ``verify_on_read``: re-hash every chunk read back
    and check it against its digest. Off by default: a chunk is stored only
    after ``decode_chunk`` verified it, written to a temp file and renamed
    into place, and ``get`` always checks the length, so a crash or a
    truncated write is never served; and a file whose mtime (write, or the
    LRU touch after a good read) is from before this boot is hashed once
    when read, since a power loss may have kept the rename but not the data
    (``verify_after_boot``). What the default gives up is catching a
    same-length change of the file after it was stored and checked in this
    boot (a disk or filesystem returning wrong bytes, or someone writing
    into the cache directory); turn it on where that matters more than
    throughput (it costs a SHA-256 over every chunk served from disk: about
    two thirds of the fetch thread's time in a cold-from-cache sequential read).
    ``rescan_fraction``: how much this process may add, as a fraction of the
    limit, before it re-measures the directory (other processes add too)."""

    max_bytes: int = 10 << 30
    low_water: float = 0.9
    verify_on_read: bool = False
    rescan_fraction: float = 0.1
    verify_after_boot: bool = True


class ChunkCache:
    """``get``/``put`` verified chunk bytes by (blob digest, chunk). Thread-safe."""

    def __init__(self, root: str | os.PathLike[str], config: CacheConfig = CacheConfig()) -> None:
        self.root = Path(root)
        self.config = config
        self._chunks = self.root / "chunks"
        self._tmp = self.root / "tmp"
        try:
            # owner only: cached chunks are image contents (possibly from a
            # private registry), and what is stored is trusted when served
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._chunks.mkdir(mode=0o700, exist_ok=True)
            self._tmp.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create chunk cache at {self.root}: {exc}") from exc
        self._lock = threading.Lock()
        self._counts = {"hits": 0, "misses": 0, "stored": 0, "bad_entries": 0, "evicted": 0, "evicted_bytes": 0}
        self._usage = self._measure()[0]
        self._added_since_scan = 0
        # an mtime before this is "before this boot" (no boot time known: every file)
        self._verify_before = _boot_time() + _BOOT_MARGIN if config.verify_after_boot else float("-inf")

    # --- keys -------------------------------------------------------------

    def path_for(self, blob_digest: str, chunk: ChunkRef) -> Path:
        """Where ``chunk`` of ``blob_digest`` lives (whether or not it is there)."""
        algo, _, hexpart = blob_digest.partition(":")
        if not hexpart or not hexpart.isalnum() or not algo.isalnum():
            raise ValueError(f"not a blob digest: {blob_digest!r}")
        name = f"{chunk.blob_offset}-{chunk.inner_offset}-{chunk.size}"
        return self._chunks / hexpart[:2] / f"{algo}-{hexpart}" / name

    # --- read / write -----------------------------------------------------

    def get(self, blob_digest: str, chunk: ChunkRef) -> bytes | None:
        """The chunk's bytes, or None when absent or not provably whole."""
        path = self.path_for(blob_digest, chunk)
        try:
            with open(path, "rb") as f:
                data = f.read(chunk.size + 1)
                before_boot = os.fstat(f.fileno()).st_mtime < self._verify_before
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("chunk cache: cannot read %s: %s", path, exc)
            self._count("misses")
            return None
        if len(data) != chunk.size or not self._digest_ok(chunk, data, before_boot):
            log.warning("chunk cache: discarding bad entry %s (%d bytes, want %d)", path, len(data), chunk.size)
            self._discard(path)
            self._count("bad_entries")
            self._count("misses")
            return None
        try:
            os.utime(path)  # the LRU clock; also "checked in this boot" (see CacheConfig)
        except OSError:
            pass  # evicted meanwhile: the bytes we hold are still good
        self._count("hits")
        return data

    def open_checked(self, blob_digest: str, chunk: ChunkRef) -> int | None:
        """An open fd (the caller closes it) of the chunk's file when ``get``
        would return its bytes without hashing them: the right size, and
        written or checked in this boot (and ``verify_on_read`` off). None
        otherwise (absent, short, or due a hash: ``get`` does that). Counts a
        hit and touches the LRU clock as ``get`` does, at most once a minute."""
        if self.config.verify_on_read and chunk.digest:
            return None
        path = self.path_for(blob_digest, chunk)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if st.st_size != chunk.size or (st.st_mtime < self._verify_before and chunk.digest):
                os.close(fd)
                return None
            if time.time() - st.st_mtime > _TOUCH_AFTER:  # a READ is often a quarter of a chunk or less
                os.utime(fd)
        except OSError:
            os.close(fd)
            return None
        self._count("hits")
        return fd

    def advise(self, blob_digest: str, chunk: ChunkRef) -> bool:
        """Have the kernel start reading the chunk's file into the page cache
        (``POSIX_FADV_WILLNEED``; returns at once); False when it is absent.
        Only a hint: no check, no hit counted, the LRU clock left alone."""
        try:
            fd = os.open(self.path_for(blob_digest, chunk), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
        return True

    def contains(self, blob_digest: str, chunk: ChunkRef) -> bool:
        """Whether a file of the right size is there (no digest check)."""
        try:
            return self.path_for(blob_digest, chunk).stat().st_size == chunk.size
        except FileNotFoundError:
            return False

    def put(self, blob_digest: str, chunk: ChunkRef, data: bytes) -> bool:
        """Store verified, uncompressed chunk bytes (atomically); False when
        the disk would not take them."""
        if len(data) != chunk.size:
            raise ValueError(f"chunk at {chunk.blob_offset} is {chunk.size} bytes, got {len(data)}")
        path = self.path_for(blob_digest, chunk)
        tmp = self._tmp / f"{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(6)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            self._rename_into_place(tmp, path)
        except OSError as exc:
            self._discard(tmp)
            log.warning("chunk cache: cannot store %s: %s", path, exc)
            return False  # a cache that cannot write is a slower cache, not a failed read
        self._count("stored")
        with self._lock:
            self._usage += len(data)
            self._added_since_scan += len(data)
            over = self._usage > self.config.max_bytes
            stale = self._added_since_scan > self.config.max_bytes * self.config.rescan_fraction
        if over or stale:
            try:
                self.evict()
            except OSError as exc:
                log.warning("chunk cache: eviction failed: %s", exc)
        return True

    def _rename_into_place(self, tmp: Path, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)

    # --- size limit -------------------------------------------------------

    def evict(self) -> int:
        """Bring usage under the low-water mark, oldest-used first; returns
        the bytes removed (0 when another process is evicting right now)."""
        lock_fd = os.open(self.root / ".evict.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    return 0
                raise
            self._remove_stale_tmp()
            usage, files = self._measure()
            removed = 0
            if usage > self.config.max_bytes:
                target = self.config.max_bytes * self.config.low_water
                files.sort()  # by mtime: least recently used first
                for _mtime, size, path in files:
                    if usage - removed <= target:
                        break
                    if self._discard(path):
                        removed += size
                        self._count("evicted")
                        self._count("evicted_bytes", size)
            with self._lock:
                self._usage = usage - removed
                self._added_since_scan = 0
            return removed
        finally:
            os.close(lock_fd)

    def usage(self) -> int:
        """Bytes of chunks on disk as of the last measurement plus our own writes."""
        with self._lock:
            return self._usage

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self._counts, "usage_bytes": self._usage, "max_bytes": self.config.max_bytes}

    def _measure(self) -> tuple[int, list[tuple[float, int, Path]]]:
        total, files = 0, []
        for shard in _scandir(self._chunks):
            for blob in _scandir(Path(shard.path)):
                for entry in _scandir(Path(blob.path)):
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    total += st.st_size
                    files.append((st.st_mtime, st.st_size, Path(entry.path)))
        return total, files

    def _remove_stale_tmp(self) -> None:
        cutoff = time.time() - _TMP_MAX_AGE
        for entry in _scandir(self._tmp):
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass

    # --- helpers ----------------------------------------------------------

    def _digest_ok(self, chunk: ChunkRef, data: bytes, before_boot: bool = False) -> bool:
        if not ((self.config.verify_on_read or before_boot) and chunk.digest):
            return True
        hasher = new_hasher(chunk.digest)
        hasher.update(data)
        return hmac.compare_digest(digest_of(hasher), chunk.digest)

    def _discard(self, path: Path) -> bool:
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning("chunk cache: cannot remove %s: %s", path, exc)
            return False

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n


def _boot_time() -> float:
    """This boot's start, in wall-clock seconds (/proc/stat ``btime``); +inf
    when unknown, so that every file counts as older."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return float("inf")


def _scandir(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []
