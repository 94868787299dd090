"""How much a blob may make us hold in memory at once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Caps that turn a hostile or absurd blob into ``LimitExceeded`` instead of
    an out-of-memory kill. The defaults are far above what real layers use
    (a 100 000-file layer has a TOC of about 30 MiB; chunks are 4 MiB)."""

    max_toc_size: int = 128 << 20  # TOC JSON, and its compressed form
    max_chunk_size: int = 64 << 20  # one decompressed chunk
