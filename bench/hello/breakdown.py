#!/usr/bin/env python3
"""Where the time of a lazy case goes, from the request traces that
``run.py --trace`` keeps (``bench/hello/results/hello.json``).

For every lazy sample (c, d), seconds from the start of ``crfs rpull``:
its first request (CLI start-up), the manifest and config received, the
first request of a layer mount process, how many requests the mounts made
before rpull ended and when the last of them finished (for d this includes
the prefetch of the prioritized files), rpull's end; then for ``ctr run``:
the time to first output, the requests made meanwhile, the time with at
least one request outstanding and the time with none (the container and
lazyfs working). Medians over repetitions per network, image and case.

    python bench/hello/breakdown.py [bench/hello/results/hello.json]
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def busy_time(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(spans):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def analyse(sample: dict) -> dict:
    trace = sample["trace"]
    reqs = sorted((t for t in trace if t[0] != "first-output"), key=lambda t: t[5])
    marker = next(t for t in trace if t[0] == "first-output")
    run_start, first_out = marker[5], marker[6]
    # rpull's own requests: the manifest, the config (and a GET /v2/ before
    # them in traces from before the ping went); then the layer mounts'
    pings = 1 if reqs and reqs[0][1] == "" else 0
    metadata_done = reqs[pings + 1][6] if len(reqs) > pings + 1 else 0.0
    mounts = reqs[pings + 2:]
    before_run = [t for t in mounts if t[5] < run_start]
    in_run = [t for t in reqs if t[5] >= run_start]
    busy = busy_time([(t[5], t[6]) for t in in_run])
    return {
        "cli_start": reqs[0][5] if reqs else 0.0,
        "metadata_done": metadata_done,
        "first_mount_request": mounts[0][5] if mounts else run_start,
        "last_pull_byte": max((t[6] for t in before_run), default=run_start),
        "pull": run_start,
        "mount_requests": len(before_run),
        "run": first_out - run_start,
        "run_requests": len(in_run),
        "run_network": busy,
        "run_other": (first_out - run_start) - busy,
    }


COLUMNS = [
    ("cli_start", "rpull's first request"),
    ("metadata_done", "manifest + config in"),
    ("first_mount_request", "first layer-mount request"),
    ("mount_requests", "mount requests"),
    ("last_pull_byte", "last byte of requests begun during the pull"),
    ("pull", "rpull done"),
    ("run", "ctr run to first output"),
    ("run_requests", "requests during the run"),
    ("run_network", "run: with a request outstanding"),
    ("run_other", "run: none outstanding"),
]


def main(argv: list[str]) -> int:
    path = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent / "results" / "hello.json"
    data = json.loads(path.read_text())
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for s in data["samples"]:
        if s["case"] in ("c", "d") and s.get("trace"):
            groups[(s["network"], s["image"], s["case"])].append(analyse(s))
    print("| network | image | case | " + " | ".join(label for _, label in COLUMNS) + " |")
    print("|---|---|---|" + "---|" * len(COLUMNS))
    med = statistics.median
    for (network, image, case), rows in sorted(groups.items()):
        cells = [f"{med(r[k] for r in rows):.0f}" if k.endswith("requests") else f"{med(r[k] for r in rows):.2f}"
                 for k, _ in COLUMNS]
        print(f"| {network} | {image} | {case} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
