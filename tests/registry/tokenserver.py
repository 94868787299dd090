"""A minimal Docker token server (the ``auth: token:`` side of a registry).

Issues RS256 JWTs carrying the signing certificate in ``x5c``: registry 2.8
accepts a token whose x5c chain verifies against its ``rootcertbundle``
(the alternative, ``kid``, must be the libtrust fingerprint of the key).
Every request is recorded so tests can count token fetches and scopes.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Mapping, Optional
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from .certs import make_signing_cert
from .httpserver import BackgroundServer


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class TokenRequest:
    method: str
    user: Optional[str]  # None: anonymous
    service: str
    scopes: tuple[str, ...]
    granted: bool


class TokenServer:
    """``with TokenServer(tmp) as ts:``; ``ts.registry_auth()`` is the
    registry's ``auth:`` section. Users with a password get every action
    they ask for; anonymous callers get ``pull`` only if ``anonymous_pull``.
    ``refresh_tokens`` maps identity tokens to users (OAuth2 POST flow)."""

    def __init__(
        self,
        workdir: Path,
        *,
        users: Mapping[str, str] = (),
        anonymous_pull: bool = False,
        expires_in: int = 300,
        refresh_tokens: Mapping[str, str] = (),
        service: str = "crfs-test-registry",
        issuer: str = "crfs-test-issuer",
    ) -> None:
        self.workdir = workdir
        self.users = dict(users)
        self.anonymous_pull = anonymous_pull
        self.expires_in = expires_in
        self.refresh_tokens = dict(refresh_tokens)
        self.service = service
        self.issuer = issuer
        self.requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        self._server = BackgroundServer("token-server")

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self._server.port}/token"

    @property
    def bundle(self) -> Path:
        return self.signer.cert_path

    def registry_auth(self) -> dict:
        return {
            "token": {
                "realm": self.realm,
                "service": self.service,
                "issuer": self.issuer,
                "rootcertbundle": str(self.bundle),
            }
        }

    def __enter__(self) -> "TokenServer":
        self.signer = make_signing_cert(self.workdir)
        self._server.start(_handler(self))
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    # --- token making ----------------------------------------------------------

    def grant(self, user: Optional[str], scopes: list[str]) -> list[dict]:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = [a for a in actions.split(",") if a]
            allowed = wanted if user is not None else [a for a in wanted if a == "pull" and self.anonymous_pull]
            access.append({"type": kind, "name": name, "actions": allowed})
        return access

    def jwt(self, user: Optional[str], access: list[dict]) -> str:
        der = self.signer.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": self.service,
            "exp": now + self.expires_in,
            "nbf": now - 5,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self.signer.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"


def _handler(ts: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _reply(self, status: int, body: dict, headers: Mapping[str, str] = ()) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in dict(headers).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _basic_user(self) -> tuple[bool, Optional[str]]:
            header = self.headers.get("Authorization", "")
            if not header:
                return True, None
            if not header.startswith("Basic "):
                return False, None
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            return ts.users.get(user) == password and user in ts.users, user

        def _issue(self, method: str, ok: bool, user: Optional[str], service: str, scopes: list[str]) -> None:
            with ts._lock:
                ts.requests.append(TokenRequest(method, user, service, tuple(scopes), ok))
            if not ok:
                self._reply(401, {"details": "bad credentials"}, {"WWW-Authenticate": 'Basic realm="tokens"'})
                return
            token = ts.jwt(user, ts.grant(user, scopes))
            self._reply(200, {"token": token, "access_token": token, "expires_in": ts.expires_in,
                              "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

        def do_GET(self) -> None:
            query = parse_qs(urlsplit(self.path).query)
            scopes = [s for v in query.get("scope", []) for s in v.split(" ") if s]
            ok, user = self._basic_user()
            self._issue("GET", ok, user, query.get("service", [""])[0], scopes)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode())
            scopes = [s for v in form.get("scope", []) for s in v.split(" ") if s]
            user = None
            ok = False
            if form.get("grant_type") == ["refresh_token"]:
                user = ts.refresh_tokens.get(form.get("refresh_token", [""])[0])
                ok = user is not None
            elif form.get("grant_type") == ["password"]:
                user = form.get("username", [""])[0]
                ok = user in ts.users and ts.users[user] == form.get("password", [""])[0]
            self._issue("POST", ok, user, form.get("service", [""])[0], scopes)

    return Handler
