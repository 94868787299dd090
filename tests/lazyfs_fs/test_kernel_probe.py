"""bench/kernel_probe.py against a real lazyfs mount: the probes the
benchmark's warm rows are explained with must count what the kernel does."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lazyfs_fetch.conftest import build_layer

from .helpers import mounted

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from kernel_probe import FuseRequests, fuse_connection, large_folio_share, proactive_reclaim  # noqa: E402


def _layer(tmp_path: Path) -> Path:
    return build_layer(tmp_path, {"hello.txt": b"hello\n" * 5000}).path


def test_requests_of_one_connection_are_counted_by_opcode(tmp_path: Path) -> None:
    blob = _layer(tmp_path)
    with mounted(blob, tmp_path / "a"), mounted(blob, tmp_path / "b"):
        assert fuse_connection(tmp_path / "a") != fuse_connection(tmp_path / "b")
        fd = os.open(tmp_path / "a/hello.txt", os.O_RDONLY)
        os.read(fd, 100)  # first read of the file: the kernel asks the mount
        with FuseRequests(tmp_path / "a") as requests:
            for _ in range(3):
                assert not os.isatty(fd)  # TCGETS: the kernel forwards it as FUSE_IOCTL
            other = os.open(tmp_path / "b/hello.txt", os.O_RDONLY)
            os.isatty(other)  # the other mount's: not counted
            os.close(other)
        os.close(fd)
    assert requests.available, "tracefs with the fuse events is needed"
    assert requests.counts["IOCTL"] == 3
    assert "READ" not in requests.counts  # cached since the read before the block


def test_page_cache_of_a_read_file_is_inspected(tmp_path: Path) -> None:
    blob = _layer(tmp_path)
    with mounted(blob, tmp_path / "m"):
        path = tmp_path / "m/hello.txt"
        path.read_bytes()
        share, cached = large_folio_share(path)
    assert cached == 30000 // 4096  # every whole page of the file is cached
    assert 0.0 <= share <= 1.0
    assert proactive_reclaim()  # "none" or a description, never empty
