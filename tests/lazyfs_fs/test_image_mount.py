"""``crfs mount docker://…``: an image's layers mounted lazily from a real
registry and merged with fuse-overlayfs; ``crfs umount`` undoes it all."""

from __future__ import annotations

import json
import os
from pathlib import Path

from harness.images import push_layers_manifest
from harness.registry import Registry
from lazyfs import image_mount, mount
from lazyfs.registry import RegistryClient
from lazyfs.stargz.reader import StargzReader
from lazyfs.stargz.source import FileSource

from .helpers import force_unmount, kill, run_crfs
from .test_overlay import EXPECTED_TOP, two_layers

def _push_image(host: str, layers: list[Path]) -> str:
    """An OCI image of eStargz ``layers`` (bottom first) at host/lazy/img:v1."""
    ref = f"{host}/lazy/img"
    blobs = []
    for path in layers:
        with FileSource(path) as source:
            toc_digest = StargzReader.open(source).toc.digest
        blobs.append((path.read_bytes(), {image_mount.TOC_DIGEST_ANNOTATION: toc_digest}))
    with RegistryClient() as client:
        push_layers_manifest(client.repository(ref), blobs, tag="v1")
    return f"docker://{ref}:v1"



def _clean_up(merged: Path, layer_dirs: list[Path], pids: list[int]) -> None:
    """Whatever a failed test left: the merged view, the layer mounts, their processes."""
    force_unmount(merged)
    for d in layer_dirs:
        force_unmount(d)
    for pid in pids:
        kill(pid)


def test_crfs_mount_docker_image(tmp_path: Path) -> None:
    merged = tmp_path / "rootfs"
    merged.mkdir()
    with Registry(tmp_path / "registry") as registry:
        ref = _push_image(registry.host, list(two_layers(tmp_path)))
        proc = run_crfs("mount", ref, str(merged), "--cache-dir", str(tmp_path / "cache"))
        assert proc.returncode == 0, proc.stderr
        pids = json.loads(proc.stdout)["pids"]
        layer_dirs = [image_mount.image_dir(merged) / "layers" / str(i) for i in range(2)]
        try:
            assert len(pids) == 2 and all(mount.is_mounted(d) for d in layer_dirs)
            assert sorted(os.listdir(merged)) == EXPECTED_TOP
            assert sorted(os.listdir(merged / "d")) == ["z"]
            assert (merged / "c").read_bytes() == b"new c"
            (merged / "new-file").write_text("writable")
            assert mount.status(layer_dirs[1])["reads"] >= 1
            proc = run_crfs("umount", str(merged))
            assert proc.returncode == 0, proc.stderr
            assert not mount.is_mounted(merged) and not any(mount.is_mounted(d) for d in layer_dirs)
            assert not image_mount.image_dir(merged).exists()
        finally:
            _clean_up(merged, layer_dirs, pids)


def test_crfs_mount_docker_image_keeps_a_named_upper_dir(tmp_path: Path) -> None:
    merged, upper = tmp_path / "rootfs", tmp_path / "changes"
    merged.mkdir()
    with Registry(tmp_path / "registry") as registry:
        ref = _push_image(registry.host, list(two_layers(tmp_path)))
        proc = run_crfs("mount", ref, str(merged), "--upper", str(upper), "--no-background-fetch")
        assert proc.returncode == 0, proc.stderr
        pids = json.loads(proc.stdout)["pids"]
        layer_dirs = [image_mount.image_dir(merged) / "layers" / str(i) for i in range(2)]
        try:
            (merged / "new-file").write_text("kept")
            assert run_crfs("umount", str(merged)).returncode == 0
            assert (upper / "new-file").read_text() == "kept"  # the changes outlive the mount
            assert not (tmp_path / "changes.crfs-work").exists()
        finally:
            _clean_up(merged, layer_dirs, pids)
    bad = run_crfs("mount", "--upper", str(upper), str(tmp_path / "x.stargz"), str(merged))
    assert bad.returncode == 2 and "docker://" in bad.stderr
