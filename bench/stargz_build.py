#!/usr/bin/env python3
"""eStargz conversion: crfs's writer against the Go reference, on one real layer.

Makes a deterministic tar of real files (default: /usr/lib/python3*,
/usr/share/doc), then converts it with ``lazyfs.stargz.writer.build`` (in
this process) and with the reference (``estargz.Build`` via
tests/stargz/gohelper, built in GOPATH mode), alternating which goes first,
and reports median throughput in MB/s of uncompressed layer and the ratio.
Then the size overhead of eStargz over a plain gzip of the same tar at the
same level. Both converters use the reference's defaults unless told
otherwise: 4 MiB chunks, gzip level 9, all cores.

    python3 bench/stargz_build.py [--reps 3] [--level 9] [--chunk-size N] [--max-mb 300] [DIR...]

Prints a JSON summary; writes it to bench/results/stargz_build.json too.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lazyfs.stargz.writer import DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL, build  # noqa: E402

GOHELPER = REPO / "tests/stargz/gohelper"
DEFAULT_DIRS = sorted(glob.glob("/usr/lib/python3*")) + ["/usr/share/doc"]


def make_tar(dirs: list[str], out: Path, max_bytes: int) -> int:
    """A tar of ``dirs`` (sorted, stops before ``max_bytes`` of file data); returns its size."""
    total = 0
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        for top in dirs:
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames.sort()
                for name in [dirpath, *(os.path.join(dirpath, f) for f in sorted(filenames))]:
                    try:
                        size = os.lstat(name).st_size
                        if total + size > max_bytes:
                            return out.stat().st_size if out.exists() else 0
                        tf.add(name, arcname=name.lstrip("/"), recursive=False)
                        total += size
                    except OSError:
                        continue
    return out.stat().st_size


def build_go_helper(dest: Path) -> Path:
    env = dict(os.environ, GO111MODULE="off", GOPATH="/usr/share/gocode", GOFLAGS="")
    out = dest / "gohelper"
    subprocess.run(["go", "build", "-o", str(out), "."], cwd=GOHELPER, env=env, check=True)
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def plain_gzip_size(tar: Path, level: int) -> int:
    """One gzip stream of the whole tar: what `gzip -<level>` makes."""
    deflater = zlib.compressobj(level, zlib.DEFLATED, 31)
    size = 0
    with open(tar, "rb") as f:
        while piece := f.read(1 << 20):
            size += len(deflater.compress(piece))
    return size + len(deflater.flush())


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="*", default=DEFAULT_DIRS)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--level", type=int, default=DEFAULT_LEVEL)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--max-mb", type=int, default=300, help="cap on the layer's file data")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="crfs-bench-") as tmp:
        work = Path(tmp)
        helper = build_go_helper(work)
        tar = work / "layer.tar"
        tar_size = make_tar(args.dirs, tar, args.max_mb << 20)
        with tarfile.open(tar) as tf:
            entries = sum(1 for _ in tf)
        print(f"layer: {tar_size / 1e6:.1f} MB, {entries} entries from {', '.join(args.dirs)}", file=sys.stderr)

        ours, theirs = work / "crfs.esgz", work / "go.esgz"
        go_cmd = [str(helper), "build", str(tar), str(theirs), "--chunk-size", str(args.chunk_size), "--level", str(args.level)]
        runs: dict[str, list[float]] = {"crfs": [], "go": []}
        for rep in range(args.reps):
            order = ["crfs", "go"] if rep % 2 == 0 else ["go", "crfs"]
            for who in order:
                if who == "crfs":
                    seconds = timed(lambda: build(tar, ours, chunk_size=args.chunk_size, level=args.level))
                else:
                    seconds = timed(lambda: subprocess.run(go_cmd, check=True, stdout=subprocess.DEVNULL))
                runs[who].append(seconds)
                print(f"rep {rep + 1}: {who:4s} {seconds:6.2f} s  {tar_size / seconds / 1e6:6.1f} MB/s", file=sys.stderr)

        gzip_size = plain_gzip_size(tar, args.level)
        crfs_s, go_s = statistics.median(runs["crfs"]), statistics.median(runs["go"])
        summary = {
            "command": " ".join(["python3", *sys.argv]),
            "machine": f"{_cpu_model()}, {os.cpu_count()} cores, kernel {platform.release()}, "
                       f"Python {platform.python_version()}, zlib {zlib.ZLIB_RUNTIME_VERSION}",
            "go": subprocess.run(["go", "version"], capture_output=True, text=True).stdout.strip(),
            "layer_bytes": tar_size,
            "entries": entries,
            "level": args.level,
            "chunk_size": args.chunk_size,
            "reps": args.reps,
            "crfs_seconds": runs["crfs"],
            "go_seconds": runs["go"],
            "crfs_mb_per_s": round(tar_size / crfs_s / 1e6, 1),
            "go_mb_per_s": round(tar_size / go_s / 1e6, 1),
            "throughput_ratio_crfs_over_go": round(go_s / crfs_s, 2),
            "plain_gzip_bytes": gzip_size,
            "crfs_estargz_bytes": ours.stat().st_size,
            "go_estargz_bytes": theirs.stat().st_size,
            "crfs_overhead_pct": round(100 * (ours.stat().st_size / gzip_size - 1), 2),
            "go_overhead_pct": round(100 * (theirs.stat().st_size / gzip_size - 1), 2),
        }
    results = REPO / "bench/results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "stargz_build.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
