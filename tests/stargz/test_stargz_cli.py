"""``crfs stargz build|verify|ls|extract``, run as a user would: in a subprocess."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from .helpers import CHUNK, run_cli, sha256, to_legacy

SHA256_RE = r"^sha256:[0-9a-f]{64}$"


@pytest.fixture(scope="module")
def built(layer_tar, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "layer.esgz"
    proc = run_cli("build", layer_tar, out, "--chunk-size", str(CHUNK), "--prioritize", "etc/hosts", "big.bin")
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout)


def test_build_prints_digests(built):
    out, info = built
    blob = out.read_bytes()
    assert set(info) == {"digest", "diffID", "tocDigest", "uncompressedSize", "size"}
    assert info["digest"] == sha256(blob) and info["size"] == len(blob)
    assert info["diffID"] == sha256(gzip.decompress(blob))
    assert info["uncompressedSize"] == len(gzip.decompress(blob))


def test_build_gzip_input_same_output(built, layer_tar, tmp_path):
    gz = tmp_path / "layer.tar.gz"
    gz.write_bytes(gzip.compress(layer_tar.read_bytes()))
    proc = run_cli("build", gz, tmp_path / "out", "--chunk-size", str(CHUNK), "--prioritize", "etc/hosts", "--prioritize", "big.bin")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == built[1]


def test_build_errors(tmp_path, layer_tar):
    proc = run_cli("build", tmp_path / "missing.tar", tmp_path / "out")
    assert proc.returncode == 1 and "FileNotFoundError" in proc.stderr
    proc = run_cli("build", layer_tar, tmp_path / "out", "--prioritize", "no/such")
    assert proc.returncode == 1 and "PrioritizedFileNotFound" in proc.stderr
    proc = run_cli("build", layer_tar, tmp_path / "out", "--chunk-size", "0")
    assert proc.returncode == 2


def test_verify(built):
    out, info = built
    proc = run_cli("verify", out, "--toc-digest", info["tocDigest"])
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["tocDigest"] == info["tocDigest"] and report["chunks"] == 11 and not report["legacy"]
    assert run_cli("verify", out).returncode == 0


def test_verify_fails(built, tmp_path):
    out, info = built
    proc = run_cli("verify", out, "--toc-digest", sha256(b"x"))
    assert proc.returncode == 1 and "TocDigestMismatch" in proc.stderr
    blob = bytearray(out.read_bytes())
    blob[len(blob) // 3] ^= 0xFF  # somewhere in file data
    bad = tmp_path / "bad.esgz"
    bad.write_bytes(bytes(blob))
    proc = run_cli("verify", bad, "--toc-digest", info["tocDigest"])
    assert proc.returncode == 1 and ("ChunkDigestMismatch" in proc.stderr or "CorruptChunk" in proc.stderr)
    bad.write_bytes(b"not a blob")
    proc = run_cli("verify", bad)
    assert proc.returncode == 1 and "InvalidFooter" in proc.stderr


def test_verify_legacy(built, tmp_path):
    legacy = tmp_path / "legacy.stargz"
    legacy.write_bytes(to_legacy(built[0].read_bytes()))
    proc = run_cli("verify", legacy)
    assert proc.returncode == 1 and "--layer-digest" in proc.stderr
    proc = run_cli("verify", legacy, "--layer-digest", sha256(legacy.read_bytes()))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["legacy"] is True
    proc = run_cli("verify", legacy, "--layer-digest", sha256(b"other"))
    assert proc.returncode == 1 and "LayerDigestMismatch" in proc.stderr


def test_ls(built):
    proc = run_cli("ls", built[0])
    assert proc.returncode == 0, proc.stderr
    entries = [json.loads(line) for line in proc.stdout.splitlines()]
    names = [e["name"] for e in entries]
    assert names[:3] == ["etc", "etc/hosts", "big.bin"] and names[3] == ".prefetch.landmark"
    by_name = {e["name"]: e for e in entries}
    assert by_name["big.bin"]["chunks"] == 4 and by_name["big.bin"]["mode"] == 0o4755
    assert by_name["dev/sda"]["type"] == "block" and by_name["dev/sda"]["devMajor"] == 8
    assert by_name["xattr-file"]["xattrs"] == {"user.binary": "AAH//g==", "user.comment": "YSBjb21tZW50"}
    assert by_name["implied/parent"]["implicit"] is True
    assert by_name["dir with space/fïlé ünïcødé.txt"]["type"] == "reg"


def tree(root: Path) -> dict[str, tuple]:
    """Everything tar would restore about each path below root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            item = [stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_nlink]
            if stat.S_ISREG(st.st_mode):
                item.append(hashlib.sha256(path.read_bytes()).hexdigest())
            if stat.S_ISLNK(st.st_mode):
                item.append(os.readlink(path))
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                item.append(st.st_rdev)
            if not stat.S_ISLNK(st.st_mode):
                item.append(int(st.st_mtime))
                item.append(sorted((k, os.getxattr(path, k)) for k in os.listxattr(path)))
            out[str(path.relative_to(root))] = tuple(item)
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="devices and owners need root, as for tar")
def test_extract_like_tar(built, tmp_path):
    out, info = built
    ours = tmp_path / "ours"
    proc = run_cli("extract", out, ours, "--toc-digest", info["tocDigest"])
    assert proc.returncode == 0, proc.stderr
    theirs = tmp_path / "tar"
    theirs.mkdir()
    subprocess.run(
        ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpzf", str(out), "-C", str(theirs)],
        check=True,
    )
    a, b = tree(ours), tree(theirs)
    # tar gives the directories it creates for missing parents the time of
    # extraction; and it restores a directory's mtime when the archive leaves
    # it, so etc/ (split by prioritizing etc/hosts) gets a late mtime from tar
    # but its own from crfs, which (like containerd) sets directory times last.
    for name in ("implied", "implied/parent", "etc"):
        a[name], b[name] = a[name][:-2] + a[name][-1:], b[name][:-2] + b[name][-1:]
    assert a == b
    assert (ours / "big.bin").stat().st_mode & stat.S_ISUID
    assert os.getxattr(ours / "xattr-file", "user.binary") == b"\x00\x01\xff\xfe"


def test_extract_refuses_non_empty_dir(built, tmp_path):
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "something").write_text("x")
    proc = run_cli("extract", built[0], tmp_path / "dest")
    assert proc.returncode == 1 and "not empty" in proc.stderr


def test_extract_refuses_bad_toc_digest(built, tmp_path):
    proc = run_cli("extract", built[0], tmp_path / "dest", "--toc-digest", sha256(b"x"))
    assert proc.returncode == 1 and "TocDigestMismatch" in proc.stderr
    assert not (tmp_path / "dest").exists()
