"""Bearer token auth (registry ``auth: token:``) with the test token server:
scopes per repository and action, token reuse and renewal, cross-repository
mounts, identity tokens, and refusals."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from harness.registry import Registry
from lazyfs.registry import AuthError, RegistryClient

from .conftest import PASSWORD, USER, auths_entry, write_docker_config
from .content import build_image, push_image, sha256
from .tokenserver import TokenServer

Client = Callable[..., RegistryClient]
REFRESH = "refresh-token-for-crfs-user"


@pytest.fixture
def token_stack(tmp_path: Path) -> Iterator[tuple[TokenServer, Registry]]:
    work = tmp_path / "token-registry"
    work.mkdir()
    with TokenServer(work, users={USER: PASSWORD}, refresh_tokens={REFRESH: USER}) as ts:
        with Registry(work / "reg", auth=ts.registry_auth()) as reg:
            yield ts, reg


@pytest.fixture
def authed(token_stack: tuple[TokenServer, Registry], make_client: Client, tmp_path: Path) -> RegistryClient:
    _, reg = token_stack
    return make_client(docker_config=write_docker_config(tmp_path, {"auths": {reg.host: auths_entry()}}))


def test_push_and_pull_reuse_one_token(token_stack: tuple[TokenServer, Registry], authed: RegistryClient) -> None:
    ts, reg = token_stack
    before = ts.count()
    repo = authed.repository(f"{reg.host}/tok/app")
    image = build_image("amd64")
    push_image(repo, image, "v1")  # HEADs, uploads, manifest: one pull,push token
    resolved = authed.resolve(f"{reg.host}/tok/app:v1")  # pull is covered by that token
    layer = resolved.manifest.layers[0].digest
    assert repo.get_blob(layer) == image.layers[0]
    assert repo.get_ranges(layer, [(0, 5), (10, 5)]) == [image.layers[0][:5], image.layers[0][10:15]]
    new = ts.requests[before:]
    assert [(r.method, r.user, r.scopes, r.granted) for r in new] == [
        ("GET", USER, ("repository:tok/app:pull,push",), True)]
    assert new[0].service == ts.service

    authed.repository(f"{reg.host}/tok/other").blob_exists(sha256(b"x"))  # another repo: another scope
    assert [r.scopes for r in ts.requests[before + 1 :]] == [("repository:tok/other:pull",)]


def test_pull_only_client_asks_for_pull(token_stack: tuple[TokenServer, Registry], authed: RegistryClient, make_client: Client, tmp_path: Path) -> None:
    ts, reg = token_stack
    push_image(authed.repository(f"{reg.host}/tok/pulled"), build_image("amd64"), "v1")
    reader = make_client(docker_config=write_docker_config(tmp_path / "r", {"auths": {reg.host: auths_entry()}}))
    before = ts.count()
    resolved = reader.resolve(f"{reg.host}/tok/pulled:v1")
    reader.repository(f"{reg.host}/tok/pulled").get_blob(resolved.manifest.config.digest)
    assert [r.scopes for r in ts.requests[before:]] == [("repository:tok/pulled:pull",)]


def test_token_renewed_after_expiry(token_stack: tuple[TokenServer, Registry], authed: RegistryClient) -> None:
    ts, reg = token_stack
    repo = authed.repository(f"{reg.host}/tok/expiring")
    ts.expires_in = 1
    try:
        before = ts.count()
        repo.blob_exists(sha256(b"a"))
        repo.blob_exists(sha256(b"b"))
        assert ts.count() == before + 1  # reused while valid
        time.sleep(1.1)
        repo.blob_exists(sha256(b"c"))
        assert ts.count() == before + 2  # renewed once expired
    finally:
        ts.expires_in = 300


def test_cross_repository_mount_asks_for_source_pull(token_stack: tuple[TokenServer, Registry], authed: RegistryClient) -> None:
    ts, reg = token_stack
    data = b"shared layer " * 1000
    authed.repository(f"{reg.host}/tok/mount-src").push_blob(data)
    before = ts.count()
    result = authed.repository(f"{reg.host}/tok/mount-dst").push_blob(data, mount_from="tok/mount-src")
    assert result.how == "mounted"
    scopes = {s for r in ts.requests[before:] for s in r.scopes}
    assert scopes == {"repository:tok/mount-dst:pull,push", "repository:tok/mount-src:pull"}
    assert authed.repository(f"{reg.host}/tok/mount-dst").get_blob(sha256(data)) == data


def test_identity_token_uses_oauth2_refresh(token_stack: tuple[TokenServer, Registry], make_client: Client, tmp_path: Path) -> None:
    ts, reg = token_stack
    config = write_docker_config(tmp_path, {"auths": {reg.host: {"identitytoken": REFRESH}}})
    client = make_client(docker_config=config)
    before = ts.count()
    client.repository(f"{reg.host}/tok/idtoken").push_blob(b"pushed with an identity token")
    assert [(r.method, r.user, r.granted) for r in ts.requests[before:]] == [("POST", USER, True)]


def test_anonymous_gets_no_access(token_stack: tuple[TokenServer, Registry], make_client: Client) -> None:
    ts, reg = token_stack
    with pytest.raises(AuthError) as e:
        make_client().resolve(f"{reg.host}/tok/app:v1")
    assert reg.host in str(e.value) and "tok/app" in str(e.value) and e.value.status == 401


def test_wrong_password_refused_by_token_server(token_stack: tuple[TokenServer, Registry], make_client: Client, tmp_path: Path) -> None:
    ts, reg = token_stack
    config = write_docker_config(tmp_path, {"auths": {reg.host: auths_entry(USER, "not-the-password")}})
    with pytest.raises(AuthError, match="token server 127.0.0.1:[0-9]+ refused user 'crfs-user'") as e:
        make_client(docker_config=config).resolve(f"{reg.host}/tok/app:v1")
    assert "not-the-password" not in str(e.value)
