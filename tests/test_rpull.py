"""``crfs rpull`` against the real containerd, registry and crfs: the
three-layer whiteout image, as is and converted to eStargz, pulled through
containerd's own API, run with ``ctr run``, deleted and collected; and bad
inputs that must fail with one clear line and leave nothing recorded.

crfs may or may not mount a layer lazily (answer ALREADY_EXISTS to Prepare);
rpull must give a complete image either way, so these tests check the
result, and only report per layer how rpull got it. Also: containerd's own
overlayfs as the control, a multi-platform index, ``--user`` against a
registry with htpasswd auth, and both branches of a layer's unpack driven by
a scripted containerd (lazy answer; fallback with a wrong diff ID).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

import bcrypt
import pytest

from harness import OciImage, Stack, build_whiteout_image, containerd_stack, push_image
from harness import images
from harness.flow import CRFS, OVERLAYFS, remove_image, run_sh, wait_clean
from harness.proc import HarnessError
from harness.registry import Registry
from lazyfs.convert import ConvertOptions, Converter, open_store
from lazyfs.ocilayout import OciLayout
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.manifest import OCI_INDEX, Manifest
from lazyfs.registry.reference import parse_reference
from snapshotter import containerd_api
from snapshotter.rpull import FETCHED, LAZY, LayerResult, Progress, Puller, chain_ids, image_layers_label

pytestmark = pytest.mark.e2e

LAYERS = 3
PROBE = rf"""
if [ -e {images.DELETED_FILE} ]; then echo deleted=present; else echo deleted=absent; fi
echo "data=$(ls -A {images.OPAQUE_DIR} | tr '\n' ' ')"
echo "kept=$(cat {images.KEPT_FILE})"
echo "layer3=$(cat {images.LAYER3_FILE})"
"""
EXPECTED = {
    "deleted": "absent",
    "data": " ".join(images.OPAQUE_NEW),
    "kept": images.KEPT_TEXT,
    "layer3": images.LAYER3_TEXT,
}
LAYER_LINE = re.compile(r"^layer (\d+)/(\d+) (sha256:[0-9a-f]{64}) (lazy|fetched|present)\b", re.M)


@pytest.fixture(scope="module")
def whiteout_image(tmp_path_factory: pytest.TempPathFactory) -> OciImage:
    return build_whiteout_image(tmp_path_factory.mktemp("rpull-image"))


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with containerd_stack(with_crfs=True) as s:
        yield s


# --- helpers -----------------------------------------------------------------------


def rpull(stack: Stack, ref: str, *extra: str, address: Optional[str] = None, via_env: bool = False) -> subprocess.CompletedProcess:
    """``crfs rpull`` as a user runs it, against the stack's containerd;
    ``via_env`` names it with CONTAINERD_ADDRESS / CONTAINERD_NAMESPACE, as ctr reads them."""
    ctrd = stack.containerd
    where = {"CONTAINERD_ADDRESS": address or str(ctrd.address), "CONTAINERD_NAMESPACE": ctrd.namespace}
    flags = [] if via_env else ["--address", where["CONTAINERD_ADDRESS"], "--namespace", where["CONTAINERD_NAMESPACE"]]
    env = {**os.environ, **where} if via_env else None
    argv = [sys.executable, "-m", "snapshotter.cli", "rpull", *flags, "--plain-http", *extra, ref]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)


def layer_report(stderr: str) -> list[tuple[int, str, str]]:
    """``(layer number, digest, lazy|fetched|present)`` for each layer line rpull printed."""
    return [(int(m[1]), m[3], m[4]) for m in LAYER_LINE.finditer(stderr)]


def report_laziness(stderr: str, label: str) -> list[str]:
    """Print, per layer, whether rpull saw it mounted lazily; returns the modes.

    Not asserted yet: crfs's lazy Prepare path is still being written.
    """
    report = layer_report(stderr)
    print(f"\n[{label}] rpull per layer:")
    for n, digest, how in report:
        print(f"  layer {n}: {digest[:19]}  {how}")
    return [how for _, _, how in report]


def check_snapshot_labels(stack: Stack, snapshotter: str, ref: str, layer_digests: list[str]) -> None:
    """Every committed layer snapshot carries the labels a remote snapshotter
    needs (as containerd's metadata recorded them), the layer's own
    ``containerd.io/snapshot/*`` annotations included."""
    annotations = _layer_annotations(ref)
    seen = []
    for key in stack.containerd.snapshot_keys(snapshotter):
        info = json.loads(stack.containerd.ctr("snapshots", "--snapshotter", snapshotter, "info", key).stdout)
        labels = info.get("Labels") or {}
        digest = labels.get("containerd.io/snapshot/cri.layer-digest")
        seen.append(digest)
        assert labels.get("containerd.io/snapshot.ref") == info["Name"] == key, info
        assert labels.get("containerd.io/snapshot/cri.image-ref") == ref, info
        assert labels.get("containerd.io/snapshot/cri.image-layers", "").startswith(digest), info
        inherited = {k: v for k, v in annotations[digest].items() if k.startswith("containerd.io/snapshot/")}
        assert inherited.items() <= labels.items(), (inherited, labels)
    assert sorted(seen) == sorted(layer_digests)


def _layer_annotations(ref: str) -> dict[str, dict[str, str]]:
    with RegistryClient() as client:
        manifest = client.resolve(ref).manifest
    return {layer.digest: dict(layer.annotations) for layer in manifest.layers}


def facts(stdout: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in stdout.splitlines() if "=" in line)
    return {k: v.strip() for k, v in pairs}


def image_names(stack: Stack) -> list[str]:
    return stack.containerd.ctr("images", "ls", "-q").stdout.split()


def leases(stack: Stack) -> list[str]:
    return stack.containerd.ctr("leases", "ls", "-q").stdout.split()


def crfs_store(stack: Stack) -> dict:
    assert stack.crfs is not None
    return {"crfs_root": stack.crfs.root, "crfs_address": stack.crfs.address}


def with_logs(stack: Stack, error: Exception) -> AssertionError:
    tail = f"\n--- crfs log tail ---\n{stack.crfs.stderr_tail()}" if stack.crfs else ""
    return AssertionError(f"{error}{tail}")


def rpull_run_remove(stack: Stack, ref: str, label: str, snapshotter: str = CRFS) -> list[str]:
    """rpull, check the image is recorded and runs right, delete it, check
    GC leaves no snapshot. Returns the per-layer modes rpull reported."""
    ctrd = stack.containerd
    res = rpull(stack, ref, "--snapshotter", snapshotter)
    assert res.returncode == 0, res.stderr
    modes = report_laziness(res.stderr, label)
    assert len(modes) == LAYERS, res.stderr
    check_snapshot_labels(stack, snapshotter, ref, [digest for _, digest, _ in layer_report(res.stderr)])
    assert ref in image_names(stack)
    assert leases(stack) == [], "rpull's lease outlived it"
    assert len(ctrd.snapshot_keys(snapshotter)) == LAYERS
    ctrd.gc()  # the image's GC labels must hold every snapshot and the metadata
    assert len(ctrd.snapshot_keys(snapshotter)) == LAYERS, "GC took snapshots of a recorded image"

    out = run_sh(ctrd, ref, snapshotter, f"rpull-{label}", PROBE)
    assert facts(out.stdout) == EXPECTED, out.stdout

    again = rpull(stack, ref, "--snapshotter", snapshotter)  # idempotent: every chain is there already
    assert again.returncode == 0, again.stderr
    assert [how for _, _, how in layer_report(again.stderr)] == ["present"] * LAYERS

    remove_image(ctrd, ref)
    assert ref not in image_names(stack)
    store = crfs_store(stack) if snapshotter == CRFS else {}
    assert wait_clean(ctrd, snapshotter, **store) == {}, "snapshots left after image rm + GC"
    return modes


# --- tests -------------------------------------------------------------------------


def test_chain_ids_and_layers_label() -> None:
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    # identity.ChainID: sha256 of "<parent chain> <diff id>"
    assert chain_ids([a, b]) == [a, "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()]
    assert image_layers_label([a, b]) == f"{a},{b}"
    many = [a] * 100
    label = image_layers_label(many)
    assert len("containerd.io/snapshot/cri.image-layers") + len(label) <= 4096
    assert label.count(",") + 1 < 100 and label.endswith(a)


def test_rpull_into_containerds_own_overlayfs(stack: Stack, whiteout_image: OciImage) -> None:
    """The control: with a snapshotter that is never lazy, rpull is an ordinary pull."""
    ref = push_image(whiteout_image, stack.registry.host, "rpull/control")
    assert rpull_run_remove(stack, ref, "overlayfs", OVERLAYFS) == [FETCHED] * LAYERS


def test_rpull_plain_image_runs_and_is_collected(stack: Stack, whiteout_image: OciImage) -> None:
    try:
        ref = push_image(whiteout_image, stack.registry.host, "rpull/plain")
        modes = rpull_run_remove(stack, ref, "gzip")
        assert set(modes) <= {"lazy", "fetched"}
    except (AssertionError, HarnessError) as e:
        raise with_logs(stack, e) from e


def test_rpull_estargz_image_runs_and_is_collected(stack: Stack, whiteout_image: OciImage) -> None:
    try:
        src = push_image(whiteout_image, stack.registry.host, "rpull/src")
        dst = f"{stack.registry.host}/rpull/esgz:esgz"
        with RegistryClient() as client:
            Converter(open_store(src, client, False), open_store(dst, client, True), ConvertOptions()).run()
        annotations = _layer_annotations(dst)
        assert all("containerd.io/snapshot/stargz/toc.digest" in a for a in annotations.values()), annotations
        modes = rpull_run_remove(stack, dst, "estargz")
        assert set(modes) <= {"lazy", "fetched"}
    except (AssertionError, HarnessError) as e:
        raise with_logs(stack, e) from e


def _assert_failed_cleanly(stack: Stack, res: subprocess.CompletedProcess, pattern: str) -> None:
    assert res.returncode != 0, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("crfs rpull: "), res.stderr
    assert re.search(pattern, lines[0], re.I), lines[0]
    assert "Traceback" not in res.stderr


def test_bad_inputs_fail_clearly_and_record_nothing(stack: Stack, whiteout_image: OciImage) -> None:
    ref = push_image(whiteout_image, stack.registry.host, "rpull/bad")
    before = image_names(stack)
    cases = [
        (ref.rsplit(":", 1)[0] + ":no-such-tag", {}, r"no-such-tag.*404|not found"),
        ("127.0.0.1:1/rpull/bad:whiteout", {}, r"127\.0\.0\.1:1"),
        ("Not A Reference", {}, r"invalid reference"),
        (ref, {"address": str(stack.workdir / "no-such.sock")}, r"cannot reach containerd"),
        (ref, {"address": str(_stale_socket(stack.workdir / "stale.sock"))}, r"cannot reach containerd"),
    ]
    for bad_ref, kw, pattern in cases:
        res = rpull(stack, bad_ref, **kw)
        print(f"\n{bad_ref}: exit {res.returncode}: {res.stderr.strip()}")
        _assert_failed_cleanly(stack, res, pattern)
    assert image_names(stack) == before
    assert leases(stack) == []
    assert stack.containerd.snapshot_keys(CRFS) == []


def _stale_socket(path: Path) -> Path:
    """A unix socket file nobody listens on (containerd died)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
    return path


def _push_all(layout: Path, tag: str, dest: str, *creds: str) -> None:
    """skopeo copy --all (keeps an index an index), with optional --dest-creds."""
    run = subprocess.run(["skopeo", "--insecure-policy", "copy", "--all", "--quiet", "--dest-tls-verify=false", *creds,
                          f"oci:{layout}:{tag}", f"docker://{dest}"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr


def test_rpull_index_picks_the_platform(stack: Stack, whiteout_image: OciImage) -> None:
    layout = OciLayout(whiteout_image.layout)
    manifest = layout.resolve(whiteout_image.tag)
    entries = [{"mediaType": manifest.media_type, "digest": manifest.digest, "size": len(manifest.raw),
                "platform": {"os": "linux", "architecture": arch}} for arch in ("arm64", "amd64")]
    index = layout.put_manifest(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode(),
                                OCI_INDEX, "multi")
    ref = f"{stack.registry.host}/rpull/multi:multi"
    _push_all(whiteout_image.layout, "multi", ref)
    try:
        res = rpull(stack, ref, "--platform", "linux/amd64", via_env=True)
        assert res.returncode == 0, res.stderr
        listing = stack.containerd.ctr("images", "ls").stdout
        assert index.digest in listing and OCI_INDEX in listing, listing
        stack.containerd.gc()
        out = run_sh(stack.containerd, ref, CRFS, "rpull-index", PROBE)
        assert facts(out.stdout) == EXPECTED, out.stdout
        missing = rpull(stack, ref, "--platform", "linux/s390x")
        _assert_failed_cleanly(stack, missing, r"no manifest for platform linux/s390x")
        remove_image(stack.containerd, ref)
        assert wait_clean(stack.containerd, CRFS, **crfs_store(stack)) == {}
    except (AssertionError, HarnessError) as e:
        raise with_logs(stack, e) from e


def test_rpull_user_credentials(stack: Stack, whiteout_image: OciImage, tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{bcrypt.hashpw(b's3cret', bcrypt.gensalt(rounds=4)).decode()}\n")
    auth = {"htpasswd": {"realm": "rpull", "path": htpasswd}}
    with Registry(tmp_path / "authreg", auth=auth) as reg:
        ref = f"{reg.host}/rpull/private:whiteout"
        _push_all(whiteout_image.layout, whiteout_image.tag, ref, "--dest-creds", "alice:s3cret")
        anonymous = rpull(stack, ref)
        _assert_failed_cleanly(stack, anonymous, r"401|unauthori[sz]ed|auth")
        wrong = rpull(stack, ref, "--user", "alice:wrong")
        _assert_failed_cleanly(stack, wrong, r"401|unauthori[sz]ed|auth")
        res = rpull(stack, ref, "--user", "alice:s3cret")
        assert res.returncode == 0, res.stderr
        assert "s3cret" not in res.stderr
        assert ref in image_names(stack)
        remove_image(stack.containerd, ref)
    assert wait_clean(stack.containerd, CRFS, **crfs_store(stack)) == {}


# --- the lazy and fallback branches with a scripted containerd ---------------------------


class ScriptedContainerd:
    """Answers Stat/Prepare/Apply/Commit as told and records the calls, to
    drive both branches of a layer's unpack without a lazy snapshotter."""

    def __init__(self, lazy: bool, applied_digest: Optional[str] = None) -> None:
        self.lazy = lazy
        self.applied_digest = applied_digest
        self.snapshots: set[str] = set()
        self.calls: list[tuple] = []

    def snapshot_exists(self, snapshotter: str, key: str) -> bool:
        return key in self.snapshots

    def prepare(self, snapshotter: str, key: str, parent: str, labels: dict) -> list:
        self.calls.append(("prepare", key, parent, dict(labels)))
        if self.lazy:
            self.snapshots.add(labels["containerd.io/snapshot.ref"])
            raise containerd_api.AlreadyExists("prepare: exists")
        return [containerd_api.Mount("bind", "/nowhere")]

    def write_content(self, ref: str, digest: str, size: int, chunks, labels=None) -> bool:
        self.calls.append(("write", ref, b"".join(chunks)))
        return True

    def apply(self, desc, mounts) -> containerd_api.Descriptor:
        self.calls.append(("apply", desc.digest))
        return containerd_api.Descriptor("application/vnd.oci.image.layer.v1.tar", self.applied_digest or "", 0)

    def commit(self, snapshotter: str, name: str, key: str, labels: dict) -> None:
        self.calls.append(("commit", name, key))
        self.snapshots.add(name)

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        self.calls.append(("remove", key))

    def update_content_labels(self, digest: str, labels: dict) -> None:
        self.calls.append(("label", digest, dict(labels)))


REF = parse_reference("example.com/r/x:y")


class OneBlobRepo:
    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def open_blob(self, digest: str, size: Optional[int] = None) -> Iterator[bytes]:
        yield self.blob


def _scripted_manifest() -> Manifest:
    layers = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + c * 64, "size": 4,
               "annotations": {"containerd.io/snapshot/stargz/toc.digest": "sha256:" + "f" * 64, "other": "x"}}
              for c in "ab"]
    raw = json.dumps({"schemaVersion": 2, "config": {"mediaType": "application/json", "digest": "sha256:" + "c" * 64,
                                                     "size": 2}, "layers": layers}).encode()
    return Manifest.parse(raw, "sha256:" + hashlib.sha256(raw).hexdigest())


def test_lazy_answer_skips_the_download() -> None:
    ctrd = ScriptedContainerd(lazy=True)
    manifest = _scripted_manifest()
    diff_ids = ["sha256:" + "1" * 64, "sha256:" + "2" * 64]
    puller = Puller(ctrd, None, "crfs")  # type: ignore[arg-type]
    results = [puller._unpack_layer(OneBlobRepo(b"blob"), REF, manifest, diff_ids, i) for i in range(2)]
    assert [r.how for r in results] == [LAZY, LAZY]
    assert [c[0] for c in ctrd.calls] == ["prepare", "prepare"]
    chain = chain_ids(diff_ids)
    _, key, parent, labels = ctrd.calls[1]
    assert key.startswith("extract-") and key.endswith(" " + chain[1]) and parent == chain[0]
    assert labels["containerd.io/snapshot/stargz/toc.digest"] == "sha256:" + "f" * 64 and "other" not in labels
    assert labels["containerd.io/snapshot/cri.layer-digest"] == "sha256:" + "b" * 64
    assert labels["containerd.io/snapshot/cri.image-layers"] == "sha256:" + "b" * 64
    assert labels["containerd.io/snapshot/cri.manifest-digest"] == manifest.digest
    assert labels["containerd.io/snapshot/cri.image-ref"] == "example.com/r/x:y"


def test_fallback_applies_and_removes_the_key_on_a_wrong_diff_id() -> None:
    manifest = _scripted_manifest()
    diff_ids = ["sha256:" + "1" * 64, "sha256:" + "2" * 64]
    good = ScriptedContainerd(lazy=False, applied_digest=diff_ids[0])
    result = Puller(good, None, "crfs")._unpack_layer(OneBlobRepo(b"blob"), REF, manifest, diff_ids, 0)  # type: ignore[arg-type]
    assert result == LayerResult(0, "sha256:" + "a" * 64, diff_ids[0], FETCHED, 4)
    assert [c[0] for c in good.calls] == ["prepare", "write", "apply", "commit", "label"]
    bad = ScriptedContainerd(lazy=False, applied_digest="sha256:" + "9" * 64)
    with pytest.raises(Exception, match="diff ID"):
        Puller(bad, None, "crfs")._unpack_layer(OneBlobRepo(b"blob"), REF, manifest, diff_ids, 0)  # type: ignore[arg-type]
    prepared_key = bad.calls[0][1]
    assert bad.calls[-1] == ("remove", prepared_key) and "commit" not in [c[0] for c in bad.calls]


def test_progress_live_line_and_layer_lines() -> None:
    out = io.StringIO()
    progress = Progress(out, live=True, interval=0)
    progress.fetching(0, 3, "sha256:" + "a" * 64, 1 << 20, 2 << 20)
    progress.layer(LayerResult(0, "sha256:" + "a" * 64, "c", FETCHED, 2 << 20), 3)
    text = out.getvalue()
    assert "fetching 1.0 MiB / 2.0 MiB" in text
    assert layer_report(text.replace("\r\x1b[2K", "\n")) == [(1, "sha256:" + "a" * 64, "fetched")]
    quiet = io.StringIO()
    Progress(quiet, live=False).fetching(0, 1, "sha256:" + "a" * 64, 1, 2)
    assert quiet.getvalue() == ""
