"""``crfs optimize SRC DST -- CMD…``: an eStargz image whose prioritized
files are the ones CMD reads at start-up, so that a lazy pull fetches them
in one request when each layer is mounted.

Profiling: SRC is converted to eStargz as DST (nothing prioritized), DST is
mounted lazily the way ``crfs mount docker://`` does with every layer
process recording which files are read, in order (lazyfs sees each read
itself, page faults of mapped libraries included), and CMD runs in a
container on it: its own mount and PID namespaces, /proc, /dev and a
/tmp, entered the way runc starts a container process (chroot, the image's
/etc/passwd and /etc/group read, the command exec'd directly). What was
read becomes the profile: the paths in order, each with the byte ranges
read (the FUSE reads, shaped by the kernel's readahead), in the format
``prefetch_hints`` describes. SRC is then
converted again as DST with those files prioritized, chunked finer
(``PRIORITIZED_CHUNK_SIZE``), and each layer's descriptor annotated with
the blob ranges of just the chunks read, for a mount to prefetch. A saved
profile (``--profile``; a path-only one too) skips the run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from . import image_mount, mount
from .convert import ConvertOptions, Converter, open_store
from .layer_source import RemoteOptions
from .prefetch_hints import PRIORITIZED_CHUNK_SIZE, Profile, ProfileError, Range, format_profile, merge_ranges, read_profile_lines
from .registry.client import RegistryClient

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class OptimizeError(Exception):
    """The profiling run or a conversion failed; the message says which."""


@dataclass(frozen=True)
class RunResult:
    exit_code: int | None  # None: killed at the timeout
    seconds: float
    output: str


def read_profile(path: str | os.PathLike[str]) -> Profile:
    """A profile file: the paths, and the ranges read of those it has them for."""
    with open(path, encoding="utf-8", newline="\n") as f:
        try:
            return read_profile_lines(f)
        except ProfileError as exc:
            raise OptimizeError(f"profile {path}: {exc}") from None


def write_profile(path: str | os.PathLike[str], paths: Sequence[str], command: Sequence[str],
                  ranges: dict[str, list[Range]] | None = None) -> None:
    tmp = Path(f"{path}.tmp")
    header = f"crfs optimize profile: files read by {shlex.join(command)}, in order\n" \
             "(#ranges OFFSET:LENGTH,...: the bytes read of the file above)"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(format_profile(paths, ranges or {}, header))
    tmp.replace(path)


def convert(src: str, dst: str, client: RegistryClient, prioritized: Sequence[str] = (),
            ranges: dict[str, list[Range]] | None = None, prioritized_chunk_size: int | None = None) -> str:
    """SRC as eStargz at DST; the manifest digest."""
    options = ConvertOptions(prioritized=tuple(prioritized), prioritized_ranges=ranges or {},
                             prioritized_chunk_size=prioritized_chunk_size)
    return Converter(open_store(src, client, create=False), open_store(dst, client, create=True), options).run()


def record(reference: str, command: Sequence[str], workdir: Path, *, timeout: float, env: dict[str, str],
           cwd: str = "/", remote: RemoteOptions = RemoteOptions()) -> tuple[Profile, RunResult]:
    """Mount ``reference`` lazily with access recording, run ``command`` in
    it; the files read (each once, in first-read order, bottom layer's
    first where a path is in several) with the ranges read, and how the run went."""
    root = workdir / "rootfs"
    root.mkdir(parents=True)
    recording = dataclasses.replace(remote, record_access=True, background_fetch=False)
    record_ = image_mount.mount_image(f"{image_mount.DOCKER_SCHEME}{reference}", root, remote=recording)
    try:
        result = run_in_container(root, command, timeout=timeout, env=env, cwd=cwd)
        accessed: dict[str, list[Range]] = {}
        for layer_dir in record_.layers:
            status = mount.status(layer_dir)
            layer_ranges = status.get("accessed_ranges", {})
            for p in status.get("accessed", []):
                # (a path in several layers is read from the top one only)
                accessed.setdefault(p, []).extend((off, length) for off, length in layer_ranges.get(p, []))
    finally:
        image_mount.unmount_image(root)
    # a file of which no byte was read (an empty one) counts as read whole
    return Profile(list(accessed), {p: merge_ranges(r) for p, r in accessed.items() if r}), result


# What runc does between entering the root and exec: it reads the image's
# /etc/passwd and /etc/group (to resolve the process user) and execs the
# command itself, with the image's PATH; the profile should see the same
# reads, and not those of a shell or ``env`` from the image.
_LAUNCH = """
import os, sys
root, cwd, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
os.chroot(root)
os.chdir(cwd)
for name in ("/etc/passwd", "/etc/group"):
    try:
        with open(name, "rb") as f:
            f.read()
    except OSError:
        pass
dirs = [""] if "/" in argv[0] else os.environ.get("PATH", "/usr/bin:/bin").split(":")
error = "not found"
for d in dirs:  # the PATH search by hand: os.execvp would import modules, not there after chroot
    try:
        os.execv(os.path.join(d, argv[0]), argv)
    except OSError as e:
        error = e.strerror
sys.exit(f"{argv[0]}: {error}")
"""


def run_in_container(root: Path, command: Sequence[str], *, timeout: float, env: dict[str, str], cwd: str = "/") -> RunResult:
    """``command`` in ``root`` as runc would start it (see ``_LAUNCH``), in
    new mount and PID namespaces; killed (the whole namespace) after
    ``timeout`` seconds."""
    setup = (
        'set -e; r="$1"; shift; '
        'mount -t proc proc "$r/proc"; mount --rbind /dev "$r/dev"; mount -t tmpfs tmpfs "$r/tmp"; '
        'exec "$@"'
    )
    argv = ["unshare", "--mount", "--pid", "--fork", "--propagation", "private",
            "sh", "-c", setup, "sh", str(root), "env", "-i", *[f"{k}={v}" for k, v in env.items()],
            sys.executable, "-I", "-S", "-c", _LAUNCH, str(root), cwd, *command]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # unshare's child is PID 1 of the namespace: all go
        out, _ = proc.communicate()
        code = None
    return RunResult(code, time.monotonic() - started, out.decode(errors="replace"))


def image_env(reference: str, client: RegistryClient) -> tuple[dict[str, str], str]:
    """The image config's Env (PATH defaulted) and WorkingDir."""
    resolved = client.resolve(reference)
    repo = client.repository(resolved.reference)
    config = json.loads(repo.get_blob(resolved.manifest.config.digest)).get("config") or {}
    env = dict(e.split("=", 1) for e in config.get("Env") or [] if "=" in e)
    env.setdefault("PATH", DEFAULT_PATH)
    return env, config.get("WorkingDir") or "/"


def optimize(src: str, dst: str, command: Sequence[str], client: RegistryClient, *, profile: str | None = None,
             save_profile: str | None = None, timeout: float = 60.0,
             prioritized_chunk_size: int | None = PRIORITIZED_CHUNK_SIZE,
             report: Callable[[str], None] = lambda text: None) -> tuple[str, list[str]]:
    """DST optimized for ``command`` (or for the saved ``profile``); the
    manifest digest and the prioritized paths."""
    if profile is not None:
        recorded = read_profile(profile)
    else:
        if not command:
            raise OptimizeError("give a command to profile (after --) or a saved --profile")
        report(f"converting {src} to {dst} for the profiling run")
        convert(src, dst, client)
        env, cwd = image_env(dst, client)
        with tempfile.TemporaryDirectory(prefix="crfs-optimize-") as work:
            report(f"running {shlex.join(command)} on a lazy mount of {dst}")
            recorded, result = record(dst, command, Path(work), timeout=timeout, env=env, cwd=cwd)
        if result.exit_code is None:
            report(f"the command was stopped after {timeout:g}s (what it read so far is the profile)")
        elif result.exit_code != 0:
            raise OptimizeError(f"{shlex.join(command)} failed (exit {result.exit_code}):\n{result.output[-2000:]}")
        report(f"it read {len(recorded.paths)} files in {result.seconds:.2f}s")
        if save_profile:
            write_profile(save_profile, recorded.paths, command, recorded.ranges)
    paths = recorded.paths
    if not paths:
        raise OptimizeError("the profile is empty: nothing to prioritize")
    report(f"converting {src} to {dst} with {len(paths)} prioritized files")
    # chunked finer only where that can spare a mount bytes
    chunk_size = prioritized_chunk_size if recorded.ranges else None
    return convert(src, dst, client, paths, recorded.ranges, chunk_size), paths
