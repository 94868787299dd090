"""``crfs mount docker://REF DIR``: every layer of an image mounted lazily,
merged with fuse-overlayfs into a writable root filesystem at DIR.

Each layer is its own mount process (``lazyfs.mount``) reading the registry
blob (``registry://…``); the merged view's upper and work directories, and a
record of what was mounted, live in the state directory, keyed by DIR, so
that ``crfs umount DIR`` can undo it all. The upper directory is scratch
and removed with the mount, unless the caller names one (``upper``): that
one, which holds every change made through DIR, is kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from . import mount
from .layer_source import REGISTRY_SCHEME, RemoteOptions
from .prefetch_hints import prefetch_hint

DOCKER_SCHEME = "docker://"
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"


class ImageMountError(mount.MountError):
    """An image could not be mounted (a layer that is not stargz, no fuse-overlayfs, …)."""


@dataclass
class ImageRecord:
    """What ``crfs umount`` needs to undo an image mount."""

    reference: str
    mountpoint: str
    layers: list[str]  # layer mountpoints, bottom first
    pids: list[int]
    work: str = ""  # fuse-overlayfs work dir beside a caller's upper dir, removed on umount

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ImageRecord:
        return cls(**json.loads(path.read_text()))


def image_dir(mountpoint: str | os.PathLike[str]) -> Path:
    """Where the layer mounts, upper and work directories of ``mountpoint`` live."""
    return mount.control_path(mountpoint).with_suffix(".image")


def mount_image(
    reference: str,
    mountpoint: str | os.PathLike[str],
    *,
    remote: RemoteOptions = RemoteOptions(),
    upper: str | os.PathLike[str] | None = None,
) -> ImageRecord:
    """Mount every layer of ``reference`` and merge them at ``mountpoint``;
    writes land in ``upper`` (kept) or in a scratch dir (removed on umount)."""
    from .registry.client import RegistryClient  # noqa: PLC0415 - registry only

    ref = reference.removeprefix(DOCKER_SCHEME)
    target = os.path.realpath(mountpoint)
    base = image_dir(target)
    if base.exists():
        raise ImageMountError(f"{target} already has an image mounted (crfs umount it first)")
    with RegistryClient() as client:
        resolved = client.resolve(ref)
    repo = f"{resolved.reference.registry}/{resolved.reference.repository}"
    record = ImageRecord(reference, target, [], [])
    base.mkdir(parents=True)
    try:
        for index, layer in enumerate(resolved.manifest.layers):
            layer_dir = base / "layers" / str(index)
            layer_dir.mkdir(parents=True)
            toc_digest = layer.annotations.get(TOC_DIGEST_ANNOTATION)
            # the descriptor's prefetch annotations, as a snapshotter gets them as labels
            hinted = dataclasses.replace(remote, prefetch_ranges=prefetch_hint(layer.annotations))
            pid = mount.start(f"{REGISTRY_SCHEME}{repo}@{layer.digest}", layer_dir, toc_digest=toc_digest, remote=hinted)
            record.layers.append(str(layer_dir))
            record.pids.append(pid)
        if not record.layers:
            raise ImageMountError(f"{reference} has no layers")
        mount.introduce_peers(record.layers)  # a program's libraries are fetched from every layer ahead of its reads
        if upper is None:
            upper_dir, work_dir = base / "upper", base / "work"
        else:
            # the work dir must share the upper dir's filesystem (renames)
            upper_dir = Path(upper).resolve()
            work_dir = upper_dir.with_name(upper_dir.name + ".crfs-work")
            record.work = str(work_dir)
        _merge(record.layers, upper_dir, work_dir, target)
        record.save(base / "record.json")
    except BaseException:
        _undo(record, base, merged=False)
        raise
    return record


def _merge(layers: list[str], upper: Path, work: Path, target: str) -> None:
    upper.mkdir(parents=True, exist_ok=True)
    work.mkdir()
    lower = ":".join(reversed(layers))  # fuse-overlayfs wants the top layer first
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if os.geteuid() == 0:
        options += ",allow_other"
    try:
        proc = subprocess.run(["fuse-overlayfs", "-o", options, target], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ImageMountError("fuse-overlayfs is not installed") from None
    if proc.returncode != 0:
        raise ImageMountError(f"fuse-overlayfs failed: {proc.stderr.strip()}")


def is_image_mount(mountpoint: str | os.PathLike[str]) -> bool:
    return (image_dir(mountpoint) / "record.json").exists()


def unmount_image(mountpoint: str | os.PathLike[str]) -> None:
    """Unmount the merged view, then every layer; remove the scratch state."""
    base = image_dir(mountpoint)
    _undo(ImageRecord.load(base / "record.json"), base, merged=True)


def _undo(record: ImageRecord, base: Path, *, merged: bool) -> None:
    errors = []
    if merged:
        with contextlib.suppress(mount.MountError):
            mount.unmount(record.mountpoint)
        if mount.is_mounted(record.mountpoint):
            errors.append(f"{record.mountpoint} is still mounted")
    for layer_dir in reversed(record.layers):
        try:
            mount.unmount(layer_dir)
        except mount.MountError as exc:
            errors.append(str(exc))
    if errors:
        raise ImageMountError("; ".join(errors))
    if record.work:
        shutil.rmtree(record.work, ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)
