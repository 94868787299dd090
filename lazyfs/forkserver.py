"""A parent for layer mount processes that has imported everything they need.

A new mount process spends ~0.15 s starting Python and importing trio,
pyfuse3, the registry client and the format modules before its first
request; when an image's layers mount at once on a busy two-core machine,
more. That is on a lazy pull's critical path. ``crfs serve`` therefore keeps
one process (``python -m lazyfs.mount --fork-server SOCKET``) that has done
those imports and forks a mount process from it on request: the child runs
``lazyfs.mount.main`` at once, in its own session, and outlives the server
like any mount process.

Protocol, one request per connection on a unix socket (0600): the client
sends the mount's arguments as JSON with two descriptors attached (the write
end of the "ready" pipe, the log file), the server answers ``{"pid": N}``.
A forked process cannot change its command line, so the supervisor knows it
by its name (``process_name``, set with ``PR_SET_NAME``) instead.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_NAME = 15
_PR_SET_PDEATHSIG = 1
MAX_MESSAGE = 256 << 10


class ForkServerError(Exception):
    """The fork server is not there or did not answer; start the process directly."""


def process_name(mountpoint: str | os.PathLike[str]) -> str:
    """The name (``/proc/PID/comm``, 15 bytes at most) of a forked mount
    process serving ``mountpoint``."""
    return "lzfs-" + hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:10]


def _prctl(option: int, arg: int | bytes) -> None:
    with contextlib.suppress(Exception):
        import ctypes  # noqa: PLC0415 - trio has loaded it already

        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)


class ForkServer:
    """The server process, as ``crfs serve`` starts and stops it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        from . import mount  # noqa: PLC0415

        log_path = self.path.with_suffix(".log")
        with open(log_path, "ab") as log_file:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "lazyfs.mount", "--fork-server", str(self.path)],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=mount.child_env(),
            )
        deadline = time.monotonic() + timeout
        while not self.path.exists():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ForkServerError(f"the fork server did not start (see {log_path})")
            time.sleep(0.01)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        log_path = self.path.with_suffix(".log")
        with contextlib.suppress(OSError):
            if log_path.stat().st_size == 0:
                log_path.unlink()  # kept only when it has something to say

    def fork(self, args: list[str], ready_fd: int, log_fd: int, timeout: float = 10.0) -> int:
        """A mount process running ``lazyfs.mount.main(args + ["--ready-fd", FD])``; its pid."""
        if self._proc is None or self._proc.poll() is not None:
            raise ForkServerError("the fork server is not running")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(str(self.path))
                socket.send_fds(sock, [json.dumps({"args": args}).encode()], [ready_fd, log_fd])
                sock.shutdown(socket.SHUT_WR)
                answer = b""
                while chunk := sock.recv(4096):
                    answer += chunk
            return int(json.loads(answer)["pid"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ForkServerError(f"the fork server did not answer: {exc}") from None


# --- the server process ----------------------------------------------------------


def serve_forever(path: str) -> int:
    """The ``--fork-server`` mode of ``python -m lazyfs.mount``."""
    # crfs serve starts us with these blocked (it takes them with sigwait)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # gone with crfs serve; its children stay
    if os.getppid() == 1:
        return 0  # the parent was gone before PDEATHSIG was set
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reaped by the kernel
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # what a mount process imports before and while it opens a layer
    from . import cache, fetcher, mount, prefetch, prefetch_hints, remote_layer, remote_source, serve  # noqa: F401, PLC0415
    from .registry import client  # noqa: F401, PLC0415

    # every page resident here is resident (shared) in each child too: hand
    # the heap that importing freed back to the system, and keep the garbage
    # collector off the imported objects (it would copy their pages)
    gc.collect()
    gc.freeze()
    serve.trim_heap()  # glibc malloc_trim, as a mount does after parsing its TOC

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        tmp = f"{path}.{os.getpid()}"
        listener.bind(tmp)
        os.chmod(tmp, 0o600)
        listener.listen(16)
        os.replace(tmp, path)  # the client waits for the path: it appears ready
        while True:
            conn, _ = listener.accept()
            with conn:
                try:
                    _one(listener, conn)
                except Exception:  # noqa: BLE001 - one bad request never ends the server
                    traceback.print_exc()


def _one(listener: socket.socket, conn: socket.socket) -> None:
    conn.settimeout(10.0)
    message, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 2)
    try:
        if len(fds) != 2:
            raise ValueError(f"want 2 descriptors, got {len(fds)}")
        args = json.loads(message)["args"]
        if not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
            raise ValueError("args must be a list of strings")
        ready_fd, log_fd = fds
        pid = os.fork()
        if pid == 0:  # the mount process: never returns
            _child(listener, conn, args, ready_fd, log_fd)
    finally:
        for fd in fds:
            os.close(fd)
    conn.sendall(json.dumps({"pid": pid}).encode())


def _child(listener: socket.socket, conn: socket.socket, args: list[str], ready_fd: int, log_fd: int) -> None:
    code = 1
    try:
        listener.close()
        conn.close()
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(devnull)
        from . import mount  # noqa: PLC0415

        argv = [*args, "--ready-fd", str(ready_fd)]
        mountpoint = argv[argv.index("--mountpoint") + 1]
        _prctl(_PR_SET_NAME, process_name(mountpoint).encode())
        code = mount.main(argv)
    except BaseException:  # noqa: BLE001 - reported in the mount's log
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
