"""``crfs serve`` as a managed daemon, for tests that go through containerd
and for benchmarks that talk to the gRPC service directly."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .mounts import unmount_all
from .proc import Daemon, HarnessError, Managed, require_binary, unix_socket_accepts


class CrfsServer(Managed):
    """``with CrfsServer(root, sock) as srv:`` serves until the block ends.

    ``root`` and ``address`` belong to the caller and are kept on exit, so a
    test can inspect the store afterwards or restart on the same root;
    FUSE mounts the server left below ``root`` are undone. ``kill()`` and
    ``start()`` allow crash-and-restart tests within one block.
    """

    def __init__(
        self,
        root: Path,
        address: Path,
        extra_args: Sequence[str] = (),
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        log: Optional[Path] = None,
        env: Optional[Mapping[str, str]] = None,
    ):
        self.root = Path(root)
        self.address = Path(address)
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.log = log or self.address.with_name(self.address.name + ".log")
        self.env = env
        self.daemon: Optional[Daemon] = None

    def start(self) -> None:
        """Start ``crfs serve`` and wait until its socket accepts connections."""
        if self.daemon is not None and self.daemon.alive():
            raise HarnessError("crfs already running")
        binary = require_binary("crfs")
        self.root.mkdir(parents=True, exist_ok=True)
        self.address.parent.mkdir(parents=True, exist_ok=True)
        argv = [binary, "serve", "--root", str(self.root), "--address", str(self.address), *self.extra_args]
        self.daemon = Daemon("crfs", argv, self.log, env=self.env)
        self.daemon.start()
        self.daemon.wait_until(lambda: unix_socket_accepts(self.address), "accepting on its socket", self.start_timeout)

    def stop(self) -> Optional[int]:
        """SIGTERM, SIGKILL after ``stop_timeout``; returns the exit status."""
        if self.daemon is None:
            return None
        return self.daemon.stop(self.stop_timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would; the socket file may be left behind."""
        if self.daemon is not None:
            self.daemon.kill()

    def terminate(self) -> None:
        """Send SIGTERM without waiting (to test graceful shutdown)."""
        if self.daemon is not None:
            self.daemon.signal(signal.SIGTERM)

    def alive(self) -> bool:
        return self.daemon is not None and self.daemon.alive()

    def stderr_tail(self, limit: int = 4000) -> str:
        return self.daemon.stderr_tail(limit) if self.daemon else ""

    def fail(self, message: str) -> HarnessError:
        """A HarnessError carrying crfs's log tail."""
        if self.daemon is None:
            return HarnessError(f"crfs: {message} (never started)")
        return self.daemon.fail(message)

    def stop_layer_mounts(self) -> None:
        """Unmount every lazily mounted layer under ROOT/layers and wait for
        its process to end: they outlive ``crfs serve`` by design."""
        from lazyfs import mount  # noqa: PLC0415

        layers = self.root / "layers"
        for name in sorted(os.listdir(layers)) if layers.is_dir() else []:
            with contextlib.suppress(mount.MountError):
                mount.unmount(layers / name, timeout=5.0)

    def _start(self) -> None:
        self.start()

    def _stop(self) -> None:
        self.stop()
        self.stop_layer_mounts()
        unmount_all(self.root)
