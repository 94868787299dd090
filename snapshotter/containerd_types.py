"""What ``crfs rpull`` exchanges with containerd, as plain Python: the
errors and the descriptor/mount records of ``containerd_api``.

Kept apart from the client so that rpull can start talking to the
registry before grpc and the generated protobuf modules are imported
(~0.1 s that would otherwise come before its first request).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "default"


class ContainerdError(Exception):
    """containerd refused or failed a call; ``code`` is the gRPC status (a ``grpc.StatusCode``)."""

    def __init__(self, message: str, code: Optional[Any] = None) -> None:
        super().__init__(message)
        self.code = code


class NotFound(ContainerdError):
    pass


class AlreadyExists(ContainerdError):
    pass


class InvalidArgument(ContainerdError):
    pass


class FailedPrecondition(ContainerdError):
    pass


class Unavailable(ContainerdError):
    """containerd (or the snapshotter behind it) cannot be reached."""


@dataclass(frozen=True)
class Descriptor:
    """An OCI descriptor as containerd's types.Descriptor carries it."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    parent: str
    kind: int
    labels: Mapping[str, str]
