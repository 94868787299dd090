"""The API against a real docker-registry without auth: resolve, indexes,
blobs whole and by range, pushes (monolithic, chunked, mount), and interop
with skopeo in both directions."""

from __future__ import annotations

import io
import json
import random
import urllib.request
from pathlib import Path
from typing import Callable

import pytest

from harness.proc import require_binary, run
from harness.registry import Registry
from lazyfs.registry import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    NotFound,
    Platform,
    ProtocolError,
    RegistryClient,
    host_platform,
)

from .conftest import fast_config
from .content import build_image, build_index, push_image, push_index, sha256, write_oci_layout

Client = Callable[..., RegistryClient]


def test_resolve_tag_and_digest(plain_registry: Registry, make_client: Client) -> None:
    client = make_client()
    repo = client.repository(f"{plain_registry.host}/plain/single")
    image = build_image("amd64")
    digest = push_image(repo, image, tag="v1")
    assert digest == image.digest

    by_tag = client.resolve(f"{plain_registry.host}/plain/single:v1")
    assert by_tag.digest == image.digest and by_tag.index is None
    assert by_tag.manifest.raw == image.manifest and by_tag.manifest.media_type == OCI_MANIFEST
    assert [layer.digest for layer in by_tag.manifest.layers] == [sha256(image.layers[0])]
    assert by_tag.manifest.config.digest == sha256(image.config)

    by_digest = client.resolve(f"{plain_registry.host}/plain/single@{image.digest}")
    assert by_digest.manifest == by_tag.manifest
    assert repo.get_manifest("v1").digest == image.digest


def test_index_with_two_platforms(plain_registry: Registry, make_client: Client) -> None:
    other = "arm64" if host_platform().architecture != "arm64" else "amd64"
    native = build_image(host_platform().architecture)
    foreign = build_image(other, "v8" if other == "arm64" else "")
    client = make_client()
    repo = client.repository(f"{plain_registry.host}/plain/multi")
    index_digest = push_index(repo, [foreign, native], "multi")

    default = client.resolve(f"{plain_registry.host}/plain/multi:multi")
    assert default.digest == native.digest  # the host's platform by default
    assert default.index is not None and default.index.digest == index_digest
    assert default.index.media_type == OCI_INDEX

    chosen = client.resolve(f"{plain_registry.host}/plain/multi:multi", Platform.parse(f"linux/{other}"))
    assert chosen.digest == foreign.digest and chosen.platform.architecture == other
    configured = make_client(platform=Platform.parse(f"linux/{other}"))
    assert configured.resolve(f"{plain_registry.host}/plain/multi@{index_digest}").digest == foreign.digest

    with pytest.raises(NotFound, match="linux/riscv64.*offers"):
        client.resolve(f"{plain_registry.host}/plain/multi:multi", Platform.parse("linux/riscv64"))


def test_docker_manifest_list_pushed_by_skopeo(plain_registry: Registry, make_client: Client, tmp_path: Path) -> None:
    """skopeo converts our OCI index to a Docker manifest list on the way in."""
    images = [build_image("amd64"), build_image("arm", "v7")]
    write_oci_layout(tmp_path / "layout", images, "multi")
    run([require_binary("skopeo"), "--insecure-policy", "copy", "--quiet", "--all", "--format", "v2s2",
         "--dest-tls-verify=false", f"oci:{tmp_path / 'layout'}:multi",
         f"docker://{plain_registry.host}/plain/skopeo:list"])
    client = make_client()
    resolved = client.resolve(f"{plain_registry.host}/plain/skopeo:list", Platform.parse("linux/arm/v7"))
    assert resolved.index.media_type == DOCKER_MANIFEST_LIST
    assert resolved.manifest.media_type == DOCKER_MANIFEST
    repo = client.repository(f"{plain_registry.host}/plain/skopeo")
    assert repo.get_blob(resolved.manifest.layers[0].digest) == images[1].layers[0]


def test_skopeo_reads_what_we_push(plain_registry: Registry, make_client: Client, tmp_path: Path) -> None:
    images = [build_image("amd64"), build_image("arm64", "v8")]
    push_index(make_client().repository(f"{plain_registry.host}/plain/ours"), images, "ours")
    skopeo = require_binary("skopeo")
    raw = run([skopeo, "inspect", "--raw", "--tls-verify=false", f"docker://{plain_registry.host}/plain/ours:ours"]).stdout
    assert raw.encode() == build_index(images)
    # copying verifies every digest on the way
    run([skopeo, "--insecure-policy", "copy", "--quiet", "--all", "--src-tls-verify=false",
         f"docker://{plain_registry.host}/plain/ours:ours", f"oci:{tmp_path / 'copy'}:ours"])
    stored = {p.name for p in (tmp_path / "copy" / "blobs" / "sha256").iterdir()}
    assert {sha256(i.layers[0])[7:] for i in images} <= stored


@pytest.fixture
def big_blob(plain_registry: Registry) -> tuple[str, bytes]:
    data = random.Random(7).randbytes(3 * 1024 * 1024 + 123)
    client = RegistryClient(fast_config())
    try:
        client.repository(f"{plain_registry.host}/plain/blobs").push_blob(data)
    finally:
        client.close()
    return sha256(data), data


def test_blob_whole(plain_registry: Registry, make_client: Client, big_blob: tuple[str, bytes]) -> None:
    digest, data = big_blob
    repo = make_client().repository(f"{plain_registry.host}/plain/blobs")
    assert repo.get_blob(digest) == data
    assert repo.blob_size(digest) == len(data)
    out = io.BytesIO()
    assert repo.fetch_blob(digest, out, size=len(data)) == len(data) and out.getvalue() == data
    pieces = list(repo.open_blob(digest))
    assert len(pieces) > 1 and b"".join(pieces) == data  # streamed, not one read


def test_blob_ranges(plain_registry: Registry, make_client: Client, big_blob: tuple[str, bytes]) -> None:
    digest, data = big_blob
    repo = make_client().repository(f"{plain_registry.host}/plain/blobs")
    n = len(data)
    assert repo.get_range(digest, 0, 1) == data[:1]
    assert repo.get_range(digest, n - 51, 51) == data[-51:]  # a stargz footer
    assert repo.get_range(digest, 1000, 300_000) == data[1000:301_000]
    # several ranges in one request: multipart/byteranges, including overlapping ones
    ranges = [(5, 10), (n // 2, 4096), (n - 100, 100), (7, 20)]
    assert repo.get_ranges(digest, ranges) == [data[o : o + ln] for o, ln in ranges]
    # ranges adding up to more than the blob: the registry answers 200 with everything
    wide = [(0, n - 10), (10, n - 10)]
    assert repo.get_ranges(digest, wide) == [data[: n - 10], data[10:]]
    with pytest.raises(ProtocolError) as e:
        repo.get_range(digest, n + 10, 5)
    assert e.value.status == 416 and plain_registry.host in str(e.value)
    with pytest.raises(ProtocolError, match="does not cover|beyond"):
        repo.get_range(digest, n - 5, 10)


def test_missing_things_are_not_found(plain_registry: Registry, make_client: Client) -> None:
    client = make_client()
    repo = client.repository(f"{plain_registry.host}/plain/nothing")
    absent = sha256(b"absent")
    with pytest.raises(NotFound) as e:
        repo.get_blob(absent)
    assert plain_registry.host in str(e.value) and "plain/nothing" in str(e.value) and absent in str(e.value)
    assert e.value.status == 404
    with pytest.raises(NotFound, match="MANIFEST_UNKNOWN|NAME_UNKNOWN"):
        client.resolve(f"{plain_registry.host}/plain/nothing:nosuchtag")
    assert repo.blob_size(absent) is None and not repo.blob_exists(absent)


def test_push_blob_paths(plain_registry: Registry, make_client: Client, tmp_path: Path) -> None:
    client = make_client()
    src = client.repository(f"{plain_registry.host}/plain/src")
    dst = client.repository(f"{plain_registry.host}/plain/dst")
    data = random.Random(1).randbytes(700_000)
    digest = sha256(data)

    first = src.push_blob(data, chunk_size=256 * 1024)
    assert (first.digest, first.size, first.how) == (digest, len(data), "uploaded")
    assert src.push_blob(data).how == "exists"  # HEAD first: nothing sent again
    assert src.get_blob(digest) == data

    mounted = dst.push_blob(data, mount_from="plain/src")
    assert mounted.how == "mounted" and dst.get_blob(digest) == data

    other = random.Random(2).randbytes(1000)
    assert not dst.mount_blob(sha256(other), "plain/src")  # src lacks it: no mount
    via_fallback = dst.push_blob(other, mount_from="plain/src")
    assert via_fallback.how == "uploaded" and dst.get_blob(sha256(other)) == other

    path = tmp_path / "blob.bin"
    file_data = random.Random(3).randbytes(300_000)
    path.write_bytes(file_data)
    with open(path, "rb") as f:
        assert dst.push_blob(f, chunk_size=100_000).how == "uploaded"
    assert dst.get_blob(sha256(file_data)) == file_data


def test_push_manifest_by_tag_and_digest(plain_registry: Registry, make_client: Client) -> None:
    client = make_client()
    repo = client.repository(f"{plain_registry.host}/plain/manifests")
    image = build_image("amd64")
    for blob in (image.config, *image.layers):
        repo.push_blob(blob)
    assert repo.push_manifest(image.manifest, OCI_MANIFEST) == image.digest
    assert repo.push_manifest(image.manifest, OCI_MANIFEST, "latest") == image.digest
    assert client.resolve(f"{plain_registry.host}/plain/manifests").digest == image.digest
    with urllib.request.urlopen(f"{plain_registry.url}/v2/plain/manifests/tags/list", timeout=5) as answer:
        tags = json.load(answer)
    assert tags["tags"] == ["latest"]
