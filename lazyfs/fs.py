"""The read-only FUSE filesystem of one layer (pyfuse3, low-level inode API).

Metadata comes from the ``LayerTree`` built from the TOC at mount time and
is answered without blocking; file bytes come from a ``ChunkStore`` through
the ``ChunkMemo`` (the store's blocking calls run in a worker thread). A
layer never changes, so entries, attributes and page cache are kept by the
kernel for as long as it likes. A chunk that cannot be had or fails its
digest makes the read fail with EIO: never wrong bytes.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyfuse3
import trio

from .chunkmemo import ChunkMemo
from .chunks import ChunkStore
from .dependencies import HEAD_BYTES, DependencyPrefetcher
from .file_replies import FileReplies
from .file_replies import enabled_for as file_replies_enabled_for
from .stargz.toc import ChunkRef, Toc
from .tree import OPAQUE_XATTRS, ROOT_INODE, LayerTree, Node

log = logging.getLogger(__name__)

FOREVER = 365 * 24 * 3600.0  # seconds: the layer never changes under the kernel
BLOCK = 4096
FSNAME = "crfs-lazyfs"
READAHEAD_CHUNKS = 1  # chunks of a file loaded ahead of a read (0: no read-ahead at all)
# ... and how far ahead chunks already on local disk (the chunk cache) are
# loaded: no request, only a disk read each (see ``ChunkMemo.read_ahead``)
READAHEAD_LOCAL_CHUNKS = 3
# The kernel's read-ahead for a FUSE mount is 128 KiB (the connection's
# backing_dev_info default, which the daemon may only lower at INIT), so a
# sequential reader costs one READ per 128 KiB, few of them in flight: about
# 170 us of round trip per 128 KiB here, ~700 MiB/s at best. Root may raise
# it afterwards (/sys/class/bdi/<dev>/read_ahead_kb); with 1 MiB a READ
# carries up to 1 MiB (libfuse asks for max_pages = 256). It also sets the
# mmap fault-around of the mount's files: 1 MiB around a fault. While chunks
# are still remote, that would make every miss read (and fetch) more, and
# an access profile recorded by crfs optimize wider: so it is raised only
# once the whole layer is local (a local blob at once; a remote one when
# the background fetch or the reads have brought every chunk).
KERNEL_READAHEAD_KB = 1024
LOCAL_CHECK_FIRST, LOCAL_CHECK_MAX = 1.0, 10.0  # s between checks, doubling
# pyfuse3 built with third_party/pyfuse3's patch hands ``read``/``readdir``
# the inode when the kernel sends file handle 0, which lets us run without
# OPEN/OPENDIR (see ``LayerFS.no_open``); a stock pyfuse3 cannot.
# The kernel side (opendir answering ENOSYS, FOPEN_KEEP_CACHE|FOPEN_CACHE_DIR
# by default for what it opens itself) exists since Linux 5.1.
def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        found = tuple(int(part) for part in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return found >= (major, minor)


NO_OPEN_SUPPORTED = bool(getattr(pyfuse3, "ZERO_FH_IS_INODE", False)) and _kernel_at_least(5, 1)


@dataclass
class FsStats:
    opens: int = 0  # OPEN + OPENDIR requests that reached us (no-open mode: one of each, ever)
    readdirs: int = 0  # READDIR(PLUS) requests
    reads: int = 0
    bytes_read: int = 0
    read_errors: int = 0  # reads answered with EIO
    getxattrs: int = 0  # GETXATTR requests (a layer without xattrs: one, ever)
    kernel_readahead_kb: int = 0  # the kernel read-ahead raised to, once the layer is fully local (0: not raised)
    last_error: str = ""


def mount_options(*, allow_other: bool | None = None, fsname: str = FSNAME) -> set[str]:
    """FUSE mount options for a layer; ``allow_other`` defaults to "when
    root", so that containerd's and fuse-overlayfs's processes can read it."""
    if allow_other is None:
        allow_other = os.geteuid() == 0
    options = set(pyfuse3.default_options) | {"ro", "default_permissions", f"fsname={fsname}", "subtype=crfs"}
    if allow_other:
        options.add("allow_other")
    return options


class LayerFS(pyfuse3.Operations):
    """pyfuse3 operations over one layer's ``Toc`` and ``ChunkStore``.

    No-open mode (``no_open``, the default when pyfuse3 supports it): ``open``
    and ``opendir`` answer ENOSYS, after which the kernel opens files and
    directories of this mount on its own: no OPEN/OPENDIR/RELEASE/RELEASEDIR
    requests, file pages kept (FOPEN_KEEP_CACHE) and directory listings
    cached in the kernel (FOPEN_CACHE_DIR), so a warm ``find`` or a warm
    import never reaches this process. READ and READDIR then carry file
    handle 0, and the patched pyfuse3 passes the inode instead (inode numbers
    start at 1, so 0 is never one of ours). Safe for a layer because it never
    changes, and the mount is read-only: the kernel refuses writes and
    O_TRUNC itself (EROFS) before any open would reach us.
    """

    enable_writeback_cache = False
    enable_acl = False
    # where it is mounted (set before ``pyfuse3.init``): lets ``init`` raise
    # the kernel's read-ahead for the mount (see KERNEL_READAHEAD_KB)
    mountpoint: str | None = None
    kernel_readahead_kb: int = KERNEL_READAHEAD_KB
    fully_local: Callable[[], bool] | None = None  # set with mountpoint: whether no read can fetch any more
    local_at_mount: bool = False  # what fully_local said just before mounting
    _raise_at_lookup: bool = False

    def __init__(
        self, toc: Toc, store: ChunkStore, *, memo: ChunkMemo | None = None,
        opaque_xattrs: tuple[str, ...] = OPAQUE_XATTRS, readahead_chunks: int = READAHEAD_CHUNKS,
        no_open: bool | None = None, record_access: bool = False,
    ) -> None:
        super().__init__()
        # files read, in first-read order (crfs optimize's profile), each with
        # the byte ranges read: sorted, disjoint, non-adjacent [start, end)
        # pairs (see ``add_range``); an insertion-ordered dict
        self.accessed: dict[str, list[list[int]]] | None = {} if record_access else None
        if no_open is None:
            no_open = NO_OPEN_SUPPORTED
        elif no_open and not NO_OPEN_SUPPORTED:
            raise ValueError("no_open needs pyfuse3 with third_party/pyfuse3's patch (pyfuse3.ZERO_FH_IS_INODE)")
        self.no_open = self.zero_fh_is_inode = no_open  # pyfuse3.init reads zero_fh_is_inode
        self.readahead_chunks = readahead_chunks
        self.tree = LayerTree(toc, opaque_xattrs=opaque_xattrs)
        self.has_xattrs = self.tree.has_xattrs
        self.memo = memo if memo is not None else ChunkMemo(store)
        # reads inside one local chunk answered from its cache file (lazyfs.file_replies)
        self.file_replies: FileReplies | None = None
        if file_replies_enabled_for(store):
            self.file_replies = FileReplies(store.open_local)  # type: ignore[attr-defined]
            self.memo.advise_local = store.advise_local  # type: ignore[attr-defined]
        # told of every read at offset 0 (lazyfs.dependencies; set by whoever serves a remote layer)
        self.dependencies: DependencyPrefetcher | None = None
        self.stats = FsStats()
        self._negative = pyfuse3.EntryAttributes()
        self._negative.st_ino = 0
        self._negative.entry_timeout = FOREVER

    def init(self) -> None:
        """pyfuse3 calls this while answering the kernel's INIT, which would
        cap a read-ahead set now at 128 KiB again. A layer local from the
        start is raised at its first LOOKUP or GETATTR (the kernel has taken the INIT
        answer by then, and no file of the mount is open yet: a file keeps
        the read-ahead it was opened with); another one by a task, once it
        is local."""
        if self.mountpoint is None or not self.kernel_readahead_kb or self.fully_local is None:
            return
        if self.local_at_mount:
            self._raise_at_lookup = True
            return
        try:
            trio.lowlevel.spawn_system_task(self._raise_readahead_once_local, name="lazyfs-readahead-kb")
        except RuntimeError:  # not in trio (a test calling init): nothing to do
            pass

    def _raise_readahead(self) -> None:
        assert self.mountpoint is not None
        self._raise_at_lookup = False
        if raise_kernel_readahead(self.mountpoint, self.kernel_readahead_kb):
            self.stats.kernel_readahead_kb = self.kernel_readahead_kb

    async def _raise_readahead_once_local(self) -> None:
        assert self.fully_local is not None
        delay = LOCAL_CHECK_FIRST
        try:
            while not await trio.to_thread.run_sync(self.fully_local, abandon_on_cancel=True):
                await trio.sleep(delay)
                delay = min(2 * delay, LOCAL_CHECK_MAX)
            self._raise_readahead()
        except Exception as exc:  # noqa: BLE001 - a system task must not raise: it would end the mount
            log.debug("kernel read-ahead left as it is: %r", exc)

    # --- metadata ----------------------------------------------------------

    def attributes(self, ino: int) -> pyfuse3.EntryAttributes:
        """The (never changing) attributes of an inode, built on each call:
        the kernel keeps them forever, so few calls come per inode, and not
        holding ~11k ``EntryAttributes`` objects saves ~2.8 MB per 10k-entry layer."""
        return _attributes(self._node(ino))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if self._raise_at_lookup:
            self._raise_readahead()
        return self.attributes(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if self._raise_at_lookup:
            self._raise_readahead()
        parent = self._node(parent_inode)
        if name == b".":
            return self.attributes(parent.ino)
        if name == b"..":
            return self.attributes(parent.parent)
        child = self.tree.lookup(parent.ino, name) if parent.is_dir else None
        if child is None:
            return self._negative  # cached: the layer never gains entries
        return self.attributes(child.ino)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if not stat.S_ISLNK(node.mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.link_target

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self.stats.opens += 1
        if self.no_open:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # the kernel opens (and caches) directories itself from now on
        if not self._node(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self.stats.readdirs += 1
        node = self._node(fh)
        for index, (name, ino) in enumerate(node.listing_from(start_id), start_id):
            if not pyfuse3.readdir_reply(token, name, self.attributes(ino), index + 1):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self.stats.getxattrs += 1
        if not self.has_xattrs:
            # A layer without a single xattr (opaque markers included) says
            # it has no xattr support: the kernel then answers every later
            # getxattr itself (EOPNOTSUPP). fuse-overlayfs asks two "origin"
            # xattrs of every file it looks up in a new overlay mount: ~3,900
            # round trips into this process for one python3 start, ~80 ms.
            raise pyfuse3.FUSEError(errno.ENOSYS)
        value = self._node(inode).xattrs.get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return list(self._node(inode).xattrs)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = BLOCK
        data.f_blocks = -(-self.tree.total_size // BLOCK)
        data.f_bfree = data.f_bavail = 0
        data.f_files = len(self.tree)
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    # --- file data -----------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self.stats.opens += 1
        if self.no_open:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # the kernel opens files itself from now on, keeping their pages
        node = self._node(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        if not node.is_reg:
            raise pyfuse3.FUSEError(errno.EISDIR if node.is_dir else errno.EINVAL)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview | pyfuse3.FileRange:
        """The bytes at ``[off, off + size)`` of a file. A read within one
        chunk (nearly all of them) is a ``memoryview`` of the memo's bytes
        (``ChunkMemo.read``): pyfuse3 takes any contiguous buffer, and the
        view stays valid while the reply is written; or, for a chunk in the
        local cache, a ``FileRange`` of its file (``lazyfs.file_replies``)."""
        node = self._node(fh)
        entry = node.entry
        end = min(off + size, entry.size)
        if self.accessed is not None:
            add_range(self.accessed.setdefault(entry.name, []), off, end)
        chunks = self.tree.toc.chunks_for_range(entry.name, off, size)
        if not chunks:
            return b""
        head_wanted = off == 0 and self.dependencies is not None  # the dependency reader needs the head's bytes
        result: bytes | memoryview | pyfuse3.FileRange | None = None
        if self.file_replies is not None and len(chunks) == 1 and not self.memo.holds(chunks[0]) and not head_wanted:
            result = await self.file_replies.reply(chunks[0], off, end)
        if result is None:
            try:
                result = await self.memo.read(chunks, off, end)
            except Exception as exc:  # noqa: BLE001 - ChunkUnavailable, or a store bug: neither may kill the mount
                self._failed(entry.name, off, size, exc)
                raise pyfuse3.FUSEError(errno.EIO) from None
        if self.readahead_chunks:
            self._read_ahead(entry.chunks, chunks[-1])
        if head_wanted:  # then the bytes came from the memo
            self.dependencies.file_read(node, bytes(result[:HEAD_BYTES]))  # type: ignore[union-attr,index]
        self.stats.reads += 1
        self.stats.bytes_read += end - off
        return result

    async def release(self, fh: int) -> None:
        return None

    # --- helpers ---------------------------------------------------------------

    def _node(self, ino: int) -> Node:
        node = self.tree.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _read_ahead(self, all_chunks: Sequence[ChunkRef], last: ChunkRef) -> None:
        """Start loading the chunks of the same file after ``last`` (the
        memo skips those held or being loaded); never fails the read."""
        i = bisect.bisect_right(all_chunks, last.file_offset, key=_file_offset)
        if i < len(all_chunks):
            depth = max(self.readahead_chunks, READAHEAD_LOCAL_CHUNKS)
            try:
                self.memo.read_ahead(all_chunks[i : i + depth], remote=self.readahead_chunks)
            except Exception as exc:  # noqa: BLE001 - read-ahead is only a hint
                log.debug("read-ahead after %d failed to start: %s", last.file_offset, exc)

    def _failed(self, name: str, off: int, size: int, exc: BaseException) -> None:
        self.stats.read_errors += 1
        self.stats.last_error = f"{name}: {exc}"
        log.error("read %r [%d, +%d) failed: %s", name, off, size, exc)


def raise_kernel_readahead(mountpoint: str, kb: int) -> bool:
    """Raise the read-ahead of the FUSE mount at ``mountpoint`` to ``kb``
    KiB (never lowers it); False when it cannot (not root, no sysfs). Only
    /proc and /sys are read: touching the mount itself from its own serving
    thread would wait for itself."""
    mountpoint = os.path.abspath(mountpoint)
    path = os.path.join(os.path.realpath(os.path.dirname(mountpoint)), os.path.basename(mountpoint))
    try:
        devs = []
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                mount_part, _, fs_part = line.partition(" - ")
                fields = mount_part.split()  # id, parent, major:minor, root, mount point, ...
                if len(fields) > 4 and _unescape(fields[4]) == path and fs_part.startswith("fuse"):
                    devs.append(fields[2])
        if not devs:
            return False
        knob = f"/sys/class/bdi/{devs[-1]}/read_ahead_kb"  # the last: the one on top
        with open(knob, "r+") as f:
            if int(f.read().strip() or 0) >= kb:
                return True
            f.seek(0)
            f.write(f"{kb}\n")
        return True
    except (OSError, ValueError) as exc:
        log.debug("cannot raise the kernel read-ahead of %s: %s", mountpoint, exc)
        return False


def _unescape(field: str) -> str:
    """A /proc/self/mountinfo path: space, tab, newline and backslash are octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def add_range(ranges: list[list[int]], start: int, end: int) -> None:
    """Adds ``[start, end)`` to sorted, disjoint ``[start, end]`` pairs,
    merging it with those it overlaps or touches; an empty range is ignored."""
    if start >= end:
        return
    i = bisect.bisect_left(ranges, start, key=_range_end)  # first one ending at or after start
    j = i
    while j < len(ranges) and ranges[j][0] <= end:
        start, end = min(start, ranges[j][0]), max(end, ranges[j][1])
        j += 1
    ranges[i:j] = [[start, end]]


def _range_end(pair: list[int]) -> int:
    return pair[1]


def _file_offset(chunk: ChunkRef) -> int:
    return chunk.file_offset


def _attributes(node: Node) -> pyfuse3.EntryAttributes:
    st = node.stat()
    attrs = pyfuse3.EntryAttributes()
    attrs.st_ino = node.ino
    attrs.generation = 0
    attrs.st_mode = st.mode
    attrs.st_nlink = st.nlink
    attrs.st_uid = st.uid
    attrs.st_gid = st.gid
    attrs.st_rdev = st.rdev
    attrs.st_size = BLOCK if stat.S_ISDIR(st.mode) else st.size
    attrs.st_blksize = BLOCK
    attrs.st_blocks = -(-attrs.st_size // 512)
    ns = int(round(st.mtime * 1e9))
    attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = ns
    attrs.entry_timeout = attrs.attr_timeout = FOREVER
    return attrs


__all__ = ["FOREVER", "FSNAME", "FsStats", "LayerFS", "ROOT_INODE", "mount_options"]
