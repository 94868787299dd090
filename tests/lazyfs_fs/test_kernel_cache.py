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
