"""Helpers for the stargz format tests: layer tars with every kind of entry,
the Go reference helper, the CLI, and blob surgery."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from lazyfs.stargz.footer import encode_footer
from lazyfs.stargz.gzipmember import gzip_member
from lazyfs.stargz.reader import StargzReader
from lazyfs.stargz.source import BytesSource
from lazyfs.stargz.toc import TAR_TYPES, TOC_TAR_NAME

REPO = Path(__file__).resolve().parents[2]
GOHELPER_DIR = Path(__file__).resolve().parent / "gohelper"
GOPATH = "/usr/share/gocode"
ESTARGZ_SRC = Path(GOPATH, "src/github.com/containerd/stargz-snapshotter/estargz")
CHUNK = 64 * 1024  # small chunks, so that test files span several
MTIME = 1_700_000_000


# --- layer tars ---------------------------------------------------------------


def _add(tf: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = attrs.pop("mtime", MTIME)
    info.mode = attrs.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    info.uname = info.gname = "root"
    for key, value in attrs.items():
        setattr(info, key, value)
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    else:
        tf.addfile(info)


def big_data(size: int, seed: int = 1) -> bytes:
    """Half random, half text: compressible, but not trivially."""
    rnd = random.Random(seed)
    text = b"".join(b"line %d of some text to compress\n" % i for i in range(size // 32 + 1))
    return bytes(a if i % 2 else b for i, (a, b) in enumerate(zip(rnd.randbytes(size), text)))


def write_layer_tar(path: Path) -> Path:
    """Every entry type eStargz knows, with the awkward names and sizes."""
    big = big_data(3 * CHUNK + 1234)
    long_dir = "deep/" + "d" * 70 + "/" + "e" * 40
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "etc", tarfile.DIRTYPE)
        _add(tf, "etc/hosts", data=b"127.0.0.1 localhost\n")
        _add(tf, "etc/hosts.hard", tarfile.LNKTYPE, linkname="etc/hosts")
        _add(tf, "etc/link", tarfile.SYMTYPE, linkname="hosts", mode=0o777)
        _add(tf, "abs-link", tarfile.SYMTYPE, linkname="/etc/hosts", mode=0o777)
        _add(tf, "empty", data=b"")
        _add(tf, "big.bin", data=big, mode=0o4755, uid=1000, gid=1000, uname="user", gname="group")
        _add(tf, "big.hard", tarfile.LNKTYPE, linkname="big.bin")
        _add(tf, "exact.bin", data=big_data(CHUNK, seed=2))  # exactly one chunk
        _add(tf, "dir with space", tarfile.DIRTYPE, mode=0o700)
        _add(tf, "dir with space/fïlé ünïcødé.txt", data="héllo wörld\n".encode())
        _add(tf, "deep", tarfile.DIRTYPE)
        _add(tf, "deep/" + "d" * 70, tarfile.DIRTYPE)
        _add(tf, long_dir, tarfile.DIRTYPE)
        _add(tf, long_dir + "/a-file-whose-path-is-longer-than-100-bytes.txt", data=b"long\n" * 100)
        _add(tf, "dev", tarfile.DIRTYPE)
        _add(tf, "dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
        _add(tf, "dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660)
        _add(tf, "run", tarfile.DIRTYPE)
        _add(tf, "run/fifo", tarfile.FIFOTYPE, mode=0o600)
        _add(
            tf,
            "xattr-file",
            data=b"has xattrs\n",
            pax_headers={
                "SCHILY.xattr.user.comment": "a comment",
                "SCHILY.xattr.user.binary": b"\x00\x01\xff\xfe".decode("utf-8", "surrogateescape"),
            },
        )
        _add(tf, "implied/parent/file", data=b"no directory entries above me\n")
        _add(tf, "emptydir", tarfile.DIRTYPE, mode=0o1777)
    return path




def tar_truth(path: Path) -> dict[str, dict]:
    """What a layer tar holds, read with tarfile: the ground truth to compare readers with."""
    truth = {}
    with tarfile.open(path, encoding="utf-8", errors="surrogateescape") as tf:
        for info in tf:
            name = info.name.strip("/").removeprefix("./")
            item = {"type": str(TAR_TYPES[info.type]), "mode": info.mode & 0o7777, "uid": info.uid, "gid": info.gid}
            if info.isreg():
                item["size"] = info.size
                item["sha256"] = hashlib.sha256(tf.extractfile(info).read()).hexdigest()
            if info.issym() or info.islnk():
                item["linkName"] = info.linkname
            if info.ischr() or info.isblk():
                item["dev"] = (info.devmajor, info.devminor)
            item["xattrs"] = {
                k.removeprefix("SCHILY.xattr."): v.encode("utf-8", "surrogateescape")
                for k, v in info.pax_headers.items()
                if k.startswith("SCHILY.xattr.")
            }
            truth[name] = item
    return truth




# --- the Go reference ------------------------------------------------------------


def build_go_helper(out: Path) -> None:
    """tests/stargz/gohelper built against Debian's estargz sources, in GOPATH mode.

    A missing Go toolchain or missing sources fail the tests: interoperability
    with the reference is a requirement, not an extra."""
    if shutil.which("go") is None:
        raise RuntimeError("`go` is not on PATH: install golang-go")
    if not ESTARGZ_SRC.is_dir():
        raise RuntimeError(f"{ESTARGZ_SRC} missing: install golang-github-containerd-stargz-snapshotter-dev")
    env = dict(os.environ, GO111MODULE="off", GOPATH=GOPATH, GOFLAGS="")
    env.setdefault("GOCACHE", str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "go-build"))
    proc = subprocess.run(
        ["go", "build", "-o", str(out), "."],
        cwd=GOHELPER_DIR, env=env, capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"building the Go helper failed:\n{proc.stdout}{proc.stderr}")


def run_go(helper: Path, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(helper), *map(str, args)], capture_output=True, text=True, timeout=120)


def go_ls(helper: Path, blob: Path) -> dict[str, dict]:
    proc = run_go(helper, "ls", blob)
    assert proc.returncode == 0, proc.stderr
    return {e["name"]: e for e in map(json.loads, proc.stdout.splitlines())}


# --- the CLI ---------------------------------------------------------------------


def run_cli(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", "stargz", *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


# --- blob surgery ------------------------------------------------------------------


def toc_member(toc_json: bytes, name: str = TOC_TAR_NAME) -> bytes:
    """The uncompressed tar that holds a TOC, as writers store it."""
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(toc_json), 0
    return info.tobuf(tarfile.USTAR_FORMAT) + toc_json + bytes(-len(toc_json) % 512) + bytes(1024)


def assemble(payload: bytes, toc: dict | bytes, *, legacy: bool = False, level: int = 6) -> bytes:
    """payload + TOC member + footer: a blob with any TOC we like."""
    toc_json = toc if isinstance(toc, bytes) else json.dumps(toc).encode()
    return payload + gzip_member(toc_member(toc_json), level) + encode_footer(len(payload), legacy=legacy)


def split_blob(blob: bytes) -> tuple[bytes, dict]:
    """(payload, TOC) of a blob written by crfs."""
    reader = StargzReader.open(BytesSource(blob))
    return blob[: reader.footer.toc_offset], json.loads(reader.toc_json)


def to_legacy(blob: bytes) -> bytes:
    """The same layer as CRFS's stargzify wrote it: no chunk digests, 47-byte footer."""
    payload, toc = split_blob(blob)
    for entry in toc["entries"]:
        entry.pop("chunkDigest", None)
    return assemble(payload, toc, legacy=True)


def file_members(name: str, data: bytes) -> tuple[bytes, bytes]:
    """A gzip member holding one tar header, then another holding the data
    (so that the data's member starts at a known offset)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return gzip_member(info.tobuf(tarfile.PAX_FORMAT), 6), gzip_member(data + bytes(-len(data) % 512), 6)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
