"""Fixtures for the registry client tests: real docker-registry instances
(plain, htpasswd, token, TLS) and clients that are always closed.

Every server is a context manager, started for one test and stopped when
that test ends (a registry starts in ~0.1 s); a missing docker-registry
binary fails, never skips.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Callable, Iterator

import bcrypt
import pytest

from harness.registry import Registry
from lazyfs.registry import RegistryClient, RegistryConfig

USER, PASSWORD = "crfs-user", "s3cret-pa55word"


def fast_config(**kw: object) -> RegistryConfig:
    """Short timeouts and backoff so failure tests stay quick."""
    defaults: dict = dict(
        connect_timeout=2.0, read_timeout=5.0, max_attempts=4, retry_budget=10.0,
        backoff_initial=0.05, backoff_max=0.5, docker_config=Path("/nonexistent/config.json"),
    )
    defaults.update(kw)
    return RegistryConfig(**defaults)


@pytest.fixture
def make_client() -> Iterator[Callable[..., RegistryClient]]:
    """``make_client(**config)``: a client with fast_config, closed at teardown."""
    made: list[RegistryClient] = []

    def make(**kw: object) -> RegistryClient:
        client = RegistryClient(fast_config(**kw))
        made.append(client)
        return client

    yield make
    for c in made:
        c.close()


@pytest.fixture
def plain_registry(tmp_path: Path) -> Iterator[Registry]:
    with Registry(tmp_path / "plain-registry") as reg:
        yield reg


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    lines = [f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()}" for u, p in users.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def basic_registry(tmp_path: Path) -> Iterator[Registry]:
    work = tmp_path / "basic-registry"
    work.mkdir()
    htpasswd = write_htpasswd(work / "htpasswd", {USER: PASSWORD})
    with Registry(work / "reg", auth={"htpasswd": {"realm": "crfs-test", "path": htpasswd}}) as reg:
        yield reg


def write_docker_config(directory: Path, config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return path


def auths_entry(user: str = USER, password: str = PASSWORD) -> dict:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def fake_helper(bindir: Path, name: str, answers: dict[str, tuple[str, str]], log: Path) -> Path:
    """``docker-credential-NAME``: answers ``get`` from ``answers`` (server ->
    (user, secret)), prints the docker 'not found' message otherwise, and
    appends every server it was asked about to ``log``."""
    bindir.mkdir(parents=True, exist_ok=True)
    script = bindir / f"docker-credential-{name}"
    script.write_text(
        "#!/usr/bin/env python3\n"
        "import json, sys\n"
        f"ANSWERS = {json.dumps(answers)}\n"
        "assert sys.argv[1:] == ['get'], sys.argv\n"
        "server = sys.stdin.read().strip()\n"
        f"open({str(log)!r}, 'a').write(server + '\\n')\n"
        "if server not in ANSWERS:\n"
        "    print('credentials not found in native keychain'); sys.exit(1)\n"
        "user, secret = ANSWERS[server]\n"
        "print(json.dumps({'ServerURL': server, 'Username': user, 'Secret': secret}))\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script


@pytest.fixture
def helper_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A bin directory put first on PATH for fake credential helpers."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return bindir
