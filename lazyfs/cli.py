"""``crfs stargz ...`` (build, verify, list and extract stargz / eStargz
layers) and ``crfs convert``.

``register(subparsers)`` adds them to the ``crfs`` parser; each command sets
``func(args) -> exit code``.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import sys
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

from lazyfs.convert import ConvertError, Converter, ConvertOptions, LayerProgress, open_store
from lazyfs.prefetch_hints import PRIORITIZED_CHUNK_SIZE, ProfileError, read_profile_lines
from lazyfs.ocilayout import LayoutError
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.config import RegistryConfig
from lazyfs.registry.errors import RegistryError
from lazyfs.registry.manifest import Platform
from lazyfs.stargz.errors import StargzError, UnverifiableLayer
from lazyfs.stargz.extract import extract
from lazyfs.stargz.reader import StargzReader
from lazyfs.stargz.source import FileSource
from lazyfs.stargz.toc import TocEntry
from lazyfs.stargz.verify import verify_contents, verify_layer_digest
from lazyfs.stargz.writer import DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL, build


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``stargz build|verify|ls|extract`` and ``convert`` to a parent
    parser's subcommands."""
    _register_convert(subparsers)
    _register_optimize(subparsers)
    stargz = subparsers.add_parser("stargz", help="build, verify, list and extract stargz/eStargz layers")
    sub = stargz.add_subparsers(dest="stargz_command", metavar="COMMAND", required=True)

    p = sub.add_parser("build", help="convert a tar or tar.gz layer to eStargz; prints digests as JSON")
    p.add_argument("input", metavar="IN.tar[.gz]")
    p.add_argument("output", metavar="OUT")
    p.add_argument("--chunk-size", type=_positive, default=DEFAULT_CHUNK_SIZE, metavar="N", help="bytes per chunk (default 4 MiB)")
    p.add_argument("--prioritize", nargs="+", action="extend", default=[], metavar="PATH", help="files to put first, for prefetching")
    p.add_argument("--level", type=int, choices=range(10), default=DEFAULT_LEVEL, metavar="0-9", help="gzip level (default 9)")
    p.set_defaults(func=_build)

    p = sub.add_parser("verify", help="check the TOC and every chunk; exit 0 only if all verifies")
    p.add_argument("blob", metavar="BLOB")
    p.add_argument("--toc-digest", metavar="D", help="expected TOC digest (containerd.io/snapshot/stargz/toc.digest)")
    p.add_argument("--layer-digest", metavar="D", help="expected blob digest: how a legacy stargz layer is verified")
    p.set_defaults(func=_verify)

    p = sub.add_parser("ls", help="list the layer's entries as JSON lines")
    p.add_argument("blob", metavar="BLOB")
    p.set_defaults(func=_ls)

    p = sub.add_parser("extract", help="extract the layer's files into an empty directory")
    p.add_argument("blob", metavar="BLOB")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--toc-digest", metavar="D", help="expected TOC digest")
    p.set_defaults(func=_extract)


def _reporting(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A bad blob or file is a one-line message and exit status 1, not a traceback."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (StargzError, OSError) as exc:
            print(f"crfs stargz {args.stargz_command}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1

    return run


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


@_reporting
def _build(args: argparse.Namespace) -> int:
    result = build(args.input, args.output, chunk_size=args.chunk_size, prioritized=args.prioritize, level=args.level)
    print(json.dumps(result.to_json()))
    return 0


@_reporting
def _verify(args: argparse.Namespace) -> int:
    with FileSource(args.blob) as source:
        if args.layer_digest:
            verify_layer_digest(source, args.layer_digest)
        reader = StargzReader.open(source, toc_digest=args.toc_digest)
        if not reader.toc.verifiable and not args.layer_digest:
            raise UnverifiableLayer(
                "some chunks have no digest (legacy stargz?): give --layer-digest to verify the whole blob"
            )
        report = verify_contents(reader, require_chunk_digests=not args.layer_digest)
    print(json.dumps({
        "tocDigest": reader.toc.digest,
        "legacy": reader.footer.legacy,
        "files": report.files,
        "chunks": report.chunks,
        "bytes": report.bytes,
    }))
    return 0


@_reporting
def _ls(args: argparse.Namespace) -> int:
    with FileSource(args.blob) as source:
        reader = StargzReader.open(source)
        for entry in reader.toc:
            if entry.name:
                print(json.dumps(entry_json(entry), ensure_ascii=False))
    return 0


@_reporting
def _extract(args: argparse.Namespace) -> int:
    with FileSource(args.blob) as source:
        reader = StargzReader.open(source, toc_digest=args.toc_digest)
        problems = extract(reader, args.dir)
    for problem in problems:
        print(f"crfs stargz extract: {problem}", file=sys.stderr)
    return 1 if problems else 0


def entry_json(entry: TocEntry) -> dict[str, Any]:
    """One ``ls`` line: the entry's metadata (not its contents)."""
    out: dict[str, Any] = {
        "name": entry.name,
        "type": str(entry.type),
        "mode": entry.mode,
        "uid": entry.uid,
        "gid": entry.gid,
        "userName": entry.uname,
        "groupName": entry.gname,
        "modtime": entry.modtime,
        "size": entry.size,
        "linkName": entry.link_name,
        "devMajor": entry.dev_major,
        "devMinor": entry.dev_minor,
        "xattrs": {k: base64.b64encode(v).decode("ascii") for k, v in entry.xattrs.items()},
        "nlink": entry.nlink,
        "digest": entry.digest or "",
        "chunks": len(entry.chunks),
    }
    if entry.implicit:
        out["implicit"] = True
    return out


def _register_convert(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert an image's layers to eStargz (stargzify)",
        description="SRC and DST: a registry reference (host/repo:tag, docker:// optional) or oci:DIR[:TAG].",
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--chunk-size", type=_positive, default=DEFAULT_CHUNK_SIZE, metavar="N", help="bytes per chunk (default 4 MiB)")
    p.add_argument("--prioritize", nargs="+", action="extend", default=[], metavar="PATH", help="files to put first in their layer, for prefetching")
    p.add_argument("--prioritize-file", type=argparse.FileType("r", encoding="utf-8"), metavar="FILE",
                   help="a file listing paths to prioritize, one per line; or a crfs optimize profile, whose byte "
                   "ranges read are hinted to mounts (annotation containerd.io/snapshot/crfs/prefetch-ranges)")
    p.add_argument("--prioritized-chunk-size", type=_positive, metavar="N",
                   help=f"bytes per chunk of the prioritized files (default: {PRIORITIZED_CHUNK_SIZE // 1024} KiB when "
                   "the file gives ranges, else --chunk-size)")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="convert only this platform of a multi-platform index")
    p.add_argument("--insecure", action="append", default=[], metavar="HOST", help="allow plain HTTP to HOST (loopback always may)")
    p.add_argument("--docker-config", type=Path, metavar="FILE", help="Docker config.json with credentials (default ~/.docker/config.json)")
    p.add_argument("--parallel", type=_positive, default=2, metavar="N", help="layers converted at once (default 2)")
    p.set_defaults(func=_convert)


def _convert(args: argparse.Namespace) -> int:
    prioritized = list(args.prioritize)
    ranges: dict = {}
    if args.prioritize_file:
        with args.prioritize_file as f:
            try:
                profile = read_profile_lines(f)
            except ProfileError as exc:
                print(f"crfs convert: {f.name}: {exc}", file=sys.stderr)
                return 2
        prioritized += profile.paths
        ranges = {p: r for p, r in profile.ranges.items() if p not in args.prioritize}  # --prioritize: whole
    chunk_size = args.prioritized_chunk_size or (PRIORITIZED_CHUNK_SIZE if ranges else None)
    try:
        platform = Platform.parse(args.platform) if args.platform else None
    except ValueError as exc:
        print(f"crfs convert: {exc}", file=sys.stderr)
        return 2
    options = ConvertOptions(chunk_size=args.chunk_size, prioritized=tuple(prioritized), prioritized_ranges=ranges,
                             prioritized_chunk_size=chunk_size, platform=platform, parallel_layers=args.parallel)
    config = RegistryConfig(insecure_hosts=frozenset(args.insecure), docker_config=args.docker_config)
    progress = TerminalProgress(sys.stderr) if sys.stderr.isatty() else None
    try:
        with RegistryClient(config) as client:
            src = open_store(args.src, client, create=False)
            dst = open_store(args.dst, client, create=True)
            digest = Converter(src, dst, options, progress.update if progress else None).run()
    except (ConvertError, RegistryError, LayoutError, StargzError, OSError) as exc:
        if progress:
            progress.finish()
        print(f"crfs convert: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if progress:
        progress.finish()
    print(json.dumps({"digest": digest, "destination": args.dst}))
    return 0


def _register_optimize(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "optimize",
        usage="crfs optimize [options] SRC DST (-- CMD… | --profile FILE)",
        help="convert to eStargz with the files CMD reads at start-up prioritized",
        description="Runs CMD in a container on a lazy mount of SRC (converted to eStargz as DST), records "
        "which files it reads, in order, and writes DST with them prioritized. DST must be a registry reference.",
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--profile", metavar="FILE", help="use this saved profile instead of running a command")
    p.add_argument("--save-profile", metavar="FILE", help="write the recorded profile here (for --profile later)")
    p.add_argument("--prioritized-chunk-size", type=_positive, default=PRIORITIZED_CHUNK_SIZE, metavar="N",
                   help=f"bytes per chunk of the prioritized files, so that mounts prefetch only the chunks read "
                   f"(default {PRIORITIZED_CHUNK_SIZE // 1024} KiB)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS", help="stop the command after this long and use what it read (default 60)")
    p.add_argument("--insecure", action="append", default=[], metavar="HOST", help="allow plain HTTP to HOST (loopback always may)")
    p.set_defaults(func=_optimize, command=[], takes_command=True)  # CMD: what follows "--"


def _optimize(args: argparse.Namespace) -> int:
    from .optimize import OptimizeError, optimize  # noqa: PLC0415 - mounts, namespaces

    command = args.command
    try:
        with RegistryClient(RegistryConfig(insecure_hosts=frozenset(args.insecure))) as client:
            digest, paths = optimize(args.src, args.dst, command, client, profile=args.profile,
                                     save_profile=args.save_profile, timeout=args.timeout,
                                     prioritized_chunk_size=args.prioritized_chunk_size,
                                     report=lambda text: print(f"crfs optimize: {text}", file=sys.stderr, flush=True))
    except (OptimizeError, ConvertError, RegistryError, LayoutError, StargzError, OSError) as exc:
        print(f"crfs optimize: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"digest": digest, "destination": args.dst, "prioritized": len(paths)}))
    return 0


class TerminalProgress:
    """One line per layer (read, compressed, pushed), redrawn in place."""

    def __init__(self, out: Any, interval: float = 0.2) -> None:
        self._out, self._interval = out, interval
        self._layers: dict[str, LayerProgress] = {}
        self._lines_drawn = 0
        self._last = 0.0
        self._lock = threading.Lock()

    def update(self, state: LayerProgress) -> None:
        with self._lock:
            self._layers[state.digest] = state
            now = time.monotonic()
            if state.done or now - self._last >= self._interval:
                self._last = now
                self._draw()

    def finish(self) -> None:
        with self._lock:
            self._draw()

    def _draw(self) -> None:
        if self._lines_drawn:
            self._out.write(f"\x1b[{self._lines_drawn}F")
        for s in self._layers.values():
            status = "done" if s.done else "pushing" if s.compressed else "converting" if s.read else "waiting"
            self._out.write(f"\x1b[2K{s.digest[:19]}  read {_mib(s.read)}  eStargz {_mib(s.compressed)}  pushed {_mib(s.pushed)}  {status}\n")
        self._lines_drawn = len(self._layers)
        self._out.flush()


def _mib(n: int) -> str:
    return f"{n / (1 << 20):7.1f} MiB"
