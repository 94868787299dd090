"""The table of contents: every entry of the layer and where its bytes are.

The TOC is a JSON document (``{"version": 1, "entries": [...]}``) stored as
the tar member ``stargz.index.json``. Parsing it here also validates it
completely, so that everything downstream (the FUSE layer, extraction) can
trust names, sizes and offsets: a name cannot escape the layer root, a chunk
cannot point outside the blob, and chunk sizes add up to the file's size.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import codecs
import enum
import json
import re
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

from .digest import is_digest
from .errors import (
    ChunkTooLarge,
    DuplicateEntry,
    InvalidEntry,
    InvalidToc,
    MissingLinkTarget,
    OffsetOutOfRange,
    SizeMismatch,
    UnsafePath,
)
from .limits import Limits

TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARK_CONTENTS = b"\x0f"

# what a parsed entry without xattrs holds (shared, read-only)
_NO_XATTRS: Mapping[str, bytes] = MappingProxyType({})


class EntryType(enum.StrEnum):
    DIR = "dir"
    REG = "reg"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    CHUNK = "chunk"  # the 2nd and later chunks of a regular file


# tar typeflag -> TOC type (regular-file variants are normalized to REGTYPE first)
TAR_TYPES = {
    tarfile.REGTYPE: EntryType.REG,
    tarfile.LNKTYPE: EntryType.HARDLINK,
    tarfile.SYMTYPE: EntryType.SYMLINK,
    tarfile.DIRTYPE: EntryType.DIR,
    tarfile.CHRTYPE: EntryType.CHAR,
    tarfile.BLKTYPE: EntryType.BLOCK,
    tarfile.FIFOTYPE: EntryType.FIFO,
}


def clean_name(name: str) -> str:
    """A TOC or tar name as a normalized relative path (``""`` is the root).

    ``./a//b/`` becomes ``a/b``. Unlike the reference reader, which cleans
    ``/../x`` to ``x``, names that are absolute, contain ``..`` or a NUL byte
    are refused: no honest layer writer produces them.
    """
    if "\x00" in name:
        raise UnsafePath(name, "name contains a NUL byte")
    if name.startswith("/"):
        raise UnsafePath(name, "absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafePath(name, "path contains '..'")
    return "/".join(parts)


def parent_of(name: str) -> str:
    return name.rpartition("/")[0]


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One independently decompressible piece of a regular file.

    To get its bytes: fetch ``blob[blob_offset:blob_end]`` (an upper bound:
    the chunk's gzip member starts at ``blob_offset`` and ends before the next
    chunk or the TOC), gunzip from the start, drop ``inner_offset`` bytes
    (always 0 for gzip eStargz), keep ``size`` bytes, check ``digest``.
    """

    file_offset: int
    size: int
    blob_offset: int
    blob_end: int
    inner_offset: int = 0
    digest: str | None = None

    @property
    def compressed_range(self) -> tuple[int, int]:
        """``(offset, length)`` of the blob bytes to fetch."""
        return self.blob_offset, self.blob_end - self.blob_offset


@dataclass(slots=True, eq=False)
class TocEntry:
    """A file, directory, link or device of the layer, with its metadata."""

    name: str  # normalized relative path; "" is the root directory
    type: EntryType
    mode: int = 0  # permission bits as in the tar header
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    modtime: str = ""  # RFC 3339 as in the TOC, "" when unknown
    mtime: float = 0.0  # the same as seconds since the epoch
    size: int = 0  # regular files only
    link_name: str = ""  # symlink: target as written; hardlink: normalized target
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    digest: str | None = None  # of the whole file's contents, when the TOC has it
    chunks: tuple[ChunkRef, ...] = ()
    nlink: int = 1
    implicit: bool = False  # a directory the TOC does not list but a path implies


class Toc:
    """A validated TOC: entries by name, directory children, chunk lookup."""

    def __init__(
        self,
        entries: dict[str, TocEntry],
        children: dict[str, dict[str, TocEntry]] | None,  # None: built on first use
        *,
        version: int,
        digest: str,
        legacy: bool,
        payload_size: int,
    ) -> None:
        self._entries = entries
        self._children: dict[str, dict[str, TocEntry]] | None = children
        self.version = version
        self.digest = digest  # sha256 of the TOC JSON: what toc.digest annotates
        self.legacy = legacy
        self.payload_size = payload_size  # where the TOC starts in the blob

    @classmethod
    def parse(
        cls,
        data: bytes,
        *,
        digest: str,
        payload_size: int,
        legacy: bool = False,
        limits: Limits = Limits(),
    ) -> Toc:
        """Parse and validate TOC JSON whose chunks must lie in ``[0, payload_size)``."""
        builder = _Builder(payload_size, limits)
        streamed, version = _stream_entries(data, builder)
        if not streamed:  # not the plain shape (or not JSON): the whole document at once
            builder = _Builder(payload_size, limits)
            version = cls._parse_whole(data, builder)
        if type(version) is not int:
            raise InvalidToc(f"TOC version {version!r} is not an integer")
        entries, children = builder.finish()
        return cls(
            entries, children, version=version, digest=digest, legacy=legacy, payload_size=payload_size
        )

    @staticmethod
    def _parse_whole(data: bytes, builder: _Builder) -> Any:
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise InvalidToc(f"TOC is not JSON: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
            raise InvalidToc('TOC is not an object with an "entries" list')
        version = doc.get("version", 0)
        if type(version) is not int:
            raise InvalidToc(f"TOC version {version!r} is not an integer")
        raw_entries = doc["entries"]
        del doc
        for index in range(len(raw_entries)):
            # drop each decoded JSON object once it is an entry
            raw, raw_entries[index] = raw_entries[index], None
            builder.add(index, raw)
        return version

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[TocEntry]:
        """Entries in TOC order, then the directories only implied by paths."""
        return iter(self._entries.values())

    def __contains__(self, path: str) -> bool:
        return self.get(path) is not None

    def __getitem__(self, path: str) -> TocEntry:
        entry = self.get(path)
        if entry is None:
            raise KeyError(path)
        return entry

    def get(self, path: str) -> TocEntry | None:
        """The entry at ``path`` (any spelling: ``/a/b``, ``./a/b``, ``a/b``)."""
        try:
            return self._entries.get(clean_name(path.lstrip("/")))
        except UnsafePath:
            return None

    def children(self, path: str) -> Mapping[str, TocEntry]:
        """A directory's entries by base name (hardlinks as themselves)."""
        if self._children is None:
            self._children = _index_children(self._entries)
        return self._children.get(self[path].name, {})

    def drop_children_index(self) -> None:
        """Free the per-directory index (~1 MB per 10k entries) once nothing
        needs it for a while, as a mount after building its inode table;
        the next ``children`` call builds it again."""
        self._children = None

    def resolve(self, entry: TocEntry) -> TocEntry:
        """The entry a hardlink stands for (validated to exist at parse time)."""
        while entry.type is EntryType.HARDLINK:
            entry = self._entries[entry.link_name]
        return entry

    def chunks_for_range(self, path: str, offset: int, length: int) -> list[ChunkRef]:
        """The chunks holding bytes ``[offset, offset+length)`` of a regular file."""
        entry = self.resolve(self[path])
        if entry.type is not EntryType.REG:
            raise ValueError(f"{path!r} is a {entry.type}, not a regular file")
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, entry.size)
        if offset >= end:
            return []
        chunks = entry.chunks
        i = max(0, bisect.bisect_right(chunks, offset, key=lambda c: c.file_offset) - 1)
        found = []
        while i < len(chunks) and chunks[i].file_offset < end:
            found.append(chunks[i])
            i += 1
        return found

    @property
    def verifiable(self) -> bool:
        """Whether every chunk has a digest to check it against."""
        return all(c.digest for e in self for c in e.chunks)

    @property
    def prefetch_size(self) -> int | None:
        """How many leading blob bytes hold the prioritized files (the
        ``.prefetch.landmark``'s offset), or None when nothing is prioritized."""
        landmark = self._entries.get(PREFETCH_LANDMARK)
        if landmark is None or not landmark.chunks:
            return None
        return landmark.chunks[0].blob_offset


@dataclass(slots=True)
class _PendingChunk:
    blob_offset: int
    file_offset: int
    size: int
    inner_offset: int
    digest: str | None


class _Builder:
    """Collects raw TOC entries in order; ``finish`` links them into a tree."""

    def __init__(self, payload_size: int, limits: Limits) -> None:
        self._payload_size = payload_size
        self._limits = limits
        self._entries: dict[str, TocEntry] = {}
        self._chunks: dict[str, list[_PendingChunk]] = {}
        self._file: TocEntry | None = None  # the regular file chunks attach to
        self._unames: dict[int, str] = {}
        self._gnames: dict[int, str] = {}
        # one object per distinct string value of the fields that repeat
        # (modtime, user/group names, digests: a one-chunk file's chunk
        # digest is its file digest); saves ~1-2 MB per 10k entries
        self._strings: dict[str, str] = {}
        self._ints: dict[int, int] = {}
        self._mtimes: dict[str, float] = {}  # modtime -> mtime: files of one package share one

    def _intern(self, value: str) -> str:
        return self._strings.setdefault(value, value)

    def add(self, index: int, raw: Any) -> None:
        if not isinstance(raw, dict):
            raise InvalidToc(f"TOC entry #{index} is not an object")
        raw_name = _str(raw, "name", f"#{index}")
        kind = raw.get("type")
        try:
            kind = EntryType(kind)
        except ValueError:
            raise InvalidEntry(raw_name, f"unknown type {kind!r}") from None
        if kind is EntryType.CHUNK:
            self._add_chunk(raw_name, raw)
        else:
            self._add_entry(raw_name, kind, raw)

    def _add_chunk(self, raw_name: str, raw: dict) -> None:
        file = self._file
        if file is None:
            raise InvalidEntry(raw_name, "chunk entry does not follow a regular file")
        if raw_name and clean_name(raw_name) != file.name:
            raise InvalidEntry(raw_name, f"chunk entry follows {file.name!r}")
        self._chunks[file.name].append(_pending_chunk(file.name, raw, self._intern))

    def _add_entry(self, raw_name: str, kind: EntryType, raw: dict) -> None:
        name = clean_name(raw_name)
        if name in self._entries:
            raise DuplicateEntry(raw_name, "name appears twice")
        if name == "" and kind is not EntryType.DIR:
            raise InvalidEntry(raw_name, f"the root is a {kind}")
        entry = TocEntry(name=name, type=kind)
        mode = _int(raw, "mode", name)
        entry.mode = self._ints.setdefault(mode, mode)  # a handful of distinct values
        entry.uid = _int(raw, "uid", name)
        entry.gid = _int(raw, "gid", name)
        # The writer states a user/group name only when it changes for an ID.
        entry.uname = self._intern(_str(raw, "userName", name) or self._unames.get(entry.uid, ""))
        entry.gname = self._intern(_str(raw, "groupName", name) or self._gnames.get(entry.gid, ""))
        self._unames[entry.uid] = entry.uname
        self._gnames[entry.gid] = entry.gname
        entry.modtime = self._intern(_str(raw, "modtime", name))
        mtime = self._mtimes.get(entry.modtime)
        if mtime is None:
            mtime = self._mtimes[entry.modtime] = _parse_modtime(entry.modtime, name)
        entry.mtime = mtime
        entry.xattrs = _xattrs(raw, name)
        entry.link_name = _str(raw, "linkName", name)
        if kind in (EntryType.SYMLINK, EntryType.HARDLINK):
            if not entry.link_name or "\x00" in entry.link_name:
                raise InvalidEntry(name, f"bad link target {entry.link_name!r}")
        if kind in (EntryType.CHAR, EntryType.BLOCK):
            entry.dev_major = _int(raw, "devMajor", name)
            entry.dev_minor = _int(raw, "devMinor", name)
        self._file = None
        if kind is EntryType.REG:
            entry.size = _int(raw, "size", name)
            digest = _str(raw, "digest", name)
            if digest and not is_digest(digest):
                raise InvalidEntry(name, f"bad digest {digest!r}")
            entry.digest = self._intern(digest) if digest else None
            self._file = entry
            self._chunks[name] = [_pending_chunk(name, raw, self._intern)] if entry.size else []
        self._entries[name] = entry

    def finish(self) -> tuple[dict[str, TocEntry], None]:
        self._attach_chunks()
        entries = self._entries
        for entry in entries.values():
            if entry.type is EntryType.HARDLINK:
                entry.link_name = self._link_target(entry)
        if "" not in entries:
            entries[""] = TocEntry(name="", type=EntryType.DIR, mode=0o755, implicit=True)
        entries[""].nlink = 2
        # the per-directory index is built on first use (``Toc.children``),
        # not here: the parse's memory peak is lower without it
        for name, entry in list(entries.items()):
            if name:
                parent = self._directory(parent_of(name), child=name)
                if entry.type is EntryType.DIR:
                    parent.nlink += 1
                    entry.nlink += 1  # its own "."; the parent's link counted above
        for entry in entries.values():
            if entry.type is EntryType.HARDLINK:
                target = entries[entry.link_name]
                target.nlink += 1
        for entry in entries.values():
            if entry.type is EntryType.HARDLINK:
                entry.nlink = entries[entry.link_name].nlink
        return entries, None

    def _directory(self, name: str, child: str) -> TocEntry:
        """The directory ``name``, created (implicitly) if the TOC lacks it."""
        entry = self._entries.get(name)
        if entry is None:
            entry = TocEntry(name=name, type=EntryType.DIR, mode=0o755, nlink=2, implicit=True)
            self._entries[name] = entry
            parent = self._directory(parent_of(name), child=name)
            parent.nlink += 1
        elif entry.type is not EntryType.DIR:
            raise InvalidEntry(child, f"parent {name!r} is a {entry.type}, not a directory")
        return entry

    def _link_target(self, link: TocEntry) -> str:
        """The final non-hardlink target of a hardlink, refusing cycles."""
        seen = {link.name}
        entry = link
        while entry.type is EntryType.HARDLINK:
            target_name = clean_name(entry.link_name)
            target = self._entries.get(target_name)
            if target is None:
                raise MissingLinkTarget(link.name, f"hardlink target {entry.link_name!r} is not in the layer")
            if target.type is EntryType.DIR:
                raise MissingLinkTarget(link.name, f"hardlink target {entry.link_name!r} is a directory")
            if target_name in seen:
                raise MissingLinkTarget(link.name, "hardlinks form a cycle")
            seen.add(target_name)
            entry = target
        return entry.name

    def _attach_chunks(self) -> None:
        """Check every file's chunks tile it exactly, then compute each chunk's
        compressed end: the next chunk's start or the TOC."""
        pending = []
        for name, chunks in self._chunks.items():
            entry = self._entries[name]
            expected = 0
            for chunk in chunks:
                if chunk.size == 0:  # "chunkSize" 0 or absent: up to the end of the file
                    chunk.size = entry.size - chunk.file_offset
                if chunk.file_offset != expected:
                    raise SizeMismatch(name, f"chunk at file offset {chunk.file_offset}, expected {expected}")
                if chunk.size <= 0 or expected + chunk.size > entry.size:
                    raise SizeMismatch(name, f"chunk of {chunk.size} bytes at {expected} overruns the {entry.size}-byte file")
                if chunk.size > self._limits.max_chunk_size:
                    raise ChunkTooLarge(f"{name!r}: {chunk.size}-byte chunk exceeds the {self._limits.max_chunk_size}-byte limit")
                if not 0 <= chunk.blob_offset < self._payload_size:
                    raise OffsetOutOfRange(name, f"chunk offset {chunk.blob_offset} is outside the payload [0, {self._payload_size})")
                expected += chunk.size
                pending.append((entry, chunk))
            if expected != entry.size:
                raise SizeMismatch(name, f"chunks hold {expected} of {entry.size} bytes")
            if len(chunks) == 1 and chunks[0].digest is None:
                chunks[0].digest = entry.digest  # the whole file is the chunk
        starts = sorted({chunk.blob_offset for _, chunk in pending})
        seen: set[tuple[int, int]] = set()
        refs: dict[str, list[ChunkRef]] = {name: [] for name in self._chunks}
        for entry, chunk in pending:
            key = (chunk.blob_offset, chunk.inner_offset)
            if key in seen:
                raise OffsetOutOfRange(entry.name, f"a second chunk at blob offset {chunk.blob_offset}")
            seen.add(key)
            i = bisect.bisect_right(starts, chunk.blob_offset)
            end = starts[i] if i < len(starts) else self._payload_size
            refs[entry.name].append(
                ChunkRef(chunk.file_offset, chunk.size, chunk.blob_offset, end, chunk.inner_offset, chunk.digest)
            )
        for name, chunk_refs in refs.items():
            self._entries[name].chunks = tuple(chunk_refs)


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_WINDOW = 256 * 1024  # bytes of TOC JSON decoded to text at a time


class _TextWindow:
    """The TOC JSON as text, decoded ``_WINDOW`` bytes at a time, so that
    the whole document never exists as a second (str) copy of the bytes."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._next = 0  # first byte not decoded yet
        self._decoder = codecs.getincrementaldecoder("utf-8")()  # strict: bad UTF-8 raises
        self.text = ""
        self.pos = 0  # into text

    @property
    def more(self) -> bool:
        return self._next < len(self._data)

    def refill(self) -> None:
        """Drop what was consumed, append the next window."""
        piece = self._data[self._next : self._next + _WINDOW]
        self._next += len(piece)
        self.text = self.text[self.pos :] + self._decoder.decode(piece, final=not self.more)
        self.pos = 0

    def peek(self) -> str:
        """The next non-whitespace character ("" at the end), skipping whitespace."""
        while True:
            self.pos = _WHITESPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text) or not self.more:
                return self.text[self.pos : self.pos + 1]
            self.refill()

    def value(self, decode: Any) -> Any:
        """The JSON value at ``pos``: re-decoded with more text while it
        fails or ends exactly at the window's end (a number cut in two)."""
        while True:
            try:
                value, end = decode(self.text, self.pos)
            except ValueError:
                if not self.more:
                    raise
                self.refill()
                continue
            if end == len(self.text) and self.more:
                self.refill()
                continue
            self.pos = end
            return value


def _stream_entries(data: bytes, builder: _Builder) -> tuple[bool, Any]:
    """Feed the entries of a TOC shaped ``{"key": value, ..., "entries": [...]}``
    to ``builder`` one decoded object at a time, never the whole decoded
    document (for 10k entries that is ~8 MB less memory peak, which otherwise
    stays in the mount process's heap) nor the whole text at once.
    ``(True, version)``, or ``(False, None)`` for anything else (then
    ``Toc.parse`` decodes the whole document, which also gives the errors
    for what is not JSON); an invalid entry raises as ``builder.add`` does."""
    decode = json.JSONDecoder().raw_decode
    src = _TextWindow(data)
    version: Any = 0
    seen_entries = False
    try:
        src.refill()
        if src.peek() != "{":
            return False, None
        src.pos += 1
        while True:
            if src.peek() != '"':
                return False, None
            key = src.value(decode)
            if src.peek() != ":":
                return False, None
            src.pos += 1
            if key == "entries":
                if seen_entries or src.peek() != "[":
                    return False, None
                seen_entries = True
                src.pos += 1
                index = 0
                if src.peek() == "]":
                    src.pos += 1
                else:
                    while True:
                        src.peek()
                        builder.add(index, src.value(decode))
                        index += 1
                        sep = src.peek()
                        src.pos += 1
                        if sep == "]":
                            break
                        if sep != ",":
                            return False, None
            else:
                src.peek()
                value = src.value(decode)
                if key == "version":
                    version = value
            sep = src.peek()
            src.pos += 1
            if sep == "}":
                break
            if sep != ",":
                return False, None
        if not seen_entries or src.peek() != "":
            return False, None
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return False, None
    return True, version


def _index_children(entries: Mapping[str, TocEntry]) -> dict[str, dict[str, TocEntry]]:
    """The per-directory index of a finished, validated TOC."""
    children: dict[str, dict[str, TocEntry]] = {"": {}}
    for name, entry in entries.items():
        if name:
            children.setdefault(parent_of(name), {})[name.rpartition("/")[2]] = entry
            if entry.type is EntryType.DIR:
                children.setdefault(name, {})
    return children


def _pending_chunk(name: str, raw: dict, intern: Any = None) -> _PendingChunk:
    digest = _str(raw, "chunkDigest", name)
    if digest and not is_digest(digest):
        raise InvalidEntry(name, f"bad chunkDigest {digest!r}")
    return _PendingChunk(
        blob_offset=_int(raw, "offset", name),
        file_offset=_int(raw, "chunkOffset", name),
        size=_int(raw, "chunkSize", name),
        inner_offset=_int(raw, "innerOffset", name),
        digest=(intern(digest) if intern else digest) if digest else None,
    )


def _int(raw: dict, key: str, name: str) -> int:
    value = raw.get(key, 0)
    if type(value) is not int or value < 0:
        raise InvalidEntry(name, f"{key} {value!r} is not a non-negative integer")
    return value


def _str(raw: dict, key: str, name: str) -> str:
    value = raw.get(key, "")
    if not isinstance(value, str):
        raise InvalidEntry(name, f"{key} {value!r} is not a string")
    return value


def _xattrs(raw: dict, name: str) -> Mapping[str, bytes]:
    value = raw.get("xattrs") or {}
    if not isinstance(value, dict):
        raise InvalidEntry(name, "xattrs is not an object")
    if not value:
        return _NO_XATTRS
    xattrs = {}
    for key, encoded in value.items():
        if not key or "\x00" in key or not isinstance(encoded, str):
            raise InvalidEntry(name, f"bad xattr {key!r}")
        try:
            xattrs[key] = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise InvalidEntry(name, f"xattr {key!r} is not base64") from None
    return xattrs


def _parse_modtime(modtime: str, name: str) -> float:
    if not modtime:
        return 0.0
    try:
        parsed = datetime.fromisoformat(modtime)
    except ValueError:
        raise InvalidEntry(name, f"modtime {modtime!r} is not RFC 3339") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()
