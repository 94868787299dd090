"""Libraries fetched ahead of a starting program (``lazyfs.dependencies``).

With real parts: an image of two lazy layers in a real registry, the upper
holding this machine's ``ls``, the lower its loader and libraries, mounted
with ``crfs mount docker://`` (which introduces the layers to each other as
the snapshotter does). Reading the first bytes of ``ls`` makes the lower
layer fetch ``ld.so``, ``ld.so.cache``, libc, libselinux and, examining
those in turn, libpcre2: before any read reaches it. Then ``ls`` runs from
the merged mount. Without a registry: the path lookup inside one layer
(symlinks, ``..``, loops) and malformed peer requests.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from harness.images import push_layers_manifest
from harness.registry import Registry
from lazyfs import control, image_mount, mount
from lazyfs.chunkmemo import ChunkMemo
from lazyfs.chunks import LocalChunks
from lazyfs.dependencies import DependencyPrefetcher, Wants, script_wants
from lazyfs.layer_source import RemoteOptions
from lazyfs.registry import RegistryClient
from lazyfs.stargz.reader import StargzReader
from lazyfs.stargz.source import FileSource
from lazyfs.stargz.writer import build
from lazyfs.tree import LayerTree
from stargz.helpers import _add

from .helpers import mounted, mounted_image

LIBDIR = "usr/lib/x86_64-linux-gnu"
HOST_LIBS = ["ld-linux-x86-64.so.2", "libc.so.6", "libselinux.so.1", "libpcre2-8.so.0.11.2"]


def _layer(path: Path, entries: list[tuple]) -> Path:
    tar = path.with_suffix(".tar")
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, data, *link in entries:
            _add(tf, name, kind, data, **({"linkname": link[0]} if link else {}), mode=0o755)
    build(tar, path)
    return path


def _system_layers(tmp_path: Path) -> tuple[Path, Path]:
    dir_, reg, sym = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.SYMTYPE
    lower = [
        ("usr", dir_, b""), ("usr/lib", dir_, b""), (LIBDIR, dir_, b""), ("usr/lib64", dir_, b""), ("etc", dir_, b""),
        ("lib", sym, b"", "usr/lib"), ("lib64", sym, b"", "usr/lib64"),
        ("usr/lib64/ld-linux-x86-64.so.2", sym, b"", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
        (f"{LIBDIR}/libpcre2-8.so.0", sym, b"", "libpcre2-8.so.0.11.2"),
        ("etc/ld.so.cache", reg, Path("/etc/ld.so.cache").read_bytes()),
        # what nothing asks for: must stay unfetched
        (f"{LIBDIR}/unrelated.bin", reg, os.urandom(300 << 10)),
    ] + [(f"{LIBDIR}/{name}", reg, Path("/usr/lib/x86_64-linux-gnu", name).read_bytes()) for name in HOST_LIBS]
    upper = [("usr", dir_, b""), ("usr/bin", dir_, b""), ("usr/bin/ls", reg, Path("/usr/bin/ls").read_bytes())]
    return _layer(tmp_path / "lower.esgz", lower), _layer(tmp_path / "upper.esgz", upper)


def _push(host: str, layers: list[Path]) -> str:
    ref = f"{host}/lazy/ls"
    blobs = []
    for path in layers:
        with FileSource(path) as source:
            annotations = {image_mount.TOC_DIGEST_ANNOTATION: StargzReader.open(source).toc.digest}
        blobs.append((path.read_bytes(), annotations))
    with RegistryClient() as client:
        push_layers_manifest(client.repository(ref), blobs, tag="v1")
    return f"docker://{ref}:v1"


def _wait_for(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_programs_libraries_are_fetched_from_the_other_layer_before_it_reads_them(tmp_path: Path) -> None:
    merged = tmp_path / "rootfs"
    with Registry(tmp_path / "registry") as registry:
        ref = _push(registry.host, list(_system_layers(tmp_path)))
        remote = RemoteOptions(cache_dir=str(tmp_path / "cache"), background_fetch=False)
        with mounted_image(ref, merged, remote) as record:
            lower, upper = (Path(d) for d in record.layers)
            assert mount.status(lower)["peers"] == 1 and mount.status(upper)["peers"] == 1
            with open(merged / "usr/bin/ls", "rb") as f:
                assert f.read(4096)[:4] == b"\x7fELF"  # only what execve reads first

            def lower_done() -> bool:
                return mount.status(lower)["dependencies"]["files_prefetched"] >= 5

            assert _wait_for(lower_done), mount.status(lower)
            low, up = mount.status(lower), mount.status(upper)
            assert up["dependencies"]["elf_examined"] == 1 and up["dependencies"]["wants_sent"] >= 1
            assert low["reads"] == 0, "nothing has read the lower layer yet"
            deps = low["dependencies"]
            assert deps["wants_received"] >= 1 and deps["errors"] == 0
            assert set(deps["found"]) == {"etc/ld.so.cache", *(f"{LIBDIR}/{n}" for n in HOST_LIBS)}
            fetched = low["store"]["fetch"]["chunks_fetched"]
            assert fetched >= 5

            # the program runs from the merged mount, and its libraries come
            # from the cache: the lower layer fetches nothing more
            out = subprocess.run(["chroot", str(merged), "/usr/bin/ls", "/usr/bin"], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert out.stdout.split() == ["ls"]
            after = mount.status(lower)
            assert after["reads"] > 0
            assert after["store"]["fetch"]["chunks_fetched"] == fetched, after["store"]["fetch"]


def test_peer_requests_are_checked(tmp_path: Path) -> None:
    merged = tmp_path / "rootfs"
    with Registry(tmp_path / "registry") as registry:
        ref = _push(registry.host, list(_system_layers(tmp_path)))
        with mounted_image(ref, merged, RemoteOptions(cache_dir=str(tmp_path / "cache"), background_fetch=False)) as record:
            sock = mount.control_path(record.layers[0])
            for bad in ({"op": "want", "wants": {"paths": "/etc"}}, {"op": "want", "wants": {"libraries": [1]}},
                        {"op": "peers", "controls": ["relative"]}, {"op": "nonsense"}):
                with pytest.raises(control.ControlError, match="refused"):
                    control.ask(sock, bad)
            # a peer that is gone: asking it fails quietly, the mount goes on
            control.ask(mount.control_path(record.layers[1]), {"op": "peers", "controls": [str(tmp_path / "gone.sock")]})
            with open(merged / "usr/bin/ls", "rb") as f:
                f.read(4096)
            assert _wait_for(lambda: mount.status(record.layers[1])["dependencies"]["wants_sent"] >= 1)
            assert mount.status(record.layers[1])["reads"] >= 1


def test_lookup_stays_inside_the_layer(tmp_path: Path) -> None:
    dir_, reg, sym = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.SYMTYPE
    blob = _layer(tmp_path / "paths.esgz", [
        ("usr", dir_, b""), ("usr/lib", dir_, b""), ("usr/lib/libz.so.1.2", reg, b"z"),
        ("usr/lib/libz.so.1", sym, b"", "libz.so.1.2"), ("lib", sym, b"", "usr/lib"),
        ("abs", sym, b"", "/usr/lib/libz.so.1"), ("up", sym, b"", "../../../../usr/lib/libz.so.1"),
        ("loop1", sym, b"", "loop2"), ("loop2", sym, b"", "loop1"), ("elsewhere", sym, b"", "/not/in/this/layer"),
        ("dirlink", sym, b"", "usr"),
    ])
    with FileSource(blob) as source:
        reader = StargzReader.open(source)
        tree = LayerTree(reader.toc)
        deps = DependencyPrefetcher(tree, ChunkMemo(LocalChunks(reader)))
        want = tree.lookup(tree.lookup(tree.lookup(1, b"usr").ino, b"lib").ino, b"libz.so.1.2")
        for path in ("/lib/libz.so.1", "/abs", "/up", "/../../usr/lib/libz.so.1", "dirlink/lib/./libz.so.1", "/usr/lib/../lib/libz.so.1.2"):
            found = deps.find(path)
            assert found is not None and found.ino == want.ino, path
        for path in ("/loop1", "/elsewhere", "/usr/lib", "/usr/lib/libz.so.1/x", "/nothing"):
            assert deps.find(path) is None, path


def test_wants_from_a_peer_are_validated() -> None:
    assert Wants.from_json({"paths": ["/a"], "libraries": ["libc.so.6"], "multiarch": "x86_64-linux-gnu"}).libraries == ("libc.so.6",)
    for bad in ({"paths": ["x" * 5000]}, {"libraries": ["a\0b"]}, {"multiarch": "../x"}, {"paths": ["/a"] * 500}):
        with pytest.raises(ValueError):
            Wants.from_json(bad)


def test_a_scripts_interpreter_is_wanted() -> None:
    assert script_wants(b"#!/bin/sh\nexec x\n").paths == ("/bin/sh",)
    env = script_wants(b"#!/usr/bin/env -S python3 -u\n")
    assert env.paths[0] == "/usr/bin/env" and "/usr/bin/python3" in env.paths
    assert not script_wants(b"#!relative/sh\n") and not script_wants(b"#!" + b"x" * 400)


def test_what_was_asked_before_the_peers_were_known_reaches_them_when_they_are(tmp_path: Path) -> None:
    """Two layers mounted on their own (as premounts are): ls's first bytes
    are read before anyone introduced the layers; the libraries' request
    waits in the upper layer and goes to the lower one once it is named."""
    import hashlib

    lower_blob, upper_blob = _system_layers(tmp_path)
    with Registry(tmp_path / "registry") as registry, RegistryClient() as client:
        repo = client.repository(f"{registry.host}/lazy/ls")
        dirs = []
        with contextlib.ExitStack() as mounts:
            for name, blob in (("lower", lower_blob), ("upper", upper_blob)):
                data = blob.read_bytes()
                digest = "sha256:" + hashlib.sha256(data).hexdigest()
                repo.push_blob(data, digest)
                with FileSource(blob) as source:
                    toc = StargzReader.open(source).toc.digest
                remote = RemoteOptions(cache_dir=str(tmp_path / "cache"), background_fetch=False)
                mounts.enter_context(mounted(f"registry://{registry.host}/lazy/ls@{digest}", tmp_path / name,
                                             toc_digest=toc, remote=remote))
                dirs.append(tmp_path / name)
            lower, upper = dirs
            with open(upper / "usr/bin/ls", "rb") as f:
                f.read(4096)
            assert _wait_for(lambda: mount.status(upper)["dependencies"]["wants_sent"] >= 1)
            assert mount.status(lower)["dependencies"]["wants_received"] == 0
            assert mount.introduce_peers(dirs) == 2
            assert _wait_for(lambda: mount.status(lower)["dependencies"]["files_prefetched"] >= 5), mount.status(lower)
            assert mount.status(lower)["reads"] == 0
