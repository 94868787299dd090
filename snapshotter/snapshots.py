"""The snapshotter: containerd's Snapshotter interface over a MetaStore and
one directory per snapshot, like containerd's ``snapshots/overlay``.

Layout under ``root``::

    metadata.db             the MetaStore
    snapshots/<id>/fs       the snapshot's files (upper dir when active)
    snapshots/<id>/work     fuse-overlayfs work dir (active snapshots only)
    snapshots/new-*         being prepared; never referenced by the store

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

from .errors import InvalidArgument
from .filters import parse_filters
from .mounts import Mount, snapshot_mounts
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

    def __init__(self, root: Path, store: MetaStore, crash_point: Optional[CrashPoint] = None) -> None:
        if any(c in str(root) for c in ",:"):
            # fuse-overlayfs splits its options at ',' and lowerdir at ':'
            raise InvalidArgument(f"root {root} must not contain ',' or ':'")
        self.root = root
        self._snapshots = root / "snapshots"
        self._snapshots.mkdir(parents=True, exist_ok=True)
        self._store = store
        self._crash_point = crash_point or (lambda name: None)

    # -- paths ---------------------------------------------------------------

    def _dir(self, snapshot_id: int) -> Path:
        return self._snapshots / str(snapshot_id)

    def _mounts(self, record: SnapshotRecord) -> list[Mount]:
        d = self._dir(record.id)
        lowers = [self._dir(p) / "fs" for p in record.parent_ids]
        return snapshot_mounts(record.kind == Kind.ACTIVE, d / "fs", d / "work", lowers)

    # -- calls ---------------------------------------------------------------

    def prepare(self, key: str, parent: str = "", labels: Optional[dict[str, str]] = None) -> list[Mount]:
        return self._create(Kind.ACTIVE, key, parent, labels or {})

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
                    st = os.stat(self._dir(record.parent_ids[0]) / "fs")
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
            snapshot_id, _ = tx.remove(key)
            self._crash_point("remove:before-commit")
        self._crash_point("remove:after-commit")
        _remove_tree(self._dir(snapshot_id))

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
        return orphans
