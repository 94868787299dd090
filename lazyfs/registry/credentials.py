"""Credentials from the Docker config file, the way the docker CLI finds them.

Order for a registry host: ``credHelpers[host]`` -> ``credsStore`` ->
``auths[host]`` (``auth`` base64 ``user:pass``, or ``username``/``password``,
or ``identitytoken``). Helpers are run as ``docker-credential-NAME get`` with
the server URL on stdin. Secrets live only in ``Credential`` objects whose
repr hides them; nothing here logs them or puts them in error messages.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit

from .errors import CredentialsError
from .reference import DOCKER_HUB, normalize_host

log = logging.getLogger(__name__)

# Docker keeps Hub credentials under this legacy URL.
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"


@dataclass(frozen=True)
class Credential:
    """A username + password, or an identity (OAuth2 refresh) token."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    def __repr__(self) -> str:
        kind = "identity-token" if self.identity_token else "password"
        return f"Credential(username={self.username!r}, {kind}=<hidden>)"


def default_config_path(environ: Mapping[str, str] = os.environ) -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    if environ.get("DOCKER_CONFIG"):
        return Path(environ["DOCKER_CONFIG"]) / "config.json"
    return Path(environ.get("HOME") or Path.home()) / ".docker" / "config.json"


def _auth_key(key: str) -> str:
    """``https://host:5000/v1/`` -> ``host:5000``; Hub aliases -> ``docker.io``."""
    if "://" in key:
        key = urlsplit(key).netloc
    else:
        key = key.split("/", 1)[0]
    return normalize_host(key)


class CredentialStore:
    """Looks credentials up lazily and caches the answers per host.

    ``path`` is the Docker config file (None: the default location). A
    missing file means anonymous access; a malformed one is an error.
    """

    def __init__(
        self,
        path: Optional[Path] = None,
        *,
        helper_timeout: float = 30.0,
        environ: Optional[Mapping[str, str]] = None,
    ) -> None:
        self._environ = dict(os.environ if environ is None else environ)
        self.path = Path(path) if path is not None else default_config_path(self._environ)
        self._helper_timeout = helper_timeout
        self._config: Optional[dict[str, Any]] = None
        self._cache: dict[str, Optional[Credential]] = {}
        self._lock = threading.Lock()

    def get(self, host: str) -> Optional[Credential]:
        """Credentials for registry ``host`` (``name[:port]``), or None."""
        host = normalize_host(host)
        with self._lock:
            if host not in self._cache:
                self._cache[host] = self._lookup(host)
            return self._cache[host]

    def _load(self) -> dict[str, Any]:
        if self._config is None:
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                self._config = {}
                return self._config
            except OSError as e:
                raise CredentialsError(f"cannot read Docker config {self.path}: {e.strerror}") from None
            try:
                data = json.loads(text) if text.strip() else {}
            except ValueError as e:
                raise CredentialsError(f"Docker config {self.path} is not valid JSON: {e}") from None
            if not isinstance(data, dict):
                raise CredentialsError(f"Docker config {self.path} is not a JSON object")
            self._config = data
        return self._config

    def _lookup(self, host: str) -> Optional[Credential]:
        config = self._load()
        helpers = config.get("credHelpers") or {}
        helper = next((h for k, h in helpers.items() if _auth_key(k) == host), None)
        if helper:
            return self._from_helper(helper, host)
        if config.get("credsStore"):
            found = self._from_helper(config["credsStore"], host)
            if found is not None:
                return found
        return self._from_auths(config.get("auths") or {}, host)

    def _from_auths(self, auths: Mapping[str, Any], host: str) -> Optional[Credential]:
        for key, entry in auths.items():
            if _auth_key(key) != host or not isinstance(entry, dict):
                continue
            username = entry.get("username") or ""
            password = entry.get("password") or ""
            if entry.get("auth"):
                try:
                    decoded = base64.b64decode(entry["auth"], validate=True).decode()
                except (binascii.Error, UnicodeDecodeError, ValueError):
                    raise CredentialsError(f"Docker config {self.path}: 'auth' of {key!r} is not base64") from None
                username, sep, password = decoded.partition(":")
                if not sep:
                    raise CredentialsError(f"Docker config {self.path}: 'auth' of {key!r} is not user:password")
            token = entry.get("identitytoken") or ""
            if username or password or token:
                return Credential(username, password, token)
        return None

    def _from_helper(self, helper: str, host: str) -> Optional[Credential]:
        program = f"docker-credential-{helper}"
        server = DOCKER_HUB_AUTH_KEY if host == DOCKER_HUB else host
        try:
            proc = subprocess.run(
                [program, "get"],
                input=server,
                capture_output=True,
                text=True,
                timeout=self._helper_timeout,
                env=self._environ,
            )
        except FileNotFoundError:
            raise CredentialsError(f"credential helper {program} (for {host}) not found on PATH") from None
        except subprocess.TimeoutExpired:
            raise CredentialsError(f"credential helper {program} (for {host}) timed out") from None
        if proc.returncode != 0:
            message = (proc.stdout.strip() or proc.stderr.strip())[:200]
            if "credentials not found" in message.lower():
                return None
            # A failing helper prints an error message, never the secret.
            raise CredentialsError(f"credential helper {program} failed for {host}: exit {proc.returncode}: {message}")
        try:
            data = json.loads(proc.stdout)
            username, secret = str(data.get("Username") or ""), str(data.get("Secret") or "")
        except (ValueError, AttributeError):
            raise CredentialsError(f"credential helper {program} returned malformed output for {host}") from None
        if not secret:
            return None
        log.debug("credentials for %s from %s", host, program)
        if username == "<token>":
            return Credential(identity_token=secret)
        return Credential(username, secret)
