"""``crfs convert``: every layer becomes verifiable eStargz, and the result is
still an ordinary image that skopeo and containerd's own snapshotter use."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from harness import build_whiteout_image, containerd_stack, push_image
from harness.flow import OVERLAYFS, pull, remove_image, run_sh
from lazyfs.convert import (
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
    ConvertError,
    ConvertOptions,
    Converter,
    open_store,
)
from lazyfs.ocilayout import OciLayout
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.errors import DigestMismatch, NotFound
from lazyfs.registry.manifest import OCI_INDEX, Platform
from lazyfs.stargz.reader import StargzReader
from lazyfs.stargz.source import BytesSource
from lazyfs.stargz.verify import verify_contents


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return build_whiteout_image(tmp_path_factory.mktemp("convert-src"))


def convert(src: str, dst: str, **options) -> str:
    with RegistryClient() as client:
        return Converter(open_store(src, client, False), open_store(dst, client, True), ConvertOptions(**options)).run()


def check_estargz_image(layout: OciLayout, tag: str) -> list[StargzReader]:
    manifest = layout.resolve(tag)
    config = json.loads(layout.read_blob(manifest.config.digest))
    readers = []
    for desc, diff_id in zip(manifest.layers, config["rootfs"]["diff_ids"], strict=True):
        blob = layout.read_blob(desc.digest, max_size=1 << 30)
        reader = StargzReader.open(BytesSource(blob), toc_digest=desc.annotations[TOC_DIGEST_ANNOTATION])
        verify_contents(reader)
        uncompressed = gzip.decompress(blob)
        assert diff_id == "sha256:" + hashlib.sha256(uncompressed).hexdigest()
        assert int(desc.annotations[UNCOMPRESSED_SIZE_ANNOTATION]) == len(uncompressed)
        readers.append(reader)
    return readers


def test_layout_to_layout(image, tmp_path):
    digest = convert(f"oci:{image.layout}:{image.tag}", f"oci:{tmp_path}/out:esgz", chunk_size=4096, prioritized=("bin/busybox",))
    out = OciLayout(tmp_path / "out")
    assert out.resolve("esgz").digest == digest
    readers = check_estargz_image(out, "esgz")
    names = [{e.name for e in r.toc} for r in readers]
    assert "etc/.wh.deleted.txt" in names[1] and "data/.wh..wh..opq" in names[1]
    order = [e.name for e in readers[0].toc]
    assert order.index("bin/busybox") < order.index(".prefetch.landmark")
    assert ".no.prefetch.landmark" in names[2]  # nothing prioritized there
    res = subprocess.run(["skopeo", "inspect", f"oci:{tmp_path}/out:esgz"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_registry_to_registry_runs_with_containerds_own_snapshotter(image):
    with containerd_stack(with_crfs=False) as stack:
        src = push_image(image, stack.registry.host, "convert/src")
        dst = f"{stack.registry.host}/convert/dst:esgz"
        convert(src, dst)
        out = subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{dst}"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        pull(stack.containerd, dst, OVERLAYFS)
        result = run_sh(stack.containerd, dst, OVERLAYFS, "converted", "ls -A /data; test -e /etc/deleted.txt || echo deleted-gone")
        assert result.stdout.split() == ["new1", "deleted-gone"]
        remove_image(stack.containerd, dst)


def _two_platform_index(image, root: Path) -> None:
    layout = OciLayout(image.layout)
    manifest = layout.resolve(image.tag)
    entries = [
        {"mediaType": manifest.media_type, "digest": manifest.digest, "size": len(manifest.raw), "platform": {"os": "linux", "architecture": arch}}
        for arch in ("amd64", "arm64")
    ]
    raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    layout.put_manifest(raw, OCI_INDEX, "multi")


def test_index_per_platform_and_one_chosen(image, tmp_path):
    _two_platform_index(image, tmp_path)
    convert(f"oci:{image.layout}:multi", f"oci:{tmp_path}/all:multi")
    out = OciLayout(tmp_path / "all")
    index = out.resolve("multi")
    assert index.is_index and [str(d.platform) for d in index.manifests] == ["linux/amd64", "linux/arm64"]
    for desc in index.manifests:
        child = json.loads(out.read_blob(desc.digest))
        assert all(TOC_DIGEST_ANNOTATION in layer["annotations"] for layer in child["layers"])
    convert(f"oci:{image.layout}:multi", f"oci:{tmp_path}/one:arm", platform=Platform.parse("linux/arm64"))
    assert not OciLayout(tmp_path / "one").resolve("arm").is_index


def test_bad_sources_fail_clearly_and_leave_the_tag_alone(image, tmp_path):
    with pytest.raises(NotFound, match="no-such-tag"):
        convert(f"oci:{image.layout}:no-such-tag", f"oci:{tmp_path}/x:t")
    with pytest.raises(ConvertError, match="prioritized files in no layer.*no/such/file"):
        convert(f"oci:{image.layout}:{image.tag}", f"oci:{tmp_path}/p:t", prioritized=("bin/busybox", "no/such/file"))
    with pytest.raises(NotFound):
        OciLayout(tmp_path / "p").resolve("t")
    # a corrupted layer blob is caught by its digest; DST gets no tag
    bad = tmp_path / "bad"
    subprocess.run(["cp", "-a", str(image.layout), str(bad)], check=True)
    layout = OciLayout(bad)
    layer = layout.resolve(image.tag).layers[-1]
    path = layout.blob_path(layer.digest)
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(DigestMismatch):
        convert(f"oci:{bad}:{image.tag}", f"oci:{tmp_path}/y:t")
    with pytest.raises(NotFound):
        OciLayout(tmp_path / "y").resolve("t")
    # a layer type the writer cannot read
    manifest = json.loads(layout.read_blob(layout.resolve(image.tag).digest))
    manifest["layers"][0]["mediaType"] = "application/vnd.oci.image.layer.v1.tar+zstd"
    raw = json.dumps(manifest).encode()
    layout.put_manifest(raw, manifest.get("mediaType", "application/vnd.oci.image.manifest.v1+json"), "zstd")
    with pytest.raises(ConvertError, match="cannot be converted"):
        convert(f"oci:{bad}:zstd", f"oci:{tmp_path}/z:t")


def test_cli(image, tmp_path):
    listing = tmp_path / "profile.txt"
    listing.write_text("# files the workload reads\nbin/busybox\n")
    res = subprocess.run(
        ["crfs", "convert", f"oci:{image.layout}:{image.tag}", f"oci:{tmp_path}/cli:esgz", "--prioritize-file", str(listing), "--chunk-size", "65536"],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["digest"] == OciLayout(tmp_path / "cli").resolve("esgz").digest
    assert res.stderr == ""  # no progress display when stderr is not a terminal
    check_estargz_image(OciLayout(tmp_path / "cli"), "esgz")
    bad = subprocess.run(["crfs", "convert", f"oci:{tmp_path}/nowhere:x", f"oci:{tmp_path}/o:x"], capture_output=True, text=True)
    assert bad.returncode == 1 and "not an OCI image layout" in bad.stderr


def test_terminal_progress_draws_one_line_per_layer():
    import io

    from lazyfs.cli import TerminalProgress
    from lazyfs.convert import LayerProgress

    out = io.StringIO()
    progress = TerminalProgress(out, interval=0)
    a, b = LayerProgress("sha256:" + "a" * 64, read=1 << 20), LayerProgress("sha256:" + "b" * 64)
    progress.update(a)
    progress.update(b)
    a.compressed, a.pushed, a.done = 1 << 19, 1 << 19, True
    progress.update(a)
    last = out.getvalue().split("\x1b[2F")[-1]
    assert "sha256:aaaaaaaaaaaa" in last and "done" in last and "waiting" in last
