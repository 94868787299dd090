"""containerd.services.snapshots.v1.Snapshots over a Snapshotter.

Translates protobuf messages to Snapshotter calls and back, and maps errors
to gRPC status codes in one place (``grpc_code``), matching containerd's
errdefs/grpc.go so that containerd sees the same errdefs class we raised.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, Iterator

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from crfs_proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from crfs_proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from crfs_proto.containerd.types import mount_pb2

from . import errors
from .mounts import Mount
from .snapshots import Snapshotter
from .store import Kind, SnapshotInfo

log = logging.getLogger(__name__)

SERVICE_NAME = "containerd.services.snapshots.v1.Snapshots"
WALK_BATCH = 100  # infos per List response message, as containerd's own service

_CODES: dict[type[errors.SnapshotError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def grpc_code(exc: BaseException) -> grpc.StatusCode:
    """The status code for an error; anything unforeseen is UNKNOWN."""
    for cls in type(exc).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.UNKNOWN


def _handled(method: Callable[..., Any]) -> Callable[..., Any]:
    """Logs the call and turns exceptions into gRPC status codes."""

    @functools.wraps(method)
    def wrapper(self: "SnapshotsService", request: Any, context: grpc.ServicerContext) -> Any:
        started = time.monotonic()
        name = method.__name__
        key = getattr(request, "key", "") or getattr(getattr(request, "info", None), "name", "")
        try:
            result = method(self, request, context)
            if name == "List":
                result = list(result)  # errors must surface before streaming
        except errors.SnapshotError as exc:
            code = grpc_code(exc)
            log.info("%s key=%r failed: %s: %s", name, key, code.name, exc)
            context.abort(code, str(exc))
        except Exception as exc:  # noqa: BLE001 - every failure must answer
            log.exception("%s key=%r failed unexpectedly", name, key)
            context.abort(grpc.StatusCode.UNKNOWN, f"{name} {key!r}: {exc}")
        log.debug("%s key=%r ok in %.1f ms", name, key, (time.monotonic() - started) * 1000)
        return iter(result) if name == "List" else result

    return wrapper


def _mounts(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def _info(info: SnapshotInfo) -> pb.Info:
    return pb.Info(
        name=info.name,
        parent=info.parent,
        kind=int(info.kind),
        created_at=_timestamp(info.created_ns),
        updated_at=_timestamp(info.updated_ns),
        labels=info.labels,
    )


class SnapshotsService(pb_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter) -> None:
        self._sn = snapshotter

    @_handled
    def Prepare(self, request: pb.PrepareSnapshotRequest, context: grpc.ServicerContext) -> pb.PrepareSnapshotResponse:
        mounts = self._sn.prepare(request.key, request.parent, dict(request.labels))
        return pb.PrepareSnapshotResponse(mounts=_mounts(mounts))

    @_handled
    def View(self, request: pb.ViewSnapshotRequest, context: grpc.ServicerContext) -> pb.ViewSnapshotResponse:
        mounts = self._sn.view(request.key, request.parent, dict(request.labels))
        return pb.ViewSnapshotResponse(mounts=_mounts(mounts))

    @_handled
    def Mounts(self, request: pb.MountsRequest, context: grpc.ServicerContext) -> pb.MountsResponse:
        return pb.MountsResponse(mounts=_mounts(self._sn.mounts(request.key)))

    @_handled
    def Commit(self, request: pb.CommitSnapshotRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self._sn.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @_handled
    def Remove(self, request: pb.RemoveSnapshotRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self._sn.remove(request.key)
        return empty_pb2.Empty()

    @_handled
    def Stat(self, request: pb.StatSnapshotRequest, context: grpc.ServicerContext) -> pb.StatSnapshotResponse:
        return pb.StatSnapshotResponse(info=_info(self._sn.stat(request.key)))

    @_handled
    def Update(self, request: pb.UpdateSnapshotRequest, context: grpc.ServicerContext) -> pb.UpdateSnapshotResponse:
        info = SnapshotInfo(name=request.info.name, kind=Kind.ACTIVE, labels=dict(request.info.labels))
        updated = self._sn.update(info, list(request.update_mask.paths))
        return pb.UpdateSnapshotResponse(info=_info(updated))

    @_handled
    def List(self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext) -> Iterator[pb.ListSnapshotsResponse]:
        infos = [_info(i) for i in self._sn.walk(list(request.filters))]
        return [pb.ListSnapshotsResponse(info=infos[i:i + WALK_BATCH]) for i in range(0, len(infos), WALK_BATCH)]

    @_handled
    def Usage(self, request: pb.UsageRequest, context: grpc.ServicerContext) -> pb.UsageResponse:
        usage = self._sn.usage(request.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    @_handled
    def Cleanup(self, request: pb.CleanupRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self._sn.cleanup()
        return empty_pb2.Empty()
