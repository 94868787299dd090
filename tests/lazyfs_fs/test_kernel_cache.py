"""Warm listings and opens stay in the kernel (no-open mode, which needs the
pyfuse3 built with third_party/pyfuse3's patch): a second ``listdir``, open
and read of the same objects reach the mount process with no request at all."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from lazyfs import mount
from lazyfs.fs import NO_OPEN_SUPPORTED

from .helpers import mounted

_needs_patch = pytest.mark.skipif(
    not NO_OPEN_SUPPORTED, reason="pyfuse3 without third_party/pyfuse3's patch (scripts/setup.sh builds it)"
)


def _walk(root: Path) -> dict[str, list[str]]:
    return {d: sorted(dirs + files) for d, dirs, files in os.walk(root)}


@_needs_patch
def test_second_walk_and_read_never_reach_the_daemon(crfs_blob, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(crfs_blob[0], mnt):
        first = _walk(mnt)
        data = (mnt / "big.bin").read_bytes()
        hosts = (mnt / "etc/hosts").read_bytes()
        before = mount.status(mnt)
        assert before["readdirs"] >= len(first)
        assert before["opens"] <= 2  # the one OPENDIR and the one OPEN that answered ENOSYS

        assert _walk(mnt) == first
        assert (mnt / "big.bin").read_bytes() == data
        assert (mnt / "etc/hosts").read_bytes() == hosts
        after = mount.status(mnt)
        assert after["readdirs"] == before["readdirs"]  # listings cached (FOPEN_CACHE_DIR)
        assert after["opens"] == before["opens"]
        assert after["reads"] == before["reads"]  # pages kept (FOPEN_KEEP_CACHE)
        assert hosts == b"127.0.0.1 localhost\n"


@_needs_patch
def test_read_only_refusals_without_open(crfs_blob, tmp_path: Path) -> None:
    """With OPEN never reaching us, the read-only mount itself refuses writes."""
    mnt = tmp_path / "mnt"
    with mounted(crfs_blob[0], mnt):
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
            with pytest.raises(OSError) as err:
                os.close(os.open(mnt / "etc/hosts", flags))
            assert err.value.errno == errno.EROFS
        os.close(os.open(mnt / "etc", os.O_RDONLY | os.O_DIRECTORY))
        with pytest.raises(OSError) as err:
            os.open(mnt / "etc/hosts", os.O_RDONLY | os.O_DIRECTORY)
        assert err.value.errno == errno.ENOTDIR
        assert os.listdir(mnt / "emptydir") == []


def test_answering_every_open_still_works(crfs_blob, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CRFS_LAZYFS_NO_OPEN=0: what a stock pyfuse3 gets (OPEN/OPENDIR answered)."""
    monkeypatch.setenv("CRFS_LAZYFS_NO_OPEN", "0")
    mnt = tmp_path / "mnt"
    with mounted(crfs_blob[0], mnt):
        first = _walk(mnt)
        assert (mnt / "etc/hosts").read_bytes() == b"127.0.0.1 localhost\n"
        status = mount.status(mnt)
        assert status["no_open"] is False
        assert status["opens"] >= len(first) + 1
        assert _walk(mnt) == first
        with pytest.raises(OSError) as err:
            os.close(os.open(mnt / "etc/hosts", os.O_WRONLY))
        assert err.value.errno == errno.EROFS


def test_layer_without_xattrs_is_asked_for_one_only(tmp_path: Path) -> None:
    """A layer with no xattr at all answers the first getxattr with ENOSYS:
    the kernel answers all later ones itself (EOPNOTSUPP), so that
    fuse-overlayfs's "origin" and "opaque" probes of every file it looks up
    in a new overlay mount never reach the mount process."""
    import io
    import tarfile

    from lazyfs.stargz.writer import build

    tar = tmp_path / "plain.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in (("bin/tool", b"#!/bin/sh\n"), ("etc/hosts", b"127.0.0.1 localhost\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    blob = tmp_path / "plain.esgz"
    build(tar, blob)
    mnt = tmp_path / "mnt"
    with mounted(blob, mnt):
        for path, name in ((mnt / "etc/hosts", "user.fuseoverlayfs.origin"), (mnt / "bin/tool", "trusted.overlay.origin"),
                           (mnt / "etc", "trusted.overlay.opaque"), (mnt / "etc/hosts", "security.capability")):
            with pytest.raises(OSError) as err:
                os.getxattr(path, name)
            assert err.value.errno == errno.EOPNOTSUPP
        assert os.listxattr(mnt / "etc/hosts") == []
        assert mount.status(mnt)["getxattrs"] == 1
        assert (mnt / "etc/hosts").read_bytes() == b"127.0.0.1 localhost\n"


def test_layer_with_xattrs_answers_each_name(crfs_blob, tmp_path: Path) -> None:
    """Where any entry has an xattr, every getxattr is answered: the value,
    or ENODATA for a name the file does not have."""
    mnt = tmp_path / "mnt"
    with mounted(crfs_blob[0], mnt):
        before = mount.status(mnt)["getxattrs"]
        for _ in range(2):
            with pytest.raises(OSError) as err:
                os.getxattr(mnt / "etc/hosts", "user.fuseoverlayfs.origin")
            assert err.value.errno == errno.ENODATA
        assert mount.status(mnt)["getxattrs"] == before + 2
