#!/usr/bin/env python3
"""Lazy fetching against downloading: what a container's first reads cost.

Builds an eStargz layer of real files (default: /usr/lib/python3*), pushes it
to a local docker-registry, and puts the test suite's proxy in front of it
(with TCP_NODELAY) that delays every blob request by ``--rtt`` ms (the kernel here has no
netem). Then measures, each from a cold cache:

With ``--mbps`` each blob request is instead paced to that bandwidth (on
loopback there is no limit otherwise, so ``download`` is flattered).

- ``download``: the whole blob in one GET (what an ordinary pull does first);
- ``open``: footer + TOC (what a lazy mount does before serving);
- ``first_reads``: reading ``--files`` random files one by one through
  ``RemoteChunks``, total and per file (median);
- ``warm_reads``: the same files again (cache hits);
- ``prefetch_all``: the background walk making the whole layer local,
  unpaced, and its request count.

    python3 bench/lazy_fetch.py [--rtt 20 | --mbps 100] [--files 20] [--max-mb 60] [--chunk-kib 4096] [DIR...]

Prints JSON; writes it to bench/results/lazy_fetch.json too.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from harness.registry import Registry  # noqa: E402
from lazyfs.cache import ChunkCache  # noqa: E402
from lazyfs.fetcher import RemoteChunks  # noqa: E402
from lazyfs.prefetch import PrefetchConfig, Prefetcher  # noqa: E402
from lazyfs.registry import RegistryClient, RegistryConfig  # noqa: E402
from lazyfs.remote_source import RegistryBlobSource  # noqa: E402
from lazyfs.stargz import EntryType, StargzReader  # noqa: E402
from lazyfs.stargz.writer import build  # noqa: E402
from registry.faultproxy import FaultProxy, _handler  # noqa: E402
from stargz_build import make_tar  # noqa: E402  (bench/ is on sys.path when run as a script)

BLOB_GET = r"^GET /v2/.*/blobs/"
T = TypeVar("T")


class LatencyProxy(FaultProxy):
    """The test proxy with TCP_NODELAY: as is, its separate header and body
    writes meet delayed ACKs and add ~40 ms to every request."""

    def __enter__(self) -> LatencyProxy:
        self._server.start(_handler(self))
        return self


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rtt", type=float, default=20.0, help="ms added to every blob request")
    ap.add_argument("--mbps", type=float, default=0.0, help="instead of --rtt: cap each blob request at this Mbit/s")
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--max-mb", type=int, default=60)
    ap.add_argument("--chunk-kib", type=int, default=4096)
    ap.add_argument("dirs", nargs="*", default=sorted(glob.glob("/usr/lib/python3*")))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="crfs-bench-") as tmp:
        work = Path(tmp)
        tar_bytes = make_tar(args.dirs, work / "layer.tar", args.max_mb << 20)
        layer = build(work / "layer.tar", work / "layer.esgz", chunk_size=args.chunk_kib << 10)
        data = (work / "layer.esgz").read_bytes()
        config = RegistryConfig(docker_config=Path("/nonexistent/config.json"))
        with Registry(work / "registry") as registry, LatencyProxy(registry.host) as proxy, RegistryClient(config) as client:
            client.repository(f"{registry.host}/bench/layer").push_blob(data, layer.digest)
            if args.mbps:  # the proxy's "slow" fault: 16 KiB pieces, paced
                proxy.add("slow", BLOB_GET, times=10**9, chunk=16 << 10, delay=(16 << 10) * 8 / (args.mbps * 1e6))
            else:
                proxy.add("stall", BLOB_GET, times=10**9, delay=args.rtt / 1000)
            repo = client.repository(f"{proxy.host}/bench/layer")
            source = RegistryBlobSource(repo, layer.digest, layer.size)
            report: dict[str, object] = {
                "command": " ".join(sys.argv), "nproc": os.cpu_count(), "python": platform.python_version(),
                "rtt_ms": 0 if args.mbps else args.rtt, "mbps": args.mbps, "tar_bytes": tar_bytes, "blob_bytes": layer.size, "chunk_kib": args.chunk_kib,
            }
            report["download_s"] = round(timed(lambda: repo.get_blob(layer.digest, layer.size))[0], 3)
            open_s, reader = timed(lambda: StargzReader.open(source, toc_digest=layer.toc_digest))
            report["open_s"] = round(open_s, 3)
            regular = [e for e in reader.toc if e.type is EntryType.REG and e.size > 0]
            picked = random.Random(1).sample(regular, min(args.files, len(regular)))
            with RemoteChunks(source, layer.digest, ChunkCache(work / "cache")) as store:
                for phase in ("first_reads", "warm_reads"):
                    times = [timed(lambda e=e: store.get_many(list(e.chunks)))[0] for e in picked]
                    report[phase] = {
                        "files": len(picked), "total_s": round(sum(times), 3),
                        "median_ms": round(statistics.median(times) * 1000, 2),
                    }
                first = report["first_reads"]
                first.update(bytes_fetched=store.stats()["bytes_fetched"], requests=store.stats()["requests"])  # type: ignore[union-attr]
            with RemoteChunks(source, layer.digest, ChunkCache(work / "cache2")) as store:
                prefetcher = Prefetcher(store, reader.toc, PrefetchConfig(rate=1e12, burst=1 << 40, span=8 << 20))
                prefetch_s, _ = timed(lambda: (prefetcher.start(), prefetcher.wait_done()))
                report["prefetch_all"] = {
                    "s": round(prefetch_s, 3), "requests": store.stats()["requests"],
                    "percent_local": prefetcher.progress()["percent"],
                }
    text = json.dumps(report, indent=2)
    print(text)
    (REPO / "bench/results").mkdir(exist_ok=True)
    (REPO / "bench/results/lazy_fetch.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
