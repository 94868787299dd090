"""Typed failures of the registry client.

Every error names what it can of where it happened (host, repository, the
blob/manifest/tag, the HTTP status), because the caller is usually a FUSE
read deep in a mount process and the message is all an operator will see.
Messages never contain credentials or tokens.
"""

from __future__ import annotations

from typing import Optional


class RegistryError(Exception):
    """Base class: the registry (or the way to it) did not do what we asked."""

    def __init__(
        self,
        message: str,
        *,
        host: Optional[str] = None,
        repo: Optional[str] = None,
        target: Optional[str] = None,
        status: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.host = host
        self.repo = repo
        self.target = target
        self.status = status

    def __str__(self) -> str:
        where = []
        if self.host:
            where.append(f"host {self.host}")
        if self.repo:
            where.append(f"repo {self.repo}")
        if self.target:
            where.append(self.target)
        if self.status is not None:
            where.append(f"HTTP {self.status}")
        return f"{self.message} ({', '.join(where)})" if where else self.message


class InvalidReference(RegistryError, ValueError):
    """An image reference or digest string that cannot be parsed."""


class ConfigError(RegistryError, ValueError):
    """The client configuration is unusable (e.g. a bad mirror URL)."""


class InsecureRegistry(ConfigError):
    """Plain HTTP was needed for a host that is neither loopback nor configured insecure."""


class AuthError(RegistryError):
    """Authentication or authorization failed (401/403, token server refused)."""


class CredentialsError(AuthError):
    """The Docker config or a credential helper could not be read."""


class NotFound(RegistryError):
    """The repository, manifest, tag, blob or matching platform does not exist."""


class DigestMismatch(RegistryError):
    """Content did not hash to the digest it was requested or announced by."""


class ProtocolError(RegistryError):
    """The registry answered, but not as the distribution API says it must
    (wrong Content-Range, short body, malformed manifest, missing Location)."""


class Unreachable(RegistryError):
    """No usable answer within the retry budget: connection refused/reset,
    timeouts, or a transient status (5xx, 429) that never cleared."""


class TLSError(Unreachable):
    """TLS failed: certificate not trusted, or (``not_tls``) the server does not speak TLS."""

    def __init__(self, message: str, *, not_tls: bool = False, **where: object) -> None:
        super().__init__(message, **where)  # type: ignore[arg-type]
        self.not_tls = not_tls


class IncompleteBody(ProtocolError):
    """A response body ended before its announced length (retried, then raised)."""
