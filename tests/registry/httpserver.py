"""A threaded HTTP server on 127.0.0.x run in the background of a test,
shared by the fault proxy and the token server."""

from __future__ import annotations

import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional


class _QuietServer(ThreadingHTTPServer):
    """Clients hanging up mid-request is what these tests provoke: no tracebacks for it."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:  # type: ignore[no-untyped-def]
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class BackgroundServer:
    """Serves ``handler`` on ``bind``:random-port between ``start`` and ``stop``;
    stopping also cuts idle keep-alive connections so no handler thread lingers."""

    def __init__(self, name: str, bind: str = "127.0.0.1") -> None:
        self.name = name
        self.bind = bind
        self._server: Optional[_QuietServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        assert self._server is not None, f"{self.name} not started"
        return self._server.server_address[1]

    def start(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = _QuietServer((self.bind, 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._server.connections_lock:
            conns = list(self._server.connections)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(10)
