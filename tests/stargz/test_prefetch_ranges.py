"""Prefetch hints: recorded read ranges, the profile format, file ranges to
chunk (blob) ranges, merging and the annotation's size cap, the writer's
finer chunks for prioritized files, and a conversion's annotations."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from lazyfs.convert import LayerHints, _prefetch_annotations
from lazyfs.fs import add_range
from lazyfs.prefetch_hints import (
    MAX_ANNOTATION,
    PREFETCH_RANGES_LABEL,
    STARGZ_PREFETCH_LABEL,
    ProfileError,
    annotations,
    cap_ranges,
    file_blob_ranges,
    format_profile,
    format_ranges,
    layer_hints,
    merge_ranges,
    parse_ranges,
    read_profile_lines,
)
from lazyfs.stargz.reader import StargzReader
from lazyfs.stargz.source import FileSource
from lazyfs.stargz.toc import PREFETCH_LANDMARK
from lazyfs.stargz.writer import build

from .helpers import big_data

K = 1024
PRIO_CHUNK = 64 * K
BIG = 5 * PRIO_CHUNK + 1000  # 6 chunks when prioritized
TAIL = 300 * K  # a big file that is not prioritized: one chunk of 4 MiB


# --- recording ---------------------------------------------------------------------


def test_add_range_merges_overlapping_and_adjacent():
    ranges: list[list[int]] = []
    add_range(ranges, 100, 200)
    add_range(ranges, 300, 400)
    add_range(ranges, 0, 50)
    add_range(ranges, 10, 10)  # empty: ignored
    assert ranges == [[0, 50], [100, 200], [300, 400]]
    add_range(ranges, 200, 250)  # touches the second
    assert ranges == [[0, 50], [100, 250], [300, 400]]
    add_range(ranges, 40, 320)  # swallows and joins three
    assert ranges == [[0, 400]]
    add_range(ranges, 500, 600)
    add_range(ranges, 450, 460)
    assert ranges == [[0, 400], [450, 460], [500, 600]]


# --- the profile -------------------------------------------------------------------


AWKWARD = [
    "usr/bin/python3.11",
    "dir with spaces/file name.txt",
    "usr/share/zoneinfo/Amérique/Zürich ☃",
    "tab\tinside",
    " leading and trailing ",
    "#hash-first",
    "new\nline",
    "cr\rinside",
]


def test_profile_round_trip():
    ranges = {AWKWARD[0]: [(0, 4096), (8192, 65536)], AWKWARD[3]: [(5, 10)], AWKWARD[6]: [(0, 1)]}
    text = format_profile(AWKWARD, ranges, "a header\nof two lines")
    assert text.startswith("# a header\n# of two lines\n")
    # written and read back as a file, as --save-profile / --profile do
    back = read_profile_lines(io.StringIO(text, newline="\n"))
    assert back.paths == AWKWARD
    assert back.ranges == ranges
    # the lines an older reader takes as paths are still just the plain paths
    plain = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert plain == AWKWARD[:3]


def test_path_only_profile_is_still_a_profile():
    text = "# an old profile\nusr/bin/python3.11\n\n  etc/ld.so.cache  \n#comment\nlib/libc.so.6\n"
    profile = read_profile_lines(io.StringIO(text))
    assert profile.paths == ["usr/bin/python3.11", "etc/ld.so.cache", "lib/libc.so.6"]
    assert profile.ranges == {}


def test_profile_duplicates_union_or_whole():
    text = "a\n#ranges 0:10\nb\n#ranges 0:5\na\n#ranges 10:10,100:1\nb\nc\n#ranges\n"
    profile = read_profile_lines(io.StringIO(text))
    assert profile.paths == ["a", "b", "c"]
    # a: both listings' ranges, merged; b: once without ranges, so whole; c: nothing read
    assert profile.ranges == {"a": [(0, 20), (100, 1)], "c": []}


@pytest.mark.parametrize("text", ["#ranges 0:1\n", "a\n#ranges 0-1\n", "a\n#ranges x:1\n", 'a\n#path nope\n', "#path 3\n"])
def test_profile_errors_name_the_line(text):
    with pytest.raises(ProfileError, match="line"):
        read_profile_lines(io.StringIO(text))


def test_parse_and_format_ranges():
    assert parse_ranges(" 0:4096, 8192:65536 ") == [(0, 4096), (8192, 65536)]
    assert parse_ranges("") == []
    assert format_ranges([(0, 4096), (8192, 65536)]) == "0:4096,8192:65536"


# --- merging and the cap ---------------------------------------------------------------


def test_merge_ranges():
    assert merge_ranges([(100, 10), (0, 10), (5, 10), (110, 5), (200, 0)]) == [(0, 15), (100, 15)]
    assert merge_ranges([(0, 10), (4000, 10), (9000, 10)], gap=4096) == [(0, 4010), (9000, 10)]
    assert merge_ranges([(0, 10), (10 + 4096, 10)], gap=4096) == [(0, 10), (4106, 10)]  # a gap of exactly 4 KiB stays


def test_cap_merges_the_closest_ranges_until_it_fits():
    # 1000 ranges, the gaps growing: the text is ~20 kB
    ranges, off = [], 10_000_000_000
    for i in range(1000):
        ranges.append((off, 50_000))
        off += 50_000 + 5000 + i * 7
    assert len(format_ranges(ranges)) > MAX_ANNOTATION
    capped = cap_ranges(ranges)
    text = format_ranges(capped)
    assert len(text) < MAX_ANNOTATION
    assert len(capped) > 150  # not more merged than needed
    # still sorted, disjoint and covering every range
    assert all(a[0] + a[1] < b[0] for a, b in zip(capped, capped[1:]))
    for off, length in ranges:
        assert any(c[0] <= off and off + length <= c[0] + c[1] for c in capped)
    # the widest gaps (the last ones) survive; the narrowest went first
    assert capped[-1] == ranges[-1] and capped[0][1] > 50_000
    assert cap_ranges(ranges[:3]) == ranges[:3]


def test_annotations():
    assert annotations(None, [(0, 10)]) == {}
    out = annotations(50000, [(30000, 1000), (0, 100), (200, 100), (4396, 4)])
    # 4096 bytes apart stays apart, less is merged
    assert out == {STARGZ_PREFETCH_LABEL: "50000", PREFETCH_RANGES_LABEL: "0:300,4396:4,30000:1000"}
    assert annotations(5000, []) == {STARGZ_PREFETCH_LABEL: "5000"}


def test_hidden_paths_of_a_lower_layer_are_not_hinted():
    lower = LayerHints(1000, {"etc/ld.so.cache": [(0, 500)], "bin/sh": [(500, 300)]})
    upper = LayerHints(800, {"etc/ld.so.cache": [(0, 700)]})
    hints = [lower, None, upper]
    assert _prefetch_annotations(0, hints)[PREFETCH_RANGES_LABEL] == "500:300"
    assert _prefetch_annotations(1, hints) == {}
    assert _prefetch_annotations(2, hints)[PREFETCH_RANGES_LABEL] == "0:700"


# --- file ranges to chunks, on a real blob ----------------------------------------------


def _layer(path: Path) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        def add(name, data=None, kind=tarfile.REGTYPE, **attrs):
            info = tarfile.TarInfo(name)
            info.type = kind
            for k, v in attrs.items():
                setattr(info, k, v)
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
        add("usr", kind=tarfile.DIRTYPE, mode=0o755)
        add("usr/big", big_data(BIG, seed=3))
        add("usr/small", b"small file\n" * 10)
        add("usr/empty", b"")
        add("usr/link", kind=tarfile.LNKTYPE, linkname="usr/big")
        add("usr/sym", kind=tarfile.SYMTYPE, linkname="big")
        add("usr/tail", big_data(TAIL, seed=4))
    return path


@pytest.fixture(scope="module")
def blob(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hints")
    out = tmp / "layer.estargz"
    build(_layer(tmp / "layer.tar"), out, prioritized=["usr/small", "usr/link", "usr/empty", "usr/sym"],
          prioritized_chunk_size=PRIO_CHUNK)
    with FileSource(out) as source:
        reader = StargzReader.open(source)
        data = {name: reader.read(name) for name in ("usr/big", "usr/tail")}
        yield reader.toc, data


def test_prioritized_files_are_chunked_finer(blob):
    toc, data = blob
    big = toc["usr/big"]
    assert [c.file_offset for c in big.chunks] == [i * PRIO_CHUNK for i in range(6)]
    assert len(toc["usr/tail"].chunks) == 1  # after the landmark: the layer's 4 MiB chunks
    assert data["usr/big"] == big_data(BIG, seed=3) and data["usr/tail"] == big_data(TAIL, seed=4)
    names = [e.name for e in toc]
    assert names.index("usr/big") < names.index(PREFETCH_LANDMARK) < names.index("usr/tail")


def test_file_ranges_map_to_their_chunks(blob):
    toc, _ = blob
    chunks = toc["usr/big"].chunks
    ranges = [c.compressed_range for c in chunks]
    inside = file_blob_ranges(toc, "usr/big", [(PRIO_CHUNK + 10, 100)])
    assert inside == [ranges[1]]
    spanning = file_blob_ranges(toc, "usr/big", [(PRIO_CHUNK - 10, 20)])
    assert spanning == ranges[0:2]
    at_end = file_blob_ranges(toc, "usr/big", [(BIG - 10, 4096)])  # a read past EOF
    assert at_end == [ranges[5]]
    assert file_blob_ranges(toc, "usr/big", [(BIG + 10, 4096)]) == []
    assert file_blob_ranges(toc, "usr/big", None) == ranges  # no ranges: every chunk
    two = file_blob_ranges(toc, "usr/big", [(0, 1), (3 * PRIO_CHUNK, 1), (0, 2)])
    assert two == [ranges[0], ranges[3]]
    # a hardlink reads its target's chunks
    assert file_blob_ranges(toc, "/usr/link", [(PRIO_CHUNK + 10, 100)]) == [ranges[1]]
    assert file_blob_ranges(toc, "usr/empty", None) == []
    assert file_blob_ranges(toc, "usr/empty", [(0, 100)]) == []
    assert file_blob_ranges(toc, "usr/sym", None) == file_blob_ranges(toc, "usr", None) == []
    assert file_blob_ranges(toc, "no/such", None) == []
    # the chunk ranges tile the prioritized region, the landmark excluded
    assert ranges[-1][0] + ranges[-1][1] <= toc.prefetch_size


def test_layer_hints_and_annotations(blob):
    toc, _ = blob
    hints = layer_hints(toc, ["usr/small", "/usr/link", "usr/empty", "usr/sym", "usr/missing"], {"/usr/link": [(0, 100)]})
    big = toc["usr/big"].chunks
    assert hints == {
        "usr/small": [c.compressed_range for c in toc["usr/small"].chunks],
        "usr/link": [big[0].compressed_range],
        "usr/empty": [],
        "usr/sym": [],
    }
    out = annotations(toc.prefetch_size, [r for rs in hints.values() for r in rs])
    assert out[STARGZ_PREFETCH_LABEL] == str(toc.prefetch_size)
    hinted = parse_ranges(out[PREFETCH_RANGES_LABEL])
    assert sum(n for _, n in hinted) < toc.prefetch_size / 2  # one of six chunks of the big file, and the small one
    for off, n in [big[0].compressed_range, *(c.compressed_range for c in toc["usr/small"].chunks)]:
        assert any(h <= off and off + n <= h + m for h, m in hinted)
