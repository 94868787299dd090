"""Shared fixtures: a real ``crfs serve`` process and a gRPC client for it.

The harness modules (tests/harness/) hold the process plumbing so that bench/
and scripts can use them too; fixtures here are thin wrappers that always
stop what they started.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from harness.crfs import CrfsServer
from harness.snapshots_client import CrfsClient, connect


@pytest.fixture
def crfs_client(tmp_path: Path) -> Iterator[CrfsClient]:
    with CrfsServer(tmp_path / "root", tmp_path / "crfs.sock") as server:
        client = connect(server)
        try:
            yield client
        finally:
            client.channel.close()


@pytest.fixture(scope="session", autouse=True)
def lazyfs_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Control sockets and logs of the layer mounts tests start, out of /run."""
    state = tmp_path_factory.mktemp("lazyfs-state")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRFS_LAZYFS_STATE", str(state))
        yield state
