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

import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Iterable, Sequence

from lazyfs import mount
from lazyfs.layer_source import RemoteOptions

from .image_start import ImageStart, fetch_image_start
from .store import RemoteLayer
from .supervisor import MountSupervisor, SupervisorError

log = logging.getLogger(__name__)
MAX_IMAGE_STARTS = 32


class LayerUnavailable(Exception):
    """The layer cannot be mounted lazily (not eStargz, registry unreachable
    or too slow, TOC digest mismatch); the message says which."""


class LayerMounts:
    def __init__(
        self, root: Path, supervisor: MountSupervisor, remote: RemoteOptions, *,
        premount_parallel: int = 4, premount_hold: float = 60.0, premount_wait: float = 30.0,
    ) -> None:
        self.root = root
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._supervisor = supervisor
        self._remote = remote
        # layers of stored snapshots that could not be mounted again at start
        self._pending: dict[str, tuple[RemoteLayer, int]] = {}
        self._pending_lock = threading.Lock()
        # layers mounted ahead of their Prepare (premount): set when mounted
        self._premounts: dict[str, threading.Event] = {}
        self._premount_lock = threading.Lock()
        self._premount_timers: dict[str, threading.Timer] = {}
        self._premount_slots = threading.BoundedSemaphore(premount_parallel)
        self._premount_hold = premount_hold
        self._premount_wait = premount_wait
        self._starts: dict[str, Future[ImageStart]] = {}  # manifest digest -> its start, a few recent ones
        # layer digest -> the layers it was introduced to (told again after a restart)
        self._peers: dict[str, set[str]] = {}
        self._peers_lock = threading.Lock()
        supervisor.on_restart = self._restarted
        self._starts_lock = threading.Lock()

    def mountpoint(self, digest: str) -> Path:
        return self.root / digest.replace(":", "-")

    def acquire(self, layer: RemoteLayer) -> Path:
        """Mount ``layer`` (or share its mount): +1 reference. A mount started
        early by ``premount`` is used once its TOC is the one asked for."""
        with self._premount_lock:
            early = self._premounts.get(layer.digest)
        if early is not None:
            early.wait(self._premount_wait)
        mountpoint = self._mount(layer)
        if early is not None:
            if layer.toc_digest:
                self._check_toc(layer, mountpoint)
            self._claim_premount(layer.digest)
        return mountpoint

    def _mount(self, layer: RemoteLayer) -> Path:
        mountpoint = self.mountpoint(layer.digest)
        mountpoint.mkdir(mode=0o755, exist_ok=True)
        remote = self._remote
        if hint := getattr(layer, "prefetch_ranges", ""):  # remote.HintedLayer: a label named bytes to prefetch
            remote = dataclasses.replace(remote, prefetch_ranges=hint)
        elif manifest := getattr(layer, "prefetch_manifest", ""):  # premounted: the hint is in the manifest
            remote = dataclasses.replace(remote, prefetch_manifest=manifest)
        try:
            self._supervisor.acquire(layer.digest, layer.source, mountpoint, layer.toc_digest or None, remote)
        except SupervisorError as exc:
            self._remove_dir(layer.digest)
            raise LayerUnavailable(str(exc)) from None
        return mountpoint

    def _check_toc(self, layer: RemoteLayer, mountpoint: Path) -> None:
        """A premounted layer was opened without its TOC digest: it serves
        this layer only if its TOC is the one the manifest names."""
        try:
            status = mount.status(mountpoint, timeout=5.0)
            served = status.get("toc_digest") if status.get("toc_verifiable") else "one without chunk digests"
        except (mount.MountError, ValueError) as exc:
            served = f"unknown ({exc})"
        if served != layer.toc_digest:
            self.release(layer.digest)
            raise LayerUnavailable(f"layer {layer.digest}: TOC digest {served}, the image says {layer.toc_digest}")
        self._supervisor.pin_toc_digest(layer.digest, layer.toc_digest)

    def premount(self, layers: Iterable[RemoteLayer]) -> None:
        """Start mounting an image's next layers now, in parallel, so that
        their own Prepare finds them ready (containerd prepares layers one by
        one). Each early mount holds a reference for ``premount_hold``
        seconds; a layer nobody claims by then is unmounted again."""
        for layer in layers:
            with self._premount_lock:
                if layer.digest in self._premounts or self._supervisor.holds(layer.digest):
                    continue
                done = self._premounts[layer.digest] = threading.Event()
            threading.Thread(target=self._premount, args=(layer, done), name="crfs-premount", daemon=True).start()

    def _premount(self, layer: RemoteLayer, done: threading.Event) -> None:
        try:
            with self._premount_slots:
                self._mount(dataclasses.replace(layer, toc_digest=""))  # no TOC digest yet: checked on claim
        except LayerUnavailable as exc:
            log.info("premounting layer %s failed (its Prepare will try again): %s", layer.digest, exc)
            with self._premount_lock:
                self._premounts.pop(layer.digest, None)
            done.set()
            return
        timer = threading.Timer(self._premount_hold, self._claim_premount, (layer.digest,))
        timer.daemon = True
        with self._premount_lock:
            self._premount_timers[layer.digest] = timer
        done.set()
        timer.start()

    def _claim_premount(self, digest: str) -> None:
        """Drops an early mount's own reference: once its Prepare holds one
        (claimed), or when nobody did in time (then the layer is unmounted)."""
        with self._premount_lock:
            self._premounts.pop(digest, None)
            timer = self._premount_timers.pop(digest, None)
        if timer is None:
            return  # claimed or expired already
        timer.cancel()
        self.release(digest)

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
            with self._peers_lock:
                for other in self._peers.pop(digest, ()):
                    self._peers.get(other, set()).discard(digest)

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

    def read_image_start(self, repository: str, manifest_digest: str) -> None:
        """Start reading an image's config in the background (once per
        image), for ``introduce_image`` to find."""
        if repository and manifest_digest:
            threading.Thread(target=self._try_image_start, args=(repository, manifest_digest),
                             name="crfs-image-config", daemon=True).start()

    def _try_image_start(self, repository: str, manifest_digest: str) -> ImageStart | None:
        try:
            return self._image_start(repository, manifest_digest)
        except Exception as exc:  # noqa: BLE001 - a guess: the layers work without it
            log.info("no start command for image %s@%s: %s", repository, manifest_digest, exc)
            return None

    def introduce_image(self, digests: Sequence[str], repository: str = "", manifest_digest: str = "") -> None:
        """In the background: once an image's layers (``digests``, this
        Prepare's and the ones being premounted) are mounted, tell them
        about each other, and, from the image config, which files its
        containers will open first, so that those are fetched while the
        pull and the container's creation go on."""
        threading.Thread(target=self._introduce_image, args=(list(dict.fromkeys(digests)), repository, manifest_digest),
                         name="crfs-image-start", daemon=True).start()

    def _introduce_image(self, digests: list[str], repository: str, manifest_digest: str) -> None:
        start = self._try_image_start(repository, manifest_digest) if repository and manifest_digest else None
        files = start.files() if start is not None else []
        # each layer is told as soon as it runs (the first to mount starts
        # fetching while the others still read their TOCs); then all of
        # them are introduced to each other (a layer passes on what it was
        # asked for before it knew its peers)
        deadline = time.monotonic() + self._premount_wait
        waiting = list(digests)
        while waiting and time.monotonic() < deadline:
            for digest in [d for d in waiting if self._settled(d)]:
                waiting.remove(digest)
                if files and self._supervisor.running(digest):
                    mount.want_files([self.mountpoint(digest)], files)
            if waiting:
                time.sleep(0.01)
        self._tell_peers([d for d in digests if self._supervisor.running(d)])

    def _settled(self, digest: str) -> bool:
        """Whether ``digest`` runs, or has failed to (no premount in progress, not held)."""
        if self._supervisor.running(digest):
            return True
        with self._premount_lock:
            premounting = digest in self._premounts and not self._premounts[digest].is_set()
        return not premounting and not self._supervisor.holds(digest)

    def _image_start(self, repository: str, manifest_digest: str) -> ImageStart:
        """Fetched once per image: the Prepare of each of its layers asks."""
        with self._starts_lock:
            known = self._starts.get(manifest_digest)
            mine = known is None
            if mine:
                known = self._starts[manifest_digest] = Future()
                while len(self._starts) > MAX_IMAGE_STARTS:
                    self._starts.pop(next(iter(self._starts)))
        assert known is not None
        if mine:
            try:
                known.set_result(fetch_image_start(repository, manifest_digest, self._remote.registry_config))
            except BaseException as exc:
                known.set_exception(exc)
                with self._starts_lock:  # not remembered: the next Prepare tries again
                    if self._starts.get(manifest_digest) is known:
                        del self._starts[manifest_digest]
        return known.result(timeout=self._premount_wait)  # another Prepare's fetch: bounded too

    def introduce(self, digests: Sequence[str]) -> None:
        """Tell the mount processes of layers merged in one overlay about each
        other (in the background: never delays the mounts it comes with), so
        that a program starting from one layer has its libraries fetched
        from the others ahead of its reads."""
        digests = list(dict.fromkeys(digests))
        if len(digests) > 1:
            threading.Thread(target=self._tell_peers, args=(digests,), name="crfs-peers", daemon=True).start()

    def _tell_peers(self, digests: Sequence[str]) -> None:
        """Introduce these layers to each other, and remember it (a restarted
        one is introduced again)."""
        if len(digests) < 2:
            return
        with self._peers_lock:
            for digest in digests:
                self._peers.setdefault(digest, set()).update(d for d in digests if d != digest)
        mount.introduce_peers([self.mountpoint(d) for d in digests])

    def _restarted(self, digest: str) -> None:
        """A layer's new process knows no peers: introduce it again (in the
        background; the supervisor's watcher must not wait)."""
        with self._peers_lock:
            peers = [d for d in self._peers.get(digest, ()) if self._supervisor.holds(d)]
        if peers:
            self.introduce([digest, *peers])

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

    def _remove_dir(self, digest: str) -> None:
        try:
            self.mountpoint(digest).rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", self.mountpoint(digest), exc)
