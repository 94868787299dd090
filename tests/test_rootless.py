"""Rootless: crfs and containerd run by an unprivileged user inside
RootlessKit's namespaces, launched by ``scripts/rootless.sh``.

The tests create a throw-away user with subordinate uid/gid ranges
(tests/harness/rootless.py), start everything as that user, and reach it
only through ``nsenter`` into RootlessKit's namespaces, as a user would:
``ctr images pull`` + ``ctr run`` of the three-layer whiteout image through
crfs, ``crfs rpull`` + ``ctr run`` of its eStargz conversion (layers mounted
lazily inside the user namespace). Image files owned by root show as root in
the container (uid 0 of the user namespace is the user); files the container
writes land in crfs's upper dir owned by the user (container uid 0) or by
its subordinate ids (container uid N > 0 -> subuid start + N - 1). At the end
everything stops, nothing of the user stays running or mounted, and the user
is deleted. Also: the clear errors when subordinate ids, /dev/fuse, user
namespaces or XDG_RUNTIME_DIR are missing.

The registry runs on the host's 127.0.0.1; the main stack uses
``--net=host`` so that loopback is the same inside (crfs's lazy layer mounts
allow plain HTTP to loopback only). One test runs the default
``--net=slirp4netns``, where the host's loopback is 10.0.2.2.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from harness import OciImage, build_whiteout_image, images, push_image
from harness.registry import Registry
from harness.rootless import SCRIPT, RootlessStack, RootlessUser, leftover_mounts

pytestmark = pytest.mark.e2e

# ctr's defaults ask for a cgroup (/NAMESPACE/ID) and cpu shares; under
# cgroup v1 an unprivileged runc may not create cgroups, so rootless
# containers run without (what nerdctl does for rootless on cgroup v1).
NO_CGROUP = ("--cgroup", "", "--cpu-shares", "0")

PROBE = rf"""
if [ -e {images.DELETED_FILE} ]; then echo deleted=present; else echo deleted=absent; fi
echo "data=$(ls -A {images.OPAQUE_DIR} | tr '\n' ' ')"
echo "kept=$(cat {images.KEPT_FILE})"
echo "layer3=$(cat {images.LAYER3_FILE})"
echo "owner=$(stat -c %u:%g {images.KEPT_FILE})"
echo "binowner=$(stat -c %u:%g /bin/busybox)"
echo "id=$(id -u):$(id -g)"
"""
EXPECTED = {
    "deleted": "absent",
    "data": " ".join(images.OPAQUE_NEW),
    "kept": images.KEPT_TEXT,
    "layer3": images.LAYER3_TEXT,
    "owner": "0:0",
    "binowner": "0:0",
    "id": "0:0",
}
SUB_UID = 1234  # a container uid other than 0, for the subordinate-id check


def parse(output: str) -> dict[str, str]:
    return {k: v.strip() for k, v in (line.split("=", 1) for line in output.splitlines() if "=" in line)}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("rootless-registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def refs(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The whiteout image as pushed, and converted to eStargz by root on the host."""
    image: OciImage = build_whiteout_image(tmp_path_factory.mktemp("rootless-image"))
    plain = push_image(image, registry.host, "rootless/whiteout")
    esgz = f"{registry.host}/rootless/whiteout:esgz"
    subprocess.run(["crfs", "convert", plain, esgz], check=True, capture_output=True, timeout=600)
    return {"plain": plain, "esgz": esgz}


@pytest.fixture(scope="module")
def user() -> Iterator[RootlessUser]:
    with RootlessUser() as u:
        yield u


@pytest.fixture(scope="module")
def stack(user: RootlessUser) -> Iterator[RootlessStack]:
    with RootlessStack(user, net="host") as s:
        yield s


def run_probe(stack: RootlessStack, ref: str, name: str) -> dict[str, str]:
    out = stack.ctr("run", "--rm", *NO_CGROUP, "--snapshotter", "crfs", ref, name, "sh", "-c", PROBE)
    return parse(out.stdout)


def gc(stack: RootlessStack) -> None:
    """containerd's garbage collection, waited for: removing a lease with
    ``--sync`` runs one (and the snapshot removals it sends to crfs)."""
    lease = stack.ctr("leases", "create").stdout.split()[0]
    stack.ctr("leases", "rm", "--sync", lease)


def host_mounts_of(user: RootlessUser) -> list[str]:
    """Lines of the host's mount table naming the user's directories."""
    needles = [str(user.base), str(user.runtime_dir) + "/"]
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if any(n in line for n in needles)]


# --- the launch -------------------------------------------------------------------------


def test_user_has_what_rootless_needs(user: RootlessUser) -> None:
    assert user.subuid is not None and user.subuid.count >= 65536
    assert user.subgid is not None and user.subgid.count >= 65536
    # the test user runs crfs from its own venv, not root's
    assert user.run(["crfs", "--help"]).returncode == 0
    assert user.run(["id", "-u"]).stdout.strip() == str(user.uid)
    for net in ("host", "slirp4netns"):
        proc = user.run([str(SCRIPT), "check"], env={"CRFS_ROOTLESS_NET": net}, check=False)
        assert proc.returncode == 0, proc.stderr
        assert "nothing is missing" in proc.stdout


def test_status_and_what_other_users_can_reach(user: RootlessUser, stack: RootlessStack) -> None:
    status = stack.script("status")
    for name in ("rootlesskit", "crfs", "containerd"):
        assert re.search(rf"^{name}: running \(pid \d+\)$", status.stdout, re.M), status.stdout
    # crfs's and containerd's state belong to the user, and only the user
    for path in (stack.crfs_root, user.data_home / "containerd", stack.run_dir):
        st = path.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode) & 0o077) == (user.uid, 0), path
    sock = stack.crfs_socket.stat()
    assert stat.S_ISSOCK(sock.st_mode) and sock.st_uid == user.uid
    assert stat.S_IMODE(sock.st_mode) & 0o077 == 0
    # inside, the user is root of the user namespace, mapped to its own and subordinate ids
    uid_map = stack.nsenter("cat", "/proc/self/uid_map").stdout.split()
    assert uid_map[:3] == ["0", str(user.uid), "1"]
    assert uid_map[3:] == ["1", str(user.subuid.start), str(user.subuid.count)]
    assert stack.nsenter("id", "-u").stdout.strip() == "0"


def test_pull_and_run_whiteout_image(stack: RootlessStack, refs: dict[str, str]) -> None:
    stack.ctr("images", "pull", "--snapshotter", "crfs", refs["plain"], timeout=300)
    assert run_probe(stack, refs["plain"], "rl-whiteout") == EXPECTED
    # the image's layers are crfs snapshots, unpacked by the user
    listed = stack.ctr("snapshots", "--snapshotter", "crfs", "ls").stdout.splitlines()[1:]
    assert len(listed) >= 3


def test_container_writes_land_in_upper_dir_with_mapped_owners(
    user: RootlessUser, stack: RootlessStack, refs: dict[str, str]
) -> None:
    name = "rl-writer"
    script = f"echo root > /written-by-root; echo sub > /written-by-sub; chown {SUB_UID}:{SUB_UID} /written-by-sub"
    stack.ctr("run", *NO_CGROUP, "--snapshotter", "crfs", refs["plain"], name, "sh", "-c", script)
    try:
        found = {p.name: p for p in (stack.crfs_root / "snapshots").glob("*/fs/written-by-*")}
        assert set(found) == {"written-by-root", "written-by-sub"}
        assert found["written-by-root"].parent == found["written-by-sub"].parent  # one upper dir
        by_root = found["written-by-root"].stat()
        by_sub = found["written-by-sub"].stat()
        # container uid 0 is the user on the host; uid N>0 is subuid start + N - 1
        assert (by_root.st_uid, by_root.st_gid) == (user.uid, user.gid)
        assert (by_sub.st_uid, by_sub.st_gid) == (user.subuid.start + SUB_UID - 1, user.subgid.start + SUB_UID - 1)
        assert found["written-by-sub"].read_text() == "sub\n"
        # the upper dir is below crfs's root (0700): no other user reaches it
        upper_snapshot = found["written-by-root"].parent.parent
        assert stat.S_IMODE(upper_snapshot.stat().st_mode) & 0o077 == 0
    finally:
        stack.ctr("tasks", "rm", "-f", name, check=False)
        stack.ctr("containers", "rm", name)
    gc(stack)
    assert not list((stack.crfs_root / "snapshots").glob("*/fs/written-by-*"))


def test_lazy_rpull_and_run_estargz_image(user: RootlessUser, stack: RootlessStack, refs: dict[str, str]) -> None:
    out = stack.nsenter("crfs", "rpull", refs["esgz"], timeout=300)
    summary = out.stdout + out.stderr
    assert re.search(r"\(3/3 layers lazy\)", summary), summary
    assert run_probe(stack, refs["esgz"], "rl-lazy") == EXPECTED
    # the layers are FUSE mounts inside the user's mount namespace ...
    inside = stack.nsenter("cat", "/proc/self/mountinfo").stdout
    lazy_mounts = [line for line in inside.splitlines()
                   if str(stack.crfs_root) in line and " - fuse" in line]
    assert len(lazy_mounts) >= 3, inside
    # ... and none of them is on the host
    assert host_mounts_of(user) == []


def test_stop_ends_everything(user: RootlessUser, stack: RootlessStack) -> None:
    stack.ctr("run", "-d", *NO_CGROUP, "--snapshotter", "crfs",
              stack.ctr("images", "ls", "-q").stdout.split()[0], "rl-left-running", "sleep", "600")
    assert len(user.processes()) > 3
    stopped = stack.stop()
    stack.started = False
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped" in stopped.stdout
    status = stack.script("status", check=False)
    assert status.returncode == 3 and "running" not in status.stdout
    assert user.processes() == []
    assert leftover_mounts(user) == [] and host_mounts_of(user) == []
    assert not stack.crfs_socket.exists() and not stack.containerd_socket.exists()


def test_crfs_mount_under_unshare(refs: dict[str, str]) -> None:
    """The crfs-plugin use case without containerd: ``crfs mount docker://…``
    by the user in a namespace of its own (``unshare -Ur``; ``podman
    unshare`` is the same), every layer lazy, merged by fuse-overlayfs."""
    # Inside, the user is uid 0: crfs's root defaults (/run/crfs) would be
    # the host's, so the state and cache go to the user's dirs explicitly.
    script = (
        'set -e; m="$HOME/rootfs"; mkdir -p "$m"; '
        f'crfs mount --cache-dir "$HOME/.cache/crfs" docker://{refs["esgz"]} "$m"; '
        f'echo "kept=$(cat "$m{images.KEPT_FILE}")"; '
        f'echo "owner=$(stat -c %u:%g "$m{images.KEPT_FILE}")"; '
        f'echo "data=$(ls -A "$m{images.OPAQUE_DIR}" | tr "\\n" " ")"; '
        f'if [ -e "$m{images.DELETED_FILE}" ]; then echo deleted=present; else echo deleted=absent; fi; '
        'echo "fs=$(stat -f -c %T "$m")"; '
        'crfs umount "$m"; '
        'if [ -e "$m/etc" ]; then echo after=mounted; else echo after=empty; fi'
    )
    with RootlessUser() as user:
        env = {"CRFS_LAZYFS_STATE": f"{user.runtime_dir}/crfs-unshare/lazyfs"}
        out = user.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], env=env, timeout=300)
        got = parse(out.stdout)
        assert got.pop("fs", "").startswith("fuse"), out.stdout  # coreutils names FUSE's magic "fuseblk"
        assert got == {"kept": images.KEPT_TEXT, "owner": "0:0", "data": " ".join(images.OPAQUE_NEW),
                       "deleted": "absent", "after": "empty"}, out.stdout + out.stderr
        assert host_mounts_of(user) == []
        # after the umount, the layer mount processes and fuse-overlayfs end
        deadline = time.monotonic() + 15
        while user.processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert user.processes() == [], [Path(f"/proc/{p}/cmdline").read_bytes() for p in user.processes()]


# --- the default network: slirp4netns ---------------------------------------------------


def test_slirp4netns_pull_and_run(registry: Registry, refs: dict[str, str]) -> None:
    """With its own network namespace, the host's 127.0.0.1 is 10.0.2.2;
    the eStargz image is still pulled lazily once crfs's config allows plain
    HTTP to it."""
    with RootlessUser() as u:
        # crfs's layer mounts use plain HTTP only for loopback and the
        # insecure_hosts of its config: 10.0.2.2 is the host, not loopback
        config = u.home / ".config" / "containerd-crfs" / "config.toml"
        config.parent.mkdir(parents=True)
        config.write_text('[registry]\ninsecure_hosts = ["10.0.2.2"]\n')
        subprocess.run(["chown", "-R", f"{u.name}:{u.name}", str(u.home / ".config")], check=True)
        with RootlessStack(u, net="slirp4netns") as s:
            ref = refs["plain"].replace("127.0.0.1:", "10.0.2.2:", 1)
            s.ctr("images", "pull", "--plain-http", "--snapshotter", "crfs", ref, timeout=300)
            assert run_probe(s, ref, "rl-slirp") == EXPECTED
            esgz = refs["esgz"].replace("127.0.0.1:", "10.0.2.2:", 1)
            out = s.nsenter("crfs", "rpull", "--plain-http", esgz, timeout=300)
            assert len(re.findall(r"(?m)^layer \d+/\d+ \S+ lazy$", out.stderr)) == 3, out.stderr
            assert run_probe(s, esgz, "rl-slirp-esgz") == EXPECTED
            assert s.stop().returncode == 0
            s.started = False
        assert u.processes() == []


# --- clear errors -------------------------------------------------------------------------


def check_fails(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_refuses_to_run_as_root() -> None:
    proc = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=60)
    check_fails(proc, "not as root")


def test_user_without_subordinate_ids() -> None:
    with RootlessUser(subids=False, venv=False) as u:
        assert u.subuid is None and u.subgid is None
        check_fails(u.run([str(SCRIPT), "check"], check=False),
                    "no subordinate uid range in /etc/subuid", "usermod --add-subuids",
                    "no subordinate gid range in /etc/subgid", "usermod --add-subgids")
        start = u.run([str(SCRIPT), "start"], check=False)
        check_fails(start, "no subordinate uid range")
        assert u.processes() == []


def test_missing_runtime_dir() -> None:
    with RootlessUser(runtime_dir=False, venv=False) as u:
        check_fails(u.run([str(SCRIPT), "check"], check=False), "XDG_RUNTIME_DIR is not set")


def _check_with_bind(user: RootlessUser, source: Path, target: str) -> subprocess.CompletedProcess:
    """``rootless.sh check`` as ``user`` in a private mount namespace where
    ``source`` is bind-mounted over ``target`` (the host is not touched)."""
    shell = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, "sh",
            str(source), target, *user.argv([str(SCRIPT), "check"], {"CRFS_ROOTLESS_NET": "host"})]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_fuse_device_not_accessible(user: RootlessUser, tmp_path: Path) -> None:
    # /dev/fuse as many machines ship it before setup: 0600 root
    fuse = tmp_path / "fuse"
    os.mknod(fuse, 0o600 | stat.S_IFCHR, os.makedev(10, 229))
    check_fails(_check_with_bind(user, fuse, "/dev/fuse"),
                "/dev/fuse is not readable and writable", "chmod 0666 /dev/fuse")


def test_user_namespaces_disabled(user: RootlessUser, tmp_path: Path) -> None:
    zero = tmp_path / "zero"
    zero.write_text("0\n")
    zero.chmod(0o644)
    check_fails(_check_with_bind(user, zero, "/proc/sys/user/max_user_namespaces"),
                "user namespaces are disabled (user.max_user_namespaces = 0)", "sysctl -w user.max_user_namespaces=")
