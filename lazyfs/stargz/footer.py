"""The footer: an empty gzip member at the very end that says where the TOC is.

eStargz (51 bytes) stores ``"%016xSTARGZ"`` as an RFC 1952 extra subfield
with ID ``SG``; legacy CRFS stargz (47 bytes) stores the same 22 bytes as the
whole extra field. Either way the blob stays a valid tar.gz, and the footer
is the first thing a lazy reader fetches.
"""

from __future__ import annotations

import string
import struct
import zlib
from dataclasses import dataclass

from .errors import InvalidFooter
from .gzipmember import GZIP_MAGIC, OS_UNKNOWN
from .source import BlobSource, read_exactly

FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
_MAGIC = b"STARGZ"
_SUBFIELD_ID = b"SG"
_FEXTRA = 0x04
# An empty final stored deflate block, then CRC-32 and ISIZE of nothing.
_EMPTY_DEFLATE_AND_TRAILER = b"\x01\x00\x00\xff\xff" + b"\x00" * 8


@dataclass(frozen=True)
class Footer:
    """Where the TOC's gzip member starts, and which flavour of stargz this is."""

    toc_offset: int
    size: int  # 51 for eStargz, 47 for legacy stargz

    @property
    def legacy(self) -> bool:
        return self.size == LEGACY_FOOTER_SIZE


def encode_footer(toc_offset: int, legacy: bool = False) -> bytes:
    """The footer bytes for a TOC at ``toc_offset`` (legacy: CRFS's 47-byte form)."""
    field = b"%016x" % toc_offset + _MAGIC
    if not legacy:
        field = _SUBFIELD_ID + struct.pack("<H", len(field)) + field
    header = struct.pack("<3sBIBBH", GZIP_MAGIC, _FEXTRA, 0, 0, OS_UNKNOWN, len(field))
    return header + field + _EMPTY_DEFLATE_AND_TRAILER


def parse_footer(tail: bytes) -> Footer:
    """Parse the last bytes of a blob (at least 47; 51 or more to detect eStargz).

    Tries eStargz first, then legacy stargz, like the reference reader.
    """
    errors = []
    for size in (FOOTER_SIZE, LEGACY_FOOTER_SIZE):
        if len(tail) < size:
            errors.append(f"{size}-byte footer: blob is only {len(tail)} bytes")
            continue
        try:
            return Footer(_parse(tail[-size:], legacy=size == LEGACY_FOOTER_SIZE), size)
        except InvalidFooter as exc:
            errors.append(f"{size}-byte footer: {exc}")
    raise InvalidFooter("not a stargz/eStargz blob: " + "; ".join(errors))


def read_footer(source: BlobSource) -> Footer:
    """Fetch and parse the footer of ``source``, checking the TOC offset fits."""
    tail_size = min(source.size, FOOTER_SIZE)
    footer = parse_footer(read_exactly(source, source.size - tail_size, tail_size))
    if footer.toc_offset >= source.size - footer.size:
        raise InvalidFooter(
            f"TOC offset {footer.toc_offset} is not before the footer "
            f"of a {source.size}-byte blob"
        )
    return footer


def _parse(footer: bytes, legacy: bool) -> int:
    magic, flags, _mtime, _xfl, _os, xlen = struct.unpack_from("<3sBIBBH", footer)
    if magic != GZIP_MAGIC:
        raise InvalidFooter("no gzip header")
    if flags != _FEXTRA:
        raise InvalidFooter(f"gzip flags {flags:#x}, want only FEXTRA")
    extra = footer[12 : 12 + xlen]
    if legacy:
        field = extra
    else:
        if extra[:2] != _SUBFIELD_ID:
            raise InvalidFooter(f"extra subfield ID {extra[:2]!r}, want b'SG'")
        (sublen,) = struct.unpack_from("<H", extra, 2)
        if sublen != 16 + len(_MAGIC):
            raise InvalidFooter(f"subfield length {sublen}, want 22")
        field = extra[4:]
    if xlen != len(footer) - 12 - len(_EMPTY_DEFLATE_AND_TRAILER) or len(field) != 22:
        raise InvalidFooter(f"extra field length {xlen} does not fit the footer")
    if field[16:] != _MAGIC:
        raise InvalidFooter("no STARGZ magic")
    hex_offset = field[:16].decode("latin-1")
    if not all(c in string.hexdigits for c in hex_offset):
        raise InvalidFooter(f"TOC offset {hex_offset!r} is not hexadecimal")
    _check_empty_member(footer)
    return int(hex_offset, 16)


def _check_empty_member(footer: bytes) -> None:
    """The footer must be a complete gzip member that decompresses to nothing."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(footer, 1)
    except zlib.error as exc:
        raise InvalidFooter(f"corrupt gzip member: {exc}") from None
    if out or not inflater.eof or inflater.unused_data:
        raise InvalidFooter("footer is not an empty gzip member")
