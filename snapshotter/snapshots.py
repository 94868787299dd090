"""The snapshotter: containerd's Snapshotter interface over a MetaStore and
one directory per snapshot, like containerd's ``snapshots/overlay``.

Layout under ``root``::

    metadata.db             the MetaStore
    snapshots/<id>/fs       the snapshot's files (upper dir when active)
    snapshots/<id>/work     fuse-overlayfs work dir (active snapshots only)
    snapshots/new-*         being prepared; never referenced by the store
    layers/<digest>         a lazily mounted layer (lazyfs), shared by every
                            remote snapshot on it (see ``layers.LayerMounts``)

A remote snapshot is a committed snapshot whose files are such a layer: a
Prepare whose labels name a layer crfs can mount lazily (``remote``) mounts
it, commits the target snapshot containerd asked for, and answers
AlreadyExists, as containerd's remote snapshotter protocol wants; anything
else about it (unreachable registry, not eStargz) makes it an ordinary
Prepare, and containerd downloads the layer.

Crash safety comes from ordering: a new snapshot's directory is built under
``new-*`` and renamed to its id inside the store transaction that creates its
record, just before that transaction commits; a removed snapshot's record is
deleted first and its directory afterwards. Whatever a crash leaves behind is
therefore a directory without a record, which ``cleanup`` removes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from .errors import AlreadyExists, InvalidArgument, Unavailable
from .filters import parse_filters
from .layers import LayerMounts, LayerUnavailable
from .mounts import Mount, snapshot_mounts
from .remote import REMOTE_LABEL, LayerRequest, layer_request
from .store import Kind, MetaStore, SnapshotInfo, SnapshotRecord, Usage

log = logging.getLogger(__name__)

# Test hook: called with the name of a point in a multi-step change, so that
# crash tests can kill the process exactly there. A no-op in production.
CrashPoint = Callable[[str], None]


def disk_usage(path: Path) -> Usage:
    """Allocated bytes and distinct inodes under ``path`` (continuity's fs.DiskUsage)."""
    seen: set[tuple[int, int]] = set()
    size = 0
    stack = [path]
    while stack:
        current = stack.pop()
        st = os.lstat(current)
        key = (st.st_dev, st.st_ino)
        if key not in seen:
            seen.add(key)
            size += st.st_blocks * 512
        if os.path.isdir(current) and not os.path.islink(current):
            with os.scandir(current) as entries:
                stack.extend(Path(e.path) for e in entries)
    return Usage(size=size, inodes=len(seen))


def _remove_tree(path: Path) -> None:
    def onerror(func, p, exc_info):  # noqa: ANN001 - shutil's callback signature
        if not isinstance(exc_info[1], FileNotFoundError):
            log.warning("failed to remove %s: %s", p, exc_info[1])

    shutil.rmtree(path, onerror=onerror)


class Snapshotter:
    """Prepare, View, Mounts, Commit, Remove, Stat, Update, Usage, Walk, Cleanup."""

    def __init__(
        self, root: Path, store: MetaStore, crash_point: Optional[CrashPoint] = None,
        layers: Optional[LayerMounts] = None,
    ) -> None:
        if any(c in str(root) for c in ",:"):
            # fuse-overlayfs splits its options at ',' and lowerdir at ':'
            raise InvalidArgument(f"root {root} must not contain ',' or ':'")
        self.root = root
        self._snapshots = root / "snapshots"
        self._snapshots.mkdir(parents=True, exist_ok=True)
        self._store = store
        self._crash_point = crash_point or (lambda name: None)
        self._layers = layers  # None: remote snapshots are off

    def recover(self) -> None:
        """At start: take over the layer mounts of stored remote snapshots and
        clear the ones nobody owns (left by a crash)."""
        if self._layers is None:
            return
        with self._store.transaction() as tx:
            layers = tx.remote_layers()
        self._layers.adopt(layers)
        for digest in self._layers.sweep():
            log.info("cleared layer mount %s that no snapshot uses", digest)

    # -- paths ---------------------------------------------------------------

    def _dir(self, snapshot_id: int) -> Path:
        return self._snapshots / str(snapshot_id)

    def _lower(self, snapshot_id: int, layer: Optional[str]) -> Path:
        """The files of a committed snapshot: its dir, or its layer's mount."""
        if layer and self._layers is not None:
            return self._layers.mountpoint(layer)
        return self._dir(snapshot_id) / "fs"

    def _mounts(self, record: SnapshotRecord) -> list[Mount]:
        d = self._dir(record.id)
        layers = [digest for digest in record.parent_layers if digest]
        if layers:
            if self._layers is None:
                raise Unavailable("remote snapshots are turned off, and this snapshot stands on remote layers")
            try:
                self._layers.ensure(layers)
            except LayerUnavailable as exc:
                raise Unavailable(str(exc)) from None
            self._layers.introduce(layers)
        lowers = [self._lower(pid, digest) for pid, digest in zip(record.parent_ids, record.parent_layers)]
        return snapshot_mounts(record.kind == Kind.ACTIVE, d / "fs", d / "work", lowers)

    # -- calls ---------------------------------------------------------------

    def prepare(self, key: str, parent: str = "", labels: Optional[dict[str, str]] = None) -> list[Mount]:
        labels = labels or {}
        request = layer_request(labels) if self._layers is not None else None
        if request is not None:
            self._prepare_remote(key, parent, labels, request)
        return self._create(Kind.ACTIVE, key, parent, labels)

    def _prepare_remote(self, key: str, parent: str, labels: dict[str, str], request: LayerRequest) -> None:
        """Raises AlreadyExists once the target is a remote snapshot; returns
        when the Prepare should be an ordinary one."""
        with self._store.transaction() as tx:
            existing = tx.remote_target(request.target, parent)
            parent_found = tx.find(parent) if parent else None
            if tx.find(key) is not None or (parent and (parent_found is None or parent_found[1].kind != Kind.COMMITTED)):
                return  # the ordinary path answers with the right error
        if existing is not None:
            raise AlreadyExists(f"target snapshot {request.target!r} already exists as {existing!r}")
        assert self._layers is not None
        self._layers.premount(request.upcoming)
        # the image's start command is read while its layers are mounted
        self._layers.read_image_start(request.repository, request.manifest_digest)
        try:
            self._layers.acquire(request.layer)
        except LayerUnavailable as exc:
            log.info("layer %s is not mounted lazily, preparing %r for download: %s", request.layer.digest, key, exc)
            return
        self._layers.introduce_image([request.layer.digest, *(u.digest for u in request.upcoming)],
                                     request.repository, request.manifest_digest)
        try:
            with self._store.transaction(write=True) as tx:
                existing = tx.remote_target(request.target, parent)
                if existing is None:
                    name = request.target
                    if tx.find(name) is not None:  # taken by a chain with another parent
                        name = f"{request.target}@{os.urandom(8).hex()}"
                    tx.create_remote(name, parent, {**labels, REMOTE_LABEL: "remote snapshot"}, request.layer)
                    self._crash_point("remote:before-commit")
        except BaseException:
            self._layers.release(request.layer.digest)
            raise
        if existing is not None:  # made concurrently by another Prepare
            self._layers.release(request.layer.digest)
        else:
            log.info("remote snapshot %r on layer %s (%s)", name, request.layer.digest, request.layer.source)
        raise AlreadyExists(f"target snapshot {request.target!r} already exists")

    def view(self, key: str, parent: str = "", labels: Optional[dict[str, str]] = None) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels or {})

    def _create(self, kind: Kind, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        # Staged inside the write transaction, so that a concurrent cleanup
        # (which lists directories under the same lock) never sees it.
        with self._store.transaction(write=True) as tx:
            staging = Path(tempfile.mkdtemp(prefix="new-", dir=self._snapshots))
            renamed: Optional[Path] = None
            try:
                (staging / "fs").mkdir(0o755)
                if kind == Kind.ACTIVE:
                    (staging / "work").mkdir(0o711)
                record = tx.create(kind, key, parent, labels)
                if record.parent_ids:
                    # the new upper dir takes the owner of the parent's root
                    st = os.stat(self._lower(record.parent_ids[0], record.parent_layers[0]))
                    os.lchown(staging / "fs", st.st_uid, st.st_gid)
                self._crash_point("create:before-rename")
                final = self._dir(record.id)
                if final.exists():
                    # left by a crash between rename and commit: the id was
                    # never committed, so nothing references this directory
                    _remove_tree(final)
                os.rename(staging, final)
                renamed = final
                self._crash_point("create:after-rename")
            except BaseException:
                _remove_tree(renamed or staging)  # the record rolls back with it
                raise
        return self._mounts(record)

    def mounts(self, key: str) -> list[Mount]:
        with self._store.transaction() as tx:
            record = tx.record(key)
        return self._mounts(record)

    def commit(self, name: str, key: str, labels: Optional[dict[str, str]] = None) -> None:
        with self._store.transaction() as tx:
            found = tx.find(key)
        # measured outside the lock; committed usage never changes afterwards
        active = found is not None and found[1].kind == Kind.ACTIVE
        usage = disk_usage(self._dir(found[0]) / "fs") if active else Usage()
        with self._store.transaction(write=True) as tx:  # checks in containerd's order
            tx.commit(key, name, usage, labels or {})
            self._crash_point("commit:before-commit")

    def remove(self, key: str) -> None:
        with self._store.transaction(write=True) as tx:
            snapshot_id, _, layer = tx.remove(key)
            self._crash_point("remove:before-commit")
        self._crash_point("remove:after-commit")
        _remove_tree(self._dir(snapshot_id))
        if layer is not None and self._layers is not None:
            self._layers.release(layer)

    def stat(self, key: str) -> SnapshotInfo:
        with self._store.transaction() as tx:
            return tx.info(key)[1]

    def update(self, info: SnapshotInfo, fieldpaths: list[str]) -> SnapshotInfo:
        with self._store.transaction(write=True) as tx:
            return tx.update(info, fieldpaths)

    def usage(self, key: str) -> Usage:
        with self._store.transaction() as tx:
            snapshot_id, info, usage = tx.info(key)
        if info.kind == Kind.ACTIVE:
            return disk_usage(self._dir(snapshot_id) / "fs")
        return usage

    def walk(self, filters: list[str]) -> list[SnapshotInfo]:
        flt = parse_filters(filters)
        with self._store.transaction() as tx:
            return tx.walk(flt)

    def cleanup(self) -> list[Path]:
        """Removes every directory under snapshots/ that no record owns.

        Orphans are renamed aside while the store is locked, so an id that a
        concurrent Prepare takes over (possible only for an id whose creation
        crashed before committing) is never deleted under it.
        """
        with self._store.transaction() as tx:
            live = {str(i) for i in tx.ids()}
            orphans = []
            for name in os.listdir(self._snapshots):
                if name in live:
                    continue
                doomed = self._snapshots / name
                if not name.startswith("rm-"):
                    doomed = Path(tempfile.mkdtemp(prefix=f"rm-{name}-", dir=self._snapshots))
                    os.rename(self._snapshots / name, doomed / name)
                orphans.append(doomed)
        for path in orphans:
            log.info("cleanup: removing %s", path)
            _remove_tree(path)
        if self._layers is not None:
            for digest in self._layers.sweep():
                log.info("cleanup: cleared layer mount %s", digest)
                orphans.append(self._layers.mountpoint(digest))
        return orphans
