"""The mount process raises the kernel's read-ahead of its mount (as root)
once every chunk is local (at once for a local blob; for a remote layer see
test_remote_mount): a sequential reader then sends READs of up to 1 MiB
instead of 128 KiB, with more of them in flight; and reads served as views of the memo's chunks are
still the file's bytes."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lazyfs import mount
from lazyfs.fs import KERNEL_READAHEAD_KB, _unescape, raise_kernel_readahead

from .helpers import mounted


def _knob(mnt: Path) -> Path:
    st = os.stat(mnt)
    return Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")


def test_mount_gets_the_larger_read_ahead(crfs_blob, extracted: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(crfs_blob[0], mnt):  # a local blob: every chunk is local from the start
        deadline = time.monotonic() + 5
        while int(_knob(mnt).read_text()) != KERNEL_READAHEAD_KB and time.monotonic() < deadline:
            time.sleep(0.05)
        assert int(_knob(mnt).read_text()) == KERNEL_READAHEAD_KB
        assert (mnt / "big.bin").read_bytes() == (extracted / "big.bin").read_bytes()
        fd = os.open(mnt / "big.bin", os.O_RDONLY)
        try:  # reads across chunk ends, from the page cache or the daemon
            for off, n in ((0, 10), (65530, 20), (3 * 65536 - 3, 5000), (100_000, 150_000)):
                assert os.pread(fd, n, off) == (extracted / "big.bin").read_bytes()[off : off + n]
        finally:
            os.close(fd)
        status = mount.status(mnt)
        assert status["read_errors"] == 0
        assert status["bytes_read"] // status["reads"] > 128 << 10  # not 128 KiB pieces


def test_raise_kernel_readahead_finds_no_mount_at_a_plain_directory(tmp_path: Path) -> None:
    assert raise_kernel_readahead(str(tmp_path), 1024) is False


def test_mountinfo_escapes() -> None:
    assert _unescape(r"/a\040b\011c\012d\134e") == "/a b\tc\nd\\e"
    assert _unescape(r"/x\134040") == "/x\\040"
