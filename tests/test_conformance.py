"""containerd's own snapshotter conformance suite, run against `crfs serve`.

The suite (github.com/containerd/containerd/snapshots/testsuite) is driven by
the Go test in tests/conformance/, built here in GOPATH mode against Debian's
containerd 1.6 sources. It talks to a fresh server per suite test through
containerd's snapshots/proxy client on a unix socket, as containerd itself
does for a proxy_plugins snapshotter. See tests/conformance/README.md.

Missing Go or containerd sources is a failure, not a skip: CI always has them
(golang-go, golang-github-containerd-containerd-dev). The suite mounts, so it
needs root.

The same suite also runs against containerd's built-in overlayfs snapshotter
(tests/conformance/refserver), which is where REFERENCE_PASS below comes
from, so a change of the suite or the machine shows up as its own failure.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

CONFORMANCE_DIR = Path(__file__).resolve().parent / "conformance"
GOPATH = "/usr/share/gocode"
CONTAINERD_SRC = Path(GOPATH, "src/github.com/containerd/containerd")
SUITE = "TestConformance"

# What containerd's overlayfs snapshotter, served by tests/conformance/refserver
# over the same gRPC path, passes on these machines (README.md has the run).
REFERENCE_PASS = [
    "Basic",
    "StatActive",
    "StatComitted",  # sic, the suite's spelling
    "TransitivityTest",
    "PreareViewFailingtest",  # sic
    "Update",
    "Remove",
    "Walk",
    "LayerFileupdate",
    "RemoveDirectoryInLowerLayer",
    "Chown",
    "DirectoryPermissionOnCommit",
    "RemoveIntermediateSnapshot",
    "DeletedFilesInChildSnapshot",
    "MoveFileFromLowerLayer",
    "ViewReadonly",
    "StatInWalk",
    "CloseTwice",
    "RootPermission",
    "128LayersMount",
]
# Skipped by the suite itself ("rename test still fails on some kernels").
REFERENCE_SKIP = ["Rename"]

BUILD_TIMEOUT = 300  # a cold build takes ~15 s here
GO_TIMEOUT = 240  # -test.timeout: Go panics with a goroutine dump
RUN_TIMEOUT = GO_TIMEOUT + 30  # then we kill the whole process group
LOG_LINES_PER_FAILURE = 120

RESULT_RE = re.compile(r"^\s*--- (PASS|FAIL|SKIP): (\S+) \(")
MARKER_RE = re.compile(r"^=== (?:RUN|PAUSE|CONT|NAME)\s+(\S+)")
# testutil.Unmount logs every unmount: 128 lines in 128LayersMount alone.
NOISE_RE = re.compile(r"^\s+helpers_unix\.go:\d+: unmount ")


def _go_env():
    go = shutil.which("go")
    if go is None:
        pytest.fail("`go` is not on PATH: install golang-go", pytrace=False)
    if not (CONTAINERD_SRC / "snapshots/testsuite").is_dir():
        pytest.fail(
            f"containerd sources not found under {CONTAINERD_SRC}: "
            "install golang-github-containerd-containerd-dev",
            pytrace=False,
        )
    env = dict(os.environ, GO111MODULE="off", GOPATH=GOPATH, GOFLAGS="")
    # Go's own default, made explicit so that it works without $HOME too.
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    env.setdefault("GOCACHE", str(Path(cache_home) / "go-build"))
    return env


def _go_build(args, env):
    try:
        p = subprocess.run(
            ["go", *args],
            cwd=CONFORMANCE_DIR,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=BUILD_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`go {' '.join(args)}` took over {BUILD_TIMEOUT}s", pytrace=False)
    if p.returncode != 0:
        pytest.fail(f"`go {' '.join(args)}` failed:\n{p.stdout}", pytrace=False)


@pytest.fixture(scope="session")
def go_env():
    return _go_env()


@pytest.fixture(scope="session")
def suite_binary(go_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("conformance-bin") / "conformance.test"
    _go_build(["test", "-c", "-o", str(out), "."], go_env)
    return out


@pytest.fixture(scope="session")
def refserver_binary(go_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("conformance-ref") / "refserver"
    _go_build(["build", "-o", str(out), "./refserver"], go_env)
    return out


def _find_crfs():
    crfs = shutil.which("crfs")
    if crfs is None:  # a venv's bin/ need not be on PATH
        candidate = Path(sys.executable).parent / "crfs"
        if os.access(candidate, os.X_OK):
            crfs = str(candidate)
    if crfs is None:
        pytest.fail("`crfs` console script not found: pip install -e .", pytrace=False)
    return crfs


# --- cleanup of whatever a failed or killed run leaves behind ---------------


def _mounts_under(root):
    """Mount points at or below root, deepest first, with their fs types."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            # mount point is field 5; fs type follows the " - " separator
            mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            fstype = fields[fields.index("-") + 1]
            if mp == root or mp.startswith(root + "/"):
                found.append((mp, fstype))
    return sorted(found, reverse=True)


def _unmount_under(root):
    for mp, fstype in _mounts_under(root):
        cmds = [["umount", "-l", mp]]
        if fstype.startswith("fuse"):
            cmds.insert(0, ["fusermount3", "-u", "-z", mp])
        for cmd in cmds:
            if subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
                break
    return [mp for mp, _ in _mounts_under(root)]


def _kill_processes_mentioning(root):
    """SIGKILL processes whose command line names root: servers started with
    --root under it, fuse-overlayfs daemons with layers under it."""
    killed = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if root in cmdline:
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
                killed.append(f"{pid_dir.name}: {cmdline.strip()}")
            except ProcessLookupError:
                pass
    return killed


# --- running the suite -------------------------------------------------------


class SuiteRun:
    def __init__(self, results, logs, raw_log, returncode, timed_out, leftovers):
        self.results = results  # "Basic" -> "PASS" | "FAIL" | "SKIP"
        self.logs = logs  # "Basic" -> [lines]
        self.raw_log = raw_log
        self.returncode = returncode
        self.timed_out = timed_out
        self.leftovers = leftovers  # mounts we had to unmount after the run

    def summary(self):
        order = {"FAIL": 0, "PASS": 1, "SKIP": 2}
        return "\n".join(
            f"  {status} {name}" for name, status in sorted(self.results.items(), key=lambda kv: (order[kv[1]], kv[0]))
        )

    def explain(self, names):
        """The suite's log of each named test, for a failure message."""
        parts = []
        for name in names:
            lines = [line for line in self.logs.get(name, []) if not NOISE_RE.match(line)]
            if not lines and name not in self.results:
                continue  # never ran: the raw log's end says why
            if len(lines) > LOG_LINES_PER_FAILURE:
                lines = [f"[... {len(lines) - LOG_LINES_PER_FAILURE} lines, see {self.raw_log}]"] + lines[
                    -LOG_LINES_PER_FAILURE:
                ]
            parts.append(f"----- {name}: {self.results.get(name, 'NO RESULT')} -----\n" + "\n".join(lines))
        return "\n".join(parts)


def _parse(text):
    """Results and per-test logs from `-test.v` output. Parallel subtests
    interleave their output; Go marks each switch with `=== CONT name`."""
    results, logs = {}, {}
    current = SUITE
    prefix = SUITE + "/"
    for line in text.splitlines():
        if m := RESULT_RE.match(line):
            status, current = m.groups()
            if current.startswith(prefix):
                results[current[len(prefix) :]] = status
            continue
        if m := MARKER_RE.match(line):
            current = m.group(1)
            continue
        if not line.startswith(" "):  # the binary's own lines: FAIL, panic, ...
            logs.setdefault(SUITE, []).append(line)
            continue
        name = current[len(prefix) :] if current.startswith(prefix) else SUITE
        logs.setdefault(name, []).append(line)
    return results, logs


def run_suite(binary, serve_cmd, env, log_path):
    """Runs the suite binary against serve_cmd, then makes sure that no mount
    or process of the run is left, whatever happened."""
    # Short base dir: the suite's tmp dirs live here and the server socket
    # under them must fit in sun_path (108 bytes).
    tmp = tempfile.mkdtemp(prefix="crfs-ct-", dir="/tmp" if os.path.isdir("/tmp") else None)
    env = dict(env, TMPDIR=tmp, CRFS_SERVE_CMD=serve_cmd)
    timed_out = False
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [str(binary), "-test.v", f"-test.timeout={GO_TIMEOUT}s", f"-test.run=^{SUITE}$"],
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # so that killpg reaches its children
            )
            try:
                proc.wait(timeout=RUN_TIMEOUT)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
    finally:
        leftovers = _unmount_under(tmp)  # those that would not go: still listed
        _kill_processes_mentioning(tmp)
        time.sleep(0.2)  # let killed FUSE daemons release their mounts
        leftovers += _unmount_under(tmp)
        if not _mounts_under(tmp):  # never rm -r through a live mount
            shutil.rmtree(tmp, ignore_errors=True)
    text = Path(log_path).read_text(errors="replace")
    results, logs = _parse(text)
    return SuiteRun(results, logs, log_path, proc.returncode, timed_out, sorted(set(leftovers)))


def _check_run(run, must_pass):
    problems = []
    if run.timed_out:
        problems.append(f"suite did not finish within {RUN_TIMEOUT}s and was killed")
    failed = sorted(n for n, s in run.results.items() if s == "FAIL")
    if failed:
        problems.append(f"FAIL: {', '.join(failed)}")
    not_passed = [n for n in must_pass if run.results.get(n) != "PASS" and n not in failed]
    if not_passed:
        problems.append(
            "passed by the reference but not here: "
            + ", ".join(f"{n} ({run.results.get(n, 'no result')})" for n in not_passed)
        )
    if run.returncode != 0 and not failed and not run.timed_out:
        problems.append(f"suite binary exited with {run.returncode}")
    if run.leftovers:
        problems.append(f"mounts left after the run: {run.leftovers}")
    if problems:
        detail = run.explain(failed + not_passed)
        if not run.results or run.timed_out or (run.returncode != 0 and not failed):
            # crashed or hung: the end of the raw log says why
            detail += "\n----- end of raw log -----\n" + "\n".join(
                Path(run.raw_log).read_text(errors="replace").splitlines()[-LOG_LINES_PER_FAILURE:]
            )
        pytest.fail(
            "snapshotter conformance: "
            + "; ".join(problems)
            + f"\nresults:\n{run.summary()}\nfull log: {run.raw_log}\n{detail}",
            pytrace=False,
        )


def _require_root():
    if os.geteuid() != 0:
        pytest.fail("the conformance suite mounts snapshots and must run as root", pytrace=False)


def test_containerd_snapshotter_conformance(suite_binary, go_env, tmp_path):
    """crfs passes every suite test that containerd's overlayfs does, and
    fails none."""
    _require_root()
    crfs = _find_crfs()
    run = run_suite(suite_binary, f"{crfs} serve", go_env, tmp_path / "conformance.log")
    print(f"crfs conformance results:\n{run.summary()}")
    _check_run(run, REFERENCE_PASS)


def test_reference_snapshotter_conformance(suite_binary, refserver_binary, go_env, tmp_path):
    """The suite, harness and machine agree with REFERENCE_PASS/SKIP when
    the server is containerd's own overlayfs snapshotter."""
    _require_root()
    run = run_suite(suite_binary, str(refserver_binary), go_env, tmp_path / "reference.log")
    print(f"reference conformance results:\n{run.summary()}")
    _check_run(run, REFERENCE_PASS)
    expected = {**{n: "PASS" for n in REFERENCE_PASS}, **{n: "SKIP" for n in REFERENCE_SKIP}}
    assert run.results == expected, f"reference results changed:\n{run.summary()}"
