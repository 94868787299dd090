"""A file larger than 4 GiB: sizes and offsets past 32 bits, cheaply (every
4 MiB chunk of zeros is the same 4 KiB gzip member, repeated)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from lazyfs.stargz.gzipmember import gzip_member
from stargz.helpers import assemble

from .helpers import mounted

CHUNK = 4 << 20
ZERO_CHUNKS = 1025  # 4 GiB + 4 MiB of zeros
TAIL = b"the end, past four GiB\n" * 100
SIZE = ZERO_CHUNKS * CHUNK + len(TAIL)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _huge_layer(path: Path) -> Path:
    zeros = gzip_member(bytes(CHUNK), 9)
    zero_digest = _digest(bytes(CHUNK))
    entries = [{"name": "huge", "type": "reg", "size": SIZE, "mode": 0o644, "modtime": "2023-11-14T22:13:20Z",
                "offset": 0, "chunkOffset": 0, "chunkSize": CHUNK, "chunkDigest": zero_digest}]
    for i in range(1, ZERO_CHUNKS):
        entries.append({"name": "huge", "type": "chunk", "offset": i * len(zeros), "chunkOffset": i * CHUNK,
                        "chunkSize": CHUNK, "chunkDigest": zero_digest})
    entries.append({"name": "huge", "type": "chunk", "offset": ZERO_CHUNKS * len(zeros),
                    "chunkOffset": ZERO_CHUNKS * CHUNK, "chunkSize": len(TAIL), "chunkDigest": _digest(TAIL)})
    payload = zeros * ZERO_CHUNKS + gzip_member(TAIL, 9)
    path.write_bytes(assemble(payload, {"version": 1, "entries": entries}))
    return path


def test_file_over_4gib(tmp_path: Path) -> None:
    blob = _huge_layer(tmp_path / "huge.esgz")
    mnt = tmp_path / "mnt"
    with mounted(blob, mnt):
        assert os.stat(mnt / "huge").st_size == SIZE
        fd = os.open(mnt / "huge", os.O_RDONLY)
        try:
            assert os.pread(fd, 100, 1 << 32) == bytes(100)
            end = ZERO_CHUNKS * CHUNK
            assert os.pread(fd, 1000, end - 500) == bytes(500) + TAIL[:500]
            assert os.pread(fd, 1 << 20, end) == TAIL
            assert os.pread(fd, 10, SIZE) == b""
        finally:
            os.close(fd)
