"""An unprivileged user for rootless tests, and crfs + containerd started as
that user inside RootlessKit by ``scripts/rootless.sh``.

``RootlessUser`` (run as root) creates a throw-away user with subordinate
uid/gid ranges (or none, to test the error), a ``/run/user/UID`` runtime
dir, and a Python environment the user can run crfs from; on exit it kills
every process of the user and of its subordinate ids (all of them were
started by the test), deletes the user, its home, ranges and dirs.

The project's own venv may use an interpreter the user cannot execute
(here: pyenv's Python under /root, mode 0700). So the user gets a venv made
from a system interpreter of the same major.minor version (the same ABI,
so the compiled packages load), ``--without-pip``, whose ``.pth`` adds the
project venv's site-packages (with its editable install of crfs); when the
user cannot read those either, they are copied into the user's venv.

``RootlessStack`` runs ``rootless.sh start`` as the user, ``nsenter`` /
``ctr`` run commands inside the namespaces, and exit runs ``rootless.sh
stop`` and checks that nothing of the user is left running or mounted.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .mounts import mounts_under, remove_tree, unmount_all
from .proc import HarnessError, Managed, require_binary, run

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "rootless.sh"
USER_PREFIX = "crfs-rl-"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class SubIds:
    start: int
    count: int

    def __contains__(self, uid: int) -> bool:
        return self.start <= uid < self.start + self.count


def subid_range(path: Path, name: str, uid: int) -> Optional[SubIds]:
    """The user's first range in /etc/subuid or /etc/subgid, if any."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] in (name, str(uid)) and int(fields[2]) > 0:
            return SubIds(int(fields[1]), int(fields[2]))
    return None


def _user_can_run(user: str, argv: Sequence[str]) -> bool:
    proc = subprocess.run(["runuser", "-u", user, "--", *argv], capture_output=True, timeout=60)
    return proc.returncode == 0


def _interpreters() -> list[str]:
    """Interpreters of this Python's major.minor: this one, then the system's."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = [os.path.realpath(sys.executable)]
    for candidate in (f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
        if os.path.exists(candidate):
            found.append(candidate)
    return list(dict.fromkeys(found))


def _site_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def make_user_venv(user: str, venv: Path) -> Path:
    """A venv under ``venv`` from which ``user`` can run crfs; its bin dir.

    Made by root and left root-owned (readable, not writable by the user).
    """
    old_umask = os.umask(0o022)  # whatever root's umask, the user must read it
    try:
        return _make_user_venv(user, venv)
    finally:
        os.umask(old_umask)


def _make_user_venv(user: str, venv: Path) -> Path:
    probe = "import snapshotter.cli, lazyfs, grpc, pyfuse3, trio"
    for interpreter in _interpreters():
        if not _user_can_run(user, [interpreter, "-c", "pass"]):
            continue
        run([interpreter, "-m", "venv", "--without-pip", str(venv)])
        site = Path(run([str(venv / "bin" / "python"), "-c",
                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
        pth = site / "crfs-project.pth"
        pth.write_text("".join(f"import site; site.addsitedir({d!r})\n" for d in _site_dirs()))
        if not _user_can_run(user, [str(venv / "bin" / "python"), "-c", probe]):
            # The project's files are not readable by the user: copy them.
            _copy_project(site)
            pth.unlink()
        crfs = venv / "bin" / "crfs"
        crfs.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom snapshotter.cli import main\nsys.exit(main())\n")
        crfs.chmod(0o755)
        check = subprocess.run(["runuser", "-u", user, "--", str(crfs), "--help"], capture_output=True, text=True)
        if check.returncode != 0:
            raise HarnessError(f"{user} cannot run crfs from {venv}: {check.stderr[-2000:]}")
        return venv / "bin"
    raise HarnessError(f"{user} can execute no Python {sys.version_info.major}.{sys.version_info.minor} "
                       f"(tried {', '.join(_interpreters())}); install python3 from the distribution")


def _copy_project(site: Path) -> None:
    import lazyfs
    import snapshotter
    for d in _site_dirs():
        shutil.copytree(d, site, dirs_exist_ok=True, symlinks=True,
                        ignore=shutil.ignore_patterns("__editable__*", "__pycache__"))
    for module in (snapshotter, lazyfs):
        src = Path(module.__file__).parent
        shutil.copytree(src, site / src.name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    proto = REPO / "proto" / "crfs_proto"
    if proto.is_dir():
        shutil.copytree(proto, site / "crfs_proto", dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))


class RootlessUser(Managed):
    """``with RootlessUser() as user: user.run(["id"])``, as root."""

    def __init__(self, subids: bool = True, runtime_dir: bool = True, venv: bool = True):
        self.want_subids = subids
        self.want_runtime_dir = runtime_dir
        self.want_venv = venv
        self.name = USER_PREFIX + secrets.token_hex(3)
        self.uid = -1
        self.gid = -1
        self.base: Optional[Path] = None
        self.bin: Optional[Path] = None
        self.subuid: Optional[SubIds] = None
        self.subgid: Optional[SubIds] = None
        self._created = False

    @property
    def home(self) -> Path:
        assert self.base is not None
        return self.base / "home"

    @property
    def runtime_dir(self) -> Path:
        return Path(f"/run/user/{self.uid}")

    @property
    def data_home(self) -> Path:
        return self.home / ".local" / "share"

    def _start(self) -> None:
        if os.geteuid() != 0:
            raise HarnessError("RootlessUser needs root (it creates a user)")
        for tool in ("useradd", "userdel", "usermod", "runuser"):
            require_binary(tool)
        # 0755: the user must reach its home and the venv below
        self.base = Path(tempfile.mkdtemp(prefix="crfs-rootless-"))
        self.base.chmod(0o755)
        args = ["useradd", "--create-home", "--home-dir", str(self.home), "--shell", "/bin/sh", "--user-group"]
        if not self.want_subids:
            args += ["-K", "SUB_UID_COUNT=0", "-K", "SUB_GID_COUNT=0"]
        run([*args, self.name])
        self._created = True
        self.uid = int(run(["id", "-u", self.name]).stdout)
        self.gid = int(run(["id", "-g", self.name]).stdout)
        if self.want_subids:
            self._ensure_subids()
        else:
            run(["usermod", "--del-subuids", "0-4294967294", "--del-subgids", "0-4294967294", self.name], check=False)
        self.subuid = subid_range(Path("/etc/subuid"), self.name, self.uid)
        self.subgid = subid_range(Path("/etc/subgid"), self.name, self.uid)
        if self.want_runtime_dir:
            self.runtime_dir.mkdir(parents=True, exist_ok=True)
            os.chown(self.runtime_dir, self.uid, self.gid)
            self.runtime_dir.chmod(0o700)
        if self.want_venv:
            self.bin = make_user_venv(self.name, self.base / "venv")

    def _ensure_subids(self) -> None:
        """useradd fills /etc/subuid and /etc/subgid (login.defs); if it did
        not, take a free range of 65536 above every range in use."""
        for path, flag in ((Path("/etc/subuid"), "--add-subuids"), (Path("/etc/subgid"), "--add-subgids")):
            if subid_range(path, self.name, self.uid) is not None:
                continue
            top = 100000
            if path.exists():
                for line in path.read_text().splitlines():
                    f = line.split(":")
                    if len(f) == 3 and f[1].isdigit() and f[2].isdigit():
                        top = max(top, int(f[1]) + int(f[2]))
            run(["usermod", flag, f"{top}-{top + 65535}", self.name])

    def env(self, extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
        """The environment of a login of this user (nothing of root's)."""
        path = f"{self.bin}:{SYSTEM_PATH}" if self.bin else SYSTEM_PATH
        env = {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name, "PATH": path,
               "SHELL": "/bin/sh", "LANG": "C.UTF-8"}
        if self.want_runtime_dir:
            env["XDG_RUNTIME_DIR"] = str(self.runtime_dir)
        env.update(extra or {})
        return env

    def argv(self, argv: Sequence[str], env: Optional[Mapping[str, str]] = None) -> list[str]:
        """``argv`` as run by this user, with only the user's environment."""
        pairs = [f"{k}={v}" for k, v in self.env(env).items()]
        return ["runuser", "-u", self.name, "--", "env", "-i", *pairs, *argv]

    def run(self, argv: Sequence[str], *, env: Optional[Mapping[str, str]] = None, check: bool = True,
            timeout: float = 120.0, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
        return run(self.argv(argv, env), check=check, timeout=timeout, cwd=cwd or self.home)

    def processes(self) -> list[int]:
        """Pids of processes running as the user or one of its subordinate uids."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                uid = os.stat(f"/proc/{entry}").st_uid
            except OSError:
                continue
            if uid == self.uid or (self.subuid is not None and uid in self.subuid):
                found.append(int(entry))
        return found

    def kill_all(self, timeout: float = 10.0) -> list[int]:
        """SIGKILL every process of the user (each was started by the test)."""
        killed: list[int] = []
        deadline = time.monotonic() + timeout
        while pids := self.processes():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise HarnessError(f"processes of {self.name} survive SIGKILL: {pids}")
            time.sleep(0.1)
        return killed

    def _stop(self) -> None:
        if self.uid >= 0:
            self.kill_all()
        if self.base is not None:
            unmount_all(self.base)
        if self.uid >= 0:
            unmount_all(self.runtime_dir)
            remove_tree(self.runtime_dir)
        if self._created:
            run(["userdel", "--remove", self.name], check=False)
            # userdel removes the subordinate ranges too; make sure
            for path in (Path("/etc/subuid"), Path("/etc/subgid")):
                if subid_range(path, self.name, self.uid) is not None:
                    flag = "--del-subuids" if path.name == "subuid" else "--del-subgids"
                    run(["usermod", flag, "0-4294967294", self.name], check=False)
        if self.base is not None:
            remove_tree(self.base)
        if self._created:
            self._created = False
            if run(["getent", "passwd", self.name], check=False).returncode == 0:
                raise HarnessError(f"user {self.name} could not be deleted")


class RootlessStack(Managed):
    """``with RootlessStack(user) as stack: stack.ctr("images", "ls")``:
    crfs + containerd inside RootlessKit, started by ``rootless.sh start``."""

    def __init__(self, user: RootlessUser, net: str = "host", start_timeout: float = 120.0):
        self.user = user
        self.net = net
        self.start_timeout = start_timeout
        self.started = False

    @property
    def env(self) -> dict[str, str]:
        return {"CRFS_ROOTLESS_NET": self.net}

    @property
    def crfs_root(self) -> Path:
        return self.user.data_home / "containerd-crfs"

    @property
    def run_dir(self) -> Path:
        return self.user.runtime_dir / "containerd-crfs-rootless"

    @property
    def crfs_socket(self) -> Path:
        return self.user.runtime_dir / "containerd-crfs" / "containerd-crfs-grpc.sock"

    @property
    def containerd_socket(self) -> Path:
        return self.user.runtime_dir / "containerd" / "containerd.sock"

    def script(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return self.user.run([str(SCRIPT), *args], env=self.env, check=check, timeout=timeout)

    def _start(self) -> None:
        self.started = True
        try:
            self.script("start", timeout=self.start_timeout)
        except HarnessError as e:
            raise HarnessError(f"{e}\n{self.logs()}") from None

    def logs(self, limit: int = 3000) -> str:
        out = []
        for name in ("rootlesskit", "crfs", "containerd"):
            path = self.run_dir / f"{name}.log"
            try:
                out.append(f"--- {path} (tail) ---\n{path.read_text(errors='replace')[-limit:]}")
            except OSError:
                pass
        return "\n".join(out)

    def nsenter(self, *argv: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """``argv`` inside the namespaces, as the user (uid 0 there)."""
        try:
            return self.script("nsenter", *argv, check=check, timeout=timeout)
        except HarnessError as e:
            raise HarnessError(f"{e}\n{self.logs()}") from None

    def ctr(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return self.nsenter("ctr", *args, check=check, timeout=timeout)

    def stop(self) -> subprocess.CompletedProcess:
        return self.script("stop", check=False, timeout=120)

    def _stop(self) -> None:
        if self.started:
            self.stop()
            self.started = False


def leftover_mounts(user: RootlessUser) -> list[str]:
    """Mounts of the host below the user's directories (there must be none)."""
    found = []
    if user.base is not None:
        found += mounts_under(user.base)
    found += mounts_under(user.runtime_dir)
    return found
