"""Registry authentication: anonymous, HTTP Basic, and Bearer tokens.

A registry says how it wants to be authenticated in the ``WWW-Authenticate``
header of a 401. For Bearer, the client asks the token server named by
``realm`` for a token covering the scopes it needs
(``repository:NAME:pull[,push]``), and reuses tokens until shortly before
they expire. Credentials go to the registry host they belong to and to the
token realm that registry names, never elsewhere, and are never logged.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional
from urllib.parse import urlencode, urlsplit, urlunsplit

from .credentials import Credential
from .errors import AuthError, ProtocolError
from .transport import Transport
from .wire import HttpResponse

log = logging.getLogger(__name__)

DEFAULT_TOKEN_LIFETIME = 60.0
CLIENT_ID = "crfs-lazyfs"


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower-case: "basic" or "bearer"
    params: dict[str, str] = field(default_factory=dict)


_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAM = re.compile(rf'\s*({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|{_TOKEN})\s*(,|$)')
_SCHEME = re.compile(rf"\s*({_TOKEN})(?:\s+|$)")


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value (possibly several challenges)."""
    out: list[Challenge] = []
    pos = 0
    header = header or ""
    while pos < len(header):
        while pos < len(header) and header[pos] in ", \t":
            pos += 1
        m = _SCHEME.match(header, pos)
        if not m:
            break
        current = Challenge(m.group(1).lower(), {})
        out.append(current)
        pos = m.end()
        while True:
            p = _PARAM.match(header, pos)
            if not p:
                break
            value = p.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            current.params[p.group(1).lower()] = value
            pos = p.end()
    return out


def repo_scope(repo: str, actions: str) -> str:
    return f"repository:{repo}:{actions}"


def _scope_map(scopes: Iterable[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for s in scopes:
        resource, _, actions = s.rpartition(":")
        out.setdefault(resource, set()).update(a for a in actions.split(",") if a)
    return out


def covers(granted: Iterable[str], needed: Iterable[str]) -> bool:
    """Whether scopes ``granted`` include every action of ``needed``."""
    have = _scope_map(granted)
    return all(actions <= have.get(resource, set()) for resource, actions in _scope_map(needed).items())


def basic_header(cred: Credential) -> str:
    raw = f"{cred.username}:{cred.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def _with_query(url: str, params: list[tuple[str, str]]) -> str:
    """``url`` with ``params`` appended to its query (the realm may have one)."""
    if not params:
        return url
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode(params)) if q)
    return urlunsplit(parts._replace(query=query, fragment=""))


@dataclass
class _Token:
    scopes: frozenset[str]
    value: str = field(repr=False)
    expires: float


class HostAuth:
    """The authentication state of one registry host: its challenge, its
    credentials (looked up lazily), and its cached tokens."""

    def __init__(
        self,
        host: str,
        credential: Callable[[], Optional[Credential]],
        transport: Transport,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self._credential = credential
        self._transport = transport
        self._clock = clock
        self.challenge: Optional[Challenge] = None
        self._tokens: list[_Token] = []
        self._lock = threading.Lock()

    def learn(self, response: HttpResponse) -> bool:
        """Take the challenge of a 401 (Bearer preferred); False if there is none usable."""
        challenges = parse_challenges(response.headers.get("WWW-Authenticate", ""))
        usable = [c for c in challenges if c.scheme in ("bearer", "basic")]
        if not usable:
            return False
        chosen = next((c for c in usable if c.scheme == "bearer"), usable[0])
        if chosen.scheme == "bearer" and not chosen.params.get("realm"):
            raise ProtocolError("Bearer challenge without realm", host=self.host, status=response.status_code)
        self.challenge = chosen
        return True

    def authorization(self, scopes: frozenset[str]) -> Optional[str]:
        """The Authorization header value for a request needing ``scopes``, if any."""
        ch = self.challenge
        if ch is None:
            return None
        if ch.scheme == "basic":
            cred = self._credential()
            return basic_header(cred) if cred is not None and not cred.identity_token else None
        return "Bearer " + self._token(scopes, ch)

    def after_unauthorized(
        self, response: HttpResponse, scopes: frozenset[str], sent: Optional[str]
    ) -> Optional[frozenset[str]]:
        """After a 401: the scopes to retry with, or None when retrying cannot help."""
        if not self.learn(response):
            return None
        ch = self.challenge
        assert ch is not None
        if ch.scheme == "basic":
            cred = self._credential()
            if cred is None or (sent or "").startswith("Basic "):
                return None
            return scopes
        if sent and sent.startswith("Bearer "):
            self._forget(sent[len("Bearer ") :])
        asked = frozenset(ch.params.get("scope", "").split())
        return scopes if covers(scopes, asked) else scopes | asked

    def _forget(self, value: str) -> None:
        with self._lock:
            self._tokens = [t for t in self._tokens if t.value != value]

    def _token(self, scopes: frozenset[str], ch: Challenge) -> str:
        with self._lock:
            now = self._clock()
            self._tokens = [t for t in self._tokens if t.expires > now]
            for t in self._tokens:
                if covers(t.scopes, scopes):
                    return t.value
            token = self._fetch(scopes, ch)
            self._tokens.append(token)
            return token.value

    def _fetch(self, scopes: frozenset[str], ch: Challenge) -> _Token:
        realm = ch.params["realm"]
        service = ch.params.get("service", "")
        realm_host = urlsplit(realm).netloc
        cred = self._credential()
        sorted_scopes = sorted(scopes)
        headers = {"Accept": "application/json"}
        if cred is not None and cred.identity_token:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": cred.identity_token,
                "service": service,
                "scope": " ".join(sorted_scopes),
                "client_id": CLIENT_ID,
            }
            body = urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            resp = self._transport.send("POST", realm, headers=headers, body=body)
        else:
            if cred is not None:
                headers["Authorization"] = basic_header(cred)
            query = [("service", service)] if service else []
            query += [("scope", s) for s in sorted_scopes]
            url = _with_query(realm, query)
            resp = self._transport.send("GET", url, headers=headers)
        with resp:
            if resp.status_code in (401, 403):
                who = f"user {cred.username!r}" if cred and cred.username else "anonymous"
                raise AuthError(
                    f"token server {realm_host} refused {who} for {' '.join(sorted_scopes) or 'no scope'}",
                    host=self.host,
                    status=resp.status_code,
                )
            if resp.status_code != 200:
                raise AuthError(f"token server {realm_host} failed", host=self.host, status=resp.status_code)
            try:
                data = resp.json()
                value = data.get("token") or data.get("access_token")
                lifetime = float(data.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
            except (ValueError, AttributeError, TypeError):
                raise ProtocolError(f"token server {realm_host} sent malformed JSON", host=self.host) from None
        if not value or not isinstance(value, str):
            raise ProtocolError(f"token server {realm_host} sent no token", host=self.host)
        if lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        # Renew a little early so a token does not expire in flight.
        expires = self._clock() + lifetime - min(5.0, lifetime * 0.1)
        log.debug("token for %s from %s (%s), valid %.0fs", self.host, realm_host, " ".join(sorted_scopes), lifetime)
        return _Token(scopes, value, expires)
