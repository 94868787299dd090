"""SIGKILL in the middle of Prepare, Commit or Remove: the next start has a
consistent store, and Cleanup removes every leftover directory."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import grpc
import pytest

from crfs_proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from harness.snapshots_client import CrfsClient, connect
from harness.crfs import CrfsServer

CRASH_ENV = "CRFS_TEST_CRASH_POINT"


def assert_consistent(client: CrfsClient) -> None:
    """Every snapshot's directories exist; after Cleanup nothing else does."""
    stub = client.stub
    infos = [i for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info]
    for info in infos:
        if info.kind == pb.COMMITTED:
            probe = f"probe-{info.name}"
            mounts = stub.View(pb.ViewSnapshotRequest(key=probe, parent=info.name)).mounts
        else:
            probe, mounts = None, stub.Mounts(pb.MountsRequest(key=info.name)).mounts
        for m in mounts:
            paths = [m.source] if m.type == "bind" else [p for o in m.options for p in o.split("=", 1)[1].split(":")]
            for path in paths:
                assert os.path.isdir(path), f"{info.name}: {path} missing"
        if probe:
            stub.Remove(pb.RemoveSnapshotRequest(key=probe))
    stub.Cleanup(pb.CleanupRequest())
    dirs = sorted(os.listdir(client.root / "snapshots"))
    assert all(d.isdigit() for d in dirs), dirs
    assert len(dirs) == len(infos)


def _base(client: CrfsClient) -> None:
    client.stub.Prepare(pb.PrepareSnapshotRequest(key="base-a"))
    client.stub.Commit(pb.CommitSnapshotRequest(key="base-a", name="base"))
    client.stub.Prepare(pb.PrepareSnapshotRequest(key="active", parent="base"))


OPERATIONS = {
    "create:before-rename": lambda s: s.Prepare(pb.PrepareSnapshotRequest(key="new", parent="base")),
    "create:after-rename": lambda s: s.Prepare(pb.PrepareSnapshotRequest(key="new", parent="base")),
    "commit:before-commit": lambda s: s.Commit(pb.CommitSnapshotRequest(key="active", name="done")),
    "remove:before-commit": lambda s: s.Remove(pb.RemoveSnapshotRequest(key="active")),
    "remove:after-commit": lambda s: s.Remove(pb.RemoveSnapshotRequest(key="active")),
}


@pytest.mark.parametrize("point", sorted(OPERATIONS))
def test_kill_at_crash_point(tmp_path, point):
    root, sock = tmp_path / "root", tmp_path / "s.sock"
    with CrfsServer(root, sock) as server:
        client = connect(server)
        _base(client)
        before = client.state()
    with CrfsServer(root, sock, env={CRASH_ENV: point}) as server:
        client = connect(server)
        with pytest.raises(grpc.RpcError) as err:
            OPERATIONS[point](client.stub)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.stop() == -signal.SIGKILL, server.stderr_tail()
    with CrfsServer(root, sock) as server:
        client = connect(server)
        infos, _ = client.state()
        names = {i[0] for i in infos}
        if point.startswith("create"):
            assert infos == before[0]  # the uncommitted Prepare left no record
        elif point == "remove:after-commit":
            assert names == {"base"}  # the removal had committed
        else:
            assert infos == before[0]
        assert_consistent(client)
        # and the interrupted operation can simply be done again
        if point.startswith("remove") and "active" not in names:
            client.stub.Prepare(pb.PrepareSnapshotRequest(key="active", parent="base"))
        OPERATIONS[point](client.stub)
        assert_consistent(client)


def test_random_kills_under_load(tmp_path):
    """Many clients creating, committing and removing; SIGKILL at random moments."""
    root, sock = tmp_path / "root", tmp_path / "s.sock"
    rng = random.Random(1234)
    for round_no in range(6):
        with CrfsServer(root, sock) as server:
            client = connect(server)
            assert_consistent(client)
            stop = threading.Event()

            def worker(wid: int) -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    key = f"r{round_no}-w{wid}-{n}"
                    try:
                        client.stub.Prepare(pb.PrepareSnapshotRequest(key=key))
                        client.stub.Commit(pb.CommitSnapshotRequest(key=key, name=key + "-c"))
                        client.stub.Prepare(pb.PrepareSnapshotRequest(key=key + "-child", parent=key + "-c"))
                        if n % 2:
                            client.stub.Remove(pb.RemoveSnapshotRequest(key=key + "-child"))
                            client.stub.Remove(pb.RemoveSnapshotRequest(key=key + "-c"))
                    except grpc.RpcError:
                        return

            threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.2, 1.0))
            server.kill()
            stop.set()
            for t in threads:
                t.join(timeout=30)
            client.channel.close()
    with CrfsServer(root, sock) as server:
        assert_consistent(connect(server))
