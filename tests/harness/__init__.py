"""Test harness for crfs: real containerd, registry and crfs daemons as
context managers that always clean up, plus offline-built test images.

Importable without pytest (bench/ and scripts use it): put ``tests/`` on
``sys.path`` and ``import harness``.
"""

from .containerd import Containerd
from .crfs import CrfsServer
from .fixtures import Stack, containerd_stack, crfs_server, temp_workdir
from .images import OciImage, build_whiteout_image, layer_members, push, push_image
from .proc import HarnessError, require_binary
from .registry import Registry
from .snapshots_client import SnapshotsClient, crfs_snapshot_names

__all__ = [
    "Containerd",
    "CrfsServer",
    "HarnessError",
    "OciImage",
    "Registry",
    "SnapshotsClient",
    "Stack",
    "build_whiteout_image",
    "containerd_stack",
    "crfs_server",
    "crfs_snapshot_names",
    "layer_members",
    "push",
    "push_image",
    "require_binary",
    "temp_workdir",
]
