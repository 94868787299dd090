"""Errors of the snapshotter, one type per containerd errdefs class.

The gRPC layer maps each type to the status code that containerd's
errdefs/grpc.go turns back into the same errdefs error (see
``service.grpc_code``); a wrong code breaks containerd's unpacker, so every
failure the snapshotter can foresee raises one of these.
"""


class SnapshotError(Exception):
    """Base class; anything else escaping a call is an internal error."""


class NotFound(SnapshotError):
    """The key (or a parent it names) does not exist."""


class AlreadyExists(SnapshotError):
    """The key or commit name is taken."""


class FailedPrecondition(SnapshotError):
    """The snapshot is in the wrong state for the call (e.g. commit of a view)."""


class InvalidArgument(SnapshotError):
    """The request itself is malformed (empty key, bad filter, immutable field)."""


class Unavailable(SnapshotError):
    """A layer the snapshot stands on is not mounted right now (its process
    is being restarted, or its registry is unreachable); retrying may work."""
