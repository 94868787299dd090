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
from typing import TYPE_CHECKING, Iterator, Optional

from .containerd import Containerd
from .crfs import CrfsServer
from .mounts import remove_tree
from .registry import Registry

if TYPE_CHECKING:
    from registry.faultproxy import FaultProxy


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


@dataclass
class LazyStack:
    """A registry behind a counting proxy (``registry.faultproxy``), crfs
    with a config file, and a containerd using crfs: a lazy pull's parts."""

    workdir: Path
    registry: Registry
    proxy: FaultProxy
    crfs: CrfsServer
    containerd: Containerd


@contextmanager
def lazy_stack(crfs_config: str, prefix: str = "crfs-lazy-") -> Iterator[LazyStack]:
    """Everything started here is stopped and removed on exit (the layer
    processes crfs leaves with it)."""
    from registry.faultproxy import FaultProxy  # noqa: PLC0415 - tests/registry, on the same path

    with ExitStack() as stack:
        base = stack.enter_context(temp_workdir(prefix))
        registry = stack.enter_context(Registry(base / "registry"))
        proxy = stack.enter_context(FaultProxy(registry.host))
        config = base / "crfs.toml"
        config.write_text(crfs_config)
        crfs = stack.enter_context(CrfsServer(base / "crfs-root", base / "crfs.sock", ["--config", str(config)]))
        containerd = stack.enter_context(Containerd(crfs_address=crfs.address, workdir=base / "ctrd"))
        yield LazyStack(base, registry, proxy, crfs, containerd)


def blob_sizes(ref: str) -> tuple[dict[str, int], int]:
    """Sizes of the config and layer blobs of ``ref`` (host/repo:tag), and
    the layers' total: what a byte count through the proxy needs."""
    from lazyfs.registry import RegistryClient  # noqa: PLC0415

    with RegistryClient() as client:
        manifest = client.repository(ref).get_manifest(ref.rsplit(":", 1)[1])
    return {d.digest: d.size for d in [manifest.config, *manifest.layers]}, sum(d.size for d in manifest.layers)
