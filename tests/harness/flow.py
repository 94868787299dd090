"""The pull / run / remove steps that the e2e test and the benchmark both
take through ``ctr``, and where each snapshotter keeps its snapshots."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Optional

from .containerd import Containerd
from .proc import HarnessError
from .snapshots_client import crfs_snapshot_names

OVERLAYFS = "overlayfs"
CRFS = "crfs"


def pull(ctrd: Containerd, ref: str, snapshotter: str, via_env: bool = False, timeout: float = 300.0) -> None:
    """``ctr images pull --plain-http`` into ``snapshotter``.

    ``via_env`` picks the ``CONTAINERD_SNAPSHOTTER`` form over the flag, so
    both ways users select a snapshotter are exercised.
    """
    if via_env:
        ctrd.ctr("images", "pull", "--plain-http", ref, snapshotter=snapshotter, timeout=timeout)
    else:
        ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", snapshotter, ref, timeout=timeout)


def run_sh(
    ctrd: Containerd,
    ref: str,
    snapshotter: str,
    container_id: str,
    script: str,
    via_env: bool = False,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess:
    """``ctr run --rm`` of ``sh -c SCRIPT``; raises unless it exits 0."""
    if via_env:
        args = ["run", "--rm", ref, container_id, "sh", "-c", script]
        return ctrd.ctr(*args, snapshotter=snapshotter, timeout=timeout)
    args = ["run", "--rm", "--snapshotter", snapshotter, ref, container_id, "sh", "-c", script]
    return ctrd.ctr(*args, timeout=timeout)


def remove_image(ctrd: Containerd, ref: str) -> None:
    """Delete the image and collect everything it held, synchronously."""
    ctrd.ctr("images", "rm", "--sync", ref)
    ctrd.gc()


def overlayfs_snapshot_dir(ctrd: Containerd) -> Path:
    return ctrd.root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"


def crfs_snapshot_dir(crfs_root: Path) -> Path:
    """crfs keeps each snapshot under ``ROOT/snapshots/<numeric id>/``."""
    return crfs_root / "snapshots"


def entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def leftovers(ctrd: Containerd, snapshotter: str, crfs_root: Optional[Path] = None,
              crfs_address: Optional[Path] = None) -> dict[str, list[str]]:
    """Everything that still holds a snapshot, by where it was found.

    Empty dict means clean: containerd's metadata (``ctr snapshots ls``),
    the backend's own listing (crfs only, over gRPC) and the on-disk dirs.
    """
    found = {"ctr snapshots ls": ctrd.snapshot_keys(snapshotter)}
    if snapshotter == CRFS:
        if crfs_root is None or crfs_address is None:
            raise HarnessError("crfs leftovers need the crfs root and address")
        found["crfs List"] = crfs_snapshot_names(crfs_address)
        found[str(crfs_snapshot_dir(crfs_root))] = entries(crfs_snapshot_dir(crfs_root))
    else:
        found[str(overlayfs_snapshot_dir(ctrd))] = entries(overlayfs_snapshot_dir(ctrd))
    return {where: items for where, items in found.items() if items}


def wait_clean(ctrd: Containerd, snapshotter: str, timeout: float = 10.0, **crfs: Path) -> dict[str, list[str]]:
    """Poll ``leftovers`` until empty or ``timeout``; returns the last result.

    GC is synchronous, but a snapshotter may finish deleting a directory
    just after answering Remove, so a short grace period avoids flakes
    without hiding a real leak.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = leftovers(ctrd, snapshotter, **crfs)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)
