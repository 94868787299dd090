"""The lazily mounted layers under ``ROOT/layers``: one directory and one
lazyfs process per layer digest, shared by every remote snapshot on it.

Ownership lives in the store (a remote snapshot names its layer); the mount
processes are the supervisor's. This module keeps the two in step: it
mounts a layer for a new remote snapshot (in bounded time, so that a slow
or unreachable registry only makes containerd fall back to downloading),
lets go of it with the last snapshot, takes over the mounts a previous crfs
left running, and clears mounts nobody owns (left by a crash).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Iterable

from lazyfs import mount
from lazyfs.layer_source import RemoteOptions

from .store import RemoteLayer
from .supervisor import MountSupervisor, SupervisorError

log = logging.getLogger(__name__)


class LayerUnavailable(Exception):
    """The layer cannot be mounted lazily (not eStargz, registry unreachable
    or too slow, TOC digest mismatch); the message says which."""


class LayerMounts:
    def __init__(self, root: Path, supervisor: MountSupervisor, remote: RemoteOptions) -> None:
        self.root = root
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._supervisor = supervisor
        self._remote = remote
        # layers of stored snapshots that could not be mounted again at start
        self._pending: dict[str, tuple[RemoteLayer, int]] = {}
        self._pending_lock = threading.Lock()

    def mountpoint(self, digest: str) -> Path:
        return self.root / digest.replace(":", "-")

    def acquire(self, layer: RemoteLayer) -> Path:
        """Mount ``layer`` (or share its mount): +1 reference."""
        mountpoint = self.mountpoint(layer.digest)
        mountpoint.mkdir(mode=0o755, exist_ok=True)
        try:
            self._supervisor.acquire(layer.digest, layer.source, mountpoint, layer.toc_digest or None, self._remote)
        except SupervisorError as exc:
            self._remove_dir(layer.digest)
            raise LayerUnavailable(str(exc)) from None
        return mountpoint

    def release(self, digest: str) -> None:
        """-1 reference; the last one unmounts the layer and removes its dir."""
        with self._pending_lock:
            if digest in self._pending:
                layer, users = self._pending.pop(digest)
                if users > 1:
                    self._pending[digest] = (layer, users - 1)
                else:
                    self._remove_dir(digest)
                return
        try:
            self._supervisor.release(digest)
        except SupervisorError as exc:
            log.warning("releasing layer %s: %s", digest, exc)
        if not self._supervisor.holds(digest):
            self._remove_dir(digest)

    def adopt(self, layers: Iterable[tuple[RemoteLayer, int]]) -> None:
        """Take over the mounts of the store's remote snapshots after a
        restart: live ones are kept, dead ones mounted again. A layer that
        cannot be mounted now stays pending: ``ensure`` retries it."""
        for layer, users in layers:
            with self._pending_lock:
                self._pending[layer.digest] = (layer, users)
            try:
                self._adopt(layer.digest)
            except LayerUnavailable as exc:
                log.error("%s; snapshots on it are unavailable until it mounts", exc)

    def ensure(self, digests: Iterable[str]) -> None:
        """Raises LayerUnavailable unless every layer is mounted: a snapshot
        must never be handed out over an empty mountpoint."""
        for digest in digests:
            self._adopt(digest)
            if not mount.is_mounted(self.mountpoint(digest)):
                raise LayerUnavailable(f"layer {digest} is not mounted right now (its process is being restarted)")

    def _adopt(self, digest: str) -> None:
        """Mounts a pending layer (no-op for others)."""
        with self._pending_lock:
            if digest not in self._pending:
                return
            layer, users = self._pending[digest]
            mountpoint = self.mountpoint(digest)
            mountpoint.mkdir(mode=0o755, exist_ok=True)
            try:
                for _ in range(users):
                    self._supervisor.adopt(digest, layer.source, mountpoint, layer.toc_digest or None, self._remote, None)
            except SupervisorError as exc:
                raise LayerUnavailable(f"layer {digest} cannot be mounted again: {exc}") from None
            del self._pending[digest]

    def sweep(self) -> list[str]:
        """Unmounts and removes every layer dir nobody holds; their digests."""
        swept = []
        for name in sorted(os.listdir(self.root)):
            digest = name.replace("-", ":", 1)
            with self._pending_lock:
                if self._supervisor.holds(digest) or digest in self._pending:
                    continue
            try:
                self._supervisor.discard(self.root / name)
            except SupervisorError as exc:
                log.warning("cannot clear layer mount %s: %s", name, exc)
                continue
            self._remove_dir(digest)
            swept.append(digest)
        return swept

    def health(self) -> dict[str, dict]:
        return self._supervisor.health()

    def _remove_dir(self, digest: str) -> None:
        try:
            self.mountpoint(digest).rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", self.mountpoint(digest), exc)
