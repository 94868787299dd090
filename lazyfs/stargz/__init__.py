"""The stargz / eStargz layer format: read, verify and write.

A stargz blob is a gzipped tar in which every chunk of file data starts a
new gzip member, followed by a table of contents (TOC, ``stargz.index.json``)
and a footer giving the TOC's offset; so a reader can fetch the footer and
the TOC, then any file's bytes with ranged reads. eStargz adds chunk digests
(and a TOC digest in the image manifest) for verification, and landmark
files that mark which files to prefetch.

Modules: ``footer`` (the last 51/47 bytes), ``toc`` (entries, validation,
chunk lookup), ``reader`` (opening a blob over a ``source.BlobSource``,
verified chunk reads), ``verify`` (whole-layer checks), ``writer`` (tar →
eStargz), ``extract`` (to a directory), ``errors`` (what can go wrong).
"""

from .errors import StargzError
from .footer import Footer
from .limits import Limits
from .reader import StargzReader, decode_chunk
from .source import BlobSource, BytesSource, FileSource
from .toc import ChunkRef, EntryType, Toc, TocEntry


def __getattr__(name: str) -> object:
    # the writer (and gzip with it) is loaded on first use: a layer mount
    # process never writes, and every module it imports costs it memory
    if name in ("BuildResult", "build"):
        from . import writer  # noqa: PLC0415

        return getattr(writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BlobSource",
    "BuildResult",
    "BytesSource",
    "ChunkRef",
    "EntryType",
    "FileSource",
    "Footer",
    "Limits",
    "StargzError",
    "StargzReader",
    "Toc",
    "TocEntry",
    "build",
    "decode_chunk",
]
