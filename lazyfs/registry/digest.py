"""Content digests (``algorithm:hex``): parsing and incremental verification.

Only sha256 and sha512 are accepted: they are what OCI registries speak,
and refusing anything else means a digest we "verified" really was checked.
"""

from __future__ import annotations

import hashlib
import re

from .errors import DigestMismatch, InvalidReference

_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"^(sha256|sha512):([a-f0-9]+)$")


def parse_digest(digest: str) -> str:
    """Return ``digest`` unchanged if well formed, else raise InvalidReference."""
    m = _DIGEST_RE.fullmatch(digest)  # not .match: "$" would let a trailing newline through
    if not m or len(m.group(2)) != _HEX_LENGTH[m.group(1)]:
        raise InvalidReference(f"invalid digest {digest!r}: expected sha256:<64 hex> or sha512:<128 hex>")
    return digest


def is_digest(text: str) -> bool:
    try:
        parse_digest(text)
    except InvalidReference:
        return False
    return True


def compute_digest(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


class Verifier:
    """Hashes content as it streams past and checks it against ``digest``
    (and ``size`` when known) at the end."""

    def __init__(self, digest: str, size: int | None = None) -> None:
        self.digest = parse_digest(digest)
        self.size = size
        self._hash = hashlib.new(digest.split(":", 1)[0])
        self.count = 0

    def update(self, data: bytes) -> None:
        self._hash.update(data)
        self.count += len(data)

    @property
    def actual(self) -> str:
        return f"{self.digest.split(':', 1)[0]}:{self._hash.hexdigest()}"

    def verify(self, *, host: str | None = None, repo: str | None = None) -> None:
        """Raise DigestMismatch unless what streamed past is the expected content."""
        if self.size is not None and self.count != self.size:
            raise DigestMismatch(
                f"expected {self.size} bytes, got {self.count}", host=host, repo=repo, target=self.digest
            )
        if self.actual != self.digest:
            raise DigestMismatch(f"content hashes to {self.actual}", host=host, repo=repo, target=self.digest)


def verify_bytes(data: bytes, digest: str, *, host: str | None = None, repo: str | None = None) -> None:
    """DigestMismatch unless ``data`` hashes to ``digest``."""
    v = Verifier(digest)
    v.update(data)
    v.verify(host=host, repo=repo)
