"""The FUSE side of a layer mount process: serve an opened layer at a
mountpoint until a signal or an external unmount, and answer status
queries on a control socket.

Kept out of ``lazyfs.mount`` (which starts, stops and queries mount
processes, and is their entry point) so that a mount process imports trio
and pyfuse3 while its first requests are on the wire, and the snapshotter
never imports them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import pyfuse3
import trio

from . import control as control_protocol
from .dependencies import DependencyPrefetcher, Wants
from .fs import LayerFS, mount_options
from .layer_source import OpenedLayer
from .tree import OPAQUE_XATTRS

log = logging.getLogger(__name__)
REQUEST_WAIT = 1.0  # seconds a connection may take to send its request line


def serve(
    layer: OpenedLayer, mountpoint: str, *, control: str | None = None, ready: Callable[[], None] = lambda: None,
    allow_other: bool | None = None, opaque_xattrs: tuple[str, ...] = OPAQUE_XATTRS, record_access: bool = False,
) -> None:
    """Mount ``layer`` at ``mountpoint`` and serve it until a signal or an
    external unmount; always leaves the mountpoint unmounted."""
    # CRFS_LAZYFS_NO_OPEN=0 answers every OPEN/OPENDIR, as with a stock
    # pyfuse3 (for comparisons and tests); the default is no-open when supported
    no_open = None if os.environ.get("CRFS_LAZYFS_NO_OPEN", "") != "0" else False
    fs = LayerFS(layer.toc, layer.store, opaque_xattrs=opaque_xattrs, no_open=no_open, record_access=record_access)
    peers = Peers(control)
    if layer.is_remote and not layer.hinted and os.environ.get("CRFS_LAZYFS_DEPENDENCIES", "") != "0":
        fs.dependencies = DependencyPrefetcher(fs.tree, fs.memo, tell_peers=peers.tell)
    trim_heap()
    # the kernel's read-ahead for the mount is raised once no read can cause a fetch
    fs.mountpoint, fs.fully_local = mountpoint, layer.fully_local
    fs.local_at_mount = _fully_local(layer)
    pyfuse3.init(fs, mountpoint, mount_options(allow_other=allow_other))
    external = trio.Event()  # set when someone else unmounted us
    # listening before "ready": whoever waits for that may ask at once
    listening = _control_socket(control) if control else None
    try:
        ready()

        def status() -> dict[str, Any]:
            return {
                "pid": os.getpid(),
                "source": layer.source,
                "mountpoint": mountpoint,
                "toc_digest": layer.toc.digest,
                "toc_verifiable": layer.toc.verifiable,  # every chunk has a digest
                "entries": len(fs.tree),
                "no_open": fs.no_open,
                **asdict(fs.stats),
                **asdict(fs.memo.stats),
                **(asdict(fs.file_replies.stats) if fs.file_replies is not None else {}),
                "store": layer.store_stats(),
                "peers": len(peers.controls),
                "hinted": layer.hinted,
                **({"dependencies": fs.dependencies.status()} if fs.dependencies is not None else {}),
                **({"accessed": list(fs.accessed),  # paths, in first-read order
                    # and the byte ranges of each read: {path: [[offset, length], ...]}
                    "accessed_ranges": {p: [[s, e - s] for s, e in r] for p, r in fs.accessed.items()}}
                   if fs.accessed is not None else {}),
            }

        async def run() -> None:
            async with trio.open_nursery() as nursery:
                if listening is not None:
                    await nursery.start(_serve_control, listening, status, peers, fs.dependencies)
                nursery.start_soon(_fuse_main, nursery.cancel_scope, external)
                await _until_signal()
                nursery.cancel_scope.cancel()

        trio.run(run)
    finally:
        log.info("leaving %s (%s)", mountpoint, "unmounted from outside" if external.is_set() else "unmounting")
        pyfuse3.close(unmount=not external.is_set())
        if listening is not None:
            listening.close()
        if control:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(control)


def _fully_local(layer: OpenedLayer) -> bool:
    try:
        return layer.fully_local()
    except Exception as exc:  # noqa: BLE001 - only an optimisation is lost
        log.debug("cannot tell whether the layer is local: %r", exc)
        return False


def trim_heap() -> None:
    """Hand the heap that parsing the TOC freed back to the system (glibc's
    ``malloc_trim``; ~2 MB for a 10k-entry layer), which would otherwise stay
    in this long-lived process's RSS. Nothing happens where it is missing."""
    with contextlib.suppress(Exception):
        import ctypes  # noqa: PLC0415 - trio has loaded it already

        ctypes.CDLL(None).malloc_trim(0)


async def _fuse_main(scope: trio.CancelScope, external: trio.Event) -> None:
    """pyfuse3's loop; it returns when the filesystem is unmounted from outside."""
    await pyfuse3.main()
    external.set()
    scope.cancel()


async def _until_signal() -> None:
    """Returns once SIGTERM/SIGINT/SIGHUP arrives."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            return


class Peers:
    """The control sockets of the layers merged with this one (the
    snapshotter names them), and telling them what is wanted. What was
    asked before a peer was known is passed on to it when it is."""

    REMEMBERED = 32  # requests kept for peers named later

    def __init__(self, own: str | None) -> None:
        self.own = own
        self.controls: list[str] = []
        self._told: list[Wants] = []

    def add(self, controls: list[str]) -> None:
        """A layer may be in several overlays: the union, newest last, bounded.
        Trio thread only."""
        new = [c for c in dict.fromkeys(controls) if c != self.own and c not in self.controls]
        merged = dict.fromkeys(c for c in self.controls if c not in controls)
        merged.update(dict.fromkeys(c for c in controls if c != self.own))
        self.controls = list(merged)[-control_protocol.MAX_PEERS :]
        for path in new:
            for wants in self._told:
                trio.lowlevel.spawn_system_task(self._send, path, wants, name="lazyfs-tell-peer")

    def tell(self, wants: Wants) -> None:
        """Sends ``wants`` to every peer, in a worker thread (trio thread only)."""
        self._told = [*self._told, wants][-self.REMEMBERED :]
        for path in self.controls:
            trio.lowlevel.spawn_system_task(self._send, path, wants, name="lazyfs-tell-peer")

    async def _send(self, path: str, wants: Wants) -> None:
        request = {"op": "want", "wants": wants.to_json()}
        try:
            await trio.to_thread.run_sync(lambda: control_protocol.ask(path, request, timeout=2.0), abandon_on_cancel=True)
        except Exception as exc:  # noqa: BLE001 - a system task must not raise: it would end the mount
            log.info("peer %s did not take the request: %s", path, exc)


def _control_socket(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return sock


async def _serve_control(
    listening: socket.socket, status: Callable[[], dict[str, Any]], peers: Peers,
    dependencies: DependencyPrefetcher | None, task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """One request line per connection (``lazyfs.control``), one answer line."""
    sock = trio.socket.from_stdlib_socket(listening)

    def handle(line: bytes) -> dict[str, Any]:
        try:
            op, request = control_protocol.parse_request(line)
            if op == "peers":
                peers.add(request["controls"])
                return {"ok": True, "peers": len(peers.controls)}
            if op == "want":
                wants = Wants.from_json(request["wants"])
                if dependencies is not None:
                    dependencies.want(wants)
                return {"ok": True}
        except ValueError as exc:
            return {"error": str(exc)}
        return status()

    async def answer(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            line = b""
            # a client of the first protocol sends nothing and waits for the status
            with trio.move_on_after(REQUEST_WAIT):
                while b"\n" not in line and len(line) <= control_protocol.MAX_LINE:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    line += data
            answer = handle(line) if len(line) <= control_protocol.MAX_LINE else {"error": "request too long"}
            await stream.send_all(json.dumps(answer).encode() + b"\n")
        await stream.aclose()

    listener = trio.SocketListener(sock)
    task_status.started()
    await trio.serve_listeners(answer, [listener])
