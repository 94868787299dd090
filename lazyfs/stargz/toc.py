"""The table of contents: every entry of the layer and where its bytes are.

The TOC is a JSON document (``{"version": 1, "entries": [...]}``) stored as
the tar member ``stargz.index.json``. Parsing it here also validates it
completely, so that everything downstream (the FUSE layer, extraction) can
trust names, sizes and offsets: a name cannot escape the layer root, a chunk
cannot point outside the blob, and chunk sizes add up to the file's size.

A parsed TOC lives as long as the mount process that serves it, so it is
kept in columns (see ``lazyfs.stargz.columns``; base names in one string,
numbers in ``array``s, digests as raw bytes) rather than as one object per
entry and chunk: ~150 bytes per file instead of ~1 KB. ``TocEntry`` and
``ChunkRef`` objects are made when asked for (``Toc.layout`` too).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import codecs
import enum
import io
import json
import re
import tarfile
import threading
import weakref
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

from .columns import Digests, Ints, SparseStrings, Strings
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
_RECENT = 32  # entries (and names) kept made: a file read in many pieces is made once


class EntryType(enum.StrEnum):
    DIR = "dir"
    REG = "reg"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    CHUNK = "chunk"  # the 2nd and later chunks of a regular file


_TYPES = tuple(EntryType)  # an entry's type is stored as its index here
_TYPE_CODE = {kind: code for code, kind in enumerate(_TYPES)}
_DIR, _REG, _HARDLINK = _TYPE_CODE[EntryType.DIR], _TYPE_CODE[EntryType.REG], _TYPE_CODE[EntryType.HARDLINK]

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


@dataclass(slots=True, eq=False, weakref_slot=True)
class TocEntry:
    """A file, directory, link or device of the layer, with its metadata.

    Made from the TOC's columns when asked for: changing one changes
    nothing in the ``Toc``."""

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


class _Columns:  # noqa: PLR0902 - one attribute per column
    """Every entry's fields, one column each, indexed by entry number (TOC
    order, then the directories only implied by paths); chunks likewise,
    a file's chunks being ``chunk_start[i]:chunk_start[i + 1]``."""

    def __init__(self) -> None:
        # (numbers are ``Ints`` while parsing: any JSON integer reads back as
        # it was; ``rehome`` makes them plain ``array('Q')``s when they fit)
        self.kind = bytearray()  # index into _TYPES
        self.mode = Ints()
        self.uid = Ints()
        self.gid = Ints()
        self.uname = array("I")  # index into strings
        self.gname = array("I")
        self.modtime = array("I")  # index into modtimes / mtimes
        self.size = Ints()
        self.nlink = array("I")
        self.parent = array("i")  # entry number of the directory holding it; -1: the root
        self.base_start = array("I", [0])  # base name i is bases[base_start[i]:base_start[i + 1]]
        self.bases = ""
        self.digest = array("i")  # index into digests, -1: none
        self.chunk_start = array("I", [0])  # set by _Builder._attach_chunks
        # symlinks and hardlinks (and whatever else states one): link_name;
        # a dict until the parse ends (see _Builder._compact)
        self.links: dict[int, str] | SparseStrings = {}
        self.devs: dict[int, tuple[int, int]] = {}
        self.xattrs: dict[int, Mapping[str, bytes]] = {}
        self.explicit = 0  # entries from here on are implicit directories
        self.root = 0
        # the directory index: entry numbers of the children of entry i,
        # sorted by base name, are kids[kid_start[i]:kid_start[i + 1]]
        self.kid_start = array("I")
        self.kids = array("I")
        self.strings: list[str] | Strings = []  # user and group names
        self.modtimes: list[str] | Strings = []
        self.mtimes: list[float] | array = []
        self.digests = Digests()
        # chunks
        self.c_file_offset = Ints()
        self.c_size = Ints()
        self.c_blob_offset = Ints()
        self.c_blob_end = Ints()
        self.c_inner: dict[int, int] = {}  # the few non-zero inner offsets
        self.c_digest = array("i")
        self.c_order = array("I")  # chunk numbers in blob order (ties: chunk order)

    def rehome(self) -> None:
        """Copy every column, once the parse's garbage is gone: a column
        object made at the parse's memory peak would keep that memory's
        pymalloc arena resident, and appending left growth slack."""
        for name, value in list(vars(self).items()):
            if isinstance(value, array):
                setattr(self, name, array(value.typecode, value))
            elif isinstance(value, bytearray):
                setattr(self, name, bytearray(value))
            elif isinstance(value, Ints):  # a plain array (faster to read) unless a value needs more
                setattr(self, name, value.copy() if value.has_big else array("Q", value.array))
            elif isinstance(value, Digests):
                setattr(self, name, value.copy())
            elif isinstance(value, dict):
                setattr(self, name, dict(value))

    def __len__(self) -> int:
        return len(self.kind)

    def base(self, i: int) -> str:
        return self.bases[self.base_start[i] : self.base_start[i + 1]]


class Toc:
    """A validated TOC: entries by name, directory children, chunk lookup.

    Besides the ``TocEntry`` interface, entries can be read by number
    (``index_of`` and the ``*_at`` methods) without making any object."""

    def __init__(
        self, columns: _Columns, *, version: int, digest: str, legacy: bool, payload_size: int,
    ) -> None:
        self._c = columns
        self.version = version
        self.digest = digest  # sha256 of the TOC JSON: what toc.digest annotates
        self.legacy = legacy
        self.payload_size = payload_size  # where the TOC starts in the blob
        # the same object for an entry while anyone holds it, and the last
        # few kept: a file read many times is not made again for each read
        self._live: weakref.WeakValueDictionary[int, TocEntry] = weakref.WeakValueDictionary()
        self._recent: dict[int, TocEntry] = {}
        self._recent_names: dict[str, int] = {}
        self._lock = threading.Lock()  # for the two above: a mount reads from several threads
        self._layout: ChunkLayout | None = None

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
        columns = builder.finish()
        return cls(columns, version=version, digest=digest, legacy=legacy, payload_size=payload_size)

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
        return len(self._c)

    def __iter__(self) -> Iterator[TocEntry]:
        """Entries in TOC order, then the directories only implied by paths."""
        return (self.entry_at(i) for i in range(len(self._c)))

    def __contains__(self, path: str) -> bool:
        return self.get(path) is not None

    def __getitem__(self, path: str) -> TocEntry:
        entry = self.get(path)
        if entry is None:
            raise KeyError(path)
        return entry

    def get(self, path: str) -> TocEntry | None:
        """The entry at ``path`` (any spelling: ``/a/b``, ``./a/b``, ``a/b``)."""
        i = self.index_of(path)
        return None if i is None else self.entry_at(i)

    def children(self, path: str) -> Mapping[str, TocEntry]:
        """A directory's entries by base name (hardlinks as themselves), in TOC order."""
        i = self._index(path)
        c = self._c
        if c.kind[i] != _DIR:
            return {}
        return {c.base(k): self.entry_at(k) for k in sorted(self._kid_range(i))}

    def resolve(self, entry: TocEntry) -> TocEntry:
        """The entry a hardlink stands for (validated to exist at parse time)."""
        while entry.type is EntryType.HARDLINK:
            entry = self[entry.link_name]
        return entry

    def chunks_for_range(self, path: str, offset: int, length: int) -> list[ChunkRef]:
        """The chunks holding bytes ``[offset, offset+length)`` of a regular file."""
        i = self.resolve_at(self._index(path))
        if self._c.kind[i] != _REG:
            raise ValueError(f"{path!r} is a {_TYPES[self._c.kind[i]]}, not a regular file")
        return self.chunks_for_range_at(i, offset, length)

    def layout(self) -> ChunkLayout:
        """Every chunk of the layer once, in blob order (a hardlink has no
        chunks of its own; no two chunks share a blob offset), made on access."""
        if self._layout is None:
            self._layout = ChunkLayout(self)
        return self._layout

    @property
    def verifiable(self) -> bool:
        """Whether every chunk has a digest to check it against."""
        return -1 not in self._c.c_digest

    @property
    def prefetch_size(self) -> int | None:
        """How many leading blob bytes hold the prioritized files (the
        ``.prefetch.landmark``'s offset), or None when nothing is prioritized."""
        i = self.index_of(PREFETCH_LANDMARK)
        if i is None:
            return None
        start, end = self._c.chunk_start[i], self._c.chunk_start[i + 1]
        return self._c.c_blob_offset[start] if end > start else None

    # --- by entry number ------------------------------------------------------

    def index_of(self, path: str) -> int | None:
        """The number of the entry at ``path`` (any spelling), or None."""
        found = self._recent_names.get(path)
        if found is not None:
            return found
        try:
            name = clean_name(path.lstrip("/"))
        except UnsafePath:
            return None
        c = self._c
        i = c.root
        if name:
            bases = c.bases
            starts = c.base_start
            for part in name.split("/"):
                lo, hi = c.kid_start[i], c.kid_start[i + 1]
                kids = c.kids
                j = bisect.bisect_left(kids, part, lo, hi, key=lambda k: bases[starts[k] : starts[k + 1]])
                if j == hi or c.base(kids[j]) != part:
                    return None
                i = kids[j]
        with self._lock:
            _remember(self._recent_names, path, i)
        return i

    def entry_at(self, i: int) -> TocEntry:
        """Entry number ``i`` as a ``TocEntry``."""
        entry = self._recent.get(i)
        if entry is None:
            with self._lock:
                entry = self._live.get(i)
                if entry is None:
                    entry = self._make(i)
                    self._live[i] = entry
                _remember(self._recent, i, entry)
        return entry

    def name_at(self, i: int) -> str:
        """The normalized path of entry ``i``."""
        c = self._c
        parts = []
        while i != c.root:
            parts.append(c.base(i))
            i = c.parent[i]
        return "/".join(reversed(parts))

    def type_at(self, i: int) -> EntryType:
        return _TYPES[self._c.kind[i]]

    def mode_at(self, i: int) -> int:
        return self._c.mode[i]

    def uid_at(self, i: int) -> int:
        return self._c.uid[i]

    def gid_at(self, i: int) -> int:
        return self._c.gid[i]

    def mtime_at(self, i: int) -> float:
        return self._c.mtimes[self._c.modtime[i]]

    def stat_at(self, i: int) -> tuple[int, int, int, int, int, float]:
        """``(mode, uid, gid, size, nlink, mtime)`` of entry ``i`` in one call
        (a getattr's worth: the FUSE layer's hottest path)."""
        c = self._c
        return c.mode[i], c.uid[i], c.gid[i], c.size[i], c.nlink[i], c.mtimes[c.modtime[i]]

    def size_at(self, i: int) -> int:
        return self._c.size[i]

    def nlink_at(self, i: int) -> int:
        return self._c.nlink[i]

    def link_at(self, i: int) -> str:
        """A symlink's target as written, a hardlink's normalized final target; else ""."""
        return self._c.links.get(i, "")

    def dev_at(self, i: int) -> tuple[int, int]:
        """``(major, minor)`` of a device; (0, 0) for anything else."""
        return self._c.devs.get(i, (0, 0))

    def xattrs_at(self, i: int) -> Mapping[str, bytes]:
        return self._c.xattrs.get(i, _NO_XATTRS)

    def children_at(self, i: int) -> list[int]:
        """The numbers of a directory's entries, sorted by base name."""
        return list(self._kid_range(i))

    def base_at(self, i: int) -> str:
        return self._c.base(i)

    def resolve_at(self, i: int) -> int:
        """The number of the entry a hardlink stands for (``i`` for anything else)."""
        while self._c.kind[i] == _HARDLINK:
            i = self._index(self._c.links.get(i))
        return i

    def chunk_count_at(self, i: int) -> int:
        return self._c.chunk_start[i + 1] - self._c.chunk_start[i]

    def chunks_at(self, i: int) -> tuple[ChunkRef, ...]:
        return tuple(self._chunk(k) for k in range(self._c.chunk_start[i], self._c.chunk_start[i + 1]))

    def chunks_for_range_at(self, i: int, offset: int, length: int) -> list[ChunkRef]:
        """``chunks_for_range`` of regular file number ``i``."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        c = self._c
        end = min(offset + length, c.size[i])
        if offset >= end:
            return []
        lo, hi = c.chunk_start[i], c.chunk_start[i + 1]
        k = max(lo, bisect.bisect_right(c.c_file_offset, offset, lo, hi) - 1)
        found = []
        while k < hi and c.c_file_offset[k] < end:
            found.append(self._chunk(k))
            k += 1
        return found

    # --- helpers ---------------------------------------------------------------

    def _index(self, path: str) -> int:
        i = self.index_of(path)
        if i is None:
            raise KeyError(path)
        return i

    def _kid_range(self, i: int) -> Any:
        c = self._c
        return c.kids[c.kid_start[i] : c.kid_start[i + 1]]

    def _chunk(self, k: int) -> ChunkRef:
        c = self._c
        d = c.c_digest[k]
        return ChunkRef(
            c.c_file_offset[k], c.c_size[k], c.c_blob_offset[k], c.c_blob_end[k], c.c_inner.get(k, 0),
            None if d < 0 else c.digests[d],
        )

    def _make(self, i: int) -> TocEntry:
        c = self._c
        kind = _TYPES[c.kind[i]]
        d = c.digest[i]
        major, minor = c.devs.get(i, (0, 0))
        if i >= c.explicit:
            return TocEntry(name=self.name_at(i), type=kind, mode=c.mode[i], nlink=c.nlink[i], implicit=True)
        return TocEntry(
            name=self.name_at(i),
            type=kind,
            mode=c.mode[i],
            uid=c.uid[i],
            gid=c.gid[i],
            uname=c.strings[c.uname[i]],
            gname=c.strings[c.gname[i]],
            modtime=c.modtimes[c.modtime[i]],
            mtime=c.mtimes[c.modtime[i]],
            size=c.size[i],
            link_name=c.links.get(i, ""),
            dev_major=major,
            dev_minor=minor,
            xattrs=c.xattrs.get(i, _NO_XATTRS),  # type: ignore[arg-type]
            digest=None if d < 0 else c.digests[d],
            chunks=self.chunks_at(i),
            nlink=c.nlink[i],
        )


class ChunkLayout(Sequence[ChunkRef]):
    """A ``Toc``'s chunks in blob order, as a sequence of ``ChunkRef``s made
    when indexed: the fetcher and the prefetcher keep it for the mount's
    life, which as ``ChunkRef`` objects would cost ~300 bytes per chunk.
    ``blob_offsets`` is their (sorted) blob offsets, for bisecting."""

    __slots__ = ("_toc", "_order", "blob_offsets")

    def __init__(self, toc: Toc) -> None:
        offsets = toc._c.c_blob_offset
        self._toc = toc
        self._order = toc._c.c_order
        self.blob_offsets = array("Q", (offsets[k] for k in self._order))

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._toc._chunk(k) for k in self._order[i]]
        return self._toc._chunk(self._order[i])

    def __iter__(self) -> Iterator[ChunkRef]:
        chunk = self._toc._chunk
        return (chunk(k) for k in self._order)


class _Builder:
    """Collects raw TOC entries in order; ``finish`` links them into a tree."""

    def __init__(self, payload_size: int, limits: Limits) -> None:
        self._payload_size = payload_size
        self._limits = limits
        self._c = _Columns()
        self._names: list[str] = []  # full names by entry number, until finish
        self._index: dict[str, int] = {}  # and the other way round
        self._file = -1  # the regular file chunks attach to
        self._chunk_owner = array("Q")  # entry number of each chunk, until finish
        self._unames: dict[int, str] = {}
        self._gnames: dict[int, str] = {}
        self._strings: dict[str, int] = {}  # user/group name -> index in columns.strings
        self._modtimes: dict[str, int] = {}  # modtime -> index in columns.modtimes
        self._file_digest = ""  # the digest text of that file, for its chunks to share

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
        if self._file < 0:
            raise InvalidEntry(raw_name, "chunk entry does not follow a regular file")
        name = self._names[self._file]
        if raw_name and clean_name(raw_name) != name:
            raise InvalidEntry(raw_name, f"chunk entry follows {name!r}")
        self._chunk(name, raw)

    def _chunk(self, name: str, raw: dict) -> None:
        digest = _str(raw, "chunkDigest", name)
        if digest and not is_digest(digest):
            raise InvalidEntry(name, f"bad chunkDigest {digest!r}")
        c = self._c
        c.c_blob_offset.append(_int(raw, "offset", name))
        c.c_file_offset.append(_int(raw, "chunkOffset", name))
        c.c_size.append(_int(raw, "chunkSize", name))
        inner = _int(raw, "innerOffset", name)
        if inner:
            c.c_inner[len(c.c_digest)] = inner
        if not digest:
            c.c_digest.append(-1)
        elif digest == self._file_digest:  # a one-chunk file's chunk digest is its file digest
            c.c_digest.append(c.digest[self._file])
        else:
            c.c_digest.append(c.digests.add(digest))
        self._chunk_owner.append(self._file)

    def _string(self, value: str) -> int:
        k = self._strings.get(value)
        if k is None:
            k = self._strings[value] = len(self._c.strings)
            self._c.strings.append(value)
        return k

    def _modtime(self, modtime: str, name: str) -> int:
        k = self._modtimes.get(modtime)
        if k is None:
            mtime = _parse_modtime(modtime, name)  # files of one package share one
            k = self._modtimes[modtime] = len(self._c.modtimes)
            self._c.modtimes.append(modtime)
            self._c.mtimes.append(mtime)
        return k

    def _add_entry(self, raw_name: str, kind: EntryType, raw: dict) -> None:
        name = clean_name(raw_name)
        if name in self._index:
            raise DuplicateEntry(raw_name, "name appears twice")
        if name == "" and kind is not EntryType.DIR:
            raise InvalidEntry(raw_name, f"the root is a {kind}")
        mode = _int(raw, "mode", name)
        uid = _int(raw, "uid", name)
        gid = _int(raw, "gid", name)
        # The writer states a user/group name only when it changes for an ID.
        uname = _str(raw, "userName", name) or self._unames.get(uid, "")
        gname = _str(raw, "groupName", name) or self._gnames.get(gid, "")
        self._unames[uid] = uname
        self._gnames[gid] = gname
        modtime = self._modtime(_str(raw, "modtime", name), name)
        xattrs = _xattrs(raw, name)
        link_name = _str(raw, "linkName", name)
        if kind in (EntryType.SYMLINK, EntryType.HARDLINK):
            if not link_name or "\x00" in link_name:
                raise InvalidEntry(name, f"bad link target {link_name!r}")
        dev = None
        if kind in (EntryType.CHAR, EntryType.BLOCK):
            dev = (_int(raw, "devMajor", name), _int(raw, "devMinor", name))
        size, digest = 0, -1
        if kind is EntryType.REG:
            size = _int(raw, "size", name)
            text = _str(raw, "digest", name)
            if text and not is_digest(text):
                raise InvalidEntry(name, f"bad digest {text!r}")
            digest = self._c.digests.add(text) if text else -1
        i = self._append(name, kind, mode, nlink=1)
        c = self._c
        c.uid[i], c.gid[i] = uid, gid
        c.uname[i], c.gname[i] = self._string(uname), self._string(gname)
        c.modtime[i] = modtime
        c.size[i] = size
        c.digest[i] = digest
        if xattrs:
            c.xattrs[i] = xattrs
        if link_name:
            c.links[i] = link_name
        if dev is not None:
            c.devs[i] = dev
        self._file = -1
        if kind is EntryType.REG:
            self._file = i
            self._file_digest = text
            if size:
                self._chunk(name, raw)

    def _append(self, name: str, kind: EntryType, mode: int, nlink: int) -> int:
        """A new entry with default fields; its number."""
        c = self._c
        i = len(c.kind)
        self._index[name] = i
        self._names.append(name)
        c.kind.append(_TYPE_CODE[kind])
        c.mode.append(mode)
        c.uid.append(0)
        c.gid.append(0)
        c.uname.append(self._string(""))
        c.gname.append(self._string(""))
        c.modtime.append(self._modtime("", name))
        c.size.append(0)
        c.nlink.append(nlink)
        c.digest.append(-1)
        return i

    def finish(self) -> _Columns:
        c = self._c
        c.explicit = len(c.kind)
        self._attach_chunks()
        for i in list(c.links):
            if c.kind[i] == _HARDLINK:
                c.links[i] = self._link_target(i)
        if "" not in self._index:
            self._append("", EntryType.DIR, 0o755, nlink=1)
        c.root = self._index[""]
        c.nlink[c.root] = 2
        parents = array("i", [-1]) * len(c.kind)
        for i, name in enumerate(list(self._names)):
            if name:
                parent = self._directory(parent_of(name), child=name, parents=parents)
                parents[i] = parent
                if c.kind[i] == _DIR:
                    c.nlink[parent] += 1
                    c.nlink[i] += 1  # its own "."; the parent's link counted above
        hardlinks = [i for i in c.links if c.kind[i] == _HARDLINK]
        for i in hardlinks:
            c.nlink[self._index[c.links[i]]] += 1
        for i in hardlinks:
            c.nlink[i] = c.nlink[self._index[c.links[i]]]
        parents.extend([-1] * (len(c.kind) - len(parents)))  # implied directories made above
        for i, name in enumerate(self._names[c.explicit :], c.explicit):
            if name:
                parents[i] = self._index[parent_of(name)]
        c.parent = parents
        c.chunk_start.extend([c.chunk_start[-1]] * (len(c.kind) + 1 - len(c.chunk_start)))  # implied: none
        self._index_names()
        self._compact()
        return c

    def _compact(self) -> None:
        """The parse's last small objects (distinct names and times, link
        targets: decoded at random moments of the parse) as a few big ones:
        otherwise each keeps a pymalloc pool, and with it an arena of the
        parse's freed memory, resident for the mount's life."""
        c = self._c
        self._strings, self._modtimes = {}, {}
        c.strings = Strings(c.strings)
        c.modtimes = Strings(c.modtimes)
        c.mtimes = array("d", c.mtimes)
        c.links = SparseStrings(c.links)  # type: ignore[arg-type]
        c.rehome()

    def _directory(self, name: str, child: str, parents: array) -> int:
        """The directory ``name``, created (implicitly) if the TOC lacks it."""
        i = self._index.get(name)
        if i is None:
            i = self._append(name, EntryType.DIR, 0o755, nlink=2)
            parent = self._directory(parent_of(name), child=name, parents=parents)
            self._c.nlink[parent] += 1
        elif self._c.kind[i] != _DIR:
            raise InvalidEntry(child, f"parent {name!r} is a {_TYPES[self._c.kind[i]]}, not a directory")
        return i

    def _index_names(self) -> None:
        """Base names into one string, and the sorted directory index; the
        full names and the name -> number dict are dropped. (Few objects
        per entry on the way: this runs at the mount's memory peak.)"""
        c = self._c
        names, self._names, self._index = self._names, [], {}
        out = io.StringIO()
        for name in names:
            base = name.rpartition("/")[2]
            out.write(base)
            c.base_start.append(c.base_start[-1] + len(base))
        del names
        c.bases = out.getvalue()
        n = len(c.kind)
        # children grouped by parent (a counting sort), then each group by base name
        kid_start = array("I", [0]) * (n + 1)
        for i in range(n):
            if i != c.root:
                kid_start[c.parent[i] + 1] += 1
        for i in range(n):
            kid_start[i + 1] += kid_start[i]
        kids = array("I", [0]) * kid_start[n]
        fill = array("I", kid_start)
        for i in range(n):
            if i != c.root:
                kids[fill[c.parent[i]]] = i
                fill[c.parent[i]] += 1
        for i in range(n):
            lo, hi = kid_start[i], kid_start[i + 1]
            if hi - lo > 1:
                kids[lo:hi] = array("I", sorted(kids[lo:hi], key=c.base))
        c.kids, c.kid_start = kids, kid_start

    def _refuse_shared_offsets(self) -> None:
        """Two chunks at one blob offset (and inner offset): the error names
        the first chunk, in TOC order, whose place another one took."""
        c = self._c
        seen: set[tuple[int, int]] = set()
        for k in range(len(c.c_digest)):
            key = (c.c_blob_offset[k], c.c_inner.get(k, 0))
            if key in seen:
                raise OffsetOutOfRange(self._names[self._chunk_owner[k]], f"a second chunk at blob offset {key[0]}")
            seen.add(key)

    def _link_target(self, link: int) -> str:
        """The final non-hardlink target of a hardlink, refusing cycles."""
        c = self._c
        link_name = self._names[link]
        seen = {link_name}
        i = link
        while c.kind[i] == _HARDLINK:
            target_name = clean_name(c.links[i])
            target = self._index.get(target_name)
            if target is None:
                raise MissingLinkTarget(link_name, f"hardlink target {c.links[i]!r} is not in the layer")
            if c.kind[target] == _DIR:
                raise MissingLinkTarget(link_name, f"hardlink target {c.links[i]!r} is a directory")
            if target_name in seen:
                raise MissingLinkTarget(link_name, "hardlinks form a cycle")
            seen.add(target_name)
            i = target
        return self._names[i]

    def _attach_chunks(self) -> None:
        """Check every file's chunks tile it exactly, then compute each chunk's
        compressed end: the next chunk's start or the TOC."""
        c = self._c
        owners = self._chunk_owner
        n = len(owners)
        # chunks come in entry order (a file's follow it): file i's are
        # chunk_start[i]:chunk_start[i + 1]
        chunk_start = array("I", [0]) * (len(c.kind) + 1)
        for owner in owners:
            chunk_start[owner + 1] += 1
        for i in range(len(c.kind)):
            chunk_start[i + 1] += chunk_start[i]
        c.chunk_start = chunk_start
        for i in range(len(c.kind)):
            if c.kind[i] != _REG:
                continue
            name, size = self._names[i], c.size[i]
            first, last = chunk_start[i], chunk_start[i + 1]
            expected = 0
            for k in range(first, last):
                if c.c_size[k] == 0:  # "chunkSize" 0 or absent: up to the end of the file
                    c.c_size[k] = size - c.c_file_offset[k]
                chunk_size, file_offset, blob_offset = c.c_size[k], c.c_file_offset[k], c.c_blob_offset[k]
                if file_offset != expected:
                    raise SizeMismatch(name, f"chunk at file offset {file_offset}, expected {expected}")
                if chunk_size <= 0 or expected + chunk_size > size:
                    raise SizeMismatch(name, f"chunk of {chunk_size} bytes at {expected} overruns the {size}-byte file")
                if chunk_size > self._limits.max_chunk_size:
                    raise ChunkTooLarge(f"{name!r}: {chunk_size}-byte chunk exceeds the {self._limits.max_chunk_size}-byte limit")
                if not 0 <= blob_offset < self._payload_size:
                    raise OffsetOutOfRange(name, f"chunk offset {blob_offset} is outside the payload [0, {self._payload_size})")
                expected += chunk_size
            if expected != size:
                raise SizeMismatch(name, f"chunks hold {expected} of {size} bytes")
            if last - first == 1 and c.c_digest[first] < 0:
                c.c_digest[first] = c.digest[i]  # the whole file is the chunk
        # every chunk's offset is in the payload now: the array holds them all
        offsets = c.c_blob_offset.array
        if all(offsets[k] <= offsets[k + 1] for k in range(n - 1)):  # as writers write them
            order = array("I", range(n))
        else:
            order = array("I", sorted(range(n), key=offsets.__getitem__))  # stable: chunk order on ties
        c.c_order = order
        c.c_blob_end = Ints.zeros(n)
        following = self._payload_size  # the next greater chunk offset, or the TOC
        duplicates = False
        for pos in range(n - 1, -1, -1):
            k = order[pos]
            if pos + 1 < n:
                if offsets[order[pos + 1]] != offsets[k]:
                    following = offsets[order[pos + 1]]
                else:
                    duplicates = True
            c.c_blob_end[k] = following
        if duplicates:
            self._refuse_shared_offsets()
        self._chunk_owner = array("Q")


def _remember(recent: dict[Any, Any], key: Any, value: Any) -> None:
    """``recent[key] = value``, forgetting the oldest beyond ``_RECENT``."""
    if len(recent) >= _RECENT:
        del recent[next(iter(recent))]
    recent[key] = value


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
