"""Fetch what a starting program will load next, before it asks.

A container start on lazy layers without a prefetch profile is a chain of
cold misses: the executable, then ``ld.so``, ``ld.so.cache``, each library
in turn, every one opened only after the one before was read, each costing
a round trip to the registry. But the executable's first bytes already name
the whole chain (``lazyfs.elf``). So when a read brings the start of an ELF
file, its interpreter and libraries are looked up in this layer and fetched
at once (and in turn examined), and the ones this layer does not have are
asked of its *peers*: the other layers of the overlays it is part of, which
the snapshotter names (``lazyfs.control`` "peers"); they look for them in
the same way. A peer's request is not passed on (every peer got it).

Everything here is a hint: a failure only costs the fetch it would have
saved, and is counted, never raised into a read.
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from .chunkmemo import ChunkMemo
from .chunks import ChunkUnavailable
from .elf import ElfDependencies, looks_like_elf, read_dependencies
from .stargz.toc import ChunkRef, TocEntry
from .tree import ROOT_INODE, LayerTree, Node

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 8 << 20  # of each wanted file, its first bytes are fetched
MAX_FILES_PER_WANT = 64
MAX_WANT_BYTES = 64 << 20  # uncompressed bytes one request may make this layer fetch
MAX_FETCHED = 4096  # files fetched over the process's life
MAX_EXAMINED = 1024  # ELF files examined over the process's life
MAX_SYMLINK_HOPS = 40
MAX_WANT_NAMES = 128
GLIBC_LOADER = "ld-linux"
LD_SO_CACHE = "/etc/ld.so.cache"  # glibc's ld.so reads it before any library
HEAD_BYTES = 256  # of a file's first read, what ``file_read`` wants: enough for a #! line
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Wants:
    """Files a program is about to open: absolute ``paths``, and ``libraries``
    searched in ``library_dirs`` then the standard directories."""

    paths: tuple[str, ...] = ()
    libraries: tuple[str, ...] = ()
    library_dirs: tuple[str, ...] = ()  # absolute; $ORIGIN already expanded
    multiarch: str = ""  # e.g. x86_64-linux-gnu: which standard directories
    is_64: bool = True

    def __bool__(self) -> bool:
        return bool(self.paths or self.libraries)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Wants:
        """From a peer's request; raises ValueError when malformed."""

        def names(key: str) -> tuple[str, ...]:
            value = data.get(key, [])
            if not isinstance(value, list) or len(value) > MAX_WANT_NAMES or not all(
                isinstance(v, str) and 0 < len(v) <= 4096 and "\0" not in v for v in value
            ):
                raise ValueError(f"wants.{key}: at most {MAX_WANT_NAMES} non-empty strings")
            return tuple(value)

        multiarch = data.get("multiarch", "")
        if not isinstance(multiarch, str) or "/" in multiarch or len(multiarch) > 64:
            raise ValueError("wants.multiarch: a triplet such as x86_64-linux-gnu")
        return cls(names("paths"), names("libraries"), names("library_dirs"), multiarch, bool(data.get("is_64", True)))


@dataclass
class DependencyStats:
    elf_examined: int = 0  # ELF files whose headers were read
    wants_received: int = 0  # requests from peers
    wants_sent: int = 0  # requests passed to the peers (each goes to every peer)
    files_prefetched: int = 0  # wanted files found in this layer and fetched
    bytes_prefetched: int = 0  # their chunks' uncompressed bytes
    errors: int = 0
    last_error: str = ""
    found: list[str] = field(default_factory=list)  # the first files found, for diagnosis


def standard_library_dirs(multiarch: str, is_64: bool) -> list[str]:
    """Where glibc's and musl's loaders look when nothing else says (Debian's
    multiarch directories first)."""
    dirs = [f"/lib/{multiarch}", f"/usr/lib/{multiarch}"] if multiarch else []
    if is_64:
        dirs += ["/lib64", "/usr/lib64"]
    return dirs + ["/lib", "/usr/lib", "/usr/local/lib"]


class DependencyPrefetcher:
    """Runs in the filesystem's trio loop; ``file_read`` and ``want`` never
    block: the work goes to system tasks."""

    def __init__(
        self, tree: LayerTree, memo: ChunkMemo, *,
        tell_peers: Callable[[Wants], None] | None = None, max_file_bytes: int = MAX_FILE_BYTES,
    ) -> None:
        self.tree = tree
        self.memo = memo
        self.tell_peers = tell_peers
        self.max_file_bytes = max_file_bytes
        self.stats = DependencyStats()
        self._examined: set[int] = set()  # inodes
        self._fetched: set[int] = set()  # inodes of wanted files already fetched
        self._asked: set[tuple[str, str]] = set()  # ("path" | "library", name) asked of the peers already

    # --- entry points (trio thread) -----------------------------------------

    def file_read(self, node: Node, head: bytes) -> None:
        """A read at offset 0 of ``node`` brought ``head`` (its first
        ``HEAD_BYTES`` at most): an ELF file not seen yet is examined in the
        background, a script's interpreter fetched."""
        if node.ino in self._examined or len(self._examined) >= MAX_EXAMINED:
            return
        if looks_like_elf(head):
            self._examined.add(node.ino)
            self._spawn(self._examine, node)
        elif head.startswith(b"#!"):
            self._examined.add(node.ino)
            wants = script_wants(head)
            if wants:
                self._spawn(self._fetch_wanted, wants, True)

    def want(self, wants: Wants) -> None:
        """A peer's request: fetch what this layer has of it (not passed on)."""
        self.stats.wants_received += 1
        self._spawn(self._fetch_wanted, wants, False)

    def status(self) -> dict[str, Any]:
        return asdict(self.stats)

    # --- the work ----------------------------------------------------------------

    async def _examine(self, node: Node) -> None:
        entry = node.entry
        path = "/" + entry.name

        def early(guess: ElfDependencies) -> None:  # fetched while the rest of the headers come
            wants = _wants_of(guess, path)
            if wants:
                self._spawn(self._fetch_wanted, wants, True)

        try:
            deps = await read_dependencies(self._reader(entry), entry.size, early=early)
        except ChunkUnavailable as exc:
            self._failed(f"{entry.name}: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - a hint must never take the mount down
            self._failed(f"{entry.name}: {exc!r}")
            return
        self.stats.elf_examined += 1
        if deps is not None:
            wants = _wants_of(deps, path)
            if wants:
                await self._fetch_wanted(wants, True)

    async def _fetch_wanted(self, wants: Wants, ours: bool) -> None:
        """Fetch the wanted files this layer has; with ``ours`` (the wants
        came from a file of this layer) ask the peers for the rest."""
        found: list[Node] = []
        missing_paths = [p for p in wants.paths if not self._add(found, self.find(p))]
        dirs = [*wants.library_dirs, *standard_library_dirs(wants.multiarch, wants.is_64)]
        missing_libraries = [name for name in wants.libraries if "/" not in name and not self._add(found, self._find_library(name, dirs))]
        if ours and self.tell_peers is not None:
            # what this layer lacks, and was not asked of the peers before
            rest = Wants(
                tuple(p for p in missing_paths if ("path", p) not in self._asked),
                tuple(n for n in missing_libraries if ("library", n) not in self._asked),
                wants.library_dirs, wants.multiarch, wants.is_64,
            )
            if rest:
                self._asked.update(("path", p) for p in rest.paths)
                self._asked.update(("library", n) for n in rest.libraries)
                try:
                    self.tell_peers(rest)
                    self.stats.wants_sent += 1
                except Exception as exc:  # noqa: BLE001
                    self._failed(f"asking peers: {exc!r}")
        fresh = []
        budget = MAX_WANT_BYTES
        for node in found[:MAX_FILES_PER_WANT]:
            size = sum(c.size for c in self._leading_chunks(node.entry))
            if node.ino in self._fetched or size > budget or len(self._fetched) + len(fresh) >= MAX_FETCHED:
                continue
            budget -= size
            fresh.append(node)
        if not fresh:
            return
        self._fetched.update(n.ino for n in fresh)
        if len(self.stats.found) < 32:
            self.stats.found += [n.entry.name for n in fresh][: 32 - len(self.stats.found)]
        # the first chunks alone first (they hold what an ELF file names,
        # asked for next), then the rest of large files beside those requests
        firsts = [n.entry.chunks[0] for n in fresh if n.entry.chunks]
        rest = [c for n in fresh for c in self._leading_chunks(n.entry)[1:]]
        if not await self._load(firsts, len(fresh)):
            return
        if rest:
            self._spawn(self._load, rest, 0)
        for node in fresh:  # a library's own dependencies (its first chunk is held now)
            head = await self._head(node.entry)
            if head is not None:
                self.file_read(node, head)

    async def _load(self, chunks: list[ChunkRef], files: int) -> bool:
        try:
            await self.memo.get_many(chunks)
        except ChunkUnavailable as exc:
            self._failed(f"prefetching {len(chunks)} chunks: {exc}")
            return False
        self.stats.files_prefetched += files
        self.stats.bytes_prefetched += sum(c.size for c in chunks)
        return True

    # --- looking things up in this layer ------------------------------------------

    def find(self, path: str) -> Node | None:
        """The regular file ``path`` names in this layer, following symlinks
        that stay in it; None when this layer does not have it all."""
        parts = [p for p in path.split("/") if p and p != "."]
        node = self.tree.get(ROOT_INODE)
        hops = 0
        while parts and node is not None:
            name = parts.pop(0)
            if name == "..":
                node = self.tree.get(node.parent)
                continue
            child = self.tree.lookup(node.ino, os.fsencode(name)) if node.is_dir else None
            if child is None:
                return None
            if stat.S_ISLNK(child.mode):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    return None
                target = os.fsdecode(child.link_target)
                if target.startswith("/"):
                    node = self.tree.get(ROOT_INODE)
                parts[:0] = [p for p in target.split("/") if p and p != "."]
                continue
            node = child
        return node if node is not None and node.is_reg else None

    def _find_library(self, name: str, dirs: Iterable[str]) -> Node | None:
        for directory in dirs:
            node = self.find(posixpath.join(directory, name))
            if node is not None:
                return node
        return None

    @staticmethod
    def _add(found: list[Node], node: Node | None) -> bool:
        if node is None:
            return False
        if all(n.ino != node.ino for n in found):
            found.append(node)
        return True

    def _leading_chunks(self, entry: TocEntry) -> list[ChunkRef]:
        return [c for c in entry.chunks if c.file_offset < self.max_file_bytes]

    def _reader(self, entry: TocEntry) -> Callable[[int, int], Any]:
        async def read(offset: int, length: int) -> bytes:
            chunks = self.tree.toc.chunks_for_range(entry.name, offset, length)
            return bytes(await self.memo.read(chunks, offset, min(offset + length, entry.size)))

        return read

    async def _head(self, entry: TocEntry) -> bytes | None:
        try:
            return await self._reader(entry)(0, HEAD_BYTES)
        except Exception:  # noqa: BLE001 - evicted and failing to fetch: skip it
            return None

    def _spawn(self, work: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run ``work`` in the background; whatever it raises is counted
        (an exception in a system task would end the whole mount)."""

        async def guarded() -> None:
            try:
                await work(*args)
            except Exception as exc:  # noqa: BLE001 - a hint must never take the mount down
                self._failed(f"{getattr(work, '__name__', work)}: {exc!r}")

        trio.lowlevel.spawn_system_task(guarded, name="lazyfs-dependencies")

    def _failed(self, what: str) -> None:
        self.stats.errors += 1
        self.stats.last_error = what
        log.info("dependency prefetch: %s", what)


def script_wants(head: bytes) -> Wants:
    """The interpreter a ``#!`` line names (and, for ``/usr/bin/env NAME``,
    NAME where the default PATH would find it)."""
    line = head[2:].split(b"\n", 1)[0]
    if len(line) >= HEAD_BYTES - 2 and b"\n" not in head:
        return Wants()  # cut off: not a line we can trust
    words = os.fsdecode(line).split()
    if not words or not words[0].startswith("/"):
        return Wants()
    paths = [words[0]]
    if posixpath.basename(words[0]) == "env":
        program = next((w for w in words[1:] if not w.startswith("-") and "=" not in w), "")
        if program and "/" not in program:
            paths += [posixpath.join(d, program) for d in DEFAULT_PATH.split(":")]
    return Wants(tuple(paths))


def _wants_of(deps: ElfDependencies, path: str) -> Wants:
    """What loading the ELF file at ``path`` will open."""
    origin = posixpath.dirname(path)
    dirs = []
    for directory in deps.search_path:
        directory = directory.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)
        if directory.startswith("/") and "$" not in directory:
            dirs.append(posixpath.normpath(directory))
    paths = []
    if deps.interpreter.startswith("/"):
        paths.append(deps.interpreter)
        if GLIBC_LOADER in posixpath.basename(deps.interpreter):
            paths.append(LD_SO_CACHE)
    return Wants(tuple(paths), deps.needed, tuple(dirs), deps.multiarch, deps.is_64)


__all__ = ["HEAD_BYTES", "DependencyPrefetcher", "DependencyStats", "Wants", "script_wants", "standard_library_dirs"]
