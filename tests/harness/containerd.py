"""A private containerd 1.6 for one test or benchmark: its own root, state
and socket, CRI off, optionally wired to crfs through ``proxy_plugins``.

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
from pathlib import Path
from typing import Mapping, Optional

from .mounts import remove_tree, unmount_all
from .proc import Daemon, HarnessError, Managed, require_binary, run, unix_socket_accepts

NAMESPACE_PREFIX = "crfs-test-"
PROXY_NAME = "crfs"
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


def render_config(dirs: Mapping[str, Path], crfs_address: Optional[Path]) -> str:
    """containerd's version-2 config.toml for the given directories."""
    disabled = ", ".join(_toml_str(p) for p in DISABLED_PLUGINS)
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
    return "\n".join(lines) + "\n"


class Containerd(Managed):
    """``with Containerd(crfs_address=sock) as ctrd: ctrd.ctr("images", "ls")``."""

    def __init__(
        self,
        crfs_address: Optional[Path] = None,
        namespace: Optional[str] = None,
        workdir: Optional[Path] = None,
        start_timeout: float = 30.0,
    ):
        self.crfs_address = crfs_address
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
        config.write_text(render_config(dirs, self.crfs_address))
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
            return run(argv, timeout=timeout, check=check, env=env)
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
