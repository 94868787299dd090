"""A throwaway OCI registry (docker-registry 2.8) on 127.0.0.1, so image
pulls are real HTTP pulls without network access."""

from __future__ import annotations

import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

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


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


class Registry(Managed):
    """``with Registry() as reg:`` serves ``reg.host`` until the block ends."""

    def __init__(self, workdir: Optional[Path] = None, start_timeout: float = 20.0):
        self._given_workdir = workdir
        self.start_timeout = start_timeout
        self.workdir: Optional[Path] = None
        self.port = 0
        self.daemon: Optional[Daemon] = None

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, as used in image references."""
        return f"127.0.0.1:{self.port}"

    def _start(self) -> None:
        binary = require_binary("docker-registry")
        self.workdir = self._given_workdir or Path(tempfile.mkdtemp(prefix="crfs-reg-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        storage = self.workdir / "storage"
        storage.mkdir(exist_ok=True)
        self.port = free_port()
        config = self.workdir / "config.yml"
        config.write_text(CONFIG.format(storage=storage, port=self.port))
        self.daemon = Daemon("docker-registry", [binary, "serve", str(config)], self.workdir / "registry.log")
        self.daemon.start()
        self.daemon.wait_until(lambda: _answers(f"http://{self.host}/v2/"), "answering /v2/", self.start_timeout)

    def _stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        if self.workdir is not None and self._given_workdir is None:
            remove_tree(self.workdir)
