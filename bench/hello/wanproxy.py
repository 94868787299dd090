#!/usr/bin/env python3
"""A simulated wide-area network in front of a registry: an HTTP reverse
proxy that adds a round-trip delay to every request and caps bandwidth.

- **Delay**: every response is held for ``rtt`` seconds after the upstream
  answered, before its status line goes out: one round trip per request,
  which is what a request costs on a long link whatever its size (the
  kernel here has no ``netem``, so latency is simulated in user space).
- **Bandwidth**: every byte sent back (headers and body) is paced by one
  token bucket shared by all connections, ``mbit`` Mbit/s (0: unlimited),
  with a small burst, so parallel downloads share the link as on a real
  one.
- **Streaming**: bodies go through in 64 KiB pieces, never buffered whole;
  connections are kept alive on both sides (one upstream connection per
  client connection), Nagle is off on both sides.
- **Counting**: bytes of response bodies and headers served, and one record
  per request (method, path, Range, status, bytes, start and end times)
  that the benchmark reads to know what a run cost and which byte ranges of
  which blobs a lazy mount fetched.

``rtt`` and ``mbit`` are attributes and may be changed while it serves
(the benchmark switches between loopback and WAN on one proxy).

Standalone: ``python bench/hello/wanproxy.py UPSTREAM_HOST:PORT [--port N]
[--rtt-ms 50] [--mbit 100]``; ``--selftest`` measures one 50 MB blob.
"""

from __future__ import annotations

import argparse
import http.client
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
              "proxy-authenticate", "proxy-authorization"}
PIECE = 64 << 10


class SharedBucket:
    """A token bucket of bytes shared by every connection.

    ``take(n)`` reserves ``n`` bytes at once (the balance may go negative)
    and sleeps until the debt is paid, outside the lock, so concurrent
    senders are served in reservation order at ``rate`` bytes/s in total.
    ``rate`` 0 means unlimited.
    """

    def __init__(self, rate: float, burst: float = 32 << 10) -> None:
        self._lock = threading.Lock()
        self.burst = burst
        self._tokens = burst
        self._last = time.monotonic()
        self.rate = rate

    def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


@dataclass
class Record:
    method: str
    path: str
    range: str
    status: int
    bytes: int  # body bytes sent
    start: float  # time.monotonic() when the request arrived
    end: float  # when its last byte was sent


class WanProxy:
    """``with WanProxy("127.0.0.1:5000", rtt=0.05, mbit=100) as p:`` serves
    ``p.host`` until the block ends."""

    def __init__(self, upstream: str, rtt: float = 0.05, mbit: float = 100.0, bind: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = upstream
        self.rtt = rtt
        self.bucket = SharedBucket(0)
        self.mbit = mbit
        self._lock = threading.Lock()
        self.records: list[Record] = []
        self.bytes_served = 0  # body + header bytes
        self._server = ThreadingHTTPServer((bind, port), _handler_class(self))
        self._server.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    @property
    def mbit(self) -> float:
        return self.bucket.rate * 8 / 1e6

    @mbit.setter
    def mbit(self, value: float) -> None:
        self.bucket.rate = max(0.0, value) * 1e6 / 8

    @property
    def host(self) -> str:
        addr, port = self._server.server_address[:2]
        return f"{addr}:{port}"

    def start(self) -> "WanProxy":
        self._thread = threading.Thread(target=self._server.serve_forever, name="wanproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "WanProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget the records and zero the byte counter."""
        with self._lock:
            self.records = []
            self.bytes_served = 0

    def snapshot(self) -> tuple[int, list[Record]]:
        with self._lock:
            return self.bytes_served, list(self.records)

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_served += n

    def _record(self, record: Record) -> None:
        with self._lock:
            self.records.append(record)


def _handler_class(proxy: WanProxy) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True
        upstream: Optional[http.client.HTTPConnection] = None

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

        def _connection(self) -> http.client.HTTPConnection:
            if self.upstream is None:
                self.upstream = http.client.HTTPConnection(proxy.upstream, timeout=300)
                self.upstream.connect()
                self.upstream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return self.upstream

        def _forward(self) -> None:
            start = time.monotonic()
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            for attempt in range(2):  # a kept-alive upstream connection may have been closed
                conn = self._connection()
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    break
                except (http.client.HTTPException, OSError):
                    conn.close()
                    self.upstream = None
                    if attempt:
                        raise
            if proxy.rtt > 0:
                time.sleep(proxy.rtt)
            sent = 0
            try:
                self.send_response_only(resp.status, resp.reason)
                out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
                chunked = self.command != "HEAD" and resp.getheader("Content-Length") is None and resp.status not in (204, 304)
                for k, v in out_headers:
                    self.send_header(k, v)
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()  # flushes the header buffer
                header_bytes = sum(len(k) + len(v) + 4 for k, v in out_headers) + 40
                proxy.bucket.take(header_bytes)
                proxy._count(header_bytes)
                if self.command != "HEAD":
                    while True:
                        piece = resp.read(PIECE)
                        if not piece:
                            break
                        proxy.bucket.take(len(piece))
                        if chunked:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        else:
                            self.wfile.write(piece)
                        sent += len(piece)
                        proxy._count(len(piece))
                    if chunked:
                        self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            finally:
                resp.close()
                if resp.will_close:
                    conn.close()
                    self.upstream = None
                proxy._record(Record(self.command, self.path, self.headers.get("Range", ""), resp.status, sent,
                                     start, time.monotonic()))

        def do_GET(self) -> None:
            self._forward()

        do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                if self.upstream is not None:
                    self.upstream.close()

    return Handler


def _selftest(proxy: WanProxy, size: int = 50_000_000) -> None:
    """Serve a ``size``-byte body from a local server through the proxy and time it."""
    payload = b"x" * size

    class Blob(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            view = memoryview(payload)
            for i in range(0, size, 1 << 20):
                self.wfile.write(view[i:i + (1 << 20)])

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Blob)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    proxy.upstream = "127.0.0.1:%d" % upstream.server_address[1]
    try:
        for _ in range(2):
            conn = http.client.HTTPConnection(proxy.host)
            t0 = time.monotonic()
            conn.request("GET", "/blob")
            resp = conn.getresponse()
            t1 = time.monotonic()
            got = 0
            while chunk := resp.read(1 << 20):
                got += len(chunk)
            t2 = time.monotonic()
            conn.close()
            print(f"{got} bytes: first byte after {t1 - t0:.3f} s, all after {t2 - t0:.3f} s "
                  f"({got * 8 / (t2 - t1) / 1e6:.1f} Mbit/s; rtt {proxy.rtt * 1000:.0f} ms, cap {proxy.mbit:g} Mbit/s)")
    finally:
        upstream.shutdown()
        upstream.server_close()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("upstream", nargs="?", default="", metavar="HOST:PORT")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rtt-ms", type=float, default=50.0)
    parser.add_argument("--mbit", type=float, default=100.0, help="Mbit/s, 0 for unlimited")
    parser.add_argument("--selftest", action="store_true", help="time a 50 MB body through the proxy and exit")
    args = parser.parse_args(argv)
    with WanProxy(args.upstream, rtt=args.rtt_ms / 1000, mbit=args.mbit, port=args.port) as proxy:
        if args.selftest:
            _selftest(proxy)
            return 0
        print(f"serving {proxy.host} -> {args.upstream}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
