"""``crfs mount``, ``crfs umount`` and ``crfs mount-status``: lazily mounted
layers (or a whole image, merged) without containerd.

``register(subparsers)`` adds the commands to the ``crfs`` parser; each
sets ``func(args) -> exit code``.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import image_mount, mount
from .layer_source import RemoteOptions


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mount``, ``umount`` and ``mount-status`` to a parent parser's subcommands."""
    p = subparsers.add_parser("mount", help="lazily mount a stargz/eStargz layer at DIR (read-only)")
    p.add_argument("source", metavar="SOURCE", help="docker://host/repo:tag (all layers, merged), /path/layer.stargz, https://…/layer.stargz or registry://host/repo@sha256:…")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--toc-digest", metavar="D", help="expected TOC digest; every chunk is then verified")
    p.add_argument("--cache-dir", metavar="DIR", help="chunk cache for remote layers")
    p.add_argument("--blob-digest", metavar="D", help="digest of an https:// blob (keys the cache)")
    p.add_argument("--no-background-fetch", dest="background_fetch", action="store_false", help="fetch only what is read and the prioritized files, not the rest of the layer")
    p.add_argument("--fetch-deadline", type=float, default=60.0, metavar="SECONDS", help="a read that cannot get its data within this fails with EIO (default 60)")
    p.add_argument("--upper", metavar="DIR", help="docker:// only: keep the writable layer here (default: scratch, removed on umount)")
    p.add_argument("--foreground", action="store_true", help="serve from this process until SIGTERM / unmount")
    p.set_defaults(func=_mount)

    p = subparsers.add_parser("umount", help="unmount a layer mounted by crfs mount")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=_umount)

    p = subparsers.add_parser("mount-status", help="a layer mount's counters as JSON")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=_status)


def _mount(args: argparse.Namespace) -> int:
    remote = RemoteOptions(cache_dir=args.cache_dir, blob_digest=args.blob_digest, background_fetch=args.background_fetch,
                           fetch_deadline=args.fetch_deadline)
    if args.source.startswith(image_mount.DOCKER_SCHEME):
        if args.foreground:
            print("crfs mount: --foreground is for one layer, not docker:// images", file=sys.stderr)
            return 2
        try:
            record = image_mount.mount_image(args.source, args.dir, remote=remote, upper=args.upper)
        except Exception as exc:  # noqa: BLE001 - registry, stargz and mount errors alike
            print(f"crfs mount: {exc}", file=sys.stderr)
            return 1
        print(json.dumps({"mountpoint": record.mountpoint, "layers": len(record.layers), "pids": record.pids}))
        return 0
    if args.upper:
        print("crfs mount: --upper is for docker:// images", file=sys.stderr)
        return 2
    if args.foreground:
        argv = ["--source", args.source, "--mountpoint", args.dir, "--control", str(mount.control_path(args.dir))]
        mount.control_path(args.dir).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if args.toc_digest:
            argv += ["--toc-digest", args.toc_digest]
        return mount.main(argv + mount.remote_args(remote))
    try:
        pid = mount.start(args.source, args.dir, toc_digest=args.toc_digest, remote=remote)
    except mount.MountError as exc:
        print(f"crfs mount: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"mountpoint": args.dir, "pid": pid}))
    return 0


def _umount(args: argparse.Namespace) -> int:
    try:
        if image_mount.is_image_mount(args.dir):
            image_mount.unmount_image(args.dir)
        else:
            mount.unmount(args.dir)
    except mount.MountError as exc:
        print(f"crfs umount: {exc}", file=sys.stderr)
        return 1
    return 0


def _status(args: argparse.Namespace) -> int:
    try:
        print(json.dumps(mount.status(args.dir), indent=2))
    except mount.MountError as exc:
        print(f"crfs mount-status: {exc}", file=sys.stderr)
        return 1
    return 0
