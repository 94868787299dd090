"""A private containerd 1.6 for one test or benchmark: its own root, state
and socket, CRI off, optionally wired to crfs through ``proxy_plugins``.

``cri=True`` turns containerd's CRI plugin on (served on the same socket,
namespace ``k8s.io``): its images unpack into crfs (or overlayfs without
crfs) with the snapshot annotations on, its CNI and registry host
directories live in the test dir, and ``cri_registries`` (or
``cri_allow_http`` later) lets it pull over plain HTTP from test registries.
Without ``cri`` the config is exactly what it always was. CRI's namespace is
fixed, so two CRI-mode containerds would share runc's ``k8s.io`` state dir:
fine for image pulls (what the tests do), not for running pods concurrently.

On exit it kills and deletes every task and container in every namespace,
stops containerd, ends the shims it started (they outlive containerd by
design), unmounts whatever is left below its directories and deletes them.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .mounts import remove_tree, unmount_all
from .proc import Daemon, HarnessError, Managed, checked, require_binary, run, unix_socket_accepts

NAMESPACE_PREFIX = "crfs-test-"
PROXY_NAME = "crfs"
CRI_PLUGIN = "io.containerd.grpc.v1.cri"
CRI_NAMESPACE = "k8s.io"  # where the CRI plugin keeps its images and containers
RUNC_ROOT = Path("/run/containerd/runc")  # the runc shim's default --root, one dir per namespace

# Snapshotters that cannot work here or would only add noise to the log.
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
)


def _toml_str(value: object) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class CriConfig:
    """What the CRI plugin section needs: its snapshotter and its dirs."""

    snapshotter: str
    registry_hosts: Path  # config_path: one HOST[:PORT]/hosts.toml per registry
    cni_conf: Path
    cni_bin: Path


def render_cri(cri: CriConfig) -> list[str]:
    """The ``[plugins."io.containerd.grpc.v1.cri"]`` tables (containerd 1.6).

    ``disable_snapshot_annotations = false`` makes CRI pulls pass the
    ``containerd.io/snapshot/cri.*`` labels to the snapshotter, which a
    remote snapshotter needs to find the layer in the registry.
    CRI's own root and state are ``ROOT/io.containerd.grpc.v1.cri`` and
    ``STATE/io.containerd.grpc.v1.cri``, inside the test dir already.
    """
    section = f'[plugins."{CRI_PLUGIN}"'
    return [
        "",
        f"{section}]",
        '  stream_server_address = "127.0.0.1"',
        '  stream_server_port = "0"',
        "  netns_mounts_under_state_dir = true",
        f"{section}.containerd]",
        f"  snapshotter = {_toml_str(cri.snapshotter)}",
        "  disable_snapshot_annotations = false",
        f"{section}.cni]",
        f"  bin_dir = {_toml_str(cri.cni_bin)}",
        f"  conf_dir = {_toml_str(cri.cni_conf)}",
        f"{section}.registry]",
        f"  config_path = {_toml_str(cri.registry_hosts)}",
    ]


def render_hosts_toml(host: str) -> str:
    """``hosts.toml`` for a plain-HTTP registry at ``host`` (``127.0.0.1:PORT``).

    containerd 1.6.20 rejects a hosts.toml without a ``[host."…"]`` table
    ("failed to decode hosts.toml: invalid `host` tree", then ignores the
    file), hence the table even though ``server`` alone would say it all.
    Without any hosts.toml, 1.6 already uses plain HTTP for loopback hosts;
    the file makes that explicit and works for other hosts too.
    """
    return f"server = {_toml_str('http://' + host)}\n\n[host.{_toml_str('http://' + host)}]\n" \
           '  capabilities = ["pull", "resolve"]\n'


def render_config(dirs: Mapping[str, Path], crfs_address: Optional[Path], cri: Optional[CriConfig] = None) -> str:
    """containerd's version-2 config.toml for the given directories."""
    plugins_off = DISABLED_PLUGINS if cri is None else tuple(p for p in DISABLED_PLUGINS if p != CRI_PLUGIN)
    disabled = ", ".join(_toml_str(p) for p in plugins_off)
    lines = [
        "version = 2",
        f"root = {_toml_str(dirs['root'])}",
        f"state = {_toml_str(dirs['state'])}",
        f"disabled_plugins = [{disabled}]",
        "",
        "[grpc]",
        f"  address = {_toml_str(dirs['socket'])}",
        "[ttrpc]",
        f"  address = {_toml_str(str(dirs['socket']) + '.ttrpc')}",
        "[debug]",
        '  address = ""',
        '  level = "warn"',
        "[metrics]",
        '  address = ""',
        "",
        '[plugins."io.containerd.internal.v1.opt"]',
        f"  path = {_toml_str(dirs['root'] / 'opt')}",
    ]
    if crfs_address is not None:
        lines += [
            "",
            f"[proxy_plugins.{PROXY_NAME}]",
            '  type = "snapshot"',
            f"  address = {_toml_str(crfs_address)}",
        ]
    if cri is not None:
        lines += render_cri(cri)
    return "\n".join(lines) + "\n"


class Containerd(Managed):
    """``with Containerd(crfs_address=sock) as ctrd: ctrd.ctr("images", "ls")``."""

    def __init__(
        self,
        crfs_address: Optional[Path] = None,
        namespace: Optional[str] = None,
        workdir: Optional[Path] = None,
        start_timeout: float = 30.0,
        cri: bool = False,
        cri_registries: Sequence[str] = (),
        cri_snapshotter: Optional[str] = None,
    ):
        self.crfs_address = crfs_address
        self.cri = cri
        self.cri_registries = tuple(cri_registries)
        # CRI unpacks into crfs when there is one, else into the builtin overlayfs.
        self.cri_snapshotter = cri_snapshotter or (PROXY_NAME if crfs_address else "overlayfs")
        # Unique by default: runc keeps container state in one global dir per
        # namespace, which concurrent containerds must not share.
        self.namespace = namespace or NAMESPACE_PREFIX + secrets.token_hex(4)
        self.start_timeout = start_timeout
        self._given_workdir = workdir
        self.workdir: Optional[Path] = None
        self.daemon: Optional[Daemon] = None
        self._ctr = ""

    # Paths are short on purpose: unix socket paths are limited to 107 bytes.
    @property
    def root(self) -> Path:
        return self._dir / "root"

    @property
    def state(self) -> Path:
        return self._dir / "state"

    @property
    def address(self) -> Path:
        return self._dir / "c.sock"

    @property
    def cri_registry_hosts(self) -> Path:
        """The CRI plugin's registry ``config_path``."""
        return self._dir / "certs.d"

    def cri_allow_http(self, host: str) -> None:
        """Let the CRI plugin pull from ``host`` (``127.0.0.1:PORT``) over
        plain HTTP; read at each pull, so it works on a running containerd."""
        hosts_dir = self.cri_registry_hosts / host
        hosts_dir.mkdir(parents=True, exist_ok=True)
        (hosts_dir / "hosts.toml").write_text(render_hosts_toml(host))

    def _cri_config(self) -> Optional[CriConfig]:
        if not self.cri:
            return None
        cni = self._dir / "cni"
        for path in (cni / "net.d", cni / "bin", self.cri_registry_hosts):
            path.mkdir(parents=True, exist_ok=True)
        for host in self.cri_registries:
            self.cri_allow_http(host)
        return CriConfig(self.cri_snapshotter, self.cri_registry_hosts, cni / "net.d", cni / "bin")

    @property
    def _dir(self) -> Path:
        if self.workdir is None:
            raise HarnessError("containerd not started")
        return self.workdir

    def _start(self) -> None:
        binary = require_binary("containerd")
        self._ctr = require_binary("ctr")
        require_binary("runc")
        self.workdir = self._given_workdir or Path(tempfile.mkdtemp(prefix="crfs-ctrd-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        dirs = {"root": self.root, "state": self.state, "socket": self.address}
        config = self.workdir / "config.toml"
        config.write_text(render_config(dirs, self.crfs_address, self._cri_config()))
        self.daemon = Daemon("containerd", [binary, "--config", str(config)], self.workdir / "containerd.log")
        self.daemon.start()
        self.daemon.wait_until(self._serving, "serving on its socket", self.start_timeout)

    def _serving(self) -> bool:
        if not unix_socket_accepts(self.address):
            return False
        return self.ctr("version", check=False, timeout=10).returncode == 0

    def ctr(
        self,
        *args: str,
        snapshotter: Optional[str] = None,
        check: bool = True,
        timeout: float = 120.0,
        namespace: Optional[str] = None,
    ) -> subprocess.CompletedProcess:
        """Run ``ctr --address SOCK --namespace NS ARGS``; a CompletedProcess.

        ``snapshotter`` is passed as ``CONTAINERD_SNAPSHOTTER``, which every
        ctr command with a ``--snapshotter`` flag reads, so callers need not
        know where in the command line the flag goes. Failures raise
        HarnessError with ctr's output and containerd's log tail.
        """
        argv = [self._ctr, "--address", str(self.address), "--namespace", namespace or self.namespace, *args]
        env = {"CONTAINERD_SNAPSHOTTER": snapshotter} if snapshotter else {}
        try:
            proc = run(argv, timeout=timeout, check=False, env=env)
            if proc.returncode != 0 and _mount_helper_raced(args, proc.stderr):
                proc = run(argv, timeout=timeout, check=False, env=env)
            return checked(argv, proc) if check else proc
        except HarnessError as e:
            if self.daemon is None:
                raise
            raise self.daemon.fail(str(e)) from None

    def gc(self, timeout: float = 60.0) -> None:
        """Run containerd's garbage collection and wait for it to finish.

        containerd 1.6 has no "gc now" command; deleting a lease with
        ``--sync`` schedules a collection and waits for it, including the
        snapshot removals it sends to the snapshotters.
        """
        lease = self.ctr("leases", "create", timeout=timeout).stdout.split()[0]
        self.ctr("leases", "rm", "--sync", lease, timeout=timeout)

    def namespaces(self) -> list[str]:
        return self.ctr("namespaces", "ls", "-q").stdout.split()

    def snapshot_keys(self, snapshotter: str) -> list[str]:
        """Keys containerd lists for ``snapshotter`` (a Walk through it)."""
        out = self.ctr("snapshots", "--snapshotter", snapshotter, "ls").stdout.splitlines()
        return [line.split()[0] for line in out[1:] if line.strip()]

    def remove_all_containers(self) -> None:
        """Kill and delete every task and container in every namespace."""
        for ns in self.namespaces():
            for task in self.ctr("tasks", "ls", "-q", namespace=ns).stdout.split():
                self.ctr("tasks", "kill", "-s", "SIGKILL", task, namespace=ns, check=False)
                self._delete_task(task, ns)
            for container in self.ctr("containers", "ls", "-q", namespace=ns).stdout.split():
                self.ctr("containers", "rm", container, namespace=ns, check=False)

    def _delete_task(self, task: str, ns: str, timeout: float = 10.0) -> None:
        # A task can only be deleted once it has stopped after the kill.
        deadline = time.monotonic() + timeout
        while self.ctr("tasks", "rm", "-f", task, namespace=ns, check=False).returncode != 0:
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)

    def _stop(self) -> None:
        if self.daemon is None or self.workdir is None:
            return
        try:
            if self.daemon.alive():
                self.remove_all_containers()
        except HarnessError:
            pass  # containerd is unhealthy; the steps below still clean up
        finally:
            self.daemon.stop()
            _delete_runc_containers(self.state)
            _kill_shims(self.address)
            _remove_empty_dir(RUNC_ROOT / self.namespace)
            for path in (self.state, self.root):
                unmount_all(path)
            if self._given_workdir is None:
                remove_tree(self.workdir)


def _delete_runc_containers(state: Path) -> list[str]:
    """Force-delete runc containers whose bundle lies in our state dir.

    Only needed when containerd could not delete its tasks (it died or
    hung): killing a shim leaves the container's processes running.
    """
    deleted = []
    runc = require_binary("runc")
    for runc_root in RUNC_ROOT.glob("*"):
        try:
            listing = run([runc, "--root", str(runc_root), "list", "--format", "json"], timeout=30)
            containers = json.loads(listing.stdout or "null") or []
        except (HarnessError, ValueError):
            continue
        for container in containers:
            if container.get("bundle", "").startswith(f"{state}/"):
                run([runc, "--root", str(runc_root), "delete", "--force", container["id"]], check=False, timeout=30)
                deleted.append(container["id"])
    return deleted


def _remove_empty_dir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _kill_shims(address: Path) -> list[int]:
    """SIGKILL the shims this containerd started; they are found by the
    ``-address SOCK`` argument that names our private socket."""
    wanted = str(address).encode()
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"containerd-shim" in argv[0] and wanted in argv:
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
            except ProcessLookupError:
                pass
    return killed


def _mount_helper_raced(args: Sequence[str], stderr: str) -> bool:
    """``ctr run --rm`` failed because containerd's shim reaped the rootfs
    mount helper (mount.fuse3) before containerd could wait for it: "mount
    helper ... failed with ECHILD (retried 10 times)", containerd 1.6's
    known race with FUSE mount helpers (containerd/containerd#4387). The
    container was removed (--rm) and nothing was mounted: the same command
    may run once more. Any other failure is reported as it is."""
    return bool(args) and args[0] == "run" and "--rm" in args and "mount helper" in stderr and "ECHILD" in stderr
