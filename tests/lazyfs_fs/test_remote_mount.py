"""Remote layers mounted end to end: ``crfs mount registry://…`` starts a real
mount process that reads a real docker-registry on 127.0.0.1 through the
fault proxy (which counts every Range asked for), and the tests read the
files through FUSE.

- a read of one small file fetches a small part of a large layer; reading it
  again (same mount, and a fresh mount on the same cache) fetches nothing;
  ``crfs mount-status`` agrees with what the registry served;
- with background fetch the layer ends up fully local, and then a registry
  that is gone does not break any read;
- transient faults are retried; a registry that stays down fails the read
  with EIO within a bound; corrupted bytes are an EIO or a good retry, never
  wrong bytes;
- a local layer mounts, reads and unmounts inside ``unshare -Urm``.

Every mount process, registry and proxy a test starts is stopped by it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazyfs import mount
from lazyfs.fs import KERNEL_READAHEAD_KB
from lazyfs.layer_source import RemoteOptions
from lazyfs_fetch.conftest import REPO, Layer, Remote, build_layer, remote  # noqa: F401 - `remote` is a fixture

from .helpers import REPO as SOURCE_TREE
from .helpers import force_unmount, kill, run_crfs

BLOB_GET = r"^GET /v2/.*/blobs/"
SMALL = "many/06/f0123.bin"  # the one small file test 1 reads
BIG_FILES = 8  # 8 x 512 KiB of incompressible data
SMALL_FILES = 400  # 1..16 KiB each


def _contents() -> dict[str, bytes]:
    rng = random.Random(20261123)
    files = {f"big/b{i}.bin": rng.randbytes(512 << 10) for i in range(BIG_FILES)}
    for i in range(SMALL_FILES):
        files[f"many/{i // 20:02}/f{i:04}.bin"] = f"file {i}\n".encode() + rng.randbytes(rng.randint(1 << 10, 16 << 10))
    files["etc/motd"] = b"lazy layers\n" * 10
    return files


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> Layer:
    """A ~8 MB eStargz layer of 400+ files, nothing prioritized (so nothing
    is fetched at mount time but the footer and the TOC). Overrides the
    ``layer`` the imported ``remote`` fixture pushes."""
    built = build_layer(tmp_path_factory.mktemp("remote-mount-layer"), _contents())
    assert built.build.size > 6 << 20
    return built


# --- mounting through the command line -----------------------------------------------


@contextlib.contextmanager
def crfs_mounted(source: str, mnt: Path, *args: str) -> Iterator[int]:
    """``crfs mount SOURCE MNT ARGS``; unmounted and its process stopped on exit."""
    mnt.mkdir(parents=True, exist_ok=True)
    proc = run_crfs("mount", source, str(mnt), *args)
    assert proc.returncode == 0, proc.stderr
    pid = json.loads(proc.stdout)["pid"]
    try:
        assert mount.is_mounted(mnt)
        yield pid
    finally:
        force_unmount(mnt)
        kill(pid)
        assert not mount.is_mounted(mnt)


def source_of(remote: Remote) -> str:  # noqa: F811 - the fixture's value
    return f"registry://{remote.proxy.host}/{REPO}@{remote.layer.digest}"


def crfs_status(mnt: Path) -> dict:
    proc = run_crfs("mount-status", str(mnt))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def read_uncached(path: Path, offset: int = 0, *, block: int = 1 << 20, readahead: bool = True) -> bytes:
    """The file's bytes from ``offset`` on, after dropping its pages (the
    mount sets keep_cache), so the read really reaches the mount process.
    Without ``readahead`` the kernel asks the mount for just the ``block``
    bytes each read wants."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if not readahead:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        out = bytearray()
        while data := os.pread(fd, block, offset + len(out)):
            out += data
        return bytes(out)
    finally:
        os.close(fd)


def timed_read(path: Path, timeout: float) -> tuple[bytes | OSError | None, float]:
    """Read ``path`` in a thread; (bytes or the OSError, seconds taken), or
    (None, timeout) if it had not returned within ``timeout``."""
    result: list = []

    def run() -> None:
        try:
            result.append(read_uncached(path))
        except OSError as exc:
            result.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    return (result[0] if result else None), time.monotonic() - started


def fetched(remote: Remote) -> tuple[int, int]:  # noqa: F811
    """(blob GETs, bytes asked for) the proxy has seen since it was last cleared."""
    return len(remote.blob_gets()), remote.bytes_requested()


# --- 1. lazy: only what is read is fetched ------------------------------------------


def test_one_small_file_fetches_a_small_part_and_only_once(remote: Remote, tmp_path: Path) -> None:  # noqa: F811
    layer = remote.layer
    size = layer.build.size
    cache = tmp_path / "cache"
    mnt = tmp_path / "mnt"
    remote.proxy.clear()
    with crfs_mounted(source_of(remote), mnt, "--cache-dir", str(cache), "--no-background-fetch"):
        gets, at_mount = fetched(remote)
        assert 0 < at_mount < size // 4, f"mounting fetched {at_mount} of {size} bytes"  # footer + TOC
        status = crfs_status(mnt)
        assert status["store"]["fetch"]["bytes_fetched"] == 0
        assert status["store"]["prefetch"]["state"] in ("idle", "priority", "done")
        remote.proxy.clear()

        assert read_uncached(mnt / SMALL) == layer.files[SMALL]
        gets, first = fetched(remote)
        # the file's chunk plus what follows it in the blob (read-around, 64 KiB by default)
        limit = (64 << 10) + RemoteOptions.read_around
        assert 1 <= gets <= 2 and 0 < first <= limit, f"{gets} GETs, {first} bytes for a {len(layer.files[SMALL])}-byte file"
        assert first < size // 100
        status = crfs_status(mnt)
        fetch = status["store"]["fetch"]
        assert fetch["bytes_fetched"] == first and fetch["requests"] == gets, fetch
        assert fetch["errors"] == 0 and fetch["chunks_fetched"] >= 1
        assert status["store"]["cache"]["stored"] >= 1
        assert status["store"]["prefetch"]["local_bytes"] < status["store"]["prefetch"]["total_bytes"]
        reads = status["reads"]
        # chunks still remote: the kernel's read-ahead stays small (a bigger
        # one would make each miss fetch more)
        assert status["kernel_readahead_kb"] == 0

        remote.proxy.clear()
        assert read_uncached(mnt / SMALL) == layer.files[SMALL]
        assert fetched(remote) == (0, 0)
        status = crfs_status(mnt)
        assert status["reads"] > reads, "the second read did not reach the mount process"
        assert status["store"]["fetch"]["bytes_fetched"] == first

    with crfs_mounted(source_of(remote), mnt, "--cache-dir", str(cache), "--no-background-fetch"):
        remote.proxy.clear()
        assert read_uncached(mnt / SMALL) == layer.files[SMALL]
        assert fetched(remote) == (0, 0)
        status = crfs_status(mnt)
        assert status["reads"] >= 1
        assert status["store"]["fetch"]["bytes_fetched"] == 0 and status["store"]["fetch"]["requests"] == 0
        assert status["store"]["fetch"]["chunks_from_cache"] >= 1


# --- 2. background fetch, then the registry goes away ------------------------------------


def wait_fully_local(mnt: Path, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = crfs_status(mnt)
        progress = status["store"]["prefetch"]
        if progress["percent"] == 100.0 and progress["state"] == "done":
            return status
        assert time.monotonic() < deadline, f"not local after {timeout}s: {progress}"
        time.sleep(0.1)


def test_background_fetch_makes_the_layer_local_then_registry_may_go(remote: Remote, tmp_path: Path) -> None:  # noqa: F811
    layer = remote.layer
    mnt = tmp_path / "mnt"
    with crfs_mounted(source_of(remote), mnt, "--cache-dir", str(tmp_path / "cache")):
        status = wait_fully_local(mnt, 20)
        progress = status["store"]["prefetch"]
        assert progress["local_bytes"] == progress["total_bytes"] >= sum(len(d) for d in layer.files.values())
        assert progress["failures"] == 0
        assert status["store"]["fetch"]["bytes_fetched"] <= layer.build.size
        # all local: nothing a bigger kernel read-ahead could fetch, so it is raised
        deadline = time.monotonic() + 15
        while crfs_status(mnt)["kernel_readahead_kb"] != KERNEL_READAHEAD_KB and time.monotonic() < deadline:
            time.sleep(0.2)
        assert crfs_status(mnt)["kernel_readahead_kb"] == KERNEL_READAHEAD_KB

        remote.registry.daemon.stop()  # the registry is gone; the proxy answers for nothing
        remote.proxy.clear()
        for name, data in layer.files.items():
            assert read_uncached(mnt / name) == data, name
        assert fetched(remote) == (0, 0)
        status = crfs_status(mnt)
        assert status["read_errors"] == 0 and status["store"]["fetch"]["errors"] == 0


# --- 3. faults -------------------------------------------------------------------------------


def test_transient_faults_are_retried_by_the_mount(remote: Remote, tmp_path: Path) -> None:  # noqa: F811
    layer = remote.layer
    mnt = tmp_path / "mnt"
    names = [f"many/{i // 20:02}/f{i:04}.bin" for i in (3, 150, 299)] + ["big/b2.bin"]
    with crfs_mounted(source_of(remote), mnt, "--cache-dir", str(tmp_path / "cache"), "--no-background-fetch"):
        for name, kind, kw in [
            (names[0], "reset", {}), (names[1], "status", {"status": 503}),
            (names[2], "status", {"status": 502}), (names[3], "truncate", {"keep": 0.3}),
        ]:
            remote.proxy.clear()
            remote.proxy.add(kind, BLOB_GET, times=2, **kw)
            got, took = timed_read(mnt / name, 15)
            assert got == layer.files[name], f"{kind}: {got!r:.200}"
            assert len(remote.proxy.requests(BLOB_GET)) >= 3, kind
        status = crfs_status(mnt)
        assert status["read_errors"] == 0 and status["store"]["fetch"]["errors"] == 0


def test_registry_down_is_eio_within_a_bound(remote: Remote, tmp_path: Path) -> None:  # noqa: F811
    """Persistent 503s, then no registry at all: the read fails with EIO in
    seconds (the default client: 5 attempts, backoff 0.2 s .. 5 s), and the
    mount keeps serving what is local."""
    layer = remote.layer
    mnt = tmp_path / "mnt"
    bound = 10.0
    with crfs_mounted(source_of(remote), mnt, "--cache-dir", str(tmp_path / "cache"), "--no-background-fetch"):
        assert read_uncached(mnt / "etc/motd") == layer.files["etc/motd"]

        remote.proxy.add("status", BLOB_GET, times=10_000, status=503)
        got, took = timed_read(mnt / "many/01/f0021.bin", bound + 5)
        assert isinstance(got, OSError) and got.errno == errno.EIO, got
        assert took < bound, f"EIO after {took:.1f}s"

        remote.proxy.clear()
        remote.registry.daemon.stop()
        got, took = timed_read(mnt / "big/b5.bin", bound + 5)
        assert isinstance(got, OSError) and got.errno == errno.EIO, got
        assert took < bound, f"EIO after {took:.1f}s"

        assert read_uncached(mnt / "etc/motd") == layer.files["etc/motd"]
        status = crfs_status(mnt)
        assert status["read_errors"] >= 2 and status["store"]["fetch"]["errors"] >= 2


def test_a_short_stall_is_waited_out(remote: Remote, tmp_path: Path) -> None:  # noqa: F811
    """A stall shorter than the client's read timeout: the read waits and
    gets the right bytes. (A long stall can only end at the fetcher's
    deadline, 60 s, which the mount process does not let one configure.)"""
    layer = remote.layer
    mnt = tmp_path / "mnt"
    name = "many/05/f0101.bin"
    with crfs_mounted(source_of(remote), mnt, "--no-background-fetch"):
        remote.proxy.add("stall", BLOB_GET, times=1, delay=1.5)
        got, took = timed_read(mnt / name, 20)
        assert got == layer.files[name]
        assert 1.5 <= took < 10


def test_a_long_stall_is_eio_at_the_fetch_deadline(remote: Remote, tmp_path: Path) -> None:  # noqa: F811
    """A registry that accepts the request and then says nothing: the read
    fails with EIO at the mount's --fetch-deadline, never hangs."""
    layer = remote.layer
    mnt = tmp_path / "mnt"
    deadline = 3.0
    with crfs_mounted(source_of(remote), mnt, "--cache-dir", str(tmp_path / "cache"), "--no-background-fetch",
                      "--fetch-deadline", str(deadline)):
        assert read_uncached(mnt / "etc/motd") == layer.files["etc/motd"]
        remote.proxy.add("stall", BLOB_GET, times=10_000, delay=120)
        got, took = timed_read(mnt / "big/b5.bin", deadline + 30)
        assert isinstance(got, OSError) and got.errno == errno.EIO, got
        assert deadline - 0.5 < took < deadline + 4, f"EIO after {took:.1f}s"
        remote.proxy.clear()
        assert read_uncached(mnt / "etc/motd") == layer.files["etc/motd"]


def test_corrupted_bytes_are_retried_or_eio_never_served(remote: Remote, tmp_path: Path) -> None:  # noqa: F811
    layer = remote.layer
    mnt = tmp_path / "mnt"
    cache = tmp_path / "cache"
    once, always = "many/10/f0200.bin", "big/b6.bin"
    with crfs_mounted(source_of(remote), mnt, "--cache-dir", str(cache), "--no-background-fetch"):
        remote.proxy.add("corrupt", BLOB_GET, times=1)
        got, _ = timed_read(mnt / once, 15)
        assert got == layer.files[once]
        assert crfs_status(mnt)["store"]["fetch"]["digest_failures"] == 1

        remote.proxy.clear()
        remote.proxy.add("corrupt", BLOB_GET, times=10_000)
        for _ in range(2):  # and again: nothing bad was kept
            got, took = timed_read(mnt / always, 15)
            assert isinstance(got, OSError) and got.errno == errno.EIO, f"{got!r:.200}"
            assert took < 10
        fd = os.open(mnt / always, os.O_RDONLY)
        try:  # read what one can, piece by piece: every piece is EIO or right
            for off in range(0, len(layer.files[always]), 128 << 10):
                with contextlib.suppress(OSError):
                    piece = os.pread(fd, 4096, off)
                    assert piece == layer.files[always][off : off + 4096], off
        finally:
            os.close(fd)
        status = crfs_status(mnt)
        assert status["read_errors"] >= 2 and status["store"]["fetch"]["digest_failures"] >= 4

    # Nothing corrupted was cached: a fresh mount on the same cache, with a
    # healthy registry, reads the right bytes.
    remote.proxy.clear()
    with crfs_mounted(source_of(remote), mnt, "--cache-dir", str(cache), "--no-background-fetch"):
        assert read_uncached(mnt / always) == layer.files[always]
        assert read_uncached(mnt / once) == layer.files[once]


# --- 4. in a user namespace --------------------------------------------------------------


UNSHARE_SCRIPT = r"""
set -u
cd "$SOURCE_TREE"
crfs() { "$PYTHON" -m snapshotter.cli "$@"; }
pid=
cleanup() {
    if grep -q " $MNT " /proc/self/mountinfo; then fusermount3 -u "$MNT" 2>/dev/null || umount -l "$MNT"; fi
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null; fi
}
trap cleanup EXIT
out=$(crfs mount "$BLOB" "$MNT") || exit 10
pid=$("$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["pid"])' <<<"$out")
echo "pid $pid"
echo "uid $(id -u) map $(awk '{print $1, $2, $3}' /proc/self/uid_map)"
grep " $MNT " /proc/self/mountinfo | sed 's/^/mountinfo /'
(cd "$MNT" && find . -type f | sort | xargs sha256sum) > "$OUT" || exit 11
crfs mount-status "$MNT" > "$STATUS" || exit 12
crfs umount "$MNT" || exit 13
for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
kill -0 "$pid" 2>/dev/null && { echo "mount process $pid still running"; exit 14; }
pid=
grep -q " $MNT " /proc/self/mountinfo && exit 15
echo clean
"""


def test_local_layer_in_a_user_namespace(layer: Layer, tmp_path: Path) -> None:

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out, status_file = tmp_path / "sums", tmp_path / "status.json"
    env = dict(os.environ, SOURCE_TREE=str(SOURCE_TREE), PYTHON=sys.executable, BLOB=str(layer.path),
               MNT=str(mnt), OUT=str(out), STATUS=str(status_file), PYTHONPATH=str(SOURCE_TREE),
               CRFS_LAZYFS_STATE=str(tmp_path / "state"))
    proc = subprocess.Popen(["unshare", "-Urm", "--propagation", "private", "bash", "-c", UNSHARE_SCRIPT],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=40)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        stdout, stderr = proc.communicate()
    pids = [int(line.split()[1]) for line in stdout.splitlines() if line.startswith("pid ")]
    for pid in pids:  # the namespace's mount dies with its last process
        if mount.is_alive(pid):
            kill(pid)
    log = f"rc={proc.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    assert proc.returncode == 0 and stdout.rstrip().endswith("clean"), log
    assert f"uid 0 map 0 {os.getuid()} 1" in stdout, log  # root in a namespace mapped onto us
    mounts = [line.split() for line in stdout.splitlines() if line.startswith("mountinfo ")]
    assert len(mounts) == 1 and "fuse.crfs" in mounts[0] and "ro" in mounts[0][6].split(","), log
    sums = dict(reversed(line.split(None, 1)) for line in out.read_text().splitlines())
    expected = {f"./{name}": hashlib.sha256(data).hexdigest() for name, data in layer.files.items()}
    assert sums == expected
    status = json.loads(status_file.read_text())
    assert status["reads"] >= len(layer.files) - 1 and status["read_errors"] == 0
    assert not mount.is_mounted(mnt)


# --- 6. reads from the local cache are answered from its files --------------------------


def _read_by_chunk(path: Path, offset: int) -> bytes:
    """``read_uncached`` one 64 KiB chunk (``CHUNK`` of these layers) at a
    time with no read-ahead: each READ then lies inside one chunk, and the
    first is past offset 0 (a read at 0 also feeds the dependency reader,
    which takes the memo's way)."""
    return read_uncached(path, offset, block=64 << 10, readahead=False)


def test_cached_chunks_are_served_from_their_files_and_old_ones_hashed_first(remote: Remote, tmp_path: Path) -> None:  # noqa: F811
    """A fresh mount on a filled cache answers reads from the chunk files
    (``pyfuse3.FileRange``, lazyfs/file_replies.py): right bytes, nothing
    fetched. A chunk file from before this boot whose bytes went bad is
    hashed before any use, dropped and fetched again, never served."""
    layer = remote.layer
    big = {name: data for name, data in layer.files.items() if name.startswith("big/")}
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    args = ("--cache-dir", str(cache), "--no-background-fetch")
    with crfs_mounted(source_of(remote), mnt, *args):
        for name, data in big.items():
            assert read_uncached(mnt / name) == data
    chunk_files = [p for p in cache.rglob("*") if p.is_file() and p.stat().st_size >= 64 << 10]
    assert chunk_files
    bad = chunk_files[0]
    with open(bad, "r+b") as f:  # same length, other bytes
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    os.utime(bad, (1, 1))  # written before this boot: due a hash when next used

    with crfs_mounted(source_of(remote), mnt, *args):
        remote.proxy.clear()
        for name, data in big.items():
            assert _read_by_chunk(mnt / name, 64 << 10) == data[64 << 10:], name
        gets, _ = fetched(remote)
        status = crfs_status(mnt)
        assert status["store"]["cache"]["bad_entries"] == 1 and gets >= 1, (gets, status["store"])
        assert status["file_replies"] >= len(big) - 1, status  # all but the refetched chunk's file
        assert status["read_errors"] == 0

        remote.proxy.clear()  # again: every chunk (the refetched one too) from its file, nothing fetched
        replies = status["file_replies"]
        for name, data in big.items():
            assert _read_by_chunk(mnt / name, 64 << 10) == data[64 << 10:], name
        assert fetched(remote) == (0, 0)
        assert crfs_status(mnt)["file_replies"] >= replies + len(big)
