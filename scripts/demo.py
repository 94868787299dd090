"""The main job, end to end, on a local registry:

1. containerd with crfs as its proxy snapshotter pulls an image and runs a
   container from it (an ordinary pull: crfs prepares every snapshot);
2. `crfs convert` rewrites the image as eStargz, and `crfs mount docker://`
   mounts it lazily: a command runs in it (chroot) after fetching only what
   it reads, shown beside the image's size.

Lazy pulling into containerd itself (`crfs rpull`) joins with the next
issue. Everything started here is stopped and removed at the end.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness import build_whiteout_image, containerd_stack, crfs_snapshot_names, push_image, temp_workdir  # noqa: E402
from harness.flow import CRFS, pull, remove_image, run_sh, wait_clean  # noqa: E402
from harness.images import manifest  # noqa: E402
from lazyfs import image_mount, mount  # noqa: E402

FILLER_MB = 32  # data the lazy run never reads

SCRIPT = "echo hello from a container on crfs; echo layers: $(ls /)"


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def main() -> int:
    with temp_workdir("crfs-demo-") as work:
        step("building a 3-layer busybox image (whiteout + opaque dir)")
        image = build_whiteout_image(work / "image", filler_bytes=FILLER_MB << 20)
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
            if left:
                return 1
            lazy_run(stack.registry.host, ref, image, work)
            return 0


def crfs(*args: str) -> str:
    proc = subprocess.run(["crfs", *args], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"crfs {' '.join(args)} failed:\n{proc.stderr}")
    return proc.stdout


def lazy_run(host: str, ref: str, image, work: Path) -> None:
    esgz = f"{host}/demo/busybox:esgz"
    step(f"crfs convert {ref} {esgz}")
    crfs("convert", ref, esgz)
    size = sum(layer["size"] for layer in manifest(image)["layers"])
    rootfs = work / "rootfs"
    rootfs.mkdir()
    step(f"crfs mount docker://{esgz} {rootfs} (lazily: nothing is downloaded yet)")
    started = time.monotonic()
    crfs("mount", f"docker://{esgz}", str(rootfs), "--cache-dir", str(work / "cache"), "--no-background-fetch")
    try:
        out = subprocess.run(["chroot", str(rootfs), "/bin/sh", "-c", "cat /etc/layer3.txt"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        elapsed = time.monotonic() - started
        layers = sorted((image_mount.image_dir(rootfs) / "layers").iterdir())
        fetched = sum(mount.status(d)["store"]["fetch"]["bytes_fetched"] for d in layers)
        step(f"first output {elapsed:.2f}s after the mount started; the command printed: {out.strip()}")
        step(f"fetched {fetched / 1e6:.2f} MB of a {size / 1e6:.1f} MB image ({100 * fetched / size:.1f} %)")
    finally:
        crfs("umount", str(rootfs))


if __name__ == "__main__":
    sys.exit(main())
