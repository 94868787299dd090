"""A thin typed client for the parts of containerd's own gRPC API that a
pull needs: content, images, leases, diff and snapshots.

Every call carries ``containerd-namespace`` and, while a lease is held,
``containerd-lease`` metadata, the two headers containerd's Go client sends.
gRPC failures become a handful of exception types, mapped the way
containerd's ``errdefs/grpc.go`` maps them, so callers test for "already
exists" or "not found" instead of status codes.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence, TypeVar

import grpc
from google.protobuf import field_mask_pb2

from crfs_proto.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from crfs_proto.containerd.services.diff.v1 import diff_pb2, diff_pb2_grpc
from crfs_proto.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from crfs_proto.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from crfs_proto.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from crfs_proto.containerd.types import descriptor_pb2, mount_pb2

from .containerd_types import (  # noqa: F401 (re-exported: the client's vocabulary)
    DEFAULT_ADDRESS,
    DEFAULT_NAMESPACE,
    AlreadyExists,
    ContainerdError,
    Descriptor,
    FailedPrecondition,
    InvalidArgument,
    Mount,
    NotFound,
    SnapshotInfo,
    Unavailable,
)

T = TypeVar("T")

NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
GC_EXPIRE_LABEL = "containerd.io/gc.expire"

CALL_TIMEOUT = 60.0  # seconds, for calls that do not move layer data
APPLY_TIMEOUT = 3600.0  # Apply extracts a whole layer
WRITE_CHUNK = 1 << 20  # containerd accepts messages up to 16 MiB

# --- errors -------------------------------------------------------------------

_ERRORS: dict[grpc.StatusCode, type[ContainerdError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def map_error(err: grpc.RpcError, what: str) -> ContainerdError:
    """The ContainerdError subclass for a failed call, message included."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    cls = _ERRORS.get(code, ContainerdError) if code is not None else ContainerdError
    return cls(f"{what}: {details or code}", code)


# --- plain data <-> protobuf ----------------------------------------------------


def descriptor_to_proto(d: Descriptor) -> descriptor_pb2.Descriptor:
    return descriptor_pb2.Descriptor(media_type=d.media_type, digest=d.digest, size=d.size, annotations=dict(d.annotations))


def descriptor_from_proto(d: descriptor_pb2.Descriptor) -> Descriptor:
    return Descriptor(d.media_type, d.digest, d.size, dict(d.annotations))


def mount_to_proto(m: Mount) -> mount_pb2.Mount:
    return mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))


def mount_from_proto(m: mount_pb2.Mount) -> Mount:
    return Mount(m.type, m.source, tuple(m.options), m.target)


# --- the client -----------------------------------------------------------------


class ContainerdClient:
    """One channel to containerd's socket, one namespace.

    ``with client.lease(): ...`` holds a lease: everything written or
    prepared inside is protected from GC until the lease is deleted, and
    collectable once it is (also when the pull failed half-way).
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.address = address
        self.namespace = namespace
        self.lease_id: Optional[str] = None
        self.channel = grpc.insecure_channel(
            "unix:" + address,
            options=[("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)],
        )
        self._content = content_pb2_grpc.ContentStub(self.channel)
        self._images = images_pb2_grpc.ImagesStub(self.channel)
        self._leases = leases_pb2_grpc.LeasesStub(self.channel)
        self._diff = diff_pb2_grpc.DiffStub(self.channel)
        self._snapshots = snapshots_pb2_grpc.SnapshotsStub(self.channel)

    def __enter__(self) -> "ContainerdClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    # --- plumbing ---

    def metadata(self) -> list[tuple[str, str]]:
        md = [(NAMESPACE_HEADER, self.namespace)]
        if self.lease_id:
            md.append((LEASE_HEADER, self.lease_id))
        return md

    def _call(self, what: str, method: Callable[..., T], request: object, timeout: float = CALL_TIMEOUT) -> T:
        try:
            return method(request, metadata=self.metadata(), timeout=timeout)
        except grpc.RpcError as e:
            raise map_error(e, what) from None

    # --- leases ---

    def create_lease(self, lease_id: str, expire: timedelta = timedelta(hours=24)) -> str:
        """A lease that containerd drops by itself after ``expire`` if we die."""
        when = (datetime.now(timezone.utc) + expire).strftime("%Y-%m-%dT%H:%M:%SZ")
        req = leases_pb2.CreateRequest(id=lease_id, labels={GC_EXPIRE_LABEL: when})
        return self._call("create lease", self._leases.Create, req).lease.id

    def delete_lease(self, lease_id: str, sync: bool = False) -> None:
        """``sync``: wait for the garbage collection the deletion triggers."""
        self._call(f"delete lease {lease_id}", self._leases.Delete, leases_pb2.DeleteRequest(id=lease_id, sync=sync))

    @contextmanager
    def lease(self, lease_id: str, expire: timedelta = timedelta(hours=24)) -> Iterator[str]:
        """Hold a lease for the block; deleted at the end, failure or not.
        After a failure the deletion waits for GC, so that what the block
        left behind is gone when the error reaches the user."""
        self.lease_id = self.create_lease(lease_id, expire)
        failed = True
        try:
            yield self.lease_id
            failed = False
        finally:
            held, self.lease_id = self.lease_id, None
            try:
                self.delete_lease(held, sync=failed)
            except ContainerdError:
                pass  # it expires by itself (gc.expire)

    # --- content ---

    def content_info(self, digest: str) -> content_pb2.Info:
        return self._call(f"content {digest}", self._content.Info, content_pb2.InfoRequest(digest=digest)).info

    def update_content_labels(self, digest: str, labels: Mapping[str, str]) -> None:
        """Set ``labels`` on existing content, leaving its other labels alone."""
        info = content_pb2.Info(digest=digest, labels=dict(labels))
        mask = field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])
        self._call(f"update labels of {digest}", self._content.Update, content_pb2.UpdateRequest(info=info, update_mask=mask))

    def write_content(
        self,
        ref: str,
        digest: str,
        size: int,
        chunks: Iterable[bytes],
        labels: Optional[Mapping[str, str]] = None,
        timeout: float = APPLY_TIMEOUT,
    ) -> bool:
        """Stream ``chunks`` into the content store under ``ref`` and commit
        them as ``digest``. Returns False when containerd already has that
        content (then nothing was written; labels are set by an Update).

        An exception raised by ``chunks`` (a registry failure) is re-raised
        here as is, not as a cancelled call.
        """
        failure: list[BaseException] = []

        def requests() -> Iterator[content_pb2.WriteContentRequest]:
            yield content_pb2.WriteContentRequest(action=content_pb2.STAT, ref=ref, total=size, expected=digest)
            offset = 0
            try:
                for chunk in chunks:
                    for i in range(0, len(chunk), WRITE_CHUNK):
                        piece = chunk[i : i + WRITE_CHUNK]
                        yield content_pb2.WriteContentRequest(action=content_pb2.WRITE, ref=ref, offset=offset, data=piece)
                        offset += len(piece)
            except Exception as e:  # noqa: BLE001 - handed to the caller below
                failure.append(e)
                return
            yield content_pb2.WriteContentRequest(
                action=content_pb2.COMMIT, ref=ref, offset=offset, total=size, expected=digest, labels=dict(labels or {})
            )

        try:
            for _ in self._content.Write(requests(), metadata=self.metadata(), timeout=timeout):
                pass
        except grpc.RpcError as e:
            if failure:
                raise failure[0] from None
            err = map_error(e, f"write {digest}")
            if isinstance(err, AlreadyExists):
                if labels:
                    self.update_content_labels(digest, labels)
                return False
            raise err from None
        if failure:
            self._abort(ref)
            raise failure[0]
        return True

    def _abort(self, ref: str) -> None:
        try:
            self._call(f"abort {ref}", self._content.Abort, content_pb2.AbortRequest(ref=ref))
        except ContainerdError:
            pass

    # --- images ---

    def get_image(self, name: str) -> images_pb2.Image:
        return self._call(f"image {name}", self._images.Get, images_pb2.GetImageRequest(name=name)).image

    def put_image(self, name: str, target: Descriptor, labels: Optional[Mapping[str, str]] = None) -> None:
        """Create the image record, or point the existing one at ``target``."""
        image = images_pb2.Image(name=name, target=descriptor_to_proto(target), labels=dict(labels or {}))
        try:
            self._call(f"create image {name}", self._images.Create, images_pb2.CreateImageRequest(image=image))
        except AlreadyExists:
            paths = ["target"] + [f"labels.{k}" for k in (labels or {})]
            req = images_pb2.UpdateImageRequest(image=image, update_mask=field_mask_pb2.FieldMask(paths=paths))
            self._call(f"update image {name}", self._images.Update, req)

    def delete_image(self, name: str, sync: bool = False) -> None:
        self._call(f"delete image {name}", self._images.Delete, images_pb2.DeleteImageRequest(name=name, sync=sync))

    def list_images(self, filters: Sequence[str] = ()) -> list[images_pb2.Image]:
        req = images_pb2.ListImagesRequest(filters=list(filters))
        return list(self._call("list images", self._images.List, req).images)

    # --- diff ---

    def apply(self, desc: Descriptor, mounts: Sequence[Mount]) -> Descriptor:
        """Extract the layer ``desc`` (from the content store) onto ``mounts``;
        returns the descriptor of the uncompressed tar (its diff ID)."""
        req = diff_pb2.ApplyRequest(diff=descriptor_to_proto(desc), mounts=[mount_to_proto(m) for m in mounts])
        resp = self._call(f"apply {desc.digest}", self._diff.Apply, req, timeout=APPLY_TIMEOUT)
        return descriptor_from_proto(resp.applied)

    # --- snapshots (through containerd, so its metadata follows) ---

    def stat_snapshot(self, snapshotter: str, key: str) -> SnapshotInfo:
        req = snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key)
        info = self._call(f"stat snapshot {key}", self._snapshots.Stat, req).info
        return SnapshotInfo(info.name, info.parent, info.kind, dict(info.labels))

    def snapshot_exists(self, snapshotter: str, key: str) -> bool:
        try:
            self.stat_snapshot(snapshotter, key)
            return True
        except NotFound:
            return False

    def prepare(self, snapshotter: str, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        req = snapshots_pb2.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent, labels=dict(labels))
        resp = self._call(f"prepare snapshot {key}", self._snapshots.Prepare, req, timeout=APPLY_TIMEOUT)
        return [mount_from_proto(m) for m in resp.mounts]

    def commit(self, snapshotter: str, name: str, key: str, labels: Mapping[str, str]) -> None:
        req = snapshots_pb2.CommitSnapshotRequest(snapshotter=snapshotter, name=name, key=key, labels=dict(labels))
        self._call(f"commit snapshot {key}", self._snapshots.Commit, req)

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        req = snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key)
        self._call(f"remove snapshot {key}", self._snapshots.Remove, req)

    def list_snapshots(self, snapshotter: str) -> list[SnapshotInfo]:
        req = snapshots_pb2.ListSnapshotsRequest(snapshotter=snapshotter)
        try:
            out = []
            for resp in self._snapshots.List(req, metadata=self.metadata(), timeout=CALL_TIMEOUT):
                out += [SnapshotInfo(i.name, i.parent, i.kind, dict(i.labels)) for i in resp.info]
            return out
        except grpc.RpcError as e:
            raise map_error(e, "list snapshots") from None
