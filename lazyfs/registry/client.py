"""The OCI distribution API: resolve references, read manifests and blobs
(whole or by byte range), push blobs and manifests.

``RegistryClient`` owns what is per host (scheme, auth state, sessions) and
the mirror fall-through; ``Repository`` is the API for one repository.
Everything fetched by digest is verified against it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, Optional, Sequence, TypeVar, Union

from .auth import HostAuth, repo_scope
from .config import Endpoint, RegistryConfig
from .credentials import CredentialStore
from .digest import Verifier, compute_digest, is_digest, parse_digest, verify_bytes
from .errors import (
    DigestMismatch,
    IncompleteBody,
    NotFound,
    ProtocolError,
    RegistryError,
    TLSError,
    Unreachable,
)
from .manifest import MANIFEST_ACCEPT, Manifest, Platform, host_platform, select_platform
from .ranges import Segment, extract, multipart_boundary, parse_content_range, parse_multipart, range_header
from .reference import Reference, api_host, parse_reference
from .retry import Attempts
from .responses import fail as _fail
from .transport import WIRE_ERRORS, HttpResponse, Transport, describe, origin
from .upload import PushResult, mount_blob, push_blob

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_MANIFEST_BYTES = 4 << 20
STREAM_CHUNK = 256 << 10


@dataclass(frozen=True)
class Resolved:
    """A reference resolved to one image manifest (through an index if there was one)."""

    reference: Reference
    manifest: Manifest
    index: Optional[Manifest] = None
    platform: Optional[Platform] = None

    @property
    def digest(self) -> str:
        return self.manifest.digest


class _Host:
    """Per-endpoint state: the scheme (the endpoint's, or found by the first
    request), and the auth state."""

    def __init__(self, endpoint: Endpoint, auth: HostAuth) -> None:
        self.endpoint = endpoint
        self.auth = auth
        self.scheme: Optional[str] = None
        self.lock = threading.Lock()
        self.down_until = 0.0  # mirrors only: skip until then after being unreachable


class RegistryClient:
    """Entry point. Thread-safe; reuse one per process (it keeps connections,
    tokens and the schemes found)."""

    def __init__(self, config: Optional[RegistryConfig] = None, *, credentials: Optional[CredentialStore] = None):
        self.config = config or RegistryConfig()
        self.credentials = credentials or CredentialStore(
            self.config.docker_config, helper_timeout=self.config.credential_helper_timeout
        )
        self.transport = Transport(self.config)
        self._hosts: dict[Endpoint, _Host] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.transport.close()

    def repository(self, ref: Union[str, Reference]) -> "Repository":
        """The API for the repository of ``ref`` (its tag/digest is ignored)."""
        if isinstance(ref, str):
            ref = parse_reference(ref)
        return Repository(self, ref.registry, ref.repository)

    def resolve(self, ref: Union[str, Reference], platform: Optional[Platform] = None) -> Resolved:
        """Resolve ``host/repo:tag`` or ``...@digest`` to an image manifest,
        choosing from an index by ``platform`` (default: config, then host)."""
        if isinstance(ref, str):
            ref = parse_reference(ref)
        return self.repository(ref).resolve(ref.object, platform, reference=ref)

    # --- endpoints, scheme, auth ----------------------------------------------

    def endpoints(self, registry: str, pull: bool) -> list[Endpoint]:
        """Mirrors (pulls only) in order, then the registry itself."""
        origin_ep = Endpoint(api_host(registry))
        return (self.config.mirror_endpoints(registry) if pull else []) + [origin_ep]

    def with_endpoints(self, registry: str, pull: bool, fn: Callable[[Endpoint], T]) -> T:
        """``fn(endpoint)`` on each endpoint until one succeeds; a failing
        mirror falls through to the next, the registry's own error is final."""
        *mirrors, last = self.endpoints(registry, pull)
        for ep in mirrors:
            state = self._hosts.get(ep)
            if state is not None and state.down_until > time.monotonic():
                continue
            try:
                return fn(ep)
            except RegistryError as e:
                log.info("mirror %s of %s failed, trying next: %s", ep.host, registry, e)
                if isinstance(e, Unreachable) and ep in self._hosts:
                    self._hosts[ep].down_until = time.monotonic() + self.config.mirror_cooldown
        return fn(last)

    def _host(self, ep: Endpoint) -> _Host:
        with self._lock:
            h = self._hosts.get(ep)
            if h is None:
                auth = HostAuth(ep.host, lambda: self.credentials.get(ep.host), self.transport)
                h = self._hosts[ep] = _Host(ep, auth)
                h.scheme = ep.scheme
        return h

    def send(
        self,
        ep: Endpoint,
        method: str,
        path_or_url: str,
        *,
        scopes: frozenset[str],
        headers: Optional[dict[str, str]] = None,
        body: Union[None, bytes, BinaryIO] = None,
        stream: bool = False,
        retry: bool = True,
        attempts: Optional[Attempts] = None,
    ) -> HttpResponse:
        """An authenticated request to ``ep``: on a 401 the challenge is
        learnt (token fetched) and the request is sent once more.

        There is no ``GET /v2/`` ping first (containerd does not ping
        either; it is a round trip per process): a host's scheme is found by
        a first connection's handshake (``_scheme_by_connecting``), https
        unless the endpoint says otherwise or the peer does not speak TLS
        where plain HTTP is allowed; when that does not tell, the first
        request finds it, sent again over http if need be. The scheme is
        kept for the host."""
        h = self._host(ep)
        kw = dict(scopes=scopes, headers=headers, body=body, stream=stream, retry=retry, attempts=attempts)
        if h.scheme is None and "://" not in path_or_url:
            with h.lock:  # by connecting only: other threads wait for a handshake, not for a whole request
                if h.scheme is None:
                    h.scheme = self._scheme_by_connecting(ep)
        if h.scheme is not None or "://" in path_or_url:
            scheme = h.scheme or origin(path_or_url)[0]
            return self._send(h, scheme, path_or_url, method, **kw)  # type: ignore[arg-type]
        with h.lock:  # the first request finds the scheme; the others wait for it
            if h.scheme is not None:
                return self._send(h, h.scheme, path_or_url, method, **kw)  # type: ignore[arg-type]
            schemes = self._schemes(ep)
            for scheme in schemes:
                try:
                    resp = self._send(h, scheme, path_or_url, method, **kw)  # type: ignore[arg-type]
                except TLSError as e:
                    if e.not_tls and scheme != schemes[-1]:
                        log.debug("%s does not speak TLS, using plain HTTP", ep.host)
                        continue
                    raise
                h.scheme = scheme
                return resp
            raise AssertionError("unreachable")

    def _schemes(self, ep: Endpoint) -> list[str]:
        """The schemes to try, in order, for an endpoint without its own."""
        return ["https", "http"] if self.config.plain_http_allowed(ep.host) else ["https"]

    def _scheme_by_connecting(self, ep: Endpoint) -> Optional[str]:
        """https, or http where allowed and the peer does not speak TLS, as
        the handshake of a first connection (kept for the first request)
        shows; None when it does not tell (unreachable...): the first request
        then finds out, with its retries and errors."""
        schemes = self._schemes(ep)
        for scheme in schemes:
            try:
                self.transport.connect(f"{scheme}://{ep.host}/")
            except TLSError as e:
                if e.not_tls and scheme != schemes[-1]:
                    log.debug("%s does not speak TLS, using plain HTTP", ep.host)
                    continue
                return None
            except RegistryError:
                return None
            return scheme
        return None

    def _send(
        self,
        h: _Host,
        scheme: str,
        path_or_url: str,
        method: str,
        *,
        scopes: frozenset[str],
        headers: Optional[dict[str, str]],
        body: Union[None, bytes, BinaryIO],
        stream: bool,
        retry: bool,
        attempts: Optional[Attempts],
    ) -> HttpResponse:
        ep = h.endpoint
        base = f"{scheme}://{ep.host}"
        url = path_or_url if "://" in path_or_url else base + path_or_url
        same_host = origin(url) == origin(base)
        start = body.tell() if body is not None and not isinstance(body, bytes) else 0
        sent: Optional[str] = None
        for attempt in (1, 2):
            hdrs = dict(headers or {})
            sent = h.auth.authorization(scopes) if same_host else None
            if sent:
                hdrs["Authorization"] = sent
            if body is not None and not isinstance(body, bytes):
                body.seek(start)
            try:
                resp = self.transport.send(
                    method, url, headers=hdrs, body=body, stream=stream, retry=retry, attempts=attempts
                )
            except TLSError as e:
                if e.not_tls and e.host == ep.host and not self.config.plain_http_allowed(ep.host):
                    e.message += f"; plain HTTP to {ep.host} needs it in insecure_hosts"
                raise
            if resp.status_code != 401 or attempt == 2 or not same_host:
                break
            retry_scopes = h.auth.after_unauthorized(resp, scopes, sent)
            if retry_scopes is None:
                break
            resp.close()
            scopes = retry_scopes
        resp.sent_credentials = bool(sent)
        return resp


class Repository:
    """The API of one repository on one registry (and its mirrors)."""

    def __init__(self, client: RegistryClient, registry: str, name: str) -> None:
        self.client = client
        self.registry = registry
        self.name = name

    def __repr__(self) -> str:
        return f"Repository({self.registry}/{self.name})"

    @property
    def pull_scopes(self) -> frozenset[str]:
        return frozenset({repo_scope(self.name, "pull")})

    @property
    def push_scopes(self) -> frozenset[str]:
        return frozenset({repo_scope(self.name, "pull,push")})

    # --- manifests ------------------------------------------------------------

    def get_manifest(self, tag_or_digest: str) -> Manifest:
        """Fetch a manifest or index; by digest it is verified, by tag its
        digest is computed (and checked against Docker-Content-Digest)."""
        if ":" in tag_or_digest:
            parse_digest(tag_or_digest)  # tags have no ':'; raises with the reason
        return self._retrying_body(
            lambda attempts: self.client.with_endpoints(
                self.registry, True, lambda ep: self._get_manifest(ep, tag_or_digest, attempts)
            )
        )

    def _retrying_body(self, fn: Callable[[Attempts], T]) -> T:
        """``fn(attempts)``, again while a body comes back cut short and the budget lasts."""
        attempts = self.client.transport.attempts()
        while True:
            try:
                return fn(attempts)
            except IncompleteBody as e:
                if not attempts.wait():
                    e.message += f"; gave up {attempts.gave_up_reason}"
                    raise

    def _get_manifest(self, ep: Endpoint, ref: str, attempts: Attempts) -> Manifest:
        path = f"/v2/{self.name}/manifests/{ref}"
        resp = self.client.send(
            ep, "GET", path, scopes=self.pull_scopes, headers={"Accept": MANIFEST_ACCEPT}, stream=True, attempts=attempts
        )
        target = f"manifest {ref}"
        if resp.status_code != 200:
            _fail(resp, ep.host, self.name, target, "cannot get manifest")
        with resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > MAX_MANIFEST_BYTES:
                raise ProtocolError(f"manifest of {length} bytes is too large", host=ep.host, repo=self.name, target=target)
            try:
                raw = resp.read(MAX_MANIFEST_BYTES + 1)
            except WIRE_ERRORS as e:
                raise IncompleteBody(f"manifest body: {describe(e)}", host=ep.host, repo=self.name, target=target) from None
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ProtocolError("manifest too large", host=ep.host, repo=self.name, target=target)
        announced = resp.headers.get("Docker-Content-Digest")
        if is_digest(ref):
            digest = ref
        elif announced and is_digest(announced):
            digest = announced
        else:
            digest = compute_digest(raw)
        verify_bytes(raw, digest, host=ep.host, repo=self.name)
        if announced and is_digest(ref) and announced != ref and announced.split(":")[0] == ref.split(":")[0]:
            raise DigestMismatch(f"registry announced {announced}", host=ep.host, repo=self.name, target=target)
        try:
            return Manifest.parse(raw, digest, resp.headers.get("Content-Type", ""))
        except ProtocolError as e:
            e.host, e.repo = ep.host, self.name
            raise

    def resolve(
        self, tag_or_digest: str = "latest", platform: Optional[Platform] = None, *, reference: Optional[Reference] = None
    ) -> Resolved:
        """Tag or digest -> image manifest, selecting from an index by platform."""
        ref = reference or Reference(self.registry, self.name).with_object(tag_or_digest)
        top = self.get_manifest(tag_or_digest)
        if not top.is_index:
            return Resolved(ref, top)
        wanted = platform or self.client.config.platform or host_platform()
        desc = select_platform(top, wanted)
        child = self.get_manifest(desc.digest)
        if child.is_index:
            raise ProtocolError("index entry for platform is itself an index", repo=self.name, target=desc.digest)
        return Resolved(ref, child, top, desc.platform)

    def push_manifest(self, manifest: bytes, media_type: str, tag: Optional[str] = None) -> str:
        """PUT a manifest (under ``tag`` if given, else by digest); returns its digest."""
        digest = compute_digest(manifest)
        ref = tag or digest
        ep = self.client.endpoints(self.registry, pull=False)[-1]
        resp = self.client.send(
            ep, "PUT", f"/v2/{self.name}/manifests/{ref}", scopes=self.push_scopes,
            headers={"Content-Type": media_type}, body=manifest,
        )
        if resp.status_code not in (200, 201):
            _fail(resp, ep.host, self.name, f"manifest {ref}", "cannot push manifest")
        announced = resp.headers.get("Docker-Content-Digest")
        resp.close()
        if announced and announced != digest:
            raise DigestMismatch(f"registry stored manifest as {announced}", host=ep.host, repo=self.name, target=digest)
        return digest

    # --- blobs -----------------------------------------------------------------

    def _blob_path(self, digest: str) -> str:
        return f"/v2/{self.name}/blobs/{parse_digest(digest)}"

    def blob_size(self, digest: str) -> Optional[int]:
        """The blob's size from a HEAD, or None when it does not exist."""
        def head(ep: Endpoint) -> int:
            resp = self.client.send(ep, "HEAD", self._blob_path(digest), scopes=self.pull_scopes)
            with resp:
                if resp.status_code != 200:
                    _fail(resp, ep.host, self.name, f"blob {digest}", "blob HEAD failed")
                length = resp.headers.get("Content-Length", "")
                if not length.isdigit():
                    raise ProtocolError("blob HEAD without Content-Length", host=ep.host, repo=self.name, target=digest)
                return int(length)
        try:
            return self.client.with_endpoints(self.registry, True, head)
        except NotFound:
            return None

    def blob_exists(self, digest: str) -> bool:
        return self.blob_size(digest) is not None

    def open_blob(self, digest: str, size: Optional[int] = None) -> Iterator[bytes]:
        """Stream a blob. A broken or cut-short body is resumed with a Range
        request (or re-read when the server ignores Range) within the retry
        budget. The digest (and ``size``) is verified when the stream ends:
        the caller must treat the data as unverified until iteration has
        finished without DigestMismatch."""
        verifier = Verifier(digest, size)
        attempts = self.client.transport.attempts()
        host = "?"
        while True:
            offset = verifier.count
            try:
                resp, host = self.client.with_endpoints(
                    self.registry, True, lambda ep: self._open_blob(ep, digest, offset, attempts)
                )
                with resp:
                    skip = offset if resp.status_code == 200 else 0
                    announced = resp.headers.get("Content-Length", "")
                    received = 0
                    for piece in resp.iter_pieces(STREAM_CHUNK):
                        received += len(piece)
                        if skip:
                            cut = min(skip, len(piece))
                            piece, skip = piece[cut:], skip - cut
                            if not piece:
                                continue
                        verifier.update(piece)
                        yield piece
                    if announced.isdigit() and received < int(announced):
                        raise IncompleteBody(f"body ended after {received} of {announced} bytes")
                    if size is not None and verifier.count < size:
                        raise IncompleteBody(f"body ended at byte {verifier.count} of {size}")
                break
            except (IncompleteBody, *WIRE_ERRORS) as e:
                why = e.message if isinstance(e, IncompleteBody) else describe(e)
                log.debug("blob %s cut at byte %d (%s), resuming", digest, verifier.count, why)
                if not attempts.wait():
                    raise IncompleteBody(
                        f"blob body cut short at byte {verifier.count}: {why}; gave up {attempts.gave_up_reason}",
                        host=host, repo=self.name, target=f"blob {digest}",
                    ) from None
        verifier.verify(host=host, repo=self.name)

    def _open_blob(self, ep: Endpoint, digest: str, offset: int, attempts: Attempts) -> tuple[HttpResponse, str]:
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        resp = self.client.send(
            ep, "GET", self._blob_path(digest), scopes=self.pull_scopes, headers=headers, stream=True, attempts=attempts
        )
        if resp.status_code == 200 or (resp.status_code == 206 and offset):
            if resp.status_code == 206:
                try:
                    start = parse_content_range(resp.headers.get("Content-Range")).start
                except ProtocolError:
                    resp.close()
                    raise
                if start != offset:
                    resp.close()
                    raise ProtocolError(f"resume asked for byte {offset}, got {start}", host=ep.host, repo=self.name, target=digest)
            return resp, ep.host
        _fail(resp, ep.host, self.name, f"blob {digest}", "cannot get blob")

    def get_blob(self, digest: str, size: Optional[int] = None) -> bytes:
        """The whole blob in memory, verified."""
        return b"".join(self.open_blob(digest, size))

    def fetch_blob(self, digest: str, dest: BinaryIO, size: Optional[int] = None) -> int:
        """Write the blob to ``dest``; returns its size. On DigestMismatch
        ``dest`` holds unverified bytes and must be discarded."""
        n = 0
        for piece in self.open_blob(digest, size):
            dest.write(piece)
            n += len(piece)
        return n

    def get_tail(self, digest: str, length: int) -> tuple[bytes, int]:
        """The last ``length`` bytes of the blob (all of it if shorter) and
        the blob's size, from one suffix-range GET: where a stargz layer keeps
        its footer and TOC, without a HEAD for the size first."""
        parse_digest(digest)

        def once(ep: Endpoint, attempts: Attempts) -> tuple[bytes, int]:
            resp = self.client.send(
                ep, "GET", self._blob_path(digest), scopes=self.pull_scopes,
                headers={"Range": f"bytes=-{length}", "Accept-Encoding": "identity"}, stream=True, attempts=attempts,
            )
            kw = dict(host=ep.host, repo=self.name, target=f"blob {digest} tail {length}")
            if resp.status_code not in (200, 206):
                _fail(resp, ep.host, self.name, f"blob {digest}", "cannot get blob tail")
            try:
                with resp:
                    if resp.status_code == 206:
                        cr = parse_content_range(resp.headers.get("Content-Range"))
                        if cr.total is None or cr.end != cr.total - 1:
                            raise ProtocolError(f"suffix range answered with {resp.headers.get('Content-Range')!r}", **kw)
                        return _read_exact(resp, cr.end - cr.start + 1), cr.total
                    whole = _read_all(resp, limit=64 << 20)  # a server without Range support: the blob
                    return whole[-length:], len(whole)
            except RegistryError as e:
                e.host, e.repo, e.target = ep.host, self.name, kw["target"]
                raise
            except WIRE_ERRORS as e:
                raise IncompleteBody(f"tail body broken: {describe(e)}", **kw) from None

        return self._retrying_body(lambda attempts: self.client.with_endpoints(self.registry, True, lambda ep: once(ep, attempts)))

    def get_range(self, digest: str, offset: int, length: int) -> bytes:
        """``length`` bytes of the blob at ``offset`` (one ranged GET)."""
        return self.get_ranges(digest, [(offset, length)])[0]

    def get_ranges(self, digest: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Several ``(offset, length)`` ranges in one request.

        Accepts a 206 (single or multipart/byteranges, possibly coalesced)
        or a 200 with the whole blob (only the prefix needed is read); a
        cut-short body is retried. The bytes are not verified here: a range
        has no digest of its own (stargz verifies chunks against its TOC).
        """
        header = range_header(ranges)
        parse_digest(digest)
        return self._retrying_body(
            lambda attempts: self.client.with_endpoints(
                self.registry, True, lambda ep: self._ranges_once(ep, digest, ranges, header, attempts)
            )
        )

    def _ranges_once(
        self, ep: Endpoint, digest: str, ranges: Sequence[tuple[int, int]], header: str, attempts: Attempts
    ) -> list[bytes]:
        resp = self.client.send(
            ep, "GET", self._blob_path(digest), scopes=self.pull_scopes,
            headers={"Range": header, "Accept-Encoding": "identity"}, stream=True, attempts=attempts,
        )
        kw = dict(host=ep.host, repo=self.name, target=f"blob {digest} {header}")
        status = resp.status_code
        if status not in (200, 206):
            if status == 416:
                resp.close()
                raise ProtocolError("range not satisfiable (beyond the end of the blob?)", status=416, **kw)
            _fail(resp, ep.host, self.name, f"blob {digest}", "cannot get blob range")
        try:
            with resp:
                if status == 206:
                    boundary = multipart_boundary(resp.headers.get("Content-Type", ""))
                    if boundary:
                        segments = parse_multipart(_read_all(resp), boundary)
                    else:
                        cr = parse_content_range(resp.headers.get("Content-Range"))
                        segments = [Segment(cr.start, _read_exact(resp, cr.end - cr.start + 1))]
                else:
                    end = max(o + n for o, n in ranges)
                    segments = [Segment(0, _read_prefix(resp, end))]
            return extract(segments, ranges)
        except RegistryError as e:
            e.host, e.repo, e.target, e.status = ep.host, self.name, kw["target"], status
            raise
        except WIRE_ERRORS as e:
            raise IncompleteBody(f"range body broken: {describe(e)}", status=status, **kw) from None

    # --- push ------------------------------------------------------------------

    def push_blob(
        self,
        data: Union[bytes, BinaryIO],
        digest: Optional[str] = None,
        *,
        chunk_size: Optional[int] = None,
        mount_from: Optional[str] = None,
    ) -> PushResult:
        """Upload a blob unless the repository has it (HEAD first), trying a
        cross-repository mount from repository ``mount_from`` first; one PUT, or PATCH
        chunks when the blob is larger than ``chunk_size`` (default: the
        config's ``upload_chunk_size``)."""
        if chunk_size is None:
            chunk_size = self.client.config.upload_chunk_size
        return push_blob(self, data, digest, chunk_size=chunk_size, mount_from=mount_from)

    def mount_blob(self, digest: str, from_repo: str) -> bool:
        """Cross-repository mount of ``digest`` from ``from_repo`` (same
        registry); False when the registry would not mount it."""
        return mount_blob(self, digest, from_repo)


def _read_all(resp: HttpResponse, limit: int = 256 << 20) -> bytes:
    data = resp.read(limit + 1)
    if len(data) > limit:
        raise ProtocolError(f"multipart range answer larger than {limit} bytes")
    return data


def _read_exact(resp: HttpResponse, n: int) -> bytes:
    length = resp.headers.get("Content-Length", "")
    if length.isdigit() and int(length) != n:
        raise ProtocolError(f"Content-Length {length} disagrees with Content-Range ({n} bytes)")
    data = resp.read(n)
    if len(data) != n:
        raise IncompleteBody(f"range body ended after {len(data)} of {n} bytes")
    return data


def _read_prefix(resp: HttpResponse, n: int) -> bytes:
    """The first ``n`` bytes of a 200 answer to a ranged GET; the rest is not read."""
    length = resp.headers.get("Content-Length", "")
    if length.isdigit() and int(length) < n:
        raise ProtocolError(f"range ends at byte {n}, beyond the end of the blob ({length} bytes)")
    data = resp.read(n)
    if len(data) != n:
        raise IncompleteBody(f"body ended after {len(data)} of the {n} bytes needed")
    return data

