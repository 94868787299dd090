"""The client behind a fault-injecting proxy: transient faults are retried
(and blob downloads resumed), persistent ones end in a typed, bounded error,
redirects keep Range and drop credentials on a host change, and mirrors
fall through to the registry."""

from __future__ import annotations

import base64
import random
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from harness.proc import free_port
from harness.registry import Registry
from lazyfs.registry import (
    DigestMismatch,
    IncompleteBody,
    InsecureRegistry,
    ProtocolError,
    RegistryClient,
    Unreachable,
)

from .conftest import PASSWORD, USER, auths_entry, fast_config, write_docker_config
from .content import build_image, push_image, sha256
from .faultproxy import FaultProxy

Client = Callable[..., RegistryClient]
BLOB = random.Random(11).randbytes(600_000)
DIGEST = sha256(BLOB)
IMAGE = build_image("amd64")
BLOB_GET = r"^GET /v2/faults/app/blobs/"


@pytest.fixture
def seeded(plain_registry: Registry) -> Registry:
    client = RegistryClient(fast_config())
    try:
        repo = client.repository(f"{plain_registry.host}/faults/app")
        repo.push_blob(BLOB)
        push_image(repo, IMAGE, "v1")
    finally:
        client.close()
    return plain_registry


@pytest.fixture
def proxy(seeded: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(seeded.host) as p:
        yield p


def test_connection_resets_and_503s_are_retried(proxy: FaultProxy, make_client: Client) -> None:
    proxy.add("reset", r"^GET /v2/faults/app/manifests/v1", times=2)
    proxy.add("status", r"^GET /v2/faults/app/manifests/v1", times=2, status=503)
    proxy.add("status", BLOB_GET, times=1, status=502)
    client = make_client(max_attempts=5)
    assert client.resolve(f"{proxy.host}/faults/app:v1").digest == IMAGE.digest
    assert client.repository(f"{proxy.host}/faults/app").get_blob(DIGEST) == BLOB
    assert [s.fault for s in proxy.requests("manifests/v1")] == ["reset", "reset", "status", "status", None]
    assert [s.fault for s in proxy.requests(BLOB_GET)] == ["status", None]


def test_429_retry_after_is_honoured(proxy: FaultProxy, make_client: Client) -> None:
    proxy.add("status", BLOB_GET, status=429, headers={"Retry-After": "1"})
    repo = make_client().repository(f"{proxy.host}/faults/app")
    start = time.monotonic()
    assert repo.get_range(DIGEST, 100, 50) == BLOB[100:150]
    assert time.monotonic() - start >= 1.0  # the backoff alone would be ~0.05 s


def test_slow_body_within_read_timeout(proxy: FaultProxy, make_client: Client) -> None:
    proxy.add("slow", BLOB_GET, chunk=64 * 1024, delay=0.05)
    assert make_client(read_timeout=1.0).repository(f"{proxy.host}/faults/app").get_blob(DIGEST) == BLOB
    assert len(proxy.requests(BLOB_GET)) == 1


def test_stalled_body_times_out_and_is_retried(proxy: FaultProxy, make_client: Client) -> None:
    proxy.add("stall", BLOB_GET, delay=1.5)
    repo = make_client(read_timeout=0.5).repository(f"{proxy.host}/faults/app")
    start = time.monotonic()
    assert repo.get_range(DIGEST, 0, 1000) == BLOB[:1000]
    assert time.monotonic() - start < 1.5
    assert len(proxy.requests(BLOB_GET)) == 2


def test_truncated_blob_is_resumed_with_range(proxy: FaultProxy, make_client: Client) -> None:
    proxy.add("truncate", BLOB_GET, keep=0.5)
    repo = make_client().repository(f"{proxy.host}/faults/app")
    assert repo.get_blob(DIGEST) == BLOB
    first, second = proxy.requests(BLOB_GET)
    assert "Range" not in first.headers
    resumed_at = int(second.headers["Range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= len(BLOB) // 2


def test_truncated_manifest_is_retried(proxy: FaultProxy, make_client: Client) -> None:
    proxy.add("truncate", r"^GET /v2/faults/app/manifests/v1", keep=0.5)
    assert make_client().resolve(f"{proxy.host}/faults/app:v1").digest == IMAGE.digest
    assert [s.fault for s in proxy.requests("manifests/v1")] == ["truncate", None]


def test_truncated_range_is_retried(proxy: FaultProxy, make_client: Client) -> None:
    proxy.add("truncate", BLOB_GET, keep=0.3)
    repo = make_client().repository(f"{proxy.host}/faults/app")
    ranges = [(10, 1000), (300_000, 5000)]
    assert repo.get_ranges(DIGEST, ranges) == [BLOB[o : o + n] for o, n in ranges]
    assert len(proxy.requests(BLOB_GET)) == 2


def test_persistent_truncation_is_an_error(proxy: FaultProxy, make_client: Client) -> None:
    proxy.add("truncate", BLOB_GET, times=100, keep=0.5)
    repo = make_client(max_attempts=3).repository(f"{proxy.host}/faults/app")
    with pytest.raises(IncompleteBody) as e:
        repo.get_blob(DIGEST)
    assert proxy.host in str(e.value) and "faults/app" in str(e.value) and DIGEST in str(e.value)
    assert "3 attempts" in str(e.value)
    with pytest.raises(IncompleteBody):
        repo.get_range(DIGEST, 0, 400_000)


def test_corrupted_content_is_detected(proxy: FaultProxy, make_client: Client) -> None:
    proxy.add("corrupt", BLOB_GET)
    proxy.add("corrupt", r"^GET /v2/faults/app/manifests/sha256")
    client = make_client()
    with pytest.raises(DigestMismatch) as e:
        client.repository(f"{proxy.host}/faults/app").get_blob(DIGEST)
    assert DIGEST in str(e.value) and proxy.host in str(e.value)
    with pytest.raises(DigestMismatch):
        client.resolve(f"{proxy.host}/faults/app@{IMAGE.digest}")


def test_200_answer_to_range_is_cut_correctly(proxy: FaultProxy, make_client: Client) -> None:
    proxy.add("strip-range", BLOB_GET, times=2)
    repo = make_client().repository(f"{proxy.host}/faults/app")
    assert repo.get_range(DIGEST, 12345, 678) == BLOB[12345:13023]
    assert repo.get_ranges(DIGEST, [(0, 3), (500_000, 10)]) == [BLOB[:3], BLOB[500_000:500_010]]


def test_wrong_content_range_is_refused(proxy: FaultProxy, make_client: Client) -> None:
    proxy.add("shift-range", BLOB_GET)
    with pytest.raises(ProtocolError, match="does not cover"):
        make_client().repository(f"{proxy.host}/faults/app").get_range(DIGEST, 1000, 100)


def test_persistent_503_is_bounded(proxy: FaultProxy, make_client: Client) -> None:
    proxy.add("status", BLOB_GET, times=1000, status=503)
    repo = make_client(max_attempts=50, retry_budget=1.5).repository(f"{proxy.host}/faults/app")
    start = time.monotonic()
    with pytest.raises(Unreachable) as e:
        repo.get_blob(DIGEST)
    assert time.monotonic() - start < 3
    assert e.value.status == 503 and "budget" in str(e.value) and proxy.host in str(e.value)


def test_registry_down_is_bounded(make_client: Client) -> None:
    host = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(Unreachable) as e:
        make_client(retry_budget=1.5, max_attempts=100).resolve(f"{host}/any/thing:v1")
    assert time.monotonic() - start < 3
    assert host in str(e.value) and "ConnectionRefusedError" in str(e.value)


def test_uploads_survive_faults(proxy: FaultProxy, make_client: Client) -> None:
    repo = make_client().repository(f"{proxy.host}/faults/upload")
    chunked = random.Random(5).randbytes(500_000)
    proxy.add("reset", r"^PATCH ", times=1)  # a chunk lost: resume from the upload's status
    proxy.add("status", r"^PATCH ", times=1, status=503)
    assert repo.push_blob(chunked, chunk_size=100_000).how == "uploaded"
    assert any(s.method == "GET" and "/blobs/uploads/" in s.path for s in proxy.seen)
    monolithic = random.Random(6).randbytes(200_000)
    proxy.add("reset", r"^PUT /v2/faults/upload/blobs/uploads/", times=1)  # start over
    assert repo.push_blob(monolithic).how == "uploaded"
    assert repo.get_blob(sha256(chunked)) == chunked and repo.get_blob(sha256(monolithic)) == monolithic


@pytest.fixture
def basic_seeded(basic_registry: Registry, tmp_path: Path) -> tuple[Registry, Path]:
    config = write_docker_config(tmp_path / "seed", {"auths": {basic_registry.host: auths_entry()}})
    client = RegistryClient(fast_config(docker_config=config))
    try:
        client.repository(f"{basic_registry.host}/faults/app").push_blob(BLOB)
    finally:
        client.close()
    return basic_registry, config


def test_redirect_to_other_host_keeps_range_drops_credentials(
    basic_seeded: tuple[Registry, Path], make_client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg, _ = basic_seeded
    basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    # requests would attach ~/.netrc credentials to any host; the client must not let it
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.2 login netrc-user password netrc-pass\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    # "storage": another host (127.0.0.2) that authorizes by itself, like a presigned URL
    with FaultProxy(reg.host, bind="127.0.0.2", inject_headers={"Authorization": basic}) as storage, \
            FaultProxy(reg.host) as front:
        front.add("redirect", BLOB_GET, times=3, target=f"http://{storage.host}")
        config = write_docker_config(tmp_path, {"auths": {front.host: auths_entry()}})
        repo = make_client(docker_config=config).repository(f"{front.host}/faults/app")
        # no ping: a first request (not redirected) meets the 401 and learns the challenge
        assert repo.blob_size(DIGEST) == len(BLOB)
        ranges = [(5, 100), (400_000, 1000)]
        assert repo.get_ranges(DIGEST, ranges) == [BLOB[o : o + n] for o, n in ranges]
        assert repo.get_range(DIGEST, 77, 7) == BLOB[77:84]
        assert repo.get_blob(DIGEST) == BLOB
        at_front = front.requests(BLOB_GET)
        at_storage = storage.requests(BLOB_GET)
        assert len(at_front) == len(at_storage) == 3
        assert all(s.headers.get("Authorization", "").startswith("Basic ") for s in at_front)
        assert not any("Authorization" in s.headers for s in at_storage)
        assert [s.headers.get("Range") for s in at_storage] == ["bytes=5-104,400000-400999", "bytes=77-83", None]


def test_redirect_to_plain_http_elsewhere_is_refused(proxy: FaultProxy, make_client: Client) -> None:
    proxy.add("redirect", BLOB_GET, target="http://storage.example.invalid")
    with pytest.raises(InsecureRegistry, match="storage.example.invalid"):
        make_client().repository(f"{proxy.host}/faults/app").get_range(DIGEST, 0, 10)


def test_mirrors_in_order_then_origin(seeded: Registry, make_client: Client) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with FaultProxy(seeded.host) as broken, FaultProxy(seeded.host) as good:
        broken.add("status", r"/v2/faults/", times=1000, status=500)
        client = make_client(mirrors={seeded.host: [dead, broken.host, good.host]}, max_attempts=2, mirror_cooldown=60)
        repo = client.repository(f"{seeded.host}/faults/app")
        assert client.resolve(f"{seeded.host}/faults/app:v1").digest == IMAGE.digest
        assert repo.get_range(DIGEST, 10, 10) == BLOB[10:20]
        assert good.requests(r"manifests/v1") and good.requests(BLOB_GET)
        assert broken.requests(r"manifests/v1") and not broken.requests(BLOB_GET)  # down: skipped a while

        good.add("status", r"/v2/faults/", times=1000, status=404)  # the good mirror lacks it now
        assert repo.get_range(DIGEST, 20, 10) == BLOB[20:30]  # from the registry itself
        # pushes never go to mirrors
        before = len(good.seen) + len(broken.seen)
        repo.push_blob(b"pushed to the origin only")
        assert len(good.seen) + len(broken.seen) == before
