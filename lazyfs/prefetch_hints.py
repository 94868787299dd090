"""Access profiles and the prefetch hints computed from them.

A profile (``crfs optimize --save-profile``, ``crfs convert
--prioritize-file``) is UTF-8 text: the files to prioritize, one path per
line, in order; blank lines and lines starting with ``#`` are skipped, so
a path-only profile (the older format) is still one. Two kinds of ``#``
lines carry more, and older readers skip them:

``#ranges OFF:LEN,OFF:LEN,...``
    the byte ranges (decimal) of the file named on the line just before
    that were read; without one, the whole file counts as read.
``#path "JSON string"``
    a path a plain line cannot carry: one with a control character (tab,
    newline...), leading or trailing whitespace, or a leading ``#``; a
    ``#ranges`` line may follow it too.

A converted layer's descriptor then says what a mount should prefetch:
``containerd.io/snapshot/crfs/prefetch-ranges`` lists the blob ranges
(``OFFSET:LENGTH`` decimal pairs, comma-separated, sorted, disjoint) of the
chunks holding the bytes read (all chunks of a file the profile gives no
ranges for), ranges less than ``MERGE_GAP`` apart merged, and kept under
``MAX_ANNOTATION`` bytes by merging the closest ones; and
``containerd.io/snapshot/remote/stargz.prefetch`` is the size of the
prioritized region (where the landmark starts), as the stargz-snapshotter
reads it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .stargz.toc import EntryType, Toc

log = logging.getLogger(__name__)

# The layer annotations (Prepare labels once containerd passes them on): a
# mount fetches these bytes while it reads the TOC (``RemoteLayer.open``);
# the crfs one wins when both are there.
PREFETCH_RANGES_LABEL = "containerd.io/snapshot/crfs/prefetch-ranges"
STARGZ_PREFETCH_LABEL = "containerd.io/snapshot/remote/stargz.prefetch"
PRIORITIZED_CHUNK_SIZE = 64 << 10  # crfs optimize's chunks of prioritized files: ~2 % worse compression than 4 MiB
MERGE_GAP = 4096  # blob ranges closer than this are fetched as one
MAX_ANNOTATION = 4000  # bytes: containerd's label values stop at 4096

_RANGES = "#ranges"
_PATH = "#path"

Range = tuple[int, int]  # (offset, length)


class ProfileError(ValueError):
    """A profile line cannot be understood; the message gives its number."""


@dataclass
class Profile:
    """Paths in order, and for some of them the ``(offset, length)`` ranges read."""

    paths: list[str] = field(default_factory=list)
    ranges: dict[str, list[Range]] = field(default_factory=dict)


def read_profile_lines(lines: Iterable[str]) -> Profile:
    """A profile from its lines; a path listed twice keeps its first place,
    its ranges are the union (the whole file if one listing has none)."""
    listed: list[tuple[str, list[Range] | None]] = []
    last: int | None = None  # the listing a #ranges line would belong to
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if line == _RANGES or line.startswith(_RANGES + " "):
            if last is None:
                raise ProfileError(f"line {number}: {_RANGES} does not follow a path")
            try:
                listed[last] = (listed[last][0], parse_ranges(line[len(_RANGES) :]))
            except ValueError as exc:
                raise ProfileError(f"line {number}: {exc}") from None
            last = None
            continue
        if line.startswith(_PATH + " "):
            try:
                path = json.loads(line[len(_PATH) + 1 :])
            except ValueError as exc:
                raise ProfileError(f"line {number}: {_PATH} is not followed by a JSON string: {exc}") from None
            if not isinstance(path, str) or not path:
                raise ProfileError(f"line {number}: {_PATH} is not followed by a JSON string")
        elif line.startswith("#") or not line.strip():
            continue
        else:
            path = line.strip()
        listed.append((path, None))
        last = len(listed) - 1
    profile = Profile()
    whole: set[str] = set()
    collected: dict[str, list[Range]] = {}
    for path, ranges in listed:
        if path not in collected and path not in whole:
            profile.paths.append(path)
        if ranges is None:
            whole.add(path)
        else:
            collected.setdefault(path, []).extend(ranges)
    profile.ranges = {p: merge_ranges(r) for p, r in collected.items() if p not in whole}
    return profile


def format_profile(paths: Sequence[str], ranges: Mapping[str, Sequence[Range]], header: str = "") -> str:
    """The text of a profile (``header`` as ``#`` comment lines first)."""
    out = [f"# {line}\n" for line in header.splitlines()]
    for path in paths:
        if path and path == path.strip() and not path.startswith("#") and path.isprintable():
            out.append(path + "\n")
        else:
            out.append(f"{_PATH} {json.dumps(path)}\n")
        if ranges.get(path):
            out.append(f"{_RANGES} {format_ranges(ranges[path])}\n")
    return "".join(out)


def parse_ranges(text: str) -> list[Range]:
    """``OFF:LEN,OFF:LEN`` (decimal) as pairs; "" is none."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        off, sep, length = item.partition(":")
        if not sep or not (off + length).isascii() or not off.isdigit() or not length.isdigit():
            raise ValueError(f"{item!r} is not OFFSET:LENGTH")
        pairs.append((int(off), int(length)))
    return pairs


def format_ranges(ranges: Iterable[Range]) -> str:
    return ",".join(f"{off}:{length}" for off, length in ranges)


def merge_ranges(ranges: Iterable[Range], gap: int = 0) -> list[Range]:
    """Sorted, disjoint ranges covering the given ones; ranges less than
    ``gap`` bytes apart (touching ones always) become one; empty ones go."""
    merged: list[list[int]] = []
    for off, length in sorted(r for r in ranges if r[1] > 0):
        if merged and off - merged[-1][1] < max(gap, 1):
            merged[-1][1] = max(merged[-1][1], off + length)
        else:
            merged.append([off, off + length])
    return [(start, end - start) for start, end in merged]


def cap_ranges(ranges: Sequence[Range], limit: int = MAX_ANNOTATION) -> list[Range]:
    """Sorted disjoint ``ranges`` with the closest ones merged until their
    text (``format_ranges``) is shorter than ``limit`` bytes."""
    ranges = list(ranges)
    if len(format_ranges(ranges)) < limit:
        return ranges
    gaps = sorted({b[0] - (a[0] + a[1]) for a, b in zip(ranges, ranges[1:])})
    # the smallest gap threshold whose merging fits: merging more never grows the text
    lo, hi = 0, len(gaps) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if len(format_ranges(merge_ranges(ranges, gaps[mid] + 1))) < limit:
            hi = mid
        else:
            lo = mid + 1
    return merge_ranges(ranges, gaps[lo] + 1) if gaps else ranges


def file_blob_ranges(toc: Toc, path: str, ranges: Sequence[Range] | None) -> list[Range]:
    """The blob ranges of the chunks of ``path`` (a hardlink: its target)
    holding the given file ranges, or all its chunks when ``ranges`` is
    None; none for a path the TOC lacks or that is not a regular file."""
    entry = toc.get(path)
    if entry is None:
        return []
    entry = toc.resolve(entry)
    if entry.type is not EntryType.REG:
        return []
    if ranges is None:
        chunks = entry.chunks
    else:
        seen = {}
        for off, length in ranges:
            for chunk in toc.chunks_for_range(entry.name, off, length):
                seen[chunk.blob_offset] = chunk
        chunks = tuple(seen.values())
    return [chunk.compressed_range for chunk in chunks]


def layer_hints(toc: Toc, paths: Iterable[str], ranges: Mapping[str, Sequence[Range]]) -> dict[str, list[Range]]:
    """Per prioritized path present in the layer (clean name), the blob
    ranges to prefetch for it (empty for a directory or symlink)."""
    found: dict[str, list[Range]] = {}
    for path in paths:
        entry = toc.get(path)
        if entry is None or entry.name in found:
            continue
        found[entry.name] = file_blob_ranges(toc, path, ranges.get(path))
    return found


def annotations(prefetch_size: int | None, blob_ranges: Iterable[Range]) -> dict[str, str]:
    """The layer descriptor annotations for a prefetch region of
    ``prefetch_size`` bytes (None: nothing prioritized, no annotations)."""
    if prefetch_size is None:
        return {}
    out = {STARGZ_PREFETCH_LABEL: str(prefetch_size)}
    merged = cap_ranges(merge_ranges(blob_ranges, MERGE_GAP))
    if merged:
        out[PREFETCH_RANGES_LABEL] = format_ranges(merged)
    return out


# --- reading a label back ------------------------------------------------------

# a hint asking for more than this is ignored (it is a hint, not a download)
MAX_HINT_BYTES = 256 << 20
MAX_HINT_RANGES = 1024  # containerd caps a label at 4 KiB anyway


class BadPrefetchRanges(ValueError):
    """A prefetch-ranges label that does not parse or makes no sense."""


def parse_prefetch_ranges(
    spec: str, *, blob_size: int | None = None, limit: int = MAX_HINT_BYTES,
) -> list[tuple[int, int]]:
    """``"OFFSET:LENGTH,..."`` as [(offset, length)]: decimal digits only,
    lengths > 0, sorted and non-overlapping, at most ``limit`` bytes in all
    and (``blob_size`` given) within the blob; anything else is
    ``BadPrefetchRanges``."""
    if not spec or len(spec) > MAX_HINT_RANGES * 42:
        raise BadPrefetchRanges("empty" if not spec else "too long")
    parts = spec.split(",")
    if len(parts) > MAX_HINT_RANGES:
        raise BadPrefetchRanges(f"{len(parts)} ranges (at most {MAX_HINT_RANGES})")
    ranges: list[tuple[int, int]] = []
    end = total = 0
    for part in parts:
        offset, sep, length = part.partition(":")
        if not (sep and offset.isascii() and offset.isdigit() and length.isascii() and length.isdigit()):
            raise BadPrefetchRanges(f"{part!r} is not OFFSET:LENGTH")
        off, n = int(offset), int(length)
        if n == 0:
            raise BadPrefetchRanges(f"{part!r}: empty range")
        if ranges and off < end:
            raise BadPrefetchRanges(f"{part!r} overlaps or precedes the range before it")
        end, total = off + n, total + n
        if total > limit:
            raise BadPrefetchRanges(f"more than {limit} bytes in all")
        if blob_size is not None and end > blob_size:
            raise BadPrefetchRanges(f"{part!r} ends beyond the {blob_size}-byte blob")
        ranges.append((off, n))
    return ranges


def prefetch_hint(labels: Mapping[str, str]) -> str | None:
    """The ``--prefetch-ranges`` spec for a layer with these labels (or
    descriptor annotations), checked; None without a usable one."""
    ranges = prefetch_hint_ranges(labels)
    return format_ranges(ranges) if ranges is not None else None


def prefetch_hint_ranges(labels: Mapping[str, str]) -> list[Range] | None:
    """The blob ranges these labels (or descriptor annotations) say to
    prefetch; None without a usable label. A bad label is logged and ignored
    (the stargz one is then used, if good): a hint never fails a mount."""
    spec = labels.get(PREFETCH_RANGES_LABEL)
    if spec is not None:
        try:
            return parse_prefetch_ranges(spec)
        except BadPrefetchRanges as exc:
            log.warning("ignoring label %s: %s", PREFETCH_RANGES_LABEL, exc)
    size = labels.get(STARGZ_PREFETCH_LABEL)
    if size is not None:
        try:
            return parse_prefetch_ranges(f"0:{size.strip()}")
        except BadPrefetchRanges as exc:
            log.warning("ignoring label %s=%r: %s", STARGZ_PREFETCH_LABEL, size[:40], exc)
    return None
