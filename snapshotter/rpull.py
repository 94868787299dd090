"""``crfs rpull REF``: pull an image into containerd so that a remote
snapshotter can mount its layers lazily.

It does what containerd's client does in ``pull.go`` + ``unpacker.go``,
through containerd's own gRPC API, with one difference that matters: only
the index, manifest and config are downloaded up front. Each layer is first
offered to the snapshotter with ``Prepare`` and the labels that name the
image and the layer (``containerd.io/snapshot/cri.*`` plus the layer's own
``containerd.io/snapshot/*`` annotations, e.g. the eStargz TOC digest). A
snapshotter that can mount the layer remotely commits it itself and answers
ALREADY_EXISTS; otherwise the layer is downloaded into the content store and
applied by containerd's differ, as an ordinary pull would.

Everything is done under a lease, so a pull that fails half-way leaves only
collectable garbage, and the image record is written last.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import json
import os
import secrets
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Mapping, Optional, Sequence, TextIO

from lazyfs.registry.client import RegistryClient, Repository
from lazyfs.registry.config import RegistryConfig
from lazyfs.registry.credentials import Credential, CredentialStore
from lazyfs.registry.errors import RegistryError
from lazyfs.registry.manifest import Descriptor as RegistryDescriptor
from lazyfs.registry.manifest import Manifest, Platform
from lazyfs.registry.reference import Reference, normalize_host, parse_reference

# Not containerd_api: its grpc import waits until the registry requests are under way (rpull()).
from .containerd_types import (
    DEFAULT_ADDRESS,
    DEFAULT_NAMESPACE,
    AlreadyExists,
    ContainerdError,
    Descriptor,
    Mount,
    Unavailable,
)

if TYPE_CHECKING:
    from .containerd_api import ContainerdClient

DEFAULT_SNAPSHOTTER = "crfs"
DEFAULT_PLATFORM = "linux/amd64"

# Label names, as containerd spells them.
SNAPSHOT_REF_LABEL = "containerd.io/snapshot.ref"
INHERITED_LABEL_PREFIX = "containerd.io/snapshot/"
IMAGE_REF_LABEL = "containerd.io/snapshot/cri.image-ref"
MANIFEST_DIGEST_LABEL = "containerd.io/snapshot/cri.manifest-digest"
LAYER_DIGEST_LABEL = "containerd.io/snapshot/cri.layer-digest"
IMAGE_LAYERS_LABEL = "containerd.io/snapshot/cri.image-layers"
UNCOMPRESSED_LABEL = "containerd.io/uncompressed"
GC_CONFIG_LABEL = "containerd.io/gc.ref.content.config"
GC_LAYER_LABEL = "containerd.io/gc.ref.content.l.{}"
GC_MANIFEST_LABEL = "containerd.io/gc.ref.content.m.{}"
GC_SNAPSHOT_LABEL = "containerd.io/gc.ref.snapshot.{}"
SOURCE_LABEL = "containerd.io/distribution.source.{}"
MAX_LABEL_SIZE = 4096  # key + value, containerd's labels.Validate

PREPARE_TRIES = 3  # as unpacker.go: a clashing extraction key is retried

# How a layer got into the snapshotter.
LAZY = "lazy"  # the snapshotter mounted it remotely (Prepare said ALREADY_EXISTS)
FETCHED = "fetched"  # downloaded and applied by containerd's differ
PRESENT = "present"  # the chain was already there before this pull


class RpullError(Exception):
    """A pull that cannot go on; the message is meant for the user."""


@dataclass
class LayerResult:
    index: int
    digest: str
    chain_id: str
    how: str
    fetched_bytes: int = 0


@dataclass(frozen=True)
class ResolvedImage:
    """What a pull needs from the registry before it can ask containerd for anything."""

    top: Manifest  # what the reference names: a manifest or an index
    manifest: Manifest  # the image manifest for the platform
    config_raw: bytes
    diff_ids: list[str]


@dataclass
class PullResult:
    name: str
    target: Descriptor
    manifest_digest: str
    chain_id: str
    layers: list[LayerResult] = field(default_factory=list)


# --- pure helpers ----------------------------------------------------------------


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The chain ID of every prefix of ``diff_ids`` (opencontainers identity.ChainIDs)."""
    out: list[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest())
    return out


def image_layers_label(digests: Sequence[str], key: str = IMAGE_LAYERS_LABEL) -> str:
    """As many of ``digests`` as fit in one label, comma-joined (annotations.go's getLayers)."""
    value = ""
    for d in digests:
        item = d if not value else "," + d
        if len(key) + len(value) + len(item) > MAX_LABEL_SIZE:
            break
        value += item
    return value


def snapshot_labels(ref: str, manifest_digest: str, layers: Sequence[RegistryDescriptor], i: int, chain_id: str) -> dict[str, str]:
    """The labels Prepare and Commit of layer ``i`` carry: what a remote
    snapshotter needs to find the layer without asking anyone."""
    layer = layers[i]
    labels = {k: v for k, v in layer.annotations.items() if k.startswith(INHERITED_LABEL_PREFIX)}
    labels.update({
        IMAGE_REF_LABEL: ref,
        MANIFEST_DIGEST_LABEL: manifest_digest,
        LAYER_DIGEST_LABEL: layer.digest,
        IMAGE_LAYERS_LABEL: image_layers_label([d.digest for d in layers[i:]]),
        SNAPSHOT_REF_LABEL: chain_id,
    })
    return labels


def unpack_key(chain_id: str) -> str:
    """containerd's UnpackKeyFormat ``extract-<unique> <chainID>``."""
    unique = f"{time.time_ns() % 1_000_000_000}-{base64.urlsafe_b64encode(secrets.token_bytes(6)).decode()}"
    return f"extract-{unique} {chain_id}"


def to_ctrd(desc: RegistryDescriptor) -> Descriptor:
    return Descriptor(desc.media_type, desc.digest, desc.size, dict(desc.annotations))


def manifest_descriptor(m: Manifest) -> Descriptor:
    return Descriptor(m.media_type, m.digest, len(m.raw))


class FixedCredentials(CredentialStore):
    """``--user``: these credentials for the image's registry, the Docker
    config file for any other host."""

    def __init__(self, registry: str, credential: Credential) -> None:
        super().__init__()
        self._registry = normalize_host(registry)
        self._credential = credential

    def get(self, host: str) -> Optional[Credential]:
        if normalize_host(host) == self._registry:
            return self._credential
        return super().get(host)


def parse_user(user: str) -> Credential:
    """``USER[:PASSWORD]``; the password is asked for on the terminal when missing."""
    name, sep, password = user.partition(":")
    if not sep:
        if not sys.stdin.isatty():
            raise RpullError("--user without a password needs a terminal to ask for it")
        password = getpass.getpass(f"Password for {name}: ")
    return Credential(username=name, password=password)


# --- progress --------------------------------------------------------------------


class Progress:
    """One line per layer on ``out``; on a terminal also a live line while
    a layer downloads."""

    def __init__(self, out: TextIO, live: Optional[bool] = None, interval: float = 0.2) -> None:
        self.out = out
        self.live = out.isatty() if live is None else live
        self.interval = interval
        self._last = 0.0

    def fetching(self, i: int, n: int, digest: str, done: int, total: int) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if now - self._last < self.interval and done < total:
            return
        self._last = now
        self.out.write(f"\r\x1b[2Klayer {i + 1}/{n} {digest[:19]} fetching {_mib(done)} / {_mib(total)}")
        self.out.flush()

    def layer(self, result: LayerResult, n: int) -> None:
        detail = f" {result.fetched_bytes} bytes" if result.how == FETCHED else ""
        prefix = "\r\x1b[2K" if self.live else ""
        self.out.write(f"{prefix}layer {result.index + 1}/{n} {result.digest} {result.how}{detail}\n")
        self.out.flush()


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


# --- the pull --------------------------------------------------------------------


def resolve_image(repo: Repository, ref: Reference, platform: Platform) -> ResolvedImage:
    """Manifest (through an index for ``platform``) and config of ``ref``."""
    resolved = repo.resolve(ref.object, platform, reference=ref)
    top, manifest = resolved.index or resolved.manifest, resolved.manifest
    config = manifest.config
    config_raw = repo.get_blob(config.digest, config.size)
    return ResolvedImage(top, manifest, config_raw, _diff_ids(config_raw, len(manifest.layers), config.digest))


class Puller:
    """One pull: resolve, store the metadata, then each layer lazily or not."""

    def __init__(
        self,
        ctrd: ContainerdClient,
        registry: RegistryClient,
        snapshotter: str = DEFAULT_SNAPSHOTTER,
        progress: Optional[Progress] = None,
    ) -> None:
        self.ctrd = ctrd
        self.registry = registry
        self.snapshotter = snapshotter
        self.progress = progress

    def pull(self, ref: Reference, platform: Platform, resolving: Optional["Future[ResolvedImage]"] = None) -> PullResult:
        """Pull ``ref`` for ``platform``; the image record names ``str(ref)``.
        ``resolving``: ``resolve_image`` already started for the same ref."""
        name = str(ref)
        with ExitStack() as held:
            try:
                held.enter_context(self.ctrd.lease(f"crfs-rpull-{secrets.token_hex(8)}"))
            except Unavailable as e:
                raise RpullError(f"cannot reach containerd at {self.ctrd.address}: {e}") from None
            repo = self.registry.repository(ref)
            image = resolving.result() if resolving is not None else resolve_image(repo, ref, platform)
            manifest = image.manifest
            self._store_metadata(ref, image.top, manifest, image.config_raw)
            result = PullResult(name, manifest_descriptor(image.top), manifest.digest, chain_ids(image.diff_ids)[-1])
            for i, layer in enumerate(manifest.layers):
                result.layers.append(self._unpack_layer(repo, ref, manifest, image.diff_ids, i))
                if self.progress:
                    self.progress.layer(result.layers[-1], len(manifest.layers))
            self.ctrd.update_content_labels(manifest.config.digest, {GC_SNAPSHOT_LABEL.format(self.snapshotter): result.chain_id})
            self.ctrd.put_image(name, result.target)
        return result

    # --- content ---

    def _store_metadata(self, ref: Reference, top: Manifest, manifest: Manifest, config_raw: bytes) -> None:
        """Config, manifest and index into the content store, children
        first, each parent labelled with its children for GC."""
        source = self._source_labels(ref)
        config = manifest.config
        self._write_bytes(f"config-{config.digest}", config.digest, config_raw, source)
        labels = {GC_CONFIG_LABEL: config.digest, **source}
        labels.update({GC_LAYER_LABEL.format(i): layer.digest for i, layer in enumerate(manifest.layers)})
        self._write_bytes(f"manifest-{manifest.digest}", manifest.digest, manifest.raw, labels)
        if top.is_index:
            self._write_bytes(f"index-{top.digest}", top.digest, top.raw, {GC_MANIFEST_LABEL.format(0): manifest.digest, **source})

    @staticmethod
    def _source_labels(ref: Reference) -> dict[str, str]:
        """Where the content came from, as containerd records it (a later
        lazy fetch or a push can use it)."""
        return {SOURCE_LABEL.format(normalize_host(ref.registry)): ref.repository}

    def _write_bytes(self, ref: str, digest: str, data: bytes, labels: Mapping[str, str]) -> None:
        self.ctrd.write_content(ref, digest, len(data), [data], labels)

    # --- layers ---

    def _unpack_layer(self, repo: Repository, ref: Reference, manifest: Manifest, diff_ids: Sequence[str], i: int) -> LayerResult:
        """Layer ``i``: already there, mounted lazily by the snapshotter, or
        fetched and applied (unpacker.go's doUnpackFn)."""
        layers = manifest.layers
        layer = layers[i]
        chain = chain_ids(diff_ids[: i + 1])
        chain_id, parent = chain[-1], (chain[-2] if i else "")
        if self.ctrd.snapshot_exists(self.snapshotter, chain_id):
            return LayerResult(i, layer.digest, chain_id, PRESENT)
        labels = snapshot_labels(str(ref), manifest.digest, layers, i, chain_id)
        prepared = self._prepare(chain_id, parent, labels)
        if prepared is None:
            return LayerResult(i, layer.digest, chain_id, LAZY)
        key, mounts = prepared
        try:
            fetched = self._fetch_layer(repo, layer, i, len(layers), self._source_labels(ref))
            applied = self.ctrd.apply(to_ctrd(layer), mounts)
            if applied.digest != diff_ids[i]:
                raise RpullError(f"layer {layer.digest}: extracted diff ID {applied.digest}, config says {diff_ids[i]}")
            self.ctrd.commit(self.snapshotter, chain_id, key, labels)
        except AlreadyExists:
            self._remove(key)  # someone committed the same chain meanwhile
            return LayerResult(i, layer.digest, chain_id, PRESENT)
        except BaseException:
            self._remove(key)
            raise
        self.ctrd.update_content_labels(layer.digest, {UNCOMPRESSED_LABEL: diff_ids[i]})
        return LayerResult(i, layer.digest, chain_id, FETCHED, fetched)

    def _prepare(self, chain_id: str, parent: str, labels: Mapping[str, str]) -> Optional[tuple[str, list[Mount]]]:
        """``(key, mounts)`` to extract into, or None when the snapshotter
        answered ALREADY_EXISTS and the chain now exists (a lazy layer)."""
        for _ in range(PREPARE_TRIES):
            key = unpack_key(chain_id)
            try:
                return key, self.ctrd.prepare(self.snapshotter, key, parent, labels)
            except AlreadyExists:
                if self.ctrd.snapshot_exists(self.snapshotter, chain_id):
                    return None
        raise RpullError(f"snapshotter {self.snapshotter} keeps answering ALREADY_EXISTS for {chain_id} without creating it")

    def _fetch_layer(self, repo: Repository, layer: RegistryDescriptor, i: int, n: int, labels: Mapping[str, str]) -> int:
        """The layer blob into the content store; returns the bytes downloaded."""
        counted = [0]

        def chunks() -> Iterator[bytes]:
            for piece in repo.open_blob(layer.digest, layer.size):
                counted[0] += len(piece)
                if self.progress:
                    self.progress.fetching(i, n, layer.digest, counted[0], layer.size)
                yield piece

        self.ctrd.write_content(f"layer-{layer.digest}", layer.digest, layer.size, chunks(), labels)
        return counted[0]

    def _remove(self, key: str) -> None:
        try:
            self.ctrd.remove_snapshot(self.snapshotter, key)
        except ContainerdError:
            pass  # the lease makes it collectable anyway


def _diff_ids(config_raw: bytes, n_layers: int, digest: str) -> list[str]:
    try:
        diff_ids = json.loads(config_raw)["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        raise RpullError(f"image config {digest} has no rootfs.diff_ids") from None
    if not isinstance(diff_ids, list) or len(diff_ids) != n_layers:
        raise RpullError(f"image config {digest}: {len(diff_ids)} diff_ids for {n_layers} layers")
    return [str(d) for d in diff_ids]


# --- CLI -------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``rpull`` to a parent parser's subcommands."""
    p = subparsers.add_parser("rpull", help="pull an image into containerd, letting the snapshotter mount layers lazily")
    p.add_argument("ref", metavar="REF", help="image reference, host/repo:tag or host/repo@sha256:…")
    p.add_argument("--address", "-a", default=os.environ.get("CONTAINERD_ADDRESS") or DEFAULT_ADDRESS,
                   help=f"containerd's socket (env CONTAINERD_ADDRESS, default {DEFAULT_ADDRESS})")
    p.add_argument("--namespace", "-n", default=os.environ.get("CONTAINERD_NAMESPACE") or DEFAULT_NAMESPACE,
                   help=f"containerd namespace (env CONTAINERD_NAMESPACE, default {DEFAULT_NAMESPACE})")
    p.add_argument("--snapshotter", default=DEFAULT_SNAPSHOTTER, help=f"snapshotter to unpack into (default {DEFAULT_SNAPSHOTTER})")
    p.add_argument("--plain-http", action="store_true", help="allow plain HTTP to the image's registry")
    p.add_argument("--user", "-u", metavar="USER[:PASSWORD]", help="registry credentials")
    p.add_argument("--platform", default=DEFAULT_PLATFORM, help=f"platform to pull from an index (default {DEFAULT_PLATFORM})")
    p.set_defaults(func=_rpull)


def _rpull(args: argparse.Namespace) -> int:
    try:
        result = rpull(args.ref, address=args.address, namespace=args.namespace, snapshotter=args.snapshotter,
                       plain_http=args.plain_http, user=args.user, platform=args.platform, progress=Progress(sys.stderr))
    except (RpullError, RegistryError, ContainerdError, ValueError) as e:
        print(f"crfs rpull: {args.ref}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"crfs rpull: {args.ref}: interrupted (partial content is left to containerd's GC)", file=sys.stderr)
        return 130
    lazy = sum(1 for layer in result.layers if layer.how == LAZY)
    print(f"{result.name}: {result.target.digest} ({lazy}/{len(result.layers)} layers lazy)", file=sys.stderr)
    return 0


def rpull(
    ref_text: str,
    *,
    address: str = DEFAULT_ADDRESS,
    namespace: str = DEFAULT_NAMESPACE,
    snapshotter: str = DEFAULT_SNAPSHOTTER,
    plain_http: bool = False,
    user: Optional[str] = None,
    platform: str = DEFAULT_PLATFORM,
    progress: Optional[Progress] = None,
) -> PullResult:
    """The whole ``crfs rpull``; raises RpullError, RegistryError or
    ContainerdError with a message for the user."""
    ref = parse_reference(ref_text)
    wanted = Platform.parse(platform)
    insecure = frozenset({ref.registry}) if plain_http else frozenset()
    credentials = FixedCredentials(ref.registry, parse_user(user)) if user else None
    if not os.path.exists(address):
        raise RpullError(f"cannot reach containerd: no socket at {address}")
    with RegistryClient(RegistryConfig(insecure_hosts=insecure), credentials=credentials) as registry, \
            ThreadPoolExecutor(1, thread_name_prefix="resolve") as pool:
        # the manifest and config round trips run while grpc is imported
        resolving = pool.submit(resolve_image, registry.repository(ref), ref, wanted)
        from .containerd_api import ContainerdClient  # noqa: PLC0415

        with ContainerdClient(address, namespace) as ctrd:
            return Puller(ctrd, registry, snapshotter, progress).pull(ref, wanted, resolving)
