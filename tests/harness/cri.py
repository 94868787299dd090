"""A small client for the CRI ImageService (``runtime.v1``) that
containerd's CRI plugin serves on containerd's own socket: what the kubelet
or ``crictl pull`` would send, for tests that pull images the Kubernetes way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import grpc

from crfs_proto.k8s.cri.runtime.v1 import api_pb2 as cri_pb
from crfs_proto.k8s.cri.runtime.v1 import api_pb2_grpc as cri_grpc

from .proc import HarnessError


class CriImageClient:
    """``with CriImageClient(ctrd.address) as cri: cri.pull(ref)``."""

    def __init__(self, address: Path, timeout: float = 300.0, connect_timeout: float = 30.0):
        self.address = Path(address)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.channel: Optional[grpc.Channel] = None
        self.stub: Optional[cri_grpc.ImageServiceStub] = None

    def __enter__(self) -> "CriImageClient":
        self.channel = grpc.insecure_channel(f"unix://{self.address}")
        try:
            grpc.channel_ready_future(self.channel).result(timeout=self.connect_timeout)
        except grpc.FutureTimeoutError:
            self.channel.close()
            raise HarnessError(f"CRI: no gRPC server on {self.address}") from None
        self.stub = cri_grpc.ImageServiceStub(self.channel)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.channel is not None:
            self.channel.close()

    def _call(self, method: str, request: object) -> object:
        try:
            return getattr(self.stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise HarnessError(f"CRI {method}: {e.code().name}: {e.details()}") from e

    def pull(self, ref: str, username: str = "", password: str = "") -> str:
        """PullImage; returns the image_ref containerd answers (the image ID)."""
        auth = cri_pb.AuthConfig(username=username, password=password) if username else None
        req = cri_pb.PullImageRequest(image=cri_pb.ImageSpec(image=ref), auth=auth)
        return self._call("PullImage", req).image_ref

    def status(self, ref: str, verbose: bool = False) -> Optional[cri_pb.Image]:
        """ImageStatus; None when the image is not there (CRI's "not found")."""
        req = cri_pb.ImageStatusRequest(image=cri_pb.ImageSpec(image=ref), verbose=verbose)
        resp = self._call("ImageStatus", req)
        return resp.image if resp.HasField("image") else None

    def list(self) -> list[cri_pb.Image]:
        return list(self._call("ListImages", cri_pb.ListImagesRequest()).images)

    def remove(self, ref: str) -> None:
        """RemoveImage (idempotent: removing a missing image succeeds)."""
        self._call("RemoveImage", cri_pb.RemoveImageRequest(image=cri_pb.ImageSpec(image=ref)))
