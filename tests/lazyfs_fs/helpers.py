"""Helpers for the FUSE filesystem tests: real mounts that are always undone,
and a metadata + content snapshot of a directory tree to compare two trees."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from lazyfs import mount

if TYPE_CHECKING:
    from lazyfs.forkserver import ForkServer
    from lazyfs.image_mount import ImageRecord
    from lazyfs.layer_source import RemoteOptions

REPO = Path(__file__).resolve().parents[2]


def run_crfs(*args: str) -> subprocess.CompletedProcess:
    """``crfs ARGS`` (the mount commands, through the real command line)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "snapshotter.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def force_unmount(path: Path) -> None:
    """Unmount ``path`` if mounted: ``fusermount3 -u``, then ``umount -l``."""
    if not mount.is_mounted(path):
        return
    if subprocess.run(["fusermount3", "-u", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def kill(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, a process we started (reaped if it is our child)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            if not mount.is_alive(pid):
                return
            time.sleep(0.02)


@contextlib.contextmanager
def mounted(
    source: Path | str, mountpoint: Path, *, toc_digest: str | None = None,
    remote: "RemoteOptions | None" = None, fork_server: "ForkServer | None" = None,
) -> Iterator[int]:
    """A layer mount process serving ``source`` (a blob's path or a source
    string) at ``mountpoint``; its pid. Unmounted and stopped after."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    kwargs = {"remote": remote} if remote is not None else {}
    pid = mount.start(str(source), mountpoint, toc_digest=toc_digest, fork_server=fork_server, **kwargs)
    try:
        yield pid
    finally:
        force_unmount(mountpoint)
        kill(pid)


@contextlib.contextmanager
def mounted_image(reference: str, merged: Path, remote: "RemoteOptions") -> Iterator["ImageRecord"]:
    """``crfs mount docker://…`` at ``merged``, undone after (by force if
    ``crfs umount`` fails: every layer mount and process)."""
    from lazyfs import image_mount  # noqa: PLC0415

    merged.mkdir(parents=True, exist_ok=True)
    record = image_mount.mount_image(reference, merged, remote=remote)
    try:
        yield record
    finally:
        try:
            image_mount.unmount_image(merged)
        except Exception:
            force_unmount(merged)
            for layer_dir, pid in zip(record.layers, record.pids):
                force_unmount(Path(layer_dir))
                kill(pid)
            raise


def extract_tar(tar: Path, dest: Path) -> Path:
    """The layer as GNU tar extracts it as root."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["tar", "-xpf", str(tar), "-C", str(dest), "--numeric-owner", "--xattrs", "--xattrs-include=*"],
        check=True, capture_output=True,
    )
    return dest


def snapshot(root: Path, *, skip_mtime: frozenset[str] = frozenset()) -> dict[str, dict]:
    """Every path below ``root`` with what ``lstat`` and friends say about it
    and a digest of its content; hardlinks as a group number."""
    result: dict[str, dict] = {}
    inodes: dict[int, str] = {}

    def visit(path: Path, rel: str) -> None:
        st = os.lstat(path)
        item: dict = {"mode": oct(st.st_mode), "uid": st.st_uid, "gid": st.st_gid, "nlink": st.st_nlink}
        if rel not in skip_mtime:
            item["mtime"] = st.st_mtime_ns
        item["xattrs"] = {k: os.getxattr(path, k, follow_symlinks=False) for k in sorted(os.listxattr(path, follow_symlinks=False))}
        if stat.S_ISREG(st.st_mode):
            item["size"] = st.st_size
            item["sha256"] = _sha256(path)
            item["link_group"] = inodes.setdefault(st.st_ino, rel)
        elif stat.S_ISLNK(st.st_mode):
            item["size"] = st.st_size
            item["target"] = os.readlink(path)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            item["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if rel:
            result[rel] = item
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(path)):
                visit(path / name, f"{rel}/{name}" if rel else name)

    visit(root, "")
    return result


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def assert_same_tree(actual: dict[str, dict], expected: dict[str, dict]) -> None:
    assert sorted(actual) == sorted(expected)
    diffs = {p: (actual[p], expected[p]) for p in expected if actual[p] != expected[p]}
    assert not diffs, "\n".join(f"{p}:\n  mounted   {a}\n  extracted {e}" for p, (a, e) in diffs.items())


@contextlib.contextmanager
def range_server(root: Path) -> Iterator[str]:
    """A plain HTTP server for the files in ``root`` that honours ``Range``;
    its base URL. Stopped on exit."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = root / self.path.lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            spec = self.headers.get("Range", "")
            if spec.startswith("bytes="):
                first, _, last = spec.removeprefix("bytes=").partition("-")
                start, end = int(first), min(int(last or len(data) - 1), len(data) - 1)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                body = data[start : end + 1]
            else:
                self.send_response(200)
                body = data
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
