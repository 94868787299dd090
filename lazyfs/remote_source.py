"""Blobs on the network as ``BlobSource``s, so ``StargzReader.open`` can read
a layer's footer and TOC remotely and the fetcher its chunks' byte ranges.

``RegistryBlobSource`` goes through the registry client (auth, mirrors,
redirects, retries); ``HttpBlobSource`` is for a plain ``https://…/layer.stargz``
URL (any server that honours Range). Neither verifies bytes: a range has no
digest of its own; stargz chunks are verified against the TOC downstream.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar
from urllib.parse import urljoin

from .registry import NotFound, Repository
from .registry.errors import IncompleteBody, ProtocolError, RegistryError, Unreachable
from .registry.ranges import parse_content_range
from .registry.retry import RETRY_STATUSES, Attempts
from .registry.wire import WIRE_ERRORS, HttpClient, HttpResponse

T = TypeVar("T")


class _RangedSource:
    """``read_at`` clipped to the blob: the reader may ask past the end."""

    _size: int

    @property
    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        length = min(length, self._size - offset)
        return self._fetch(offset, length) if length > 0 else b""

    def _fetch(self, offset: int, length: int) -> bytes:
        raise NotImplementedError


class RegistryBlobSource(_RangedSource):
    """One blob of a repository, read with HTTP Range requests.

    With ``tail`` (and no ``size``), the blob's last ``tail`` bytes come
    first, in one suffix-range request that also tells the size: a stargz
    layer's footer and (usually) its TOC, so that opening a layer costs one
    round trip instead of three (HEAD, footer, TOC). ``take_tail`` hands
    them over once the TOC is parsed."""

    def __init__(self, repo: Repository, digest: str, size: int | None = None, *, tail: int = 0) -> None:
        self.repo = repo
        self.digest = digest
        self._tail = b""
        if size is None and tail > 0:
            self._tail, size = repo.get_tail(digest, tail)
        elif size is None:
            size = repo.blob_size(digest)
            if size is None:
                raise NotFound(f"blob {digest} does not exist", repo=repo.name, target=digest)
        self._size = size

    def take_tail(self) -> tuple[int, bytes]:
        """The tail read at open (offset, bytes), forgotten here: the caller
        keeps what it can use (file chunks it covers)."""
        tail, self._tail = self._tail, b""
        return self._size - len(tail), tail

    def _fetch(self, offset: int, length: int) -> bytes:
        tail_start = self._size - len(self._tail)
        if self._tail and offset + length > tail_start:
            if offset >= tail_start:
                return self._tail[offset - tail_start : offset - tail_start + length]
            head = self.repo.get_range(self.digest, offset, tail_start - offset)
            return head + self._tail[: offset + length - tail_start]
        return self.repo.get_range(self.digest, offset, length)


MAX_REDIRECTS = 10


class HttpBlobSource(_RangedSource):
    """A blob at a plain URL (redirects followed). Transient failures
    (connection errors, 5xx, short bodies) are retried with backoff within
    ``retry_budget`` seconds. ``http``: a client to share (keep-alive
    connections); by default one of its own, closed by ``close``."""

    def __init__(
        self,
        url: str,
        *,
        http: HttpClient | None = None,
        timeout: tuple[float, float] = (5.0, 30.0),
        max_attempts: int = 5,
        retry_budget: float = 30.0,
    ) -> None:
        self.url = url
        self._http = http or HttpClient(connect_timeout=timeout[0], read_timeout=timeout[1])
        self._max_attempts = max_attempts
        self._budget = retry_budget
        self._size = self._retrying(self._probe_size)

    def _fetch(self, offset: int, length: int) -> bytes:
        return self._retrying(lambda: self._get(offset, length))

    def close(self) -> None:
        self._http.close()

    def _retrying(self, fn: Callable[[], T]) -> T:
        attempts = Attempts(self._max_attempts, self._budget, 0.2, 5.0)
        while True:
            try:
                return fn()
            except (*WIRE_ERRORS, IncompleteBody, Unreachable) as exc:
                if not attempts.wait():
                    raise Unreachable(f"{self.url}: {exc}; gave up {attempts.gave_up_reason}") from None

    def _probe_size(self) -> int:
        with self._get_stream("bytes=0-0") as resp:
            self._check(resp)
            if resp.status_code == 206:
                total = parse_content_range(resp.headers.get("Content-Range")).total
                if total is None:
                    raise ProtocolError(f"{self.url}: Content-Range without the blob size")
                resp.read(2)  # the one byte: read, the connection can be reused
                return total
            length = resp.headers.get("Content-Length", "")
            if not length.isdigit():
                raise ProtocolError(f"{self.url}: neither Content-Range nor Content-Length")
            return int(length)

    def _get(self, offset: int, length: int) -> bytes:
        header = f"bytes={offset}-{offset + length - 1}"
        with self._get_stream(header) as resp:
            self._check(resp)
            skip = 0
            if resp.status_code == 206:
                start = parse_content_range(resp.headers.get("Content-Range")).start
                if start != offset:
                    raise ProtocolError(f"{self.url}: asked for byte {offset}, got {start}")
            else:
                skip = offset  # a 200: the whole blob; read only the prefix we need
            data = resp.read(skip + length)[skip:]
        if len(data) != length:
            raise IncompleteBody(f"{self.url}: {len(data)} of {length} bytes at {offset}")
        return data

    @contextmanager
    def _get_stream(self, byte_range: str) -> Iterator[HttpResponse]:
        """A streamed GET of ``self.url`` for ``byte_range``, redirects followed."""
        url = self.url
        for _ in range(MAX_REDIRECTS + 1):
            resp = self._http.request("GET", url, headers={"Range": byte_range}, stream=True)
            location = resp.headers.get("Location")
            if resp.status_code not in (301, 302, 303, 307, 308) or not location:
                break
            resp.close()
            url = urljoin(url, location)
        else:
            raise Unreachable(f"{self.url}: more than {MAX_REDIRECTS} redirects")
        with resp:
            yield resp

    def _check(self, resp: HttpResponse) -> None:
        if resp.status_code in (200, 206):
            return
        message = f"{self.url}: HTTP {resp.status_code}"
        if resp.status_code in RETRY_STATUSES:
            raise Unreachable(message, status=resp.status_code)
        if resp.status_code == 404:
            raise NotFound(message, status=404)
        raise RegistryError(message, status=resp.status_code)
