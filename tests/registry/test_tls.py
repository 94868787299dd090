"""HTTPS with a CA made by the test: trusted through ``ca_file``, refused
(with a clear error, no fallback to plain HTTP) without it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from harness.registry import Registry
from lazyfs.registry import RegistryClient, TLSError

from .certs import make_ca, make_server_cert
from .conftest import PASSWORD, USER, auths_entry, write_docker_config, write_htpasswd
from .content import build_image, push_image

Client = Callable[..., RegistryClient]


@pytest.fixture
def tls_registry(tmp_path: Path) -> Iterator[tuple[Registry, Path]]:
    work = tmp_path / "tls-registry"
    work.mkdir()
    ca = make_ca(work)
    server = make_server_cert(work, ca)
    htpasswd = write_htpasswd(work / "htpasswd", {USER: PASSWORD})
    auth = {"htpasswd": {"realm": "crfs-tls", "path": htpasswd}}
    with Registry(work / "reg", auth=auth, tls=(server.cert_path, server.key_path)) as reg:
        yield reg, ca.cert_path


def test_https_with_configured_ca(tls_registry: tuple[Registry, Path], make_client: Client, tmp_path: Path) -> None:
    reg, ca_file = tls_registry
    config = write_docker_config(tmp_path, {"auths": {reg.host: auths_entry()}})
    client = make_client(ca_file=ca_file, docker_config=config)
    repo = client.repository(f"{reg.host}/tls/app")
    image = build_image("amd64")
    push_image(repo, image, "v1")
    resolved = client.resolve(f"{reg.host}/tls/app:v1")
    assert resolved.digest == image.digest
    assert repo.get_range(resolved.manifest.layers[0].digest, 3, 4) == image.layers[0][3:7]


def test_untrusted_certificate_is_a_clear_error(tls_registry: tuple[Registry, Path], make_client: Client) -> None:
    reg, _ = tls_registry
    with pytest.raises(TLSError) as e:
        make_client().resolve(f"{reg.host}/tls/app:v1")
    assert "not trusted" in str(e.value) and "ca_file" in str(e.value) and reg.host in str(e.value)
