"""Manifest media types, descriptors, and platform selection in indexes.

Docker and OCI name the same things differently; the client accepts both
and always asks for all four manifest types (docker-registry 2.8 answers 404
to an OCI-pushed manifest when only Docker types are accepted).
"""

from __future__ import annotations

import json
import platform as _platform
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .digest import parse_digest
from .errors import NotFound, ProtocolError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
IMAGE_MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST])


@dataclass(frozen=True)
class Platform:
    """``os/architecture[/variant]``, normalized like containerd does."""

    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> "Platform":
        """``linux/arm64``, ``linux/arm/v7``."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"invalid platform {text!r}: expected os/arch[/variant]")
        return cls(*parts).normalized()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Platform":
        return cls(data.get("os", ""), data.get("architecture", ""), data.get("variant", "")).normalized()

    def normalized(self) -> "Platform":
        arch, variant = _ARCH_ALIASES.get(self.architecture.lower(), (self.architecture.lower(), None))
        variant = (variant if variant is not None and not self.variant else self.variant).lower()
        if arch == "arm64" and variant == "v8":
            variant = ""  # linux/arm64 and linux/arm64/v8 are the same platform
        if arch == "arm" and not variant:
            variant = "v7"
        return Platform(self.os.lower(), arch, variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


_ARCH_ALIASES = {
    "x86_64": ("amd64", ""),
    "x86-64": ("amd64", ""),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", ""),
    "arm64": ("arm64", None),
    "armhf": ("arm", "v7"),
    "armv7l": ("arm", "v7"),
    "armel": ("arm", "v6"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", ""),
    "i686": ("386", ""),
    "x86": ("386", ""),
}


def host_platform() -> Platform:
    """The platform of this machine (Linux is assumed for containers)."""
    return Platform("linux", _platform.machine() or "amd64").normalized()


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    platform: Optional[Platform] = None
    annotations: Mapping[str, str] = field(default_factory=dict)
    urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Descriptor":
        try:
            digest = parse_digest(data["digest"])
            size = int(data["size"])
            media_type = str(data.get("mediaType", ""))
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"malformed descriptor {json.dumps(data)[:200]}: {e}") from None
        plat = data.get("platform")
        return cls(
            media_type=media_type,
            digest=digest,
            size=size,
            platform=Platform.from_json(plat) if isinstance(plat, Mapping) else None,
            annotations=dict(data.get("annotations") or {}),
            urls=tuple(data.get("urls") or ()),
        )

    def to_json(self) -> dict[str, Any]:
        """The descriptor as manifests and indexes write it."""
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform is not None:
            p = {"architecture": self.platform.architecture, "os": self.platform.os}
            if self.platform.variant:
                p["variant"] = self.platform.variant
            out["platform"] = p
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.urls:
            out["urls"] = list(self.urls)
        return out


@dataclass(frozen=True)
class Manifest:
    """A manifest or index exactly as the registry served it (``raw`` is
    what the digest covers), plus its parsed JSON."""

    raw: bytes
    media_type: str
    digest: str
    data: Mapping[str, Any]

    @classmethod
    def parse(cls, raw: bytes, digest: str, content_type: str = "") -> "Manifest":
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise ProtocolError(f"manifest is not JSON: {e}", target=digest) from None
        if not isinstance(data, dict):
            raise ProtocolError("manifest is not a JSON object", target=digest)
        return cls(raw, _media_type(data, content_type), digest, data)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def manifests(self) -> list[Descriptor]:
        return [Descriptor.from_json(d) for d in self.data.get("manifests") or []]

    @property
    def config(self) -> Descriptor:
        if "config" not in self.data:
            raise ProtocolError("manifest has no config", target=self.digest)
        return Descriptor.from_json(self.data["config"])

    @property
    def layers(self) -> list[Descriptor]:
        return [Descriptor.from_json(d) for d in self.data.get("layers") or []]


def _media_type(data: Mapping[str, Any], content_type: str) -> str:
    """The body's own mediaType wins; then the Content-Type; then the shape."""
    declared = data.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    content_type = content_type.split(";", 1)[0].strip()
    if content_type in INDEX_TYPES or content_type in IMAGE_MANIFEST_TYPES:
        return content_type
    if "manifests" in data:
        return OCI_INDEX
    if "layers" in data:
        return OCI_MANIFEST
    return content_type or "application/octet-stream"


def select_platform(index: Manifest, wanted: Platform) -> Descriptor:
    """The index entry for ``wanted``: exact os/arch/variant first; a wanted
    platform without variant takes the first entry of that os/arch.

    Raises NotFound listing what the index does offer.
    """
    wanted = wanted.normalized()
    candidates = [d for d in index.manifests if d.platform is not None]
    for d in candidates:
        if d.platform == wanted:
            return d
    if not wanted.variant:
        for d in candidates:
            p = d.platform
            assert p is not None
            if (p.os, p.architecture) == (wanted.os, wanted.architecture):
                return d
    offered = ", ".join(str(d.platform) for d in candidates) or "none"
    raise NotFound(f"no manifest for platform {wanted} in index (offers: {offered})", target=index.digest)
