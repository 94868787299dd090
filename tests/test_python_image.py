"""A realistic image through crfs: Debian 12 minbase + python3 (three
layers, ~160 MB uncompressed, built once by scripts/build-images.sh), pushed
to a local registry, pulled with ``ctr images pull --snapshotter crfs`` and
run with ``ctr run``; then deleted, leaving nothing in crfs.

A missing image fails (the message names the script), never skips.
"""

from __future__ import annotations

import time

import pytest

from harness import containerd_stack, push_image
from harness.flow import CRFS, crfs_snapshot_dir, entries, leftovers, pull, remove_image, wait_clean
from harness.proc import HarnessError
from harness.pyimage import LAYERS, layer_sizes, python_image, uncompressed_sizes
from harness.snapshots_client import crfs_snapshot_names

pytestmark = pytest.mark.e2e

REPO = "crfs/python"
GREETING = "hello from python"
MB = 1000 * 1000


def test_python_image_is_cached() -> None:
    image = python_image()
    sizes = layer_sizes(image)
    assert len(sizes) == LAYERS
    assert sum(sizes) > 30 * MB, f"compressed layers too small for a python image: {sizes}"
    tars = uncompressed_sizes(image)
    assert sum(tars) >= 100 * MB, f"uncompressed layers: {tars}"
    assert tars[0] > tars[2] and tars[1] > tars[2], f"layer 3 should be the small app layer: {tars}"


def test_pull_and_run_python_through_crfs() -> None:
    image = python_image()
    with containerd_stack(with_crfs=True) as stack:
        ctrd, crfs = stack.containerd, stack.crfs
        store = {"crfs_root": crfs.root, "crfs_address": crfs.address}
        try:
            assert leftovers(ctrd, CRFS, **store) == {}, "store not empty before the pull"
            ref = push_image(image, stack.registry.host, REPO)

            started = time.monotonic()
            pull(ctrd, ref, CRFS)
            pulled = time.monotonic() - started
            assert len(ctrd.snapshot_keys(CRFS)) == LAYERS
            assert len(crfs_snapshot_names(crfs.address)) == LAYERS
            assert len(entries(crfs_snapshot_dir(crfs.root))) == LAYERS

            out = ctrd.ctr("run", "--rm", "--snapshotter", CRFS, ref, "py-hello",
                           "python3", "-c", f'print("{GREETING}")').stdout
            assert out.strip() == GREETING, out
            # The image's own Cmd (python3 /app/hello.py, from layer 3) and WorkingDir.
            app = ctrd.ctr("run", "--rm", "--snapshotter", CRFS, ref, "py-app").stdout
            assert app.startswith("hello from python 3."), app
            print(f"pull through crfs: {pulled:.1f} s")

            remove_image(ctrd, ref)
            assert wait_clean(ctrd, CRFS, **store) == {}, "snapshots left after image rm + GC"
        except (AssertionError, HarnessError) as e:
            raise AssertionError(f"{e}\n--- crfs log tail ---\n{crfs.stderr_tail()}") from e
