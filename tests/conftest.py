"""Shared fixtures: a real ``crfs serve`` process and a gRPC client for it.

The harness modules (tests/harness/) hold the process plumbing so that bench/
and scripts can use them too; fixtures here are thin wrappers that always
stop what they started.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from crfs_proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from crfs_proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from harness.crfs import CrfsServer


@dataclass
class CrfsClient:
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


@pytest.fixture
def crfs_client(tmp_path: Path) -> Iterator[CrfsClient]:
    with CrfsServer(tmp_path / "root", tmp_path / "crfs.sock") as server:
        client = connect(server)
        try:
            yield client
        finally:
            client.channel.close()
