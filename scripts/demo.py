"""What crfs is for, end to end on this machine: starting a container before
its image is downloaded.

1. The python image that scripts/build-images.sh caches (Debian 12 minbase +
   python3, three gzip layers, ~68 MB compressed) is pushed to a local
   docker-registry, with a counting proxy in front of it that records every
   request (and so every byte the registry serves).
2. ``crfs convert`` rewrites it, registry to registry, as eStargz.
3. Side by side, into one containerd whose proxy snapshotter is ``crfs
   serve``, and each followed by ``ctr run --rm --snapshotter crfs REF ID
   python3 -c 'print("hello")'``:
   - an ordinary pull of the gzip image (``ctr images pull --snapshotter
     crfs``: every layer is downloaded and unpacked first);
   - a lazy pull of the eStargz image (``crfs rpull``: every layer is
     mounted lazily; the container reads only what it needs).
   For each: the pull time, the time from the start of the pull to the
   container's first output line, and the bytes the registry had served at
   that moment, beside the image's compressed size. crfs runs with
   ``background_fetch = false`` (see CONFIG), so the lazy row's bytes are
   what the container needed.
4. Without containerd: ``crfs mount docker://`` of the eStargz image and the
   same command in a chroot of it.

Both images are then removed (crfs's store must be empty again) and
everything started here is stopped and removed. Exits non-zero, saying
what failed, on any failure.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness import HarnessError, require_binary  # noqa: E402
from harness.containerd import Containerd  # noqa: E402
from harness.crfs import CrfsServer  # noqa: E402
from harness.fixtures import blob_sizes, lazy_stack  # noqa: E402
from harness.flow import CRFS, remove_image, wait_clean  # noqa: E402
from harness.images import push_image  # noqa: E402
from harness.mounts import mounts_under  # noqa: E402
from harness.pyimage import python_image  # noqa: E402
from registry.faultproxy import FaultProxy  # noqa: E402

CMD = ("python3", "-c", 'print("hello")')
SHOWN_CMD = shlex.join(CMD)
# Background fetch (on by default: from 2 s after mounting a layer, when
# reads pause, crfs fetches the rest of it, one layer at a time, at up to
# 16 MiB/s) is off here, as in tests/test_lazy_pull.py, so that the bytes
# counted are those the container needed.
CONFIG = """\
# crfs serve --config, for the demo (the defaults but background_fetch)
remote_snapshots = true
background_fetch = false
remote_mount_timeout = 20.0
fetch_deadline = 30.0
"""
LAZY_LINE = re.compile(r"^layer \d+/\d+ sha256:\w+ lazy$", re.M)
TIMEOUT = 600.0


class DemoError(Exception):
    """A step failed; the message says which and why."""


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def note(text: str) -> None:
    print(f"    {text}", flush=True)


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


@dataclass
class Row:
    name: str
    pull: float  # seconds the pull took
    first_output: float  # seconds from the start of the pull to the first output line
    served: int  # blob bytes the registry had served at the first output line
    size: int  # the image's compressed size (its layers)


class Counter:
    """Blob bytes served through the proxy, counted as tests/test_lazy_pull.py
    does: a ranged GET counts its ranges, a plain GET the blob's size."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.blob_sizes: dict[str, int] = {}

    def learn(self, ref: str) -> int:
        """Record the sizes of ``ref``'s blobs; returns its layers' total."""
        sizes, layers_total = blob_sizes(ref)
        self.blob_sizes.update(sizes)
        return layers_total

    def served(self) -> int:
        return self.proxy.blob_bytes(self.blob_sizes)


def run_until_first_line(argv: list[str], on_first_line, what: str) -> str:
    """Run ``argv``, call ``on_first_line()`` as soon as it prints its first
    stdout line, wait for it to exit 0; returns that line."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
        watchdog = threading.Timer(TIMEOUT, proc.kill)
        watchdog.start()
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            if first:
                on_first_line()
            proc.stdout.read()
            code = proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if code != 0 or not first:
            err.seek(0)
            raise DemoError(f"{what} failed (exit {code}, first line {first!r}):\n"
                            f"{err.read().decode(errors='replace')}")
        return first.rstrip("\n")


def crfs_cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(["crfs", *args], capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode != 0:
        raise DemoError(f"crfs {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr}")
    return proc


class Demo:
    def __init__(self, ctrd: Containerd, crfs: CrfsServer, counter: Counter) -> None:
        self.ctrd = ctrd
        self.crfs = crfs
        self.counter = counter
        self.ctr = require_binary("ctr")

    def ctr_run_argv(self, ref: str, container: str) -> list[str]:
        return [self.ctr, "--address", str(self.ctrd.address), "--namespace", self.ctrd.namespace,
                "run", "--rm", "--snapshotter", CRFS, ref, container, *CMD]

    def pull_and_run(self, name: str, ref: str, size: int, pull, container: str) -> Row:
        self.counter.proxy.clear()
        started = time.monotonic()
        pull()
        pulled = time.monotonic()
        note(f"pulled in {pulled - started:.2f} s; registry served {mb(self.counter.served())} so far")
        note(f"ctr run --rm --snapshotter crfs {ref} {container} {SHOWN_CMD}")
        first: dict[str, float] = {}

        def mark() -> None:
            first["at"] = time.monotonic()
            first["served"] = self.counter.served()

        line = run_until_first_line(self.ctr_run_argv(ref, container), mark, "ctr run")
        row = Row(name, pulled - started, first["at"] - started, int(first["served"]), size)
        note(f"container printed {line!r} {row.first_output:.2f} s after the pull started "
             f"({first['at'] - pulled:.2f} s after ctr run); registry had served {mb(row.served)} "
             f"of the {mb(size)} image")
        return row

    def ordinary(self, ref: str, size: int) -> Row:
        step(f"[1/2] ordinary pull of the gzip image: ctr images pull --snapshotter crfs {ref}")
        pull = lambda: self.ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", CRFS, ref,  # noqa: E731
                                     timeout=TIMEOUT)
        return self.pull_and_run("ordinary pull (gzip)", ref, size, pull, "demo-gzip")

    def lazy(self, ref: str, size: int) -> Row:
        step(f"[2/2] lazy pull of the eStargz image: crfs rpull --address {self.ctrd.address} "
             f"--namespace {self.ctrd.namespace} {ref}")

        def pull() -> None:
            out = crfs_cli("rpull", "--address", str(self.ctrd.address), "--namespace", self.ctrd.namespace, ref)
            lazy = len(LAZY_LINE.findall(out.stderr))
            if lazy == 0:
                raise DemoError(f"crfs rpull mounted no layer lazily:\n{out.stderr}{self.crfs.stderr_tail()}")
            note(f"{lazy} of 3 layers mounted lazily: nothing downloaded but their TOCs")

        return self.pull_and_run("lazy pull (eStargz)", ref, size, pull, "demo-esgz")


def table(rows: list[Row]) -> None:
    head = f"{'':22} {'pull':>8} {'first output':>13} {'registry served':>16} {'image size':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.name:22} {r.pull:7.2f}s {r.first_output:12.2f}s {mb(r.served):>16} {mb(r.size):>11}")
    plain, lazy = rows
    print(f"{'lazy / ordinary':22} {lazy.pull / plain.pull:7.1%} {lazy.first_output / plain.first_output:12.1%} "
          f"{lazy.served / plain.served:15.1%} {'':>11}")
    print("first output: from the start of the pull to the container's first output line.\n"
          "registry served: blob bytes the registry had sent by then (config included), counted by the proxy.\n"
          "crfs runs with background_fetch = false here, so the lazy row's bytes are what python3 read; with\n"
          "the default (true) crfs then fetches the rest of each layer in the background, when reads pause.\n"
          "The registry is on loopback, where downloading is nearly free: over a real network the ordinary\n"
          "pull's time grows with the image's size, the lazy pull's with what the container reads.", flush=True)


def chroot_run(esgz: str, work: Path, counter: Counter, size: int) -> None:
    rootfs = work / "rootfs"
    rootfs.mkdir()
    step(f"without containerd: crfs mount docker://{esgz} {rootfs} --no-background-fetch; chroot {SHOWN_CMD}")
    counter.proxy.clear()
    started = time.monotonic()
    crfs_cli("mount", f"docker://{esgz}", str(rootfs), "--cache-dir", str(work / "mount-cache"), "--no-background-fetch")
    try:
        line = run_until_first_line(["chroot", str(rootfs), *CMD], lambda: None, "chroot python3")
        note(f"printed {line!r} {time.monotonic() - started:.2f} s after the mount started; registry served "
             f"{mb(counter.served())} of {mb(size)}")
    finally:
        crfs_cli("umount", str(rootfs))


def main() -> int:
    image = python_image()
    with lazy_stack(CONFIG, "crfs-demo-") as stack:
        work, registry, proxy, crfs, ctrd = stack.workdir, stack.registry, stack.proxy, stack.crfs, stack.containerd
        step(f"registry {registry.host} behind a counting proxy {proxy.host}; crfs serve --config {work / 'crfs.toml'} "
             f"(background_fetch = false); "
             f"containerd {ctrd.address} with crfs as its proxy snapshotter")

        started = time.monotonic()
        gzip_ref = push_image(image, registry.host, "demo/python")
        counter = Counter(proxy)
        gzip_size = counter.learn(gzip_ref)
        step(f"pushed the python image (Debian 12 minbase + python3, 3 gzip layers, {mb(gzip_size)}) "
             f"as {gzip_ref} in {time.monotonic() - started:.1f} s")

        esgz_ref = f"{registry.host}/demo/python:esgz"
        step(f"crfs convert {gzip_ref} {esgz_ref}")
        started = time.monotonic()
        crfs_cli("convert", gzip_ref, esgz_ref)
        esgz_size = counter.learn(esgz_ref)
        note(f"converted to eStargz in {time.monotonic() - started:.1f} s ({mb(esgz_size)})")

        demo = Demo(ctrd, crfs, counter)
        via = lambda ref: f"{proxy.host}/{ref.split('/', 1)[1]}"  # noqa: E731
        rows = [demo.ordinary(via(gzip_ref), gzip_size), demo.lazy(via(esgz_ref), esgz_size)]
        print(flush=True)
        table(rows)
        print(flush=True)

        chroot_run(via(esgz_ref), work, counter, esgz_size)

        step("removing both images (ctr images rm --sync + GC)")
        for ref in (via(gzip_ref), via(esgz_ref)):
            remove_image(ctrd, ref)
        left = wait_clean(ctrd, CRFS, crfs_root=crfs.root, crfs_address=crfs.address)
        layers = os.listdir(crfs.root / "layers") if (crfs.root / "layers").is_dir() else []
        if left or layers or mounts_under(crfs.root):
            raise DemoError(f"left behind after removing the images: {left}, layers {layers}, "
                            f"mounts {mounts_under(crfs.root)}")
        note("crfs store empty: no snapshot, no layer mount, no layer process left")
        step("stopping containerd, crfs, the proxy and the registry; removing " + str(work))
    step("done")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (DemoError, HarnessError) as e:
        print(f"demo: FAILED: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        sys.exit(130)
