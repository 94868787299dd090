"""OCI image layout directories: read what umoci wrote, write what skopeo reads."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from harness import build_whiteout_image
from lazyfs.ocilayout import LayoutError, OciLayout, parse_oci_ref
from lazyfs.registry.errors import InvalidReference, NotFound


@pytest.fixture(scope="module")
def umoci_image(tmp_path_factory):
    return build_whiteout_image(tmp_path_factory.mktemp("layout"))


def test_parse_oci_ref():
    assert parse_oci_ref("oci:/a/b:v1") == (Path("/a/b"), "v1")
    assert parse_oci_ref("oci:/a/b") == (Path("/a/b"), "latest")
    assert parse_oci_ref("oci:rel/dir:tag") == (Path("rel/dir"), "tag")
    for bad in ("docker://x", "oci:", "oci::tag"):
        with pytest.raises(InvalidReference):
            parse_oci_ref(bad)


def test_reads_an_umoci_layout(umoci_image):
    layout = OciLayout(umoci_image.layout)
    manifest = layout.resolve(umoci_image.tag)
    assert not manifest.is_index
    assert len(manifest.layers) == 3
    config = json.loads(layout.read_blob(manifest.config.digest))
    assert len(config["rootfs"]["diff_ids"]) == 3
    with pytest.raises(NotFound, match=f"tags: {umoci_image.tag}"):
        layout.resolve("no-such-tag")


def test_written_layout_is_read_by_skopeo(umoci_image, tmp_path):
    src = OciLayout(umoci_image.layout)
    manifest = src.resolve(umoci_image.tag)
    dst = OciLayout(tmp_path / "out", create=True)
    for desc in [manifest.config, *manifest.layers]:
        with src.open_blob(desc.digest) as f:
            assert dst.write_blob(f, expected=desc.digest) == (desc.digest, desc.size)
    dst.put_manifest(manifest.raw, manifest.media_type, "copied")
    dst.put_manifest(manifest.raw, manifest.media_type, "copied")  # re-tagging replaces
    assert len(json.loads((tmp_path / "out/index.json").read_text())["manifests"]) == 1
    out = subprocess.run(["skopeo", "inspect", f"oci:{tmp_path}/out:copied"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert [layer for layer in json.loads(out.stdout)["Layers"]] == [d.digest for d in manifest.layers]


def test_bad_input_is_refused_and_leaves_nothing(tmp_path):
    layout = OciLayout(tmp_path / "l", create=True)
    for bad in ("sha256:../../../etc/passwd", "sha256:" + "A" * 64, "md5:" + "0" * 32, "sha256:abc"):
        with pytest.raises(InvalidReference):
            layout.blob_path(bad)
    with pytest.raises(LayoutError, match="hashes to"):
        layout.write_blob(b"content", expected="sha256:" + "0" * 64)
    blobs = tmp_path / "l" / "blobs"
    assert [p for p in blobs.rglob("*") if p.is_file()] == []  # no temp file, no blob
    digest, _ = layout.write_blob(b"content")
    layout.blob_path(digest).write_bytes(b"tampered")
    with pytest.raises(LayoutError, match="does not match"):
        layout.read_blob(digest)
    with pytest.raises(LayoutError, match="not an OCI image layout"):
        OciLayout(tmp_path / "empty")
