"""The host-wide cap on registry requests: shared by threads and processes,
released when a holder dies, and honoured by ``RemoteChunks``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lazyfs.fetcher import FetchConfig, RemoteChunks
from lazyfs.fetchslots import FetchSlots, NoFetchSlot
from lazyfs.stargz import BytesSource, StargzReader

from .conftest import BIG, Layer


class _ConcurrencyProbe:
    """A source that records how many reads run at once."""

    def __init__(self, inner: BytesSource) -> None:
        self.inner, self.now, self.peak = inner, 0, 0
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self.inner.size

    def read_at(self, offset: int, length: int) -> bytes:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            time.sleep(0.02)
            return self.inner.read_at(offset, length)
        finally:
            with self._lock:
                self.now -= 1


def test_slots_bound_concurrency_across_threads(tmp_path: Path) -> None:
    slots = FetchSlots(tmp_path, 2)
    now, peak, lock = [0], [0], threading.Lock()

    def work() -> None:
        with slots.held(10):
            with lock:
                now[0] += 1
                peak[0] = max(peak[0], now[0])
            time.sleep(0.03)
            with lock:
                now[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 2


def test_a_killed_holder_frees_its_slot_and_a_busy_host_times_out(tmp_path: Path) -> None:
    FetchSlots(tmp_path, 1)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1])\n"
        "from lazyfs.fetchslots import FetchSlots\n"
        "with FetchSlots(sys.argv[2], 1).held(5):\n"
        "    print('held', flush=True); time.sleep(60)\n"
    ), str(Path(__file__).resolve().parents[2]), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(NoFetchSlot):
            with FetchSlots(tmp_path, 1).held(0.2):
                pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        with FetchSlots(tmp_path, 1).held(2) as i:
            assert i == 0
    finally:
        holder.kill()
        holder.wait()


def test_remote_chunks_never_exceed_the_host_cap(layer: Layer, tmp_path: Path) -> None:
    chunks = StargzReader.open(BytesSource(layer.data)).toc[BIG].chunks
    probe = _ConcurrencyProbe(BytesSource(layer.data))
    config = FetchConfig(max_concurrent=4, gap=0, max_span=1)  # one request per chunk
    with RemoteChunks(probe, layer.digest, None, config, slots=FetchSlots(tmp_path, 1)) as store:
        data = store.get_many(chunks)
    assert b"".join(data) == layer.files[BIG]
    assert probe.peak == 1
