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
"""

from __future__ import annotations

import bisect
import os
import stat
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from .stargz.toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME, EntryType, Toc, TocEntry

ROOT_INODE = 1
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
OPAQUE_XATTRS = (OPAQUE_XATTR, "user.overlay.opaque")
OPAQUE_VALUE = b"y"
HIDDEN_IN_ROOT = frozenset({PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK, TOC_TAR_NAME})

# Shared, read-only empties: most nodes have no xattrs, and only directories
# have children.
_NO_XATTRS: Mapping[bytes, bytes] = MappingProxyType({})
_NO_NAMES: tuple[bytes, ...] = ()
_NO_INOS: Sequence[int] = ()

_KIND = {
    EntryType.DIR: stat.S_IFDIR,
    EntryType.REG: stat.S_IFREG,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.CHAR: stat.S_IFCHR,
    EntryType.BLOCK: stat.S_IFBLK,
    EntryType.FIFO: stat.S_IFIFO,
}


@dataclass(slots=True, eq=False)
class Node:
    """One inode: a TOC entry (hardlinks share their target's node) or a
    synthetic whiteout device."""

    ino: int
    entry: TocEntry
    mode: int  # file type and permission bits, as st_mode
    nlink: int
    size: int
    rdev: int = 0
    xattrs: Mapping[bytes, bytes] = field(default_factory=lambda: _NO_XATTRS)  # read-only once built
    link_target: bytes = b""  # symlinks
    parent: int = ROOT_INODE  # directories: the directory holding it
    # directories: the children's names, sorted, and their inodes in the same
    # order (a tuple and an array: no per-child tuple or dict entry)
    names: tuple[bytes, ...] = _NO_NAMES
    inos: Sequence[int] = _NO_INOS

    @property
    def listing(self) -> list[tuple[bytes, int]]:
        """``(name, inode)`` of each child, sorted by name."""
        return list(zip(self.names, self.inos))

    @property
    def children(self) -> dict[bytes, int]:
        """name -> inode of each child (built on each call)."""
        return dict(zip(self.names, self.inos))

    def child(self, name: bytes) -> int | None:
        """The inode of the child ``name``, or None."""
        i = bisect.bisect_left(self.names, name)
        if i < len(self.names) and self.names[i] == name:
            return self.inos[i]
        return None

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
        self._nodes: list[Node] = []  # inode i is self._nodes[i - ROOT_INODE]
        self._by_name: dict[str, int] = {}
        self._modes: dict[int, int] = {}
        self._total_size = 0
        self._build()

    def __getitem__(self, ino: int) -> Node:
        node = self.get(ino)
        if node is None:
            raise KeyError(ino)
        return node

    def get(self, ino: int) -> Node | None:
        i = ino - ROOT_INODE
        return self._nodes[i] if 0 <= i < len(self._nodes) else None

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self._nodes)

    def lookup(self, parent: int, name: bytes) -> Node | None:
        """The child ``name`` of directory ``parent``, or None."""
        ino = self[parent].child(name)
        return None if ino is None else self[ino]

    @property
    def total_size(self) -> int:
        """Bytes of regular file data, each inode counted once."""
        return self._total_size

    def _build(self) -> None:
        entries = sorted((e for e in self.toc if e.type is not EntryType.HARDLINK), key=lambda e: e.name)
        for entry in entries:  # the root ("") sorts first and gets ROOT_INODE
            self._add(entry)
        for entry in entries:
            if entry.type is EntryType.DIR:
                self._fill_directory(entry)
        self._total_size = sum(n.size for n in self._nodes if n.is_reg)
        self._by_name = {}  # only needed to link the tree
        self._modes = {}

    def _add(self, entry: TocEntry) -> Node:
        ino = len(self._nodes) + ROOT_INODE
        node = Node(
            ino=ino,
            entry=entry,
            # Linux symlinks are always rwxrwxrwx, whatever the tar header says
            mode=self._mode(stat.S_IFLNK | 0o777 if entry.type is EntryType.SYMLINK else _KIND[entry.type] | (entry.mode & 0o7777)),
            nlink=entry.nlink,
            size=entry.size,
            xattrs={os.fsencode(k): v for k, v in entry.xattrs.items()} if entry.xattrs else _NO_XATTRS,
        )
        if entry.type in (EntryType.CHAR, EntryType.BLOCK):
            node.rdev = os.makedev(entry.dev_major, entry.dev_minor)
        if entry.type is EntryType.SYMLINK:
            node.link_target = os.fsencode(entry.link_name)
            node.size = len(node.link_target)
        self._nodes.append(node)
        self._by_name[entry.name] = ino
        return node

    def _mode(self, mode: int) -> int:
        """One int object per distinct mode (a layer has a handful)."""
        return self._modes.setdefault(mode, mode)

    def _whiteout(self, whiteout: TocEntry) -> Node:
        """The char 0/0 device containerd's applier makes for a ``.wh.`` entry."""
        ino = len(self._nodes) + ROOT_INODE
        node = Node(ino=ino, entry=whiteout, mode=stat.S_IFCHR, nlink=1, size=0, rdev=0)
        self._nodes.append(node)
        return node

    def _fill_directory(self, entry: TocEntry) -> None:
        node = self[self._by_name[entry.name]]
        children = self.toc.children(entry.name)
        found: dict[bytes, int] = {}
        whiteouts = []
        for name, child in children.items():
            if not entry.name and name in HIDDEN_IN_ROOT:
                continue
            if name == OPAQUE_MARKER:
                node.xattrs = {**node.xattrs, **dict.fromkeys(self._opaque, OPAQUE_VALUE)}
                continue
            if name.startswith(WHITEOUT_PREFIX):
                whiteouts.append((name[len(WHITEOUT_PREFIX) :], child))
                continue
            target = self[self._by_name[self.toc.resolve(child).name]]
            found[os.fsencode(name)] = target.ino
            if target.is_dir:
                target.parent = node.ino
        for name, child in sorted(whiteouts, key=lambda w: w[1].name):
            key = os.fsencode(name)
            if key not in found and name:
                found[key] = self._whiteout(child).ino
        if found:
            names = sorted(found)
            node.names = tuple(names)
            node.inos = array("I", [found[name] for name in names])
