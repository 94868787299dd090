"""Fixtures for the fetch / cache / prefetch tests: one eStargz layer built
per session, and per test a real docker-registry on 127.0.0.1 holding it,
a fault-injecting proxy in front (which also records every Range asked
for), and a registry client that talks to the proxy. Everything started
here is stopped when its test ends; no binary means failure, not skip.
"""

from __future__ import annotations

import random
import re
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from harness.registry import Registry
from lazyfs.registry import RegistryClient, RegistryConfig, Repository
from lazyfs.remote_source import RegistryBlobSource
from lazyfs.stargz import StargzReader
from lazyfs.stargz.writer import BuildResult, build
from registry.conftest import fast_config
from registry.faultproxy import FaultProxy

CHUNK = 64 << 10
REPO = "fetch/layer"
SMALL_FILES = 150
BIG = "data/big.bin"
PRIORITIZED = ("bin/app", "etc/app.conf")


@dataclass
class Layer:
    path: Path
    build: BuildResult
    files: dict[str, bytes]

    @property
    def digest(self) -> str:
        return self.build.digest

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()


def _contents() -> dict[str, bytes]:
    rng = random.Random(7)
    files = {
        "bin/app": rng.randbytes(150_000),
        "etc/app.conf": b"answer = 42\n" * 100,
        BIG: rng.randbytes(20 * CHUNK + 999),  # incompressible: ~1.3 MB of blob, 21 chunks
    }
    for i in range(SMALL_FILES):
        text = f"file {i}\n".encode() * rng.randint(50, 2000)
        files[f"small/{i // 20}/f{i:03}.txt"] = text + rng.randbytes(rng.randint(1000, 20000))
    return files


def build_layer(work: Path, files: dict[str, bytes], prioritized: tuple[str, ...] = ()) -> Layer:
    """``files`` as a tar, converted to eStargz with CHUNK-sized chunks."""
    tar_path = work / "layer.tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, _Reader(data))
    blob = work / "layer.esgz"
    result = build(tar_path, blob, chunk_size=CHUNK, prioritized=prioritized)
    return Layer(blob, result, files)


@pytest.fixture(scope="session")
def layer(tmp_path_factory: pytest.TempPathFactory) -> Layer:
    return build_layer(tmp_path_factory.mktemp("fetch-layer"), _contents(), PRIORITIZED)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        out, self._pos = self._data[self._pos : end], min(end, len(self._data))
        return out


def client_config(**kw: object) -> RegistryConfig:
    """The registry tests' fast config, a little faster still."""
    defaults: dict = dict(read_timeout=3.0, retry_budget=5.0, backoff_initial=0.02, backoff_max=0.2)
    defaults.update(kw)
    return fast_config(**defaults)


@dataclass
class Remote:
    """A registry holding the layer, a proxy in front, a client to the proxy."""

    registry: Registry
    proxy: FaultProxy
    client: RegistryClient
    repo: Repository
    layer: Layer

    def source(self) -> RegistryBlobSource:
        return RegistryBlobSource(self.repo, self.layer.digest, self.layer.build.size)

    def reader(self) -> StargzReader:
        return StargzReader.open(self.source(), toc_digest=self.layer.build.toc_digest)

    def blob_gets(self) -> list[str]:
        """The Range header of every blob GET the proxy has seen."""
        return [s.headers.get("Range", "") for s in self.proxy.requests(r"^GET /v2/.*/blobs/")]

    def bytes_requested(self) -> int:
        total = 0
        for header in self.blob_gets():
            for start, end in re.findall(r"(\d*)-(\d+)", header):
                # a suffix range (-N, opening a layer) is N bytes, at most the blob
                total += int(end) - int(start) + 1 if start else min(int(end), self.layer.build.size)
        return total


@pytest.fixture(autouse=True)
def no_threads_left_behind() -> Iterator[None]:
    """Every fetch and prefetch thread a test starts is stopped by it."""
    yield
    deadline = time.monotonic() + 5
    while (left := [t.name for t in threading.enumerate() if t.name.startswith("lazyfs-")]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"threads still running: {left}"


@pytest.fixture
def remote(tmp_path: Path, layer: Layer) -> Iterator[Remote]:
    with Registry(tmp_path / "registry") as registry, FaultProxy(registry.host) as proxy:
        with RegistryClient(client_config()) as client:
            client.repository(f"{registry.host}/{REPO}").push_blob(layer.data, layer.digest)
            repo = client.repository(f"{proxy.host}/{REPO}")
            yield Remote(registry, proxy, client, repo, layer)
