"""Finding and removing mounts a test left behind (rootfs mounts of killed
shims, fuse-overlayfs daemons, a crashed snapshotter's FUSE mounts), so a
temp dir can be deleted and the next test starts clean."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def _unescape(field: str) -> str:
    # mountinfo octal-escapes space, tab, newline and backslash.
    return field.encode().decode("unicode_escape")


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    base = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point == base or point.startswith(base + "/"):
                found.append(point)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def unmount_all(path: Path) -> list[str]:
    """Lazily unmount everything below ``path``; returns what was unmounted.

    Lazy (MNT_DETACH) because a mount may still be busy for a moment while
    a killed process exits; detaching is enough to delete the directory.
    """
    done = []
    for _ in range(5):  # stacked mounts on one point need one pass each
        points = mounts_under(path)
        if not points:
            break
        for point in points:
            subprocess.run(["umount", "-l", point], capture_output=True)
            done.append(point)
    return done


def remove_tree(path: Path) -> None:
    """Unmount what is below ``path``, then delete it."""
    if not path.exists():
        return
    unmount_all(path)
    shutil.rmtree(path, ignore_errors=True)
