"""Small, deterministic test images written directly as OCI JSON + blobs."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from typing import Optional

from lazyfs.registry import OCI_INDEX, OCI_MANIFEST, Repository

LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_gz(files: dict[str, bytes]) -> tuple[bytes, str]:
    """A gzip layer (mtime 0 everywhere) and its diff ID."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0), sha256(raw)


@dataclass
class TestImage:
    manifest: bytes
    config: bytes
    layers: list[bytes]
    os: str
    architecture: str
    variant: str = ""

    @property
    def digest(self) -> str:
        return sha256(self.manifest)

    def descriptor(self) -> dict:
        platform = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            platform["variant"] = self.variant
        return {"mediaType": OCI_MANIFEST, "digest": self.digest, "size": len(self.manifest), "platform": platform}


def build_image(architecture: str = "amd64", variant: str = "", files: Optional[dict[str, bytes]] = None) -> TestImage:
    files = files or {"etc/platform": f"linux/{architecture}/{variant}\n".encode()}
    layer, diff_id = tar_gz(files)
    config = {
        "architecture": architecture,
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "config": {"Cmd": ["/bin/sh"]},
    }
    if variant:
        config["variant"] = variant
    config_bytes = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": CONFIG_TYPE, "digest": sha256(config_bytes), "size": len(config_bytes)},
        "layers": [{"mediaType": LAYER_TYPE, "digest": sha256(layer), "size": len(layer)}],
    }
    return TestImage(json.dumps(manifest, indent=2).encode(), config_bytes, [layer], "linux", architecture, variant)


def build_index(images: list[TestImage]) -> bytes:
    return json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [i.descriptor() for i in images]}, indent=2
    ).encode()


def push_image(repo: Repository, image: TestImage, tag: Optional[str] = None) -> str:
    """Blobs, then the manifest (by digest, or under ``tag``); returns the manifest digest."""
    for blob in [image.config, *image.layers]:
        repo.push_blob(blob)
    return repo.push_manifest(image.manifest, OCI_MANIFEST, tag)


def push_index(repo: Repository, images: list[TestImage], tag: str) -> str:
    for image in images:
        push_image(repo, image)
    return repo.push_manifest(build_index(images), OCI_INDEX, tag)


def write_oci_layout(directory, images: list[TestImage], tag: str) -> bytes:
    """An OCI image layout whose ``tag`` is an index of ``images`` (for skopeo); returns the index."""
    from pathlib import Path

    blobs = Path(directory) / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    index = build_index(images)
    for data in [index] + [b for i in images for b in (i.manifest, i.config, *i.layers)]:
        (blobs / sha256(data)[7:]).write_bytes(data)
    (Path(directory) / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    top = {"mediaType": OCI_INDEX, "digest": sha256(index), "size": len(index),
           "annotations": {"org.opencontainers.image.ref.name": tag}}
    (Path(directory) / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    return index
