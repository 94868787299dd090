"""An OCI image layout directory (``oci:DIR:TAG``) as a source and a
destination of images, for ``crfs convert``.

Layout (image-spec ``image-layout.md``): ``oci-layout``, ``index.json``
(tags are the ``org.opencontainers.image.ref.name`` annotation of its
entries), ``blobs/<alg>/<hex>``. Digests are validated before they become
paths, blobs are written to a temporary file, verified and renamed, so a
failed or interrupted write never leaves a blob under a digest it does not
have, and ``index.json`` is replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterable, Optional

from .registry.digest import parse_digest
from .registry.errors import InvalidReference, NotFound
from .registry.manifest import Descriptor, Manifest

REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_FILE = {"imageLayoutVersion": "1.0.0"}
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
_COPY_CHUNK = 1 << 20


class LayoutError(Exception):
    """The directory is not a usable OCI image layout; the message says why."""


def parse_oci_ref(text: str) -> tuple[Path, str]:
    """``oci:DIR[:TAG]`` → (DIR, TAG); TAG defaults to ``latest``."""
    if not text.startswith("oci:"):
        raise InvalidReference(f"{text!r} is not an OCI layout reference (oci:DIR[:TAG])")
    rest = text[len("oci:"):]
    path, sep, tag = rest.rpartition(":")
    if not sep or "/" in tag:
        path, tag = rest, "latest"
    if not path:
        raise InvalidReference(f"{text!r}: missing directory")
    return Path(path), tag


class OciLayout:
    """Blobs and tagged manifests in one layout directory."""

    def __init__(self, root: Path, create: bool = False) -> None:
        self.root = Path(root)
        marker = self.root / "oci-layout"
        if not marker.exists():
            if not create:
                raise LayoutError(f"{self.root} is not an OCI image layout (no oci-layout file)")
            (self.root / "blobs").mkdir(parents=True, exist_ok=True)
            self._write_atomic(marker, json.dumps(LAYOUT_FILE).encode())
            self._write_atomic(self.root / "index.json", json.dumps(self._empty_index()).encode())

    @staticmethod
    def _empty_index() -> dict:
        return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}

    # -- blobs ---------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        algorithm, hexpart = parse_digest(digest).split(":", 1)
        return self.root / "blobs" / algorithm / hexpart

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def open_blob(self, digest: str) -> BinaryIO:
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise NotFound(f"blob {digest} not in layout {self.root}") from None

    def read_blob(self, digest: str, max_size: int = 64 << 20) -> bytes:
        """A small blob (manifest, config), verified against its digest."""
        with self.open_blob(digest) as f:
            data = f.read(max_size + 1)
        if len(data) > max_size:
            raise LayoutError(f"blob {digest} in {self.root} is larger than {max_size} bytes")
        algorithm = digest.split(":", 1)[0]
        if f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}" != digest:
            raise LayoutError(f"blob {digest} in {self.root} does not match its digest")
        return data

    def write_blob(self, source: BinaryIO | bytes, expected: Optional[str] = None) -> tuple[str, int]:
        """Stores content (a stream or bytes); returns (sha256 digest, size).

        With ``expected``, content that hashes otherwise is refused.
        """
        hasher = hashlib.sha256()
        size = 0
        tmp_dir = self.root / "blobs"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=tmp_dir)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in _chunks(source):
                    hasher.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = "sha256:" + hasher.hexdigest()
            if expected is not None and expected != digest:
                raise LayoutError(f"content for {expected} hashes to {digest}")
            final = self.blob_path(digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest, size

    # -- manifests and tags --------------------------------------------------

    def _index(self) -> dict:
        try:
            data = json.loads((self.root / "index.json").read_text())
        except (OSError, ValueError) as exc:
            raise LayoutError(f"{self.root}/index.json unreadable: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("manifests", []), list):
            raise LayoutError(f"{self.root}/index.json is not an image index")
        return data

    def resolve(self, tag: str) -> Manifest:
        """The manifest (or index) tagged ``tag``."""
        entries = [Descriptor.from_json(d) for d in self._index().get("manifests", [])]
        for desc in entries:
            if desc.annotations.get(REF_NAME) == tag:
                return Manifest.parse(self.read_blob(desc.digest), desc.digest, desc.media_type)
        known = sorted({d.annotations.get(REF_NAME, "") for d in entries} - {""})
        raise NotFound(f"tag {tag!r} not in layout {self.root} (tags: {', '.join(known) or 'none'})")

    def put_manifest(self, raw: bytes, media_type: str, tag: str) -> Descriptor:
        """Stores a manifest and points ``tag`` at it (replacing the old entry)."""
        digest, size = self.write_blob(raw)
        desc = Descriptor(media_type=media_type, digest=digest, size=size, annotations={REF_NAME: tag})
        index = self._index()
        index["manifests"] = [d for d in index.get("manifests", []) if (d.get("annotations") or {}).get(REF_NAME) != tag]
        index["manifests"].append(desc.to_json())
        self._write_atomic(self.root / "index.json", json.dumps(index, indent=2).encode())
        return desc

    def _write_atomic(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _chunks(source: BinaryIO | bytes) -> Iterable[bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield bytes(source)
        return
    while chunk := source.read(_COPY_CHUNK):
        yield chunk
