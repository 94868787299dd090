"""A cap on registry requests in flight across every layer process of a host.

Each layer mount is its own process, so a per-process limit alone lets N
layers open N times as many connections. ``FetchSlots`` is a counting
semaphore shared through a directory of lock files: a request holds an
exclusive ``flock`` on one of ``n`` files while it runs. The kernel drops the
lock when the holder dies, so a killed process never leaks a slot.
"""

from __future__ import annotations

import fcntl
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class NoFetchSlot(TimeoutError):
    """Every slot stayed taken until the deadline."""


class FetchSlots:
    def __init__(self, directory: str | os.PathLike[str], n: int) -> None:
        if n < 1:
            raise ValueError("the number of fetch slots must be at least 1")
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.paths = [self.directory / f"slot-{i}" for i in range(n)]
        for path in self.paths:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))

    @contextmanager
    def held(self, timeout: float) -> Iterator[int]:
        """Holds one slot for the block (its index); NoFetchSlot after ``timeout``."""
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            for i in random.sample(range(len(self.paths)), len(self.paths)):
                # a fresh open file description per attempt: flock locks are
                # per description, so threads must not share one
                fd = os.open(self.paths[i], os.O_RDWR)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                try:
                    yield i
                finally:
                    os.close(fd)  # releases the lock
                return
            if time.monotonic() >= deadline:
                raise NoFetchSlot(f"all {len(self.paths)} fetch slots in {self.directory} stayed busy for {timeout:g}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
