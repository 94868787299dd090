"""Extracting a layer to a directory, as ``tar -xp --numeric-owner --xattrs`` would.

Safe by construction: the TOC was validated (no absolute or ``..`` names, no
entry below a non-directory), the destination must be empty, files are
created with ``O_EXCL | O_NOFOLLOW``, and metadata calls never follow
symlinks — so nothing the layer holds can make us write outside ``dest``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from .reader import StargzReader
from .toc import TOC_TAR_NAME, EntryType, TocEntry


def extract(reader: StargzReader, dest: str | os.PathLike[str]) -> list[str]:
    """Write every entry of the layer (and, as tar would, the TOC member
    ``stargz.index.json``) under ``dest``. Returns the problems that tar
    would only warn about (e.g. an xattr the filesystem refuses)."""
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty")
    problems: list[str] = []
    toc = reader.toc
    entries = [e for e in toc if e.name]
    dirs = sorted((e for e in entries if e.type is EntryType.DIR), key=lambda e: e.name)
    for entry in dirs:
        (root / entry.name).mkdir(mode=0o700)
    later = []
    for entry in entries:
        path = root / entry.name
        if entry.type is EntryType.REG:
            _write_file(path, reader.iter_file(entry.name))
        elif entry.type is EntryType.SYMLINK:
            os.symlink(entry.link_name, path)
        elif entry.type in (EntryType.CHAR, EntryType.BLOCK):
            kind = stat.S_IFCHR if entry.type is EntryType.CHAR else stat.S_IFBLK
            os.mknod(path, kind | 0o600, os.makedev(entry.dev_major, entry.dev_minor))
        elif entry.type is EntryType.FIFO:
            os.mkfifo(path, 0o600)
        else:
            later.append(entry)  # directories: metadata last; hardlinks: once targets exist
            continue
        _set_metadata(path, entry, problems)
    for entry in later:
        if entry.type is EntryType.HARDLINK:
            os.link(root / entry.link_name, root / entry.name, follow_symlinks=False)
    if toc.get(TOC_TAR_NAME) is None:
        member = reader.toc_member
        path = root / TOC_TAR_NAME
        _write_file(path, [reader.toc_json])
        toc_entry = TocEntry(name=TOC_TAR_NAME, type=EntryType.REG, mode=member.mode, uid=member.uid, gid=member.gid, mtime=member.mtime)
        _set_metadata(path, toc_entry, problems)
    for entry in reversed(dirs):  # children before parents: their mtimes stay
        if entry.implicit:  # what tar does for a missing parent (umask 022)
            os.chmod(root / entry.name, 0o755)
        else:
            _set_metadata(root / entry.name, entry, problems)
    if not toc[""].implicit:  # a "./" entry: tar applies it to dest itself
        _set_metadata(root, toc[""], problems)
    return problems


def _write_file(path: Path, chunks: Iterable[bytes]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        for data in chunks:
            f.write(data)


def _set_metadata(path: Path, entry: TocEntry, problems: list[str]) -> None:
    is_link = entry.type is EntryType.SYMLINK
    if os.geteuid() == 0:
        os.chown(path, entry.uid, entry.gid, follow_symlinks=False)
    if not is_link:
        os.chmod(path, entry.mode & 0o7777)
    for key, value in entry.xattrs.items():
        try:
            os.setxattr(path, key, value, follow_symlinks=False)
        except OSError as exc:
            problems.append(f"{entry.name}: xattr {key}: {exc.strerror}")
    ns = int(entry.mtime * 1_000_000_000)
    os.utime(path, ns=(ns, ns), follow_symlinks=False)
