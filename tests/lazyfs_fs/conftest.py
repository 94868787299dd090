"""Fixtures for the FUSE filesystem tests: the same layer as a tar, as eStargz
written by crfs and by the Go reference, and as legacy stargz."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lazyfs.stargz.writer import BuildResult, build
from stargz.helpers import CHUNK, build_go_helper, run_go, to_legacy, write_layer_tar


@pytest.fixture(scope="session")
def layer_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_layer_tar(tmp_path_factory.mktemp("layer") / "layer.tar")


@pytest.fixture(scope="session")
def crfs_blob(layer_tar: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BuildResult]:
    out = tmp_path_factory.mktemp("crfs-blob") / "layer.esgz"
    return out, build(layer_tar, out, chunk_size=CHUNK)


@pytest.fixture(scope="session")
def go_blob(layer_tar: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(path, TOC digest) of the layer built by the Go reference; no Go fails, never skips."""
    helper = tmp_path_factory.mktemp("gohelper") / "gohelper"
    try:
        build_go_helper(helper)
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    out = tmp_path_factory.mktemp("go-blob") / "go.esgz"
    proc = run_go(helper, "build", layer_tar, out, "--chunk-size", str(CHUNK), "--prioritize", "etc/hosts")
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout)["tocDigest"]


@pytest.fixture(scope="session")
def legacy_blob(crfs_blob: tuple[Path, BuildResult]) -> Path:
    out = crfs_blob[0].with_name("layer.stargz")
    out.write_bytes(to_legacy(crfs_blob[0].read_bytes()))
    return out


@pytest.fixture(scope="session")
def extracted(layer_tar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .helpers import extract_tar

    return extract_tar(layer_tar, tmp_path_factory.mktemp("extracted"))
