"""Byte ranges: building ``Range`` headers and making sense of the answers.

A registry (or the storage it redirects to) may answer a ranged GET with a
206 for one range, a 206 ``multipart/byteranges`` for several (possibly
coalesced or reordered), or a 200 with the whole blob (Go's ServeContent
does that when the ranges add up to more than the blob). All three end as
*segments* (offset + bytes) from which each requested range is cut, so a
wrong Content-Range can never hand back the wrong bytes.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional, Sequence

from .errors import IncompleteBody, ProtocolError


class Segment(NamedTuple):
    start: int
    data: bytes


class ContentRange(NamedTuple):
    start: int
    end: int  # inclusive
    total: Optional[int]


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


def check_ranges(ranges: Sequence[tuple[int, int]]) -> None:
    if not ranges:
        raise ValueError("no ranges requested")
    for offset, length in ranges:
        if offset < 0 or length <= 0:
            raise ValueError(f"invalid range offset={offset} length={length}")


def range_header(ranges: Sequence[tuple[int, int]]) -> str:
    """``[(offset, length), ...]`` -> ``bytes=a-b,c-d``."""
    check_ranges(ranges)
    return "bytes=" + ",".join(f"{o}-{o + n - 1}" for o, n in ranges)


def parse_content_range(value: Optional[str]) -> ContentRange:
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        raise ProtocolError(f"206 with malformed Content-Range {value!r}")
    start, end = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if end < start or (total is not None and end >= total):
        raise ProtocolError(f"206 with impossible Content-Range {value!r}")
    return ContentRange(start, end, total)


def multipart_boundary(content_type: str) -> Optional[str]:
    """The boundary if ``content_type`` is multipart/byteranges, else None."""
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/byteranges":
        return None
    m = re.search(r'boundary\s*=\s*"?([^";]+)"?', params, re.IGNORECASE)
    if not m:
        raise ProtocolError("multipart/byteranges without boundary")
    return m.group(1).strip()


def parse_multipart(body: bytes, boundary: str) -> list[Segment]:
    """Split a multipart/byteranges body; each part's length comes from its
    Content-Range, so binary data that looks like a boundary is harmless."""
    delim = b"--" + boundary.encode()
    segments: list[Segment] = []
    pos = body.find(delim)
    while pos >= 0:
        pos += len(delim)
        if body[pos : pos + 2] == b"--":
            return segments
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            break
        headers = {}
        for line in body[pos:head_end].decode("latin-1").split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        cr = parse_content_range(headers.get("content-range"))
        start = head_end + 4
        data = body[start : start + cr.end - cr.start + 1]
        if len(data) != cr.end - cr.start + 1:
            break
        segments.append(Segment(cr.start, data))
        pos = body.find(delim, start + len(data))
    raise IncompleteBody(f"multipart/byteranges body cut short after {len(segments)} part(s)")


def extract(segments: Sequence[Segment], ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """Cut each requested ``(offset, length)`` out of the segments received."""
    out = []
    for offset, length in ranges:
        for seg in segments:
            if seg.start <= offset and offset + length <= seg.start + len(seg.data):
                out.append(seg.data[offset - seg.start : offset - seg.start + length])
                break
        else:
            got = ", ".join(f"{s.start}-{s.start + len(s.data) - 1}" for s in segments) or "nothing"
            raise ProtocolError(f"response does not cover requested bytes {offset}-{offset + length - 1} (got {got})")
    return out
