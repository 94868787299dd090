"""OCI content digests (``algorithm:hex``) as the TOC and annotations write them."""

from __future__ import annotations

import hashlib
import re

_ALGORITHMS = {"sha256": 64, "sha384": 96, "sha512": 128}
_DIGEST_RE = re.compile(r"^([a-z0-9]+):([a-f0-9]+)$")


def is_digest(value: str) -> bool:
    """Whether ``value`` is a digest we can check (sha256/384/512, lowercase hex)."""
    m = _DIGEST_RE.match(value)
    return bool(m) and _ALGORITHMS.get(m.group(1)) == len(m.group(2))


def new_hasher(digest: str) -> "hashlib._Hash":
    """A fresh hash object of the algorithm ``digest`` uses."""
    return hashlib.new(digest.split(":", 1)[0])


def digest_of(hasher: "hashlib._Hash") -> str:
    return f"{hasher.name}:{hasher.hexdigest()}"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
