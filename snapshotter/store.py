"""Snapshot metadata in SQLite: which snapshots exist, their kind, parent,
labels and recorded usage.

The schema mirrors containerd's ``snapshots/storage`` (bolt) semantics: a
snapshot is known by its key (an arbitrary client string) and owns a numeric
id that names its directory and never changes, not even when an active
snapshot is committed under a new name. Ids come from AUTOINCREMENT, so an id
whose transaction committed is never handed out again.

All access goes through ``MetaStore.transaction()``; a write transaction is
``BEGIN IMMEDIATE`` on one connection guarded by a lock, so callers may do
filesystem work inside it and roll back on failure, as containerd's overlay
snapshotter does with bolt.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Iterator, Optional

from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from .filters import Filter

SCHEMA_VERSION = 2
REF_LABEL = "containerd.io/snapshot.ref"  # the target a Prepare asks for
MAX_LABEL_BYTES = 4096  # containerd's limit for one key + value


class Kind(IntEnum):
    """Values as in containerd's snapshots.proto ``Kind``."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass
class SnapshotInfo:
    """What Stat, Update and Walk answer (containerd's ``snapshots.Info``)."""

    name: str
    kind: Kind
    parent: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    created_ns: int = 0
    updated_ns: int = 0

    def field(self, path: list[str]) -> tuple[str, bool]:
        """Filter adaptor, as containerd's storage.adaptSnapshot."""
        head = path[0] if path else ""
        if head == "kind":
            return self.kind.label, True
        if head == "name":
            return self.name, True
        if head == "parent":
            return self.parent, True
        if head == "labels" and self.labels:
            key = ".".join(path[1:])
            return self.labels.get(key, ""), key in self.labels
        return "", False


@dataclass(frozen=True)
class RemoteLayer:
    """The lazily mounted layer behind a remote snapshot: what to mount again
    after a restart (``source`` as lazyfs takes it, the TOC digest it was
    checked against)."""

    digest: str
    source: str
    toc_digest: str = ""


@dataclass(frozen=True)
class SnapshotRecord:
    """A snapshot as the snapshotter needs it to build mounts."""

    id: int
    kind: Kind
    parent_ids: tuple[int, ...]  # nearest parent first
    # per parent, the layer digest of a remote snapshot (None: its own dir)
    parent_layers: tuple[Optional[str], ...] = ()


@dataclass(frozen=True)
class Usage:
    size: int = 0
    inodes: int = 0


def _encode_labels(labels: dict[str, str]) -> str:
    """Validates labels and serializes them; empty values are dropped, as
    containerd's boltutil.WriteLabels does ("not actually set")."""
    for key, value in labels.items():
        if not key:
            raise InvalidArgument("label key must not be empty")
        if len(key.encode()) + len(value.encode()) > MAX_LABEL_BYTES:
            raise InvalidArgument(f"label key and value length ({len(key) + len(value)} bytes) greater than maximum size ({MAX_LABEL_BYTES} bytes)")
    return json.dumps({k: v for k, v in labels.items() if v}, sort_keys=True)


def _now_ns() -> int:
    return time.time_ns()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    key       TEXT    NOT NULL UNIQUE,
    parent_id INTEGER REFERENCES snapshots(id),
    kind      INTEGER NOT NULL,
    labels    TEXT    NOT NULL DEFAULT '{}',
    created   INTEGER NOT NULL,
    updated   INTEGER NOT NULL,
    size      INTEGER NOT NULL DEFAULT 0,
    inodes    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
"""

# Version 2: a committed snapshot may be remote, i.e. a lazily mounted layer.
_MIGRATIONS = {
    2: """
ALTER TABLE snapshots ADD COLUMN layer_digest TEXT;
ALTER TABLE snapshots ADD COLUMN layer_source TEXT;
ALTER TABLE snapshots ADD COLUMN layer_toc TEXT;
CREATE INDEX IF NOT EXISTS snapshots_layer ON snapshots(layer_digest);
""",
}

_INFO_SELECT = """
SELECT s.id, s.key, s.kind, COALESCE(p.key, ''), s.labels, s.created, s.updated, s.size, s.inodes
FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id
"""


class Transaction:
    """Operations on the store inside one SQLite transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    # -- reads ---------------------------------------------------------------

    def _lookup(self, key: str) -> Optional[sqlite3.Row]:
        return self._conn.execute(_INFO_SELECT + " WHERE s.key = ?", (key,)).fetchone()

    def _row(self, key: str) -> sqlite3.Row:
        row = self._lookup(key)
        if row is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return row

    @staticmethod
    def _info(row: sqlite3.Row) -> SnapshotInfo:
        return SnapshotInfo(name=row[1], kind=Kind(row[2]), parent=row[3], labels=json.loads(row[4]), created_ns=row[5], updated_ns=row[6])

    def _parent_chain(self, snapshot_id: int) -> list[tuple[int, Optional[str]]]:
        """(id, layer digest) of every ancestor, nearest first."""
        rows = self._conn.execute(
            """WITH RECURSIVE chain(id, parent_id, layer_digest, depth) AS (
                   SELECT id, parent_id, layer_digest, 0 FROM snapshots WHERE id = ?
                   UNION ALL
                   SELECT s.id, s.parent_id, s.layer_digest, c.depth + 1 FROM snapshots s JOIN chain c ON s.id = c.parent_id)
               SELECT id, layer_digest FROM chain WHERE depth > 0 ORDER BY depth""",
            (snapshot_id,),
        ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def _record(self, snapshot_id: int, kind: Kind) -> SnapshotRecord:
        chain = self._parent_chain(snapshot_id)
        return SnapshotRecord(snapshot_id, kind, tuple(i for i, _ in chain), tuple(d for _, d in chain))

    def info(self, key: str) -> tuple[int, SnapshotInfo, Usage]:
        row = self._row(key)
        return row[0], self._info(row), Usage(row[7], row[8])

    def find(self, key: str) -> Optional[tuple[int, SnapshotInfo]]:
        """Like ``info``, but None when there is no such snapshot."""
        row = self._lookup(key)
        return None if row is None else (row[0], self._info(row))

    def record(self, key: str) -> SnapshotRecord:
        """The snapshot for Mounts: it must be active or a view."""
        row = self._row(key)
        kind = Kind(row[2])
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise FailedPrecondition(f"snapshot {key!r} is not active or view")
        return self._record(row[0], kind)

    def walk(self, flt: Filter) -> list[SnapshotInfo]:
        infos = (self._info(r) for r in self._conn.execute(_INFO_SELECT + " ORDER BY s.key"))
        return [i for i in infos if flt.match(i.field)]

    def ids(self) -> set[int]:
        return {r[0] for r in self._conn.execute("SELECT id FROM snapshots")}

    def remote_target(self, target: str, parent: str) -> Optional[str]:
        """The name of the committed snapshot made for ``target`` (the
        ``containerd.io/snapshot.ref`` label) on top of ``parent``, if any."""
        rows = self._conn.execute(
            "SELECT s.key, s.labels FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id"
            " WHERE s.kind = ? AND COALESCE(p.key, '') = ? AND s.labels LIKE ?",
            (int(Kind.COMMITTED), parent, "%" + json.dumps(target)[1:-1] + "%"),
        )
        for key, labels in rows:
            if json.loads(labels).get(REF_LABEL) == target:
                return key
        return None

    def remote_layers(self) -> list[tuple[RemoteLayer, int]]:
        """Every layer remote snapshots stand on, with how many use it."""
        rows = self._conn.execute(
            "SELECT layer_digest, MIN(layer_source), MIN(COALESCE(layer_toc, '')), COUNT(*) FROM snapshots"
            " WHERE layer_digest IS NOT NULL GROUP BY layer_digest ORDER BY layer_digest"
        )
        return [(RemoteLayer(d, src, toc), n) for d, src, toc, n in rows]

    # -- writes --------------------------------------------------------------

    def create(self, kind: Kind, key: str, parent: str, labels: dict[str, str]) -> SnapshotRecord:
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise InvalidArgument(f"snapshot kind {kind!r} invalid; only active or view can be created")
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        encoded_labels = _encode_labels(labels)
        parent_id: Optional[int] = None
        if parent:
            prow = self._conn.execute("SELECT id, kind FROM snapshots WHERE key = ?", (parent,)).fetchone()
            if prow is None:
                raise NotFound(f"parent snapshot {parent!r} does not exist")
            if prow[1] != Kind.COMMITTED:
                raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
            parent_id = prow[0]
        if self._conn.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone():
            raise AlreadyExists(f"snapshot {key!r} already exists")
        now = _now_ns()
        cur = self._conn.execute(
            "INSERT INTO snapshots (key, parent_id, kind, labels, created, updated) VALUES (?, ?, ?, ?, ?, ?)",
            (key, parent_id, int(kind), encoded_labels, now, now),
        )
        return self._record(int(cur.lastrowid), kind)

    def create_remote(self, name: str, parent: str, labels: dict[str, str], layer: RemoteLayer) -> int:
        """A committed snapshot whose contents are ``layer``, mounted lazily."""
        record = self.create(Kind.ACTIVE, name, parent, labels)  # same checks as Prepare
        self._conn.execute(
            "UPDATE snapshots SET kind = ?, layer_digest = ?, layer_source = ?, layer_toc = ? WHERE id = ?",
            (int(Kind.COMMITTED), layer.digest, layer.source, layer.toc_digest or None, record.id),
        )
        return record.id

    def commit(self, key: str, name: str, usage: Usage, labels: dict[str, str]) -> int:
        if not name:
            raise InvalidArgument("commit name must not be empty")
        encoded_labels = _encode_labels(labels)
        if self._conn.execute("SELECT 1 FROM snapshots WHERE key = ?", (name,)).fetchone():
            raise AlreadyExists(f"committed snapshot {name!r} already exists")
        row = self._conn.execute("SELECT id, kind FROM snapshots WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise NotFound(f"active snapshot {key!r} does not exist")
        if row[1] != Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is not active")
        now = _now_ns()
        self._conn.execute(
            "UPDATE snapshots SET key = ?, kind = ?, labels = ?, created = ?, updated = ?, size = ?, inodes = ? WHERE id = ?",
            (name, int(Kind.COMMITTED), encoded_labels, now, now, usage.size, usage.inodes, row[0]),
        )
        return int(row[0])

    def remove(self, key: str) -> tuple[int, Kind, Optional[str]]:
        """Deletes the record: its id, kind and, if remote, its layer digest."""
        row = self._conn.execute("SELECT id, kind, layer_digest FROM snapshots WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        if self._conn.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (row[0],)).fetchone():
            raise FailedPrecondition(f"cannot remove snapshot {key!r} with child")
        self._conn.execute("DELETE FROM snapshots WHERE id = ?", (row[0],))
        return int(row[0]), Kind(row[1]), row[2]

    def update(self, info: SnapshotInfo, fieldpaths: list[str]) -> SnapshotInfo:
        """Only labels are mutable: ``labels`` replaces them all, ``labels.KEY`` one."""
        row = self._row(info.name)
        current = self._info(row)
        labels = dict(current.labels)
        if fieldpaths:
            for path in fieldpaths:
                if path.startswith("labels."):
                    label = path[len("labels."):]
                    labels[label] = info.labels.get(label, "")
                elif path == "labels":
                    labels = dict(info.labels)
                else:
                    raise InvalidArgument(f"cannot update {path!r} field on snapshot {info.name!r}")
        else:
            labels = dict(info.labels)
        encoded_labels = _encode_labels(labels)
        current.labels = json.loads(encoded_labels)
        current.updated_ns = _now_ns()
        self._conn.execute("UPDATE snapshots SET labels = ?, updated = ? WHERE id = ?", (encoded_labels, current.updated_ns, row[0]))
        return current


class MetaStore:
    """The SQLite database at ``path`` (WAL; one connection, serialized)."""

    def __init__(self, path: Path, synchronous: str = "FULL") -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL"):
            raise ValueError(f"synchronous must be OFF, NORMAL or FULL, not {synchronous!r}")
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._conn.execute("PRAGMA foreign_keys=ON")
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{path}: schema version {version} is newer than this crfs ({SCHEMA_VERSION})")
        self._conn.executescript(_SCHEMA)
        for target in range(2, SCHEMA_VERSION + 1):
            if version < target:
                # ALTER TABLE is transactional in SQLite: all or nothing
                self._conn.executescript(f"BEGIN IMMEDIATE; {_MIGRATIONS[target]} PRAGMA user_version={target}; COMMIT;")
        self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def transaction(self, write: bool = False) -> Iterator[Transaction]:
        """Commits when the block ends normally, rolls back on any exception."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield Transaction(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()
