"""Opening a registry layer costs one request: a suffix range brings the
footer, the TOC and the blob's size together (no HEAD, no separate footer
and TOC requests); a TOC longer than the tail costs one more."""

from __future__ import annotations

from lazyfs.remote_source import RegistryBlobSource
from lazyfs.stargz import StargzReader

from .conftest import Remote


def _open(remote: Remote, tail: int) -> StargzReader:
    source = RegistryBlobSource(remote.repo, remote.layer.digest, tail=tail)
    assert source.size == remote.layer.build.size
    return StargzReader.open(source, toc_digest=remote.layer.build.toc_digest)


def test_one_suffix_request_opens_a_layer(remote: Remote) -> None:
    remote.proxy.clear()
    reader = _open(remote, 512 << 10)
    blob = [s for s in remote.proxy.requests(r"/blobs/")]
    assert [(s.method, s.headers.get("Range")) for s in blob] == [("GET", f"bytes=-{512 << 10}")]
    assert reader.toc.digest == remote.layer.build.toc_digest
    name, data = next((n, d) for n, d in remote.layer.files.items() if len(d) > 1000)
    assert reader.read(name) == data


def test_a_toc_longer_than_the_tail_is_completed_with_one_range(remote: Remote) -> None:
    remote.proxy.clear()
    reader = _open(remote, 200)  # the footer and a piece of the TOC
    blob = [s for s in remote.proxy.requests(r"/blobs/")]
    assert [s.method for s in blob] == ["GET", "GET"]
    assert blob[0].headers["Range"] == "bytes=-200"
    assert reader.toc.digest == remote.layer.build.toc_digest


def test_a_missing_blob_is_not_found(remote: Remote) -> None:
    import pytest

    from lazyfs.registry import NotFound

    with pytest.raises(NotFound):
        RegistryBlobSource(remote.repo, "sha256:" + "0" * 64, tail=1024)


def test_file_chunks_in_the_opening_read_are_kept_not_fetched_again(remote: Remote, tmp_path) -> None:  # noqa: ANN001
    """A layer smaller than the tail arrives whole with the opening read:
    its chunks are verified into the cache and no file read asks again."""
    from lazyfs.cache import ChunkCache
    from lazyfs.fetcher import RemoteChunks
    from lazyfs.prefetch import layer_chunks

    remote.proxy.clear()
    source = RegistryBlobSource(remote.repo, remote.layer.digest, tail=remote.layer.build.size + 1000)
    reader = StargzReader.open(source, toc_digest=remote.layer.build.toc_digest)
    chunks = layer_chunks(reader.toc)
    with RemoteChunks(source, remote.layer.digest, ChunkCache(tmp_path), layout=chunks) as store:
        assert store.keep(*source.take_tail()) == len(chunks)
        for name, data in remote.layer.files.items():
            assert b"".join(store.get_many(reader.toc.chunks_for_range(name, 0, len(data)))) == data
    assert len(remote.blob_gets()) == 1
