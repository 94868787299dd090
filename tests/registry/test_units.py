"""Pure parsing and policy: references, digests, platforms, challenges,
scopes, ranges, retry timing, config validation (no servers)."""

from __future__ import annotations

import json

import pytest

from lazyfs.registry import (
    ConfigError,
    InsecureRegistry,
    InvalidReference,
    Manifest,
    NotFound,
    Platform,
    ProtocolError,
    RegistryConfig,
    parse_reference,
)
from lazyfs.registry.auth import covers, parse_challenges
from lazyfs.registry.digest import compute_digest, parse_digest
from lazyfs.registry.errors import IncompleteBody, RegistryError
from lazyfs.registry.manifest import OCI_INDEX, select_platform
from lazyfs.registry.ranges import Segment, extract, parse_content_range, parse_multipart, range_header
from lazyfs.registry.retry import Attempts, parse_retry_after
from lazyfs.registry.transport import Transport, redact

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    "text, registry, repo, tag, digest",
    [
        ("127.0.0.1:5000/app", "127.0.0.1:5000", "app", "latest", None),
        ("127.0.0.1:5000/a/b/c:v1.2", "127.0.0.1:5000", "a/b/c", "v1.2", None),
        (f"localhost/app@{D}", "localhost", "app", None, D),
        (f"reg.example.com/x/y:t@{D}", "reg.example.com", "x/y", "t", D),
        ("ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None),
        ("user/app", "docker.io", "user/app", "latest", None),
        ("index.docker.io/library/busybox", "docker.io", "library/busybox", "latest", None),
        ("[::1]:5000/app:x", "[::1]:5000", "app", "x", None),
    ],
)
def test_parse_reference(text: str, registry: str, repo: str, tag: str, digest: str) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repo, tag, digest)
    assert ref.object == (digest or tag)
    assert parse_reference(str(ref)) == ref


def test_docker_hub_api_host() -> None:
    assert parse_reference("busybox").api_host == "registry-1.docker.io"
    assert parse_reference("127.0.0.1:1/x").api_host == "127.0.0.1:1"


@pytest.mark.parametrize(
    "text",
    ["", "UPPER/case", "host:5000/app:bad tag", "app@sha256:1234", "http://host/app", "app@md5:" + "0" * 32, "a//b", " app"],
)
def test_invalid_references(text: str) -> None:
    with pytest.raises(InvalidReference):
        parse_reference(text)


def test_digest_parsing() -> None:
    assert parse_digest(D) == D
    assert compute_digest(b"") == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    for bad in ("sha256:" + "A" * 64, "sha256:abc", "sha1:" + "0" * 40):
        with pytest.raises(InvalidReference):
            parse_digest(bad)


def _index(*platforms: str) -> Manifest:
    manifests = []
    for i, p in enumerate(platforms):
        os_, arch, *variant = p.split("/")
        plat = {"os": os_, "architecture": arch, **({"variant": variant[0]} if variant else {})}
        manifests.append({"mediaType": "x", "digest": "sha256:" + f"{i:02d}" * 32, "size": 1, "platform": plat})
    raw = json.dumps({"schemaVersion": 2, "manifests": manifests}).encode()
    return Manifest.parse(raw, compute_digest(raw))


def test_platform_selection() -> None:
    index = _index("linux/amd64", "linux/arm/v6", "linux/arm/v7", "linux/arm64/v8", "windows/amd64")
    assert index.media_type == OCI_INDEX
    pick = lambda p: select_platform(index, Platform.parse(p)).digest[7:9]  # noqa: E731
    assert pick("linux/amd64") == "00"
    assert pick("linux/arm/v6") == "01"
    assert pick("linux/arm") == "02"  # arm defaults to v7
    assert pick("linux/arm64") == "03"  # arm64 == arm64/v8
    assert pick("linux/aarch64") == "03"
    assert pick("windows/amd64") == "04"
    with pytest.raises(NotFound, match="offers: linux/amd64, linux/arm/v6"):
        select_platform(index, Platform.parse("linux/s390x"))


def test_challenge_parsing() -> None:
    [c] = parse_challenges('Bearer realm="https://auth.example/token",service="reg",scope="repository:a:pull repository:b:pull,push"')
    assert c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.example/token", "service": "reg",
                        "scope": "repository:a:pull repository:b:pull,push"}
    both = parse_challenges('Basic realm="x", Bearer realm="y",error="invalid_token"')
    assert [(c.scheme, c.params) for c in both] == [("basic", {"realm": "x"}), ("bearer", {"realm": "y", "error": "invalid_token"})]
    assert parse_challenges('Basic realm="a \\"quoted\\" realm"')[0].params["realm"] == 'a "quoted" realm'
    assert parse_challenges("") == []


def test_scope_cover() -> None:
    assert covers({"repository:a:pull,push"}, {"repository:a:pull"})
    assert covers({"repository:a:pull", "repository:b:pull"}, {"repository:b:pull"})
    assert not covers({"repository:a:pull"}, {"repository:a:pull,push"})
    assert not covers({"repository:a:pull"}, {"repository:b:pull"})


def test_ranges() -> None:
    assert range_header([(0, 10), (100, 1)]) == "bytes=0-9,100-100"
    with pytest.raises(ValueError):
        range_header([(5, 0)])
    assert parse_content_range("bytes 10-19/100") == (10, 19, 100)
    assert parse_content_range("bytes 10-19/*") == (10, 19, None)
    for bad in ("bytes 10-9/100", "bytes 0-100/100", "10-19/100", None):
        with pytest.raises(ProtocolError):
            parse_content_range(bad)
    segs = [Segment(0, b"0123456789"), Segment(100, b"abcdef")]
    assert extract(segs, [(2, 3), (101, 2), (100, 6)]) == [b"234", b"bc", b"abcdef"]
    with pytest.raises(ProtocolError, match="does not cover"):
        extract(segs, [(8, 4)])


def test_multipart_parsing() -> None:
    data = bytes(range(256))
    parts = [(10, 19), (200, 209)]
    body = b""
    for s, e in parts:
        body += b"\r\n--BOUND\r\nContent-Type: application/octet-stream\r\n"
        body += f"Content-Range: bytes {s}-{e}/256\r\n\r\n".encode() + data[s : e + 1]
    full = body + b"\r\n--BOUND--\r\n"
    assert parse_multipart(full, "BOUND") == [Segment(10, data[10:20]), Segment(200, data[200:210])]
    with pytest.raises(IncompleteBody):
        parse_multipart(full[:-40], "BOUND")


def test_retry_after_and_budget() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 - 10) == pytest.approx(10, abs=1)
    assert parse_retry_after("soon") is None
    now = [0.0]
    slept = []
    a = Attempts(10, 5.0, 0.5, 2.0, clock=lambda: now[0], sleep=lambda d: (slept.append(d), now.__setitem__(0, now[0] + d)), rand=lambda: 1.0)
    while a.wait():
        pass
    assert slept == [0.5, 1.0, 2.0]  # the next 2.0 would pass the 5 s budget
    assert "budget" in a.gave_up_reason
    a = Attempts(10, 5.0, 0.5, 2.0, clock=lambda: 0.0, sleep=lambda d: None, rand=lambda: 0.0)
    assert a.next_delay() == 0.25  # jitter: half the backoff at least
    assert a.next_delay(retry_after=4.0) == 4.0
    assert a.next_delay(retry_after=9.0) is None  # Retry-After beyond the budget: give up now


def test_config_validation() -> None:
    with pytest.raises(InsecureRegistry, match="insecure_hosts"):
        RegistryConfig(mirrors={"docker.io": ["http://mirror.example:5000"]})
    config = RegistryConfig(
        insecure_hosts={"mirror.example:5000"},
        mirrors={"index.docker.io": ["http://mirror.example:5000", "https://m2.example", "m3.example:443"]},
    )
    eps = config.mirror_endpoints("docker.io")
    assert [(e.host, e.scheme) for e in eps] == [("mirror.example:5000", "http"), ("m2.example", "https"), ("m3.example:443", None)]
    assert config.plain_http_allowed("127.0.0.1:5000") and config.plain_http_allowed("localhost")
    assert config.plain_http_allowed("[::1]:80") and not config.plain_http_allowed("10.0.0.1:5000")
    assert RegistryConfig(insecure_hosts={"lan-reg"}).plain_http_allowed("lan-reg:5000")
    with pytest.raises(ConfigError):
        RegistryConfig(mirrors={"docker.io": ["ftp://m"]})
    with pytest.raises(ConfigError):
        RegistryConfig(retry_budget=0)


def test_plain_http_refused_for_remote_hosts() -> None:
    t = Transport(RegistryConfig())
    with pytest.raises(InsecureRegistry, match="registry.example") as e:
        t.send("GET", "http://registry.example/v2/")
    assert isinstance(e.value, RegistryError) and e.value.host == "registry.example"
    t.check_scheme("http://127.0.0.1:5000/v2/")
    t.check_scheme("https://registry.example/v2/")


def test_redact_drops_query_and_userinfo() -> None:
    assert redact("https://u:p@s3.example:9000/bucket/blob?X-Amz-Signature=abc") == "https://s3.example:9000/bucket/blob"


def test_error_message_names_everything() -> None:
    e = NotFound("cannot get blob", host="h:1", repo="r/x", target=f"blob {D}", status=404)
    assert str(e) == f"cannot get blob (host h:1, repo r/x, blob {D}, HTTP 404)"
