"""Gzip members: the unit of compression in stargz.

Every chunk of file data starts a new gzip member, so that it can be
decompressed starting at its own offset. We write members by hand (raw
deflate between a fixed header and trailer) so that the output does not
depend on the clock or the host OS, and inflate with a bound on output so
that a hostile blob cannot make us allocate more than we asked for.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator

from .errors import CorruptChunk

GZIP_MAGIC = b"\x1f\x8b\x08"
OS_UNKNOWN = 255  # what Go's compress/gzip writes; zlib would write 3 (Unix)
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # gzip framing, header parsed by zlib
_PIECE = 1 << 20  # output bound per inflate call


def gzip_member(data: bytes, level: int) -> bytes:
    """One gzip member holding ``data``: mtime 0, no name, OS 255."""
    deflater = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    xfl = 2 if level == 9 else 4 if level == 1 else 0  # RFC 1952 "extra flags"
    return b"".join(
        (
            struct.pack("<3sBIBB", GZIP_MAGIC, 0, 0, xfl, OS_UNKNOWN),
            deflater.compress(data),
            deflater.flush(),
            struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF),
        )
    )


def inflate(pieces: Iterable[bytes], skip: int, length: int) -> Iterator[bytes]:
    """Yield ``length`` bytes of the gzip stream in ``pieces`` after ``skip`` bytes.

    The stream may span several members (a reader of a whole-layer gzip
    would read them as one stream). Stops as soon as enough bytes came out,
    never producing more than 1 MiB per step; raises ``CorruptChunk`` if the
    bytes are not gzip or end too early.
    """
    want = skip + length
    done = 0
    inflater = zlib.decompressobj(_GZIP_WBITS)
    try:
        for data in pieces:
            while data and done < want:
                out = inflater.decompress(data, min(want - done, _PIECE))
                if inflater.eof:
                    data = inflater.unused_data
                    inflater = zlib.decompressobj(_GZIP_WBITS)
                else:
                    data = inflater.unconsumed_tail
                if not out:
                    continue
                start = max(0, skip - done)
                done += len(out)
                if start < len(out):
                    yield out[start:] if start else out
            if done >= want:
                return
    except zlib.error as exc:
        raise CorruptChunk(f"not a valid gzip stream after {done} bytes: {exc}") from None
    raise CorruptChunk(f"gzip stream ends after {done} of {want} bytes")
