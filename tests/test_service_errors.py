"""Bad requests get the gRPC code containerd maps to the right errdefs error,
and leave the store exactly as it was."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2

from crfs_proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb


def prepare(stub, key, parent="", **labels):
    return stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent, labels=labels))


def commit(stub, key, name, **labels):
    stub.Commit(pb.CommitSnapshotRequest(key=key, name=name, labels=labels))


@pytest.fixture
def populated(crfs_client):
    """committed base <- committed mid <- active work, and a view of mid."""
    stub = crfs_client.stub
    prepare(stub, "base-a")
    commit(stub, "base-a", "base")
    prepare(stub, "mid-a", "base")
    commit(stub, "mid-a", "mid")
    prepare(stub, "work", "mid")
    stub.View(pb.ViewSnapshotRequest(key="view", parent="mid"))
    return crfs_client


CASES = {
    "prepare with missing parent": (lambda s: prepare(s, "x", "no-such-parent"), grpc.StatusCode.NOT_FOUND),
    "prepare of an existing key": (lambda s: prepare(s, "work", "mid"), grpc.StatusCode.ALREADY_EXISTS),
    "prepare key that is a committed name": (lambda s: prepare(s, "base"), grpc.StatusCode.ALREADY_EXISTS),
    "prepare with an active parent": (lambda s: prepare(s, "x", "work"), grpc.StatusCode.INVALID_ARGUMENT),
    "prepare with an empty key": (lambda s: prepare(s, ""), grpc.StatusCode.INVALID_ARGUMENT),
    "prepare with an oversized label": (lambda s: prepare(s, "x", **{"k": "v" * 5000}), grpc.StatusCode.INVALID_ARGUMENT),
    "view with missing parent": (lambda s: s.View(pb.ViewSnapshotRequest(key="x", parent="nope")), grpc.StatusCode.NOT_FOUND),
    "commit of a view": (lambda s: commit(s, "view", "v2"), grpc.StatusCode.FAILED_PRECONDITION),
    "commit of a committed snapshot": (lambda s: commit(s, "mid", "m2"), grpc.StatusCode.FAILED_PRECONDITION),
    "commit of a missing key": (lambda s: commit(s, "nope", "n2"), grpc.StatusCode.NOT_FOUND),
    "commit to a taken name": (lambda s: commit(s, "work", "base"), grpc.StatusCode.ALREADY_EXISTS),
    # containerd checks the name before the key
    "commit of a missing key to a taken name": (lambda s: commit(s, "nope", "base"), grpc.StatusCode.ALREADY_EXISTS),
    "commit with an empty name": (lambda s: commit(s, "work", ""), grpc.StatusCode.INVALID_ARGUMENT),
    "remove of a snapshot with children": (lambda s: s.Remove(pb.RemoveSnapshotRequest(key="base")), grpc.StatusCode.FAILED_PRECONDITION),
    "remove of a missing key": (lambda s: s.Remove(pb.RemoveSnapshotRequest(key="nope")), grpc.StatusCode.NOT_FOUND),
    "mounts of a committed snapshot": (lambda s: s.Mounts(pb.MountsRequest(key="base")), grpc.StatusCode.FAILED_PRECONDITION),
    "mounts of a missing key": (lambda s: s.Mounts(pb.MountsRequest(key="nope")), grpc.StatusCode.NOT_FOUND),
    "stat of a missing key": (lambda s: s.Stat(pb.StatSnapshotRequest(key="nope")), grpc.StatusCode.NOT_FOUND),
    "usage of a missing key": (lambda s: s.Usage(pb.UsageRequest(key="nope")), grpc.StatusCode.NOT_FOUND),
    "update of a missing key": (
        lambda s: s.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="nope", labels={"a": "b"}))),
        grpc.StatusCode.NOT_FOUND,
    ),
}
for field in ("name", "parent", "kind", "created_at"):
    CASES[f"update of read-only field {field}"] = (
        lambda s, f=field: s.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="base", parent="x"), update_mask=field_mask_pb2.FieldMask(paths=[f]))),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
for bad in ("kind==", "==committed", "kind=committed", 'labels."unterminated', "name~=/(/", "a b"):
    CASES[f"walk with filter {bad!r}"] = (lambda s, b=bad: list(s.List(pb.ListSnapshotsRequest(filters=["kind==active", b]))), grpc.StatusCode.INVALID_ARGUMENT)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_request_gets_its_code_and_changes_nothing(populated, case):
    call, code = CASES[case]
    before = populated.state()
    with pytest.raises(grpc.RpcError) as err:
        call(populated.stub)
    assert err.value.code() == code, err.value.details()
    assert err.value.details(), "the error must say what is wrong"
    assert populated.state() == before
