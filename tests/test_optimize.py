"""``crfs optimize``: the python image (plain gzip, from the local registry)
profiled with a real command on a real lazy mount, and written as eStargz
with exactly the files that command read prioritized; a saved profile
gives the same image without running anything.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from harness import images
from harness.pyimage import python_image
from harness.registry import Registry
from lazyfs.prefetch_hints import PREFETCH_RANGES_LABEL, STARGZ_PREFETCH_LABEL, parse_ranges, read_profile_lines
from lazyfs.registry import RegistryClient
from lazyfs.stargz import StargzReader
from lazyfs.stargz.source import BytesSource
from lazyfs.stargz.toc import PREFETCH_LANDMARK

pytestmark = pytest.mark.e2e

COMMAND = ["python3", "-c", 'import json; print(json.dumps({"optimized": True}))']


def _crfs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["crfs", *args], capture_output=True, text=True, timeout=600)


def _prioritized(registry: Registry, ref: str, ranges: dict | None = None) -> list[list[str]]:
    """Per layer, the entries before the prefetch landmark; with the ranges
    read (of a profile), checks the layer descriptors' prefetch hints."""
    out = []
    with RegistryClient() as client:
        resolved = client.resolve(ref)
        repo = client.repository(resolved.reference)
        for layer in resolved.manifest.layers:
            toc = StargzReader.open(BytesSource(repo.get_blob(layer.digest))).toc
            names = [e.name for e in toc]
            out.append(names[: names.index(PREFETCH_LANDMARK)] if PREFETCH_LANDMARK in names else [])
            if ranges is not None:
                _check_hints(toc, layer.annotations, ranges)
    return out


def _check_hints(toc, annotations: dict[str, str], ranges: dict) -> None:
    """Both prefetch annotations where something is prioritized, none
    elsewhere; the hinted ranges hold the chunks of every range read of
    the files this layer serves (a copy a higher layer hides aside), and
    are less than the whole prioritized region where files were read in part."""
    if toc.prefetch_size is None:
        assert STARGZ_PREFETCH_LABEL not in annotations and PREFETCH_RANGES_LABEL not in annotations
        return
    assert int(annotations[STARGZ_PREFETCH_LABEL]) == toc.prefetch_size
    text = annotations.get(PREFETCH_RANGES_LABEL)
    if text is None:
        return  # only directories or hidden copies prioritized here
    assert len(text) < 4000
    hinted = parse_ranges(text)
    assert all(a[0] + a[1] < b[0] for a, b in zip(hinted, hinted[1:])) and hinted[-1][0] + hinted[-1][1] <= toc.prefetch_size
    for path, read in ranges.items():
        if path == "etc/ld.so.cache" or toc.get(path) is None:
            continue
        for off, length in read:
            for chunk in toc.chunks_for_range(path, off, length):
                o, n = chunk.compressed_range
                assert any(h <= o and o + n <= h + m for h, m in hinted), (path, off, length)
    total = sum(n for _, n in hinted)
    print(f"prefetch hints: {total} bytes in {len(hinted)} ranges; prioritized region {toc.prefetch_size} bytes")
    if "usr/bin/python3.11" in toc:
        assert total < toc.prefetch_size  # the interpreter is mapped, read in part


def test_optimize_prioritizes_what_the_command_reads(tmp_path: Path) -> None:
    with Registry(tmp_path / "registry") as registry:
        src = images.push_image(python_image(), registry.host, "opt/python")
        dst = f"{registry.host}/opt/python:esgz-opt"
        profile = tmp_path / "profile.txt"
        proc = _crfs("optimize", src, dst, "--save-profile", str(profile), "--", *COMMAND)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        paths = [line for line in profile.read_text().splitlines() if not line.startswith("#")]
        assert result["prioritized"] == len(paths) > 20
        assert "usr/bin/python3.11" in paths and "usr/lib/python3.11/json/__pycache__/__init__.cpython-311.pyc" in paths
        assert not any(p.startswith("usr/share/doc/") for p in paths)  # only what was read
        # started as runc starts it: the user database read, no shell or env of the image's
        assert "etc/passwd" in paths and "etc/group" in paths
        assert not {"usr/bin/env", "usr/bin/dash", "bin/sh"} & set(paths), paths
        recorded = read_profile_lines(profile.read_text(encoding="utf-8").splitlines())
        assert recorded.paths == paths and "usr/bin/python3.11" in recorded.ranges
        first = _prioritized(registry, dst, recorded.ranges)
        assert len(first) == 3
        # every recorded file is prioritized in each layer that holds it
        # (a file a later layer replaced, such as etc/ld.so.cache, in both)
        assert {n for layer in first for n in layer if n in paths} == set(paths)
        python_layer = first[1]
        assert python_layer.index("usr/bin/python3.11") < python_layer.index("usr/lib/python3.11/json/__pycache__/__init__.cpython-311.pyc")

        again = _crfs("optimize", src, f"{registry.host}/opt/python:from-profile", "--profile", str(profile))
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["digest"] == result["digest"]  # same input, same image


def test_optimize_reports_a_failing_command_and_needs_one(tmp_path: Path) -> None:
    with Registry(tmp_path / "registry") as registry:
        src = images.push_image(images.build_whiteout_image(tmp_path / "image"), registry.host, "opt/busybox")
        bad = _crfs("optimize", src, f"{registry.host}/opt/busybox:x", "--", "sh", "-c", "cat /etc/kept.txt; exit 3")
        assert bad.returncode == 1 and "failed (exit 3)" in bad.stderr, bad.stderr
        none = _crfs("optimize", src, f"{registry.host}/opt/busybox:y")
        assert none.returncode == 1 and "give a command" in none.stderr
        extra = _crfs("convert", src, f"{registry.host}/opt/busybox:z", "--", "sh")
        assert extra.returncode == 2 and "unexpected arguments after --" in extra.stderr
