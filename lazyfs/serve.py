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

from .fs import LayerFS, mount_options
from .layer_source import OpenedLayer
from .tree import OPAQUE_XATTRS

log = logging.getLogger(__name__)


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
    trim_heap()
    pyfuse3.init(fs, mountpoint, mount_options(allow_other=allow_other))
    external = trio.Event()  # set when someone else unmounted us
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
                "store": layer.store_stats(),
                **({"accessed": list(fs.accessed),  # paths, in first-read order
                    # and the byte ranges of each read: {path: [[offset, length], ...]}
                    "accessed_ranges": {p: [[s, e - s] for s, e in r] for p, r in fs.accessed.items()}}
                   if fs.accessed is not None else {}),
            }

        async def run() -> None:
            async with trio.open_nursery() as nursery:
                if control:
                    await nursery.start(_serve_control, control, status)
                nursery.start_soon(_fuse_main, nursery.cancel_scope, external)
                await _until_signal()
                nursery.cancel_scope.cancel()

        trio.run(run)
    finally:
        log.info("leaving %s (%s)", mountpoint, "unmounted from outside" if external.is_set() else "unmounting")
        pyfuse3.close(unmount=not external.is_set())
        if control:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(control)


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


async def _serve_control(path: str, status: Callable[[], dict[str, Any]], task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Each connection gets the status as one JSON line, then EOF."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(16)

    async def answer(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(json.dumps(status()).encode() + b"\n")
        await stream.aclose()

    listener = trio.SocketListener(sock)
    task_status.started()
    await trio.serve_listeners(answer, [listener])
