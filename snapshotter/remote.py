"""Which Prepare asks for a remote snapshot, read from its labels.

containerd's unpacker sends ``containerd.io/snapshot.ref`` (the chain ID
the layer is to be committed as) with every Prepare, plus the layer
descriptor's annotations under ``containerd.io/snapshot/``: the CRI plugin
(``disable_snapshot_annotations = false``) and ``crfs rpull`` add the image
reference and the layer digest there, and eStargz images carry the TOC
digest. With all three, the layer can be mounted from its registry and
every chunk verified; without them the Prepare is an ordinary one.

A layer's prefetch label (``crfs optimize``'s byte ranges, or the
stargz-snapshotter's prefetch size) goes to its mount process, which
fetches those bytes while it reads the TOC.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

from lazyfs.layer_source import REGISTRY_SCHEME
from lazyfs.prefetch_hints import prefetch_hint
from lazyfs.registry.digest import is_digest
from lazyfs.registry.errors import InvalidReference
from lazyfs.registry.reference import parse_reference

from .store import REF_LABEL, RemoteLayer

IMAGE_REF_LABEL = "containerd.io/snapshot/cri.image-ref"
MANIFEST_DIGEST_LABEL = "containerd.io/snapshot/cri.manifest-digest"
LAYER_DIGEST_LABEL = "containerd.io/snapshot/cri.layer-digest"
# this layer and the image's next ones: "for preparing layers in parallel"
IMAGE_LAYERS_LABEL = "containerd.io/snapshot/cri.image-layers"
TOC_DIGEST_LABEL = "containerd.io/snapshot/stargz/toc.digest"
# set on the snapshots crfs commits itself (the stargz-snapshotter's name)
REMOTE_LABEL = "containerd.io/snapshot/remote"


@dataclass(frozen=True)
class HintedLayer(RemoteLayer):
    """A ``RemoteLayer`` and what its labels say to prefetch at mount
    (``--prefetch-ranges`` of its mount process; not stored: a mount
    started again later finds those bytes in the cache). A layer mounted
    ahead of its Prepare has no labels yet: its mount process reads its
    hint from the image manifest (``prefetch_manifest``) instead."""

    prefetch_ranges: str = field(default="", compare=False)
    prefetch_manifest: str = field(default="", compare=False)


@dataclass(frozen=True)
class LayerRequest:
    """A Prepare that names a layer crfs may mount lazily."""

    target: str  # the committed snapshot containerd wants
    layer: RemoteLayer
    # the image's next layers (TOC digests unknown until their own Prepare)
    upcoming: tuple[RemoteLayer, ...] = ()
    repository: str = ""  # host/name of the image, which holds its manifest
    manifest_digest: str = ""  # the image manifest, when the labels name it


def _is_digest(text: str) -> bool:
    """A well-formed sha256 digest: what lazyfs mounts from a registry."""
    return text.startswith("sha256:") and is_digest(text)


def layer_request(labels: Mapping[str, str]) -> Optional[LayerRequest]:
    """The layer to mount for a Prepare with these labels, or None when they
    do not name one completely (then the Prepare is an ordinary one)."""
    target = labels.get(REF_LABEL, "")
    image_ref = labels.get(IMAGE_REF_LABEL, "")
    digest = labels.get(LAYER_DIGEST_LABEL, "")
    if not (target and image_ref and _is_digest(digest)):
        return None
    try:
        ref = parse_reference(image_ref)
    except InvalidReference:
        return None
    toc = labels.get(TOC_DIGEST_LABEL, "")
    if not _is_digest(toc):
        # Without the TOC digest from the (content-addressed) manifest, the
        # chunk digests in the TOC could not be trusted: download instead.
        return None
    repo = f"{REGISTRY_SCHEME}{ref.registry}/{ref.repository}"
    manifest = labels.get(MANIFEST_DIGEST_LABEL, "")
    manifest = manifest if _is_digest(manifest) else ""
    upcoming = tuple(
        HintedLayer(d, f"{repo}@{d}", prefetch_manifest=manifest)
        for d in labels.get(IMAGE_LAYERS_LABEL, "").split(",") if _is_digest(d) and d != digest
    )
    hint = prefetch_hint(labels) or ""
    return LayerRequest(target, HintedLayer(digest, f"{repo}@{digest}", toc, hint), upcoming,
                        f"{ref.registry}/{ref.repository}", manifest)
