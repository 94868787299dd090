#!/usr/bin/env python3
"""Benchmark crfs against containerd's builtin overlayfs snapshotter.

1. pull+run: ``ctr images pull`` then ``ctr run --rm`` of the same image,
   N times per snapshotter, interleaved (the order flips every repetition so
   neither snapshotter always runs on a warmer machine), each from a cold
   state: the image is deleted and garbage-collected before every pull.
2. gRPC: Prepare+Commit pairs then Removes straight against ``crfs serve``,
   from one client and from several concurrent client processes.

Prints markdown tables; see bench/README.md. Needs root, like the e2e tests.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness import SnapshotsClient, build_whiteout_image, containerd_stack, crfs_server, push_image, temp_workdir  # noqa: E402
from harness.flow import CRFS, OVERLAYFS, leftovers, pull, remove_image, run_sh  # noqa: E402
from harness.proc import run  # noqa: E402

SNAPSHOTTERS = (OVERLAYFS, CRFS)
PHASES = ("pull", "run", "pull+run")


# ---------------------------------------------------------------- reporting


def machine_info() -> list[str]:
    """What a reader needs to compare numbers across machines."""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor() or "?",
    )
    containerd = run(["containerd", "--version"], check=False).stdout.strip()
    return [
        f"command: {shlex.join([sys.executable, *sys.argv])}",
        f"nproc: {os.cpu_count()}  cpu: {cpu}",
        f"kernel: {platform.release()}  python: {platform.python_version()}",
        f"containerd: {containerd}",
    ]


def spread(values: list[float]) -> str:
    """Median with min-max, in milliseconds."""
    ms = [v * 1000 for v in values]
    return f"{statistics.median(ms):.1f} ({min(ms):.1f}-{max(ms):.1f})"


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- pull+run


@dataclass
class Timings:
    """Seconds per phase per snapshotter, one entry per repetition."""

    by: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: {s: {p: [] for p in PHASES} for s in SNAPSHOTTERS}
    )

    def add(self, snapshotter: str, pull_s: float, run_s: float) -> None:
        self.by[snapshotter]["pull"].append(pull_s)
        self.by[snapshotter]["run"].append(run_s)
        self.by[snapshotter]["pull+run"].append(pull_s + run_s)

    def markdown(self) -> str:
        rows = []
        for phase in PHASES:
            base, crfs = self.by[OVERLAYFS][phase], self.by[CRFS][phase]
            ratio = statistics.median(crfs) / statistics.median(base)
            rows.append([phase, spread(base), spread(crfs), f"{ratio:.2f}x"])
        header = ["phase", "overlayfs ms, median (min-max)", "crfs ms, median (min-max)", "crfs/overlayfs"]
        return table(header, rows)


def bench_pull_run(reps: int, filler_mb: int) -> Timings:
    """Interleaved cold pull + run of one image with both snapshotters."""
    timings = Timings()
    with temp_workdir("crfs-bench-") as work, containerd_stack(with_crfs=True) as stack:
        image = build_whiteout_image(work / "image", filler_bytes=filler_mb << 20)
        ref = push_image(image, stack.registry.host, "bench/pullrun")
        ctrd = stack.containerd
        crfs = {"crfs_root": stack.crfs.root, "crfs_address": stack.crfs.address}
        for rep in range(reps):
            order = SNAPSHOTTERS if rep % 2 == 0 else SNAPSHOTTERS[::-1]
            for snapshotter in order:
                t0 = time.perf_counter()
                pull(ctrd, ref, snapshotter)
                t1 = time.perf_counter()
                run_sh(ctrd, ref, snapshotter, f"bench-{snapshotter}-{rep}", "cat /etc/layer3.txt >/dev/null")
                t2 = time.perf_counter()
                timings.add(snapshotter, t1 - t0, t2 - t1)
                remove_image(ctrd, ref)
                left = leftovers(ctrd, snapshotter, **(crfs if snapshotter == CRFS else {}))
                if left:
                    print(f"warning: {snapshotter} rep {rep}: not cold, left {left}", file=sys.stderr)
            print(f"pull+run rep {rep + 1}/{reps} done", file=sys.stderr)
    return timings


# ---------------------------------------------------------------- gRPC


@dataclass
class OpStats:
    """Per-call latencies (s) and the wall time (s) each phase took."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {"prepare": [], "commit": [], "remove": []})
    walls: dict[str, float] = field(default_factory=dict)

    def merge(self, other: "OpStats") -> None:
        for op, values in other.latencies.items():
            self.latencies[op].extend(values)


def _timed(latencies: list[float], call, *args) -> None:
    t0 = time.perf_counter()
    call(*args)
    latencies.append(time.perf_counter() - t0)


def grpc_client(address: str, prefix: str, pairs: int) -> tuple[OpStats, dict[str, tuple[float, float]]]:
    """One client: ``pairs`` Prepare+Commit, then a Remove of each.

    Returns latencies and, per phase, (start, end) on the monotonic clock,
    which is system-wide so concurrent clients' phases can be joined.
    """
    stats = OpStats()
    spans = {}
    with SnapshotsClient(Path(address)) as client:
        for i in range(10):  # warm the channel; not measured
            client.prepare(f"{prefix}-warm-{i}")
            client.remove(f"{prefix}-warm-{i}")
        start = time.perf_counter()
        for i in range(pairs):
            _timed(stats.latencies["prepare"], client.prepare, f"{prefix}-active-{i}")
            _timed(stats.latencies["commit"], client.commit, f"{prefix}-{i}", f"{prefix}-active-{i}")
        spans["prepare+commit"] = (start, time.perf_counter())
        start = time.perf_counter()
        for i in range(pairs):
            _timed(stats.latencies["remove"], client.remove, f"{prefix}-{i}")
        spans["remove"] = (start, time.perf_counter())
    return stats, spans


def bench_grpc(pairs: int, clients: int) -> OpStats:
    """``pairs`` pairs in total, split over ``clients`` processes (not
    threads: the GIL would make the client the bottleneck) on a fresh root."""
    stats = OpStats()
    with crfs_server() as server:
        if clients == 1:
            results = [grpc_client(str(server.address), "c0", pairs)]
        else:
            ctx = multiprocessing.get_context("spawn")  # grpc does not survive fork
            with ProcessPoolExecutor(clients, mp_context=ctx) as pool:
                futures = [pool.submit(grpc_client, str(server.address), f"c{n}", pairs // clients)
                           for n in range(clients)]
                results = [f.result() for f in futures]
        with SnapshotsClient(server.address) as client:
            left = len(client.list())
        if left:
            print(f"warning: {left} snapshots left after the gRPC benchmark", file=sys.stderr)
    for client_stats, _ in results:
        stats.merge(client_stats)
    for phase in ("prepare+commit", "remove"):
        spans = [spans[phase] for _, spans in results]
        stats.walls[phase] = max(end for _, end in spans) - min(start for start, _ in spans)
    return stats


def grpc_markdown(runs: dict[int, OpStats]) -> str:
    """Latency per call; throughput per phase (all clients together)."""
    rows = []
    for clients, stats in runs.items():
        lat = stats.latencies
        pairs = [p + c for p, c in zip(lat["prepare"], lat["commit"])]
        rows += [
            _row(clients, "Prepare", lat["prepare"], ""),
            _row(clients, "Commit", lat["commit"], ""),
            _row(clients, "Prepare+Commit pair", pairs, f"{len(pairs) / stats.walls['prepare+commit']:.0f} pairs/s"),
            _row(clients, "Remove", lat["remove"], f"{len(lat['remove']) / stats.walls['remove']:.0f} calls/s"),
        ]
    return table(["clients", "call", "calls", "throughput", "p50 ms", "p99 ms"], rows)


def _row(clients: int, call: str, latencies: list[float], throughput: str) -> list[str]:
    p50, p99 = (percentile(latencies, pct) * 1000 for pct in (50, 99))
    return [str(clients), call, str(len(latencies)), throughput, f"{p50:.2f}", f"{p99:.2f}"]


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="pull+run repetitions per snapshotter (default 5)")
    parser.add_argument("--filler-mb", type=int, default=0,
                        help="MiB of incompressible data added to the image's first layer (default 0)")
    parser.add_argument("--grpc-pairs", type=int, default=2000, help="Prepare+Commit pairs (default 2000)")
    parser.add_argument("--grpc-clients", type=int, default=4, help="concurrent gRPC clients (default 4)")
    parser.add_argument("--skip-pull-run", action="store_true")
    parser.add_argument("--skip-grpc", action="store_true")
    args = parser.parse_args(argv)

    print("\n".join(f"- {line}" for line in machine_info()), end="\n\n")
    if not args.skip_pull_run:
        timings = bench_pull_run(args.reps, args.filler_mb)
        print(f"### pull + run, {args.reps} cold repetitions each, interleaved "
              f"(image: 3 layers, busybox + {args.filler_mb} MiB filler)\n")
        print(timings.markdown(), end="\n\n")
    if not args.skip_grpc:
        runs = {1: bench_grpc(args.grpc_pairs, 1)}
        if args.grpc_clients > 1:
            runs[args.grpc_clients] = bench_grpc(args.grpc_pairs, args.grpc_clients)
        print(f"### crfs gRPC: {args.grpc_pairs} Prepare+Commit pairs, then Removes\n")
        print(grpc_markdown(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
