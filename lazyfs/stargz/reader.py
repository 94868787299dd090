"""Opening a stargz / eStargz blob and reading its files, chunk by chunk.

Only the footer and the TOC are fetched up front; a file's bytes are fetched
when asked for, one chunk's compressed range at a time, and each chunk is
checked against its digest before any byte of it is returned.
"""

from __future__ import annotations

import hmac
import tarfile
from collections.abc import Iterable, Iterator

from .digest import digest_of, new_hasher, sha256_digest
from .errors import (
    ChunkDigestMismatch,
    CorruptChunk,
    InvalidToc,
    TocDigestMismatch,
    TocTooLarge,
    UnverifiableLayer,
)
from .footer import Footer, read_footer
from .gzipmember import inflate
from .limits import Limits
from .source import BlobSource, read_exactly
from .toc import TOC_TAR_NAME, ChunkRef, EntryType, Toc, TocEntry

_TAR_BLOCK = 512
_MORE = 1 << 20  # further reads when a chunk's first read was not enough


def read_toc_json(source: BlobSource, footer: Footer, limits: Limits = Limits()) -> tuple[bytes, tarfile.TarInfo]:
    """The TOC JSON bytes (what ``toc.digest`` covers) and the tar header they
    are stored under, fetched in one read and decompressed within the limits."""
    start, end = footer.toc_offset, source.size - footer.size
    if end - start > limits.max_toc_size + _MORE:
        raise TocTooLarge(f"compressed TOC is {end - start} bytes; the limit is {limits.max_toc_size}")
    compressed = read_exactly(source, start, end - start)
    try:
        header = b"".join(inflate([compressed], 0, _TAR_BLOCK))
        member = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    except (CorruptChunk, tarfile.HeaderError) as exc:
        raise InvalidToc(f"no TOC tar header at offset {start}: {exc}") from None
    if member.name != TOC_TAR_NAME or not member.isreg():
        raise InvalidToc(f"TOC tar member is {member.name!r}, expected {TOC_TAR_NAME!r}")
    if member.size > limits.max_toc_size:
        raise TocTooLarge(f"TOC JSON is {member.size} bytes; the limit is {limits.max_toc_size}")
    try:
        return b"".join(inflate([compressed], _TAR_BLOCK, member.size)), member
    except CorruptChunk as exc:
        raise InvalidToc(f"TOC JSON cannot be decompressed: {exc}") from None


def decode_chunk(chunk: ChunkRef, compressed: Iterable[bytes]) -> bytes:
    """A chunk's bytes from (a prefix of) its compressed range, verified.

    Callers that fetch ``chunk.compressed_range`` themselves (an HTTP range,
    a cache) use this; ``StargzReader.read_chunk`` fetches and calls it.
    """
    data = b"".join(inflate(compressed, chunk.inner_offset, chunk.size))
    if chunk.digest is not None:
        hasher = new_hasher(chunk.digest)
        hasher.update(data)
        actual = digest_of(hasher)
        if not hmac.compare_digest(actual, chunk.digest):
            raise ChunkDigestMismatch(
                f"chunk at blob offset {chunk.blob_offset} is {actual}, the TOC says {chunk.digest}"
            )
    return data


class StargzReader:
    """A validated stargz / eStargz blob over any ``BlobSource``."""

    def __init__(self, source: BlobSource, footer: Footer, toc: Toc, toc_json: bytes, toc_member: tarfile.TarInfo) -> None:
        self.source = source
        self.footer = footer
        self.toc = toc
        self.toc_json: bytes | None = toc_json  # None after ``release_toc_json``
        self.toc_member = toc_member  # the tar header of stargz.index.json

    @classmethod
    def open(
        cls,
        source: BlobSource,
        *,
        toc_digest: str | None = None,
        require_verified: bool = False,
        limits: Limits = Limits(),
    ) -> StargzReader:
        """Fetch the footer and TOC, check the TOC against ``toc_digest``.

        With a ``toc_digest`` (or ``require_verified``), every chunk must have
        a digest, so that nothing served later goes unchecked; legacy stargz
        then is refused. Without one, chunks that have a digest are still
        checked, and a legacy layer must be verified whole
        (``verify.verify_layer_digest``) once fetched.
        """
        footer = read_footer(source)
        toc_json, member = read_toc_json(source, footer, limits)
        digest = sha256_digest(toc_json)
        if toc_digest is not None and not hmac.compare_digest(digest, toc_digest):
            raise TocDigestMismatch(f"TOC is {digest}, expected {toc_digest}")
        toc = Toc.parse(toc_json, digest=digest, payload_size=footer.toc_offset, legacy=footer.legacy, limits=limits)
        if require_verified and toc_digest is None:
            raise UnverifiableLayer("verified layers only, and no TOC digest was given")
        if (require_verified or toc_digest is not None) and not toc.verifiable:
            kind = "legacy stargz" if footer.legacy else "eStargz"
            raise UnverifiableLayer(f"{kind} layer has chunks without chunkDigest")
        return cls(source, footer, toc, toc_json, member)

    def release_toc_json(self) -> None:
        """Forget the raw TOC JSON (``toc_json`` becomes None): a mount only
        needs the parsed ``toc``, and the JSON is megabytes for a big layer."""
        self.toc_json = None

    def read_chunk(self, chunk: ChunkRef) -> bytes:
        """Fetch, decompress and verify one chunk."""
        return decode_chunk(chunk, self._compressed(chunk))

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes ``[offset, offset+length)`` of a regular file (to EOF if length is None)."""
        entry = self._regular(path)
        if length is None:
            length = max(0, entry.size - offset)
        parts = []
        end = min(offset + length, entry.size)
        for chunk in self.toc.chunks_for_range(path, offset, length):
            data = self.read_chunk(chunk)
            lo = max(offset - chunk.file_offset, 0)
            hi = min(end - chunk.file_offset, chunk.size)
            parts.append(data[lo:hi] if (lo, hi) != (0, chunk.size) else data)
        return b"".join(parts)

    def iter_file(self, path: str) -> Iterator[bytes]:
        """A whole regular file, one verified chunk at a time."""
        for chunk in self._regular(path).chunks:
            yield self.read_chunk(chunk)

    def _regular(self, path: str) -> TocEntry:
        entry = self.toc.resolve(self.toc[path])
        if entry.type is not EntryType.REG:
            raise IsADirectoryError(path) if entry.type is EntryType.DIR else ValueError(f"{path!r} is a {entry.type}")
        return entry

    def _compressed(self, chunk: ChunkRef) -> Iterator[bytes]:
        """The chunk's compressed range, lazily: first as much as a chunk of
        its size can take compressed, then more only if the stream needs it."""
        offset, remaining = chunk.compressed_range
        step = min(remaining, chunk.inner_offset + chunk.size + chunk.size // 1000 + 4096)
        while remaining > 0:
            yield read_exactly(self.source, offset, step)
            offset += step
            remaining -= step
            step = min(remaining, _MORE)
