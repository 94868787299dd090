#!/usr/bin/env python3
"""hello-bench: time from the start of a pull to a container's first output.

Cases, interleaved within every repetition (the order rotates each time):

  a  containerd's builtin overlayfs: ``ctr images pull`` + ``ctr run``
  b  crfs, ordinary pull: ``ctr images pull --snapshotter crfs`` + ``ctr run``
  c  crfs lazy: ``crfs rpull`` of the eStargz image + ``ctr run``
  d  crfs lazy, optimized: ``crfs rpull`` of an eStargz image whose files
     needed at start are prioritized (``crfs convert --prioritize-file``),
     + ``ctr run``

Every case starts cold: the image is removed and garbage-collected, crfs's
chunk cache is emptied, and the page cache is dropped. Measured: time to the
first stdout line of ``ctr run`` (streamed) counted from the start of the
pull, the pull's own time, and the bytes the registry sent through the
proxy (at first output and in all). Networks: loopback (the proxy without
delay or cap) and a simulated WAN (``bench/hello/wanproxy.py``: a delay on
every request, a bandwidth cap shared by all connections).

The image for (d) is made by ``crfs optimize SRC DST -- CMD`` (lazyfs
records the files CMD reads, in order). ``--optimizer proxy`` makes it
without crfs's help instead: the command runs once lazily (case c, no
background fetch, on loopback), the proxy's log gives the byte ranges of
each layer blob that were fetched, the layers' TOCs turn them into file
names, in order (a superset when lazyfs reads around a miss), and
``optimize_image`` gives that list to ``crfs convert --prioritize-file``;
it takes any list of paths.

    sudo python bench/hello/run.py                       # all images, 3 reps, both networks
    sudo python bench/hello/run.py --images python --networks wan --reps 5
    sudo python bench/hello/run.py --quick               # busybox + python, 1 rep
    sudo python bench/hello/run.py --write-docs          # also docs/benchmarks.md + docs/hello-bench.png
    python bench/hello/run.py --from-json bench/hello/results/hello.json --write-docs   # re-render only

Needs what the e2e tests need (root, /dev/fuse, containerd, ctr, runc,
fuse-overlayfs, docker-registry, skopeo, umoci, busybox, crfs on PATH) and
the python image of scripts/build-images.sh; the gcc image is built on
first use by scripts/build-images.sh gcc (debootstrap, network).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(HERE))

from harness import build_whiteout_image, push_image  # noqa: E402
from harness.containerd import Containerd  # noqa: E402
from harness.crfs import CrfsServer  # noqa: E402
from harness.fixtures import temp_workdir  # noqa: E402
from harness.flow import CRFS, OVERLAYFS, remove_image, wait_clean  # noqa: E402
from harness.images import OciImage, manifest  # noqa: E402
from harness.proc import HarnessError, run  # noqa: E402
from harness.pyimage import image_cache, python_image  # noqa: E402
from harness.registry import Registry  # noqa: E402
from wanproxy import Record, WanProxy  # noqa: E402

CASES = ("a", "b", "c", "d")
CASE_LABEL = {
    "a": "(a) overlayfs, ctr pull",
    "b": "(b) crfs, ctr pull",
    "c": "(c) crfs lazy, eStargz",
    "d": "(d) crfs lazy, optimized eStargz",
}
NETWORKS = ("loopback", "wan")
DOCS = REPO / "docs" / "benchmarks.md"
CHART = REPO / "docs" / "hello-bench.png"
SECTION = "## Time to first output (hello-bench)"
RESULTS = HERE / "results" / "hello.json"
FINDINGS = HERE / "findings.md"


# ---------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageSpec:
    name: str
    load: Callable[[Path], OciImage]
    cmd: tuple[str, ...]


def gcc_image(_work: Path) -> OciImage:
    """Built by scripts/build-images.sh into the image cache on first use."""
    entry = image_cache() / "gcc"
    if not (entry / "complete").is_file():
        print(f"building the gcc image into {entry} (scripts/build-images.sh gcc, ~1 min)", file=sys.stderr)
        subprocess.run([str(HERE.parents[1] / "scripts" / "build-images.sh"), "gcc"], check=True)
    return OciImage(entry / "oci", "gcc")


IMAGES = {
    "busybox": ImageSpec("busybox", lambda work: build_whiteout_image(work / "busybox"), ("cat", "/etc/layer3.txt")),
    "python": ImageSpec("python", lambda _work: python_image(), ("python3", "-c", 'print("hello")')),
    "gcc": ImageSpec("gcc", gcc_image, ("sh", "-c", "gcc -o /tmp/hello /app/hello.c && /tmp/hello")),
}


@dataclass
class Pushed:
    """One image in the registry, in its forms (repo:tag on the registry itself)."""

    spec: ImageSpec
    gzip: str
    esgz: str
    opt: Optional[str] = None
    gzip_size: int = 0  # compressed size of the gzip layers
    esgz_size: int = 0  # compressed size of the eStargz layers
    profile: list[str] = field(default_factory=list)


def layers_size(registry_host: str, repo_tag: str) -> tuple[int, list[dict]]:
    """Sum of the layer sizes of ``host/repo:tag`` and the layer descriptors."""
    repo, tag = repo_tag.split("/", 1)[1].rsplit(":", 1)
    req = urllib.request.Request(
        f"http://{registry_host}/v2/{repo}/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json, "
                           "application/vnd.docker.distribution.manifest.v2+json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        layers = json.loads(resp.read())["layers"]
    return sum(layer["size"] for layer in layers), layers


def convert(src: str, dst: str, prioritize_file: Optional[Path] = None) -> None:
    argv = ["crfs", "convert", src, dst]
    if prioritize_file is not None:
        argv += ["--prioritize-file", str(prioritize_file)]
    run(argv, timeout=900)


def optimize_image(pushed: Pushed, registry_host: str, files: Sequence[str], work: Path) -> str:
    """The hook for case (d): an eStargz image of ``pushed`` with ``files``
    (paths in the image, in access order) prioritized, made with
    ``crfs convert --prioritize-file``; returns its reference on the registry.
    Any list works: the one ``profile_access`` records, or a profile from
    elsewhere (a future ``crfs optimize``)."""
    listing = work / f"{pushed.spec.name}.prioritized"
    listing.write_text("".join(f"/{f.lstrip('/')}\n" for f in files))
    dst = f"{registry_host}/bench/{pushed.spec.name}:opt"
    convert(pushed.gzip, dst, listing)
    return dst


# ---------------------------------------------------------------- the access profile


def blob_entries(registry_host: str, repo: str, digest: str, work: Path) -> list[tuple[int, int, str]]:
    """``(blob_start, blob_end, path)`` of every chunk of a layer, sorted."""
    from lazyfs.stargz.reader import StargzReader
    from lazyfs.stargz.source import FileSource

    path = work / digest.replace(":", "-")
    if not path.exists():
        with urllib.request.urlopen(f"http://{registry_host}/v2/{repo}/blobs/{digest}", timeout=300) as resp, \
                open(path, "wb") as out:
            shutil.copyfileobj(resp, out, 1 << 20)
    spans = []
    with FileSource(path) as source:
        reader = StargzReader.open(source)
        for entry in reader.toc:
            for chunk in entry.chunks:
                spans.append((chunk.blob_offset, chunk.blob_end, entry.name))
    path.unlink()
    return sorted(spans)


def files_fetched(records: Iterable[Record], registry_host: str, work: Path) -> list[str]:
    """Paths whose chunks the given blob Range requests covered, in request order."""
    by_blob: dict[str, list[tuple[int, int, str]]] = {}
    seen: dict[str, None] = {}
    for rec in sorted(records, key=lambda r: r.start):
        if "/blobs/" not in rec.path or not rec.range.startswith("bytes="):
            continue
        repo, digest = rec.path.removeprefix("/v2/").split("/blobs/")
        if digest not in by_blob:
            by_blob[digest] = blob_entries(registry_host, repo, digest, work)
        for part in rec.range.removeprefix("bytes=").split(","):
            lo_s, _, hi_s = part.strip().partition("-")
            if not lo_s or not hi_s:  # a suffix or open range: the footer + TOC read at mount, not a file
                continue
            lo, hi = int(lo_s), int(hi_s) + 1
            for start, end, name in by_blob[digest]:
                if start < hi and end > lo and name not in seen:
                    seen[name] = None
    return list(seen)


# ---------------------------------------------------------------- one case


@dataclass
class Sample:
    network: str
    image: str
    case: str
    rep: int
    ttfo: float  # s from the start of the pull to the first stdout line
    pull: float  # s of the pull command
    run: float  # s from the start of ctr run to the first stdout line
    bytes_first: int  # bytes through the proxy until the first output
    bytes_total: int  # ... until ctr run exited
    requests: int
    output: str
    run_warm: float = 0.0  # s from the start of a second ctr run to its first line (everything local), 0 if not measured
    trace: list = field(default_factory=list)  # with --trace: [method, path, range, status, bytes, start, end] (s from t0)


class Bench:
    def __init__(self, work: Path, registry: Registry, proxy: WanProxy, crfs: CrfsServer, ctrd: Containerd,
                 rtt: float, mbit: float) -> None:
        self.work, self.registry, self.proxy, self.crfs, self.ctrd = work, registry, proxy, crfs, ctrd
        self.rtt, self.mbit = rtt, mbit
        self.ctr = shutil.which("ctr") or "ctr"
        self.trace = False
        self.warm = False
        self.py_spy: Optional[Path] = None

    def network(self, name: str) -> None:
        if name == "wan":
            self.proxy.rtt, self.proxy.mbit = self.rtt, self.mbit
        else:
            self.proxy.rtt, self.proxy.mbit = 0.0, 0.0

    def via_proxy(self, ref: str) -> str:
        return f"{self.proxy.host}/{ref.split('/', 1)[1]}"

    def case(self, pushed: Pushed, case: str, network: str, rep: int) -> tuple[Sample, list[Record]]:
        ref = self.via_proxy({"a": pushed.gzip, "b": pushed.gzip, "c": pushed.esgz, "d": pushed.opt}[case])
        snapshotter = OVERLAYFS if case == "a" else CRFS
        cid = f"hello-{pushed.spec.name}-{case}-{network}-{rep}-{os.getpid()}"
        self.proxy.reset()
        t0 = time.monotonic()
        if case in ("a", "b"):
            self.ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", snapshotter, ref, timeout=900)
        else:
            rpull = ["crfs", "rpull", "--address", str(self.ctrd.address), "--namespace", self.ctrd.namespace, ref]
            if self.py_spy is not None:  # on-CPU samples of the rpull CLI, collapsed stacks
                out = self.py_spy / f"rpull-{pushed.spec.name}-{case}-{network}-{rep}.txt"
                rpull = ["py-spy", "record", "--rate", "250", "--format", "raw", "-o", str(out), "--", *rpull]
            run(rpull, timeout=900)
        t1 = time.monotonic()
        argv = [self.ctr, "--address", str(self.ctrd.address), "--namespace", self.ctrd.namespace,
                "run", "--rm", "--snapshotter", snapshotter, ref, cid, *pushed.spec.cmd]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = proc.stdout.readline()
            t2 = time.monotonic()
            bytes_first = self.proxy.snapshot()[0]
            rest, err = proc.communicate(timeout=600)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        bytes_total, records = self.proxy.snapshot()
        if proc.returncode != 0 or not first:
            raise HarnessError(f"{shlex.join(argv)}: exit {proc.returncode}, stdout {first + rest!r}, stderr {err!r}\n"
                               f"crfs: {self.crfs.stderr_tail(2000)}")
        sample = Sample(network, pushed.spec.name, case, rep, t2 - t0, t1 - t0, t2 - t1, bytes_first, bytes_total,
                        len(records), first.strip())
        if self.warm:
            sample.run_warm = self.first_line(argv[:-len(pushed.spec.cmd) - 1] + [cid + "-warm", *pushed.spec.cmd])
        if self.trace:
            sample.trace = [[r.method, r.path.rsplit("/", 1)[-1][:19], r.range, r.status, r.bytes,
                             round(r.start - t0, 4), round(r.end - t0, 4)] for r in records]
            sample.trace.append(["first-output", "", "", 0, 0, round(t1 - t0, 4), round(t2 - t0, 4)])
        self.cold(ref, snapshotter)
        return sample, records

    def recover(self, pushed: Pushed, case: str) -> None:
        """After a failed case: no containers, the image gone, cold again."""
        self.ctrd.remove_all_containers()
        ref = self.via_proxy({"a": pushed.gzip, "b": pushed.gzip, "c": pushed.esgz, "d": pushed.opt}[case])
        if self.ctrd.ctr("images", "ls", "-q", check=False).stdout.split().count(ref):
            self.cold(ref, OVERLAYFS if case == "a" else CRFS)

    def first_line(self, argv: list[str]) -> float:
        """Seconds from starting ``argv`` to its first stdout line; waits for its exit."""
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = proc.stdout.readline()
        t1 = time.monotonic()
        rest, err = proc.communicate(timeout=600)
        if proc.returncode != 0 or not first:
            raise HarnessError(f"{shlex.join(argv)}: exit {proc.returncode}, stdout {first + rest!r}, stderr {err!r}")
        return t1 - t0

    def cold(self, ref: str, snapshotter: str) -> None:
        """Image removed and collected, crfs's chunk cache emptied, page cache dropped."""
        remove_image(self.ctrd, ref)
        crfs = {"crfs_root": self.crfs.root, "crfs_address": self.crfs.address}
        for name in (OVERLAYFS, CRFS):
            left = wait_clean(self.ctrd, name, **(crfs if name == CRFS else {}))
            if left:
                print(f"warning: {name} not clean after removing {ref}: {left}", file=sys.stderr)
        layers = self.crfs.root / "layers"
        if layers.is_dir() and os.listdir(layers):
            print(f"warning: layer mounts left: {os.listdir(layers)}", file=sys.stderr)
        shutil.rmtree(self.crfs.root / "cache", ignore_errors=True)
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


# ---------------------------------------------------------------- the run


def crfs_config(background_fetch: bool, debug: bool = False) -> str:
    return f"background_fetch = {'true' if background_fetch else 'false'}\n" + ('log_level = "debug"\n' if debug else "")


def wait_crfs_reconnect(ctrd: Containerd, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while ctrd.ctr("snapshots", "--snapshotter", CRFS, "ls", check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise HarnessError("containerd did not reconnect to crfs")
        time.sleep(0.3)


def stop_layers(root: Path) -> None:
    """Layer processes outlive crfs by design; end them at the end."""
    from lazyfs import mount

    layers = root / "layers"
    for name in os.listdir(layers) if layers.is_dir() else []:
        with contextlib.suppress(mount.MountError):
            mount.unmount(layers / name, timeout=5.0)


def bench(args: argparse.Namespace) -> dict:
    samples: list[Sample] = []
    meta: dict = {"machine": machine_info(), "images": {}, "args": {
        "reps": args.reps, "optimizer": args.optimizer, "rtt_ms": args.rtt_ms, "mbit": args.mbit, "background_fetch": args.background_fetch,
        "images": args.images, "networks": args.networks, "cases": args.cases}}
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(temp_workdir("crfs-hello-"))
        registry = stack.enter_context(Registry(work / "registry"))
        proxy = stack.enter_context(WanProxy(registry.host, rtt=0.0, mbit=0.0))
        config = work / "crfs.toml"
        config.write_text(crfs_config(False, args.trace))
        crfs = stack.enter_context(CrfsServer(work / "crfs-root", work / "crfs.sock", ["--config", str(config)]))
        stack.callback(stop_layers, crfs.root)
        ctrd = stack.enter_context(Containerd(crfs_address=crfs.address, workdir=work / "ctrd"))
        b = Bench(work, registry, proxy, crfs, ctrd, args.rtt_ms / 1000, args.mbit)
        b.network("loopback")
        b.trace = args.trace
        b.warm = args.warm
        if args.py_spy:
            b.py_spy = args.py_spy.resolve()
            b.py_spy.mkdir(parents=True, exist_ok=True)
        if args.trace:
            logs = args.json.parent / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            stack.callback(lambda: [shutil.copy(f, logs / f.name) for f in (crfs.log, ctrd.root.parent / "containerd.log")
                                    if f.is_file()])

        pushed: dict[str, Pushed] = {}
        for name in args.images:
            spec = IMAGES[name]
            image = spec.load(work)
            gz_ref = push_image(image, registry.host, f"bench/{name}")
            esgz = f"{registry.host}/bench/{name}:esgz"
            print(f"{name}: pushed, converting to eStargz", file=sys.stderr)
            convert(gz_ref, esgz)
            p = Pushed(spec, gz_ref, esgz)
            p.gzip_size, _ = layers_size(registry.host, gz_ref)
            p.esgz_size, _ = layers_size(registry.host, esgz)
            if "d" in args.cases and args.optimizer == "crfs":
                # crfs optimize: lazyfs records the files CMD reads, in order, and writes the image
                p.opt = f"{registry.host}/bench/{name}:opt"
                saved = work / f"{name}.profile"
                run(["crfs", "optimize", gz_ref, p.opt, "--save-profile", str(saved), "--", *spec.cmd], timeout=900)
                p.profile = [line.strip() for line in saved.read_text().splitlines()
                             if line.strip() and not line.startswith("#")]
                print(f"{name}: crfs optimize recorded {len(p.profile)} files", file=sys.stderr)
            elif "d" in args.cases:
                # the profile: one lazy run on loopback without background fetch
                _, records = b.case(p, "c", "profile", 0)
                p.profile = files_fetched(records, registry.host, work)
                print(f"{name}: {len(p.profile)} files in the access profile; converting the optimized image",
                      file=sys.stderr)
                p.opt = optimize_image(p, registry.host, p.profile, work)
            pushed[name] = p
            meta["images"][name] = {"cmd": list(spec.cmd), "gzip_size": p.gzip_size, "esgz_size": p.esgz_size,
                                    "layers": len(manifest(image)["layers"]), "profile": p.profile,
                                    "opt_size": layers_size(registry.host, p.opt)[0] if p.opt else 0}

        if args.background_fetch:
            config.write_text(crfs_config(True, args.trace))
            crfs.stop()
            crfs.start()
            wait_crfs_reconnect(ctrd)

        if args.py_spy:  # crfs serve and its layer mount processes, from here to the end
            spy = subprocess.Popen(["py-spy", "record", "--rate", "250", "--subprocesses", "--format", "raw",
                                    "-o", str(b.py_spy / "crfs-serve-and-mounts.txt"), "--pid", str(crfs.daemon.pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            stack.callback(lambda: (spy.send_signal(2), spy.wait(30)))

        # warm-up, not recorded: the first container start of a fresh containerd is slower
        first = pushed[args.images[0]]
        b.case(first, "a", "warmup", 0)

        for rep in range(args.reps):
            for network in args.networks:
                b.network(network)
                for name in args.images:
                    cases = list(args.cases)
                    shift = rep % len(cases)
                    for case in cases[shift:] + cases[:shift]:
                        try:
                            sample, _ = b.case(pushed[name], case, network, rep)
                        except HarnessError as e:  # e.g. containerd's mount helper failing with ECHILD: once more
                            print(f"warning: {network} {name} {case} rep {rep + 1} failed, retrying once: {e}",
                                  file=sys.stderr)
                            meta.setdefault("retried", []).append(f"{network} {name} {case} rep {rep + 1}: {str(e)[:300]}")
                            b.recover(pushed[name], case)
                            sample, _ = b.case(pushed[name], case, network, rep)
                        samples.append(sample)
                        print(f"rep {rep + 1}/{args.reps} {network} {name} {case}: first output after "
                              f"{sample.ttfo:.2f} s (pull {sample.pull:.2f} s), {sample.bytes_first / 1e6:.1f} MB "
                              f"at first output, {sample.bytes_total / 1e6:.1f} MB in all, {sample.requests} requests",
                              file=sys.stderr)
    meta["machine"]["load_end"] = round(os.getloadavg()[0], 2)
    return {"meta": meta, "samples": [asdict(s) for s in samples]}


# ---------------------------------------------------------------- reporting


def machine_info() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "?")
    try:
        containerd = run(["containerd", "--version"], check=False).stdout.strip()
    except HarnessError:
        containerd = "?"
    rev = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "commit": rev.stdout.strip() or "?",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
        "python": platform.python_version(), "containerd": containerd,
        "load_start": round(os.getloadavg()[0], 2),
    }


def _spread(values: list[float], scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    v = [x * scale for x in values]
    return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"


def markdown(data: dict) -> str:
    meta, samples = data["meta"], data["samples"]
    m = meta["machine"]
    a = meta["args"]
    out = [
        f"    - command: {m['command']}",
        f"    - date: {m['date']}  commit: {m.get('commit', '?')} (crfs as in this working tree)",
        f"    - nproc: {m['nproc']}  cpu: {m['cpu']}",
        f"    - kernel: {m['kernel']}  python: {m['python']}",
        f"    - containerd: {m['containerd']}",
        f"    - load average (1 min) at start and end: {m.get('load_start', '?')} / {m.get('load_end', '?')} "
        "(the machine is shared with other work)",
        f"    - WAN: {a['rtt_ms']:g} ms per request, {a['mbit']:g} Mbit/s shared; loopback: the same proxy, no delay, "
        f"no cap; crfs background_fetch = {str(a['background_fetch']).lower()}; (d) made with "
        f"{'crfs optimize' if a.get('optimizer') == 'crfs' else 'the proxy-derived profile + crfs convert --prioritize-file'}",
        "",
    ]
    for network in [n for n in NETWORKS if any(s["network"] == n for s in samples)]:
        for name, info in meta["images"].items():
            rows = [s for s in samples if s["network"] == network and s["image"] == name]
            if not rows:
                continue
            reps = max(s["rep"] for s in rows) + 1
            title = "WAN" if network == "wan" else "loopback"
            out += [f"#### {title}: {name} (`{shlex.join(info['cmd'])}`), {info['layers']} layers, "
                    f"{info['gzip_size'] / 1e6:.1f} MB gzip / {info['esgz_size'] / 1e6:.1f} MB eStargz; "
                    f"{reps} cold repetitions", ""]
            base = [s["ttfo"] for s in rows if s["case"] == "a"]
            warm = all(s.get("run_warm") for s in rows)
            out += ["| case | first output s | ratio to (a) | pull s | run to first output s "
                    "| MB fetched by first output | % of image | MB fetched in all |" + (" second run, warm s |" if warm else ""),
                    "|---|---|---|---|---|---|---|---|" + ("---|" if warm else "")]
            for case in CASES:
                cs = [s for s in rows if s["case"] == case]
                if not cs:
                    continue
                ttfo = [s["ttfo"] for s in cs]
                ratio = f"{statistics.median(ttfo) / statistics.median(base):.2f}x" if base else ""
                size = info["gzip_size"] if case in ("a", "b") else (info["opt_size"] if case == "d" else info["esgz_size"])
                first_mb = statistics.median(s["bytes_first"] for s in cs)
                out.append(" | ".join([
                    f"| {CASE_LABEL[case]}", _spread(ttfo), ratio, _spread([s["pull"] for s in cs]),
                    _spread([s["run"] for s in cs]), f"{first_mb / 1e6:.1f}", f"{100 * first_mb / size:.1f} %",
                    f"{statistics.median(s['bytes_total'] for s in cs) / 1e6:.1f}"]) + (
                    f" | {_spread([s['run_warm'] for s in cs])} |" if warm else " |"))
            out.append("")
    return "\n".join(out)


def chart(data: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return False
    samples = data["samples"]
    groups = [(n, i) for n in NETWORKS for i in data["meta"]["images"]
              if any(s["network"] == n and s["image"] == i for s in samples)]
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.6), squeeze=False)
    colors = {"a": "#888888", "b": "#4c72b0", "c": "#dd8452", "d": "#55a868"}
    for ax, (network, name) in zip(axes[0], groups):
        cases = [c for c in CASES if any(s["network"] == network and s["image"] == name and s["case"] == c
                                         for s in samples)]
        meds, lo, hi = [], [], []
        for c in cases:
            v = [s["ttfo"] for s in samples if s["network"] == network and s["image"] == name and s["case"] == c]
            med = statistics.median(v)
            meds.append(med)
            lo.append(med - min(v))
            hi.append(max(v) - med)
        ax.bar(cases, meds, yerr=[lo, hi], color=[colors[c] for c in cases], capsize=3)
        ax.set_title(f"{name}, {'WAN' if network == 'wan' else 'loopback'}", fontsize=9)
        ax.set_ylabel("s to first output" if ax is axes[0][0] else "")
        ax.tick_params(labelsize=8)
    fig.suptitle("hello-bench: pull start to first output (median, min-max); "
                 "a overlayfs, b crfs, c crfs lazy, d crfs lazy optimized", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def docs_section(data: dict, with_chart: bool) -> str:
    a = data["meta"]["args"]
    text = [
        SECTION, "",
        "Targets (issue 6), on the WAN with the python image: (c) at most 0.26× of (a); (d) at most 0.2× of (a),",
        "fetching at most 6.5 % of the image's compressed size; (b) within 1.3× of (a).",
        "",
        "Method: `bench/hello/run.py` (see `bench/README.md`). One containerd with both snapshotters, crfs",
        "(`crfs serve`, chunk cache in its root) and a local docker-registry behind `bench/hello/wanproxy.py`,",
        f"which holds every response {a['rtt_ms']:g} ms and paces all responses together at {a['mbit']:g} Mbit/s",
        "for the WAN (no delay, no cap for loopback). Time to first output runs from the start of the pull",
        "(`ctr images pull` for a and b, `crfs rpull` for c and d) to the first line `ctr run --rm` prints;",
        "bytes are everything the proxy sent (manifests, configs, blobs, headers). Every case starts cold",
        "(image removed and garbage-collected, chunk cache deleted, `drop_caches`); cases are interleaved",
        "in a rotating order within each repetition; medians with min-max.",
    ]
    if a.get("optimizer") == "crfs":
        text += ["The image for (d) is made by `crfs optimize SRC DST -- CMD` (lazyfs records the files and byte",
                 "ranges CMD reads; the layer descriptors carry them as prefetch hints).", ""]
    else:
        text += ["The access profile for (d) comes from one lazy run on loopback: the proxy's Range requests mapped",
                 "through the layers' TOCs to file names, in order, given to `crfs convert --prioritize-file`.", ""]
    text += ["### Figures", ""]
    if with_chart:
        text += ["![hello-bench](hello-bench.png)", ""]
    text.append(markdown(data))
    if FINDINGS.is_file():
        text += ["", FINDINGS.read_text().rstrip(), ""]
    return "\n".join(text).rstrip() + "\n"


def write_docs(data: dict) -> None:
    charted = chart(data, CHART)
    body = DOCS.read_text()
    section = docs_section(data, charted)
    at = body.find(SECTION)
    if at < 0:  # a new section at the end
        body = body.rstrip("\n") + "\n\n" + section
    else:  # replace ours, up to the next section of the same level (if someone added one after it)
        end = body.find("\n## ", at + len(SECTION))
        rest = body[end + 1:] if end >= 0 else ""
        body = body[:at] + section + ("\n" + rest if rest else "")
    DOCS.write_text(body)
    print(f"wrote {DOCS}" + (f" and {CHART}" if charted else ""), file=sys.stderr)


# ---------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="cold repetitions of every case (default 3)")
    parser.add_argument("--images", default="busybox,python,gcc", help="comma-separated: busybox, python, gcc")
    parser.add_argument("--networks", default="loopback,wan", help="comma-separated: loopback, wan")
    parser.add_argument("--cases", default="abcd", help="which of a, b, c, d (default abcd)")
    parser.add_argument("--rtt-ms", type=float, default=50.0, help="WAN delay per request (default 50)")
    parser.add_argument("--mbit", type=float, default=100.0, help="WAN bandwidth, Mbit/s (default 100)")
    parser.add_argument("--optimizer", choices=("crfs", "proxy"), default="crfs",
                        help="how (d)'s image is made: crfs = crfs optimize SRC DST -- CMD (lazyfs records the files "
                             "read; default); proxy = the files covered by one lazy run's Range requests (an upper "
                             "bound: read-around brings neighbours too) + crfs convert --prioritize-file")
    parser.add_argument("--background-fetch", action="store_true",
                        help="crfs fetches the rest of each lazy layer in the background (default off)")
    parser.add_argument("--trace", action="store_true",
                        help="keep every proxied request (times from the pull's start) in the JSON, and the crfs and "
                             "containerd logs beside it")
    parser.add_argument("--warm", action="store_true",
                        help="after each first run, time a second ctr run of the same image (all bytes local)")
    parser.add_argument("--py-spy", type=Path, metavar="DIR",
                        help="record on-CPU profiles (py-spy, collapsed stacks) of crfs serve + mounts and of rpull into DIR")
    parser.add_argument("--quick", action="store_true", help="busybox and python, 1 repetition")
    parser.add_argument("--write-docs", action="store_true",
                        help=f"write the section of {DOCS.relative_to(REPO)} and {CHART.relative_to(REPO)}")
    parser.add_argument("--from-json", type=Path, help="report on saved results instead of running")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"where to save the results (default {RESULTS.relative_to(REPO)})")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.images = 1, "busybox,python"
    args.images = [i for i in args.images.split(",") if i]
    args.networks = [n for n in args.networks.split(",") if n]
    args.cases = [c for c in CASES if c in args.cases]
    for i in args.images:
        if i not in IMAGES:
            parser.error(f"unknown image {i!r}")
    for n in args.networks:
        if n not in NETWORKS:
            parser.error(f"unknown network {n!r}")

    if args.from_json:
        data = json.loads(args.from_json.read_text())
    else:
        data = bench(args)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1))
        print(f"results in {args.json}", file=sys.stderr)
    print(markdown(data))
    if args.write_docs:
        write_docs(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
