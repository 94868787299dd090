"""Pushing blobs: HEAD to skip what exists, cross-repository mount, then a
monolithic PUT or a chunked PATCH sequence.

Upload requests are not retried blindly: registry 2.8 appends every PATCH
body regardless of Content-Range, so a repeated chunk would corrupt the
upload. After a failed chunk the client asks the registry how much it has
(``GET`` on the upload URL) and continues from there; any other failure
starts a fresh upload, all within one retry budget.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Optional, Union
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

from .auth import repo_scope
from .config import Endpoint
from .digest import parse_digest
from .errors import DigestMismatch, IncompleteBody, ProtocolError, Unreachable
from .responses import fail
from .retry import RETRY_STATUSES, Attempts, parse_retry_after
from .transport import Body, rewindable
from .wire import HttpResponse

if TYPE_CHECKING:
    from .client import Repository

log = logging.getLogger(__name__)
OCTET = "application/octet-stream"


@dataclass(frozen=True)
class PushResult:
    digest: str
    size: int
    how: str  # "exists", "mounted" or "uploaded"


def _measure(body: Body, digest: Optional[str]) -> tuple[str, int]:
    """Digest (computed unless given) and size of what will be uploaded."""
    if isinstance(body, bytes):
        return digest or "sha256:" + hashlib.sha256(body).hexdigest(), len(body)
    assert body is not None
    start = body.tell()
    if digest is None:
        h = hashlib.sha256()
        while block := body.read(1 << 20):
            h.update(block)
        digest = "sha256:" + h.hexdigest()
    size = body.seek(0, 2) - start
    body.seek(start)
    return digest, size


def _read_at(body: Body, start: int, offset: int, n: int) -> bytes:
    if isinstance(body, bytes):
        return body[offset : offset + n]
    assert body is not None
    body.seek(start + offset)
    return body.read(n)


def _with_digest(url: str, digest: str) -> str:
    parts = urlsplit(url)
    query = f"{parts.query}&" if parts.query else ""
    return urlunsplit(parts._replace(query=query + urlencode({"digest": digest})))


def _location(resp: HttpResponse, ep: Endpoint, repo: "Repository") -> str:
    location = resp.headers.get("Location")
    if not location:
        fail_status = resp.status_code
        resp.close()
        raise ProtocolError("upload response without Location", host=ep.host, repo=repo.name, status=fail_status)
    return urljoin(resp.url, location)


def _range_end(value: Optional[str]) -> Optional[int]:
    m = re.match(r"^\s*(?:bytes=)?0-(\d+)\s*$", value or "")
    return int(m.group(1)) if m else None


def _post(repo: "Repository", ep: Endpoint, scopes: frozenset[str], attempts: Attempts, **params: str) -> HttpResponse:
    query = f"?{urlencode(params)}" if params else ""
    return repo.client.send(
        ep, "POST", f"/v2/{repo.name}/blobs/uploads/{query}", scopes=scopes, body=b"", attempts=attempts
    )


def _start(repo: "Repository", ep: Endpoint, attempts: Attempts) -> str:
    """POST a new upload; returns its URL."""
    resp = _post(repo, ep, repo.push_scopes, attempts)
    if resp.status_code != 202:
        fail(resp, ep.host, repo.name, None, "cannot start blob upload")
    location = _location(resp, ep, repo)
    resp.close()
    return location


def _mount(repo: "Repository", ep: Endpoint, attempts: Attempts, digest: str, source: str) -> Optional[str]:
    """POST a cross-repository mount: None when mounted (201), else the URL
    of the ordinary upload the registry opened instead (202)."""
    scopes = repo.push_scopes | {repo_scope(source, "pull")}
    resp = _post(repo, ep, scopes, attempts, mount=digest, **{"from": source})
    if resp.status_code == 201:
        resp.close()
        return None
    if resp.status_code != 202:
        fail(resp, ep.host, repo.name, f"blob {digest}", f"cannot mount from {source}")
    location = _location(resp, ep, repo)
    resp.close()
    return location


def _exists(repo: "Repository", ep: Endpoint, digest: str, attempts: Attempts) -> bool:
    resp = repo.client.send(
        ep, "HEAD", f"/v2/{repo.name}/blobs/{digest}", scopes=repo.push_scopes, attempts=attempts
    )
    with resp:
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
    fail(resp, ep.host, repo.name, f"blob {digest}", "blob HEAD failed")


def push_blob(
    repo: "Repository",
    data: Union[bytes, BinaryIO],
    digest: Optional[str] = None,
    *,
    chunk_size: Optional[int] = None,
    mount_from: Optional[str] = None,
) -> PushResult:
    body = rewindable(data)
    start = 0 if isinstance(body, bytes) else body.tell()
    if digest is not None:
        parse_digest(digest)
    digest, size = _measure(body, digest)
    ep = repo.client.endpoints(repo.registry, pull=False)[-1]
    attempts = repo.client.transport.attempts()
    if _exists(repo, ep, digest, attempts):
        return PushResult(digest, size, "exists")
    location: Optional[str] = None
    if mount_from:
        location = _mount(repo, ep, attempts, digest, mount_from)
        if location is None:
            return PushResult(digest, size, "mounted")
        # not mounted: the registry opened an ordinary upload instead, use it
    while True:
        try:
            if location is None:
                location = _start(repo, ep, attempts)
            if chunk_size and size > chunk_size:
                location = _patch_chunks(repo, ep, location, body, start, size, chunk_size, attempts)
                final: Body = b""
            else:
                if not isinstance(body, bytes):
                    body.seek(start)
                final = body
            _finish(repo, ep, location, final, digest, attempts)
            return PushResult(digest, size, "uploaded")
        except (Unreachable, IncompleteBody) as e:
            location = None
            if not attempts.wait():
                e.message += f"; upload gave up {attempts.gave_up_reason}"
                raise
            log.debug("upload of %s to %s failed (%s); starting over", digest, repo.name, e)


def _finish(repo: "Repository", ep: Endpoint, location: str, body: Body, digest: str, attempts: Attempts) -> None:
    resp = repo.client.send(
        ep, "PUT", _with_digest(location, digest), scopes=repo.push_scopes,
        headers={"Content-Type": OCTET}, body=body, retry=False, attempts=attempts,
    )
    if resp.status_code != 201:
        fail(resp, ep.host, repo.name, f"blob {digest}", "blob upload not accepted")
    announced = resp.headers.get("Docker-Content-Digest")
    resp.close()
    if announced and announced != digest:
        raise DigestMismatch(f"registry stored the blob as {announced}", host=ep.host, repo=repo.name, target=digest)


def _patch_chunks(
    repo: "Repository", ep: Endpoint, location: str, body: Body, start: int, size: int, chunk: int, attempts: Attempts
) -> str:
    """PATCH the blob in chunks; returns the upload URL to PUT to."""
    offset = 0
    while offset < size:
        n = min(chunk, size - offset)
        headers = {"Content-Type": OCTET, "Content-Range": f"{offset}-{offset + n - 1}"}
        retry_after = None
        try:
            resp = repo.client.send(
                ep, "PATCH", location, scopes=repo.push_scopes, headers=headers,
                body=_read_at(body, start, offset, n), retry=False, attempts=attempts,
            )
        except Unreachable as e:
            log.debug("chunk %d-%d failed: %s", offset, offset + n - 1, e)
        else:
            if resp.status_code == 202:
                location = _location(resp, ep, repo)
                end = _range_end(resp.headers.get("Range"))
                resp.close()
                offset = offset + n if end is None else end + 1
                continue
            if resp.status_code not in RETRY_STATUSES and resp.status_code != 416:
                fail(resp, ep.host, repo.name, f"upload chunk {offset}-{offset + n - 1}", "chunk rejected")
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            resp.close()
        if not attempts.wait(retry_after):
            raise Unreachable(f"chunked upload stuck at byte {offset}; {attempts.gave_up_reason}", host=ep.host, repo=repo.name)
        location, offset = _status(repo, ep, location, attempts)
    return location


def _status(repo: "Repository", ep: Endpoint, location: str, attempts: Attempts) -> tuple[str, int]:
    """Where the registry says an upload stands: (upload URL, bytes received)."""
    resp = repo.client.send(ep, "GET", location, scopes=repo.push_scopes, attempts=attempts)
    if resp.status_code != 204:
        fail(resp, ep.host, repo.name, "upload status", "cannot query upload")
    end = _range_end(resp.headers.get("Range"))
    new_location = _location(resp, ep, repo) if resp.headers.get("Location") else location
    resp.close()
    # registry 2.8 reports 0 bytes as "0-0": treat that as nothing received
    return new_location, 0 if end in (None, 0) else end + 1


def mount_blob(repo: "Repository", digest: str, from_repo: str) -> bool:
    parse_digest(digest)
    ep = repo.client.endpoints(repo.registry, pull=False)[-1]
    attempts = repo.client.transport.attempts()
    location = _mount(repo, ep, attempts, digest, from_repo)
    if location is None:
        return True
    # Not mounted: cancel the upload the registry opened instead (best effort).
    try:
        repo.client.send(ep, "DELETE", location, scopes=repo.push_scopes, retry=False).close()
    except Unreachable:
        pass
    return False
