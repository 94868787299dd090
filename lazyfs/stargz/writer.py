"""Converting a tar (or tar.gz) layer into an eStargz blob.

Layout, as the reference writer makes it: tar headers go into the current
gzip member; every chunk of file data (``chunk_size`` bytes at most) starts
a new member, which also takes the padding and headers that follow it; then
the TOC (``stargz.index.json`` in a tar in its own member) and the footer.
Prioritized files come first (optionally in smaller chunks than the rest),
followed by ``.prefetch.landmark``; without any, the layer starts with
``.no.prefetch.landmark``.

Two passes over an uncompressed copy of the input (a temp file if the input
is gzipped): the first reads only headers, to drop duplicates and put
prioritized files first; the second copies data with ``pread``. Members are
compressed on a thread pool (zlib releases the GIL) and written in order, so
memory is bounded by a few chunks plus the TOC, whatever the layer's size,
and the output depends only on the input and the options.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import math
import os
import tarfile
import tempfile
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import IO, Any

from .errors import InvalidInputTar, PrioritizedFileNotFound, UnsafePath, UnsupportedEntry
from .footer import encode_footer
from .gzipmember import GZIP_MAGIC, gzip_member
from .toc import (
    LANDMARK_CONTENTS,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TAR_TYPES,
    TOC_TAR_NAME,
    clean_name,
    parent_of,
)

DEFAULT_CHUNK_SIZE = 4 << 20  # the reference writer's default
DEFAULT_LEVEL = 9  # the reference's default too (gzip.BestCompression)

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_XATTR_PREFIX = "SCHILY.xattr."
_EMPTY_SHA256 = "sha256:" + hashlib.sha256().hexdigest()
_HEADER_RUN_LIMIT = 4 << 20  # headers between two files' data: split members beyond this
_BATCH_BYTES = 1 << 20  # members handed to a worker at once (amortizes small files)
_BATCH_COUNT = 256


@dataclass(frozen=True)
class BuildResult:
    """What a registry manifest and a config need to know about the blob."""

    digest: str  # of the blob: the layer descriptor's digest
    diff_id: str  # of the whole uncompressed stream, TOC member included, as the reference reports
    toc_digest: str  # of the TOC JSON: containerd.io/snapshot/stargz/toc.digest
    uncompressed_size: int  # io.containers.estargz.uncompressed-size
    size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "diffID": self.diff_id,
            "tocDigest": self.toc_digest,
            "uncompressedSize": self.uncompressed_size,
            "size": self.size,
        }


def build(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prioritized: Sequence[str] = (),
    level: int = DEFAULT_LEVEL,
    workers: int | None = None,
    tmp_dir: str | os.PathLike[str] | None = None,
    missing_prioritized: list[str] | None = None,
    prioritized_chunk_size: int | None = None,
) -> BuildResult:
    """Convert the tar or tar.gz at ``src`` to an eStargz blob at ``dst``.

    ``prioritized`` paths (with their parent directories and hardlink
    targets) go first, in the given order, for prefetching. A prioritized
    path the layer lacks is an error, unless ``missing_prioritized`` is
    given: then it is appended there (an image's profile spans its layers).
    ``prioritized_chunk_size`` (default ``chunk_size``) chunks the data of
    the prioritized files finer, so that a reader can prefetch just the
    parts of them a profile says are read.
    """
    if chunk_size <= 0 or (prioritized_chunk_size is not None and prioritized_chunk_size <= 0):
        raise ValueError("chunk_size must be positive")
    if not 0 <= level <= 9:
        raise ValueError("gzip level must be 0..9")
    with contextlib.ExitStack() as stack:
        tar = stack.enter_context(_uncompressed_tar(src, tmp_dir))
        members = _index(tar)
        ordered = _order(members, prioritized, missing_prioritized)
        out = stack.enter_context(open(dst, "wb"))
        pipeline = stack.enter_context(_MemberPipeline(out, level, workers or os.cpu_count() or 1, chunk_size))
        try:
            layer = _LayerWriter(pipeline, tar.fileno(), prioritized_chunk_size or chunk_size)
            for info, payload in ordered:
                if payload is not None:  # the landmark: the prioritized files are behind it
                    layer.chunk_size = chunk_size
                layer.add(info, payload)
            return layer.close()
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(dst)
            raise


@contextlib.contextmanager
def _uncompressed_tar(src: str | os.PathLike[str], tmp_dir: str | os.PathLike[str] | None) -> Iterator[IO[bytes]]:
    """The input as a seekable uncompressed tar (a temp copy if it is gzipped)."""
    with open(src, "rb") as f:
        magic = f.read(4)
        f.seek(0)
        if magic.startswith(_ZSTD_MAGIC):
            raise InvalidInputTar(f"{src}: zstd-compressed input is not supported")
        if not magic.startswith(GZIP_MAGIC):
            yield f
            return
        with tempfile.TemporaryFile(dir=tmp_dir) as tmp:
            try:
                with gzip.GzipFile(fileobj=f) as gz:
                    while piece := gz.read(1 << 20):
                        tmp.write(piece)
            except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
                raise InvalidInputTar(f"{src}: bad gzip: {exc}") from None
            tmp.seek(0)
            yield tmp


def _index(tar: IO[bytes]) -> dict[str, tarfile.TarInfo]:
    """Headers by clean name, in stream order; a later duplicate replaces an
    earlier one (as extraction would), landmarks and an old TOC are dropped."""
    members: dict[str, tarfile.TarInfo] = {}
    try:
        with tarfile.open(fileobj=tar, mode="r:", encoding="utf-8", errors="surrogateescape") as tf:
            for info in tf:
                name = _checked(info)
                if name in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK, TOC_TAR_NAME):
                    continue
                members.pop(name, None)
                members[name] = info
            end = tf.offset
    except tarfile.TarError as exc:
        raise InvalidInputTar(f"not a tar: {exc}") from None
    # tarfile takes a corrupt header after the first as the end of the archive
    if os.pread(tar.fileno(), tarfile.BLOCKSIZE, end).strip(b"\0"):
        raise InvalidInputTar(f"corrupt tar header at offset {end}")
    _check_links_and_parents(members)
    return members


def _checked(info: tarfile.TarInfo) -> str:
    """The clean name of a member eStargz can hold, normalizing regular types."""
    if info.issparse() or info.type not in (*_REGULAR, *TAR_TYPES):
        raise UnsupportedEntry(f"{info.name!r}: tar entry type {info.type!r} is not supported")
    if info.type in _REGULAR:
        info.type = tarfile.REGTYPE
    for text in (info.name, info.linkname, info.uname, info.gname):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise UnsupportedEntry(f"{text!r} is not UTF-8") from None
    try:
        name = clean_name(info.name)
        if info.islnk():
            clean_name(info.linkname)
    except UnsafePath as exc:
        raise UnsupportedEntry(str(exc)) from None
    if name == "" and not info.isdir():
        raise UnsupportedEntry(f"{info.name!r}: the root must be a directory")
    return name


def _check_links_and_parents(members: dict[str, tarfile.TarInfo]) -> None:
    """Refuse what the reader would refuse: dangling hardlinks, entries below a non-directory."""
    for name, info in members.items():
        if info.islnk():
            target = members.get(clean_name(info.linkname))
            if target is None or target.isdir():
                raise UnsupportedEntry(f"{info.name!r}: hardlink target {info.linkname!r} is not a file in the layer")
        parent = members.get(parent_of(name)) if name else None
        if parent is not None and not parent.isdir():
            raise UnsupportedEntry(f"{info.name!r}: parent {parent.name!r} is not a directory")


def _order(
    members: dict[str, tarfile.TarInfo], prioritized: Sequence[str], missing: list[str] | None = None
) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """Prioritized entries (each after its parents and hardlink target), the
    landmark, then the rest in input order."""
    rest = dict(members)
    first: dict[str, tarfile.TarInfo] = {}

    def move(name: str) -> None:
        if name in first:
            return
        if name:
            move(parent_of(name))
        info = rest.pop(name, None)
        if info is None:
            return  # a directory the tar does not list: the reader implies it
        if info.islnk():
            move(clean_name(info.linkname))
        first[name] = info

    for path in prioritized:
        try:
            name = clean_name(path.lstrip("/"))
        except UnsafePath as exc:
            raise PrioritizedFileNotFound(str(exc)) from None
        if name not in members:
            if missing is None:
                raise PrioritizedFileNotFound(f"prioritized file {path!r} is not in the layer")
            missing.append(path)
            continue
        move(name)
    landmark = tarfile.TarInfo(PREFETCH_LANDMARK if first else NO_PREFETCH_LANDMARK)
    landmark.size, landmark.mode = len(LANDMARK_CONTENTS), 0  # as the reference writes it
    return [
        *((info, None) for info in first.values()),
        (landmark, LANDMARK_CONTENTS),
        *((info, None) for info in rest.values()),
    ]


class _LayerWriter:
    """Turns ordered tar members into gzip members and TOC entries."""

    def __init__(self, pipeline: _MemberPipeline, tar_fd: int, chunk_size: int) -> None:
        self._pipeline = pipeline
        self._tar_fd = tar_fd
        self.chunk_size = chunk_size  # for the files added from now on
        self._diff = hashlib.sha256()
        self._uncompressed = 0
        self._toc: list[dict[str, Any]] = []
        self._last_uname: dict[int, str] = {}
        self._last_gname: dict[int, str] = {}
        # the gzip member being filled: its pieces, and the chunk it starts with
        self._pieces: list[bytes] = []
        self._pieces_len = 0
        self._chunk: dict[str, Any] | None = None
        self._chunk_len = 0
        self._chunk_is_file = False

    def add(self, info: tarfile.TarInfo, payload: bytes | None) -> None:
        self._write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        entry = self._toc_entry(info)
        self._toc.append(entry)
        if info.isreg():
            self._add_data(entry, info, payload)
        if self._pieces_len - self._chunk_len > _HEADER_RUN_LIMIT:
            self._end_member()

    def _add_data(self, entry: dict[str, Any], info: tarfile.TarInfo, payload: bytes | None) -> None:
        size = info.size
        if size == 0:
            entry["digest"] = _EMPTY_SHA256
            return
        chunk_size = self.chunk_size
        chunked = size > chunk_size
        file_hash = hashlib.sha256() if chunked else None
        chunk = entry
        written = 0
        while True:
            n = min(chunk_size, size - written)
            if n == chunk_size:
                chunk["chunkSize"] = n  # the last, shorter chunk says 0: "to the end"
            data = payload[written : written + n] if payload is not None else self._pread(info, written, n)
            self._end_member()
            self._chunk, self._chunk_len, self._chunk_is_file = chunk, n, not chunked
            self._write(data)
            if file_hash is not None:
                file_hash.update(data)
            written += n
            if written == size:
                break
            chunk = {"name": entry["name"], "type": "chunk", "offset": 0, "chunkOffset": written, "chunkSize": 0, "chunkDigest": ""}
            self._toc.append(chunk)
        if file_hash is not None:
            entry["digest"] = "sha256:" + file_hash.hexdigest()
        self._write(bytes(-size % tarfile.BLOCKSIZE))

    def close(self) -> BuildResult:
        """Write the TOC member and the footer; the layer is complete."""
        self._end_member()
        self._pipeline.drain()
        toc = {"version": 1, "entries": [{k: v for k, v in e.items() if v} for e in self._toc]}
        toc_json = json.dumps(toc, indent="\t", ensure_ascii=False).encode("utf-8")
        self._toc.clear()
        member = tarfile.TarInfo(TOC_TAR_NAME)
        member.size, member.mode = len(toc_json), 0  # as the reference writes it
        toc_tar = b"".join(
            (
                member.tobuf(tarfile.USTAR_FORMAT),
                toc_json,
                bytes(-len(toc_json) % tarfile.BLOCKSIZE),
                bytes(2 * tarfile.BLOCKSIZE),  # end of archive
            )
        )
        self._diff.update(toc_tar)
        self._uncompressed += len(toc_tar)
        toc_offset = self._pipeline.pos
        self._pipeline.write(gzip_member(toc_tar, self._pipeline.level))
        self._pipeline.write(encode_footer(toc_offset))
        return BuildResult(
            digest=self._pipeline.digest(),
            diff_id="sha256:" + self._diff.hexdigest(),
            toc_digest="sha256:" + hashlib.sha256(toc_json).hexdigest(),
            uncompressed_size=self._uncompressed,
            size=self._pipeline.pos,
        )

    def _write(self, data: bytes) -> None:
        self._pieces.append(data)
        self._pieces_len += len(data)
        self._diff.update(data)
        self._uncompressed += len(data)

    def _end_member(self) -> None:
        if self._pieces:
            data = self._pieces[0] if len(self._pieces) == 1 else b"".join(self._pieces)
            self._pipeline.add(data, self._chunk_len, self._chunk, self._chunk_is_file)
        self._pieces = []
        self._pieces_len = self._chunk_len = 0
        self._chunk = None

    def _pread(self, info: tarfile.TarInfo, offset: int, length: int) -> bytes:
        data = os.pread(self._tar_fd, length, info.offset_data + offset)
        if len(data) != length:
            raise InvalidInputTar(f"{info.name!r}: tar is truncated")
        return data

    def _toc_entry(self, info: tarfile.TarInfo) -> dict[str, Any]:
        """The TOC entry, keys in the reference's order; falsy values are
        dropped when the TOC is written (its ``omitempty``)."""
        name = info.name + "/" if info.isdir() and not info.name.endswith("/") else info.name
        entry: dict[str, Any] = {"name": name, "type": str(TAR_TYPES[info.type])}
        if info.isreg():
            entry["size"] = info.size
        entry["modtime"] = _rfc3339(info.mtime)
        if info.issym() or info.islnk():
            entry["linkName"] = info.linkname
        entry["mode"] = info.mode & 0o7777
        entry["uid"], entry["gid"] = info.uid, info.gid
        entry["userName"] = _if_changed(self._last_uname, info.uid, info.uname)
        entry["groupName"] = _if_changed(self._last_gname, info.gid, info.gname)
        if info.isreg():
            entry["offset"] = 0
        if info.ischr() or info.isblk():
            entry["devMajor"], entry["devMinor"] = info.devmajor, info.devminor
        entry["xattrs"] = _xattrs(info)
        if info.isreg():
            entry.update(digest="", chunkOffset=0, chunkSize=0, chunkDigest="")
        return entry


class _MemberPipeline:
    """Compresses gzip members on worker threads, writes them in order, and
    fills each chunk's TOC entry with its offset and digest as it is written."""

    def __init__(self, out: IO[bytes], level: int, workers: int, chunk_size: int) -> None:
        self.level = level
        self.pos = 0
        self._out = out
        self._hash = hashlib.sha256()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="estargz")
        self._batch: list[tuple[bytes, int]] = []
        self._batch_refs: list[tuple[dict[str, Any] | None, bool]] = []
        self._batch_bytes = 0
        self._in_flight: deque[tuple[Future, list, int]] = deque()
        self._in_flight_bytes = 0
        self._max_in_flight = 2 * workers * (chunk_size + _HEADER_RUN_LIMIT)

    def __enter__(self) -> _MemberPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def add(self, data: bytes, chunk_len: int, chunk: dict[str, Any] | None, is_file: bool) -> None:
        """Queue one member; ``chunk`` (its first ``chunk_len`` bytes) gets its offset and digest."""
        self._batch.append((data, chunk_len))
        self._batch_refs.append((chunk, is_file))
        self._batch_bytes += len(data)
        if self._batch_bytes >= _BATCH_BYTES or len(self._batch) >= _BATCH_COUNT:
            self._submit()

    def drain(self) -> None:
        """Write everything queued."""
        self._submit()
        while self._in_flight:
            self._write_oldest()

    def write(self, data: bytes) -> None:
        self._out.write(data)
        self._hash.update(data)
        self.pos += len(data)

    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    def _submit(self) -> None:
        if not self._batch:
            return
        future = self._pool.submit(_compress_batch, self._batch, self.level)
        self._in_flight.append((future, self._batch_refs, self._batch_bytes))
        self._in_flight_bytes += self._batch_bytes
        self._batch, self._batch_refs, self._batch_bytes = [], [], 0
        while self._in_flight_bytes > self._max_in_flight:
            self._write_oldest()

    def _write_oldest(self) -> None:
        future, refs, nbytes = self._in_flight.popleft()
        self._in_flight_bytes -= nbytes
        for (member, chunk_digest), (chunk, is_file) in zip(future.result(), refs):
            if chunk is not None:
                chunk["offset"] = self.pos
                chunk["chunkDigest"] = chunk_digest
                if is_file:
                    chunk["digest"] = chunk_digest
            self.write(member)


def _compress_batch(batch: Iterable[tuple[bytes, int]], level: int) -> list[tuple[bytes, str]]:
    """Worker: gzip each member and digest the chunk it starts with."""
    return [
        (gzip_member(data, level), "sha256:" + hashlib.sha256(memoryview(data)[:n]).hexdigest() if n else "")
        for data, n in batch
    ]


def _if_changed(last: dict[int, str], ident: int, name: str) -> str:
    """A user/group name only where it differs from the last one for that ID."""
    if not name or last.get(ident) == name:
        return ""
    last[ident] = name
    return name


def _xattrs(info: tarfile.TarInfo) -> dict[str, str]:
    return {
        key[len(_XATTR_PREFIX) :]: base64.b64encode(value.encode("utf-8", "surrogateescape")).decode("ascii")
        for key, value in sorted(info.pax_headers.items())
        if key.startswith(_XATTR_PREFIX)
    }


def _rfc3339(mtime: float) -> str:
    """Like the reference: whole seconds (half away from zero), UTC; "" for the epoch."""
    if math.floor(mtime) == 0:
        return ""
    seconds = math.floor(mtime + 0.5) if mtime >= 0 else -math.floor(-mtime + 0.5)
    try:
        when = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=seconds)
    except OverflowError:
        raise UnsupportedEntry(f"modification time {mtime} cannot be written as RFC 3339") from None
    return when.isoformat().replace("+00:00", "Z")
