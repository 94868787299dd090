"""HTTP Basic auth (registry ``auth: htpasswd:`` with bcrypt): anonymous
refused, credentials from the Docker config or a credential helper, wrong
passwords reported without leaking them."""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Callable

import pytest

from harness.registry import Registry
from lazyfs.registry import AuthError, RegistryClient

from .conftest import PASSWORD, USER, auths_entry, fake_helper, write_docker_config
from .content import build_image, push_image

Client = Callable[..., RegistryClient]


def test_anonymous_is_refused(basic_registry: Registry, make_client: Client) -> None:
    client = make_client()
    with pytest.raises(AuthError) as e:
        client.resolve(f"{basic_registry.host}/basic/app:v1")
    msg = str(e.value)
    assert basic_registry.host in msg and "basic/app" in msg and "HTTP 401" in msg and "no credentials" in msg


def test_credentials_from_docker_config(
    basic_registry: Registry, make_client: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    config = write_docker_config(tmp_path, {"auths": {basic_registry.host: auths_entry()}})
    client = make_client(docker_config=config)
    repo = client.repository(f"{basic_registry.host}/basic/app")
    image = build_image("amd64")
    push_image(repo, image, "v1")
    resolved = client.resolve(f"{basic_registry.host}/basic/app:v1")
    assert resolved.digest == image.digest
    assert repo.get_range(resolved.manifest.layers[0].digest, 0, 10) == image.layers[0][:10]
    secret_forms = [PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()]
    assert not any(s in caplog.text for s in secret_forms)


def test_credentials_from_helper_on_path(
    basic_registry: Registry, make_client: Client, tmp_path: Path, helper_path: Path
) -> None:
    asked = tmp_path / "asked.log"
    fake_helper(helper_path, "crfstest", {basic_registry.host: (USER, PASSWORD)}, asked)
    config = write_docker_config(tmp_path, {"credHelpers": {basic_registry.host: "crfstest"}})
    client = make_client(docker_config=config)
    repo = client.repository(f"{basic_registry.host}/basic/helped")
    image = build_image("amd64")
    push_image(repo, image, "v1")
    assert client.resolve(f"{basic_registry.host}/basic/helped:v1").digest == image.digest
    assert asked.read_text().splitlines() == [basic_registry.host]  # asked once, for that host only


def test_wrong_password_is_reported_without_the_password(
    basic_registry: Registry, make_client: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-Pa55-word"
    config = write_docker_config(tmp_path, {"auths": {basic_registry.host: auths_entry(USER, wrong)}})
    client = make_client(docker_config=config)
    with pytest.raises(AuthError) as e:
        client.resolve(f"{basic_registry.host}/basic/app:v1")
    assert "credentials rejected" in str(e.value) and basic_registry.host in str(e.value)
    encoded = base64.b64encode(f"{USER}:{wrong}".encode()).decode()
    for text in (str(e.value), repr(e.value), caplog.text):
        assert wrong not in text and encoded not in text


def test_credentials_for_another_host_are_not_used(basic_registry: Registry, make_client: Client, tmp_path: Path) -> None:
    config = write_docker_config(tmp_path, {"auths": {"127.0.0.1:1": auths_entry()}})
    with pytest.raises(AuthError):
        make_client(docker_config=config).resolve(f"{basic_registry.host}/basic/app:v1")
