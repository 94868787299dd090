"""Fixtures for the stargz format tests (helpers live in helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lazyfs.stargz.writer import BuildResult, build

from .helpers import CHUNK, build_go_helper, write_layer_tar


@pytest.fixture(scope="session")
def layer_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_layer_tar(tmp_path_factory.mktemp("layer") / "layer.tar")


@pytest.fixture(scope="session")
def go_helper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go reference helper, built once per session; no Go means failure, not skip."""
    out = tmp_path_factory.mktemp("gohelper") / "gohelper"
    try:
        build_go_helper(out)
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    return out


@pytest.fixture(scope="session")
def crfs_blob(layer_tar: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BuildResult]:
    """(path, BuildResult) of the test layer converted by crfs."""
    out = tmp_path_factory.mktemp("crfs-blob") / "layer.esgz"
    return out, build(layer_tar, out, chunk_size=CHUNK)
