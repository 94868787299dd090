"""The mount process: ready when mounted, gone (and unmounted) after
SIGTERM or an external unmount; ``crfs mount`` / ``umount`` / ``mount-status``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lazyfs import mount

from .helpers import force_unmount, kill, mounted, run_crfs



def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not mount.is_alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_sigterm_unmounts_and_exits(crfs_blob, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(crfs_blob[0], mnt) as pid:
        assert mount.is_mounted(mnt)
        assert mount.status(mnt)["pid"] == pid
        os.kill(pid, signal.SIGTERM)
        assert _wait_gone(pid)
        assert not mount.is_mounted(mnt)
        assert not mount.control_path(mnt).exists()


def test_sigterm_works_when_the_parent_had_it_blocked(crfs_blob, tmp_path: Path) -> None:
    """crfs serve blocks SIGTERM (it takes it with sigwait) and children
    inherit the mask: a layer mount it starts must still stop on SIGTERM."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    starter = (
        "import signal, sys; from lazyfs import mount; "
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT}); "
        f"print(mount.start({str(crfs_blob[0])!r}, {str(mnt)!r}))"
    )
    out = subprocess.run([sys.executable, "-c", starter], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[-1])
    try:
        assert mount.is_mounted(mnt)
        os.kill(pid, signal.SIGTERM)
        assert _wait_gone(pid), "the mount process ignored SIGTERM"
        assert not mount.is_mounted(mnt)
    finally:
        force_unmount(mnt)
        kill(pid)


def test_external_unmount_ends_the_process(crfs_blob, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(crfs_blob[0], mnt) as pid:
        (mnt / "etc/hosts").read_bytes()
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        assert _wait_gone(pid)



def test_crfs_mount_status_umount(crfs_blob, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = run_crfs("mount", str(crfs_blob[0]), str(mnt), "--toc-digest", crfs_blob[1].toc_digest)
    assert proc.returncode == 0, proc.stderr
    pid = json.loads(proc.stdout)["pid"]
    try:
        assert (mnt / "etc/hosts").read_bytes() == b"127.0.0.1 localhost\n"
        proc = run_crfs("mount-status", str(mnt))
        assert proc.returncode == 0, proc.stderr
        status = json.loads(proc.stdout)
        assert status["pid"] == pid and status["reads"] >= 1 and status["bytes_read"] == 20
        assert status["toc_digest"] == crfs_blob[1].toc_digest
        proc = run_crfs("umount", str(mnt))
        assert proc.returncode == 0, proc.stderr
        assert not mount.is_mounted(mnt) and _wait_gone(pid)
    finally:
        force_unmount(mnt)
        kill(pid)


def test_crfs_mount_refuses_what_it_cannot_serve(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    not_a_layer = tmp_path / "junk"
    not_a_layer.write_bytes(b"not a stargz blob" * 10)
    proc = run_crfs("mount", str(not_a_layer), str(mnt))
    assert proc.returncode == 1 and "failed" in proc.stderr
    assert run_crfs("mount", "--foreground", "docker://example.com/x:1", str(mnt)).returncode == 2
    assert run_crfs("mount-status", str(mnt)).returncode == 1
    assert not mount.is_mounted(mnt)
