"""crfs configuration: defaults, the TOML file, command-line overrides.

Defaults follow the field's conventions (stargz-snapshotter,
fuse-overlayfs-snapshotter): system paths as root, XDG paths otherwise.
Every option is documented in config/crfs.toml.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional

from lazyfs.privilege import is_host_root
from lazyfs.registry.config import RegistryConfig
from lazyfs.registry.errors import ConfigError as RegistryConfigError

LOG_LEVELS = ("debug", "info", "warning", "error")
SYNC_MODES = ("normal", "full")


class ConfigError(Exception):
    """The config file or an option is wrong; the message says which."""


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def default_config_path() -> Path:
    if is_host_root():
        return Path("/etc/containerd-crfs/config.toml")
    return _xdg("XDG_CONFIG_HOME", ".config") / "containerd-crfs" / "config.toml"


@dataclass(frozen=True)
class Config:
    root: Path
    address: Path
    socket_group: str = ""  # non-empty: socket mode 0660, owned by this group
    log_level: str = "info"
    # SQLite synchronous mode: "full" survives power loss, "normal" survives
    # a crash of crfs (WAL) and is faster.
    metadata_sync: str = "full"
    grpc_workers: int = 8
    # Remote snapshots: layers whose Prepare names them (CRI / `crfs rpull`
    # labels) and that are eStargz are mounted lazily instead of downloaded.
    remote_snapshots: bool = True
    # Seconds a Prepare waits for a layer to mount before containerd is told
    # to download it instead (a slow registry must not stall a pull).
    remote_mount_timeout: float = 20.0
    # After a layer is mounted, fetch the rest of it in the background.
    background_fetch: bool = True
    # Seconds a read may wait for its chunks before it fails with EIO.
    fetch_deadline: float = 30.0
    # A Prepare names the image's next layers too (cri.image-layers): crfs
    # starts mounting them at once, in parallel, and keeps each such early
    # mount this many seconds for its own Prepare before letting it go.
    premount_hold: float = 60.0
    # Seconds between health checks of the layer mount processes.
    mount_check_interval: float = 1.0
    # On SIGTERM, unmount every layer (else they keep serving running
    # containers and the next `crfs serve` adopts them).
    unmount_on_stop: bool = False
    # KiB after each range a read fetches to bring along in the same request
    # (the next small files, usually read next at start-up); 0: none.
    read_around_kib: int = 64
    # Registry requests in flight at once, over every layer process.
    max_concurrent_fetches: int = 16
    # Cap (RLIMIT_DATA) on the memory of each layer process, in MiB; a
    # process that reaches it fails its allocation and is restarted.
    mount_memory_limit_mib: int = 1024
    # [registry]: mirrors, insecure_hosts, docker_config, ca_file,
    # connect_timeout, read_timeout (lazyfs.registry.config.RegistryConfig)
    registry: dict = field(default_factory=dict)

    @classmethod
    def defaults(cls) -> "Config":
        if is_host_root():
            return cls(root=Path("/var/lib/containerd-crfs"), address=Path("/run/containerd-crfs/containerd-crfs-grpc.sock"))
        runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
        return cls(
            root=_xdg("XDG_DATA_HOME", ".local/share") / "containerd-crfs",
            address=Path(runtime) / "containerd-crfs" / "containerd-crfs-grpc.sock",
        )

    def merged(self, values: dict[str, Any], source: str) -> "Config":
        """A copy with ``values`` (from a file or flags) applied and checked."""
        known = {f.name: f for f in fields(self)}
        changes: dict[str, Any] = {}
        for name, value in values.items():
            if value is None:
                continue
            if name not in known:
                raise ConfigError(f"{source}: unknown option {name!r} (known: {', '.join(sorted(known))})")
            if name in ("root", "address"):
                value = Path(value)
                if not value.is_absolute():
                    raise ConfigError(f"{source}: {name} must be an absolute path, not {str(value)!r}")
            elif name == "registry":
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: [registry] must be a table")
                try:
                    RegistryConfig.from_dict(value, f"{source}: [registry]")
                except RegistryConfigError as exc:
                    raise ConfigError(str(exc)) from None
            elif isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool):
                least = 0 if name == "read_around_kib" else 1
                if not isinstance(value, int) or isinstance(value, bool) or value < least:
                    raise ConfigError(f"{source}: {name} must be {'a positive integer' if least else 'an integer >= 0'}")
            elif isinstance(getattr(self, name), bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"{source}: {name} must be true or false")
            elif isinstance(getattr(self, name), float):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise ConfigError(f"{source}: {name} must be a positive number of seconds")
                value = float(value)
            elif not isinstance(value, str):
                raise ConfigError(f"{source}: {name} must be a string")
            changes[name] = value
        cfg = replace(self, **changes)
        if cfg.log_level not in LOG_LEVELS:
            raise ConfigError(f"{source}: log_level must be one of {', '.join(LOG_LEVELS)}")
        if cfg.metadata_sync not in SYNC_MODES:
            raise ConfigError(f"{source}: metadata_sync must be one of {', '.join(SYNC_MODES)}")
        return cfg


def load(path: Optional[Path], overrides: dict[str, Any]) -> Config:
    """Defaults, then the file (``path``, or the default path if it exists), then flags."""
    cfg = Config.defaults()
    explicit = path is not None
    path = path or default_config_path()
    if explicit or path.exists():
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
        cfg = cfg.merged(data, str(path))
    return cfg.merged(overrides, "command line")
