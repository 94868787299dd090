"""Pulling the Kubernetes way: containerd's CRI plugin (gRPC
``runtime.v1.ImageService`` on containerd's socket, what the kubelet and
``crictl pull`` use) pulls the three-layer whiteout image from a local
registry and unpacks it into crfs, with the snapshot annotations on.

Checked: the image is there for CRI (ImageStatus, ListImages), crfs holds
one committed snapshot per layer, and those carry the labels CRI adds for
remote snapshotters (``containerd.io/snapshot/cri.image-ref``,
``cri.layer-digest``); RemoveImage + GC leave nothing in containerd or crfs.
The builtin overlayfs snapshotter runs the same steps as the control.
Missing tools fail, never skip.
"""

from __future__ import annotations

import contextlib
import os
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Optional

import pytest

from harness import OciImage, build_whiteout_image, push_image
from harness.containerd import CRI_NAMESPACE, Containerd
from harness.cri import CriImageClient
from harness.crfs import CrfsServer
from harness.fixtures import temp_workdir
from harness.flow import CRFS, OVERLAYFS, crfs_snapshot_dir, entries, overlayfs_snapshot_dir
from harness.images import manifest
from harness.proc import HarnessError
from harness.registry import Registry
from harness.snapshots_client import SnapshotsClient

pytestmark = pytest.mark.e2e

REPO = "crfs/cri-whiteout"
LAYERS = 3
LABEL_PREFIX = "containerd.io/snapshot/cri."
IMAGE_REF_LABEL = LABEL_PREFIX + "image-ref"
LAYER_DIGEST_LABEL = LABEL_PREFIX + "layer-digest"
MANIFEST_DIGEST_LABEL = LABEL_PREFIX + "manifest-digest"
COMMITTED = 3  # snapshots.v1.Kind.COMMITTED


class CriStack:
    """A registry, crfs (unless the control) and containerd with CRI on."""

    def __init__(self, workdir: Path, registry: Registry, containerd: Containerd, crfs: Optional[CrfsServer]):
        self.workdir, self.registry, self.containerd, self.crfs = workdir, registry, containerd, crfs

    def cri(self) -> CriImageClient:
        return CriImageClient(self.containerd.address)

    def snapshot_keys(self, snapshotter: str) -> list[str]:
        """What containerd lists for ``snapshotter`` in CRI's namespace."""
        out = self.containerd.ctr("snapshots", "--snapshotter", snapshotter, "ls", namespace=CRI_NAMESPACE).stdout
        return [line.split()[0] for line in out.splitlines()[1:] if line.strip()]

    def leftovers(self, snapshotter: str) -> dict[str, list[str]]:
        found = {"ctr snapshots ls": self.snapshot_keys(snapshotter),
                 "ctr images ls": self.containerd.ctr("images", "ls", "-q", namespace=CRI_NAMESPACE).stdout.split()}
        if self.crfs:
            with SnapshotsClient(self.crfs.address) as client:
                found["crfs List"] = sorted(info.name for info in client.list())
            found["crfs snapshot dirs"] = entries(crfs_snapshot_dir(self.crfs.root))
        else:
            found["overlayfs snapshot dirs"] = entries(overlayfs_snapshot_dir(self.containerd))
        return {where: items for where, items in found.items() if items}

    def wait_clean(self, snapshotter: str, timeout: float = 15.0) -> dict[str, list[str]]:
        deadline = time.monotonic() + timeout
        while True:
            left = self.leftovers(snapshotter)
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.3)

    def logs(self) -> str:
        parts = [f"--- containerd log tail ---\n{self.containerd.daemon.stderr_tail()}"] if self.containerd.daemon else []
        if self.crfs:
            parts.append(f"--- crfs log tail ---\n{self.crfs.stderr_tail()}")
        return "\n".join(parts)


@contextmanager
def cri_stack(with_crfs: bool) -> Iterator[CriStack]:
    """Like harness.containerd_stack, with containerd's CRI plugin on and
    allowed to pull over plain HTTP from the test registry."""
    with ExitStack() as stack:
        base = stack.enter_context(temp_workdir("crfs-cri-"))
        registry = stack.enter_context(Registry(base / "registry"))
        server = stack.enter_context(CrfsServer(base / "crfs-root", base / "crfs.sock")) if with_crfs else None
        containerd = stack.enter_context(Containerd(
            crfs_address=server.address if server else None, workdir=base / "ctrd",
            cri=True, cri_registries=[registry.host]))
        yield CriStack(base, registry, containerd, server)


@pytest.fixture(scope="module")
def whiteout_image(tmp_path_factory: pytest.TempPathFactory) -> OciImage:
    return build_whiteout_image(tmp_path_factory.mktemp("cri-whiteout-image"))


def committed_labels(crfs: CrfsServer) -> dict[str, dict[str, str]]:
    """Labels of every committed snapshot crfs holds, by name (crfs's List)."""
    with SnapshotsClient(crfs.address) as client:
        return {info.name: dict(info.labels) for info in client.list() if info.kind == COMMITTED}


def pull_check_remove(stack: CriStack, snapshotter: str, image: OciImage) -> None:
    layer_digests = [desc["digest"] for desc in manifest(image)["layers"]]
    assert stack.leftovers(snapshotter) == {}, "not empty before the pull"
    ref = push_image(image, stack.registry.host, REPO)
    with stack.cri() as cri:
        assert cri.status(ref) is None
        image_id = cri.pull(ref)
        assert image_id.startswith("sha256:"), image_id

        status = cri.status(ref)
        assert status is not None, "ImageStatus: pulled image not found"
        assert status.id == image_id
        assert ref in status.repo_tags
        assert status.size > 0
        assert image_id in {img.id for img in cri.list()}

        assert len(stack.snapshot_keys(snapshotter)) == LAYERS
        if stack.crfs:
            labels = committed_labels(stack.crfs)
            assert len(labels) == LAYERS, labels
            assert len(entries(crfs_snapshot_dir(stack.crfs.root))) == LAYERS
            # What CRI's snapshot annotations put on the snapshots crfs committed.
            seen = sorted(labels[name].get(LAYER_DIGEST_LABEL, "") for name in labels)
            assert seen == sorted(layer_digests), f"cri.layer-digest labels: {labels}"
            for name, lab in labels.items():
                assert lab.get(IMAGE_REF_LABEL) == ref, f"{name}: {lab}"
                assert lab.get(MANIFEST_DIGEST_LABEL, "").startswith("sha256:"), f"{name}: {lab}"

        cri.remove(ref)
        assert cri.status(ref) is None, "ImageStatus still finds the removed image"
        cri.remove(ref)  # idempotent
    stack.containerd.gc()
    assert stack.wait_clean(snapshotter) == {}, "left after RemoveImage + GC"


@pytest.mark.parametrize("snapshotter", [OVERLAYFS, CRFS])
def test_cri_pull_image(snapshotter: str, whiteout_image: OciImage) -> None:
    with cri_stack(with_crfs=snapshotter == CRFS) as stack:
        try:
            pull_check_remove(stack, snapshotter, whiteout_image)
        except (AssertionError, HarnessError) as e:
            raise AssertionError(f"{e}\n{stack.logs()}") from e


def test_cri_pull_of_an_estargz_image_mounts_every_layer_lazily(whiteout_image: OciImage) -> None:
    """With the annotations CRI passes, crfs mounts each eStargz layer from
    the registry instead of letting containerd download it."""
    import subprocess

    from lazyfs import mount

    with cri_stack(with_crfs=True) as stack:
        try:
            assert stack.crfs is not None
            plain = push_image(whiteout_image, stack.registry.host, REPO)
            ref = f"{stack.registry.host}/{REPO}:esgz"
            subprocess.run(["crfs", "convert", plain, ref], check=True, capture_output=True, timeout=300)
            layers_dir = stack.crfs.root / "layers"
            try:
                with stack.cri() as cri:
                    cri.pull(ref)
                    labels = committed_labels(stack.crfs)
                    assert len(labels) == LAYERS
                    assert all(lab.get("containerd.io/snapshot/remote") for lab in labels.values()), labels
                    mounted = sorted(os.listdir(layers_dir))
                    assert len(mounted) == LAYERS and all(mount.is_mounted(layers_dir / m) for m in mounted)
                    # containerd never downloaded a layer: only manifest + config are in its content store
                    blobs = stack.containerd.ctr("content", "ls", "-q", namespace=CRI_NAMESPACE).stdout.split()
                    assert len(blobs) == 2, blobs
                    cri.remove(ref)
                stack.containerd.gc()
                assert stack.wait_clean(CRFS) == {}
                assert os.listdir(layers_dir) == []
            finally:
                for name in os.listdir(layers_dir) if layers_dir.is_dir() else []:
                    with contextlib.suppress(mount.MountError):
                        mount.unmount(layers_dir / name)
        except (AssertionError, HarnessError, subprocess.CalledProcessError) as e:
            raise AssertionError(f"{e}\n{stack.logs()}") from e
