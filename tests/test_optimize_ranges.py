"""Prefetch ranges of optimized images: a conversion with a ranged profile
(OCI layout to layout), and ``crfs optimize`` of an image with a big file
of which the command reads only the first bytes: the layer descriptor
hints just the chunks read, and every range read lies in the hinted ones.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile

import pytest

from harness import images
from harness.registry import Registry
from lazyfs import mount
from lazyfs.layer_source import RemoteOptions
from lazyfs.convert import ConvertOptions, Converter, open_store
from lazyfs.ocilayout import OciLayout
from lazyfs.prefetch_hints import PREFETCH_RANGES_LABEL, STARGZ_PREFETCH_LABEL, parse_ranges, read_profile_lines
from lazyfs.registry import RegistryClient
from lazyfs.stargz import StargzReader
from lazyfs.stargz.source import BytesSource
from lazyfs.stargz.toc import Toc
from lazyfs.stargz.writer import build
from lazyfs_fs.helpers import force_unmount, kill

pytestmark = pytest.mark.e2e

FILLER = images.FILLER_FILE.lstrip("/")
FILLER_BYTES = 2 << 20
CHUNK = 64 << 10


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return images.build_whiteout_image(tmp_path_factory.mktemp("ranges-src"), filler_bytes=FILLER_BYTES)


def _covered(hinted: list[tuple[int, int]], off: int, length: int) -> bool:
    return any(h <= off and off + length <= h + n for h, n in hinted)


def _check_hints(toc: Toc, annotations: dict[str, str], ranges: dict[str, list[tuple[int, int]]]) -> list[tuple[int, int]]:
    """The hinted ranges: well-formed, inside the prioritized region, and
    holding every chunk of the ranges read."""
    assert int(annotations[STARGZ_PREFETCH_LABEL]) == toc.prefetch_size
    text = annotations[PREFETCH_RANGES_LABEL]
    assert len(text) < 4000
    hinted = parse_ranges(text)
    assert text == ",".join(f"{o}:{n}" for o, n in hinted)
    assert all(n > 0 for _, n in hinted) and all(a[0] + a[1] < b[0] for a, b in zip(hinted, hinted[1:]))
    assert hinted[-1][0] + hinted[-1][1] <= toc.prefetch_size
    for path, read in ranges.items():
        if path in toc:
            for off, length in read:
                for chunk in toc.chunks_for_range(path, off, length):
                    assert _covered(hinted, *chunk.compressed_range), (path, off, length)
    return hinted


def test_convert_hints_the_chunks_of_the_ranges_read(image, tmp_path):
    ranges = {FILLER: [(0, 100), (CHUNK * 10 + 5, 10)]}
    options = ConvertOptions(prioritized=(FILLER, "bin/busybox", "etc/kept.txt"), prioritized_ranges=ranges,
                             prioritized_chunk_size=CHUNK)
    with RegistryClient() as client:
        Converter(open_store(f"oci:{image.layout}:{image.tag}", client, False),
                  open_store(f"oci:{tmp_path}/out:esgz", client, True), options).run()
    out = OciLayout(tmp_path / "out")
    layers = out.resolve("esgz").layers
    base = layers[0]
    toc = StargzReader.open(BytesSource(out.read_blob(base.digest, max_size=1 << 30))).toc
    hinted = _check_hints(toc, base.annotations, ranges)
    filler = toc[FILLER].chunks
    assert len(filler) == FILLER_BYTES // CHUNK
    # of the filler, chunks 0 and 10 only; busybox and kept.txt whole
    for i, chunk in enumerate(filler):
        assert _covered(hinted, *chunk.compressed_range) == (i in (0, 10)), i
    for path in ("bin/busybox", "etc/kept.txt"):
        assert all(_covered(hinted, *c.compressed_range) for c in toc[path].chunks)
    assert sum(n for _, n in hinted) < toc.prefetch_size - FILLER_BYTES // 2
    # the other layers have nothing prioritized: no hints
    for desc in layers[1:]:
        assert STARGZ_PREFETCH_LABEL not in desc.annotations
        assert PREFETCH_RANGES_LABEL not in desc.annotations


def test_optimize_records_ranges_and_hints_their_chunks(image, tmp_path):
    with Registry(tmp_path / "registry") as registry:
        src = images.push_image(image, registry.host, "ranges/busybox")
        dst = f"{registry.host}/ranges/busybox:opt"
        profile_path = tmp_path / "profile.txt"
        command = ["sh", "-c", f"head -c 100 /{FILLER} | wc -c; cat {images.KEPT_FILE}"]
        proc = subprocess.run(["crfs", "optimize", src, dst, "--save-profile", str(profile_path), "--", *command],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        profile = read_profile_lines(profile_path.read_text(encoding="utf-8").splitlines())
        assert FILLER in profile.paths and "bin/busybox" in profile.paths and "etc/kept.txt" in profile.paths
        filler_read = profile.ranges[FILLER]
        assert filler_read[0][0] == 0 and sum(n for _, n in filler_read) < FILLER_BYTES // 2  # readahead, not all
        with RegistryClient() as client:
            resolved = client.resolve(dst)
            repo = client.repository(resolved.reference)
            base = resolved.manifest.layers[0]
            toc = StargzReader.open(BytesSource(repo.get_blob(base.digest))).toc
        hinted = _check_hints(toc, base.annotations, profile.ranges)
        assert sum(n for _, n in hinted) < toc.prefetch_size - FILLER_BYTES // 2
        assert len(toc[FILLER].chunks) == FILLER_BYTES // CHUNK  # prioritized: chunked finer
        print(json.dumps({"hinted": sum(n for _, n in hinted), "prioritized_region": toc.prefetch_size}))


def test_a_recording_mount_reports_the_ranges_read(tmp_path):
    size = 4 << 20
    tar = tmp_path / "layer.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in (("big", os.urandom(size)), ("small", b"x" * 5000), ("unread", b"y")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    blob = tmp_path / "layer.estargz"
    build(tar, blob, chunk_size=CHUNK)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pid = mount.start(str(blob), mnt, remote=RemoteOptions(record_access=True))
    try:
        with open(mnt / "small", "rb") as f:
            assert len(f.read()) == 5000
        fd = os.open(mnt / "big", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: just what is asked
            assert len(os.pread(fd, 100, 0)) == 100
            assert len(os.pread(fd, 100, 2 << 20)) == 100
            assert len(os.pread(fd, 100, size - 50)) == 50
        finally:
            os.close(fd)
        status = mount.status(mnt)
    finally:
        force_unmount(mnt)
        kill(pid)
    assert status["accessed"] == ["small", "big"]
    ranges = status["accessed_ranges"]
    assert ranges["small"] == [[0, 5000]]
    big = ranges["big"]
    assert [r for r in big if r[0] == 0] and [r for r in big if r[0] <= 2 << 20 < r[0] + r[1]]
    assert big[-1][0] + big[-1][1] == size  # clipped at the end of the file
    assert all(a[0] + a[1] < b[0] for a, b in zip(big, big[1:]))  # sorted, merged
    assert sum(n for _, n in big) < size // 4


def test_convert_cli_takes_a_ranged_profile_and_a_path_only_one(image, tmp_path):
    ranged = tmp_path / "ranged.profile"
    ranged.write_text(f"# a crfs optimize profile\n{FILLER}\n#ranges 0:100\nbin/busybox\n", encoding="utf-8")
    plain = tmp_path / "plain.txt"
    plain.write_text(f"{FILLER}\nbin/busybox\n", encoding="utf-8")
    tocs = {}
    for name, profile in (("ranged", ranged), ("plain", plain)):
        proc = subprocess.run(["crfs", "convert", f"oci:{image.layout}:{image.tag}", f"oci:{tmp_path}/{name}:esgz",
                               "--prioritize-file", str(profile)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        base = OciLayout(tmp_path / name).resolve("esgz").layers[0]
        toc = StargzReader.open(BytesSource(OciLayout(tmp_path / name).read_blob(base.digest, max_size=1 << 30))).toc
        tocs[name] = toc, parse_ranges(base.annotations[PREFETCH_RANGES_LABEL])
        assert int(base.annotations[STARGZ_PREFETCH_LABEL]) == toc.prefetch_size
    toc, hinted = tocs["ranged"]
    assert len(toc[FILLER].chunks) == FILLER_BYTES // CHUNK  # ranges given: chunked finer by default
    assert [c for c in toc[FILLER].chunks if _covered(hinted, *c.compressed_range)] == [toc[FILLER].chunks[0]]
    toc, hinted = tocs["plain"]
    assert len(toc[FILLER].chunks) == 1  # a path-only list: the layer's chunk size, whole files hinted
    assert hinted == [(0, toc.prefetch_size)] or sum(n for _, n in hinted) > FILLER_BYTES
    bad = tmp_path / "bad.profile"
    bad.write_text("#ranges 0:1\n", encoding="utf-8")
    proc = subprocess.run(["crfs", "convert", f"oci:{image.layout}:{image.tag}", f"oci:{tmp_path}/bad:esgz",
                           "--prioritize-file", str(bad)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "line 1" in proc.stderr, proc.stderr
