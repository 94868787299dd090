"""Process plumbing shared by the harness: a daemon that is always stopped,
bounded waits whose errors carry the daemon's stderr tail, and one-shot
commands whose failures say what ran and what it printed.

Nothing here imports pytest, so bench/ and scripts can use it too.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Self, Sequence

TAIL_BYTES = 4000


class HarnessError(RuntimeError):
    """A harness step failed; the message says which and why."""


def require_binary(name: str) -> str:
    """Absolute path of ``name`` on PATH; a missing tool is a failure, never a skip."""
    path = shutil.which(name)
    if path is None:
        raise HarnessError(f"required binary {name!r} not found on PATH")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unix_socket_accepts(path: Path) -> bool:
    """Whether something listens on the unix socket ``path``."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def tail(path: Path, limit: int = TAIL_BYTES) -> str:
    """The last ``limit`` bytes of a log file, decoded leniently."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def run(
    argv: Sequence[str],
    *,
    timeout: float = 120.0,
    check: bool = True,
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[Path] = None,
) -> subprocess.CompletedProcess:
    """Run a command to completion with captured text output.

    On timeout or (with ``check``) a non-zero exit, raise HarnessError with
    the command line and the tail of both streams, so a test failure shows
    the tool's own complaint instead of a bare exit status.
    """
    full_env = None if env is None else {**os.environ, **env}
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd
        )
    except subprocess.TimeoutExpired as e:
        raise HarnessError(
            f"timed out after {timeout:.0f}s: {' '.join(argv)}\n"
            f"stdout: {_text(e.stdout)[-TAIL_BYTES:]}\nstderr: {_text(e.stderr)[-TAIL_BYTES:]}"
        ) from None
    return checked(argv, proc) if check else proc


def checked(argv: Sequence[str], proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``proc``, or HarnessError (command line, both streams' tails) if it failed."""
    if proc.returncode != 0:
        raise HarnessError(
            f"exit {proc.returncode}: {' '.join(argv)}\n"
            f"stdout: {proc.stdout[-TAIL_BYTES:]}\nstderr: {proc.stderr[-TAIL_BYTES:]}"
        )
    return proc


def _text(data: object) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


class Managed:
    """A context manager whose ``stop`` also runs when ``start`` fails
    halfway, so a daemon that started but never became ready is not left
    behind. Subclasses write ``_start`` and a ``_stop`` that tolerates a
    partial start."""

    def _start(self) -> None:
        raise NotImplementedError

    def _stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()


class Daemon:
    """A long-running child whose stdout+stderr go to ``log``.

    The child gets its own process group so that stopping it also reaches
    helpers it forked and did not reap.
    """

    def __init__(self, name: str, argv: Sequence[str], log: Path, env: Optional[Mapping[str, str]] = None):
        self.name = name
        self.argv = list(argv)
        self.log = log
        self._env = None if env is None else {**os.environ, **env}
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and not self._exited_unreaped(0)

    def stderr_tail(self, limit: int = TAIL_BYTES) -> str:
        return tail(self.log, limit)

    def fail(self, message: str) -> HarnessError:
        """An error naming this daemon, its exit status and its log tail."""
        status = self._status_text()
        return HarnessError(
            f"{self.name}: {message} ({status})\ncommand: {' '.join(self.argv)}\n"
            f"--- {self.log} (tail) ---\n{self.stderr_tail()}"
        )

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        """Poll ``ready`` until true; fail early if the daemon dies, or at ``timeout``."""
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            if ready():
                return
            if not self.alive():
                raise self.fail(f"died while waiting for {what}")
            if time.monotonic() > deadline:
                raise self.fail(f"not {what} after {timeout:.0f}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.25)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the daemon's process group (it may be gone already)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status.

        The leader stays an unreaped zombie until its group has been sent
        SIGKILL, so the group id cannot have been reused by then.
        """
        if self.proc is None or self.proc.returncode is not None:
            return None if self.proc is None else self.proc.returncode
        self.signal(signal.SIGTERM)
        if not self._exited_unreaped(timeout):
            self.signal(signal.SIGKILL)
            self._exited_unreaped(10.0)
        self.signal(signal.SIGKILL)  # stragglers the leader left in its group
        return self.proc.wait(10)

    def kill(self) -> None:
        """SIGKILL the whole group and reap the leader (crash tests)."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def _peek(self) -> Optional[os.waitid_result]:
        """The leader's exit info without reaping it; None while it runs."""
        assert self.proc is not None
        try:
            return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped already
            return None

    def _exited_unreaped(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._peek() is None:
            if self.proc.returncode is not None:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _status_text(self) -> str:
        if self.proc is None:
            return "not started"
        if self.proc.returncode is not None:
            return f"exit status {self.proc.returncode}"
        info = self._peek()
        if info is None:
            return "running"
        if info.si_code == os.CLD_EXITED:
            return f"exited with {info.si_status}"
        return f"killed by signal {info.si_status}"
