"""``crfs serve`` as an operator runs it: signals, sockets, config, one server per root."""

from __future__ import annotations

import grp
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from crfs_proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from harness.snapshots_client import connect
from harness.crfs import CrfsServer


def _run_serve(*args, timeout=30):
    return subprocess.run(["crfs", "serve", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_exits_cleanly_on_signal(tmp_path, sig):
    server = CrfsServer(tmp_path / "root", tmp_path / "s.sock")
    with server:
        client = connect(server)
        client.stub.Prepare(pb.PrepareSnapshotRequest(key="a"))
        client.channel.close()
        server.daemon.signal(sig)
        server.daemon.wait_until(lambda: not server.alive(), "exiting", 20)
        assert server.stop() == 0, server.stderr_tail()
    assert not (tmp_path / "s.sock").exists()
    assert "shutting down" in server.stderr_tail()
    # the snapshot survived the restart
    with CrfsServer(tmp_path / "root", tmp_path / "s.sock") as again:
        client = connect(again)
        assert client.stub.Stat(pb.StatSnapshotRequest(key="a")).info.kind == pb.ACTIVE
        client.channel.close()


def test_one_server_per_root(tmp_path):
    with CrfsServer(tmp_path / "root", tmp_path / "a.sock"):
        second = _run_serve("--root", str(tmp_path / "root"), "--address", str(tmp_path / "b.sock"))
    assert second.returncode == 1
    assert "another crfs serve is using root" in second.stderr


def test_refuses_a_socket_in_use_and_clears_a_stale_one(tmp_path):
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(tmp_path / "busy.sock"))
    live.listen()
    try:
        res = _run_serve("--root", str(tmp_path / "r1"), "--address", str(tmp_path / "busy.sock"))
        assert res.returncode == 1 and "in use" in res.stderr
    finally:
        live.close()
    # now nobody listens on it: a leftover of a crash, replaced
    with CrfsServer(tmp_path / "r2", tmp_path / "busy.sock") as server:
        connect(server).stub.Prepare(pb.PrepareSnapshotRequest(key="a"))


def test_socket_group_from_config(tmp_path):
    group = grp.getgrnam("daemon")
    cfg = tmp_path / "crfs.toml"
    cfg.write_text(f'root = "{tmp_path}/root"\naddress = "{tmp_path}/g.sock"\nsocket_group = "daemon"\nlog_level = "debug"\n')
    with CrfsServer(tmp_path / "root", tmp_path / "g.sock", extra_args=["--config", str(cfg)]):
        st = os.stat(tmp_path / "g.sock")
        assert st.st_mode & 0o777 == 0o660 and st.st_gid == group.gr_gid


@pytest.mark.parametrize(
    "content, message",
    [
        ("root = [", "not valid TOML"),
        ('bogus = 1', "unknown option 'bogus'"),
        ('root = "relative/dir"', "absolute path"),
        ('log_level = "loud"', "log_level must be one of"),
        ('grpc_workers = 0', "positive integer"),
        ('remote_snapshots = "yes"', "remote_snapshots must be true or false"),
        ('remote_mount_timeout = 0', "positive number of seconds"),
        ('fetch_deadline = "1s"', "positive number of seconds"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, content, message):
    cfg = tmp_path / "crfs.toml"
    cfg.write_text(content + "\n")
    res = _run_serve("--config", str(cfg), "--root", str(tmp_path / "r"), "--address", str(tmp_path / "s.sock"))
    assert res.returncode == 2
    assert message in res.stderr and str(cfg) in res.stderr


def test_missing_config_file_is_an_error(tmp_path):
    res = _run_serve("--config", str(tmp_path / "nope.toml"))
    assert res.returncode == 2 and "cannot read config" in res.stderr


def test_default_paths_follow_conventions(monkeypatch):
    from snapshotter.config import Config

    root = Config.defaults()
    assert (str(root.root), str(root.address)) == ("/var/lib/containerd-crfs", "/run/containerd-crfs/containerd-crfs-grpc.sock")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    monkeypatch.setenv("XDG_DATA_HOME", "/home/u/.local/share")
    user = Config.defaults()
    assert (str(user.root), str(user.address)) == ("/home/u/.local/share/containerd-crfs", "/run/user/1000/containerd-crfs/containerd-crfs-grpc.sock")


def test_root_of_a_user_namespace_gets_the_unprivileged_defaults(tmp_path):
    """Under RootlessKit or `unshare -Ur` the user is uid 0 but owns none of
    root's directories: crfs and its layer mounts use the XDG paths."""
    probe = (
        "import os, json; from snapshotter.config import Config; from lazyfs import mount; c = Config.defaults(); "
        "print(json.dumps([os.geteuid(), str(c.root), str(c.address), str(mount.state_dir())]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "CRFS_LAZYFS_STATE"}
    env.update(XDG_RUNTIME_DIR=str(tmp_path / "run"), XDG_DATA_HOME=str(tmp_path / "data"))
    out = subprocess.run(["unshare", "-Ur", sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    uid, root, address, state = json.loads(out.stdout)
    assert uid == 0
    assert root == f"{tmp_path}/data/containerd-crfs"
    assert address == f"{tmp_path}/run/containerd-crfs/containerd-crfs-grpc.sock"
    assert state == f"{tmp_path}/run/crfs/lazyfs"


def test_a_version_1_store_is_migrated_in_place(tmp_path):
    """A metadata.db written before remote snapshots existed opens, keeps its
    snapshots, and can hold remote ones afterwards."""
    import sqlite3

    from snapshotter.store import Kind, MetaStore, RemoteLayer

    db = tmp_path / "metadata.db"
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE snapshots (id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE,
            parent_id INTEGER REFERENCES snapshots(id), kind INTEGER NOT NULL, labels TEXT NOT NULL DEFAULT '{}',
            created INTEGER NOT NULL, updated INTEGER NOT NULL, size INTEGER NOT NULL DEFAULT 0, inodes INTEGER NOT NULL DEFAULT 0);
        INSERT INTO snapshots (key, kind, labels, created, updated) VALUES ('base', 3, '{"a": "b"}', 1, 1);
        PRAGMA user_version=1;
    """)
    conn.close()
    store = MetaStore(db)
    try:
        with store.transaction(write=True) as tx:
            assert tx.info("base")[1].labels == {"a": "b"}
            tx.create_remote("remote", "base", {"containerd.io/snapshot.ref": "t"}, RemoteLayer("sha256:" + "1" * 64, "registry://h/r@x"))
        with store.transaction() as tx:
            assert tx.info("remote")[1].kind == Kind.COMMITTED
            assert tx.remote_target("t", "base") == "remote"
            assert [(layer.digest, n) for layer, n in tx.remote_layers()] == [("sha256:" + "1" * 64, 1)]
    finally:
        store.close()
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == 2
