"""Every way a stargz / eStargz blob (or a layer given to the writer) can be bad.

Callers decide by type: a ``FormatError`` means the blob is not what it
claims and retrying will not help; a ``VerificationError`` means bytes did
not match a digest we were told to trust (a registry or cache served wrong
data, or the layer was tampered with); a ``LimitExceeded`` means the blob may
be valid but asks for more than this process was configured to allow.
"""

from __future__ import annotations


class StargzError(Exception):
    """Base of every error raised by lazyfs.stargz."""


# --- the blob is not a well-formed stargz / eStargz --------------------------


class FormatError(StargzError):
    """The blob does not follow the stargz / eStargz format."""


class InvalidFooter(FormatError):
    """Missing, truncated or corrupt footer (the last 51 or 47 bytes)."""


class InvalidToc(FormatError):
    """The table of contents cannot be found, decompressed or parsed."""


class InvalidEntry(InvalidToc):
    """One TOC entry is malformed or contradicts the others."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"TOC entry {name!r}: {reason}")
        self.name = name
        self.reason = reason


class UnsafePath(InvalidEntry):
    """A name that could escape the layer root: absolute, ``..``, NUL."""


class DuplicateEntry(InvalidEntry):
    """Two entries with the same (normalized) name."""


class MissingLinkTarget(InvalidEntry):
    """A hardlink whose target is not in the layer (or is a directory)."""


class OffsetOutOfRange(InvalidEntry):
    """A chunk that points outside the blob's payload."""


class SizeMismatch(InvalidEntry):
    """Chunk offsets and sizes that do not add up to the file's size."""


class CorruptChunk(FormatError):
    """A chunk's compressed bytes do not decompress to its declared size."""


class BlobReadError(StargzError):
    """The blob source returned fewer bytes than the blob's size promises."""


# --- the blob does not match what we were told to trust ---------------------


class VerificationError(StargzError):
    """Content does not match a digest."""


class TocDigestMismatch(VerificationError):
    """The TOC JSON does not match the layer's ``toc.digest`` annotation."""


class ChunkDigestMismatch(VerificationError):
    """A decompressed chunk does not match its ``chunkDigest``."""


class FileDigestMismatch(VerificationError):
    """A whole file does not match its ``digest``."""


class LayerDigestMismatch(VerificationError):
    """The whole blob does not match the layer digest."""


class UnverifiableLayer(VerificationError):
    """Verification was required but the layer cannot be verified chunk by
    chunk (legacy stargz, a chunk without digest, or no TOC digest given)."""


# --- configured limits ------------------------------------------------------


class LimitExceeded(StargzError):
    """The blob asks for more memory than the configured limits allow."""


class TocTooLarge(LimitExceeded):
    """The TOC (compressed or as JSON) is larger than ``Limits.max_toc_size``."""


class ChunkTooLarge(LimitExceeded):
    """A chunk is larger than ``Limits.max_chunk_size``."""


# --- the writer's input ------------------------------------------------------


class WriterError(StargzError):
    """The input layer cannot be converted to eStargz."""


class InvalidInputTar(WriterError):
    """The input is not a readable tar (or tar.gz)."""


class UnsupportedEntry(WriterError):
    """A tar entry eStargz cannot represent (sparse file, unknown type, a
    name that is not UTF-8, an unsafe path)."""


class PrioritizedFileNotFound(WriterError):
    """A prioritized file (or the target of a prioritized hardlink) is not in the input."""
