"""The main job, end to end: a local registry, containerd with crfs as its
proxy snapshotter, an image pushed to the registry, pulled through crfs and
run as a container. Everything it starts is stopped and removed at the end.

Lazy pulling (eStargz, `crfs rpull`) joins this flow with the next issues;
today the pull is an ordinary one, with crfs preparing every snapshot.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness import build_whiteout_image, containerd_stack, crfs_snapshot_names, push_image, temp_workdir  # noqa: E402
from harness.flow import CRFS, pull, remove_image, run_sh, wait_clean  # noqa: E402

SCRIPT = "echo hello from a container on crfs; echo layers: $(ls /)"


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def main() -> int:
    with temp_workdir("crfs-demo-") as work:
        step("building a 3-layer busybox image (whiteout + opaque dir)")
        image = build_whiteout_image(work / "image")
        with containerd_stack(with_crfs=True) as stack:
            ref = push_image(image, stack.registry.host, "demo/busybox")
            step(f"pushed {ref}; containerd {stack.containerd.address}, crfs {stack.crfs.address}")
            started = time.monotonic()
            pull(stack.containerd, ref, CRFS)
            pulled = time.monotonic()
            step(f"pulled through crfs in {pulled - started:.2f}s: {len(crfs_snapshot_names(stack.crfs.address))} snapshots")
            out = run_sh(stack.containerd, ref, CRFS, "crfs-demo", SCRIPT)
            step(f"container ran in {time.monotonic() - pulled:.2f}s; it printed:")
            print(out.stdout, end="", flush=True)
            remove_image(stack.containerd, ref)
            left = wait_clean(stack.containerd, CRFS, crfs_root=stack.crfs.root, crfs_address=stack.crfs.address)
            step("image removed; crfs store empty" if not left else f"left behind: {left}")
            return 0 if not left else 1


if __name__ == "__main__":
    sys.exit(main())
