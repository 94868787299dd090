"""A chunk that fails verification is an EIO, never wrong bytes; the mount
counts it and keeps serving everything else."""

from __future__ import annotations

import errno
import os
import tarfile
import zlib
from pathlib import Path

import pytest

from lazyfs import mount
from lazyfs.stargz.gzipmember import gzip_member
from lazyfs.stargz.reader import StargzReader
from lazyfs.stargz.source import FileSource
from lazyfs.stargz.writer import build
from stargz.helpers import CHUNK, _add, big_data

from .helpers import mounted

def _tampered_layer(tmp_path: Path) -> tuple[Path, bytes]:
    """A layer whose second chunk is a valid gzip member (right CRC, same
    length) of different bytes: only the chunk digest can tell."""
    data = big_data(3 * CHUNK)
    tar = tmp_path / "layer.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "file", data=data)
        _add(tf, "other", data=b"fine\n")
    blob = tmp_path / "layer.esgz"
    build(tar, blob, chunk_size=CHUNK, level=0)
    with FileSource(blob) as source:
        second = StargzReader.open(source).toc["file"].chunks[1]
    raw = bytearray(blob.read_bytes())
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    member_data = bytearray(inflater.decompress(bytes(raw[second.blob_offset : second.blob_end])))
    member_len = second.blob_end - second.blob_offset - len(inflater.unused_data)
    member_data[100] ^= 0xFF
    forged = gzip_member(bytes(member_data), 0)
    assert len(forged) == member_len
    raw[second.blob_offset : second.blob_offset + member_len] = forged
    blob.write_bytes(raw)
    return blob, data


def test_bad_chunk_is_eio_not_wrong_bytes(tmp_path: Path) -> None:
    blob, data = _tampered_layer(tmp_path)
    mnt = tmp_path / "mnt"
    with mounted(blob, mnt):
        fd = os.open(mnt / "file", os.O_RDONLY)
        try:
            assert os.pread(fd, CHUNK, 0) == data[:CHUNK]
            for _ in range(2):  # and again: nothing bad was kept
                with pytest.raises(OSError) as exc:
                    os.pread(fd, 4096, CHUNK + 4096)
                assert exc.value.errno == errno.EIO
            assert os.pread(fd, CHUNK, 2 * CHUNK) == data[2 * CHUNK :]
        finally:
            os.close(fd)
        assert (mnt / "other").read_bytes() == b"fine\n"
        status = mount.status(mnt)
        assert status["read_errors"] >= 2 and status["fetch_errors"] >= 2
        assert "file" in status["last_error"] and "the TOC says" in status["last_error"]


def test_wrong_toc_digest_does_not_mount(crfs_blob, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with pytest.raises(mount.MountError, match="TOC"):
        with mounted(crfs_blob[0], mnt, toc_digest="sha256:" + "0" * 64):
            pass
    assert not mount.is_mounted(mnt)
