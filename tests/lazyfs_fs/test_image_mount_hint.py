"""``crfs mount docker://…`` hands each layer descriptor's prefetch
annotation to that layer's mount process, as a snapshotter gets it as a label."""

from __future__ import annotations

import time
from pathlib import Path

from harness.images import push_layers_manifest
from harness.registry import Registry
from lazyfs import image_mount, mount
from lazyfs.layer_source import RemoteOptions
from lazyfs.prefetch import layer_chunks
from lazyfs.prefetch_hints import PREFETCH_RANGES_LABEL, STARGZ_PREFETCH_LABEL
from lazyfs.registry import RegistryClient
from lazyfs.stargz.reader import StargzReader
from lazyfs.stargz.source import FileSource

from .helpers import mounted_image
from .test_overlay import two_layers


def _push(host: str, layers: list[tuple[Path, dict[str, str]]]) -> tuple[str, list[int]]:
    """An image of ``layers`` (blob, extra annotations); the chunk count of each."""
    ref = f"{host}/lazy/hinted"
    blobs, counts = [], []
    for path, extra in layers:
        with FileSource(path) as source:
            reader = StargzReader.open(source)
            annotations = {image_mount.TOC_DIGEST_ANNOTATION: reader.toc.digest}
            annotations.update({k: v.replace("TOC", str(reader.footer.toc_offset)) for k, v in extra.items()})
            counts.append(len(layer_chunks(reader.toc)))
        blobs.append((path.read_bytes(), annotations))
    with RegistryClient() as client:
        push_layers_manifest(client.repository(ref), blobs, tag="v1")
    return f"docker://{ref}:v1", counts


def test_layer_annotations_become_prefetch_hints(tmp_path: Path) -> None:
    lower, upper = two_layers(tmp_path)
    merged = tmp_path / "rootfs"
    with Registry(tmp_path / "registry") as registry:
        ref, counts = _push(registry.host, [
            (lower, {STARGZ_PREFETCH_LABEL: "TOC"}),  # every chunk (all bytes before the TOC)
            (upper, {PREFETCH_RANGES_LABEL: "5:1,0:1"}),  # malformed: ignored
        ])
        with mounted_image(ref, merged, RemoteOptions(cache_dir=str(tmp_path / "cache"))) as record:
            layers = [Path(d) for d in record.layers]
            lower_status = mount.status(layers[0])["store"]
            assert lower_status["hint"]["ranges"] == 1, lower_status
            assert "hint" not in mount.status(layers[1])["store"]
            # the hint is the profile: the hinted layer does not guess what programs load
            assert mount.status(layers[0])["hinted"] and "dependencies" not in mount.status(layers[0])
            assert not mount.status(layers[1])["hinted"] and "dependencies" in mount.status(layers[1])
            for _ in range(100):
                if mount.status(layers[0])["store"]["hint"]["state"] == "done":
                    break
                time.sleep(0.05)
            assert mount.status(layers[0])["store"]["hint"]["chunks_taken"] == counts[0]
            assert (merged / "b").read_bytes() == b"kept"
