"""The standard-library HTTP client (lazyfs.registry.wire) and what the
registry client builds on it: keep-alive reuse, a dead idle connection
retried, bodies (Content-Length, chunked, cut short, HEAD, uploads from a
file), proxies from the environment (CONNECT for https, absolute URI for
http), no ``GET /v2/`` ping, and short error descriptions."""

from __future__ import annotations

import hashlib
import http.client
import json
import select
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

from harness.proc import free_port
from harness.registry import Registry
from lazyfs.registry import ConfigError, RegistryClient, Unreachable
from lazyfs.registry.transport import Transport, describe
from lazyfs.registry.wire import ConnectError, ConnectTimeout, HttpClient

from .certs import make_ca, make_server_cert
from .conftest import PASSWORD, USER, auths_entry, fast_config, write_docker_config, write_htpasswd
from .content import build_image, push_image
from .faultproxy import FaultProxy
from .httpserver import BackgroundServer

Client = Callable[..., RegistryClient]
BIG = bytes(range(256)) * 4096  # 1 MiB


class Origin:
    """A tiny HTTP/1.1 server counting connections and requests."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self._server = BackgroundServer("wire-origin")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._server.port}"

    def __enter__(self) -> "Origin":
        self._server.start(_origin_handler(self))
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()


def _origin_handler(origin: Origin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, *args: object) -> None:
            pass

        def setup(self) -> None:
            super().setup()
            self.served = 0
            with origin.lock:
                origin.connections += 1

        def _reply(self, status: int, body: bytes, headers: Optional[dict[str, str]] = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _handle(self) -> None:
            self.served += 1
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with origin.lock:
                origin.requests.append((self.command, self.path, dict(self.headers.items())))
            path = self.path.split("?")[0]
            if path == "/hello":
                self._reply(200, b"hello", {"X-Twice": "a"})
            elif path == "/big":
                self._reply(200, BIG)
            elif path == "/chunked":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(0, len(BIG), 100_000):
                    piece = BIG[i : i + 100_000]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
            elif path == "/cut":  # announces more than it sends
                self.send_response(200)
                self.send_header("Content-Length", str(len(BIG)))
                self.end_headers()
                self.wfile.write(BIG[:1000])
                self.close_connection = True
            elif path == "/echo":
                self._reply(200, json.dumps({"len": len(body), "sha": hashlib.sha256(body).hexdigest()}).encode())
            elif path == "/drop-reused":  # the server closed the idle connection as the request came
                if self.served > 1:
                    self.close_connection = True
                    return
                self._reply(200, b"first")
            elif path == "/close-after":  # answers, then closes without saying so
                self._reply(200, b"bye")
                self.close_connection = True
            elif path == "/error":
                self._reply(404, b'{"errors": [{"code": "NOPE"}]}', {"Content-Type": "application/json"})
            else:
                self._reply(404, b"")

        do_GET = do_HEAD = do_PUT = do_POST = _handle

    return Handler


@pytest.fixture
def origin() -> Iterator[Origin]:
    with Origin() as o:
        yield o


@pytest.fixture
def hc() -> Iterator[HttpClient]:
    client = HttpClient(connect_timeout=2.0, read_timeout=5.0, user_agent="wire-test/1", proxies={})
    yield client
    client.close()


def test_keep_alive_connection_is_reused(origin: Origin, hc: HttpClient) -> None:
    for _ in range(5):
        resp = hc.request("GET", origin.base + "/hello")
        assert (resp.status_code, resp.content) == (200, b"hello")
        assert resp.headers["x-twice"] == "a" and "CONTENT-LENGTH" in resp.headers
    with hc.request("GET", origin.base + "/big", stream=True) as resp:
        assert b"".join(resp.iter_pieces(64 << 10)) == BIG
    with hc.request("HEAD", origin.base + "/hello") as resp:
        assert resp.status_code == 200 and resp.headers["Content-Length"] == "5" and resp.read() == b""
    with hc.request("GET", origin.base + "/error", stream=True) as resp:  # small error body: read ahead
        assert resp.status_code == 404 and resp.json() == {"errors": [{"code": "NOPE"}]}
    assert origin.connections == 1
    _, _, headers = origin.requests[0]
    assert headers["User-Agent"] == "wire-test/1" and headers["Accept-Encoding"] == "identity"


def test_unread_body_closes_the_connection(origin: Origin, hc: HttpClient) -> None:
    with hc.request("GET", origin.base + "/big", stream=True) as resp:
        assert resp.read(10) == BIG[:10]
    assert hc.request("GET", origin.base + "/hello").content == b"hello"
    assert origin.connections == 2


def test_parallel_requests_use_a_pool(origin: Origin, hc: HttpClient) -> None:
    def get(_: int) -> bytes:
        with hc.request("GET", origin.base + "/big", stream=True) as resp:
            return resp.read(len(BIG))

    with ThreadPoolExecutor(4) as pool:
        assert all(b == BIG for b in pool.map(get, range(40)))
    assert origin.connections <= 4


def test_dead_idle_connection_is_retried_once(origin: Origin, hc: HttpClient) -> None:
    assert hc.request("GET", origin.base + "/drop-reused").content == b"first"
    # the reused connection dies under the request: sent again on a new one
    assert hc.request("GET", origin.base + "/drop-reused").content == b"first"
    assert origin.connections == 2
    # an idle connection the server closed is not used at all
    assert hc.request("GET", origin.base + "/close-after").content == b"bye"
    assert hc.request("GET", origin.base + "/hello").content == b"hello"
    assert origin.connections == 3
    # never for a request that is not safe to repeat
    assert hc.request("GET", origin.base + "/hello").content == b"hello"
    with pytest.raises(http_client_dead()):
        hc.request("POST", origin.base + "/drop-reused", body=b"x")


def http_client_dead() -> tuple[type[BaseException], ...]:
    return (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


def test_dead_keep_alive_does_not_use_the_retry_budget(origin: Origin) -> None:
    transport = Transport(fast_config(max_attempts=1))
    try:
        for _ in range(2):
            with transport.send("GET", origin.base + "/drop-reused") as resp:
                assert resp.content == b"first"
    finally:
        transport.close()


def test_bodies_chunked_cut_short_and_uploads(origin: Origin, hc: HttpClient, tmp_path: Path) -> None:
    with hc.request("GET", origin.base + "/chunked", stream=True) as resp:
        assert resp.read(5) == BIG[:5] and resp.read() == BIG[5:]
    with hc.request("GET", origin.base + "/cut", stream=True) as resp:
        with pytest.raises(http.client.IncompleteRead):
            resp.read(len(BIG))
    with pytest.raises(http.client.IncompleteRead):
        hc.request("GET", origin.base + "/cut")
    path = tmp_path / "upload"
    path.write_bytes(b"skip" + BIG)
    with path.open("rb") as f:
        f.seek(4)  # sent from the current position on
        answer = hc.request("PUT", origin.base + "/echo", body=f).json()
    assert answer == {"len": len(BIG), "sha": hashlib.sha256(BIG).hexdigest()}
    assert hc.request("POST", origin.base + "/echo", body=b"").json()["len"] == 0
    assert hc.request("PUT", origin.base + "/echo", body=b"abc").json()["len"] == 3


def test_describe_is_short() -> None:
    def chained(outer: BaseException, inner: BaseException) -> BaseException:
        outer.__cause__ = inner
        return outer

    assert describe(chained(ConnectTimeout("x"), TimeoutError("timed out"))) == "connect timed out (ConnectTimeout)"
    assert describe(TimeoutError("timed out")) == "read timed out (TimeoutError)"
    refused = ConnectionRefusedError(111, "Connection refused")
    assert describe(chained(ConnectError("cannot connect to h:1"), refused)) == "ConnectionRefusedError: Connection refused"
    unreachable = OSError(113, "No route to host")
    assert describe(chained(ConnectError("x"), unreachable)) == "cannot connect (OSError: No route to host)"
    assert describe(http.client.IncompleteRead(b"ab", 10)).startswith("connection broken: IncompleteRead")
    assert describe(http.client.RemoteDisconnected("Remote end closed connection without response")).startswith(
        "RemoteDisconnected"
    )


# --- the registry client: no ping ----------------------------------------------


def test_no_ping_and_plain_http_found_by_the_first_request(plain_registry: Registry, make_client: Client) -> None:
    image = build_image("amd64")
    seed = make_client()
    push_image(seed.repository(f"{plain_registry.host}/wire/app"), image, "v1")
    with FaultProxy(plain_registry.host) as proxy:
        client = make_client()
        assert client.resolve(f"{proxy.host}/wire/app:v1").digest == image.digest
        assert client.repository(f"{proxy.host}/wire/app").blob_size(image.digest) is None
        assert [f"{s.method} {s.path}" for s in proxy.seen] == [
            "GET /v2/wire/app/manifests/v1",
            f"HEAD /v2/wire/app/blobs/{image.digest}",
        ]
        assert {h.scheme for h in client._hosts.values()} == {"http"}


def test_explicit_https_endpoint_never_falls_back_to_http(plain_registry: Registry, make_client: Client) -> None:
    image = build_image("amd64")
    push_image(make_client().repository(f"{plain_registry.host}/wire/app"), image, "v1")
    with FaultProxy(plain_registry.host) as mirror:
        client = make_client(mirrors={plain_registry.host: [f"https://{mirror.host}"]})
        assert client.resolve(f"{plain_registry.host}/wire/app:v1").digest == image.digest  # from the registry
        assert not mirror.seen


# --- proxies from the environment ------------------------------------------------


class Proxy:
    """A forward proxy: CONNECT tunnels and absolute-URI requests, recorded."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self._server = BackgroundServer("wire-proxy")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.port}"

    def __enter__(self) -> "Proxy":
        self._server.start(_proxy_handler(self))
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()


def _proxy_handler(proxy: Proxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_CONNECT(self) -> None:
            proxy.seen.append(("CONNECT", self.path, dict(self.headers.items())))
            host, _, port = self.path.rpartition(":")
            upstream = socket.create_connection((host, int(port)), timeout=10)
            self.send_response(200, "Connection established")
            self.end_headers()
            self.wfile.flush()
            sockets = [self.connection, upstream]
            try:
                while True:
                    ready, _, _ = select.select(sockets, [], [], 10)
                    if not ready:
                        return
                    for s in ready:
                        data = s.recv(65536)
                        if not data:
                            return
                        (upstream if s is self.connection else self.connection).sendall(data)
            finally:
                upstream.close()
                self.close_connection = True

        def _forward(self) -> None:
            proxy.seen.append((self.command, self.path, dict(self.headers.items())))
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            parts = self.path.split("/", 3)  # http: '' netloc rest
            conn = http.client.HTTPConnection(parts[2], timeout=10)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-authorization", "connection")}
            conn.request(self.command, "/" + (parts[3] if len(parts) > 3 else ""), body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = _forward

    return Handler


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


def test_http_through_a_proxy_from_the_environment(
    origin: Origin, no_proxy_env: pytest.MonkeyPatch
) -> None:
    with Proxy() as proxy:
        netloc = proxy.url.split("//")[1]
        no_proxy_env.setenv("HTTP_PROXY", f"http://pu:p%40ss@{netloc}")
        hc = HttpClient(connect_timeout=2, read_timeout=5)
        try:
            assert hc.request("GET", origin.base + "/hello?x=1").content == b"hello"
        finally:
            hc.close()
        (method, target, headers), = proxy.seen
        assert (method, target) == ("GET", origin.base + "/hello?x=1")
        assert headers["Proxy-Authorization"] == "Basic cHU6cEBzcw=="  # pu:p@ss
        assert "Proxy-Authorization" not in origin.requests[0][2]

        no_proxy_env.setenv("no_proxy", "example.org,127.0.0.1")
        hc = HttpClient(connect_timeout=2, read_timeout=5)
        try:
            assert hc.request("GET", origin.base + "/hello").content == b"hello"
        finally:
            hc.close()
        assert len(proxy.seen) == 1


def test_https_registry_through_connect(
    tmp_path: Path, make_client: Client, no_proxy_env: pytest.MonkeyPatch
) -> None:
    ca = make_ca(tmp_path)
    server = make_server_cert(tmp_path, ca)
    auth = {"htpasswd": {"realm": "crfs-wire", "path": write_htpasswd(tmp_path / "htpasswd", {USER: PASSWORD})}}
    with Registry(tmp_path / "reg", auth=auth, tls=(server.cert_path, server.key_path)) as reg, Proxy() as proxy:
        netloc = proxy.url.split("//")[1]
        no_proxy_env.setenv("https_proxy", f"http://pu:pw@{netloc}")
        config = write_docker_config(tmp_path / "docker", {"auths": {reg.host: auths_entry()}})
        client = make_client(ca_file=ca.cert_path, docker_config=config)
        image = build_image("amd64")
        repo = client.repository(f"{reg.host}/wire/tunnel")
        push_image(repo, image, "v1")
        assert client.resolve(f"{reg.host}/wire/tunnel:v1").digest == image.digest
        assert proxy.seen and all(m == "CONNECT" and t == reg.host for m, t, _ in proxy.seen)
        assert all(h.get("Proxy-Authorization") == "Basic cHU6cHc=" for _, _, h in proxy.seen)
        assert not any("Authorization" in h for _, _, h in proxy.seen)
        assert len(proxy.seen) <= 2  # keep-alive through the tunnel


def test_unsupported_proxy_is_a_config_error(origin: Origin, no_proxy_env: pytest.MonkeyPatch) -> None:
    no_proxy_env.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    transport = Transport(fast_config())
    try:
        with pytest.raises(ConfigError, match="socks5"):
            transport.send("GET", origin.base + "/hello")
    finally:
        transport.close()


def test_no_requests_import() -> None:
    import subprocess

    code = "import lazyfs.registry, lazyfs.remote_source, sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('requests', 'urllib3')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unreachable_message_names_the_cause(make_client: Client) -> None:
    host = f"127.0.0.1:{free_port()}"
    with pytest.raises(Unreachable) as e:
        make_client(max_attempts=1).repository(f"{host}/a/b").blob_size("sha256:" + "0" * 64)
    assert "ConnectionRefusedError" in str(e.value)

