"""A small HTTP/1.1 client on the standard library (``http.client`` + ``ssl``).

Why not requests: importing requests/urllib3 costs ~70 ms and ~10 MiB of
RSS in every process that talks to a registry (one lazyfs mount process per
layer, ``crfs rpull``), and the registry client needs little of it:
keep-alive connections per origin, connect/read timeouts, TLS with the
default CA store (or a configured bundle), proxies from the environment,
streamed bodies. Redirects, retries and auth are the caller's (transport.py).

Connections: a small pool of idle connections per (scheme, host, port,
proxy), shared by threads. A connection goes back to the pool only when its
response was read to the end and the server keeps it open; anything else
(body left unread, timeout, broken body) closes it. A request on a reused
connection that fails before any byte of the answer (the server had closed
the idle connection) is sent once more on a fresh one, for GET and HEAD.

Never read: ``~/.netrc``. Never sent to a proxy: the request's own
``Authorization`` (https goes through a CONNECT tunnel; the proxy gets only
the ``Proxy-Authorization`` of its own URL). Bodies are never decoded
(http.client sends ``Accept-Encoding: identity``).
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import select
import threading
from typing import Any, BinaryIO, Iterator, Mapping, Optional, Union
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

Body = Union[None, bytes, BinaryIO]
MAX_IDLE_PER_ORIGIN = 8
# Answers other than 200/206 whose body is at most this long are read at
# once even when streaming: the connection can then be reused after a 401,
# a redirect or an error status.
SMALL_BODY = 64 << 10
_DEAD_KEEPALIVE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
_REPLAYABLE = frozenset({"GET", "HEAD"})


class ConnectError(OSError):
    """No connection could be opened (TCP connect, proxy tunnel, TLS handshake)."""


class ConnectTimeout(ConnectError):
    """The connect (or TLS handshake) did not finish within the connect timeout."""


class TLSHandshakeError(ConnectError):
    """The TLS handshake failed; ``__cause__`` is the ``ssl.SSLError``."""


class ProxyError(ConnectError):
    """The proxy configured in the environment cannot be used."""


class Headers(Mapping[str, str]):
    """Response headers: case-insensitive; repeated fields joined by ``", "``."""

    def __init__(self, pairs: Any = ()) -> None:
        self._d: dict[str, tuple[str, str]] = {}
        for name, value in pairs:
            key = name.lower()
            if key in self._d:
                first, old = self._d[key]
                self._d[key] = (first, f"{old}, {value}")
            else:
                self._d[key] = (name, value)

    def __getitem__(self, name: str) -> str:
        return self._d[name.lower()][1]

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._d.values())

    def __len__(self) -> int:
        return len(self._d)

    def __repr__(self) -> str:
        return f"Headers({dict(self._d.values())!r})"


class HttpResponse:
    """One answer: status and headers at once, the body read on demand.

    ``read(n)`` returns ``n`` bytes, fewer only at the end of the body, and
    raises ``http.client.IncompleteRead`` when the body ends short of its
    Content-Length. The connection goes back to the pool once the body has
    been read to its end; ``close()`` (or leaving the ``with`` block)
    before that drops the connection. Always close a streamed response.
    """

    retry_gave_up: str = ""  # set by the transport when retries of a 5xx/429 ran out
    sent_credentials: bool = False  # set by the registry client

    def __init__(self, client: "HttpClient", key: tuple, conn: http.client.HTTPConnection,
                 raw: http.client.HTTPResponse, url: str, method: str) -> None:
        self.status_code: int = raw.status
        self.reason: str = raw.reason
        self.headers = Headers(raw.getheaders())
        self.url = url
        self.method = method
        self._client = client
        self._key = key
        self._conn: Optional[http.client.HTTPConnection] = conn
        self._raw: Optional[http.client.HTTPResponse] = raw
        self._buffer: Optional[bytes] = None  # the body, once read ahead
        self._pos = 0

    def __repr__(self) -> str:
        return f"<HttpResponse {self.method} {self.status_code}>"

    def __enter__(self) -> "HttpResponse":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes of the body (all the rest when ``n < 0``)."""
        if self._buffer is not None:
            end = len(self._buffer) if n < 0 else min(len(self._buffer), self._pos + n)
            data, self._pos = self._buffer[self._pos : end], end
            return data
        raw = self._raw
        if raw is None:
            return b""
        try:
            if n < 0:
                data = raw.read()  # raises IncompleteRead when cut short
            else:
                parts = []
                got = 0
                while got < n:
                    piece = raw.read(n - got)
                    if not piece:
                        break
                    parts.append(piece)
                    got += len(piece)
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                if got < n and raw.length:
                    raise http.client.IncompleteRead(data, raw.length)
        except BaseException:
            self._finish(False)
            raise
        if raw.isclosed():
            self._finish(True)
        return data

    def iter_pieces(self, size: int) -> Iterator[bytes]:
        """The rest of the body in pieces of ``size`` bytes (the last one shorter)."""
        while True:
            piece = self.read(size)
            if not piece:
                return
            yield piece
            if len(piece) < size:
                return

    @property
    def content(self) -> bytes:
        """The whole body (what ``read`` has not taken yet, on a streamed response), kept."""
        if self._buffer is None:
            self._read_ahead()
        assert self._buffer is not None
        return self._buffer

    def json(self) -> Any:
        return json.loads(self.content or b"null")

    def close(self) -> None:
        """Done with the response: the connection is reused if the body was read to the end."""
        raw = self._raw
        if raw is not None and not raw.isclosed() and (raw.length == 0 or self.method == "HEAD"):
            raw.read()  # nothing left to read: marks the response complete
        self._finish(raw is not None and raw.isclosed())

    def _read_ahead(self) -> None:
        """Read the whole body now (non-streamed requests, small error bodies)."""
        data = self.read()
        self._buffer, self._pos = data, 0

    def _finish(self, complete: bool) -> None:
        raw, conn = self._raw, self._conn
        self._raw = self._conn = None
        if conn is None or raw is None:
            return
        reusable = complete and raw.isclosed() and not raw.will_close and (raw.length in (None, 0))
        if not complete:
            raw.close()
        self._client._release(self._key, conn, reusable)


def _alive(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle connection still looks usable: the server has not
    closed it (an idle connection has nothing to read, EOF included)."""
    sock = conn.sock
    if sock is None:
        return False
    pending = getattr(sock, "pending", None)
    if pending is not None and pending():
        return False
    try:
        if hasattr(select, "poll"):
            p = select.poll()
            p.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            return not p.poll(0)
        return not select.select([sock], [], [], 0)[0]
    except (OSError, ValueError):
        return False


def _env_has_proxy() -> bool:
    return any(k.lower().endswith("_proxy") and v for k, v in os.environ.items())


class _Proxy:
    """A proxy from the environment: ``host:port`` and its own credentials."""

    def __init__(self, url: str) -> None:
        if "://" not in url:
            url = "http://" + url  # as requests did
        parts = urlsplit(url)
        if parts.scheme.lower() != "http" or not parts.hostname:
            raise ProxyError(f"proxy scheme {parts.scheme!r} not supported (only http:// proxies)")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.auth: Optional[str] = None
        if parts.username is not None:
            raw = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            self.auth = "Basic " + base64.b64encode(raw).decode()

    @property
    def key(self) -> str:
        return f"{self.host}:{self.port}"


class HttpClient:
    """Sends requests on pooled keep-alive connections; thread-safe.

    ``proxies``: scheme -> proxy URL (``"no"``: the no_proxy list); None
    reads the environment like requests did (``HTTPS_PROXY``, ``HTTP_PROXY``,
    ``ALL_PROXY``, ``NO_PROXY``, either case).
    """

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        ca_file: Optional[Union[str, os.PathLike]] = None,
        user_agent: Optional[str] = None,
        proxies: Optional[Mapping[str, str]] = None,
        max_idle: int = MAX_IDLE_PER_ORIGIN,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.ca_file = str(ca_file) if ca_file else None
        self.user_agent = user_agent
        self.max_idle = max_idle
        if proxies is None:
            proxies = {}
            if _env_has_proxy():  # urllib.request only when there is something to read
                from urllib.request import getproxies_environment  # noqa: PLC0415

                proxies = getproxies_environment()
        self.proxies = dict(proxies)
        self._tls: Any = None  # ssl.SSLContext, made on the first https request
        self._idle: dict[tuple, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._closed = False

    # --- public -------------------------------------------------------------

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Optional[Mapping[str, str]] = None,
        body: Body = None,
        stream: bool = False,
    ) -> HttpResponse:
        """Send one request (no redirects followed). Without ``stream`` the
        body is read before returning. Raises OSError (ConnectError,
        TimeoutError, ...) or http.client.HTTPException on wire failures."""
        parts = urlsplit(url)
        scheme, host, port, proxy, key = self._route(parts)

        hdrs: dict[str, str] = {"Accept": "*/*"}
        if self.user_agent:
            hdrs["User-Agent"] = self.user_agent
        lower = {k.lower() for k in (headers or {})}
        hdrs = {k: v for k, v in hdrs.items() if k.lower() not in lower}
        hdrs.update(headers or {})
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        if proxy is not None and scheme == "http":
            netloc = f"[{host}]" if ":" in host else host
            target = f"http://{netloc}:{port}{target}"  # absolute URI: a forwarding proxy
            if proxy.auth:
                hdrs["Proxy-Authorization"] = proxy.auth
        start = 0
        if body is not None and not isinstance(body, bytes):
            start = body.tell()
            if not any(k.lower() == "content-length" for k in hdrs):
                hdrs["Content-Length"] = str(body.seek(0, 2) - start)
                body.seek(start)

        for attempt in (1, 2):
            conn, reused = self._checkout(key, scheme, host, port, proxy)
            try:
                conn.request(method, target, body=body, headers=hdrs)
                raw = conn.getresponse()
            except _DEAD_KEEPALIVE as e:
                conn.close()
                if reused and attempt == 1 and method in _REPLAYABLE:
                    log.debug("%s %s://%s: idle connection was closed (%s), new connection",
                              method, scheme, host, type(e).__name__)
                    if body is not None and not isinstance(body, bytes):
                        body.seek(start)
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            resp = HttpResponse(self, key, conn, raw, url, method)
            small = raw.length is not None and raw.length <= SMALL_BODY
            if not stream or raw.length == 0 or method == "HEAD" or (small and raw.status not in (200, 206)):
                resp._read_ahead()
            return resp
        raise AssertionError("unreachable")

    def connect(self, url: str) -> None:
        """Open a connection to ``url``'s origin (the TLS handshake done, for
        https) and keep it idle for the next request: what a peer speaks is
        known before any request is sent. Raises as ``request`` does."""
        scheme, host, port, proxy, key = self._route(urlsplit(url))
        self._release(key, self._connect(scheme, host, port, proxy), True)

    def close(self) -> None:
        """Close the idle connections; connections in use close when released."""
        with self._lock:
            self._closed = True
            idle, self._idle = [c for cs in self._idle.values() for c in cs], {}
        for c in idle:
            c.close()

    # --- connections ----------------------------------------------------------

    def _route(self, parts: Any) -> tuple[str, str, int, Optional[_Proxy], tuple]:
        """Scheme, host, port and proxy of a split URL, and the key of its
        connection pool."""
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"unsupported URL {scheme}://{parts.hostname or ''}")
        host = parts.hostname
        port = parts.port or (443 if scheme == "https" else 80)
        proxy = self._proxy_for(scheme, host, port)
        return scheme, host, port, proxy, (scheme, host, port, proxy.key if proxy else None)

    def _proxy_for(self, scheme: str, host: str, port: int) -> Optional[_Proxy]:
        if not self.proxies:
            return None
        url = self.proxies.get(scheme) or self.proxies.get("all")
        if not url:
            return None
        from urllib.request import proxy_bypass_environment  # noqa: PLC0415

        netloc = f"[{host}]" if ":" in host else host
        if proxy_bypass_environment(f"{netloc}:{port}", self.proxies):
            return None
        return _Proxy(url)

    def _tls_context(self) -> Any:
        if self._tls is None:
            import ssl  # noqa: PLC0415 - loaded by http.client anyway

            ctx = ssl.create_default_context(cafile=self.ca_file)
            ctx.set_alpn_protocols(["http/1.1"])
            self._tls = ctx
        return self._tls

    def _checkout(
        self, key: tuple, scheme: str, host: str, port: int, proxy: Optional[_Proxy]
    ) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            idle = self._idle.get(key)
            while idle:
                conn = idle.pop()
                if _alive(conn):
                    return conn, True
                conn.close()
        return self._connect(scheme, host, port, proxy), False

    def _connect(self, scheme: str, host: str, port: int, proxy: Optional[_Proxy]) -> http.client.HTTPConnection:
        addr = (proxy.host, proxy.port) if proxy else (host, port)
        conn: http.client.HTTPConnection
        if scheme == "https":
            conn = http.client.HTTPSConnection(
                addr[0], addr[1], timeout=self.connect_timeout, context=self._tls_context(), blocksize=64 << 10
            )
            if proxy:
                conn.set_tunnel(host, port, headers={"Proxy-Authorization": proxy.auth} if proxy.auth else None)
        else:
            conn = http.client.HTTPConnection(addr[0], addr[1], timeout=self.connect_timeout, blocksize=64 << 10)
        where = f"{host}:{port}" + (f" via proxy {proxy.key}" if proxy else "")
        try:
            conn.connect()
        except TimeoutError as e:
            conn.close()
            raise ConnectTimeout(f"connect to {where} timed out") from e
        except OSError as e:
            conn.close()
            import ssl  # noqa: PLC0415

            if isinstance(e, ssl.SSLError):
                raise TLSHandshakeError(f"TLS handshake with {where} failed: {e}") from e
            raise ConnectError(f"cannot connect to {where}: {type(e).__name__}: {e.strerror or e}") from e
        assert conn.sock is not None
        conn.sock.settimeout(self.read_timeout)
        return conn

    def _release(self, key: tuple, conn: http.client.HTTPConnection, reusable: bool) -> None:
        if reusable and conn.sock is not None:
            with self._lock:
                idle = self._idle.setdefault(key, [])
                if not self._closed and len(idle) < self.max_idle:
                    idle.append(conn)
                    return
        conn.close()


# What can go wrong on the wire: socket errors and timeouts (OSError,
# ssl.SSLError included) and malformed or cut-short HTTP (HTTPException).
WIRE_ERRORS = (http.client.HTTPException, OSError)
