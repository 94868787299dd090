"""Whiteouts and opaque directories of lazy layers, as fuse-overlayfs 1.10
merges them, as root and rootless (in a user namespace): the upper layer
deletes a file and makes a directory opaque."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import tarfile
from pathlib import Path

from lazyfs.stargz.writer import build
from stargz.helpers import _add

from .helpers import force_unmount, mounted


def _layer(path: Path, entries: list[tuple]) -> Path:
    tar = path.with_suffix(".tar")
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, data in entries:
            _add(tf, name, kind, data)
    build(tar, path)
    return path


def two_layers(tmp_path: Path) -> tuple[Path, Path]:
    """(lower, upper): the upper deletes a, replaces c, makes d opaque."""
    reg, dir_ = tarfile.REGTYPE, tarfile.DIRTYPE
    lower = _layer(tmp_path / "lower.esgz", [
        ("a", reg, b"deleted above"), ("b", reg, b"kept"), ("c", reg, b"replaced above"),
        ("d", dir_, b""), ("d/x", reg, b"hidden by opaque"), ("d/sub", dir_, b""),
        ("e", dir_, b""), ("e/kept", reg, b"not opaque"),
    ])
    upper = _layer(tmp_path / "upper.esgz", [
        (".wh.a", reg, b""), (".wh.c", reg, b""), ("c", reg, b"new c"),
        ("d", dir_, b""), ("d/.wh..wh..opq", reg, b""), ("d/z", reg, b"new in opaque dir"),
        ("e", dir_, b""), ("e/new", reg, b"added"), ("e/.wh.never-existed", reg, b""),
    ])
    return lower, upper


def test_upper_layer_presents_overlay_whiteouts(tmp_path: Path) -> None:
    """As containerd's applier leaves a layer for overlay: whiteout = char
    0/0 named like the file; opaque = xattr trusted.overlay.opaque=y."""
    _, upper = two_layers(tmp_path)
    mnt = tmp_path / "upper"
    with mounted(upper, mnt):
        assert sorted(os.listdir(mnt)) == ["a", "c", "d", "e"]
        st = os.lstat(mnt / "a")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and stat.S_IMODE(st.st_mode) == 0
        assert (mnt / "c").read_bytes() == b"new c"  # a real entry beats its own whiteout
        assert sorted(os.listdir(mnt / "d")) == ["z"]
        assert os.getxattr(mnt / "d", "trusted.overlay.opaque") == b"y"
        assert os.getxattr(mnt / "d", "user.overlay.opaque") == b"y"  # what rootless fuse-overlayfs can see
        assert os.listxattr(mnt / "e") == []
        assert sorted(os.listdir(mnt / "e")) == ["never-existed", "new"]
        assert not os.path.lexists(mnt / ".wh.a") and not os.path.lexists(mnt / "d/.wh..wh..opq")


EXPECTED_TOP = ["b", "c", "d", "e"]
LISTING_SCRIPT = """
set -e
fuse-overlayfs -f -o "$1" "$2" 2>/dev/null &
pid=$!
trap 'umount "$2" 2>/dev/null || true; kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT
for i in $(seq 200); do mountpoint -q "$2" && break; sleep 0.05; done
(cd "$2"; ls; echo --; ls d; echo --; ls e; echo --; cat b c d/z)
"""


def _dirs(tmp_path: Path) -> tuple[Path, str]:
    merged, up, work = tmp_path / "merged", tmp_path / "up", tmp_path / "work"
    for d in (merged, up, work):
        d.mkdir()
    return merged, f"lowerdir={tmp_path / 'l1'}:{tmp_path / 'l0'},upperdir={up},workdir={work}"


def test_fuse_overlayfs_merges_lazy_layers(tmp_path: Path) -> None:
    lower, upper = two_layers(tmp_path)
    merged, opts = _dirs(tmp_path)
    with mounted(lower, tmp_path / "l0"), mounted(upper, tmp_path / "l1"):
        subprocess.run(["fuse-overlayfs", "-o", opts, str(merged)], check=True, capture_output=True, timeout=30)
        try:
            assert sorted(os.listdir(merged)) == EXPECTED_TOP
            assert (merged / "b").read_bytes() == b"kept"
            assert (merged / "c").read_bytes() == b"new c"
            assert sorted(os.listdir(merged / "d")) == ["z"]
            assert (merged / "d/z").read_bytes() == b"new in opaque dir"
            assert sorted(os.listdir(merged / "e")) == ["kept", "new"]
            (merged / "b").write_bytes(b"changed")  # copy-up works over a lazy lower
            assert (tmp_path / "up/b").read_bytes() == b"changed"
            assert (tmp_path / "l0/b").read_bytes() == b"kept"
        finally:
            with contextlib.suppress(Exception):
                force_unmount(merged)


def test_rootless_fuse_overlayfs_merges_lazy_layers(tmp_path: Path) -> None:
    """In a user namespace trusted.* xattrs are invisible: user.overlay.opaque
    must carry the opaque directory. The overlay lives (and dies) in the
    namespace's own mount table."""
    lower, upper = two_layers(tmp_path)
    merged, opts = _dirs(tmp_path)
    with mounted(lower, tmp_path / "l0"), mounted(upper, tmp_path / "l1"):
        proc = subprocess.run(["unshare", "-Urm", "sh", "-c", LISTING_SCRIPT, "sh", opts, str(merged)],
                              capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    top, d, e, contents = proc.stdout.split("--\n")
    assert top.split() == EXPECTED_TOP
    assert d.split() == ["z"]
    assert e.split() == ["kept", "new"]
    assert contents == "keptnew cnew in opaque dir"
