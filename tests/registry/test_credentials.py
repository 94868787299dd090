"""Credentials from Docker config files and credential helpers (no registry)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from lazyfs.registry import CredentialStore, CredentialsError

from .conftest import fake_helper, write_docker_config


def test_auths_base64_and_plain_fields(tmp_path: Path) -> None:
    path = write_docker_config(tmp_path, {"auths": {
        "reg.example:5000": {"auth": base64.b64encode(b"alice:pa:ss").decode()},
        "https://other.example/v1/": {"username": "bob", "password": "pw"},
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:hubpw").decode()},
        "tok.example": {"identitytoken": "refresh-123"},
    }})
    store = CredentialStore(path)
    alice = store.get("reg.example:5000")
    assert (alice.username, alice.password) == ("alice", "pa:ss")
    assert store.get("other.example").password == "pw"
    assert store.get("docker.io").username == "hub"
    assert store.get("registry-1.docker.io").username == "hub"  # the Hub's API host
    assert store.get("tok.example").identity_token == "refresh-123"
    assert store.get("reg.example") is None  # the port is part of the key
    assert store.get("unknown.example") is None
    assert "pa:ss" not in repr(alice) and "refresh-123" not in repr(store.get("tok.example"))


def test_default_location_and_env(tmp_path: Path) -> None:
    home, custom = tmp_path / "home", tmp_path / "custom"
    write_docker_config(home / ".docker", {"auths": {"r.example": {"username": "home", "password": "x"}}})
    write_docker_config(custom, {"auths": {"r.example": {"username": "env", "password": "x"}}})
    assert CredentialStore(environ={"HOME": str(home)}).get("r.example").username == "home"
    env = {"HOME": str(home), "DOCKER_CONFIG": str(custom)}
    assert CredentialStore(environ=env).get("r.example").username == "env"
    explicit = write_docker_config(tmp_path / "explicit", {"auths": {"r.example": {"username": "explicit", "password": "x"}}})
    assert CredentialStore(explicit, environ=env).get("r.example").username == "explicit"
    assert CredentialStore(tmp_path / "missing.json").get("r.example") is None


def test_cred_helpers_and_store(tmp_path: Path, helper_path: Path) -> None:
    log = tmp_path / "asked.log"
    fake_helper(helper_path, "fake", {"helped.example:5000": ("hu", "hs"), "tokenhost": ("<token>", "idtok")}, log)
    fake_helper(helper_path, "store", {"https://index.docker.io/v1/": ("hubuser", "hubpw")}, log)
    path = write_docker_config(tmp_path, {
        "credsStore": "store",
        "credHelpers": {"helped.example:5000": "fake", "tokenhost": "fake", "absent.example": "fake"},
        "auths": {"plain.example": {"username": "fileuser", "password": "filepw"}},
    })
    store = CredentialStore(path)
    helped = store.get("helped.example:5000")
    assert (helped.username, helped.password) == ("hu", "hs")
    assert store.get("tokenhost").identity_token == "idtok"
    assert store.get("absent.example") is None  # helper says "not found"
    assert store.get("docker.io").username == "hubuser"  # credsStore, asked with the Hub's legacy URL
    assert store.get("plain.example").username == "fileuser"  # credsStore has nothing: the file's auths
    store.get("helped.example:5000")  # cached: not asked again
    assert log.read_text().splitlines() == [
        "helped.example:5000", "tokenhost", "absent.example", "https://index.docker.io/v1/", "plain.example"]


def test_credential_errors(tmp_path: Path, helper_path: Path) -> None:
    missing = CredentialStore(write_docker_config(tmp_path / "a", {"credHelpers": {"h.example": "nosuchhelper"}}))
    with pytest.raises(CredentialsError, match="docker-credential-nosuchhelper .* not found"):
        missing.get("h.example")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(CredentialsError, match="not valid JSON"):
        CredentialStore(tmp_path / "bad" / "config.json").get("x")
    bad_auth = write_docker_config(tmp_path / "c", {"auths": {"x": {"auth": "!!notbase64"}}})
    with pytest.raises(CredentialsError, match="not base64"):
        CredentialStore(bad_auth).get("x")
