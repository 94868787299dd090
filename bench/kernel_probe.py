"""What the kernel does under the warm rows of ``lazyfs_bench.py`` (root only).

The warm rows compare two page caches, not two programs: these probes say
which requests still reach a FUSE daemon while a "warm" workload runs
(tracefs ``fuse:fuse_request_send``), how the page cache holds a file
(share of its cached pages inside large folios), and whether the machine
reclaims idle page cache on its own (DAMON ``pageout``).
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
DAMON = Path("/sys/kernel/mm/damon/admin/kdamonds")
PAGE = 4096
KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL = 15, 16
_SEND = re.compile(r"fuse_request_send: connection (\d+) req \d+ opcode \d+ \((\w+)\)")


def fuse_connection(mountpoint: Path) -> int:
    """The FUSE connection number of a mount (``/sys/fs/fuse/connections/N``)."""
    return os.minor(os.stat(mountpoint).st_dev)


class FuseRequests:
    """Counts the requests the kernel sends to one FUSE connection while the
    ``with`` block runs, by opcode (``FUSE_IOCTL``, ``FUSE_READ``, …), in a
    tracefs instance of its own. ``counts`` is empty where tracefs or the
    ``fuse`` events are missing (``available`` says which)."""

    def __init__(self, mountpoint: Path, name: str = "crfs-bench") -> None:
        self.connection = fuse_connection(mountpoint)
        self.instance = TRACEFS / "instances" / name
        self.counts: collections.Counter[str] = collections.Counter()
        self.available = False

    def __enter__(self) -> FuseRequests:
        if not (TRACEFS / "events").is_dir():
            subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], capture_output=True)
        if not (TRACEFS / "events/fuse/fuse_request_send").is_dir():
            return self
        self.instance.mkdir(exist_ok=True)
        (self.instance / "buffer_size_kb").write_text("8192\n")
        (self.instance / "trace").write_text("")
        (self.instance / "events/fuse/fuse_request_send/enable").write_text("1\n")
        self.available = True
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.available:
            return
        try:
            (self.instance / "events/fuse/fuse_request_send/enable").write_text("0\n")
            for line in (self.instance / "trace").read_text().splitlines():
                m = _SEND.search(line)
                if m and int(m.group(1)) == self.connection:
                    self.counts[m.group(2).removeprefix("FUSE_")] += 1
        finally:
            with contextlib.suppress(OSError):
                self.instance.rmdir()


def large_folio_share(path: Path, max_bytes: int = 64 << 20) -> tuple[float, int]:
    """(share of the cached pages of the first ``max_bytes`` of ``path`` that
    sit in large folios, number of cached pages), from /proc/self/pagemap and
    /proc/kpageflags. Maps the file read-only and touches only pages already
    cached (``mincore``-like: a page fault would read the rest in, so the
    file is read first by the caller)."""
    size = min(path.stat().st_size, max_bytes) // PAGE * PAGE
    fd = os.open(path, os.O_RDONLY)
    try:
        mapped = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        for off in range(0, size, PAGE):
            mapped[off]  # map the page (it is in the page cache: no I/O for a warm file)
        start = _mapping_start(path)
        large = cached = 0
        with open("/proc/self/pagemap", "rb") as pagemap, open("/proc/kpageflags", "rb") as kflags:
            pagemap.seek(start // PAGE * 8)
            entries = pagemap.read(size // PAGE * 8)
            for i in range(size // PAGE):
                entry = int.from_bytes(entries[i * 8:i * 8 + 8], "little")
                if not entry >> 63:
                    continue
                kflags.seek((entry & ((1 << 55) - 1)) * 8)
                flags = int.from_bytes(kflags.read(8), "little")
                cached += 1
                large += bool(flags & (1 << KPF_COMPOUND_HEAD | 1 << KPF_COMPOUND_TAIL))
        return (large / cached if cached else 0.0), cached
    finally:
        mapped.close()


def _mapping_start(path: Path) -> int:
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(str(path)):
                return int(line.split("-", 1)[0], 16)
    raise LookupError(f"{path} is not mapped")


def proactive_reclaim() -> str:
    """How the machine reclaims idle memory on its own: the DAMON schemes
    that page out, with their minimum age, or "none"."""
    found = []
    for state in sorted(DAMON.glob("*/state")):
        if state.read_text().strip() != "on":
            continue
        for scheme in sorted(p for p in state.parent.glob("contexts/*/schemes/*") if p.is_dir()):
            if (scheme / "action").read_text().strip() != "pageout":
                continue
            intervals = scheme.parents[1] / "monitoring_attrs/intervals"
            aggr_us = int((intervals / "aggr_us").read_text())
            min_age = int((scheme / "access_pattern/age/min").read_text())
            found.append(f"DAMON pageout of memory idle for {min_age * aggr_us / 1e6:g} s ({state.parent.name})")
    return "; ".join(found) or "none"


@contextlib.contextmanager
def reclaim_paused() -> Iterator[list[str]]:
    """Every running kdamond stopped for the block and started again after:
    a "warm" page cache then stays warm. Yields the kdamonds it stopped."""
    stopped = []
    for state in sorted(DAMON.glob("*/state")):
        if state.read_text().strip() == "on":
            state.write_text("off\n")
            stopped.append(state.parent.name)
    try:
        yield stopped
    finally:
        for name in stopped:
            (DAMON / name / "state").write_text("on\n")
