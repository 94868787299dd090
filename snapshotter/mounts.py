"""Mount specs that containerd (or the shim) mounts for a snapshot.

Layouts follow containerd's overlay snapshotter, with fuse-overlayfs in place
of kernel overlayfs so that the same specs work for an unprivileged user:

- no parent: a bind mount of the snapshot's own dir (``rw``; ``ro`` for a view)
- a view of one committed parent: a read-only bind mount of that parent
- otherwise ``fuse3.fuse-overlayfs`` with ``lowerdir`` (nearest parent first),
  plus ``upperdir`` and ``workdir`` when active.

containerd mounts ``fuse3.*`` types through the ``mount.fuse3`` helper, whose
options travel as command-line arguments rather than as mount(2) data, so the
kernel's one-page limit on mount data that forces containerd to compact
overlay lowerdirs does not apply; 128 layers of absolute paths fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

FUSE_OVERLAYFS_TYPE = "fuse3.fuse-overlayfs"


@dataclass(frozen=True)
class Mount:
    """containerd.types.Mount without the (unused) target."""

    type: str
    source: str
    options: tuple[str, ...]


def _bind(path: Path, writable: bool) -> Mount:
    return Mount("bind", str(path), ("rw" if writable else "ro", "rbind"))


def snapshot_mounts(active: bool, upper: Path, work: Path, lowers: Sequence[Path]) -> list[Mount]:
    """The mounts of an active snapshot (``active``) or a view.

    ``upper``/``work`` are the snapshot's own dirs, ``lowers`` the ``fs``
    dirs of its parents, nearest first.
    """
    if not lowers:
        return [_bind(upper, writable=active)]
    if not active and len(lowers) == 1:
        return [_bind(lowers[0], writable=False)]
    options = []
    if active:
        options += [f"workdir={work}", f"upperdir={upper}"]
    options.append("lowerdir=" + ":".join(str(p) for p in lowers))
    return [Mount(FUSE_OVERLAYFS_TYPE, "overlay", tuple(options))]
