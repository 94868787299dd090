"""A direct gRPC client for crfs's Snapshots service, bypassing containerd.

containerd's ``ctr snapshots ls`` answers from containerd's own metadata
database; asking crfs itself is the only way to see what the backend holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import grpc

from crfs_proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from crfs_proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc

from .crfs import CrfsServer

SNAPSHOTTER = "crfs"


class SnapshotsClient:
    """``with SnapshotsClient(sock) as c: c.prepare("k")``; thin on purpose."""

    def __init__(self, address: Path, timeout: float = 30.0):
        self.address = Path(address)
        self.timeout = timeout
        self.channel: Optional[grpc.Channel] = None
        self.stub: Optional[pb_grpc.SnapshotsStub] = None

    def __enter__(self) -> "SnapshotsClient":
        self.channel = grpc.insecure_channel(f"unix://{self.address}")
        grpc.channel_ready_future(self.channel).result(timeout=self.timeout)
        self.stub = pb_grpc.SnapshotsStub(self.channel)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.channel is not None:
            self.channel.close()

    def prepare(self, key: str, parent: str = "", labels: Optional[Mapping[str, str]] = None):
        req = pb.PrepareSnapshotRequest(snapshotter=SNAPSHOTTER, key=key, parent=parent, labels=labels or {})
        return self.stub.Prepare(req, timeout=self.timeout).mounts

    def commit(self, name: str, key: str, labels: Optional[Mapping[str, str]] = None) -> None:
        req = pb.CommitSnapshotRequest(snapshotter=SNAPSHOTTER, name=name, key=key, labels=labels or {})
        self.stub.Commit(req, timeout=self.timeout)

    def remove(self, key: str) -> None:
        self.stub.Remove(pb.RemoveSnapshotRequest(snapshotter=SNAPSHOTTER, key=key), timeout=self.timeout)

    def list(self) -> list[pb.Info]:
        """All snapshots crfs holds (the Walk that containerd's List maps to)."""
        infos = []
        for resp in self.stub.List(pb.ListSnapshotsRequest(snapshotter=SNAPSHOTTER), timeout=self.timeout):
            infos.extend(resp.info)
        return infos


def crfs_snapshot_names(address: Path) -> list[str]:
    """Names of every snapshot the crfs server on ``address`` holds."""
    with SnapshotsClient(address) as client:
        return sorted(info.name for info in client.list())


@dataclass
class CrfsClient:
    """A running server and a raw stub, for tests that call the API directly."""

    server: CrfsServer
    channel: grpc.Channel
    stub: pb_grpc.SnapshotsStub

    @property
    def root(self) -> Path:
        return self.server.root

    @property
    def address(self) -> Path:
        return self.server.address

    def state(self) -> tuple:
        """Everything a call could change: every snapshot's info, every directory."""
        infos = sorted(
            (i.name, i.parent, i.kind, sorted(i.labels.items()), i.created_at.ToNanoseconds(), i.updated_at.ToNanoseconds())
            for r in self.stub.List(pb.ListSnapshotsRequest())
            for i in r.info
        )
        dirs = sorted(str(p.relative_to(self.root)) for p in (self.root / "snapshots").rglob("*"))
        return infos, dirs


def connect(server: CrfsServer) -> CrfsClient:
    channel = grpc.insecure_channel(f"unix:{server.address}")
    return CrfsClient(server, channel, pb_grpc.SnapshotsStub(channel))
