"""Client configuration: one immutable object passed in, no global state."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence
from urllib.parse import urlsplit

from .errors import ConfigError, InsecureRegistry
from .manifest import Platform
from .reference import normalize_host


def is_loopback(host: str) -> bool:
    """Whether ``host`` (``name[:port]``) names this machine: plain HTTP is fine there."""
    name = split_host(host)[0]
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def split_host(host: str) -> tuple[str, Optional[int]]:
    """``"h:5000"`` -> ``("h", 5000)``; ``"[::1]:5000"`` -> ``("::1", 5000)``."""
    parts = urlsplit(f"//{host}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"invalid port in host {host!r}") from None
    return (parts.hostname or ""), port


@dataclass(frozen=True)
class Endpoint:
    """Where to send API requests: ``scheme`` None means found by the first
    request (https first; http only where plain HTTP is allowed)."""

    host: str
    scheme: Optional[str] = None
    mirror: bool = False

    def url(self, scheme: str, path: str) -> str:
        return f"{scheme}://{self.host}{path}"


@dataclass(frozen=True)
class RegistryConfig:
    """Everything the client needs that is not in a reference.

    ``insecure_hosts``: hosts (``name[:port]``; a bare name covers every port)
    where plain HTTP is allowed; loopback always is.
    ``mirrors``: registry name -> mirror hosts or URLs (``https://m:5000``),
    tried in order for pulls before the registry itself.
    ``ca_file``: PEM bundle trusted instead of the system CAs.
    ``docker_config``: path of a Docker ``config.json``; None means
    ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``.
    ``max_attempts`` and ``retry_budget`` (seconds) bound each request's
    retries; ``backoff_initial``/``backoff_max`` shape the exponential backoff.
    A mirror that was unreachable is skipped for ``mirror_cooldown`` seconds.
    Blobs larger than ``upload_chunk_size`` are pushed in chunks of that size
    (0: always one PUT).
    """

    insecure_hosts: frozenset[str] = frozenset()
    mirrors: Mapping[str, Sequence[str]] = field(default_factory=dict)
    ca_file: Optional[Path] = None
    docker_config: Optional[Path] = None
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 5
    retry_budget: float = 60.0
    backoff_initial: float = 0.2
    backoff_max: float = 5.0
    mirror_cooldown: float = 30.0
    upload_chunk_size: int = 16 << 20
    credential_helper_timeout: float = 30.0
    platform: Optional[Platform] = None
    user_agent: str = "crfs-lazyfs-registry/0.1"

    def __post_init__(self) -> None:
        object.__setattr__(self, "insecure_hosts", frozenset(h.lower() for h in self.insecure_hosts))
        object.__setattr__(
            self, "mirrors", {normalize_host(k): tuple(v) for k, v in dict(self.mirrors).items()}
        )
        if self.max_attempts < 1:
            raise ConfigError("max_attempts must be at least 1")
        if min(self.connect_timeout, self.read_timeout, self.retry_budget) <= 0:
            raise ConfigError("timeouts and retry_budget must be positive")
        for registry in self.mirrors:
            self.mirror_endpoints(registry)  # validate early: a bad mirror is a config error

    # what a config file may set (``from_dict``); the rest are tuning knobs
    FILE_KEYS = ("insecure_hosts", "mirrors", "ca_file", "docker_config", "connect_timeout", "read_timeout")

    @classmethod
    def from_dict(cls, values: Mapping[str, object], source: str = "registry config") -> "RegistryConfig":
        """A config from a parsed file section (TOML or JSON); ConfigError
        names the bad key."""
        unknown = sorted(set(values) - set(cls.FILE_KEYS))
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)} (known: {', '.join(cls.FILE_KEYS)})")
        kw: dict[str, object] = {}
        hosts = values.get("insecure_hosts", [])
        if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
            raise ConfigError(f"{source}: insecure_hosts must be a list of host[:port] strings")
        kw["insecure_hosts"] = frozenset(hosts)
        mirrors = values.get("mirrors", {})
        if not isinstance(mirrors, Mapping) or not all(
            isinstance(m, list) and all(isinstance(x, str) for x in m) for m in mirrors.values()
        ):
            raise ConfigError(f"{source}: mirrors must map a registry name to a list of mirror hosts or URLs")
        kw["mirrors"] = {str(k): list(v) for k, v in mirrors.items()}
        for key in ("ca_file", "docker_config"):
            if key in values:
                if not isinstance(values[key], str) or not Path(str(values[key])).is_absolute():
                    raise ConfigError(f"{source}: {key} must be an absolute path")
                kw[key] = Path(str(values[key]))
        for key in ("connect_timeout", "read_timeout"):
            if key in values:
                if isinstance(values[key], bool) or not isinstance(values[key], (int, float)):
                    raise ConfigError(f"{source}: {key} must be a number of seconds")
                kw[key] = float(values[key])  # type: ignore[arg-type]
        return cls(**kw)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        """The ``from_dict`` keys, JSON-ready (to hand to another process)."""
        out: dict[str, object] = {
            "insecure_hosts": sorted(self.insecure_hosts),
            "mirrors": {k: list(v) for k, v in self.mirrors.items()},
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
        }
        if self.ca_file is not None:
            out["ca_file"] = str(self.ca_file)
        if self.docker_config is not None:
            out["docker_config"] = str(self.docker_config)
        return out

    def plain_http_allowed(self, host: str) -> bool:
        host = host.lower()
        return is_loopback(host) or host in self.insecure_hosts or split_host(host)[0] in self.insecure_hosts

    def mirror_endpoints(self, registry: str) -> list[Endpoint]:
        """The configured mirrors of ``registry``, parsed and checked."""
        out = []
        for spec in self.mirrors.get(normalize_host(registry), ()):
            scheme = None
            host = spec
            if "://" in spec:
                parts = urlsplit(spec)
                scheme, host = parts.scheme.lower(), parts.netloc
                if scheme not in ("http", "https") or not host or parts.path.strip("/") or parts.query:
                    raise ConfigError(f"mirror {spec!r} of {registry}: expected [http[s]://]host[:port]")
            split_host(host)
            if scheme == "http" and not self.plain_http_allowed(host):
                raise InsecureRegistry(
                    f"mirror {spec!r} of {registry} uses plain HTTP; add {host!r} to insecure_hosts to allow it"
                )
            out.append(Endpoint(host.lower(), scheme, mirror=True))
        return out
