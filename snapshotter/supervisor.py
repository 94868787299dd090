"""Supervisor of lazyfs layer mounts: one mount process per layer digest.

``MountSupervisor`` starts a lazyfs process per layer (``lazyfs.mount.start``),
shares it between users (reference counting by layer digest), watches every
mount from a background thread and restarts dead ones, and can adopt mounts
left running by a previous crfs process.

API::

    sup = MountSupervisor(poll_interval=1.0, backoff_initial=0.5, backoff_max=30.0)
    handle = sup.acquire(digest, source, mountpoint, toc_digest, remote)  # start or reuse, +1 ref
    sup.release(digest)        # -1 ref; at 0: unmount, stop the process
    sup.adopt(digest, source, mountpoint, toc_digest, remote, pid)  # take over after a crfs restart
    sup.discard(mountpoint)    # clear a mount nobody holds (left by a crash)
    sup.health()               # {digest: {pid, refs, restarts, last_error, status, ...}}
    sup.close(unmount_all=False)

Watching. Every ``poll_interval`` seconds the watcher checks each mount: the
recorded process is alive AND its control socket answers ``mount.status``
with that pid. A dead process is restarted at once. A live process whose
status does not answer is only declared dead after ``unresponsive_limit``
consecutive failed checks (a busy process must not be killed for one slow
answer, since that breaks every open file on it). A restart kills what is
left of the old process (only if /proc says it is a lazyfs mount process of
that mountpoint -- pids are reused), clears the stale FUSE mount
(``fusermount3 -u -z``, fallback ``umount -l``) and mounts again at the
*same* mountpoint. A failed restart is retried with exponential backoff
(``backoff_initial`` doubling up to ``backoff_max``), never in a tight loop;
``health()`` reports consecutive failures, the last error and the next retry.
A mount that has been healthy for one check resets the backoff.

What readers see while a layer process is restarted:

* Between the death of the process and the remount, the FUSE mount has no
  server: operations on it fail with ENOTCONN ("Transport endpoint is not
  connected"), EIO for some callers. They never return wrong or partial
  bytes: data only ever comes from a lazyfs process that verifies chunks
  against the TOC.
* After the remount, *new* lookups / opens through the mountpoint path (and
  through an overlay mounted on top of it, for paths it has not yet looked up)
  work again with the right bytes.
* Limitation: the remount is a *new* mount at the same place. File
  descriptors opened on the old mount, current working directories inside it,
  and dentries/inodes an overlay (fuse-overlayfs) already holds from the old
  mount keep pointing at the dead one and keep failing with ENOTCONN; the old
  mount was detached lazily and disappears once its last user is gone. A
  container that had files of the layer open may therefore need a restart.
  FUSE has no way to hand an existing connection to a new server process
  without keeping /dev/fuse fds alive across the restart (fd passing to a
  keeper process), which lazyfs does not do yet.

Thread safety: one lock guards the table of mounts and reference counts; a
per-mount lock serializes start / restart / stop of that mount, so slow
mounts of one layer do not block others, and the watcher skips a mount that
is busy. No module-level state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lazyfs import mount
from lazyfs.forkserver import ForkServer, process_name
from lazyfs.layer_source import RemoteOptions

log = logging.getLogger(__name__)


class SupervisorError(Exception):
    """A layer mount could not be started, adopted or stopped, or the
    supervisor was used wrongly (closed, unknown digest, mountpoint clash)."""


@dataclass(frozen=True)
class MountHandle:
    layer_digest: str
    mountpoint: str
    pid: int  # the process serving it when the handle was made (may change on restart)


@dataclass
class _Mount:
    digest: str
    source: str
    mountpoint: str
    toc_digest: str | None
    remote: RemoteOptions
    refs: int = 0
    pid: int | None = None
    state: str = "starting"  # starting, running, restarting, stopping, stopped
    closing: bool = False
    adopted: bool = False
    restarts: int = 0  # successful remounts after the first mount
    failures: int = 0  # consecutive failed (re)start attempts
    attempts: int = 0  # all restart attempts, successful or not
    unresponsive: int = 0  # consecutive checks where the process lived but status did not answer
    last_error: str | None = None
    last_error_at: float | None = None
    next_attempt: float = 0.0  # monotonic
    last_status: dict[str, Any] | None = None
    last_check: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class MountSupervisor:
    def __init__(
        self, *, poll_interval: float = 1.0, backoff_initial: float = 0.5, backoff_max: float = 30.0,
        unresponsive_limit: int = 3, status_timeout: float = 2.0, start_timeout: float = mount.START_TIMEOUT,
        watch: bool = True, fork_server: ForkServer | None = None,
    ) -> None:
        """``fork_server``: mount processes are forked from it (imports done)
        rather than started as new interpreters, while it answers."""
        self.poll_interval = poll_interval
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.unresponsive_limit = unresponsive_limit
        self.status_timeout = status_timeout
        self.start_timeout = start_timeout
        self._fork_server = fork_server
        # called (in the watcher thread, must not block) with a layer's
        # digest after its process was started again
        self.on_restart: Callable[[str], None] | None = None
        self._lock = threading.Lock()
        self._mounts: dict[str, _Mount] = {}
        self._closed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if watch:
            self._thread = threading.Thread(target=self._watch, name="crfs-mount-supervisor", daemon=True)
            self._thread.start()

    # --- public API ----------------------------------------------------------

    def acquire(
        self, layer_digest: str, source: str, mountpoint: str | os.PathLike[str], toc_digest: str | None = None,
        remote: RemoteOptions = RemoteOptions(),
    ) -> MountHandle:
        """Mount ``layer_digest`` (or reuse its mount): +1 reference."""
        m = self._take_ref(layer_digest, source, mountpoint, toc_digest, remote)
        with m.lock:
            if m.pid is None and m.state == "starting":
                try:
                    self._clear_mount(m.mountpoint)
                    m.pid = self._start(m)
                    m.state = "running"
                except SupervisorError:
                    self._drop_ref(m, locked=True)
                    raise
            return MountHandle(layer_digest, m.mountpoint, m.pid or 0)

    def adopt(
        self, layer_digest: str, source: str, mountpoint: str | os.PathLike[str], toc_digest: str | None,
        remote: RemoteOptions, pid: int | None,
    ) -> MountHandle:
        """Take over a mount recorded by a previous crfs (+1 reference): kept
        as is if ``pid`` is alive, is a lazyfs process of this mountpoint and
        answers status (``pid`` None: the process answering at the mountpoint,
        since a restart by the previous crfs may have changed it); otherwise
        the mountpoint is cleared and mounted again (counted as a restart)."""
        m = self._take_ref(layer_digest, source, mountpoint, toc_digest, remote)
        with m.lock:
            if m.pid is not None or m.state != "starting":
                return MountHandle(layer_digest, m.mountpoint, m.pid or 0)  # already ours
            if not pid:  # not recorded: whoever answers at the mountpoint
                pid = self._serving_pid(m.mountpoint, self.status_timeout)
            if pid and self._healthy(m.mountpoint, pid):
                m.pid, m.adopted, m.state = pid, True, "running"
                log.info("adopted %s at %s (pid %d)", layer_digest, m.mountpoint, pid)
                return MountHandle(layer_digest, m.mountpoint, pid)
            m.last_error = f"recorded process {pid} is gone or does not answer"
            m.last_error_at = time.time()
            try:
                self._kill_leftover(m.mountpoint, pid)
                self._clear_mount(m.mountpoint)
                m.pid = self._start(m)
            except SupervisorError:
                self._drop_ref(m, locked=True)
                raise
            m.state, m.restarts, m.attempts = "running", m.restarts + 1, m.attempts + 1
            return MountHandle(layer_digest, m.mountpoint, m.pid)

    def holds(self, layer_digest: str) -> bool:
        """Whether ``layer_digest`` is acquired (or being started)."""
        with self._lock:
            m = self._mounts.get(layer_digest)
            return m is not None and not m.closing

    def running(self, layer_digest: str) -> bool:
        """Whether ``layer_digest``'s mount process has mounted it and runs."""
        with self._lock:
            m = self._mounts.get(layer_digest)
            return m is not None and not m.closing and m.state == "running"

    def pin_toc_digest(self, layer_digest: str, toc_digest: str) -> None:
        """Record the TOC digest a layer mounted without one turned out to
        have (checked by the caller), so that restarts verify it too."""
        with self._lock:
            m = self._mounts.get(layer_digest)
            if m is not None and m.toc_digest is None:
                m.toc_digest = toc_digest

    def discard(self, mountpoint: str | os.PathLike[str]) -> None:
        """Unmount a layer mount nobody holds (left by a crash) and end its
        process; the mountpoint must not be one this supervisor serves."""
        real = os.path.realpath(mountpoint)
        with self._lock:
            if any(m.mountpoint == real and not m.closing for m in self._mounts.values()):
                raise SupervisorError(f"{real} is in use")
        self._take_down(real, self._serving_pid(real, 1.0))

    def release(self, layer_digest: str) -> None:
        """-1 reference; the last one unmounts the layer and stops its process."""
        with self._lock:
            m = self._mounts.get(layer_digest)
            if m is None or m.closing or m.refs <= 0:
                raise SupervisorError(f"layer {layer_digest} is not acquired")
        self._drop_ref(m)

    def health(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            mounts = list(self._mounts.values())
        return {
            m.digest: {
                "mountpoint": m.mountpoint,
                "source": m.source,
                "pid": m.pid,
                "refs": m.refs,
                "state": m.state,
                "alive": bool(m.pid and mount.is_alive(m.pid)),
                "adopted": m.adopted,
                "restarts": m.restarts,
                "restart_attempts": m.attempts,
                "consecutive_failures": m.failures,
                "last_error": m.last_error,
                "last_error_at": m.last_error_at,
                "next_retry_in": max(0.0, m.next_attempt - now) if m.state == "restarting" else None,
                "status": m.last_status,
            }
            for m in mounts
        }

    def close(self, unmount_all: bool = False) -> None:
        """Stop the watcher; mounts keep running unless ``unmount_all``."""
        with self._lock:
            self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if unmount_all:
            with self._lock:
                mounts = list(self._mounts.values())
                for m in mounts:
                    m.closing = True
            errors = []
            for m in mounts:
                with m.lock:
                    try:
                        self._stop_mount(m)
                    except SupervisorError as exc:
                        errors.append(str(exc))
                with self._lock:
                    if self._mounts.get(m.digest) is m:
                        del self._mounts[m.digest]
            if errors:
                raise SupervisorError("; ".join(errors))

    def __enter__(self) -> MountSupervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- references -----------------------------------------------------------

    def _take_ref(self, digest, source, mountpoint, toc_digest, remote) -> _Mount:
        real = os.path.realpath(mountpoint)
        while True:
            with self._lock:
                if self._closed:
                    raise SupervisorError("supervisor is closed")
                m = self._mounts.get(digest)
                if m is None:
                    for other in self._mounts.values():
                        if other.mountpoint == real and not other.closing:
                            raise SupervisorError(f"{real} already serves layer {other.digest}")
                    m = _Mount(digest, source, real, toc_digest, remote, refs=1)
                    self._mounts[digest] = m
                    return m
                if not m.closing:
                    if m.mountpoint != real:
                        raise SupervisorError(f"layer {digest} is mounted at {m.mountpoint}, not {real}")
                    m.refs += 1
                    return m
            with m.lock:  # being stopped: wait for that, then start afresh
                pass
            with self._lock:
                if self._mounts.get(digest) is m:
                    del self._mounts[digest]

    def _drop_ref(self, m: _Mount, *, locked: bool = False) -> None:
        """-1 reference; at 0 stop the mount (``locked``: caller holds ``m.lock``)."""
        with self._lock:
            m.refs -= 1
            if m.refs > 0:
                return
            m.closing = True
        try:
            with contextlib.nullcontext() if locked else m.lock:
                self._stop_mount(m)
        finally:
            with self._lock:
                if self._mounts.get(m.digest) is m:
                    del self._mounts[m.digest]

    # --- processes and mounts ------------------------------------------------------

    def _start(self, m: _Mount) -> int:
        try:
            pid = mount.start(m.source, m.mountpoint, toc_digest=m.toc_digest, remote=m.remote, timeout=self.start_timeout,
                              fork_server=self._fork_server)
        except (mount.MountError, OSError) as exc:
            m.last_error, m.last_error_at = f"mount failed: {exc}", time.time()
            raise SupervisorError(f"cannot mount layer {m.digest} at {m.mountpoint}: {exc}") from exc
        log.info("mounted %s at %s (pid %d)", m.digest, m.mountpoint, pid)
        if m.remote.prefetch_ranges or m.remote.prefetch_manifest:
            # the prefetch hint is for the first mount only: a restart would
            # fetch those bytes again blind (before its TOC tells what the
            # cache has); the landmark prefetch finds them in the cache instead
            m.remote = dataclasses.replace(m.remote, prefetch_ranges=None, prefetch_manifest=None)
        return pid

    def _stop_mount(self, m: _Mount) -> None:
        """Unmount and end the process; called with ``m.lock`` held."""
        m.state = "stopping"
        pid, m.pid = m.pid, None
        try:
            self._take_down(m.mountpoint, pid)
        finally:
            m.state = "stopped"
        if mount.is_mounted(m.mountpoint):
            raise SupervisorError(f"{m.mountpoint} is still mounted")

    def _take_down(self, mountpoint: str, pid: int | None) -> None:
        """Unmount, end what is left of the process, clear a stale mount."""
        with contextlib.suppress(mount.MountError):
            mount.unmount(mountpoint, timeout=5.0)
        self._kill_leftover(mountpoint, pid)
        self._clear_mount(mountpoint)

    @staticmethod
    def _serving_pid(mountpoint: str, timeout: float) -> int | None:
        """The pid the status socket of ``mountpoint`` names, if one answers."""
        with contextlib.suppress(mount.MountError, ValueError, AttributeError, TypeError):
            return int(mount.status(mountpoint, timeout=timeout).get("pid") or 0) or None
        return None

    @staticmethod
    def _is_lazyfs(pid: int, mountpoint: str) -> bool:
        """Whether ``pid`` is a lazyfs mount process serving ``mountpoint``
        (pids get reused: never signal a process on the pid alone): its
        command line names the mountpoint, or, forked from the fork server
        (whose command line it keeps), its name is the mountpoint's."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            if b"lazyfs.mount" not in args:
                return False
            if os.fsencode(mountpoint) in args:
                return True
            with open(f"/proc/{pid}/comm", "rb") as f:
                return f.read().strip() == process_name(mountpoint).encode()
        except OSError:
            return False

    def _healthy(self, mountpoint: str, pid: int) -> bool:
        if not (mount.is_alive(pid) and self._is_lazyfs(pid, mountpoint)):
            return False
        with contextlib.suppress(mount.MountError, ValueError):
            return mount.status(mountpoint, timeout=self.status_timeout).get("pid") == pid
        return False

    def _kill_leftover(self, mountpoint: str, pid: int | None) -> None:
        if not pid:
            return
        for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            if not self._is_lazyfs(pid, mountpoint) or not mount.is_alive(pid):
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and mount.is_alive(pid):
                self._reap(pid)
                time.sleep(0.02)
        self._reap(pid)

    @staticmethod
    def _reap(pid: int) -> None:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)

    @staticmethod
    def _clear_mount(mountpoint: str) -> None:
        """Detach whatever (typically a dead FUSE mount) sits at ``mountpoint``."""
        if not mount.is_mounted(mountpoint):
            return
        fuser = subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, text=True)
        if mount.is_mounted(mountpoint):
            lazy = subprocess.run(["umount", "-l", mountpoint], capture_output=True, text=True)
            if mount.is_mounted(mountpoint):
                raise SupervisorError(
                    f"cannot clear stale mount {mountpoint}: {fuser.stderr.strip()} / {lazy.stderr.strip()}")

    # --- the watcher ------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_interval):
            with self._lock:
                mounts = [m for m in self._mounts.values() if not m.closing]
            for m in mounts:
                if self._stop.is_set():
                    return
                if not m.lock.acquire(blocking=False):
                    continue  # being started / stopped by someone else
                try:
                    if not m.closing and m.state in ("running", "restarting"):
                        self._check(m)
                except Exception:  # noqa: BLE001 - the watcher must survive anything
                    log.exception("checking %s failed", m.digest)
                finally:
                    m.lock.release()

    def _check(self, m: _Mount) -> None:
        """One health check of ``m`` (``m.lock`` held); restarts it if dead."""
        now = time.monotonic()
        m.last_check = time.time()
        if m.state == "running" and m.pid:
            alive = mount.is_alive(m.pid) and self._is_lazyfs(m.pid, m.mountpoint)
            if alive:
                try:
                    st = mount.status(m.mountpoint, timeout=self.status_timeout)
                    if st.get("pid") != m.pid:
                        raise mount.MountError(f"status answered by pid {st.get('pid')}, expected {m.pid}")
                except (mount.MountError, ValueError) as exc:
                    m.unresponsive += 1
                    m.last_error, m.last_error_at = f"status: {exc}", time.time()
                    if m.unresponsive < self.unresponsive_limit:
                        return
                else:
                    m.last_status, m.unresponsive, m.failures = st, 0, 0
                    return
            else:
                self._reap(m.pid)
                m.last_error, m.last_error_at = f"process {m.pid} died", time.time()
            log.warning("layer %s at %s: %s; restarting", m.digest, m.mountpoint, m.last_error)
            m.state, m.next_attempt = "restarting", now
        if m.state != "restarting" or now < m.next_attempt:
            return
        m.attempts += 1
        try:
            self._kill_leftover(m.mountpoint, m.pid)
            m.pid = None
            self._clear_mount(m.mountpoint)
            m.pid = self._start(m)
        except SupervisorError as exc:
            m.failures += 1
            delay = min(self.backoff_max, self.backoff_initial * 2 ** (m.failures - 1))
            m.next_attempt = time.monotonic() + delay
            m.last_error, m.last_error_at = str(exc), time.time()
            log.warning("restarting %s failed (%d in a row), next try in %.1fs: %s", m.digest, m.failures, delay, exc)
            return
        m.state, m.restarts, m.unresponsive, m.adopted = "running", m.restarts + 1, 0, False
        log.info("restarted %s at %s (pid %d)", m.digest, m.mountpoint, m.pid)
        if self.on_restart is not None:
            self.on_restart(m.digest)
