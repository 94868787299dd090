"""lazyfs.forkserver: mount processes forked from a process that has done
their imports (what ``crfs serve`` uses), with a real FUSE mount of a local
layer; the fallback to a new interpreter when the server is gone; a bad
request does not end the server."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from lazyfs import mount
from lazyfs.forkserver import ForkServer, process_name
from snapshotter.supervisor import MountSupervisor

from .helpers import mounted


def _stat_ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.fixture
def fork_server(tmp_path: Path):
    server = ForkServer(tmp_path / "fs.sock")
    server.start()
    yield server
    server.stop()


def test_a_forked_mount_serves_and_outlives_the_server(crfs_blob, fork_server: ForkServer, tmp_path: Path) -> None:
    blob, build = crfs_blob
    mnt = tmp_path / "mnt"
    with mounted(blob, mnt, toc_digest=build.toc_digest, fork_server=fork_server) as pid:
        assert Path(f"/proc/{pid}/comm").read_text().strip() == process_name(mnt)
        assert _stat_ppid(pid) != os.getpid()  # the server's child, in its own session
        assert os.getsid(pid) == pid
        assert MountSupervisor._is_lazyfs(pid, str(mnt)) and not MountSupervisor._is_lazyfs(pid, str(tmp_path))
        assert (mnt / "etc/hosts").read_bytes() == b"127.0.0.1 localhost\n"
        assert mount.status(mnt)["pid"] == pid
        fork_server.stop()  # crfs serve going away: its mounts stay
        assert mount.is_alive(pid)
        assert (mnt / "etc/hosts").read_bytes() == b"127.0.0.1 localhost\n"
        mount.unmount(mnt)
        assert not mount.is_mounted(mnt)


def test_without_a_running_server_the_process_is_started_directly(crfs_blob, tmp_path: Path) -> None:
    blob, build = crfs_blob
    server = ForkServer(tmp_path / "fs.sock")  # never started
    mnt = tmp_path / "mnt"
    with mounted(blob, mnt, toc_digest=build.toc_digest, fork_server=server) as pid:
        assert os.fsencode(str(mnt)) in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert (mnt / "etc/hosts").read_bytes() == b"127.0.0.1 localhost\n"


def test_a_bad_request_does_not_end_the_server(crfs_blob, fork_server: ForkServer, tmp_path: Path) -> None:
    for payload in (b"not json", b'{"args": 5}'):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(fork_server.path))
            sock.sendall(payload)  # and no descriptors
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(100) == b""  # no pid: refused
    blob, build = crfs_blob
    with mounted(blob, tmp_path / "mnt", toc_digest=build.toc_digest, fork_server=fork_server) as pid:
        assert Path(f"/proc/{pid}/comm").read_text().strip() == process_name(tmp_path / "mnt")


def test_a_failing_mount_is_reported_with_its_log(fork_server: ForkServer, tmp_path: Path) -> None:
    bad = tmp_path / "bad.stargz"
    bad.write_bytes(b"not a stargz blob" * 10)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with pytest.raises(mount.MountError) as err:
        mount.start(str(bad), mnt, fork_server=fork_server, timeout=10)
    assert "cannot open" in str(err.value)
    assert not mount.is_mounted(mnt)
