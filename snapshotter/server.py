"""``crfs serve``: the Snapshots service on a unix socket, until a signal.

Owns the process-level concerns: one server per root (a lock file), the
socket's creation and permissions, gRPC health, and a clean shutdown.
"""

from __future__ import annotations

import fcntl
import grp
import hashlib
import json
import logging
import os
import signal
import socket
from concurrent import futures
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from crfs_proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc

from lazyfs import mount
from lazyfs.forkserver import ForkServer, ForkServerError
from lazyfs.layer_source import RemoteOptions
from lazyfs.registry.config import RegistryConfig

from .config import Config
from .layers import LayerMounts
from .service import SERVICE_NAME, SnapshotsService
from .snapshots import CrashPoint, Snapshotter
from .store import MetaStore
from .supervisor import MountSupervisor

log = logging.getLogger(__name__)

# Crash tests name a point (see Snapshotter) in this variable; the server then
# kills itself with SIGKILL exactly there. Unset in production.
CRASH_POINT_ENV = "CRFS_TEST_CRASH_POINT"


class ServeError(Exception):
    """The server cannot start; the message says why and what to do."""


def _lock_root(root: Path, stack: ExitStack) -> None:
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(root / "crfs.lock", os.O_RDWR | os.O_CREAT, 0o600)
    stack.callback(os.close, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ServeError(f"another crfs serve is using root {root}") from None


def _clear_stale_socket(path: Path) -> None:
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: left by a crashed server
        return
    finally:
        probe.close()
    raise ServeError(f"socket {path} is in use by another server")


def _bind(server: grpc.Server, cfg: Config) -> None:
    path = cfg.address
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    _clear_stale_socket(path)
    # the socket must never exist with looser permissions, not even briefly
    old_umask = os.umask(0o177)
    try:
        if server.add_insecure_port(f"unix:{path}") == 0:
            raise ServeError(f"cannot listen on {path}")
    finally:
        os.umask(old_umask)
    if cfg.socket_group:
        try:
            gid = grp.getgrnam(cfg.socket_group).gr_gid
        except KeyError:
            raise ServeError(f"socket_group {cfg.socket_group!r} does not exist") from None
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)


def _crash_point() -> Optional[CrashPoint]:
    target = os.environ.get(CRASH_POINT_ENV)
    if not target:
        return None

    def crash(name: str) -> None:
        if name == target:
            log.warning("crash point %s reached: killing myself", name)
            os.kill(os.getpid(), signal.SIGKILL)

    return crash


def _fork_server(cfg: Config, stack: ExitStack) -> Optional[ForkServer]:
    """The process layer mounts are forked from (their imports done: ~0.15 s
    sooner to their first request); None, and mount processes started
    directly, if it cannot start. Its socket is under lazyfs's state
    directory (a unix socket path is short), named after the root."""
    key = hashlib.sha256(str(cfg.root.resolve()).encode()).hexdigest()[:16]
    path = mount.state_dir() / f"forkserver-{key}.sock"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    server = ForkServer(path)
    try:
        server.start()
    except ForkServerError as exc:
        log.warning("%s; layer mount processes will start on their own", exc)
        return None
    stack.callback(server.stop)
    return server


def _layer_mounts(cfg: Config, stack: ExitStack) -> Optional[LayerMounts]:
    """The lazily mounted layers, or None when remote snapshots are off.
    Stopping leaves them mounted (running containers use them) unless
    ``unmount_on_stop``."""
    if not cfg.remote_snapshots:
        return None
    fork_server = _fork_server(cfg, stack)
    supervisor = MountSupervisor(poll_interval=cfg.mount_check_interval, start_timeout=cfg.remote_mount_timeout,
                                 fork_server=fork_server)
    stack.callback(lambda: supervisor.close(unmount_all=cfg.unmount_on_stop))
    registry_config = None
    if cfg.registry:
        # the layer processes read it; written whole, then renamed
        registry_config = cfg.root / "registry.json"
        tmp = registry_config.with_suffix(".tmp")
        tmp.write_text(json.dumps(RegistryConfig.from_dict(cfg.registry).to_dict()))
        os.replace(tmp, registry_config)
    remote = RemoteOptions(
        cache_dir=str(cfg.root / "cache"), background_fetch=cfg.background_fetch, fetch_deadline=cfg.fetch_deadline,
        registry_config=str(registry_config) if registry_config else None,
        fetch_slots_dir=str(cfg.root / "fetch-slots"), fetch_slots=cfg.max_concurrent_fetches,
        memory_limit_mib=cfg.mount_memory_limit_mib, read_around=cfg.read_around_kib << 10,
    )
    return LayerMounts(cfg.root / "layers", supervisor, remote, premount_hold=cfg.premount_hold)


def serve(cfg: Config) -> None:
    """Serves until SIGTERM or SIGINT; raises ServeError if it cannot start."""
    # Blocked before any thread starts (threads inherit the mask) and taken
    # with sigwait: a Python signal handler that sets an Event can deadlock on
    # the Event's own lock, and a signal during start-up must not be lost.
    # Child processes inherit the mask: unblock these in any child started.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    with ExitStack() as stack:
        _lock_root(cfg.root, stack)
        store = MetaStore(cfg.root / "metadata.db", synchronous=cfg.metadata_sync)
        stack.callback(store.close)
        layers = _layer_mounts(cfg, stack)
        snapshotter = Snapshotter(cfg.root, store, crash_point=_crash_point(), layers=layers)
        snapshotter.recover()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.grpc_workers, thread_name_prefix="grpc"))
        pb_grpc.add_SnapshotsServicer_to_server(SnapshotsService(snapshotter), server)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        _bind(server, cfg)
        server.start()
        stack.callback(lambda: server.stop(grace=5).wait())
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s (root %s)", SERVICE_NAME, cfg.address, cfg.root)
        received = signal.sigwait(stop_signals)
        log.info("shutting down (%s)", signal.Signals(received).name)
        health_servicer.enter_graceful_shutdown()
    log.info("stopped")
