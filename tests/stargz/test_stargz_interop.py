"""Interoperability with the Go reference (containerd/stargz-snapshotter/estargz),
both ways: crfs's blobs pass the reference's TOC and chunk verification and
list the same entries and contents; the reference's blobs (chunked,
prioritized) read the same in crfs."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from pathlib import Path

import pytest
from .helpers import CHUNK, go_ls, run_go, sha256, tar_truth, to_legacy

from lazyfs.stargz import errors
from lazyfs.stargz.reader import StargzReader
from lazyfs.stargz.source import BytesSource, FileSource
from lazyfs.stargz.toc import EntryType, clean_name
from lazyfs.stargz.verify import verify_contents
from lazyfs.stargz.writer import build

PRIORITIZED = ["etc/link", "big.hard", "dir with space/fïlé ünïcødé.txt"]


def truth_view(tar: Path) -> dict[str, dict]:
    view = {}
    for name, t in tar_truth(tar).items():
        if t["type"] == "hardlink":
            view[name] = {"type": "hardlink", "linkName": clean_name(t["linkName"])}
            continue
        item = {k: t[k] for k in ("type", "mode", "uid", "gid")}
        item["xattrs"] = {k: base64.b64encode(v).decode() for k, v in t["xattrs"].items()}
        if t["type"] == "reg":
            item.update(size=t["size"], sha256=t["sha256"])
        if t["type"] == "symlink":
            item["linkName"] = t["linkName"]
        if t["type"] in ("char", "block"):
            item["dev"] = list(t["dev"])
        view[name] = item
    return view


def go_view(ls: dict[str, dict]) -> dict[str, dict]:
    """The Go reader's view; it resolves a hardlink's name to its target's entry."""
    view = {}
    for name, e in ls.items():
        if "hardlinkTo" in e:
            view[name] = {"type": "hardlink", "linkName": e["hardlinkTo"]}
            continue
        item = {"type": e["type"], "mode": e["mode"], "uid": e["uid"], "gid": e["gid"], "xattrs": e["xattrs"] or {}}
        if e["type"] == "reg":
            item.update(size=e["size"], sha256=e["contentDigest"].removeprefix("sha256:"))
        if e["type"] == "symlink":
            item["linkName"] = e["linkName"]
        if e["type"] in ("char", "block"):
            item["dev"] = [e["devMajor"], e["devMinor"]]
        view[name] = item
    return view


def crfs_view(reader: StargzReader) -> dict[str, dict]:
    view = {}
    for e in reader.toc:
        if not e.name:
            continue
        if e.type is EntryType.HARDLINK:
            view[e.name] = {"type": "hardlink", "linkName": e.link_name}
            continue
        item = {"type": str(e.type), "mode": e.mode, "uid": e.uid, "gid": e.gid}
        item["xattrs"] = {k: base64.b64encode(v).decode() for k, v in e.xattrs.items()}
        if e.type is EntryType.REG:
            h = hashlib.sha256()
            for data in reader.iter_file(e.name):
                h.update(data)
            item.update(size=e.size, sha256=h.hexdigest())
        if e.type is EntryType.SYMLINK:
            item["linkName"] = e.link_name
        if e.type in (EntryType.CHAR, EntryType.BLOCK):
            item["dev"] = [e.dev_major, e.dev_minor]
        view[e.name] = item
    return view


def assert_same_layer(view: dict, truth: dict, landmark: str) -> None:
    assert set(view) - set(truth) == {landmark, "implied", "implied/parent"}
    for name, want in truth.items():
        assert view[name] == want, name


# --- crfs writes, Go reads -------------------------------------------------------------


def test_go_verifies_crfs_blob(go_helper, crfs_blob):
    path, result = crfs_blob
    proc = run_go(go_helper, "verify", path, result.toc_digest)
    assert proc.returncode == 0, proc.stderr
    # 8 distinct regular files + the landmark; big.bin has 4 chunks
    assert json.loads(proc.stdout) == {"files": 9, "chunks": 11}


def test_go_rejects_wrong_toc_digest(go_helper, crfs_blob):
    proc = run_go(go_helper, "verify", crfs_blob[0], sha256(b"other"))
    assert proc.returncode != 0 and "invalid TOC JSON" in proc.stderr


def test_go_lists_crfs_blob_like_the_tar(go_helper, crfs_blob, layer_tar):
    path, _ = crfs_blob
    view = go_view(go_ls(go_helper, path))
    assert_same_layer(view, truth_view(layer_tar), ".no.prefetch.landmark")
    with FileSource(path) as source:
        assert view == crfs_view(StargzReader.open(source))


def test_go_reads_crfs_prioritized_blob(go_helper, layer_tar, tmp_path):
    out = tmp_path / "prio.esgz"
    result = build(layer_tar, out, chunk_size=CHUNK, prioritized=PRIORITIZED)
    assert run_go(go_helper, "verify", out, result.toc_digest).returncode == 0
    assert_same_layer(go_view(go_ls(go_helper, out)), truth_view(layer_tar), ".prefetch.landmark")


def test_go_reads_crfs_default_chunk_size(go_helper, layer_tar, tmp_path):
    out = tmp_path / "default.esgz"
    result = build(layer_tar, out)
    proc = run_go(go_helper, "verify", out, result.toc_digest)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["chunks"] == 8  # 9 files, one of them empty


def test_go_reads_legacy_blob(go_helper, crfs_blob, layer_tar, tmp_path):
    """Our legacy-stargz fixture is what the reference accepts as legacy."""
    legacy = tmp_path / "legacy.stargz"
    legacy.write_bytes(to_legacy(crfs_blob[0].read_bytes()))
    assert_same_layer(go_view(go_ls(go_helper, legacy)), truth_view(layer_tar), ".no.prefetch.landmark")


# --- Go writes, crfs reads -------------------------------------------------------------------


@pytest.fixture(scope="module")
def go_blob(go_helper, layer_tar, tmp_path_factory):
    out = tmp_path_factory.mktemp("go-blob") / "go.esgz"
    args = ["build", layer_tar, out, "--chunk-size", str(CHUNK)]
    for path in PRIORITIZED:
        args += ["--prioritize", path]
    proc = run_go(go_helper, *args)
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout)


def test_crfs_reads_go_blob(go_blob, layer_tar):
    path, reported = go_blob
    with FileSource(path) as source:
        reader = StargzReader.open(source, toc_digest=reported["tocDigest"], require_verified=True)
        assert verify_contents(reader).chunks == 11
        assert_same_layer(crfs_view(reader), truth_view(layer_tar), ".prefetch.landmark")
        assert reader.toc.prefetch_size == reader.toc[".prefetch.landmark"].chunks[0].blob_offset
        assert [c.size for c in reader.toc["big.bin"].chunks] == [CHUNK, CHUNK, CHUNK, 1234]


def test_go_reports_diffid_of_whole_blob(go_blob):
    """What the reference calls DiffID: sha256 of the decompressed blob, TOC member included."""
    path, reported = go_blob
    blob = path.read_bytes()
    assert reported["diffID"] == sha256(gzip.decompress(blob))
    assert reported["digest"] == sha256(blob)


def test_same_prioritized_order_as_go(go_blob, layer_tar, tmp_path):
    out = tmp_path / "crfs.esgz"
    build(layer_tar, out, chunk_size=CHUNK, prioritized=PRIORITIZED)

    def order(blob: Path) -> list[tuple[str, str]]:
        with FileSource(blob) as source:
            toc = json.loads(StargzReader.open(source).toc_json)
        return [(e["name"], e["type"]) for e in toc["entries"]]

    assert order(out) == order(go_blob[0])


def test_go_blob_tampered_chunk_is_caught(go_blob):
    path, reported = go_blob
    blob = bytearray(path.read_bytes())
    reader = StargzReader.open(BytesSource(bytes(blob)), toc_digest=reported["tocDigest"])
    chunk = reader.toc["big.bin"].chunks[2]
    blob[chunk.blob_offset + 30] ^= 0x55
    tampered = StargzReader.open(BytesSource(bytes(blob)), toc_digest=reported["tocDigest"])
    with pytest.raises((errors.ChunkDigestMismatch, errors.CorruptChunk)):
        tampered.read("big.bin", 2 * CHUNK, 10)
