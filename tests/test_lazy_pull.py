"""Lazy pulling end to end, with every real part: the python image built by
scripts/build-images.sh (Debian minbase + python3, three layers) converted
with ``crfs convert`` and pushed to a real docker-registry; ``crfs rpull``
into a real containerd; ``ctr run --snapshotter crfs`` of python3 on it.
A counting proxy in front of the registry sees every byte the layers cost.

Proven here: a fraction of the image is fetched before the first output;
plain gzip layers still run (fallback); a killed layer process or a killed
``crfs serve`` never makes a container read wrong bytes, and a restarted
crfs serves new containers; ``ctr images rm`` + GC leaves no mount and no
process; a registry that vanishes leaves cached files readable and fails
the others with EIO in bounded time.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import images
from harness.containerd import Containerd
from harness.crfs import CrfsServer
from harness.fixtures import blob_sizes, lazy_stack
from harness.flow import wait_clean
from harness.mounts import mounts_under
from harness.pyimage import python_image
from harness.registry import Registry
from lazyfs import mount
from registry.faultproxy import FaultProxy

pytestmark = pytest.mark.e2e

FETCH_DEADLINE = 5.0
# Background fetch is off so that the bytes counted are those the container
# needed; with it on, the rest of the layer follows at up to 16 MiB/s.
CONFIG = f"""
remote_mount_timeout = 20.0
fetch_deadline = {FETCH_DEADLINE}
background_fetch = false
mount_check_interval = 0.2
"""
HELLO = 'import json, email.parser; print("hello from", __import__("sys").version.split()[0])'
UNREAD = "/usr/lib/python3.11/pydoc_data/topics.py"  # big, never read by HELLO
UNREAD_2 = "/usr/bin/perl"  # in another layer, read by no other test
LAZY_LINE = re.compile(r"^layer \d+/\d+ sha256:\w+ lazy$", re.M)


@dataclass
class Lazy:
    workdir: Path
    registry: Registry
    proxy: FaultProxy
    crfs: CrfsServer
    ctrd: Containerd
    esgz: str  # the eStargz image, through the proxy
    gzip: str  # the same image, plain gzip layers, through the proxy
    blob_sizes: dict[str, int]
    esgz_size: int  # compressed size of the eStargz layers

    def rpull(self, ref: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            ["crfs", "rpull", "--address", str(self.ctrd.address), "--namespace", self.ctrd.namespace, ref],
            capture_output=True, text=True, timeout=300,
        )
        if check:
            assert proc.returncode == 0, proc.stderr + self.crfs.stderr_tail()
        return proc

    def run(self, ref: str, name: str, *cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.ctrd.ctr("run", "--rm", "--snapshotter", "crfs", ref, name, *cmd, check=check, timeout=timeout)

    def blob_bytes(self) -> int:
        """Bytes of blobs the registry served through the proxy so far."""
        return self.proxy.blob_bytes(self.blob_sizes)

    def layer_pids(self) -> dict[str, int]:
        layers = self.crfs.root / "layers"
        pids = {}
        for name in sorted(os.listdir(layers)) if layers.is_dir() else []:
            with contextlib.suppress(mount.MountError, ValueError):
                pids[name] = int(mount.status(layers / name)["pid"])
        return pids

    def remove_image(self, ref: str) -> None:
        self.ctrd.ctr("images", "rm", "--sync", ref)
        self.ctrd.gc()


@pytest.fixture(scope="module")
def lazy() -> Iterator[Lazy]:
    image = python_image()
    with lazy_stack(CONFIG) as stack:
        registry = stack.registry
        gzip_ref = images.push_image(image, registry.host, "py/app")
        esgz_ref = f"{registry.host}/py/app:esgz"
        subprocess.run(["crfs", "convert", gzip_ref, esgz_ref], check=True, capture_output=True, timeout=600)
        esgz_sizes, esgz_size = blob_sizes(esgz_ref)
        gzip_sizes, _ = blob_sizes(gzip_ref)
        yield Lazy(stack.workdir, registry, stack.proxy, stack.crfs, stack.containerd, f"{stack.proxy.host}/py/app:esgz",
                   f"{stack.proxy.host}/{gzip_ref.split('/', 1)[1]}", {**esgz_sizes, **gzip_sizes}, esgz_size)


@pytest.fixture
def pulled(lazy: Lazy) -> Iterator[Lazy]:
    """The eStargz image rpulled (lazily) and, after the test, removed again."""
    lazy.proxy.clear()
    out = lazy.rpull(lazy.esgz)
    assert len(LAZY_LINE.findall(out.stderr)) == 3, out.stderr  # every layer mounted, none downloaded
    try:
        yield lazy
    finally:
        lazy.proxy.clear()
        lazy.ctrd.remove_all_containers()
        with contextlib.suppress(Exception):
            lazy.remove_image(lazy.esgz)


def test_python_runs_after_fetching_a_fraction_of_the_image(pulled: Lazy) -> None:
    out = pulled.run(pulled.esgz, "hello", "python3", "-c", HELLO)
    assert out.stdout.strip().startswith("hello from 3.11"), out.stdout
    fetched = pulled.blob_bytes()
    print(f"fetched {fetched} of {pulled.esgz_size} compressed bytes ({100 * fetched / pulled.esgz_size:.1f} %)")
    assert fetched < pulled.esgz_size / 5
    assert len(pulled.layer_pids()) == 3
    # python3's libraries (in the minbase layer) were fetched as soon as the
    # start of its binary (in the python layer) was read: the snapshotter
    # introduced the layers of the container's overlay to each other
    statuses = [mount.status(pulled.crfs.root / "layers" / name) for name in sorted(os.listdir(pulled.crfs.root / "layers"))]
    assert all(s["peers"] == 2 for s in statuses), [s["peers"] for s in statuses]
    found = {path for s in statuses for path in s["dependencies"]["found"]}
    libs = "usr/lib/x86_64-linux-gnu/"
    assert {f"{libs}libc.so.6", f"{libs}libm.so.6", f"{libs}libz.so.1.2.13", f"{libs}ld-linux-x86-64.so.2", "etc/ld.so.cache"} <= found, found
    assert sum(s["dependencies"]["wants_received"] for s in statuses) >= 1


def test_the_images_command_and_its_libraries_are_fetched_during_the_pull(pulled: Lazy) -> None:
    """Before any container runs: the config's Cmd (python3 /app/hello.py),
    found through its PATH in the python layer, then the libraries
    python3.11 names, in the minbase layer; nothing has read a file yet."""
    layers = pulled.crfs.root / "layers"

    def found() -> set[str]:
        return {p for name in os.listdir(layers) for p in mount.status(layers / name).get("dependencies", {}).get("found", [])}

    wanted = {"usr/bin/python3.11", "app/hello.py", "usr/lib/x86_64-linux-gnu/libc.so.6", "usr/lib/x86_64-linux-gnu/libexpat.so.1.8.10"}
    deadline = time.monotonic() + 20
    while not wanted <= found() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert wanted <= found(), found()
    assert all(mount.status(layers / name)["reads"] == 0 for name in os.listdir(layers))


def test_plain_gzip_layers_fall_back_to_a_download(lazy: Lazy) -> None:
    lazy.proxy.clear()
    out = lazy.rpull(lazy.gzip)
    assert LAZY_LINE.findall(out.stderr) == [], out.stderr
    try:
        run = lazy.run(lazy.gzip, "gz", "python3", "-c", HELLO)
        assert run.stdout.strip().startswith("hello from 3.11")
        assert lazy.layer_pids() == {}
    finally:
        lazy.remove_image(lazy.gzip)


def _exec(lazy: Lazy, container: str, exec_id: str, *cmd: str) -> subprocess.CompletedProcess:
    return lazy.ctrd.ctr("tasks", "exec", "--exec-id", exec_id, container, *cmd, check=False, timeout=60)


READ_ALL = "import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())"


def test_a_killed_layer_process_never_gives_wrong_bytes(pulled: Lazy) -> None:
    lazy = pulled
    lazy.ctrd.ctr("run", "-d", "--snapshotter", "crfs", lazy.esgz, "victim", "sleep", "600")
    good = _exec(lazy, "victim", "e0", "python3", "-c", READ_ALL, UNREAD)
    assert good.returncode == 0, good.stderr
    digest = good.stdout.strip()
    before = lazy.layer_pids()
    for pid in before.values():
        os.kill(pid, signal.SIGKILL)
    # the running container: the right bytes or a clean error, never others
    for i in range(3):
        again = _exec(lazy, "victim", f"e{i + 1}", "python3", "-c", READ_ALL, UNREAD)
        if again.returncode == 0:
            assert again.stdout.strip() == digest
    # the supervisor mounted every layer again; a new container sees them whole
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (len(lazy.layer_pids()) == 3 and set(lazy.layer_pids().values()).isdisjoint(before.values())):
        time.sleep(0.2)
    assert len(lazy.layer_pids()) == 3 and set(lazy.layer_pids().values()).isdisjoint(before.values())
    out = lazy.run(lazy.esgz, "after-restart", "python3", "-c", READ_ALL, UNREAD)
    assert out.stdout.strip() == digest


def test_a_killed_crfs_leaves_containers_running_and_a_new_one_takes_over(pulled: Lazy) -> None:
    lazy = pulled
    lazy.ctrd.ctr("run", "-d", "--snapshotter", "crfs", lazy.esgz, "survivor", "sleep", "600")
    pids = lazy.layer_pids()
    lazy.crfs.kill()
    try:
        out = _exec(lazy, "survivor", "x1", "python3", "-c", HELLO)
        assert out.returncode == 0 and out.stdout.startswith("hello from"), out.stderr
        assert lazy.layer_pids() == pids
    finally:
        lazy.crfs.start()
    assert lazy.layer_pids() == pids  # adopted as they were
    # containerd redials its proxy plugin with a backoff of at most 3 s
    deadline = time.monotonic() + 15
    while lazy.ctrd.ctr("snapshots", "--snapshotter", "crfs", "ls", check=False).returncode != 0:
        assert time.monotonic() < deadline, "containerd did not reconnect to the restarted crfs"
        time.sleep(0.5)
    out = lazy.run(lazy.esgz, "new-after-crash", "python3", "-c", HELLO)
    assert out.stdout.startswith("hello from")
    # the store lost nothing: containerd still finds every snapshot
    keys = lazy.ctrd.snapshot_keys("crfs")
    assert len(keys) >= 4, keys  # 3 layers + the survivor's active snapshot


def test_image_rm_and_gc_end_every_layer_mount_and_process(lazy: Lazy) -> None:
    lazy.rpull(lazy.esgz)
    lazy.run(lazy.esgz, "once", "python3", "-c", HELLO)
    pids = list(lazy.layer_pids().values())
    assert len(pids) == 3
    lazy.remove_image(lazy.esgz)
    left = wait_clean(lazy.ctrd, "crfs", crfs_root=lazy.crfs.root, crfs_address=lazy.crfs.address)
    assert left == {}
    assert [p for p in pids if mount.is_alive(p)] == []
    assert mounts_under(lazy.crfs.root) == []
    assert os.listdir(lazy.crfs.root / "layers") == []
    # nothing holds the chunk cache any more: it can be deleted
    cache = lazy.crfs.root / "cache"
    if cache.exists():
        shutil.rmtree(cache)


def test_a_vanished_registry_keeps_cached_files_and_fails_others_in_bounded_time(pulled: Lazy) -> None:
    lazy = pulled
    lazy.run(lazy.esgz, "warm", "python3", "-c", HELLO)
    lazy.proxy.add("reset", "", times=1_000_000)
    try:
        out = lazy.run(lazy.esgz, "cached", "python3", "-c", HELLO)
        assert out.stdout.startswith("hello from")
        started = time.monotonic()
        cold = lazy.run(lazy.esgz, "cold", "python3", "-c", READ_ALL, UNREAD_2, check=False)
        elapsed = time.monotonic() - started
        assert cold.returncode != 0
        assert "Input/output error" in cold.stderr + cold.stdout, cold.stderr
        assert elapsed < FETCH_DEADLINE + 30, elapsed
    finally:
        lazy.proxy.clear()
