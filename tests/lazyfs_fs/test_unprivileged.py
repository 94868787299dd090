"""A layer mount by a truly unprivileged user: uid 65534 (nobody), no
capabilities, in its own user + mount namespace (``unshare -Urm``), where it
is root over nothing but itself and may mount FUSE. (The test in
test_remote_mount.py does ``unshare -Urm`` from root, whose mapping is
root onto root.)"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path


SOURCE_TREE = Path(__file__).resolve().parents[2]
NOBODY = 65534

SCRIPT = r"""
set -u
echo "map $(awk '{print $1, $2, $3}' /proc/self/uid_map)"
"$PYTHON" -m lazyfs.mount --source "$BLOB" --mountpoint "$MNT" --no-allow-other > "$WORK/log" 2>&1 &
pid=$!
for _ in $(seq 100); do grep -q " $MNT " /proc/self/mountinfo && break; sleep 0.05; done
grep " $MNT " /proc/self/mountinfo | sed 's/^/mountinfo /'
for f in etc/hosts big.bin "dir with space/fïlé ünïcødé.txt"; do
    echo "sum $(sha256sum < "$MNT/$f" | cut -d' ' -f1) $f"
done
fusermount3 -u "$MNT"
wait "$pid"; echo "exit $?"
"""


def _python() -> str | None:
    """A Python nobody may run, in its namespace, with this one's ABI (the
    venv's interpreter here lives under /root, which nobody may not enter)."""
    for candidate in (sys.executable, f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"):
        proc = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--",
                               "unshare", "-Urm", candidate, "-c", "import pyfuse3, trio"],
                              capture_output=True, cwd="/",
                              env={"PYTHONPATH": os.pathsep.join([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])})
        if proc.returncode == 0:
            return candidate
    return None


def test_mount_as_nobody_in_a_user_namespace(crfs_blob, extracted: Path) -> None:
    # CI runs as root with util-linux: a missing piece is a failure, never a skip
    assert os.geteuid() == 0, "needs root to become nobody"
    assert shutil.which("setpriv") and shutil.which("unshare"), "setpriv/unshare missing (util-linux)"
    python = _python()
    assert python is not None, "no Python with this ABI that uid 65534 may execute (Debian's python3.11: scripts/setup.sh)"
    work = Path(tempfile.mkdtemp(prefix="crfs-nobody-", dir="/tmp"))
    try:
        work.chmod(0o777)
        blob = work / "layer.esgz"
        shutil.copy(crfs_blob[0], blob)
        blob.chmod(0o644)
        mnt = work / "mnt"
        mnt.mkdir()
        mnt.chmod(0o777)
        pythonpath = os.pathsep.join([str(SOURCE_TREE), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
        env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "PYTHON": python, "BLOB": str(blob), "MNT": str(mnt),
               "WORK": str(work), "PYTHONPATH": pythonpath, "CRFS_LAZYFS_STATE": str(work / "state"), "LC_ALL": "C.UTF-8"}
        proc = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--",
                               "unshare", "-Urm", "--propagation", "private", "bash", "-c", SCRIPT],
                              env=env, capture_output=True, text=True, timeout=60)
        log = f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}\nlog:\n" + (
            (work / "log").read_text(errors="replace") if (work / "log").exists() else "")
        assert proc.returncode == 0 and "exit 0" in proc.stdout, log
        assert f"map 0 {NOBODY} 1" in proc.stdout, log
        mounts = [line.split() for line in proc.stdout.splitlines() if line.startswith("mountinfo ")]
        assert len(mounts) == 1 and "fuse.crfs" in mounts[0], log
        sums = dict(line.split(" ", 2)[2:0:-1] for line in proc.stdout.splitlines() if line.startswith("sum "))
        expected = {f: hashlib.sha256((extracted / f).read_bytes()).hexdigest()
                    for f in ("etc/hosts", "big.bin", "dir with space/fïlé ünïcødé.txt")}
        assert sums == expected, log
    finally:
        subprocess.run(["umount", "-l", str(work / "mnt")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
