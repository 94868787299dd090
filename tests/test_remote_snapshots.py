"""Remote snapshots through the real ``crfs serve``: a Prepare whose labels
name an eStargz layer in a real docker-registry (as containerd's unpacker
sends them for CRI or ``crfs rpull``) mounts the layer lazily, commits the
target and answers ALREADY_EXISTS; everything else falls back to an
ordinary Prepare in bounded time. Layer mounts are shared per digest,
survive a crfs crash and are adopted, are remounted when their process
dies, and are gone with the last snapshot on them.

containerd itself is left out here (tests/test_rpull.py and the python
image tests go through it); the calls are the ones its metadata layer makes.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from crfs_proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from harness.crfs import CrfsServer
from harness.mounts import mounts_under
from harness.registry import Registry
from harness.snapshots_client import CrfsClient, connect
from lazyfs import mount
from lazyfs.registry import RegistryClient
from lazyfs_fetch.conftest import Layer, build_layer, client_config
from registry.faultproxy import FaultProxy

REPO = "remote/app"
REF_LABEL = "containerd.io/snapshot.ref"
FILES = {
    "etc/hello.txt": b"hello from a lazy layer\n",
    "usr/share/data.bin": os.urandom(2_000_000),  # the layer is larger than the tail read at mount
    **{f"lib/m{i:02}.py": f"value = {i}\n".encode() * 200 for i in range(40)},
}
MOUNT_TIMEOUT = 4.0
CONFIG = f"""
remote_mount_timeout = {MOUNT_TIMEOUT}
mount_check_interval = 0.2
fetch_deadline = 5.0
background_fetch = false
"""


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> Layer:
    return build_layer(tmp_path_factory.mktemp("remote-snapshot-layer"), FILES)


@pytest.fixture(scope="module")
def gzip_layer() -> tuple[bytes, str]:
    """A plain tar.gz layer: not lazy-capable."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        info = tarfile.TarInfo("plain.txt")
        info.size = 6
        tf.addfile(info, io.BytesIO(b"plain\n"))
    blob = gzip.compress(raw.getvalue())
    return blob, "sha256:" + hashlib.sha256(blob).hexdigest()


@dataclass
class Env:
    crfs: CrfsServer
    client: CrfsClient
    proxy: FaultProxy
    layer: Layer
    gzip_digest: str

    @property
    def stub(self):  # noqa: ANN201 - the generated stub
        return self.client.stub

    @property
    def layers_dir(self) -> Path:
        return self.crfs.root / "layers"

    def mountpoint(self) -> Path:
        return self.layers_dir / self.layer.digest.replace(":", "-")

    def labels(self, target: str, digest: str | None = None, toc: str | None = None, host: str | None = None) -> dict[str, str]:
        digest = digest or self.layer.digest
        labels = {
            REF_LABEL: target,
            "containerd.io/snapshot/cri.image-ref": f"{host or self.proxy.host}/{REPO}:v1",
            "containerd.io/snapshot/cri.layer-digest": digest,
        }
        if digest == self.layer.digest:
            labels["containerd.io/snapshot/stargz/toc.digest"] = toc or self.layer.build.toc_digest
        return labels

    def prepare_remote(self, key: str, target: str, parent: str = "", **kw: str) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as err:
            self.stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent, labels=self.labels(target, **kw)))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS, err.value.details()
        return err.value

    def walk(self, target: str, parent: str = "") -> list[pb.Info]:
        """What containerd's metadata layer asks after ALREADY_EXISTS (it
        keeps the committed ones)."""
        flt = f'labels."{REF_LABEL}"=={target},parent=="{parent}"'
        return [i for r in self.stub.List(pb.ListSnapshotsRequest(filters=[flt])) for i in r.info if i.kind == pb.COMMITTED]

    def restart(self) -> None:
        self.client.channel.close()
        self.crfs.start()
        self.client = connect(self.crfs)


@contextlib.contextmanager
def _env(tmp_path: Path, layer: Layer, gzip_layer: tuple[bytes, str], env: dict[str, str] | None = None) -> Iterator[Env]:
    config = tmp_path / "crfs.toml"
    config.write_text(CONFIG)
    with Registry(tmp_path / "registry") as registry, FaultProxy(registry.host) as proxy:
        with RegistryClient(client_config()) as rc:
            repo = rc.repository(f"{registry.host}/{REPO}")
            repo.push_blob(layer.data, layer.digest)
            repo.push_blob(gzip_layer[0], gzip_layer[1])
        with CrfsServer(tmp_path / "root", tmp_path / "crfs.sock", extra_args=["--config", str(config)], env=env) as crfs:
            e = Env(crfs, connect(crfs), proxy, layer, gzip_layer[1])
            try:
                yield e
            finally:
                e.client.channel.close()


@pytest.fixture
def env(tmp_path: Path, layer: Layer, gzip_layer: tuple[bytes, str]) -> Iterator[Env]:
    with _env(tmp_path, layer, gzip_layer) as e:
        yield e


def _fuse_overlay(mounts, target: Path) -> contextlib.AbstractContextManager[Path]:  # noqa: ANN001
    @contextlib.contextmanager
    def mounted() -> Iterator[Path]:
        [m] = mounts
        assert m.type == "fuse3.fuse-overlayfs"
        target.mkdir()
        subprocess.run(["fuse-overlayfs", "-o", ",".join(m.options), str(target)], check=True)
        try:
            yield target
        finally:
            subprocess.run(["fusermount3", "-u", str(target)], check=False)
    return mounted()


def _wait(predicate, timeout: float = 10.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _pid(mountpoint: Path) -> int:
    return int(mount.status(mountpoint)["pid"])


def _blob_bytes(proxy: FaultProxy, layer: Layer) -> int:
    return proxy.blob_bytes({layer.digest: layer.build.size}, layer.digest)


def test_prepare_with_layer_labels_mounts_it_lazily_and_commits_the_target(env: Env, tmp_path: Path) -> None:
    env.prepare_remote("default/1/extract-1 chain1", "chain1")
    [info] = env.walk("chain1")
    assert info.kind == pb.COMMITTED and info.parent == ""
    assert info.labels["containerd.io/snapshot/remote"] == "remote snapshot"
    assert info.labels["containerd.io/snapshot/cri.layer-digest"] == env.layer.digest
    # the extraction key was never created; the layer is mounted once
    names = [i.name for r in env.stub.List(pb.ListSnapshotsRequest()) for i in r.info]
    assert names == [info.name]
    assert mount.is_mounted(env.mountpoint())
    fetched_at_mount = _blob_bytes(env.proxy, env.layer)
    assert fetched_at_mount < env.layer.build.size / 2  # footer + TOC, not the layer

    # a container on it: fuse-overlayfs over the layer mount
    resp = env.stub.Prepare(pb.PrepareSnapshotRequest(key="default/2/ctr", parent=info.name))
    [m] = resp.mounts
    assert f"lowerdir={env.mountpoint()}" in m.options
    with _fuse_overlay(resp.mounts, tmp_path / "rootfs") as rootfs:
        assert (rootfs / "etc/hello.txt").read_bytes() == FILES["etc/hello.txt"]
        assert (rootfs / "lib/m07.py").read_bytes() == FILES["lib/m07.py"]
        (rootfs / "etc/new").write_text("upper")
    fetched = _blob_bytes(env.proxy, env.layer) - fetched_at_mount
    assert 0 < fetched < env.layer.build.size / 2, (fetched, env.layer.build.size)

    # asking again answers ALREADY_EXISTS from the store, without a second mount
    pid = _pid(env.mountpoint())
    env.prepare_remote("default/3/extract-3 chain1", "chain1")
    assert _pid(env.mountpoint()) == pid
    # the last Remove unmounts the layer and ends its process
    env.stub.Remove(pb.RemoveSnapshotRequest(key="default/2/ctr"))
    assert mount.is_mounted(env.mountpoint())
    env.stub.Remove(pb.RemoveSnapshotRequest(key=info.name))
    assert not env.mountpoint().exists()
    assert _wait(lambda: not mount.is_alive(pid))
    assert mounts_under(env.crfs.root) == []


def test_view_of_a_remote_snapshot_is_a_bind_of_the_layer_mount(env: Env) -> None:
    env.prepare_remote("k", "chain1")
    resp = env.stub.View(pb.ViewSnapshotRequest(key="view", parent="chain1"))
    assert [(m.type, m.source) for m in resp.mounts] == [("bind", str(env.mountpoint()))]
    stat = env.stub.Stat(pb.StatSnapshotRequest(key="chain1"))
    assert stat.info.kind == pb.COMMITTED
    usage = env.stub.Usage(pb.UsageRequest(key="chain1"))
    assert usage.size == 0


@pytest.mark.parametrize("case", ["plain-gzip", "toc-mismatch", "no-toc-digest", "unreachable", "stalled"])
def test_anything_but_a_reachable_estargz_layer_is_an_ordinary_prepare(env: Env, case: str) -> None:
    labels = {
        # a TOC digest label too, so that it is the blob that says "not eStargz"
        "plain-gzip": lambda: {**env.labels("t", digest=env.gzip_digest),
                               "containerd.io/snapshot/stargz/toc.digest": env.layer.build.toc_digest},
        "toc-mismatch": lambda: env.labels("t", toc="sha256:" + "0" * 64),
        "no-toc-digest": lambda: {k: v for k, v in env.labels("t").items() if "toc.digest" not in k},
        "unreachable": lambda: env.labels("t", host=f"127.0.0.1:{_closed_port()}"),
        "stalled": lambda: env.labels("t"),
    }[case]()
    if case == "stalled":
        env.proxy.add("stall", r"^GET /v2/.*/blobs/", times=100, delay=3 * MOUNT_TIMEOUT)
    started = time.monotonic()
    resp = env.stub.Prepare(pb.PrepareSnapshotRequest(key="extract", labels=labels))
    elapsed = time.monotonic() - started
    assert [m.type for m in resp.mounts] == ["bind"]  # an ordinary, empty active snapshot
    assert elapsed < MOUNT_TIMEOUT + 10, elapsed  # decided in bounded time
    stat = env.stub.Stat(pb.StatSnapshotRequest(key="extract"))
    assert stat.info.kind == pb.ACTIVE and stat.info.labels[REF_LABEL] == "t"
    assert env.walk("t") == []
    assert os.listdir(env.layers_dir) == [] and mounts_under(env.crfs.root) == []
    # and containerd's fallback completes normally
    env.stub.Commit(pb.CommitSnapshotRequest(key="extract", name="t", labels=labels))
    assert len(env.walk("t")) == 1


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_layer_is_mounted_once_and_shared_by_every_snapshot_on_it(env: Env) -> None:
    env.stub.Prepare(pb.PrepareSnapshotRequest(key="base-key"))
    env.stub.Commit(pb.CommitSnapshotRequest(key="base-key", name="base"))
    env.prepare_remote("k1", "chain-a")
    pid = _pid(env.mountpoint())
    env.prepare_remote("k2", "chain-b", parent="base")  # the same layer in another image
    [b] = env.walk("chain-b", parent="base")
    assert _pid(env.mountpoint()) == pid
    assert len([line for line in mounts_under(env.crfs.root) if "layers" in line]) == 1
    # `crfs status` reports it: one layer, its process, its counters
    status = subprocess.run(["crfs", "status", "--root", str(env.crfs.root)], capture_output=True, text=True, timeout=30)
    assert status.returncode == 0, status.stderr
    [line] = [json.loads(x) for x in status.stdout.splitlines()]
    assert (line["layer"], line["pid"], line["toc_digest"]) == (env.layer.digest, pid, env.layer.build.toc_digest)
    assert line["store"]["fetch"]["bytes_fetched"] >= 0
    env.stub.Remove(pb.RemoveSnapshotRequest(key="chain-a"))
    assert mount.is_mounted(env.mountpoint()) and _pid(env.mountpoint()) == pid
    env.stub.Remove(pb.RemoveSnapshotRequest(key=b.name))
    assert not env.mountpoint().exists() and _wait(lambda: not mount.is_alive(pid))


def test_crfs_killed_leaves_layers_serving_and_a_new_crfs_adopts_them(env: Env, tmp_path: Path) -> None:
    env.prepare_remote("k", "chain1")
    pid = _pid(env.mountpoint())
    resp = env.stub.Prepare(pb.PrepareSnapshotRequest(key="ctr", parent="chain1"))
    with _fuse_overlay(resp.mounts, tmp_path / "rootfs") as rootfs:
        env.crfs.kill()
        # the running "container" keeps reading its files
        assert (rootfs / "usr/share/data.bin").read_bytes() == FILES["usr/share/data.bin"]
        assert mount.is_alive(pid)
        env.restart()
        assert _pid(env.mountpoint()) == pid  # adopted, not remounted
        assert (rootfs / "lib/m01.py").read_bytes() == FILES["lib/m01.py"]
    # the new crfs serves new containers from the same layer, and nothing was lost
    resp = env.stub.Prepare(pb.PrepareSnapshotRequest(key="ctr2", parent="chain1"))
    with _fuse_overlay(resp.mounts, tmp_path / "rootfs2") as rootfs:
        assert (rootfs / "etc/hello.txt").read_bytes() == FILES["etc/hello.txt"]
    names = sorted(i.name for r in env.stub.List(pb.ListSnapshotsRequest()) for i in r.info)
    assert names == ["chain1", "ctr", "ctr2"]


def test_a_dead_layer_process_is_mounted_again_and_never_serves_wrong_bytes(env: Env, tmp_path: Path) -> None:
    env.prepare_remote("k", "chain1")
    pid = _pid(env.mountpoint())
    resp = env.stub.Prepare(pb.PrepareSnapshotRequest(key="ctr", parent="chain1"))
    with _fuse_overlay(resp.mounts, tmp_path / "rootfs") as rootfs:
        assert (rootfs / "lib/m02.py").read_bytes() == FILES["lib/m02.py"]
        os.kill(pid, signal.SIGKILL)
        # reads through the running overlay: right bytes or a clean error
        for name in ("lib/m02.py", "lib/m03.py", "usr/share/data.bin"):
            try:
                data = (rootfs / name).read_bytes()
            except OSError:
                continue
            assert data == FILES[name]
        assert _wait(lambda: mount.is_mounted(env.mountpoint()) and _pid_or_0(env.mountpoint()) not in (0, pid), 15)
    # a new container sees the whole layer again
    resp = env.stub.Prepare(pb.PrepareSnapshotRequest(key="ctr2", parent="chain1"))
    with _fuse_overlay(resp.mounts, tmp_path / "rootfs2") as rootfs:
        assert (rootfs / "lib/m03.py").read_bytes() == FILES["lib/m03.py"]


def _pid_or_0(mountpoint: Path) -> int:
    try:
        return _pid(mountpoint)
    except (mount.MountError, ValueError):
        return 0


def test_a_crash_before_the_commit_leaves_no_mount_behind(tmp_path: Path, layer: Layer, gzip_layer: tuple[bytes, str]) -> None:
    with _env(tmp_path, layer, gzip_layer, env={"CRFS_TEST_CRASH_POINT": "remote:before-commit"}) as env:
        with pytest.raises(grpc.RpcError):
            env.stub.Prepare(pb.PrepareSnapshotRequest(key="k", labels=env.labels("chain1")))
        assert _wait(lambda: not env.crfs.alive())
        pid = _pid(env.mountpoint())  # the orphan: mounted, never recorded
        env.crfs.env = None
        env.restart()
        assert not env.mountpoint().exists() and mounts_under(env.crfs.root) == []
        assert _wait(lambda: not mount.is_alive(pid))
        names = [i.name for r in env.stub.List(pb.ListSnapshotsRequest()) for i in r.info]
        assert names == []
        env.prepare_remote("k", "chain1")  # the interrupted call can be redone
        assert [i.name for i in env.walk("chain1")] == ["chain1"]


def test_a_private_registry_is_read_with_the_docker_config_credentials(tmp_path: Path, layer: Layer) -> None:
    """Layer processes take credentials from the Docker config file that
    ``crfs serve`` sees (``$DOCKER_CONFIG``); without them the Prepare falls
    back, and containerd (which has its own) downloads the layer."""
    from registry.conftest import PASSWORD, USER, auths_entry, write_docker_config, write_htpasswd

    htpasswd = write_htpasswd(tmp_path / "htpasswd", {USER: PASSWORD})
    config = tmp_path / "crfs.toml"
    config.write_text(CONFIG)
    with Registry(tmp_path / "reg", auth={"htpasswd": {"realm": "crfs-test", "path": htpasswd}}) as registry:
        with RegistryClient(client_config(docker_config=write_docker_config(tmp_path / "push-auth", {"auths": {registry.host: auths_entry()}}))) as rc:
            rc.repository(f"{registry.host}/{REPO}").push_blob(layer.data, layer.digest)
        labels = {
            REF_LABEL: "chain1",
            "containerd.io/snapshot/cri.image-ref": f"{registry.host}/{REPO}:v1",
            "containerd.io/snapshot/cri.layer-digest": layer.digest,
            "containerd.io/snapshot/stargz/toc.digest": layer.build.toc_digest,
        }
        anonymous = tmp_path / "anon"
        anonymous.mkdir()
        with CrfsServer(tmp_path / "root-a", tmp_path / "a.sock", ["--config", str(config)], env={"DOCKER_CONFIG": str(anonymous)}) as crfs:
            client = connect(crfs)
            resp = client.stub.Prepare(pb.PrepareSnapshotRequest(key="k", labels=labels))
            assert [m.type for m in resp.mounts] == ["bind"]  # refused: an ordinary Prepare
            client.channel.close()
        docker = tmp_path / "docker"
        write_docker_config(docker, {"auths": {registry.host: auths_entry()}})
        with CrfsServer(tmp_path / "root-b", tmp_path / "b.sock", ["--config", str(config)], env={"DOCKER_CONFIG": str(docker)}) as crfs:
            client = connect(crfs)
            try:
                with pytest.raises(grpc.RpcError) as err:
                    client.stub.Prepare(pb.PrepareSnapshotRequest(key="k", labels=labels))
                assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
                mountpoint = crfs.root / "layers" / layer.digest.replace(":", "-")
                assert sorted(os.listdir(mountpoint / "lib"))[:2] == ["m00.py", "m01.py"]
                assert (mountpoint / "etc/hello.txt").read_bytes() == FILES["etc/hello.txt"]
            finally:
                client.channel.close()


def test_mirrors_fetch_cap_and_memory_cap_come_from_the_crfs_config(tmp_path: Path, layer: Layer, gzip_layer: tuple[bytes, str]) -> None:
    dead = f"127.0.0.1:{_closed_port()}"
    with Registry(tmp_path / "registry") as registry, FaultProxy(registry.host) as mirror:
        with RegistryClient(client_config()) as rc:
            rc.repository(f"{registry.host}/{REPO}").push_blob(layer.data, layer.digest)
        config = tmp_path / "crfs.toml"
        config.write_text(CONFIG + f"""
max_concurrent_fetches = 3
mount_memory_limit_mib = 300
[registry.mirrors]
"{dead}" = ["http://{mirror.host}"]
""")
        with CrfsServer(tmp_path / "root", tmp_path / "crfs.sock", ["--config", str(config)]) as crfs:
            env = Env(crfs, connect(crfs), mirror, layer, gzip_layer[1])
            try:
                env.prepare_remote("k", "chain1", host=dead)  # the image names a registry that is down
                assert mirror.requests(rf"^GET /v2/{REPO}/blobs/{layer.digest}")
                pid = _pid(env.mountpoint())
                limits = Path(f"/proc/{pid}/limits").read_text()
                [data] = [line for line in limits.splitlines() if line.startswith("Max data size")]
                assert data.split()[3:5] == [str(300 << 20), str(300 << 20)], data
                assert sorted(os.listdir(crfs.root / "fetch-slots")) == ["background", "slot-0", "slot-1", "slot-2"]
                assert (env.mountpoint() / "etc/hello.txt").read_bytes() == FILES["etc/hello.txt"]
            finally:
                env.client.channel.close()


def test_a_bad_registry_section_is_a_clear_config_error(tmp_path: Path) -> None:
    config = tmp_path / "crfs.toml"
    config.write_text('[registry]\nmirrors = { "docker.io" = "not-a-list" }\n')
    proc = subprocess.run(["crfs", "serve", "--config", str(config), "--root", str(tmp_path / "r"),
                           "--address", str(tmp_path / "s.sock")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "mirrors must map a registry name" in proc.stderr, proc.stderr


def test_a_stale_layer_mount_found_at_start_is_cleared_and_mounted_again(env: Env, tmp_path: Path) -> None:
    """crfs and the layer process both killed: the mount is left without a
    server (ECONNABORTED, then ENOTCONN); the next crfs clears it and serves the layer again."""
    env.prepare_remote("k", "chain1")
    pid = _pid(env.mountpoint())
    env.crfs.kill()
    os.kill(pid, signal.SIGKILL)
    assert _wait(lambda: not mount.is_alive(pid))
    with pytest.raises(OSError) as err:
        os.listdir(env.mountpoint())
    assert err.value.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)  # no server
    env.restart()
    assert _pid(env.mountpoint()) != pid
    resp = env.stub.Prepare(pb.PrepareSnapshotRequest(key="ctr", parent="chain1"))
    with _fuse_overlay(resp.mounts, tmp_path / "rootfs") as rootfs:
        assert (rootfs / "etc/hello.txt").read_bytes() == FILES["etc/hello.txt"]
    assert len([line for line in mounts_under(env.crfs.root) if "layers" in line]) == 1


def test_the_images_next_layers_are_mounted_ahead_and_claimed_by_their_own_prepare(tmp_path: Path, layer: Layer, gzip_layer: tuple[bytes, str]) -> None:
    """cri.image-layers names the layers after this one: crfs mounts them in
    parallel at once; their own Prepare (TOC digest checked) takes the early
    mount over, and one never claimed is let go after premount_hold."""
    (tmp_path / "second").mkdir()
    (tmp_path / "third").mkdir()
    second = build_layer(tmp_path / "second", {"srv/app.txt": b"second layer\n"})
    third = build_layer(tmp_path / "third", {"srv/other.txt": b"third layer\n"})
    config = tmp_path / "crfs.toml"
    config.write_text(CONFIG + "premount_hold = 3.0\n")
    with Registry(tmp_path / "registry") as registry, FaultProxy(registry.host) as proxy:
        with RegistryClient(client_config()) as rc:
            for blob in (layer, second, third):
                rc.repository(f"{registry.host}/{REPO}").push_blob(blob.data, blob.digest)
        with CrfsServer(tmp_path / "root", tmp_path / "crfs.sock", ["--config", str(config)]) as crfs:
            env = Env(crfs, connect(crfs), proxy, layer, gzip_layer[1])
            layers = crfs.root / "layers"
            try:
                labels = {**env.labels("c1"), "containerd.io/snapshot/cri.image-layers": f"{layer.digest},{second.digest},{third.digest}"}
                with pytest.raises(grpc.RpcError):
                    env.stub.Prepare(pb.PrepareSnapshotRequest(key="k1", labels=labels))
                early = [layers / b.digest.replace(":", "-") for b in (second, third)]
                assert _wait(lambda: all(mount.is_mounted(p) for p in early), 15)
                pid = _pid(early[0])
                # the second layer's own Prepare uses the early mount
                labels2 = {**env.labels("c2"), "containerd.io/snapshot/cri.layer-digest": second.digest,
                           "containerd.io/snapshot/stargz/toc.digest": second.build.toc_digest}
                with pytest.raises(grpc.RpcError) as err:
                    env.stub.Prepare(pb.PrepareSnapshotRequest(key="k2", parent="c1", labels=labels2))
                assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
                assert _pid(early[0]) == pid
                # the third with a TOC digest the early mount does not have: not served from it
                labels3 = {**env.labels("c3"), "containerd.io/snapshot/cri.layer-digest": third.digest,
                           "containerd.io/snapshot/stargz/toc.digest": second.build.toc_digest}
                resp = env.stub.Prepare(pb.PrepareSnapshotRequest(key="k3", parent="c2", labels=labels3))
                assert [m.type for m in resp.mounts] == ["fuse3.fuse-overlayfs"]  # an ordinary snapshot
                # after premount_hold: the claimed layer stays, the unclaimed one goes
                assert _wait(lambda: not early[1].exists(), 15)
                assert mount.is_mounted(early[0]) and _pid(early[0]) == pid
            finally:
                env.client.channel.close()


def test_an_images_layers_are_introduced_to_each_other_even_when_its_config_cannot_be_read(
    tmp_path: Path, layer: Layer, gzip_layer: tuple[bytes, str],
) -> None:
    """A Prepare naming a manifest the registry does not have: the config
    (the image's start command) cannot be read, which only costs the guess;
    the layer is mounted lazily as ever, and the image's layers still learn
    about each other (lazyfs peers)."""
    (tmp_path / "second").mkdir()
    second = build_layer(tmp_path / "second", {"srv/app.txt": b"second layer\n"})
    (tmp_path / "crfs.toml").write_text(CONFIG)
    with Registry(tmp_path / "registry") as registry, FaultProxy(registry.host) as proxy:
        with RegistryClient(client_config()) as rc:
            for blob in (layer, second):
                rc.repository(f"{registry.host}/{REPO}").push_blob(blob.data, blob.digest)
        with CrfsServer(tmp_path / "root", tmp_path / "crfs.sock", ["--config", str(tmp_path / "crfs.toml")]) as crfs:
            env = Env(crfs, connect(crfs), proxy, layer, gzip_layer[1])
            try:
                labels = {**env.labels("c1"), "containerd.io/snapshot/cri.image-layers": f"{layer.digest},{second.digest}",
                          "containerd.io/snapshot/cri.manifest-digest": "sha256:" + "0" * 64}
                with pytest.raises(grpc.RpcError) as err:
                    env.stub.Prepare(pb.PrepareSnapshotRequest(key="k1", labels=labels))
                assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
                mounts = [crfs.root / "layers" / b.digest.replace(":", "-") for b in (layer, second)]
                assert _wait(lambda: all(mount.is_mounted(p) and mount.status(p)["peers"] == 1 for p in mounts), 15)
                assert all(mount.status(p)["dependencies"]["wants_received"] == 0 for p in mounts)
                # a layer process that dies is mounted again, and told its peers again
                old = _pid(mounts[0])
                os.kill(old, signal.SIGKILL)
                assert _wait(lambda: _pid_or_0(mounts[0]) not in (0, old), 15)
                assert _wait(lambda: mount.status(mounts[0])["peers"] == 1, 10), mount.status(mounts[0])
            finally:
                env.client.channel.close()
