"""Test images built offline from busybox-static with umoci.

Layer tars are written with ``tarfile`` and appended with
``umoci raw add-layer`` rather than made by ``umoci repack``: repack turns
a removed-and-recreated directory into one ``.wh.NAME`` per old entry and
never into an opaque marker, and the opaque case is the one that matters
for a snapshotter that merges layers itself.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from .proc import HarnessError, require_binary, run

# What the whiteout image holds; the e2e test checks these inside a container.
DELETED_FILE = "/etc/deleted.txt"  # layer 1 adds it, layer 2 whites it out
KEPT_FILE = "/etc/kept.txt"  # layer 1, survives
KEPT_TEXT = "kept-from-layer-1"
OPAQUE_DIR = "/data"  # layer 1: old1, old2; layer 2: opaque, only new1
OPAQUE_OLD = ("old1", "old2")
OPAQUE_NEW = ("new1",)
LAYER3_FILE = "/etc/layer3.txt"
LAYER3_TEXT = "added-by-layer-3"
FILLER_FILE = "/filler.bin"  # optional incompressible bulk in layer 1 (bench)

# The entries layer 2 must contain for the image to test what it claims to.
LAYER2_WHITEOUTS = ("etc/.wh.deleted.txt", "data/.wh..wh..opq")


@dataclass(frozen=True)
class OciImage:
    """An image in an OCI layout directory, known by a tag in its index."""

    layout: Path
    tag: str

    @property
    def ref(self) -> str:
        """The skopeo/umoci transport reference."""
        return f"{self.layout}:{self.tag}"


class _Layer:
    """An uncompressed layer tar built in memory, root-owned, mtime 0."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.PAX_FORMAT)

    def _info(self, name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = kind, mode, 0
        info.uname = info.gname = "root"
        return info

    def dir(self, name: str, mode: int = 0o755) -> None:
        self._tar.addfile(self._info(name, tarfile.DIRTYPE, mode))

    def file(self, name: str, data: bytes = b"", mode: int = 0o644) -> None:
        info = self._info(name, tarfile.REGTYPE, mode)
        info.size = len(data)
        self._tar.addfile(info, io.BytesIO(data))

    def symlink(self, name: str, target: str) -> None:
        info = self._info(name, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self._tar.addfile(info)

    def write(self, path: Path) -> Path:
        self._tar.close()
        path.write_bytes(self._buf.getvalue())
        return path


def _busybox_applets(busybox: str) -> list[str]:
    out = run([busybox, "--list"]).stdout.split()
    return sorted(a for a in out if a not in ("busybox", "[", "[["))


def _base_layer(busybox: str, filler_bytes: int) -> _Layer:
    layer = _Layer()
    for d in ("bin", "dev", "etc", "proc", "root", "run", "sys", "data"):
        layer.dir(d)
    layer.dir("tmp", 0o1777)
    layer.file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    for applet in _busybox_applets(busybox):
        layer.symlink(f"bin/{applet}", "busybox")
    layer.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    layer.file("etc/group", b"root:x:0:\n")
    layer.file(DELETED_FILE.lstrip("/"), b"this file is whited out by layer 2\n")
    layer.file(KEPT_FILE.lstrip("/"), KEPT_TEXT.encode() + b"\n")
    for name in OPAQUE_OLD:
        layer.file(f"data/{name}", f"{name} from layer 1\n".encode())
    if filler_bytes:
        layer.file(FILLER_FILE.lstrip("/"), random.Random(0).randbytes(filler_bytes))
    return layer


def _whiteout_layer() -> _Layer:
    layer = _Layer()
    layer.dir("etc")
    layer.file("etc/.wh.deleted.txt")
    # Docker's order: the dir, its opaque marker, then the new children.
    layer.dir("data")
    layer.file("data/.wh..wh..opq")
    for name in OPAQUE_NEW:
        layer.file(f"data/{name}", f"{name} from layer 2\n".encode())
    return layer


def _top_layer() -> _Layer:
    layer = _Layer()
    layer.dir("etc")
    layer.file(LAYER3_FILE.lstrip("/"), LAYER3_TEXT.encode() + b"\n")
    return layer


def build_whiteout_image(workdir: Path, tag: str = "whiteout", filler_bytes: int = 0) -> OciImage:
    """Build the three-layer busybox image described by the constants above.

    ``filler_bytes`` adds that much incompressible data to layer 1, for
    benchmarks that want a pull to move more than busybox's 2 MB.
    """
    umoci = require_binary("umoci")
    busybox = require_binary("busybox")
    workdir.mkdir(parents=True, exist_ok=True)
    image = OciImage(workdir / "oci", tag)
    if not image.layout.exists():
        run([umoci, "init", "--layout", str(image.layout)])
    run([umoci, "new", "--image", image.ref])
    layers = [_base_layer(busybox, filler_bytes), _whiteout_layer(), _top_layer()]
    for n, layer in enumerate(layers, 1):
        tar = layer.write(workdir / f"layer{n}.tar")
        run([umoci, "raw", "add-layer", "--image", image.ref,
             "--history.created_by", f"crfs test layer {n}", str(tar)])
        tar.unlink()
    run([umoci, "config", "--image", image.ref, "--config.env", "PATH=/bin",
         "--config.cmd", "/bin/sh", "--config.workingdir", "/"])
    _check_layers(image)
    return image


def _blob(layout: Path, digest: str) -> bytes:
    algo, hexdigest = digest.split(":", 1)
    return (layout / "blobs" / algo / hexdigest).read_bytes()


def manifest(image: OciImage) -> dict:
    """The image manifest the index's ``tag`` points to."""
    index = json.loads((image.layout / "index.json").read_text())
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == image.tag:
            return json.loads(_blob(image.layout, desc["digest"]))
    raise HarnessError(f"tag {image.tag!r} not in {image.layout}/index.json")


def layer_members(image: OciImage) -> list[list[str]]:
    """Entry names of each layer tar, bottom layer first."""
    members = []
    for desc in manifest(image)["layers"]:
        data = _blob(image.layout, desc["digest"])
        if desc["mediaType"].endswith("+gzip"):
            data = gzip.decompress(data)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members.append([m.name for m in tar.getmembers()])
    return members


def _check_layers(image: OciImage) -> None:
    """Fail the build unless layer 2 really carries the whiteouts."""
    layers = layer_members(image)
    missing = [w for w in LAYER2_WHITEOUTS if len(layers) < 2 or w not in layers[1]]
    if len(layers) != 3 or missing:
        raise HarnessError(f"unexpected layers (missing whiteouts {missing}): {layers!r:.2000}")


def push(layout: Path, tag: str, registry_host: str, repo: str, dest_tag: Optional[str] = None) -> str:
    """Copy ``layout:tag`` to the plain-HTTP registry; returns the image ref."""
    skopeo = require_binary("skopeo")
    ref = f"{registry_host}/{repo}:{dest_tag or tag}"
    run([skopeo, "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
         f"oci:{layout}:{tag}", f"docker://{ref}"], timeout=300)
    return ref


def push_image(image: OciImage, registry_host: str, repo: str) -> str:
    """``push`` for an OciImage."""
    return push(image.layout, image.tag, registry_host, repo)


def names(members: Iterable[str]) -> set[str]:
    """Entry names without a leading ``./`` or trailing ``/``."""
    return {m.removeprefix("./").rstrip("/") for m in members}


OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def push_layers_manifest(repo, layers: Iterable[tuple[bytes, dict[str, str]]], tag: Optional[str] = None) -> str:
    """An image manifest of ``layers`` (blob, descriptor annotations; bottom
    first) and an empty-rootfs config, pushed with ``repo`` (a
    ``lazyfs.registry.Repository``) with their blobs; its digest. For tests
    that need a registry image of given layer blobs without building one."""
    import hashlib  # noqa: PLC0415

    def digest(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    descriptors = []
    for blob, notes in layers:
        repo.push_blob(blob, digest(blob))
        descriptors.append({"mediaType": OCI_LAYER_GZIP, "digest": digest(blob), "size": len(blob), "annotations": notes})
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    repo.push_blob(config, digest(config))
    manifest = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(config), "size": len(config)},
        "layers": descriptors,
    }
    return repo.push_manifest(json.dumps(manifest).encode(), OCI_MANIFEST, tag=tag)
