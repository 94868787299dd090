"""One layer mount process, and starting / stopping / querying it.

``python -m lazyfs.mount --source BLOB --mountpoint DIR`` opens the layer
(footer + TOC only), mounts it with FUSE, tells its parent it is ready
(``--ready-fd``: one line ``ready`` written to that fd once the mount is in
place), serves until SIGTERM/SIGINT (then unmounts) or until someone
unmounts it (then exits), and answers requests on its control socket
(``lazyfs.control``: its status, and which layers it is merged with). The snapshotter's supervisor and
``crfs mount`` both start it this way, so a layer mount outlives whoever
started it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, BinaryIO, Sequence

from . import control
from .forkserver import ForkServer, ForkServerError, serve_forever
from .layer_source import OpenedLayer, RemoteOptions, open_layer, preload_source
from .privilege import is_host_root

log = logging.getLogger(__name__)

READY = b"ready\n"
START_TIMEOUT = 30.0


class MountError(Exception):
    """A layer could not be mounted, unmounted or queried."""


# --- starting, stopping and querying mounts ----------------------------------------


def state_dir() -> Path:
    """Where control sockets and logs of layer mounts live."""
    if explicit := os.environ.get("CRFS_LAZYFS_STATE"):
        return Path(explicit)
    if is_host_root():
        return Path("/run/crfs/lazyfs")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/crfs-{os.geteuid()}"
    return Path(runtime, "crfs", "lazyfs")


def control_path(mountpoint: str | os.PathLike[str]) -> Path:
    """The control socket of the mount at ``mountpoint`` (by its real path)."""
    key = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:20]
    return state_dir() / f"{key}.sock"


def start(
    source: str, mountpoint: str | os.PathLike[str], *, toc_digest: str | None = None,
    remote: RemoteOptions = RemoteOptions(), timeout: float = START_TIMEOUT, fork_server: ForkServer | None = None,
) -> int:
    """Start a detached mount process and wait until it has mounted; its pid.
    With ``fork_server`` (and it answering) the process is forked from it,
    its imports done already; otherwise a new interpreter is started."""
    mountpoint = os.path.realpath(mountpoint)
    if not os.path.isdir(mountpoint):
        raise MountError(f"{mountpoint} is not a directory")
    control = control_path(mountpoint)
    control.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = control.with_suffix(".log")
    read_fd, write_fd = os.pipe()
    args = ["--source", source, "--mountpoint", mountpoint, "--control", str(control)]
    if toc_digest:
        args += ["--toc-digest", toc_digest]
    args += remote_args(remote)
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(log_path, "ab") as log_file:
            pid = None
            if fork_server is not None:
                try:
                    pid = fork_server.fork(args, write_fd, log_file.fileno())
                except ForkServerError as exc:
                    log.warning("%s; starting the mount process directly", exc)
            if pid is None:
                proc = subprocess.Popen([sys.executable, "-m", "lazyfs.mount", *args, "--ready-fd", str(write_fd)],
                                        stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                        pass_fds=(write_fd,), start_new_session=True, env=child_env())
                pid = proc.pid
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as ready:
        line = _read_line(ready, timeout)
    if line == READY:
        return pid
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if proc is not None:
        proc.wait()  # a forked one is the fork server's child: it reaps it
    raise MountError(f"mounting {source} at {mountpoint} failed:\n{_tail(log_path)}")


def child_env() -> dict[str, str]:
    """The environment of a mount process: ours, with this package importable."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])))


def remote_args(remote: RemoteOptions) -> list[str]:
    args = []
    if remote.cache_dir:
        args += ["--cache-dir", remote.cache_dir]
    args += ["--fetch-deadline", str(remote.fetch_deadline)]
    if remote.blob_digest:
        args += ["--blob-digest", remote.blob_digest]
    if not remote.background_fetch:
        args.append("--no-background-fetch")
    if remote.registry_config:
        args += ["--registry-config", remote.registry_config]
    if remote.fetch_slots_dir:
        args += ["--fetch-slots-dir", remote.fetch_slots_dir, "--fetch-slots", str(remote.fetch_slots)]
    if remote.memory_limit_mib:
        args += ["--memory-limit-mib", str(remote.memory_limit_mib)]
    if remote.record_access:
        args.append("--record-access")
    if remote.prefetch_ranges:
        args += ["--prefetch-ranges", remote.prefetch_ranges]
    elif remote.prefetch_manifest:
        args += ["--prefetch-manifest", remote.prefetch_manifest]
    args += ["--read-around", str(remote.read_around)]
    return args


def _read_line(stream: BinaryIO, timeout: float) -> bytes:
    if not select.select([stream], [], [], timeout)[0]:
        return b""
    return stream.readline()


def _tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def status(mountpoint: str | os.PathLike[str], *, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the mount process serving ``mountpoint`` for its counters."""
    try:
        return control.ask(control_path(mountpoint), {"op": "status"}, timeout=timeout)
    except control.ControlError as exc:
        raise MountError(str(exc)) from None


def introduce_peers(mountpoints: Sequence[str | os.PathLike[str]], *, timeout: float = 1.0) -> int:
    """Tell each layer mount in ``mountpoints`` (the lower layers of one
    overlay) the others' control sockets, so that a program starting from
    one of them gets its libraries fetched from the others ahead of time
    (``lazyfs.dependencies``). Best effort: how many took it."""
    controls = [str(control_path(m)) for m in mountpoints]
    return sum(_tell(own, {"op": "peers", "controls": [c for c in controls if c != own]}, timeout) for own in controls)


def want_files(mountpoints: Sequence[str | os.PathLike[str]], paths: Sequence[str], *, timeout: float = 1.0) -> int:
    """Tell each layer mount that ``paths`` (absolute, in the merged view)
    are about to be opened: each fetches those it has, and what they load
    (``lazyfs.dependencies``). Best effort: how many took it."""
    request = {"op": "want", "wants": {"paths": list(paths)}}
    return sum(_tell(control_path(m), request, timeout) for m in mountpoints)


def _tell(path: str | os.PathLike[str], request: dict[str, Any], timeout: float) -> bool:
    """One best-effort request to a mount's control socket; whether it took it."""
    try:
        control.ask(path, request, timeout=timeout)
        return True
    except control.ControlError as exc:
        log.debug("%s", exc)
        return False


def is_mounted(path: str | os.PathLike[str]) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def unmount(mountpoint: str | os.PathLike[str], *, timeout: float = 10.0) -> None:
    """Unmount a layer (or any FUSE mount) and wait for its process to exit."""
    pid = None
    with contextlib.suppress(MountError, ValueError):
        pid = status(mountpoint, timeout=1.0).get("pid")
    proc = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True)
    if proc.returncode != 0 and is_mounted(mountpoint):
        lazy = subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, text=True)
        if lazy.returncode != 0:
            raise MountError(f"cannot unmount {mountpoint}: {proc.stderr.strip()} / {lazy.stderr.strip()}")
    if pid:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and is_alive(pid):
            time.sleep(0.05)


def is_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    return True


# --- entry point -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lazyfs.mount", description="serve one stargz/eStargz layer over FUSE")
    p.add_argument("--source", required=True, help="/path/layer.stargz, https://…, or registry://host/repo@sha256:…")
    p.add_argument("--mountpoint", required=True)
    p.add_argument("--toc-digest", help="expected TOC digest; then every chunk is verified")
    p.add_argument("--control", help="unix socket answering status queries")
    p.add_argument("--ready-fd", type=int, help="fd to write 'ready' to once mounted")
    p.add_argument("--foreground", action="store_true", help="accepted for compatibility: this process always serves in the foreground")
    p.add_argument("--cache-dir", help="shared chunk cache of remote layers")
    p.add_argument("--blob-digest", help="digest of an https:// blob (keys the cache)")
    p.add_argument("--fetch-deadline", type=float, default=60.0, help="seconds before a read that cannot get its chunks fails with EIO")
    p.add_argument("--no-background-fetch", dest="background_fetch", action="store_false", help="fetch only what is read (and the prioritized files)")
    p.add_argument("--registry-config", help="JSON file: mirrors, insecure_hosts, docker_config, ca_file (registry:// sources)")
    p.add_argument("--fetch-slots-dir", help="directory of the host-wide fetch slots (shared by every layer process)")
    p.add_argument("--fetch-slots", type=int, default=16, help="registry requests in flight at once, host-wide")
    p.add_argument("--memory-limit-mib", type=int, help="RLIMIT_DATA of this process, MiB")
    p.add_argument("--read-around", type=int, default=RemoteOptions.read_around, metavar="BYTES",
                   help="compressed bytes after each fetched range to bring along (0: none)")
    p.add_argument("--record-access", action="store_true", help="record which files are read, in order (status: accessed)")
    p.add_argument("--prefetch-ranges", metavar="SPEC",
                   help="OFFSET:LENGTH,... blob byte ranges to fetch while the TOC is read (the layer's prefetch label)")
    p.add_argument("--prefetch-manifest", metavar="DIGEST",
                   help="without --prefetch-ranges: take them from this image manifest's descriptor of the layer")
    p.add_argument("--no-allow-other", action="store_true", help="do not let other users read the mount")
    p.add_argument("--debug", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--fork-server"] and len(argv) == 2:
        return serve_forever(argv[1])
    # A parent may start us with these blocked (crfs serve takes them with
    # sigwait, and children inherit the mask); we must receive them.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s lazyfs[%(process)d] %(levelname)s %(message)s")
    try:
        if args.memory_limit_mib:
            limit = args.memory_limit_mib << 20
            resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        remote = RemoteOptions(cache_dir=args.cache_dir, blob_digest=args.blob_digest, background_fetch=args.background_fetch,
                               fetch_deadline=args.fetch_deadline, registry_config=args.registry_config,
                               fetch_slots_dir=args.fetch_slots_dir, fetch_slots=args.fetch_slots,
                               memory_limit_mib=args.memory_limit_mib, record_access=args.record_access,
                               read_around=args.read_around, prefetch_ranges=args.prefetch_ranges,
                               prefetch_manifest=args.prefetch_manifest)
        # the opening requests (tail, hint) go out first; the FUSE side
        # (trio, pyfuse3: ~0.1 s of imports) loads while they are on the wire.
        # The registry client is imported before, not beside it: two threads
        # importing share one GIL, and the requests would wait for both.
        preload_source(args.source)
        opening: Future[OpenedLayer] = Future()
        threading.Thread(target=_open_into, name="lazyfs-open", daemon=True,
                         args=(opening, args.source, args.toc_digest, remote)).start()
        from .serve import serve  # noqa: PLC0415

        layer = opening.result()
    except Exception as exc:  # noqa: BLE001 - reported, then a non-zero exit
        log.error("cannot open %s: %s", args.source, exc)
        return 1

    def ready() -> None:
        log.info("mounted %s at %s", args.source, args.mountpoint)
        if args.ready_fd is not None:
            os.write(args.ready_fd, READY)
            os.close(args.ready_fd)

    try:
        serve(layer, args.mountpoint, control=args.control, ready=ready,
              allow_other=False if args.no_allow_other else None, record_access=args.record_access)
    except Exception as exc:  # noqa: BLE001
        log.error("serving %s failed: %s", args.mountpoint, exc)
        return 1
    finally:
        layer.close()
    return 0


def _open_into(out: Future[OpenedLayer], source: str, toc_digest: str | None, remote: RemoteOptions) -> None:
    try:
        out.set_result(open_layer(source, toc_digest=toc_digest, remote=remote))
    except BaseException as exc:  # noqa: BLE001 - main() reports it
        out.set_exception(exc)


if __name__ == "__main__":
    sys.exit(main())
