"""``crfs convert SRC DST``: an image with every layer rewritten as eStargz.

SRC and DST are registry references (``host/repo:tag``, optionally
``docker://``-prefixed) or OCI layout directories (``oci:DIR:TAG``). Per
image manifest: each layer is fetched (digest-verified) to a temporary file,
converted with the stargz writer, and stored in DST with the annotations a
lazy-pulling snapshotter reads (TOC digest, uncompressed size; with
prioritized files, what to prefetch: see ``prefetch_hints``); the config's
``rootfs.diff_ids`` and the manifest are rewritten. An index is converted per
platform, or reduced to one platform with ``--platform``.

Blobs go first, manifests after them, the tag last: an interrupted
conversion leaves DST's tag untouched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Mapping, Optional, Protocol, Sequence

from .ocilayout import OciLayout, parse_oci_ref
from .prefetch_hints import Range, annotations as prefetch_annotations, layer_hints, read_profile_lines
from .registry.client import RegistryClient, Repository
from .registry.digest import Verifier
from .registry.manifest import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    Descriptor,
    Manifest,
    Platform,
    select_platform,
)
from .registry.reference import parse_reference
from .stargz.reader import StargzReader
from .stargz.source import FileSource
from .stargz.writer import DEFAULT_CHUNK_SIZE, BuildResult, build

log = logging.getLogger(__name__)

TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
CONVERTIBLE_LAYERS = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        OCI_LAYER_GZIP,
        "application/vnd.docker.image.rootfs.diff.tar",
        DOCKER_LAYER_GZIP,
    }
)
MAX_CONFIG_BYTES = 8 << 20


def read_paths(lines: Iterable[str]) -> list[str]:
    """Paths to prioritize, one per line (a ``--prioritize-file`` or a
    ``crfs optimize`` profile); blank lines and ``#`` comments skipped.
    ``prefetch_hints.read_profile_lines`` gives the ranges read too."""
    return read_profile_lines(lines).paths


class ConvertError(Exception):
    """The image cannot be converted; the message names the layer or manifest."""


@dataclass(frozen=True)
class ConvertOptions:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    prioritized: tuple[str, ...] = ()
    # of some prioritized paths, the (offset, length) ranges read: the
    # prefetch-ranges annotation hints just their chunks (of the others, all)
    prioritized_ranges: Mapping[str, Sequence[Range]] = field(default_factory=dict)
    prioritized_chunk_size: Optional[int] = None  # chunk the prioritized files finer
    platform: Optional[Platform] = None  # None: every platform of an index
    parallel_layers: int = 2
    tmp_dir: Optional[Path] = None


@dataclass
class LayerProgress:
    """Bytes of one layer so far: read from SRC, written as eStargz, pushed."""

    digest: str
    read: int = 0
    compressed: int = 0
    pushed: int = 0
    done: bool = False


ProgressCallback = Callable[[LayerProgress], None]


class ImageStore(Protocol):
    """Where images are read from and written to."""

    def top(self) -> Manifest:
        """The manifest or index SRC's reference names, as stored."""

    def manifest(self, digest: str) -> Manifest: ...

    def fetch_blob(self, desc: Descriptor, dest: BinaryIO) -> None:
        """Writes the blob to ``dest``, verified against ``desc``."""

    def push_blob(self, path: Path, digest: str) -> None: ...

    def push_manifest(self, raw: bytes, media_type: str, tagged: bool) -> str:
        """Stores a manifest; ``tagged`` points the reference's tag at it."""


class LayoutStore:
    def __init__(self, layout: OciLayout, tag: str) -> None:
        self.layout, self.tag = layout, tag

    def top(self) -> Manifest:
        return self.layout.resolve(self.tag)

    def manifest(self, digest: str) -> Manifest:
        return Manifest.parse(self.layout.read_blob(digest), digest)

    def fetch_blob(self, desc: Descriptor, dest: BinaryIO) -> None:
        verifier = Verifier(desc.digest, desc.size)
        with self.layout.open_blob(desc.digest) as f:
            while piece := f.read(1 << 20):
                verifier.update(piece)
                dest.write(piece)
        verifier.verify(repo=str(self.layout.root))

    def push_blob(self, path: Path, digest: str) -> None:
        with open(path, "rb") as f:
            self.layout.write_blob(f, expected=digest)

    def push_manifest(self, raw: bytes, media_type: str, tagged: bool) -> str:
        if tagged:
            return self.layout.put_manifest(raw, media_type, self.tag).digest
        return self.layout.write_blob(raw)[0]


class RegistryStore:
    def __init__(self, client: RegistryClient, reference: str) -> None:
        self.ref = parse_reference(reference)
        self.repo: Repository = client.repository(self.ref)

    def top(self) -> Manifest:
        return self.repo.get_manifest(self.ref.object)

    def manifest(self, digest: str) -> Manifest:
        return self.repo.get_manifest(digest)

    def fetch_blob(self, desc: Descriptor, dest: BinaryIO) -> None:
        self.repo.fetch_blob(desc.digest, dest, desc.size)

    def push_blob(self, path: Path, digest: str) -> None:
        with open(path, "rb") as f:
            self.repo.push_blob(f, digest)

    def push_manifest(self, raw: bytes, media_type: str, tagged: bool) -> str:
        if tagged and self.ref.digest:
            raise ConvertError(f"destination {self.ref} names a digest; give a tag")
        return self.repo.push_manifest(raw, media_type, (self.ref.tag or "latest") if tagged else None)


def open_store(text: str, client: RegistryClient, create: bool) -> ImageStore:
    """``oci:DIR[:TAG]`` or a registry reference (``docker://`` optional)."""
    if text.startswith("oci:"):
        path, tag = parse_oci_ref(text)
        return LayoutStore(OciLayout(path, create=create), tag)
    return RegistryStore(client, text.removeprefix("docker://"))


@dataclass
class Converter:
    src: ImageStore
    dst: ImageStore
    options: ConvertOptions = field(default_factory=ConvertOptions)
    progress: Optional[ProgressCallback] = None

    def run(self) -> str:
        """Converts and tags; returns the digest of what DST's tag now names."""
        top = self.src.top()
        if not top.is_index:
            return self._push(self._convert_image(top), tagged=True)
        if self.options.platform is not None:
            child = self.src.manifest(select_platform(top, self.options.platform).digest)
            return self._push(self._convert_image(child), tagged=True)
        entries = []
        for desc in top.manifests:
            child = self.src.manifest(desc.digest)
            if child.is_index:
                raise ConvertError(f"nested index {desc.digest} is not supported")
            converted = self._convert_image(child)
            digest = self._push(converted, tagged=False)
            entries.append({**desc.to_json(), "digest": digest, "size": len(converted.raw), "mediaType": converted.media_type})
        index = dict(top.data)
        index["manifests"] = entries
        raw = json.dumps(index, indent=2).encode()
        return self.dst.push_manifest(raw, top.media_type or DOCKER_MANIFEST_LIST, tagged=True)

    def _push(self, manifest: Manifest, tagged: bool) -> str:
        return self.dst.push_manifest(manifest.raw, manifest.media_type, tagged)

    def _convert_image(self, manifest: Manifest) -> Manifest:
        layers = manifest.layers
        for desc in layers:
            if desc.media_type not in CONVERTIBLE_LAYERS:
                raise ConvertError(f"layer {desc.digest} of {manifest.digest}: media type {desc.media_type!r} cannot be converted")
        config_desc = manifest.config
        config = self._read_config(config_desc)
        diff_ids = config.get("rootfs", {}).get("diff_ids")
        if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
            raise ConvertError(f"config {config_desc.digest}: rootfs.diff_ids does not match the {len(layers)} layers")
        docker = manifest.media_type == DOCKER_MANIFEST
        with tempfile.TemporaryDirectory(prefix="crfs-convert-", dir=self.options.tmp_dir) as tmp:
            with ThreadPoolExecutor(max_workers=max(1, self.options.parallel_layers)) as pool:
                converted = list(pool.map(lambda d: self._convert_layer(d, Path(tmp)), layers))
        results = [result for result, _, _ in converted]
        nowhere = set(self.options.prioritized).intersection(*(missing for _, missing, _ in converted))
        if nowhere:
            raise ConvertError(f"prioritized files in no layer of {manifest.digest}: {', '.join(sorted(nowhere))}")
        new_layers = []
        for i, (desc, result) in enumerate(zip(layers, results)):
            annotations = {
                **desc.annotations,
                TOC_DIGEST_ANNOTATION: result.toc_digest,
                UNCOMPRESSED_SIZE_ANNOTATION: str(result.uncompressed_size),
                **_prefetch_annotations(i, [hints for _, _, hints in converted]),
            }
            media_type = DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP
            new_layers.append(Descriptor(media_type, result.digest, result.size, annotations=annotations).to_json())
        config["rootfs"]["diff_ids"] = [r.diff_id for r in results]
        config_raw = json.dumps(config, separators=(",", ":")).encode()
        with tempfile.NamedTemporaryFile(dir=self.options.tmp_dir) as f:
            f.write(config_raw)
            f.flush()
            new_config = Descriptor(config_desc.media_type, _sha256(config_raw), len(config_raw))
            self.dst.push_blob(Path(f.name), new_config.digest)
        data = dict(manifest.data)
        data["config"] = {**config_desc.to_json(), "digest": new_config.digest, "size": new_config.size}
        data["layers"] = new_layers
        raw = json.dumps(data, indent=2).encode()
        return Manifest.parse(raw, _sha256(raw), manifest.media_type)

    def _read_config(self, desc: Descriptor) -> dict:
        if desc.size > MAX_CONFIG_BYTES:
            raise ConvertError(f"config {desc.digest} is {desc.size} bytes, over {MAX_CONFIG_BYTES}")
        with tempfile.TemporaryFile(dir=self.options.tmp_dir) as f:
            self.src.fetch_blob(desc, f)
            f.seek(0)
            try:
                config = json.loads(f.read())
            except ValueError as exc:
                raise ConvertError(f"config {desc.digest} is not JSON: {exc}") from None
        if not isinstance(config, dict) or not isinstance(config.get("rootfs"), dict):
            raise ConvertError(f"config {desc.digest} has no rootfs")
        return config

    def _convert_layer(self, desc: Descriptor, tmp: Path) -> tuple[BuildResult, set[str], Optional[LayerHints]]:
        """The layer as eStargz, pushed; the prioritized paths it lacks; what
        to prefetch of it (None: nothing prioritized)."""
        state = LayerProgress(desc.digest)
        missing: list[str] = []
        src_path = tmp / (desc.digest.replace(":", "-") + ".in")
        out_path = tmp / (desc.digest.replace(":", "-") + ".estargz")
        with open(src_path, "wb") as f:
            self.src.fetch_blob(desc, _Counting(f, state, "read", self._report))
        try:
            result = build(
                src_path,
                out_path,
                chunk_size=self.options.chunk_size,
                prioritized=self.options.prioritized,
                tmp_dir=tmp,
                missing_prioritized=missing,  # each layer holds only some of them
                prioritized_chunk_size=self.options.prioritized_chunk_size,
            )
            hints = self._hints(out_path) if self.options.prioritized else None
        except Exception as exc:
            raise ConvertError(f"layer {desc.digest}: {exc}") from exc
        finally:
            src_path.unlink(missing_ok=True)
        state.compressed = result.size
        self._report(state)
        self.dst.push_blob(out_path, result.digest)
        out_path.unlink()
        state.pushed, state.done = result.size, True
        self._report(state)
        log.info("layer %s -> %s (toc %s)", desc.digest, result.digest, result.toc_digest)
        return result, set(missing), hints

    def _hints(self, blob: Path) -> Optional[LayerHints]:
        """What to prefetch of a written layer: its TOC's chunks that hold
        what the profile says is read of the prioritized files."""
        with FileSource(blob) as source:
            toc = StargzReader.open(source).toc
        if toc.prefetch_size is None:
            return None
        return LayerHints(toc.prefetch_size, layer_hints(toc, self.options.prioritized, self.options.prioritized_ranges))

    def _report(self, state: LayerProgress) -> None:
        if self.progress is not None:
            self.progress(state)


@dataclass(frozen=True)
class LayerHints:
    prefetch_size: int  # the prioritized region: where the landmark starts
    ranges: dict[str, list[Range]]  # blob ranges per prioritized path in the layer


def _prefetch_annotations(index: int, hints: list[Optional[LayerHints]]) -> dict[str, str]:
    """The prefetch annotations of layer ``index``: the chunks of its
    prioritized files that a higher layer does not hide (those are read
    from the higher layer; their copy here stays first all the same)."""
    own = hints[index]
    if own is None:
        return {}
    above = {path for h in hints[index + 1 :] if h is not None for path in h.ranges}
    return prefetch_annotations(own.prefetch_size, (r for path, ranges in own.ranges.items() if path not in above for r in ranges))


class _Counting:
    """A write-only file that counts what passes into one progress field."""

    def __init__(self, f: BinaryIO, state: LayerProgress, field_name: str, report: Callable[[LayerProgress], None]) -> None:
        self._f, self._state, self._field, self._report = f, state, field_name, report

    def write(self, data: bytes) -> int:
        setattr(self._state, self._field, getattr(self._state, self._field) + len(data))
        self._report(self._state)
        return self._f.write(data)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
