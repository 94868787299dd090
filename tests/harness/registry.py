"""A throwaway OCI registry (docker-registry 2.8) on 127.0.0.1, so image
pulls are real HTTP pulls without network access.

By default: plain HTTP, no auth. ``auth=`` adds an ``auth:`` section (e.g.
``{"htpasswd": {"realm": "r", "path": "/x/htpasswd"}}``) and ``tls=(cert,
key)`` serves HTTPS; readiness then accepts a 401 and skips verification.
"""

from __future__ import annotations

import json
import ssl
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping, Optional

from .mounts import remove_tree
from .proc import Daemon, Managed, free_port, require_binary

CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""


def _answers(url: str, *, auth: bool = False) -> bool:
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as resp:
            return resp.status == 200
    except urllib.error.HTTPError as e:
        return auth and e.code == 401
    except (urllib.error.URLError, OSError):
        return False


def _yaml_section(name: str, values: Mapping[str, object], indent: str = "") -> str:
    """A nested mapping of scalars as YAML (values JSON-quoted, which YAML accepts)."""
    lines = [f"{indent}{name}:"]
    for key, value in values.items():
        if isinstance(value, Mapping):
            lines.append(_yaml_section(key, value, indent + "  "))
        else:
            lines.append(f"{indent}  {key}: {json.dumps(str(value))}")
    return "\n".join(lines)


class Registry(Managed):
    """``with Registry() as reg:`` serves ``reg.host`` until the block ends."""

    def __init__(
        self,
        workdir: Optional[Path] = None,
        start_timeout: float = 20.0,
        *,
        auth: Optional[Mapping[str, Mapping[str, object]]] = None,
        tls: Optional[tuple[Path, Path]] = None,
    ):
        self._given_workdir = workdir
        self.start_timeout = start_timeout
        self.auth = auth
        self.tls = tls
        self.workdir: Optional[Path] = None
        self.port = 0
        self.daemon: Optional[Daemon] = None

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, as used in image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http[s]://127.0.0.1:PORT``."""
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def _start(self) -> None:
        binary = require_binary("docker-registry")
        self.workdir = self._given_workdir or Path(tempfile.mkdtemp(prefix="crfs-reg-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        storage = self.workdir / "storage"
        storage.mkdir(exist_ok=True)
        self.port = free_port()
        config = self.workdir / "config.yml"
        text = CONFIG.format(storage=storage, port=self.port)
        if self.tls:
            cert, key = self.tls
            text += _yaml_section("tls", {"certificate": cert, "key": key}, "  ") + "\n"
        if self.auth:
            text += _yaml_section("auth", self.auth) + "\n"
        config.write_text(text)
        self.daemon = Daemon("docker-registry", [binary, "serve", str(config)], self.workdir / "registry.log")
        self.daemon.start()
        ready = lambda: _answers(f"{self.url}/v2/", auth=bool(self.auth))  # noqa: E731
        self.daemon.wait_until(ready, "answering /v2/", self.start_timeout)

    def _stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        if self.workdir is not None and self._given_workdir is None:
            remove_tree(self.workdir)
