"""A layer's prefetch label reaches its mount process through a Prepare to
the real ``crfs serve``: the process fetches those bytes while it reads the
TOC, and reads of them ask the registry nothing more; a malformed label is
ignored (the layer still mounts)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from crfs_proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from lazyfs import mount
from lazyfs.forkserver import process_name
from lazyfs.prefetch_hints import PREFETCH_RANGES_LABEL, STARGZ_PREFETCH_LABEL
from lazyfs.stargz import StargzReader
from lazyfs.stargz.source import BytesSource
from test_remote_snapshots import FILES, Env, _blob_bytes, _wait, env, gzip_layer, layer  # noqa: F401 - fixtures

BIG = "usr/share/data.bin"


def _ranges_of(env: Env, path: str) -> tuple[str, int]:
    """The crfs label value covering ``path``'s chunks, and how many there are."""
    toc = StargzReader.open(BytesSource(env.layer.data), toc_digest=env.layer.build.toc_digest).toc
    chunks = toc.chunks_for_range(path, 0, 1 << 40)
    start = chunks[0].compressed_range[0]
    end = sum(chunks[-1].compressed_range)
    return f"{start}:{end - start}", len(chunks)


def _prepare(env: Env, key: str, target: str, extra: dict[str, str]) -> None:
    with pytest.raises(grpc.RpcError) as err:
        env.stub.Prepare(pb.PrepareSnapshotRequest(key=key, labels={**env.labels(target), **extra}))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS, err.value.details()


def test_the_prefetch_label_is_fetched_at_mount_and_served_without_requests(env: Env) -> None:
    spec, n = _ranges_of(env, BIG)
    _prepare(env, "default/1/extract-1 chain1", "chain1", {PREFETCH_RANGES_LABEL: spec, STARGZ_PREFETCH_LABEL: "1"})
    mountpoint = env.mountpoint()
    status = mount.status(mountpoint)
    # forked from crfs serve's fork server: named after its mountpoint
    assert Path(f"/proc/{status['pid']}/comm").read_text().strip() == process_name(mountpoint)
    assert _wait(lambda: mount.status(mountpoint)["store"]["hint"]["state"] == "done")
    hint = mount.status(mountpoint)["store"]["hint"]
    assert hint["ranges"] == 1 and hint["bytes"] == int(spec.split(":")[1])  # the crfs label won
    assert hint["chunks_taken"] == n and hint["chunks_rejected"] == 0 and hint["bytes_fetched"] >= 2_000_000, hint
    before = _blob_bytes(env.proxy, env.layer)
    assert (mountpoint / BIG).read_bytes() == FILES[BIG]
    assert _blob_bytes(env.proxy, env.layer) == before  # all from the cache


def test_a_malformed_label_is_ignored(env: Env) -> None:
    _prepare(env, "default/1/extract-1 chain1", "chain1", {PREFETCH_RANGES_LABEL: "10:5,0:5"})
    status = mount.status(env.mountpoint())
    assert "hint" not in status["store"]
    assert (env.mountpoint() / "etc/hello.txt").read_bytes() == FILES["etc/hello.txt"]


def test_layer_request_carries_the_hint() -> None:
    from snapshotter.remote import layer_request

    labels = {
        "containerd.io/snapshot.ref": "chain1",
        "containerd.io/snapshot/cri.image-ref": "registry.example/app:v1",
        "containerd.io/snapshot/cri.layer-digest": "sha256:" + "a" * 64,
        "containerd.io/snapshot/stargz/toc.digest": "sha256:" + "b" * 64,
    }
    request = layer_request({**labels, STARGZ_PREFETCH_LABEL: "1000"})
    assert request is not None and request.layer.prefetch_ranges == "0:1000"  # type: ignore[attr-defined]
    request = layer_request({**labels, STARGZ_PREFETCH_LABEL: "1000", PREFETCH_RANGES_LABEL: "0:10,100:20"})
    assert request is not None and request.layer.prefetch_ranges == "0:10,100:20"  # type: ignore[attr-defined]
    request = layer_request({**labels, PREFETCH_RANGES_LABEL: "0:10,5:20"})
    assert request is not None and request.layer.prefetch_ranges == ""  # type: ignore[attr-defined]
    assert request.layer.source == "registry://registry.example/app@sha256:" + "a" * 64


def test_upcoming_layers_take_their_hint_from_the_manifest() -> None:
    """Layers premounted from ``cri.image-layers`` have no labels of their
    own yet: their mount processes get the manifest digest to read the hint from."""
    from snapshotter.remote import layer_request

    this, nxt, manifest = "sha256:" + "a" * 64, "sha256:" + "c" * 64, "sha256:" + "d" * 64
    labels = {
        "containerd.io/snapshot.ref": "chain1",
        "containerd.io/snapshot/cri.image-ref": "registry.example/app:v1",
        "containerd.io/snapshot/cri.layer-digest": this,
        "containerd.io/snapshot/cri.image-layers": f"{this},{nxt}",
        "containerd.io/snapshot/stargz/toc.digest": "sha256:" + "b" * 64,
    }
    request = layer_request({**labels, "containerd.io/snapshot/cri.manifest-digest": manifest})
    assert request is not None
    [upcoming] = request.upcoming
    assert upcoming.digest == nxt and upcoming.prefetch_manifest == manifest  # type: ignore[attr-defined]
    request = layer_request({**labels, "containerd.io/snapshot/cri.manifest-digest": "garbage"})
    assert request is not None and request.upcoming[0].prefetch_manifest == ""  # type: ignore[attr-defined]


def test_a_premount_passes_the_manifest_to_its_mount_process(tmp_path: Path) -> None:
    from lazyfs.layer_source import RemoteOptions
    from lazyfs.mount import remote_args

    args = remote_args(RemoteOptions(prefetch_manifest="sha256:" + "d" * 64))
    assert args[args.index("--prefetch-manifest") + 1] == "sha256:" + "d" * 64
    args = remote_args(RemoteOptions(prefetch_ranges="0:10", prefetch_manifest="sha256:" + "d" * 64))
    assert "--prefetch-manifest" not in args and "0:10" in args
