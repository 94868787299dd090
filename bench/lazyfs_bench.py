#!/usr/bin/env python3
"""A lazyfs mount against the same layer extracted to a plain directory.

Needs root (drop_caches, FUSE), /dev/fuse, fusermount3, docker-registry and
/usr/bin/python3.11. Builds two eStargz layers, pushes them to a local
docker-registry and mounts them as ``registry://`` sources through
``lazyfs.mount.start`` (the real per-layer mount process), each with its own
chunk cache and no background fetch (only what is read is fetched):

- tree: /usr/lib/python3.11 + /usr/lib/python3 + /usr/share/doc (~12k entries);
  ``find`` and an lstat of every path, cold and warm; a Python 3.11 start-up
  (PYTHONHOME on the tree, -S -B) importing a set of stdlib modules, cold
  and warm; the mount process's RSS after all that.
- big: one 256 MiB file of random bytes; sequential read cold from the
  registry (fresh cache), cold from the local cache (new mount, same cache,
  page cache dropped) and warm (same mount again); 2000 random 4 KiB preads, warm.

"cold" for the plain directory: right after ``echo 3 > /proc/sys/vm/drop_caches``;
every lazyfs cold measurement also drops caches first (then mounts). Each
repetition measures both sides, alternating which goes first; medians and
ratios lazyfs/plain. Every mount, process and the registry are stopped at
the end, also on Ctrl-C, SIGTERM or an exception.

    sudo python3 bench/lazyfs_bench.py [--quick] [--reps N] [--big-mib 256]
    sudo python3 bench/lazyfs_bench.py --only rss --reps 3   # memory rows only
    sudo python3 bench/lazyfs_bench.py --only coldcache --reps 5   # cold-from-cache sequential read only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from harness.registry import Registry  # noqa: E402
from kernel_probe import FuseRequests, large_folio_share, proactive_reclaim, reclaim_paused  # noqa: E402
from lazyfs import mount  # noqa: E402
from lazyfs.forkserver import ForkServer  # noqa: E402
from lazyfs.layer_source import RemoteOptions  # noqa: E402
from lazyfs.registry import RegistryClient, RegistryConfig  # noqa: E402
from lazyfs.stargz.writer import BuildResult, build  # noqa: E402

TREE_DIRS = ["/usr/lib/python3.11", "/usr/lib/python3", "/usr/share/doc"]
PY = "/usr/bin/python3.11"
IMPORTS = "json, email.parser, http.client, asyncio, decimal, xml.etree.ElementTree, argparse, logging, unittest, urllib.request, sqlite3, csv, dataclasses, typing"
BIG_NAME = "data/big.bin"
MIB = 1 << 20

log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731


# --- helpers -------------------------------------------------------------------


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def settle() -> None:
    """Before a warm measurement: the dirty pages of the cold read (lazyfs's
    chunk cache files) written back, so that their writeback does not
    compete with the warm read for the two cores."""
    os.sync()
    time.sleep(0.5)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def add_requests(res: "Results", info: dict[str, object], key: str, requests: FuseRequests, runs: int) -> None:
    """FUSE requests per run: the total as a result ``key``, and by opcode in
    ``info[key]``, one dict per measurement."""
    res.add(key, sum(requests.counts.values()) / runs)
    by_op = info.setdefault(key, [])
    assert isinstance(by_op, list)
    by_op.append({opcode: round(n / runs, 1) for opcode, n in sorted(requests.counts.items())})


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of ``pid`` in KiB, and from smaps_rollup its Pss and
    Private (clean + dirty) KiB: VmRSS also counts the shared libraries' and
    interpreter's pages that every mount process shares."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key == "Pss":
                out["Pss"] = int(rest.split()[0])
            elif key in ("Private_Clean", "Private_Dirty"):
                out["Private"] = out.get("Private", 0) + int(rest.split()[0])
    return out


def make_tar(dirs: list[str], out: Path) -> int:
    """A tar of ``dirs`` (sorted walk, arcnames without the leading /); entry count."""
    n = 0
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        for top in dirs:
            parts = Path(top).parts[1:]
            for i in range(1, len(parts)):  # parent directories first
                tf.add("/" + "/".join(parts[:i]), arcname="/".join(parts[:i]), recursive=False)
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames.sort()
                for name in [dirpath, *(os.path.join(dirpath, f) for f in sorted(filenames))]:
                    with contextlib.suppress(OSError):
                        tf.add(name, arcname=name.lstrip("/"), recursive=False)
                        n += 1
    return n


def extract(tar: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-xpf", str(tar), "-C", str(dest), "--numeric-owner"], check=True)


def read_all(path: Path) -> int:
    buf = bytearray(MIB)
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while n := os.readv(fd, [buf]):
            total += n
    finally:
        os.close(fd)
    return total


def random_reads(path: Path, offsets: list[int]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in offsets:
            os.pread(fd, 4096, off)
    finally:
        os.close(fd)


def lstat_all(root: Path, rels: list[str]) -> None:
    base = str(root) + "/"
    for rel in rels:
        os.lstat(base + rel)


def run_find(root: Path) -> None:
    subprocess.run(["find", str(root)], stdout=subprocess.DEVNULL, check=True)


def py_cmd() -> list[str]:
    return [PY, "-S", "-B", "-c", f"import {IMPORTS}"]


def run_python(root: Path) -> None:
    env = {"PYTHONHOME": str(root / "usr"), "PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
    subprocess.run(py_cmd(), env=env, check=True)


def check_imports_from(root: Path) -> tuple[int, int]:
    """With -v: (modules loaded from below ``root``, modules loaded from elsewhere)."""
    env = {"PYTHONHOME": str(root / "usr"), "PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
    proc = subprocess.run([PY, "-v", *py_cmd()[1:]], env=env, capture_output=True, text=True, check=True)
    inside = outside = 0
    for line in proc.stderr.splitlines():
        if line.startswith("# code object from ") or line.startswith("# extension module"):
            path = line.split("'")[1] if "'" in line else line
            if line.startswith("# extension module"):
                path = line.rsplit("from ", 1)[-1].strip("'")
            if path.startswith(str(root) + "/"):
                inside += 1
            else:
                outside += 1
    return inside, outside


class Mounts:
    """Every mount this bench starts; ``close`` undoes them all."""

    def __init__(self) -> None:
        self.live: dict[Path, int] = {}

    def start(self, source: str, mp: Path, toc: str, cache: Path, fork_server: ForkServer | None = None) -> tuple[int, float]:
        mp.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        pid = mount.start(source, mp, toc_digest=toc, remote=RemoteOptions(cache_dir=str(cache), background_fetch=False),
                          fork_server=fork_server)
        took = time.perf_counter() - t0
        self.live[mp] = pid
        return pid, took

    def stop(self, mp: Path) -> None:
        pid = self.live.pop(mp, None)
        with contextlib.suppress(Exception):
            mount.unmount(mp)
        if mount.is_mounted(mp):
            subprocess.run(["umount", "-l", str(mp)], capture_output=True)
        if pid:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if not mount.is_alive(pid):
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and mount.is_alive(pid):
                    time.sleep(0.05)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)

    def close(self) -> None:
        for mp in list(self.live):
            self.stop(mp)

    @contextlib.contextmanager
    def mounted(self, source: str, mp: Path, toc: str, cache: Path, fork_server: ForkServer | None = None) -> Iterator[tuple[int, float]]:
        pid, took = self.start(source, mp, toc, cache, fork_server)
        try:
            yield pid, took
        finally:
            self.stop(mp)


# --- the benchmark -------------------------------------------------------------------


class Results:
    def __init__(self) -> None:
        self.data: dict[str, list[float]] = {}

    def add(self, key: str, value: float) -> None:
        self.data.setdefault(key, []).append(value)

    def med(self, key: str) -> float:
        return statistics.median(self.data[key])

    def spread(self, key: str) -> str:
        v = self.data[key]
        return f"{min(v):.4g}-{max(v):.4g}"


def machine() -> dict[str, str]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    py311 = subprocess.run([PY, "-c", "import platform; print(platform.python_version())"], capture_output=True, text=True).stdout.strip()
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "python3.11 (imports)": py311,
            "proactive reclaim": proactive_reclaim()}


def start_fork_server(work: Path, stack: contextlib.ExitStack) -> ForkServer:
    os.environ["CRFS_LAZYFS_STATE"] = str(work / "state")
    (work / "state").mkdir(exist_ok=True)
    fork_server = ForkServer(work / "state" / "forkserver.sock")
    fork_server.start()
    stack.callback(fork_server.stop)
    return fork_server


def bench_rss(args: argparse.Namespace, work: Path, mounts: Mounts, stack: contextlib.ExitStack) -> None:
    """``--only rss``: the tree layer's memory rows alone (direct and forked
    mount after the find + lstat storm), without the timing rows, so that a
    change to the per-entry memory can be measured in a minute."""
    res = Results()
    fork_server = start_fork_server(work, stack)
    log("building the tree layer ...")
    tree_tar = work / "tree.tar"
    entries = make_tar(TREE_DIRS, tree_tar)
    tree_blob = build(tree_tar, work / "tree.esgz", level=6)
    extract(tree_tar, work / "plain-tree")
    tree_tar.unlink()
    registry = stack.enter_context(Registry(work / "registry"))
    with RegistryClient(RegistryConfig(docker_config=Path("/nonexistent/config.json"))) as client, open(work / "tree.esgz", "rb") as f:
        client.repository(f"{registry.host}/bench/tree").push_blob(f, tree_blob.digest)
    (work / "tree.esgz").unlink()
    tree_src = f"registry://{registry.host}/bench/tree@{tree_blob.digest}"
    rels = subprocess.run(["find", ".", "-mindepth", "1"], cwd=work / "plain-tree", capture_output=True, text=True, check=True).stdout.split("\n")
    rels = [r[2:] for r in rels if r]
    mp = work / "mnt"
    for rep in range(args.reps):
        log(f"repetition {rep + 1}/{args.reps}")
        for forked in (False, True):
            drop_caches()
            with mounts.mounted(tree_src, mp, tree_blob.toc_digest, work / f"cache-{rep}-{forked}", fork_server if forked else None) as (pid, _):
                res.add("rss_forked_mounted_kib" if forked else "rss_tree_mounted_kib", proc_status(pid)["VmRSS"])
                for _ in range(1 if forked else 2):  # as the full run: cold + warm direct, once forked
                    run_find(mp)
                    lstat_all(mp, rels)
                st = proc_status(pid)
                prefix = "forked_" if forked else ""
                res.add(f"rss_{prefix}after_storm_kib", st["VmRSS"])
                res.add(f"hwm_{prefix}after_storm_kib", st["VmHWM"])
                if "Pss" in st:
                    res.add(f"pss_{prefix}after_storm_kib", st["Pss"])
                    res.add(f"private_{prefix}after_storm_kib", st["Private"])
            shutil.rmtree(work / f"cache-{rep}-{forked}", ignore_errors=True)
    print(f"    - command: {' '.join([sys.executable, *sys.argv])}")
    print(f"    - tree layer: {len(rels)} paths ({entries} tar entries), {args.reps} repetitions; median (min-max)")
    print("")
    print("| measurement | MiB |")
    print("|---|---|")
    for key in sorted(res.data):
        v = res.data[key]
        print(f"| {key.removesuffix('_kib')} | {res.med(key) / 1024:.1f} ({min(v) / 1024:.1f}-{max(v) / 1024:.1f}) |")


def build_big_layer(mib: int, work: Path) -> BuildResult:
    """``work/plain-big/big.bin``, ``mib`` MiB of random bytes, and the same
    file as an eStargz layer at ``work/big.esgz``."""
    log(f"building the {mib} MiB random-file layer ...")
    big_src = work / "plain-big" / BIG_NAME
    big_src.parent.mkdir(parents=True)
    rng = random.Random(42)
    with open(big_src, "wb") as f:
        for _ in range(mib):
            f.write(rng.randbytes(MIB))
    big_tar = work / "big.tar"
    with tarfile.open(big_tar, "w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(work / "plain-big" / "data", arcname="data", recursive=False)
        tf.add(big_src, arcname=BIG_NAME)
    big_blob = build(big_tar, work / "big.esgz", level=1)
    big_tar.unlink()
    return big_blob


def bench_coldcache(args: argparse.Namespace, work: Path, mounts: Mounts, stack: contextlib.ExitStack) -> None:
    """``--only coldcache``: the sequential read of the big file cold from the
    local chunk cache (``seq_coldcache_lazy``) against the plain directory
    cold (``seq_cold_plain``), nothing else. The cache is filled once (one
    read from the registry); every repetition then drops the page cache and
    reads the plain file, and drops it again, mounts the layer anew on the
    same cache and reads it (order flips each repetition), as the full run does."""
    res = Results()
    big_blob = build_big_layer(args.big_mib, work)
    registry = stack.enter_context(Registry(work / "registry"))
    with RegistryClient(RegistryConfig(docker_config=Path("/nonexistent/config.json"))) as client, open(work / "big.esgz", "rb") as f:
        client.repository(f"{registry.host}/bench/big").push_blob(f, big_blob.digest)
    (work / "big.esgz").unlink()
    big_src_ref = f"registry://{registry.host}/bench/big@{big_blob.digest}"
    big_size = args.big_mib * MIB
    mbps = lambda s: big_size / MIB / s  # noqa: E731
    mp, cache = work / "mnt", work / "cache-big"
    target = mp / BIG_NAME
    drop_caches()
    with mounts.mounted(big_src_ref, mp, big_blob.toc_digest, cache):
        n = [0]
        res.add("seq_coldreg_lazy", mbps(timed(lambda: n.__setitem__(0, read_all(target)))))
        assert n[0] == big_size, n[0]
    status: dict[str, object] = {}
    for rep in range(args.reps):
        log(f"repetition {rep + 1}/{args.reps}")
        for side in (["plain", "lazy"] if rep % 2 == 0 else ["lazy", "plain"]):
            drop_caches()
            if side == "plain":
                res.add("seq_cold_plain", mbps(timed(lambda: read_all(work / "plain-big" / BIG_NAME))))
                continue
            with mounts.mounted(big_src_ref, mp, big_blob.toc_digest, cache):
                n[0] = 0
                res.add("seq_coldcache_lazy", mbps(timed(lambda: n.__setitem__(0, read_all(target)))))
                assert n[0] == big_size, n[0]
                status = {k: v for k, v in mount.status(mp).items() if k not in ("source", "mountpoint", "toc_digest")}
    print(f"    - command: {' '.join([sys.executable, *sys.argv])}")
    print(f"    - big layer: {args.big_mib} MiB random file, 4 MiB chunks; cache filled once from the registry"
          f" ({res.med('seq_coldreg_lazy'):.0f} MiB/s); {args.reps} repetitions, interleaved; median (min-max)")
    print("")
    print("| measurement | MiB/s |")
    print("|---|---|")
    for key in ("seq_cold_plain", "seq_coldcache_lazy"):
        print(f"| {key} | {res.med(key):.0f} ({res.spread(key)}) |")
    ratios = [lazy / plain for lazy, plain in zip(res.data["seq_coldcache_lazy"], res.data["seq_cold_plain"])]
    print(f"| ratio of medians lazy/plain | {res.med('seq_coldcache_lazy') / res.med('seq_cold_plain'):.2f}x |")
    print(f"| median of per-repetition ratios | {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")
    print("")
    print(f"    last mount's counters: {json.dumps(status, sort_keys=True)}")


def bench(args: argparse.Namespace, work: Path, mounts: Mounts, stack: contextlib.ExitStack) -> None:
    if args.only == "rss":
        bench_rss(args, work, mounts, stack)
        return
    if args.only == "coldcache":
        bench_coldcache(args, work, mounts, stack)
        return
    res = Results()
    info: dict[str, object] = {}
    fork_server = start_fork_server(work, stack)

    # --- layers
    log("building the tree layer ...")
    tree_tar = work / "tree.tar"
    info["tree_entries"] = make_tar(TREE_DIRS, tree_tar)
    tree_blob = build(tree_tar, work / "tree.esgz", level=6)
    extract(tree_tar, work / "plain-tree")
    info["tree_tar_mb"] = round(tree_tar.stat().st_size / 1e6, 1)
    info["tree_blob_mb"] = round(tree_blob.size / 1e6, 1)
    tree_tar.unlink()

    big_blob = build_big_layer(args.big_mib, work)
    info["big_blob_mb"] = round(big_blob.size / 1e6, 1)

    # --- registry
    registry = stack.enter_context(Registry(work / "registry"))
    with RegistryClient(RegistryConfig(docker_config=Path("/nonexistent/config.json"))) as client:
        for name, blob in (("tree", tree_blob), ("big", big_blob)):
            with open(work / f"{name}.esgz", "rb") as f:
                client.repository(f"{registry.host}/bench/{name}").push_blob(f, blob.digest)
            (work / f"{name}.esgz").unlink()
    tree_src = f"registry://{registry.host}/bench/tree@{tree_blob.digest}"
    big_src_ref = f"registry://{registry.host}/bench/big@{big_blob.digest}"

    plain_tree = work / "plain-tree"
    rels = subprocess.run(["find", ".", "-mindepth", "1"], cwd=plain_tree, capture_output=True, text=True, check=True).stdout.split("\n")
    rels = [r[2:] for r in rels if r]
    info["tree_paths"] = len(rels)
    mp = work / "mnt"

    inside, outside = check_imports_from(plain_tree)
    info["imports_plain (modules from tree / elsewhere)"] = f"{inside} / {outside}"
    with mounts.mounted(tree_src, mp, tree_blob.toc_digest, work / "cache-check"):
        inside, outside = check_imports_from(mp)
    info["imports_lazyfs (modules from mount / elsewhere)"] = f"{inside} / {outside}"
    shutil.rmtree(work / "cache-check", ignore_errors=True)

    rng = random.Random(43)  # the random reads' offsets
    offsets = [rng.randrange(0, (args.big_mib * MIB) // 4096) * 4096 for _ in range(args.random_reads)]
    big_size = args.big_mib * MIB
    mbps = lambda s: big_size / MIB / s  # noqa: E731

    for rep in range(args.reps):
        log(f"repetition {rep + 1}/{args.reps}")
        order = ["plain", "lazy"] if rep % 2 == 0 else ["lazy", "plain"]
        for side in order:
            # metadata: find + lstat, cold then warm
            if side == "plain":
                drop_caches()
                root = plain_tree
                ctx = contextlib.nullcontext((None, 0.0))
            else:
                drop_caches()
                ctx = mounts.mounted(tree_src, mp, tree_blob.toc_digest, work / f"cache-tree-{rep}")
                root = mp
            with ctx as (pid, took):
                if pid:
                    res.add("mount_tree_s", took)
                    res.add("rss_tree_mounted_kib", proc_status(pid)["VmRSS"])
                res.add(f"find_cold_{side}", timed(lambda: run_find(root)))
                res.add(f"lstat_cold_{side}", timed(lambda: lstat_all(root, rels)))
                res.add(f"find_warm_{side}", timed(lambda: run_find(root)))
                res.add(f"lstat_warm_{side}", timed(lambda: lstat_all(root, rels)))
                if pid:
                    st = proc_status(pid)
                    res.add("rss_after_storm_kib", st["VmRSS"])
                    res.add("hwm_after_storm_kib", st["VmHWM"])
                    if "Pss" in st:
                        res.add("pss_after_storm_kib", st["Pss"])
                        res.add("private_after_storm_kib", st["Private"])
                    # python imports on a mount that has seen the storm: metadata warm, data cold
                    res.add("py_meta_warm_data_cold_lazy", timed(lambda: run_python(root)))
                    st = proc_status(pid)
                    res.add("rss_after_imports_kib", st["VmRSS"])
                    res.add("hwm_after_imports_kib", st["VmHWM"])
                    if rep == 0:
                        info["tree_status_after_storm"] = {k: v for k, v in mount.status(mp).items() if k not in ("source", "mountpoint", "toc_digest")}
            shutil.rmtree(work / f"cache-tree-{rep}", ignore_errors=True)
            if side == "lazy":
                # the same layer in a process forked from crfs serve's fork
                # server (how crfs serve starts them): the same storm, its memory
                drop_caches()
                with mounts.mounted(tree_src, mp, tree_blob.toc_digest, work / f"cache-fork-{rep}", fork_server):
                    run_find(mp)
                    lstat_all(mp, rels)
                    st = proc_status(mounts.live[mp])
                    res.add("rss_forked_after_storm_kib", st["VmRSS"])
                    res.add("hwm_forked_after_storm_kib", st["VmHWM"])
                    if "Pss" in st:
                        res.add("pss_forked_after_storm_kib", st["Pss"])
                shutil.rmtree(work / f"cache-fork-{rep}", ignore_errors=True)

            # python start-up: cold (fresh mount from the registry / dropped caches), then warm
            drop_caches()
            if side == "plain":
                ctx = contextlib.nullcontext((None, 0.0))
            else:
                ctx = mounts.mounted(tree_src, mp, tree_blob.toc_digest, work / f"cache-py-{rep}")
            with ctx as (pid, took):
                res.add(f"py_cold_{side}", timed(lambda: run_python(root)))
                res.add(f"py_warm_{side}", timed(lambda: run_python(root)))
                with FuseRequests(mp) if side == "lazy" else contextlib.nullcontext() as requests:
                    for _ in range(2):
                        res.add(f"py_warm_{side}", timed(lambda: run_python(root)))
                if requests is not None and requests.available:
                    add_requests(res, info, "py_warm_requests", requests, runs=2)
            if side == "lazy":  # cold from the local cache: new mount, same cache
                drop_caches()
                with mounts.mounted(tree_src, mp, tree_blob.toc_digest, work / f"cache-py-{rep}"):
                    res.add("py_coldcache_lazy", timed(lambda: run_python(root)))
                shutil.rmtree(work / f"cache-py-{rep}", ignore_errors=True)

            if side == "lazy" and args.compare_open:
                # the same layer with every OPEN/OPENDIR answered (what a stock pyfuse3 gets)
                os.environ["CRFS_LAZYFS_NO_OPEN"] = "0"
                try:
                    drop_caches()
                    with mounts.mounted(tree_src, mp, tree_blob.toc_digest, work / f"cache-open-{rep}"):
                        run_find(root)
                        res.add("find_warm_lazyopen", timed(lambda: run_find(root)))
                        res.add("lstat_warm_lazyopen", timed(lambda: lstat_all(root, rels)))
                        run_python(root)
                        for _ in range(3):
                            res.add("py_warm_lazyopen", timed(lambda: run_python(root)))
                finally:
                    del os.environ["CRFS_LAZYFS_NO_OPEN"]
                shutil.rmtree(work / f"cache-open-{rep}", ignore_errors=True)

            # the big file
            drop_caches()
            if side == "plain":
                target = work / "plain-big" / BIG_NAME
                res.add("seq_cold_plain", mbps(timed(lambda: read_all(target))))
                settle()
                for _ in range(3):
                    res.add("seq_warm_plain", mbps(timed(lambda: read_all(target))))
                res.add("rand_warm_plain", timed(lambda: random_reads(target, offsets)) / len(offsets) * 1e6)
                res.add("large_folio_share_plain", large_folio_share(target)[0])
            else:
                cache = work / f"cache-big-{rep}"
                target = mp / BIG_NAME
                with mounts.mounted(big_src_ref, mp, big_blob.toc_digest, cache) as (pid, took):
                    res.add("mount_big_s", took)
                    res.add("rss_big_mounted_kib", proc_status(pid)["VmRSS"])
                    n = [0]
                    res.add("seq_coldreg_lazy", mbps(timed(lambda: n.__setitem__(0, read_all(target)))))
                    assert n[0] == big_size, n[0]
                    if rep == 0:
                        info["big_status_after_cold_read"] = {k: v for k, v in mount.status(mp).items() if k not in ("source", "mountpoint", "toc_digest")}
                    before = mount.status(mp)["reads"]
                    settle()
                    with FuseRequests(mp) as requests:
                        for _ in range(3):
                            res.add("seq_warm_lazy", mbps(timed(lambda: read_all(target))))
                        res.add("rand_warm_lazy", timed(lambda: random_reads(target, offsets)) / len(offsets) * 1e6)
                    res.add("fuse_reads_during_warm", mount.status(mp)["reads"] - before)
                    if requests.available:
                        add_requests(res, info, "big_warm_requests", requests, runs=1)
                    res.add("large_folio_share_lazy", large_folio_share(target)[0])
                    res.add("rss_big_kib", proc_status(pid)["VmRSS"])
                    res.add("hwm_big_kib", proc_status(pid)["VmHWM"])
                drop_caches()
                with mounts.mounted(big_src_ref, mp, big_blob.toc_digest, cache):
                    res.add("seq_coldcache_lazy", mbps(timed(lambda: read_all(target))))
                    if rep == 0:
                        info["big_status_after_cache_read"] = {k: v for k, v in mount.status(mp).items() if k not in ("source", "mountpoint", "toc_digest")}
                shutil.rmtree(cache, ignore_errors=True)

    report(args, res, info)


def report(args: argparse.Namespace, res: Results, info: dict[str, object]) -> None:
    m = machine()
    out = []
    out.append(f"    - command: {' '.join([sys.executable, *sys.argv])}")
    out.append(f"    - nproc: {m['nproc']}  cpu: {m['cpu']}")
    out.append(f"    - kernel: {m['kernel']}  python: {m['python']}  python3.11 for the imports: {m['python3.11 (imports)']}")
    out.append(f"    - tree layer: {info['tree_paths']} paths ({', '.join(TREE_DIRS)}), tar {info['tree_tar_mb']} MB, eStargz {info['tree_blob_mb']} MB;"
               f" big layer: {args.big_mib} MiB random file, eStargz {info['big_blob_mb']} MB; 4 MiB chunks")
    out.append(f"    - imports checked with -v: plain {info['imports_plain (modules from tree / elsewhere)']},"
               f" lazyfs {info['imports_lazyfs (modules from mount / elsewhere)']} (modules from the tree / from elsewhere)")
    out.append(f"    - the machine's own reclaim of idle page cache: {args.reclaim}")
    out.append(f"    - {args.reps} repetitions, interleaved (order flips each repetition); median (min-max)")
    out.append("")
    out.append("| measurement | plain dir | lazyfs | lazyfs/plain | target | met |")
    out.append("|---|---|---|---|---|---|")

    def row(name: str, unit: str, plain: str | None, lazy: str, *, higher_better: bool = False, target: str = "", limit: float | None = None) -> None:
        lv = res.med(lazy)
        lcell = f"{lv:.4g} {unit} ({res.spread(lazy)})"
        if plain is None:
            out.append(f"| {name} | | {lcell} | | {target} | |")
            return
        pv = res.med(plain)
        ratio = lv / pv
        # for throughput, ratio < 1 is worse; report lazyfs/plain as is
        met = ""
        if limit is not None:
            met = "yes" if (ratio >= limit if higher_better else ratio <= limit) else "**no**"
        out.append(f"| {name} | {pv:.4g} {unit} ({res.spread(plain)}) | {lcell} | {ratio:.2f}x | {target} | {met} |")

    row("find, cold", "s", "find_cold_plain", "find_cold_lazy")
    row("lstat every path after find, cold", "s", "lstat_cold_plain", "lstat_cold_lazy")
    row("find, warm", "s", "find_warm_plain", "find_warm_lazy", target="≤ 1.2x", limit=1.2)
    row("lstat every path, warm", "s", "lstat_warm_plain", "lstat_warm_lazy", target="≤ 1.2x", limit=1.2)
    row("python3.11 start + imports, cold (lazyfs: fresh cache, from registry)", "s", "py_cold_plain", "py_cold_lazy")
    row("python3.11 start + imports, cold from local cache (new mount)", "s", "py_cold_plain", "py_coldcache_lazy")
    row("python3.11 start + imports, warm", "s", "py_warm_plain", "py_warm_lazy", target="≤ 1.2x", limit=1.2)
    if args.compare_open:
        row("find, warm; lazyfs answering every open (CRFS_LAZYFS_NO_OPEN=0)", "s", "find_warm_plain", "find_warm_lazyopen")
        row("lstat every path, warm; lazyfs answering every open", "s", "lstat_warm_plain", "lstat_warm_lazyopen")
        row("python3.11 start + imports, warm; lazyfs answering every open", "s", "py_warm_plain", "py_warm_lazyopen")
    row("sequential read 256 MiB, cold (lazyfs: from registry, fresh cache)", "MiB/s", "seq_cold_plain", "seq_coldreg_lazy", higher_better=True)
    row("sequential read, cold from local cache (new mount, caches dropped)", "MiB/s", "seq_cold_plain", "seq_coldcache_lazy", higher_better=True, target="≥ 0.5x", limit=0.5)
    row("sequential read, warm (same mount)", "MiB/s", "seq_warm_plain", "seq_warm_lazy", higher_better=True, target="≥ 1/1.2 = 0.83x", limit=1 / 1.2)
    row(f"random 4 KiB pread x{args.random_reads}, warm", "µs/read", "rand_warm_plain", "rand_warm_lazy", target="≤ 1.2x", limit=1.2)
    row("mount time, tree layer (TOC from registry)", "s", None, "mount_tree_s")
    row("mount time, big layer", "s", None, "mount_big_s")
    for key, label in (("rss_tree_mounted_kib", "VmRSS, tree mount right after mounting"),
                       ("rss_after_storm_kib", "VmRSS, tree mount after find + lstat storm"),
                       ("hwm_after_storm_kib", "VmHWM, tree mount after find + lstat storm"),
                       ("pss_after_storm_kib", "Pss, tree mount after find + lstat storm"),
                       ("private_after_storm_kib", "Private (clean + dirty), tree mount after find + lstat storm"),
                       ("rss_forked_after_storm_kib", "VmRSS, tree mount forked from the fork server (as crfs serve runs it), after the storm"),
                       ("hwm_forked_after_storm_kib", "VmHWM, the same forked mount"),
                       ("pss_forked_after_storm_kib", "Pss, the same forked mount"),
                       ("rss_after_imports_kib", "VmRSS, tree mount after storm + imports"),
                       ("hwm_after_imports_kib", "VmHWM, tree mount after storm + imports"),
                       ("rss_big_mounted_kib", "VmRSS, big mount right after mounting"),
                       ("rss_big_kib", "VmRSS, big mount after reads"),
                       ("hwm_big_kib", "VmHWM, big mount after reads")):
        if key not in res.data:
            continue
        v = res.med(key) / 1024
        limit = "< 40 MiB" if key.startswith(("rss_after_storm", "hwm_after_storm", "rss_forked", "hwm_forked")) else ""
        met = ("yes" if v < 40 else "**no**") if limit else ""
        out.append(f"| {label} | | {v:.1f} MiB ({min(res.data[key]) / 1024:.1f}-{max(res.data[key]) / 1024:.1f}) | | {limit} | {met} |")
    out.append("")
    out.append(f"FUSE read requests the daemon saw during the warm sequential + random reads: {res.med('fuse_reads_during_warm'):.0f}")
    for key, label in (("py_warm_requests", "FUSE requests the kernel sent per warm python3.11 run"),
                       ("big_warm_requests", "FUSE requests the kernel sent during the warm sequential + random reads")):
        if key in res.data:
            runs = "; ".join(", ".join(f"{op} {n:g}" for op, n in counts.items()) or "none" for counts in info[key])
            out.append(f"{label} (tracefs): median {res.med(key):.0f}; by opcode, each repetition: {runs}")
    if "large_folio_share_plain" in res.data:
        out.append(f"Share of the big file's cached pages held in large folios after the warm reads: plain (ext4) "
                   f"{res.med('large_folio_share_plain'):.0%}, lazyfs (FUSE) {res.med('large_folio_share_lazy'):.0%}")
    out.append(f"python3.11 on a mount that already did the storm (metadata warm, data cold): {res.med('py_meta_warm_data_cold_lazy'):.3f} s")
    out.append("")
    out.append("Mount counters (first repetition):")
    out.append("")
    for key in ("tree_status_after_storm", "big_status_after_cold_read", "big_status_after_cache_read"):
        if key in info:
            out.append(f"    {key}: {json.dumps(info[key], sort_keys=True)}")
    print("\n".join(out))
    (REPO / "bench/results").mkdir(exist_ok=True)
    (REPO / "bench/results/lazyfs_bench.json").write_text(json.dumps({"info": info, "machine": m, "raw": res.data}, indent=1, default=str) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 repetitions instead of 5")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--big-mib", type=int, default=256)
    ap.add_argument("--random-reads", type=int, default=2000)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (debugging)")
    ap.add_argument("--compare-open", action="store_true",
                    help="also mount the tree with CRFS_LAZYFS_NO_OPEN=0 (every OPEN/OPENDIR answered, as with a stock pyfuse3): warm find, lstat, python")
    ap.add_argument("--only", choices=["rss", "coldcache"],
                    help="rss: only the tree layer's memory rows (direct and forked mount after the find + lstat storm);"
                         " coldcache: only the sequential read cold from the local cache against the plain directory cold")
    ap.add_argument("--pause-reclaim", action="store_true",
                    help="stop the machine's DAMON pageout (proactive reclaim of idle memory) for the run and start it again after:"
                         " the warm rows then measure a page cache that stays warm")
    args = ap.parse_args()
    args.reps = args.reps or (2 if args.quick else 5)
    if os.geteuid() != 0:
        print("lazyfs_bench: needs root (drop_caches, FUSE)", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (nohup, &)
    work = Path(tempfile.mkdtemp(prefix="crfs-lazyfs-bench-", dir="/var/tmp"))
    mounts = Mounts()
    try:
        args.reclaim = proactive_reclaim() + (" (stopped for this run: --pause-reclaim)" if args.pause_reclaim else "")
        with contextlib.ExitStack() as stack:
            if args.pause_reclaim:
                stopped = stack.enter_context(reclaim_paused())
                log(f"stopped for the run: {', '.join('kdamond ' + k for k in stopped) or 'nothing (no kdamond running)'}")
            try:
                bench(args, work, mounts, stack)
            finally:
                # a second Ctrl-C must not cut the clean-up short (mounts, then the registry)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                mounts.close()
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    finally:
        mounts.close()
        if args.keep or mount.is_mounted(work / "mnt"):
            log(f"left {work} in place")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
