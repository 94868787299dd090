"""Whole set-ups as plain context managers; pytest fixtures (in conftest.py
or a test module) and bench/ wrap these instead of repeating the wiring.

Teardown runs in reverse order of start-up: containerd first (its
containers and rootfs mounts go away while crfs can still answer), then
crfs, then the registry, then the temp directory.
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from .containerd import Containerd
from .crfs import CrfsServer
from .mounts import remove_tree
from .registry import Registry


@dataclass
class Stack:
    """A registry and a containerd, plus crfs when it was asked for."""

    workdir: Path
    registry: Registry
    containerd: Containerd
    crfs: Optional[CrfsServer] = None


@contextmanager
def temp_workdir(prefix: str = "crfs-e2e-") -> Iterator[Path]:
    """A short temp dir (socket paths must stay under 108 bytes), always removed."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        remove_tree(path)


@contextmanager
def crfs_server(workdir: Optional[Path] = None, extra_args: tuple[str, ...] = ()) -> Iterator[CrfsServer]:
    """``crfs serve`` on a fresh root under ``workdir`` (a temp dir if None)."""
    with ExitStack() as stack:
        base = workdir or stack.enter_context(temp_workdir("crfs-srv-"))
        yield stack.enter_context(CrfsServer(base / "crfs-root", base / "crfs.sock", extra_args))


@contextmanager
def containerd_stack(with_crfs: bool = True, workdir: Optional[Path] = None) -> Iterator[Stack]:
    """Registry + (crfs) + containerd whose ``proxy_plugins.crfs`` points at it."""
    with ExitStack() as stack:
        base = workdir or stack.enter_context(temp_workdir())
        registry = stack.enter_context(Registry(base / "registry"))
        server = None
        if with_crfs:
            server = stack.enter_context(CrfsServer(base / "crfs-root", base / "crfs.sock"))
        containerd = stack.enter_context(
            Containerd(crfs_address=server.address if server else None, workdir=base / "ctrd")
        )
        yield Stack(base, registry, containerd, server)
