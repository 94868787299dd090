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
    assert f == hard and f.ino == hard.ino and f.nlink == 2  # one inode (views of it are equal)
    assert d.parent == ROOT_INODE and tree[ROOT_INODE].parent == ROOT_INODE
    again = _tree(tmp_path, "again")
    assert [(n.ino, n.entry.name) for n in tree] == [(n.ino, n.entry.name) for n in again]


def test_lookups_of_odd_names_and_readdir_offsets(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    root = tree[ROOT_INODE]
    for name in (b"", b"d/f", b"d\0", b"\0", b"bac", b"backs", b".wh.gone"):
        assert root.child(name) is None and tree.lookup(ROOT_INODE, name) is None
    assert list(root.listing_from(2)) == root.listing[2:] and list(root.listing_from(9)) == []
    assert root.names == (b"back", b"d", b"gone", b"sub") and list(root.inos) == [n.ino for n in map(tree.lookup, [ROOT_INODE] * 4, root.names)]


def test_stat_is_what_the_properties_say(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    for node in tree:
        st = node.stat()
        assert (st.mode, st.nlink, st.size, st.rdev) == (node.mode, node.nlink, node.size, node.rdev)
        if not (node.mode == stat.S_IFCHR and node.nlink == 1):  # a whiteout has its .wh. entry's owner
            assert (st.uid, st.gid, st.mtime) == (node.entry.uid, node.entry.gid, node.entry.mtime)
    back = tree.lookup(ROOT_INODE, b"back")
    assert back.size == len(b"recreated")
    # every regular file once, hidden ones (the format's landmark) included, as ever
    assert tree.total_size == len(b"recreated") + len(b"x") + len(b"not the format's landmark") + len(b"\x0f")
    assert not tree.has_xattrs or tree.lookup(ROOT_INODE, b"d").xattrs
