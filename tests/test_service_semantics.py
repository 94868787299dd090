"""The calls behave as containerd's own snapshotters do (overlay + bolt storage)."""

from __future__ import annotations

import os
import time

import grpc
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crfs_proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb


def _mounts(resp):
    return [(m.type, m.source, list(m.options)) for m in resp.mounts]


def _chain(stub, n):
    """n committed layers c0 <- c1 <- ...; returns their names."""
    names, parent = [], ""
    for i in range(n):
        stub.Prepare(pb.PrepareSnapshotRequest(key=f"k{i}", parent=parent))
        stub.Commit(pb.CommitSnapshotRequest(key=f"k{i}", name=f"c{i}"))
        names.append(f"c{i}")
        parent = f"c{i}"
    return names


def test_mount_specs_follow_containerds_layouts(crfs_client):
    stub, snaps = crfs_client.stub, crfs_client.root / "snapshots"
    [(typ, src, opts)] = _mounts(stub.Prepare(pb.PrepareSnapshotRequest(key="k0")))
    assert (typ, opts) == ("bind", ["rw", "rbind"])
    base_fs = src
    assert os.path.isdir(base_fs) and base_fs.startswith(str(snaps))
    [(typ, _, opts)] = _mounts(stub.View(pb.ViewSnapshotRequest(key="empty-view")))
    assert (typ, opts) == ("bind", ["ro", "rbind"])
    stub.Commit(pb.CommitSnapshotRequest(key="k0", name="c0"))
    # a view of one parent is a read-only bind of that parent
    assert _mounts(stub.View(pb.ViewSnapshotRequest(key="v1", parent="c0"))) == [("bind", base_fs, ["ro", "rbind"])]
    [(typ, src, opts)] = _mounts(stub.Prepare(pb.PrepareSnapshotRequest(key="k1", parent="c0")))
    assert (typ, src) == ("fuse3.fuse-overlayfs", "overlay")
    work, upper, lower = opts
    assert work.startswith("workdir=") and upper.startswith("upperdir=")
    assert lower == f"lowerdir={base_fs}"
    stub.Commit(pb.CommitSnapshotRequest(key="k1", name="c1"))
    upper1 = upper[len("upperdir="):]
    # a view of two parents: fuse-overlayfs with lowerdirs only, newest first
    [(typ, _, opts)] = _mounts(stub.View(pb.ViewSnapshotRequest(key="v2", parent="c1")))
    assert (typ, opts) == ("fuse3.fuse-overlayfs", [f"lowerdir={upper1}:{base_fs}"])
    # Mounts answers the same as Prepare did
    assert _mounts(stub.Mounts(pb.MountsRequest(key="v2"))) == [(typ, "overlay", opts)]


def test_commit_keeps_the_directory_and_replaces_labels(crfs_client):
    stub = crfs_client.stub
    [m] = stub.Prepare(pb.PrepareSnapshotRequest(key="a", labels={"prepare": "1"})).mounts
    with open(os.path.join(m.source, "file"), "wb") as f:
        f.write(b"x" * 10000)
    stub.Commit(pb.CommitSnapshotRequest(key="a", name="A", labels={"commit": "2"}))
    info = stub.Stat(pb.StatSnapshotRequest(key="A")).info
    assert (info.name, info.kind, dict(info.labels)) == ("A", pb.COMMITTED, {"commit": "2"})
    [m2] = stub.View(pb.ViewSnapshotRequest(key="v", parent="A")).mounts
    assert m2.source == m.source and os.path.exists(os.path.join(m2.source, "file"))
    with pytest_raises(grpc.StatusCode.NOT_FOUND):
        stub.Stat(pb.StatSnapshotRequest(key="a"))


def test_usage_walks_active_and_records_committed(crfs_client):
    stub = crfs_client.stub
    [m] = stub.Prepare(pb.PrepareSnapshotRequest(key="a")).mounts
    empty = stub.Usage(pb.UsageRequest(key="a"))
    for i in range(3):
        with open(os.path.join(m.source, f"f{i}"), "wb") as f:
            f.write(os.urandom(64 * 1024))
    active = stub.Usage(pb.UsageRequest(key="a"))
    assert active.inodes == empty.inodes + 3
    assert active.size >= empty.size + 3 * 64 * 1024
    stub.Commit(pb.CommitSnapshotRequest(key="a", name="A"))
    assert stub.Usage(pb.UsageRequest(key="A")) == active
    # committed usage is the recorded figure, not a new walk
    os.unlink(os.path.join(m.source, "f0"))
    assert stub.Usage(pb.UsageRequest(key="A")) == active


def test_update_labels_like_containerd(crfs_client):
    stub = crfs_client.stub
    stub.Prepare(pb.PrepareSnapshotRequest(key="a", labels={"keep": "1", "drop": "2"}))
    created = stub.Stat(pb.StatSnapshotRequest(key="a")).info

    def update(labels, *paths):
        mask = field_mask_pb2.FieldMask(paths=list(paths)) if paths else None
        return stub.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="a", labels=labels), update_mask=mask)).info

    time.sleep(0.01)
    info = update({"new": "3"}, "labels.new", "labels.drop")
    assert dict(info.labels) == {"keep": "1", "new": "3"}
    assert info.updated_at.ToNanoseconds() > created.updated_at.ToNanoseconds()
    assert info.created_at == created.created_at
    assert dict(update({"only": "x"}, "labels").labels) == {"only": "x"}
    assert dict(update({"all": "y", "empty": ""}).labels) == {"all": "y"}  # no mask: labels replaced
    assert dict(stub.Stat(pb.StatSnapshotRequest(key="a")).info.labels) == {"all": "y"}


def test_walk_with_containerds_filters(crfs_client):
    stub = crfs_client.stub
    names = _chain(stub, 3)
    ref = "containerd.io/snapshot.ref"
    stub.Prepare(pb.PrepareSnapshotRequest(key="target", parent="c2", labels={ref: "sha256:abc"}))
    stub.Prepare(pb.PrepareSnapshotRequest(key="other", parent="c1", labels={ref: "sha256:abc"}))

    def walk(*filters):
        return sorted(i.name for r in stub.List(pb.ListSnapshotsRequest(filters=list(filters))) for i in r.info)

    assert walk() == sorted(names + ["target", "other"])
    # the filter containerd's metadata layer sends after AlreadyExists
    assert walk(f'labels."{ref}"==sha256:abc,parent==c2') == ["target"]
    assert walk(f'labels."{ref}"==sha256:abc') == ["other", "target"]
    assert walk("kind==committed") == names
    assert walk("kind==active,parent==c1", "name==c0") == ["c0", "other"]  # OR of ANDs
    assert walk("name~=/^c[12]$/") == ["c1", "c2"]
    assert walk(f'labels."{ref}"') == ["other", "target"]  # presence
    assert walk("parent!=c2,kind==active") == ["other"]


def test_walk_streams_many_snapshots(crfs_client):
    stub = crfs_client.stub
    for i in range(250):
        stub.View(pb.ViewSnapshotRequest(key=f"v{i:03d}"))
    responses = list(stub.List(pb.ListSnapshotsRequest()))
    assert len(responses) > 1
    assert sorted(i.name for r in responses for i in r.info) == [f"v{i:03d}" for i in range(250)]


def test_cleanup_removes_only_orphans(crfs_client):
    stub, snaps = crfs_client.stub, crfs_client.root / "snapshots"
    _chain(stub, 2)
    stub.Prepare(pb.PrepareSnapshotRequest(key="live", parent="c1"))
    live = sorted(os.listdir(snaps))
    for orphan in ("9999", "new-123", "rm-7-xyz"):
        os.makedirs(snaps / orphan / "fs" / "deep")
    assert len(os.listdir(snaps)) == len(live) + 3
    stub.Cleanup(pb.CleanupRequest())
    assert sorted(os.listdir(snaps)) == live
    assert [i.name for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info] == ["c0", "c1", "live"]


def test_remove_deletes_the_directory(crfs_client):
    stub, snaps = crfs_client.stub, crfs_client.root / "snapshots"
    _chain(stub, 2)
    stub.Prepare(pb.PrepareSnapshotRequest(key="a", parent="c1"))
    for key in ("a", "c1", "c0"):
        stub.Remove(pb.RemoveSnapshotRequest(key=key))
    assert os.listdir(snaps) == []
    assert list(stub.List(pb.ListSnapshotsRequest())) == []


def test_health_and_socket_mode(crfs_client):
    health = health_pb2_grpc.HealthStub(crfs_client.channel)
    for service in ("", "containerd.services.snapshots.v1.Snapshots"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert os.stat(crfs_client.address).st_mode & 0o777 == 0o600


class pytest_raises:
    """``pytest.raises`` for a gRPC status code."""

    def __init__(self, code):
        self.code = code

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        assert isinstance(exc, grpc.RpcError), f"expected {self.code}, got {exc!r}"
        assert exc.code() == self.code, exc.details()
        return True
