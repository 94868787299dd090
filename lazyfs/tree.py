"""A layer's TOC as the inode table a filesystem serves: pure data, no FUSE.

The tree is built once per mount and never changes, so inode numbers are
stable for the mount's life (and, being assigned in name order, across
mounts of the same layer). It presents the layer the way containerd's
applier leaves it on disk for overlayfs, which is also what fuse-overlayfs
reads from a lower directory:

- ``.wh.NAME`` (a whiteout) becomes ``NAME``, a character device 0/0 owned
  as the whiteout was; if the layer also has a real ``NAME`` next to it,
  the real one wins and the whiteout is hidden;
- ``.wh..wh..opq`` is hidden and its directory gets the xattrs
  ``trusted.overlay.opaque=y`` (what containerd's applier sets) and
  ``user.overlay.opaque=y``: measured with fuse-overlayfs 1.10, both work
  as root, but in a user namespace (rootless) the kernel hides ``trusted.*``
  and only the ``user.`` one makes the directory opaque. The reference
  stargz-snapshotter presents both by default too;
- the stargz format's own files in the root (the prefetch landmarks and the
  TOC member ``stargz.index.json``) are hidden, as the reference
  stargz-snapshotter does: they are artifacts of the format, not image
  content.

The table lives as long as the mount, so it is kept in ``array`` columns
indexed by inode (the TOC entry, mode, parent) and one shared buffer of
directory entry names: ~40 bytes per inode. ``Node`` is a light view made
on demand.
"""

from __future__ import annotations

import bisect
import os
import stat
from array import array
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

from .stargz.toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME, EntryType, Toc, TocEntry

ROOT_INODE = 1
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
OPAQUE_XATTRS = (OPAQUE_XATTR, "user.overlay.opaque")
OPAQUE_VALUE = b"y"
HIDDEN_IN_ROOT = frozenset({PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK, TOC_TAR_NAME})

# Shared, read-only empty: most nodes have no xattrs.
_NO_XATTRS: Mapping[bytes, bytes] = MappingProxyType({})

_KIND = {
    EntryType.DIR: stat.S_IFDIR,
    EntryType.REG: stat.S_IFREG,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.CHAR: stat.S_IFCHR,
    EntryType.BLOCK: stat.S_IFBLK,
    EntryType.FIFO: stat.S_IFIFO,
}


class NodeStat(NamedTuple):
    """An inode's attributes, as ``LayerTree.stat`` gives them."""

    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    mtime: float


class Node:
    """One inode: a TOC entry (hardlinks share their target's node) or a
    synthetic whiteout device. A read-only view of the ``LayerTree``'s
    columns, made on each ``LayerTree.get``: two views of one inode are
    equal (and hash alike), not the same object."""

    __slots__ = ("_tree", "ino")

    def __init__(self, tree: LayerTree, ino: int) -> None:
        self._tree = tree
        self.ino = ino

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Node):
            return NotImplemented
        return self.ino == other.ino and self._tree is other._tree

    def __hash__(self) -> int:
        return hash(self.ino)

    def __repr__(self) -> str:
        return f"Node(ino={self.ino}, mode={self.mode:#o}, name={self.entry.name!r})"

    @property
    def entry(self) -> TocEntry:
        """The TOC entry (a whiteout's own ``.wh.`` entry for a whiteout)."""
        return self._tree.toc.entry_at(self._tree._entry[self.ino - ROOT_INODE])

    @property
    def mode(self) -> int:
        """File type and permission bits, as st_mode."""
        return self._tree._mode[self.ino - ROOT_INODE]

    def stat(self) -> NodeStat:
        """All the attributes a getattr answers, at once (``LayerTree.stat``)."""
        return self._tree.stat(self.ino)

    @property
    def nlink(self) -> int:
        return self.stat().nlink

    @property
    def size(self) -> int:
        return self.stat().size

    @property
    def rdev(self) -> int:
        return self.stat().rdev

    @property
    def uid(self) -> int:
        return self.stat().uid

    @property
    def gid(self) -> int:
        return self.stat().gid

    @property
    def mtime(self) -> float:
        """Seconds since the epoch, as the TOC's modtime."""
        return self.stat().mtime

    @property
    def xattrs(self) -> Mapping[bytes, bytes]:
        return self._tree._xattrs.get(self.ino, _NO_XATTRS)

    @property
    def link_target(self) -> bytes:
        """A symlink's target (b"" for anything else)."""
        return self._tree._link_target(self.ino)

    @property
    def parent(self) -> int:
        """Directories: the directory holding it (ROOT_INODE for the root and non-directories)."""
        return self._tree._parent[self.ino - ROOT_INODE]

    @property
    def names(self) -> tuple[bytes, ...]:
        """Directories: the children's names, sorted."""
        tree = self._tree
        return tuple(tree._name(k) for k in range(*tree._kid_range(self.ino)))

    @property
    def inos(self) -> Sequence[int]:
        """Directories: the children's inodes, in the order of ``names``."""
        lo, hi = self._tree._kid_range(self.ino)
        return self._tree._kid_ino[lo:hi]

    @property
    def listing(self) -> list[tuple[bytes, int]]:
        """``(name, inode)`` of each child, sorted by name."""
        return list(self.listing_from(0))

    def listing_from(self, start: int) -> Iterator[tuple[bytes, int]]:
        """``(name, inode)`` of the children from the ``start``-th on (readdir's offset)."""
        tree = self._tree
        lo, hi = tree._kid_range(self.ino)
        for k in range(lo + max(start, 0), hi):
            yield tree._name(k), tree._kid_ino[k]

    @property
    def children(self) -> dict[bytes, int]:
        """name -> inode of each child (built on each call)."""
        return dict(self.listing_from(0))

    def child(self, name: bytes) -> int | None:
        """The inode of the child ``name``, or None."""
        return self._tree._child(self.ino, name)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)


class LayerTree:
    """Inode number -> ``Node`` for every visible object of one layer."""

    def __init__(self, toc: Toc, *, opaque_xattrs: tuple[str, ...] = OPAQUE_XATTRS) -> None:
        self.toc = toc
        self._opaque = [name.encode() for name in opaque_xattrs]
        # by inode - ROOT_INODE: the TOC entry number, st_mode, parent directory
        self._entry = array("I")
        self._mode = array("I")
        self._parent = array("I")
        self._whiteouts = 0  # inodes from here on are whiteouts
        # directory inode d's children: kid_start[d - ROOT_INODE]:kid_start[d - ROOT_INODE + 1]
        # of kid_ino, their names names[name_start[k]:name_start[k + 1] - 1]: each
        # name is followed by a NUL, and names[0] is one, so that a lookup is
        # one bytes.find of NUL + name + NUL (a name has neither NUL nor "/")
        self._kid_start = array("I")
        self._kid_ino = array("I")
        self._name_start = array("I", [1])
        self._names = b"\0"
        self._xattrs: dict[int, Mapping[bytes, bytes]] = {}  # only inodes that have any
        self._total_size = 0
        self._build()

    def __getitem__(self, ino: int) -> Node:
        node = self.get(ino)
        if node is None:
            raise KeyError(ino)
        return node

    def get(self, ino: int) -> Node | None:
        if ROOT_INODE <= ino < ROOT_INODE + len(self._entry):
            return Node(self, ino)
        return None

    def __len__(self) -> int:
        return len(self._entry)

    def __iter__(self) -> Iterator[Node]:
        return (self[ino] for ino in range(ROOT_INODE, ROOT_INODE + len(self._entry)))

    def lookup(self, parent: int, name: bytes) -> Node | None:
        """The child ``name`` of directory ``parent``, or None."""
        if not ROOT_INODE <= parent < ROOT_INODE + len(self._entry):
            raise KeyError(parent)
        ino = self._child(parent, name)
        return None if ino is None else Node(self, ino)

    @property
    def total_size(self) -> int:
        """Bytes of regular file data, each inode counted once."""
        return self._total_size

    @property
    def has_xattrs(self) -> bool:
        """Whether any inode has an xattr (opaque markers included)."""
        return bool(self._xattrs)

    # --- the columns ----------------------------------------------------------

    def _link_target(self, ino: int) -> bytes:
        if not stat.S_ISLNK(self._mode[ino - ROOT_INODE]):
            return b""
        return os.fsencode(self.toc.link_at(self._entry[ino - ROOT_INODE]))

    def _kid_range(self, ino: int) -> tuple[int, int]:
        i = ino - ROOT_INODE
        return self._kid_start[i], self._kid_start[i + 1]

    def _name(self, k: int) -> bytes:
        return self._names[self._name_start[k] : self._name_start[k + 1] - 1]

    def _child(self, ino: int, name: bytes) -> int | None:
        lo, hi = self._kid_range(ino)
        if lo == hi or not name or b"\0" in name or b"/" in name:
            return None
        starts = self._name_start
        at = self._names.find(b"\0" + name + b"\0", starts[lo] - 1, starts[hi])
        if at < 0:
            return None
        return self._kid_ino[bisect.bisect_left(starts, at + 1, lo, hi)]

    def stat(self, ino: int) -> NodeStat:
        """What a getattr answers for inode ``ino`` (which must exist), in
        one call: ``Node``'s properties one by one cost several times more."""
        i = ino - ROOT_INODE
        mode = self._mode[i]
        entry = self._entry[i]
        _, uid, gid, size, nlink, mtime = self.toc.stat_at(entry)
        if i >= self._whiteouts:
            return NodeStat(mode, 1, uid, gid, 0, 0, mtime)
        rdev = 0
        if stat.S_ISLNK(mode):
            size = len(self._link_target(ino))
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            rdev = os.makedev(*self.toc.dev_at(entry))
        return NodeStat(mode, nlink, uid, gid, rdev, size, mtime)

    # --- building ---------------------------------------------------------------

    def _build(self) -> None:
        toc = self.toc
        order = _name_order(toc)
        ino_of = array("I", [0]) * len(toc)  # TOC entry number -> inode (hardlinks: 0)
        for ino, i in enumerate(order, ROOT_INODE):
            ino_of[i] = ino
        for i in order:
            kind = toc.type_at(i)
            self._entry.append(i)
            # Linux symlinks are always rwxrwxrwx, whatever the tar header says
            self._mode.append(stat.S_IFLNK | 0o777 if kind is EntryType.SYMLINK else _KIND[kind] | (toc.mode_at(i) & 0o7777))
            self._parent.append(ROOT_INODE)
            xattrs = toc.xattrs_at(i)
            if xattrs:
                self._xattrs[ino_of[i]] = {os.fsencode(k): v for k, v in xattrs.items()}
            if kind is EntryType.REG:
                self._total_size += toc.size_at(i)
        self._whiteouts = len(self._entry)
        names = bytearray(b"\0")  # one buffer, not one bytes object per name while building
        root = toc.index_of("")
        for i in order:
            self._kid_start.append(len(self._kid_ino))
            if toc.type_at(i) is EntryType.DIR:
                self._fill_directory(i, i == root, ino_of, names)
        self._kid_start.extend([len(self._kid_ino)] * (len(self._entry) + 1 - len(self._kid_start)))
        self._names = bytes(names)

    def _fill_directory(self, i: int, in_root: bool, ino_of: Sequence[int], names: bytearray) -> None:
        toc = self.toc
        ino = ino_of[i]
        found: dict[bytes, int] = {}
        whiteouts = []
        for child in toc.children_at(i):
            name = toc.base_at(child)
            if in_root and name in HIDDEN_IN_ROOT:
                continue
            if name == OPAQUE_MARKER:
                self._xattrs[ino] = {**self._xattrs.get(ino, {}), **dict.fromkeys(self._opaque, OPAQUE_VALUE)}
                continue
            if name.startswith(WHITEOUT_PREFIX):
                whiteouts.append((name[len(WHITEOUT_PREFIX) :], child))
                continue
            target = ino_of[toc.resolve_at(child)]
            found[os.fsencode(name)] = target
            if stat.S_ISDIR(self._mode[target - ROOT_INODE]):
                self._parent[target - ROOT_INODE] = ino
        for name, child in whiteouts:  # children_at sorts them by name, as the entries' names
            key = os.fsencode(name)
            if key not in found and name:
                found[key] = self._whiteout(child)
        for key in sorted(found):
            names += key
            names += b"\0"
            self._name_start.append(len(names))
            self._kid_ino.append(found[key])

    def _whiteout(self, i: int) -> int:
        """The char 0/0 device containerd's applier makes for a ``.wh.`` entry."""
        self._entry.append(i)
        self._mode.append(stat.S_IFCHR)
        self._parent.append(ROOT_INODE)
        return len(self._entry) - 1 + ROOT_INODE


def _name_order(toc: Toc) -> array:
    """The TOC's entry numbers but hardlinks', in the order of their names
    (inode numbers follow it), found by walking the directories: sorting
    all the full names would build ~1 MB of strings per 10k entries at the
    moment the mount's memory peaks. A directory ``d``'s descendants sort
    as if named ``d/``: after ``d``, and after ``d-x`` but before ``d0``."""
    order = array("I")
    root = toc.index_of("")
    assert root is not None
    order.append(root)
    stack = [iter(_sorted_children(toc, root))]
    while stack:
        for _, descend, i in stack[-1]:
            if descend:
                stack.append(iter(_sorted_children(toc, i)))
                break
            order.append(i)
        else:
            stack.pop()
    return order


def _sorted_children(toc: Toc, d: int) -> list[tuple[str, bool, int]]:
    items = []
    for i in toc.children_at(d):
        kind = toc.type_at(i)
        if kind is EntryType.HARDLINK:
            continue
        base = toc.base_at(i)
        items.append((base, False, i))
        if kind is EntryType.DIR:
            items.append((base + "/", True, i))
    items.sort()
    return items
