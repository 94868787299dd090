"""Checking a whole layer: every chunk, every file, or the blob as one.

``StargzReader`` already checks each chunk it serves; these are for when a
layer must be checked completely: ``crfs stargz verify``, and legacy stargz
layers, which have no chunk digests and can only be trusted once the whole
blob has been fetched and matches the layer digest.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from .digest import digest_of, is_digest, new_hasher
from .errors import FileDigestMismatch, LayerDigestMismatch, UnverifiableLayer
from .reader import StargzReader
from .source import BlobSource, read_exactly
from .toc import EntryType

_PIECE = 4 << 20


@dataclass(frozen=True)
class VerifyReport:
    files: int
    chunks: int
    bytes: int  # uncompressed file bytes checked


def verify_contents(reader: StargzReader, *, require_chunk_digests: bool = True) -> VerifyReport:
    """Decompress every chunk (checked against its digest by the reader) and
    check each file against its whole-file digest where the TOC has one.

    With ``require_chunk_digests`` a chunk without a digest is an error:
    that is a legacy layer, to be checked with ``verify_layer_digest``.
    """
    files = chunks = total = 0
    for entry in reader.toc:
        if entry.type is not EntryType.REG:
            continue
        files += 1
        hasher = new_hasher(entry.digest) if entry.digest else None
        for chunk in entry.chunks:
            if chunk.digest is None and require_chunk_digests:
                raise UnverifiableLayer(f"{entry.name!r}: chunk at {chunk.file_offset} has no digest")
            data = reader.read_chunk(chunk)
            if hasher is not None:
                hasher.update(data)
            chunks += 1
            total += len(data)
        if hasher is not None and not hmac.compare_digest(digest_of(hasher), entry.digest or ""):
            raise FileDigestMismatch(f"{entry.name!r} is {digest_of(hasher)}, the TOC says {entry.digest}")
    return VerifyReport(files, chunks, total)


def layer_digest(source: BlobSource, algorithm: str = "sha256") -> str:
    """The digest of the whole blob, read in bounded pieces."""
    hasher = new_hasher(algorithm + ":")
    for offset in range(0, source.size, _PIECE):
        hasher.update(read_exactly(source, offset, min(_PIECE, source.size - offset)))
    return digest_of(hasher)


def verify_layer_digest(source: BlobSource, expected: str) -> None:
    """Check the whole blob against the layer (descriptor) digest."""
    if not is_digest(expected):
        raise ValueError(f"not a digest: {expected!r}")
    actual = layer_digest(source, expected.split(":", 1)[0])
    if not hmac.compare_digest(actual, expected):
        raise LayerDigestMismatch(f"blob is {actual}, expected {expected}")
