"""HTTP plumbing: pooled keep-alive connections (wire.py, on the standard
library: requests/urllib3 cost ~70 ms and ~10 MiB RSS per process), timeouts
on every request, retries with backoff, and redirects followed by hand.

Redirects are followed here because the rules matter: registries send blob
GETs to storage hosts, the ``Range`` header must go along, and
``Authorization`` must not (once a redirect leaves the origin it was meant
for, it is dropped for the rest of the chain). Plain-HTTP redirect targets
are refused unless that host allows plain HTTP.
"""

from __future__ import annotations

import http.client
import logging
import socket
from typing import Any, BinaryIO, Iterator, Mapping, Optional, Union
from urllib.parse import urljoin, urlsplit

from .config import RegistryConfig
from .errors import ConfigError, InsecureRegistry, RegistryError, TLSError, Unreachable
from .retry import RETRY_STATUSES, Attempts, parse_retry_after
from .wire import WIRE_ERRORS, Body, ConnectError, ConnectTimeout, HttpClient, HttpResponse, ProxyError, TLSHandshakeError

log = logging.getLogger(__name__)

__all__ = ["WIRE_ERRORS", "Body", "HttpResponse", "Transport", "describe", "origin", "redact", "rewindable", "tls_failure"]

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 10


def origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def redact(url: str) -> str:
    """A URL fit for logs and errors: no query (presigned storage URLs carry
    signatures there) and no userinfo."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend([e.__cause__, e.__context__, getattr(e, "reason", None), *e.args])


def tls_failure(exc: BaseException, host: str) -> TLSError:
    """Classify an SSL failure: untrusted certificate vs. a peer that does not speak TLS."""
    import ssl  # noqa: PLC0415 - loaded already: TLS was used

    chain = list(_exception_chain(exc))
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in chain) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return TLSError("TLS certificate not trusted (configure ca_file for this registry)", host=host)
    return TLSError("TLS handshake failed (does the host speak plain HTTP?)", host=host, not_tls=True)


class Transport:
    """Sends requests with the config's timeouts, retries and redirect rules."""

    def __init__(self, config: RegistryConfig) -> None:
        self.config = config
        self.http = HttpClient(
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
            ca_file=config.ca_file,
            user_agent=config.user_agent,
        )

    def attempts(self) -> Attempts:
        """A fresh retry budget for one logical operation."""
        c = self.config
        return Attempts(c.max_attempts, c.retry_budget, c.backoff_initial, c.backoff_max)

    def close(self) -> None:
        self.http.close()

    def check_scheme(self, url: str) -> None:
        scheme, host = origin(url)
        if scheme == "http" and not self.config.plain_http_allowed(host):
            raise InsecureRegistry(
                f"refusing plain HTTP to {host}: only loopback and insecure_hosts may use it", host=host
            )
        if scheme not in ("http", "https"):
            raise InsecureRegistry(f"unsupported URL scheme {scheme!r}", host=host)

    def send(
        self,
        method: str,
        url: str,
        *,
        headers: Optional[Mapping[str, str]] = None,
        body: Body = None,
        stream: bool = False,
        retry: bool = True,
        attempts: Optional[Attempts] = None,
    ) -> HttpResponse:
        """One logical request: retried on connection errors and on
        408/429/5xx (honouring Retry-After) while the budget lasts.

        Returns the final response, which may still be an error status (the
        caller knows what it means); raises Unreachable when the host never
        answered and TLSError on TLS failures (never retried).
        With ``stream`` the caller must close the response.
        """
        attempts = attempts or self.attempts()
        host = origin(url)[1]
        start = body.tell() if body is not None and not isinstance(body, bytes) else 0
        while True:
            if body is not None and not isinstance(body, bytes):
                body.seek(start)
            try:
                resp = self._follow(method, url, dict(headers or {}), body, stream)
            except TLSHandshakeError as e:
                raise tls_failure(e, host) from None
            except ProxyError as e:
                raise ConfigError(f"{method} {redact(url)}: {e}", host=host) from None
            except RegistryError:
                raise
            except WIRE_ERRORS as e:
                log.debug("%s %s: %s", method, redact(url), type(e).__name__)
                if retry and attempts.wait():
                    continue
                why = attempts.gave_up_reason if retry else "no retry for this request"
                raise Unreachable(f"{method} {urlsplit(url).path} failed: {describe(e)}; {why}", host=host) from None
            if retry and resp.status_code in RETRY_STATUSES:
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                delay = attempts.next_delay(retry_after)
                if delay is not None:
                    log.debug("%s %s: HTTP %d, retrying in %.2fs", method, redact(url), resp.status_code, delay)
                    resp.close()
                    attempts.sleep(delay)
                    continue
                resp.retry_gave_up = attempts.gave_up_reason
            return resp

    def connect(self, url: str) -> None:
        """A pooled connection to ``url``'s origin, handshake done: raises
        TLSError (``not_tls`` when the peer answers TLS with something else),
        Unreachable, or ConfigError as ``send`` does, without retries."""
        host = origin(url)[1]
        self.check_scheme(url)
        try:
            self.http.connect(url)
        except TLSHandshakeError as e:
            raise tls_failure(e, host) from None
        except ProxyError as e:
            raise ConfigError(f"connect {redact(url)}: {e}", host=host) from None
        except WIRE_ERRORS as e:
            raise Unreachable(f"cannot connect: {describe(e)}", host=host) from None

    def _follow(
        self, method: str, url: str, headers: dict[str, str], body: Body, stream: bool
    ) -> HttpResponse:
        first = origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            self.check_scheme(url)
            log.debug("%s %s", method, redact(url))
            resp = self.http.request(method, url, headers=headers, body=body, stream=stream)
            location = resp.headers.get("Location")
            if resp.status_code not in REDIRECT_STATUSES or not location or method not in ("GET", "HEAD"):
                return resp
            resp.close()
            url = urljoin(url, location)
            if origin(url) != first and "Authorization" in headers:
                del headers["Authorization"]  # never carried to another host
        raise Unreachable(f"more than {MAX_REDIRECTS} redirects", host=first[1])


def describe(e: BaseException) -> str:
    """A short, secret-free description of a wire error (the innermost cause that says most)."""
    chain = list(_exception_chain(e))
    for inner in chain:
        if isinstance(inner, (ConnectionRefusedError, ConnectionResetError, BrokenPipeError, socket.gaierror)):
            return f"{type(inner).__name__}: {inner.strerror or inner}"
    for kinds, text in (((ConnectTimeout,), "connect timed out"), ((TimeoutError,), "read timed out")):
        found = next((x for x in chain if isinstance(x, kinds)), None)
        if found is not None:
            return f"{text} ({type(found).__name__})"
    found = next((x for x in chain if isinstance(x, ConnectError)), None)
    if found is not None:
        cause = found.__cause__
        if isinstance(cause, OSError):
            return f"cannot connect ({type(cause).__name__}: {cause.strerror or cause})"[:160]
        return f"cannot connect ({str(found)[:120]})"
    found = next((x for x in chain if isinstance(x, (http.client.HTTPException, OSError))), None)
    if found is not None:
        return f"connection broken: {type(found).__name__}: {str(found)[:120]}"
    return type(e).__name__


def rewindable(data: Union[bytes, bytearray, memoryview, BinaryIO]) -> Union[bytes, BinaryIO]:
    """Bytes as they are; memoryview/bytearray copied; files must be seekable."""
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, bytes):
        return data
    if not data.seekable():
        raise ValueError("upload source must be bytes or a seekable binary file")
    return data


