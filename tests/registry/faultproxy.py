"""A fault-injecting reverse proxy in front of a registry, on 127.0.0.x.

Requests are forwarded unchanged (Host included, so the registry's upload
Locations point back at the proxy). Faults are queued with a regex matched
against ``"METHOD /path?query"`` and a count; each matching request uses up
one. Every request is recorded with the headers it arrived with.
"""

from __future__ import annotations

import http.client
import io
import json
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Mapping, Optional

from .httpserver import BackgroundServer

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass
class Fault:
    """``kind``: reset (RST before answering), status (answer ``status``
    with ``headers`` instead of forwarding), redirect (307 to ``target`` +
    same path), truncate (announce the full length, send ``keep`` of the
    body, close), slow (body in ``chunk``-byte pieces, ``delay`` apart),
    stall (headers, then ``delay`` of silence, then the body), corrupt
    (flip one body byte), strip-range (forward without ``Range``: the
    registry answers 200), shift-range (forward a single range moved by
    one byte: a wrong Content-Range)."""

    kind: str
    match: str = ""
    times: int = 1
    status: int = 503
    headers: Mapping[str, str] = field(default_factory=dict)
    target: str = ""
    keep: float = 0.5
    delay: float = 0.0
    chunk: int = 4096


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: Mapping[str, str]
    fault: Optional[str]


class FaultProxy:
    """``with FaultProxy(registry.host) as proxy:`` serves ``proxy.host``."""

    def __init__(self, upstream: str, *, bind: str = "127.0.0.1", inject_headers: Mapping[str, str] = ()) -> None:
        self.upstream = upstream
        self.bind = bind
        self.inject_headers = dict(inject_headers)
        self.faults: list[Fault] = []
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._server = BackgroundServer(f"fault-proxy-{bind}", bind)

    @property
    def host(self) -> str:
        return f"{self.bind}:{self._server.port}"

    def add(self, kind: str, match: str = "", times: int = 1, **kw: object) -> Fault:
        fault = Fault(kind, match, times, **kw)  # type: ignore[arg-type]
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.seen.clear()

    def requests(self, pattern: str = "") -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if re.search(pattern, f"{s.method} {s.path}")]

    def blob_bytes(self, sizes: Mapping[str, int], digest: str = "") -> int:
        """Blob bytes served so far (of ``digest`` only, if given): a GET's
        ``Range`` counts its ranges (a suffix ``-N``: N, at most the blob's
        size when ``sizes`` knows it), a GET without one the blob's size from
        ``sizes`` (digest -> size)."""
        total = 0
        for seen in self.requests(rf"^GET /v2/.*/blobs/{re.escape(digest)}"):
            blob = seen.path.rsplit("/", 1)[-1]
            ranges = seen.headers.get("Range", "")
            if not ranges:
                total += sizes.get(blob, 0)
                continue
            for part in ranges.removeprefix("bytes=").split(","):
                start, _, end = part.partition("-")
                if start:
                    total += int(end) - int(start) + 1
                else:
                    total += min(int(end), sizes.get(blob, int(end)))
        return total

    def _take(self, line: str) -> Optional[Fault]:
        with self._lock:
            for f in self.faults:
                if f.times > 0 and re.search(f.match, line):
                    f.times -= 1
                    return f
        return None

    def __enter__(self) -> "FaultProxy":
        self._server.start(_handler(self))
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else delayed ACKs add ~40 ms to every request

        def log_message(self, *args: object) -> None:
            pass

        def finish(self) -> None:
            try:
                super().finish()
            except OSError:
                pass

        def _abort(self) -> None:
            """Close with RST: the client sees 'connection reset by peer'."""
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()
            self.wfile.close()
            self.connection.close()
            self.rfile, self.wfile = io.BytesIO(), io.BytesIO()  # for the base class's final flush

        def _send_head(self, status: int, headers: list[tuple[str, str]], length: Optional[int]) -> None:
            self.send_response_only(status)
            for k, v in headers:
                self.send_header(k, v)
            if length is not None:
                self.send_header("Content-Length", str(length))
            self.end_headers()

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            line = f"{self.command} {self.path}"
            fault = proxy._take(line)
            with proxy._lock:
                proxy.seen.append(Seen(self.command, self.path, dict(self.headers.items()), fault and fault.kind))
            if fault and fault.kind == "reset":
                return self._abort()
            if fault and fault.kind == "status":
                data = json.dumps({"errors": [{"code": "INJECTED", "message": f"injected {fault.status}"}]}).encode()
                self._send_head(fault.status, [("Content-Type", "application/json"), *fault.headers.items()], len(data))
                self.wfile.write(data)
                return
            if fault and fault.kind == "redirect":
                self._send_head(307, [("Location", fault.target + self.path)], 0)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            headers.update(proxy.inject_headers)
            if fault and fault.kind == "strip-range":
                headers.pop("Range", None)
            if fault and fault.kind == "shift-range" and "Range" in headers:
                start, _, end = headers["Range"].removeprefix("bytes=").partition("-")
                headers["Range"] = f"bytes={int(start) + 1}-{int(end) + 1}"
            conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read() if self.command != "HEAD" else b""
                out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP | {"content-length"}]
                announced = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
            finally:
                conn.close()
            self._send_head(resp.status, out, int(announced) if announced is not None else None)
            if self.command == "HEAD":
                return
            kind = fault.kind if fault else ""
            if kind == "corrupt" and data:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            if kind == "truncate":
                self.wfile.write(data[: int(len(data) * fault.keep)])
                self.close_connection = True
            elif kind == "slow":
                for i in range(0, len(data), fault.chunk):
                    self.wfile.write(data[i : i + fault.chunk])
                    time.sleep(fault.delay)
            elif kind == "stall":
                time.sleep(fault.delay)
                self.wfile.write(data)
            else:
                self.wfile.write(data)

        def _safe(self) -> None:
            try:
                self._handle()
            except (BrokenPipeError, ConnectionResetError, ValueError):
                self.close_connection = True

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _safe

    return Handler
