"""snapshotter.supervisor: real lazyfs mounts of a local eStargz blob, started,
shared, watched, restarted, adopted and stopped by MountSupervisor."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazyfs import mount
from lazyfs.layer_source import RemoteOptions
from lazyfs.stargz.writer import build
from lazyfs_fs.helpers import force_unmount, kill
from snapshotter.supervisor import MountSupervisor, SupervisorError
from stargz.helpers import CHUNK, big_data, write_layer_tar

HOSTS = b"127.0.0.1 localhost\n"
BIG = big_data(3 * CHUNK + 1234)
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def blob_and_toc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("sup-blob")
    tar = write_layer_tar(d / "layer.tar")
    out = d / "layer.esgz"
    return out, build(tar, out, chunk_size=CHUNK).toc_digest


@pytest.fixture
def blob(blob_and_toc, tmp_path: Path) -> tuple[Path, str]:
    """A private copy (some tests move it away)."""
    path = tmp_path / "blob" / "layer.esgz"
    path.parent.mkdir()
    shutil.copy(blob_and_toc[0], path)
    return path, blob_and_toc[1]


def _lazyfs_pids_under(root: Path) -> list[int]:
    """Pids of lazyfs mount processes whose mountpoint is below ``root``."""
    prefix = os.fsencode(os.path.realpath(root)) + b"/"
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            if b"lazyfs.mount" in args and any(a.startswith(prefix) for a in args):
                pids.append(int(entry))
    return pids


@pytest.fixture
def supervisors(tmp_path: Path) -> Iterator[list[MountSupervisor]]:
    """Supervisors made by the test; afterwards they are closed and every
    mount / lazyfs process below tmp_path is gone, whatever happened."""
    made: list[MountSupervisor] = []
    try:
        yield made
    finally:
        for sup in made:
            with contextlib.suppress(Exception):
                sup.close()
        for pid in _lazyfs_pids_under(tmp_path):
            kill(pid)
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        for point in points:
            if point.startswith(os.path.realpath(tmp_path) + "/"):
                force_unmount(Path(point))


def _sup(made: list[MountSupervisor], **kw) -> MountSupervisor:
    kw = {"poll_interval": 0.1, "backoff_initial": 0.3, "backoff_max": 1.2, **kw}
    sup = MountSupervisor(**kw)
    made.append(sup)
    return sup


def _mnt(tmp_path: Path, name: str = "mnt") -> Path:
    p = tmp_path / name
    p.mkdir()
    return p


def _check_bytes(mnt: Path) -> None:
    assert (mnt / "etc/hosts").read_bytes() == HOSTS
    assert (mnt / "big.bin").read_bytes() == BIG


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _gone(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return not mount.is_alive(pid)


def test_acquire_twice_shares_one_process_and_release_stops_it(blob, tmp_path, supervisors) -> None:
    sup = _sup(supervisors)
    mnt = _mnt(tmp_path)
    h1 = sup.acquire(DIGEST, str(blob[0]), mnt, blob[1], RemoteOptions())
    h2 = sup.acquire(DIGEST, str(blob[0]), mnt, blob[1], RemoteOptions())
    assert h1.pid == h2.pid and mount.is_alive(h1.pid)
    assert _lazyfs_pids_under(tmp_path) == [h1.pid]
    health = sup.health()[DIGEST]
    assert health["refs"] == 2 and health["pid"] == h1.pid and health["restarts"] == 0
    _check_bytes(mnt)
    _wait(lambda: sup.health()[DIGEST]["status"] is not None, 5, "a status poll")
    assert sup.health()[DIGEST]["status"]["toc_digest"] == blob[1]

    with pytest.raises(SupervisorError):  # same layer, other place
        sup.acquire(DIGEST, str(blob[0]), _mnt(tmp_path, "other"), blob[1], RemoteOptions())

    sup.release(DIGEST)
    assert mount.is_mounted(mnt) and mount.is_alive(h1.pid)
    sup.release(DIGEST)
    assert not mount.is_mounted(mnt)
    _wait(lambda: _gone(h1.pid), 5, "the process to exit")
    assert DIGEST not in sup.health()
    with pytest.raises(SupervisorError):
        sup.release(DIGEST)


def test_failed_mount_is_a_supervisor_error(tmp_path, supervisors) -> None:
    sup = _sup(supervisors)
    bad = tmp_path / "not-a-blob"
    bad.write_bytes(b"garbage" * 100)
    with pytest.raises(SupervisorError):
        sup.acquire(DIGEST, str(bad), _mnt(tmp_path), None, RemoteOptions())
    assert DIGEST not in sup.health()


def test_killed_process_is_restarted_at_the_same_place(blob, tmp_path, supervisors) -> None:
    sup = _sup(supervisors)
    mnt = _mnt(tmp_path)
    old = sup.acquire(DIGEST, str(blob[0]), mnt, blob[1], RemoteOptions()).pid
    _check_bytes(mnt)
    os.kill(old, signal.SIGKILL)
    t0 = time.monotonic()
    _wait(lambda: sup.health()[DIGEST]["restarts"] == 1 and sup.health()[DIGEST]["state"] == "running", 10,
          "the restart")
    assert time.monotonic() - t0 < 10
    health = sup.health()[DIGEST]
    assert health["pid"] != old and mount.is_alive(health["pid"])
    assert "died" in health["last_error"]
    assert _gone(old)
    assert mount.is_mounted(mnt)
    _check_bytes(mnt)
    assert mount.status(mnt)["pid"] == health["pid"]
    sup.release(DIGEST)
    assert not mount.is_mounted(mnt)


def test_a_mount_that_keeps_dying_backs_off_and_is_reported(blob, tmp_path, supervisors) -> None:
    sup = _sup(supervisors, backoff_initial=0.3, backoff_max=1.2)
    mnt = _mnt(tmp_path)
    pid = sup.acquire(DIGEST, str(blob[0]), mnt, blob[1], RemoteOptions()).pid
    hidden = blob[0].with_name("hidden")
    blob[0].rename(hidden)  # every restart now fails
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(OSError):  # meanwhile: an error, never bytes
        (mnt / "etc/hosts").read_bytes()
    time.sleep(3.5)
    health = sup.health()[DIGEST]
    assert health["state"] == "restarting" and health["restarts"] == 0
    # 0, 0.3, 0.9, 2.1, 3.3: about 5 tries; a tight loop would make dozens
    assert 3 <= health["restart_attempts"] <= 6, health
    assert health["consecutive_failures"] == health["restart_attempts"]
    assert "cannot mount" in health["last_error"]
    assert 0 <= health["next_retry_in"] <= 1.2
    with pytest.raises(OSError):
        (mnt / "etc/hosts").read_bytes()

    hidden.rename(blob[0])  # fixed: the next try succeeds
    _wait(lambda: sup.health()[DIGEST]["state"] == "running", 5, "recovery")
    assert sup.health()[DIGEST]["restarts"] == 1
    _check_bytes(mnt)
    _wait(lambda: sup.health()[DIGEST]["consecutive_failures"] == 0, 5, "the backoff reset")
    sup.close(unmount_all=True)
    assert not mount.is_mounted(mnt)


def test_adopt_a_live_mount_without_remounting(blob, tmp_path, supervisors) -> None:
    first = _sup(supervisors)
    mnt = _mnt(tmp_path)
    pid = first.acquire(DIGEST, str(blob[0]), mnt, blob[1], RemoteOptions()).pid
    first.close()  # crfs goes away; the mount stays
    assert mount.is_mounted(mnt) and mount.is_alive(pid)

    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                _check_bytes(mnt)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    t = threading.Thread(target=reader)
    t.start()
    try:
        time.sleep(0.3)
        second = _sup(supervisors)
        handle = second.adopt(DIGEST, str(blob[0]), mnt, blob[1], RemoteOptions(), pid)
        assert handle.pid == pid
        time.sleep(0.5)  # a few watcher rounds
        health = second.health()[DIGEST]
        assert health["pid"] == pid and health["adopted"] and health["restarts"] == 0
        assert health["status"] is not None
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    second.release(DIGEST)
    assert not mount.is_mounted(mnt)
    _wait(lambda: not mount.is_alive(pid), 5, "the adopted process to exit")


def test_adopt_a_dead_mount_remounts(blob, tmp_path, supervisors) -> None:
    first = _sup(supervisors)
    mnt = _mnt(tmp_path)
    pid = first.acquire(DIGEST, str(blob[0]), mnt, blob[1], RemoteOptions()).pid
    first.close()
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: _gone(pid), 5, "the kill")
    assert mount.is_mounted(mnt)  # stale: ENOTCONN
    with pytest.raises(OSError):
        os.stat(mnt / "etc/hosts")

    second = _sup(supervisors)
    handle = second.adopt(DIGEST, str(blob[0]), mnt, blob[1], RemoteOptions(), pid)
    assert handle.pid != pid and mount.is_alive(handle.pid)
    health = second.health()[DIGEST]
    assert not health["adopted"] and health["restarts"] == 1
    _check_bytes(mnt)
    second.close(unmount_all=True)
    assert not mount.is_mounted(mnt)
    _wait(lambda: _gone(handle.pid), 5, "the process to exit")


def test_close_leaves_mounts_running_unless_unmount_all(blob, tmp_path, supervisors) -> None:
    sup = _sup(supervisors)
    mnts = [_mnt(tmp_path, f"m{i}") for i in range(2)]
    pids = [sup.acquire(f"sha256:{i:064x}", str(blob[0]), m, blob[1], RemoteOptions()).pid for i, m in enumerate(mnts)]
    sup.close()
    with pytest.raises(SupervisorError):
        sup.acquire(DIGEST, str(blob[0]), _mnt(tmp_path, "late"), blob[1], RemoteOptions())
    for m, pid in zip(mnts, pids):
        assert mount.is_mounted(m) and mount.is_alive(pid)
        _check_bytes(m)
    # clean up by adopting them into a new supervisor and closing it with unmount_all
    sup2 = _sup(supervisors)
    for i, (m, pid) in enumerate(zip(mnts, pids)):
        assert sup2.adopt(f"sha256:{i:064x}", str(blob[0]), m, blob[1], RemoteOptions(), pid).pid == pid
    sup2.close(unmount_all=True)
    for m, pid in zip(mnts, pids):
        assert not mount.is_mounted(m)
        _wait(lambda: not mount.is_alive(pid), 5, "the processes to exit")
    assert sup2.health() == {}


def test_concurrent_acquire_and_release_share_one_process(blob, tmp_path, supervisors) -> None:
    sup = _sup(supervisors)
    mnt = _mnt(tmp_path)
    pids: list[int] = []
    threads = [threading.Thread(target=lambda: pids.append(sup.acquire(DIGEST, str(blob[0]), mnt, blob[1]).pid))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(pids) == 8 and len(set(pids)) == 1
    assert _lazyfs_pids_under(tmp_path) == pids[:1]
    assert sup.health()[DIGEST]["refs"] == 8
    threads = [threading.Thread(target=sup.release, args=(DIGEST,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not mount.is_mounted(mnt) and DIGEST not in sup.health()
    _wait(lambda: _gone(pids[0]), 5, "the process to exit")
