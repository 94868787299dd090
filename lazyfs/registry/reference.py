"""Image references: ``[host[:port]/]repo[:tag][@digest]``.

Follows the grammar of distribution/reference: the first path component is a
registry host only if it contains ``.`` or ``:`` or is ``localhost``;
otherwise the image is on Docker Hub, where one-component names live under
``library/``. Docker Hub's API is served from ``registry-1.docker.io``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from .digest import parse_digest
from .errors import InvalidReference

DOCKER_HUB = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}

_PATH_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_HOST = re.compile(
    r"^(?:localhost|\[[0-9a-fA-F:.]+\]|(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)"
    r"(?:\.(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?))*)(?::[0-9]+)?$"
)
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")


def normalize_host(host: str) -> str:
    """Lower-case host; Docker Hub's aliases become ``docker.io``."""
    host = host.lower()
    return DOCKER_HUB if host in _HUB_ALIASES else host


def api_host(registry: str) -> str:
    """The host that serves ``/v2/`` for a registry name."""
    return DOCKER_HUB_API_HOST if normalize_host(registry) == DOCKER_HUB else registry


@dataclass(frozen=True)
class Reference:
    """A parsed reference. ``registry`` is normalized (``docker.io`` for the Hub)."""

    registry: str
    repository: str
    tag: Optional[str] = None
    digest: Optional[str] = None

    @property
    def api_host(self) -> str:
        return api_host(self.registry)

    @property
    def object(self) -> str:
        """What a manifest request names: the digest if any, else the tag (default ``latest``)."""
        return self.digest or self.tag or "latest"

    def with_object(self, tag_or_digest: str) -> "Reference":
        """The same repository at another tag or digest."""
        if tag_or_digest.startswith(("sha256:", "sha512:")):
            return Reference(self.registry, self.repository, None, parse_digest(tag_or_digest))
        if not _TAG.match(tag_or_digest):
            raise InvalidReference(f"invalid tag {tag_or_digest!r}")
        return Reference(self.registry, self.repository, tag_or_digest, None)

    def __str__(self) -> str:
        s = f"{self.registry}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def parse_reference(text: str) -> Reference:
    """Parse ``text``; raise InvalidReference with the reason if it is not one."""
    original = text
    if not text or text != text.strip():
        raise InvalidReference(f"invalid reference {original!r}: empty or surrounded by spaces")
    if "://" in text:
        raise InvalidReference(f"invalid reference {original!r}: no URL scheme allowed")
    digest = None
    if "@" in text:
        text, digest = text.rsplit("@", 1)
        parse_digest(digest)
    tag = None
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG.match(tag):
            raise InvalidReference(f"invalid reference {original!r}: bad tag {tag!r}")
    first, sep, rest = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        if not _HOST.match(first):
            raise InvalidReference(f"invalid reference {original!r}: bad registry host {first!r}")
        registry, path = normalize_host(first), rest
    else:
        registry, path = DOCKER_HUB, text
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    components = path.split("/")
    if not path or not all(_PATH_COMPONENT.match(c) for c in components):
        raise InvalidReference(
            f"invalid reference {original!r}: repository {path!r} must be lower-case path components"
        )
    if len(path) > 255:
        raise InvalidReference(f"invalid reference {original!r}: repository name too long")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, path, tag, digest)
