"""The ``crfs`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import importlib

from . import config
from .errors import SnapshotError

# Modules that add subcommands (``register(subparsers)``), by the commands
# they add. Only the one a command needs is imported: ``crfs rpull`` is on a
# container's critical path and must not pay for convert's or mount's imports.
_REGISTRARS = {
    "lazyfs.cli": ("convert", "optimize", "stargz"),
    "lazyfs.mount_cli": ("mount", "umount", "mount-status"),
    "snapshotter.rpull": ("rpull",),
}
_LOCAL_COMMANDS = ("serve", "status")


def _serve(args: argparse.Namespace) -> int:
    from .server import ServeError, serve

    overrides = {"root": args.root, "address": args.address, "log_level": args.log_level}
    try:
        cfg = config.load(args.config, overrides)
    except config.ConfigError as exc:
        print(f"crfs serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=cfg.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        serve(cfg)
    except (ServeError, SnapshotError, OSError) as exc:
        logging.getLogger("crfs").error("cannot serve: %s", exc)
        return 1
    return 0


def _status(args: argparse.Namespace) -> int:
    """One JSON line per layer mount of a crfs root: its process's counters,
    or why it does not answer."""
    from lazyfs import mount  # noqa: PLC0415

    try:
        cfg = config.load(args.config, {"root": args.root})
    except config.ConfigError as exc:
        print(f"crfs status: {exc}", file=sys.stderr)
        return 2
    layers = cfg.root / "layers"
    healthy = True
    for path in sorted(layers.iterdir()) if layers.is_dir() else []:
        line = {"layer": path.name.replace("-", ":", 1), "mountpoint": str(path)}
        try:
            line.update(mount.status(path, timeout=5.0))
        except (mount.MountError, ValueError) as exc:
            line["error"] = str(exc)
            healthy = False
        print(json.dumps(line), flush=True)
    return 0 if healthy else 1


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only what that subcommand needs
    (every subcommand when it is unknown, for the usage message)."""
    parser = argparse.ArgumentParser(prog="crfs", description="containerd remote snapshotter with lazy pulling")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve containerd's Snapshots API on a unix socket")
    serve.add_argument("--root", type=Path, help="state directory (default /var/lib/containerd-crfs as root)")
    serve.add_argument("--address", type=Path, help="unix socket path (default /run/containerd-crfs/containerd-crfs-grpc.sock as root)")
    serve.add_argument("--config", type=Path, help="TOML config file (see config/crfs.toml)")
    serve.add_argument("--log-level", choices=config.LOG_LEVELS)
    serve.set_defaults(func=_serve)
    status = sub.add_parser("status", help="the lazily mounted layers of a crfs root, one JSON line each")
    status.add_argument("--root", type=Path, help="state directory of the crfs serve to report on")
    status.add_argument("--config", type=Path, help="TOML config file (for its root)")
    status.set_defaults(func=_status)
    needed = [m for m, commands in _REGISTRARS.items() if command in commands]
    if not needed and command not in _LOCAL_COMMANDS:
        needed = list(_REGISTRARS)
    for module in needed:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:  # a command to run (crfs optimize … -- CMD…) is never parsed as options
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if command:
        if not getattr(args, "takes_command", False):
            parser.error(f"unexpected arguments after --: {' '.join(command)}")
        args.command = command
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
