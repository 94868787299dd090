"""The inode table, without FUSE: whiteouts, opaque dirs, hidden format
files, hardlinks, stable inode numbers."""

from __future__ import annotations

import stat
import tarfile
from pathlib import Path

from lazyfs.stargz.reader import StargzReader
from lazyfs.stargz.source import FileSource
from lazyfs.stargz.writer import build
from lazyfs.tree import ROOT_INODE, LayerTree
from stargz.helpers import _add


def _tree(tmp_path: Path, name: str = "layer") -> LayerTree:
    tar = tmp_path / f"{name}.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "d", tarfile.DIRTYPE)
        _add(tf, "d/.wh..wh..opq")
        _add(tf, "d/f", data=b"x")
        _add(tf, "d/f.hard", tarfile.LNKTYPE, linkname="d/f")
        _add(tf, ".wh.gone", uid=7, gid=8)
        _add(tf, ".wh.back")
        _add(tf, "back", data=b"recreated")
        _add(tf, "sub/.prefetch.landmark", data=b"not the format's landmark")
    blob = tmp_path / f"{name}.esgz"
    build(tar, blob, prioritized=["back"])
    with FileSource(blob) as source:
        return LayerTree(StargzReader.open(source).toc)


def _names(tree: LayerTree, ino: int) -> list[bytes]:
    return [name for name, _ in tree[ino].listing]


def test_whiteouts_opaque_and_hidden_files(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    assert _names(tree, ROOT_INODE) == [b"back", b"d", b"gone", b"sub"]  # no landmark, no .wh.
    gone = tree.lookup(ROOT_INODE, b"gone")
    assert gone.mode == stat.S_IFCHR and gone.rdev == 0 and (gone.entry.uid, gone.entry.gid) == (7, 8)
    assert stat.S_ISREG(tree.lookup(ROOT_INODE, b"back").mode)
    d = tree.lookup(ROOT_INODE, b"d")
    assert d.xattrs == {b"trusted.overlay.opaque": b"y", b"user.overlay.opaque": b"y"}
    assert _names(tree, d.ino) == [b"f", b"f.hard"]
    assert _names(tree, tree.lookup(ROOT_INODE, b"sub").ino) == [b".prefetch.landmark"]


def test_hardlinks_share_an_inode_and_inodes_are_stable(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    d = tree.lookup(ROOT_INODE, b"d")
    f, hard = tree.lookup(d.ino, b"f"), tree.lookup(d.ino, b"f.hard")
    assert f is hard and f.nlink == 2
    assert d.parent == ROOT_INODE and tree[ROOT_INODE].parent == ROOT_INODE
    again = _tree(tmp_path, "again")
    assert [(n.ino, n.entry.name) for n in tree] == [(n.ino, n.entry.name) for n in again]
