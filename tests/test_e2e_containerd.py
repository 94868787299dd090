"""End to end through the real containerd: pull a three-layer image with a
whiteout and an opaque directory from a local registry, run containers on
it, delete it, and check that nothing is left in the snapshotter.

Every test runs twice: with containerd's builtin ``overlayfs`` snapshotter
as the control (a failure there is in the image or the harness, not in
crfs) and with ``crfs`` as a proxy plugin. Missing tools fail, never skip.
"""

from __future__ import annotations

import time
from typing import Iterator

import pytest

from harness import OciImage, Stack, build_whiteout_image, containerd_stack, layer_members, push_image
from harness import images
from harness.flow import CRFS, OVERLAYFS, entries, crfs_snapshot_dir, leftovers, pull, remove_image, run_sh, wait_clean
from harness.proc import HarnessError
from harness.snapshots_client import crfs_snapshot_names

pytestmark = pytest.mark.e2e

REPO = "crfs/whiteout"
LAYERS = 3

# Prints one key=value per fact about the merged rootfs, then changes it.
FIRST_RUN = rf"""
if [ -e {images.DELETED_FILE} ]; then echo deleted=present; else echo deleted=absent; fi
echo "data=$(ls -A {images.OPAQUE_DIR} | tr '\n' ' ')"
echo "etc_hidden=$(ls -A /etc | grep '^\.' | tr '\n' ' ')"
echo "kept=$(cat {images.KEPT_FILE})"
echo "layer3=$(cat {images.LAYER3_FILE})"
echo scribble > /written-by-first-run
rm {images.KEPT_FILE}
echo changed > {images.LAYER3_FILE}
echo "wrote=$(cat /written-by-first-run)"
"""

# Sees whether the first container's changes reached the image.
SECOND_RUN = rf"""
if [ -e /written-by-first-run ]; then echo leaked=yes; else echo leaked=no; fi
echo "kept=$(cat {images.KEPT_FILE})"
echo "layer3=$(cat {images.LAYER3_FILE})"
"""

EXPECTED_FIRST = {
    "deleted": "absent",
    "data": " ".join(images.OPAQUE_NEW),
    "etc_hidden": "",
    "kept": images.KEPT_TEXT,
    "layer3": images.LAYER3_TEXT,
    "wrote": "scribble",
}
EXPECTED_SECOND = {"leaked": "no", "kept": images.KEPT_TEXT, "layer3": images.LAYER3_TEXT}


@pytest.fixture(scope="module")
def whiteout_image(tmp_path_factory: pytest.TempPathFactory) -> OciImage:
    return build_whiteout_image(tmp_path_factory.mktemp("whiteout-image"))


@pytest.fixture(scope="module", params=[OVERLAYFS, CRFS])
def snapshotter_stack(request: pytest.FixtureRequest) -> Iterator[tuple[str, Stack]]:
    with containerd_stack(with_crfs=request.param == CRFS) as stack:
        yield request.param, stack


def facts(stdout: str) -> dict[str, str]:
    """The key=value lines a probe script printed."""
    pairs = (line.split("=", 1) for line in stdout.splitlines() if "=" in line)
    return {key: value.strip() for key, value in pairs}


def crfs_store(stack: Stack) -> dict:
    return {"crfs_root": stack.crfs.root, "crfs_address": stack.crfs.address} if stack.crfs else {}


def with_logs(stack: Stack, error: Exception) -> AssertionError:
    """The error plus crfs's log tail, which ctr's output never shows."""
    tail = f"\n--- crfs log tail ---\n{stack.crfs.stderr_tail()}" if stack.crfs else ""
    return AssertionError(f"{error}{tail}")


def pull_run_remove(snapshotter: str, stack: Stack, image: OciImage, via_env: bool) -> None:
    """The whole life of one image: pull, two runs, delete, nothing left."""
    ctrd = stack.containerd
    form = "env" if via_env else "flag"
    assert leftovers(ctrd, snapshotter, **crfs_store(stack)) == {}, "store not empty before the pull"

    ref = push_image(image, stack.registry.host, REPO)
    pull(ctrd, ref, snapshotter, via_env=via_env)
    assert len(ctrd.snapshot_keys(snapshotter)) == LAYERS
    if stack.crfs:
        assert len(crfs_snapshot_names(stack.crfs.address)) == LAYERS
        assert len(entries(crfs_snapshot_dir(stack.crfs.root))) == LAYERS

    first = run_sh(ctrd, ref, snapshotter, f"e2e-{snapshotter}-{form}-1", FIRST_RUN, via_env=via_env)
    assert facts(first.stdout) == EXPECTED_FIRST, first.stdout
    second = run_sh(ctrd, ref, snapshotter, f"e2e-{snapshotter}-{form}-2", SECOND_RUN, via_env=via_env)
    assert facts(second.stdout) == EXPECTED_SECOND, second.stdout

    remove_image(ctrd, ref)
    assert wait_clean(ctrd, snapshotter, **crfs_store(stack)) == {}, "snapshots left after image rm + GC"


def test_image_layers_carry_whiteouts(whiteout_image: OciImage) -> None:
    layers = [images.names(m) for m in layer_members(whiteout_image)]
    assert len(layers) == LAYERS
    assert {"bin/busybox", "bin/sh", "etc/deleted.txt", "data/old1", "data/old2"} <= layers[0]
    assert set(images.LAYER2_WHITEOUTS) | {"data/new1"} <= layers[1]
    assert images.LAYER3_FILE.lstrip("/") in layers[2]


@pytest.mark.parametrize("via_env", [False, True], ids=["snapshotter-flag", "snapshotter-env"])
def test_pull_run_remove(snapshotter_stack: tuple[str, Stack], whiteout_image: OciImage, via_env: bool) -> None:
    snapshotter, stack = snapshotter_stack
    try:
        pull_run_remove(snapshotter, stack, whiteout_image, via_env)
    except (AssertionError, HarnessError) as e:
        raise with_logs(stack, e) from e


def run_when_reconnected(stack: Stack, ref: str, container_id: str, script: str, timeout: float = 30.0) -> str:
    """containerd's proxy client backs off after losing crfs, failing calls
    fast as UNAVAILABLE until it redials; retry only that, for a while."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return run_sh(stack.containerd, ref, CRFS, container_id, script).stdout
        except HarnessError as e:
            if "unavailable" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_crfs_sigkill_restart_keeps_pulled_image(whiteout_image: OciImage) -> None:
    """A crashed crfs restarted on the same root still serves the image
    containerd pulled before the crash, and still cleans it up."""
    with containerd_stack(with_crfs=True) as stack:
        try:
            ref = push_image(whiteout_image, stack.registry.host, REPO)
            pull(stack.containerd, ref, CRFS)
            stack.crfs.kill()
            stack.crfs.start()
            out = run_when_reconnected(stack, ref, "after-restart", FIRST_RUN)
            assert facts(out) == EXPECTED_FIRST, out
            remove_image(stack.containerd, ref)
            assert wait_clean(stack.containerd, CRFS, **crfs_store(stack)) == {}
            assert stack.crfs.stop() == 0, "crfs did not exit cleanly on SIGTERM"
        except (AssertionError, HarnessError) as e:
            raise with_logs(stack, e) from e
