"""What an ELF file will make the dynamic loader open next.

A process start is a chain of files each opened only after the one before
it was read: the executable, its interpreter (``ld.so``), the libraries
named in its dynamic section, theirs. On a lazy layer every link of that
chain is a round trip. The executable's own headers name the rest of the
chain, so reading them as soon as its first bytes arrive lets those files
be fetched together instead of one after another (``lazyfs.dependencies``).

Only the program headers and the dynamic segment are read (what ``ld.so``
itself reads), through an async ``read(offset, length)`` so that the bytes
can come from a lazy layer. The dynamic segment often lies at the end of a
large executable, in a chunk not fetched yet, while the library names
themselves (``.dynstr``) are in the first segment, beside the headers: so
an ``early`` callback first gets the interpreter and the library-like names
found in the first segment (a guess, ``guessed``), then the real answer. Anything malformed, truncated or oversized
gives no dependencies rather than an error: this is a prediction, never a
reason for a read to fail.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

MAGIC = b"\x7fELF"

PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB, DT_STRSZ, DT_RPATH, DT_RUNPATH = 0, 1, 5, 10, 15, 29

MAX_PROGRAM_HEADERS = 256
MAX_DYNAMIC_BYTES = 64 << 10
MAX_STRTAB_BYTES = 1 << 20
MAX_NAMES = 128
MAX_NAME_BYTES = 4096
MAX_SCAN_BYTES = 1 << 20  # of the first segment, searched for library names
# a NUL-terminated soname, as .dynstr holds them: libfoo.so, libfoo.so.1.2, ld-linux-x86-64.so.2
_SONAME = re.compile(rb"(?<=\0)((?:lib|ld)[A-Za-z0-9_.+-]{0,200}\.so(?:\.[0-9]+)*)(?=\0)")

# e_machine -> the Debian multiarch triplet of its library directories
MULTIARCH = {
    3: "i386-linux-gnu",
    8: "mips64el-linux-gnuabi64",
    21: "powerpc64le-linux-gnu",
    22: "s390x-linux-gnu",
    40: "arm-linux-gnueabihf",
    62: "x86_64-linux-gnu",
    183: "aarch64-linux-gnu",
    243: "riscv64-linux-gnu",
}

ReadAt = Callable[[int, int], Awaitable[bytes]]
Early = Callable[["ElfDependencies"], None]


@dataclass(frozen=True)
class ElfDependencies:
    """The files an ELF object's loading depends on, as its headers name them."""

    machine: int  # e_machine
    is_64: bool
    interpreter: str = ""  # PT_INTERP, an absolute path; "" for a static or shared object
    needed: tuple[str, ...] = ()  # DT_NEEDED, in order
    search_path: tuple[str, ...] = ()  # DT_RUNPATH, else DT_RPATH, split at ':' ($ORIGIN not expanded)
    guessed: bool = False  # ``needed`` are names found in the first segment, not read from DT_NEEDED

    @property
    def multiarch(self) -> str:
        """The multiarch triplet for this machine, "" when unknown."""
        return MULTIARCH.get(self.machine, "")


@dataclass(frozen=True)
class _Layout:
    is_64: bool
    little: bool
    machine: int
    phoff: int
    phentsize: int
    phnum: int


def looks_like_elf(head: bytes) -> bool:
    return head[:4] == MAGIC


async def read_dependencies(read: ReadAt, size: int, *, early: Early | None = None) -> ElfDependencies | None:
    """The dependencies of the ELF object of ``size`` bytes that ``read``
    returns, or None when it is not a well-formed ELF object. ``early``, if
    given, is called first with the guess (see above), unless it is empty."""
    try:
        return await _read_dependencies(read, size, early)
    except (struct.error, ValueError, IndexError):
        return None


async def _read_dependencies(read: ReadAt, size: int, early: Early | None) -> ElfDependencies | None:
    layout = _layout(await read(0, 64))
    if layout is None:
        return None
    table_size = layout.phentsize * layout.phnum
    if not 0 < layout.phnum <= MAX_PROGRAM_HEADERS or layout.phoff + table_size > size:
        return None
    table = await read(layout.phoff, table_size)
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    interp_at = dynamic_at = None
    for i in range(layout.phnum):
        p_type, offset, vaddr, filesz = _program_header(layout, table, i * layout.phentsize)
        if p_type == PT_LOAD:
            loads.append((vaddr, offset, filesz))
        elif p_type == PT_INTERP:
            interp_at = (offset, filesz)
        elif p_type == PT_DYNAMIC:
            dynamic_at = (offset, filesz)
    interpreter = ""
    if interp_at is not None and 1 < interp_at[1] <= MAX_NAME_BYTES and interp_at[0] + interp_at[1] <= size:
        interpreter = _c_string(await read(*interp_at))
    result = ElfDependencies(layout.machine, layout.is_64, interpreter)
    if early is not None:
        first = next(((offset, filesz) for _vaddr, offset, filesz in loads if offset == 0), None)
        names = _sonames(await read(0, min(first[1], size, MAX_SCAN_BYTES))) if first is not None else ()
        if interpreter or names:
            early(ElfDependencies(layout.machine, layout.is_64, interpreter, names, guessed=True))
    if dynamic_at is None or not 0 < dynamic_at[1] <= MAX_DYNAMIC_BYTES or dynamic_at[0] + dynamic_at[1] > size:
        return result
    tags = _dynamic_tags(layout, await read(*dynamic_at))
    strtab_vaddr = next((value for tag, value in tags if tag == DT_STRTAB), None)
    strsz = next((value for tag, value in tags if tag == DT_STRSZ), 0)
    if strtab_vaddr is None or not 0 < strsz <= MAX_STRTAB_BYTES:
        return result
    strtab_at = _file_offset(loads, strtab_vaddr)
    if strtab_at is None or strtab_at + strsz > size:
        return result
    strtab = await read(strtab_at, strsz)
    needed = tuple(name for tag, value in tags if tag == DT_NEEDED and (name := _string_at(strtab, value)))[:MAX_NAMES]
    runpath = [_string_at(strtab, value) for tag, value in tags if tag == DT_RUNPATH]
    rpath = [_string_at(strtab, value) for tag, value in tags if tag == DT_RPATH]
    # ld.so ignores DT_RPATH when DT_RUNPATH is present
    search = ":".join(p for p in (runpath or rpath) if p)
    return ElfDependencies(
        layout.machine, layout.is_64, interpreter, needed,
        tuple(p for p in search.split(":") if p)[:MAX_NAMES],
    )


def _layout(header: bytes) -> _Layout | None:
    if len(header) < 52 or header[:4] != MAGIC or header[4] not in (1, 2) or header[5] not in (1, 2):
        return None
    is_64, little = header[4] == 2, header[5] == 1
    end = "<" if little else ">"
    if is_64:
        if len(header) < 64:
            return None
        _type, machine, _version, _entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum = struct.unpack_from(
            end + "HHIQQQIHHH", header, 16)
        minimum = 56
    else:
        _type, machine, _version, _entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum = struct.unpack_from(
            end + "HHIIIIIHHH", header, 16)
        minimum = 32
    if phentsize < minimum:
        return None
    return _Layout(is_64, little, machine, phoff, phentsize, phnum)


def _program_header(layout: _Layout, table: bytes, at: int) -> tuple[int, int, int, int]:
    """(p_type, p_offset, p_vaddr, p_filesz) of the header at ``at``."""
    end = "<" if layout.little else ">"
    if layout.is_64:
        p_type, _flags, offset, vaddr, _paddr, filesz = struct.unpack_from(end + "IIQQQQ", table, at)
    else:
        p_type, offset, vaddr, _paddr, filesz = struct.unpack_from(end + "IIIII", table, at)
    return p_type, offset, vaddr, filesz


def _dynamic_tags(layout: _Layout, data: bytes) -> list[tuple[int, int]]:
    fmt = ("<" if layout.little else ">") + ("qQ" if layout.is_64 else "iI")
    tags = []
    for tag, value in struct.iter_unpack(fmt, data[: len(data) - len(data) % struct.calcsize(fmt)]):
        if tag == DT_NULL:
            break
        tags.append((tag, value))
    return tags


def _file_offset(loads: list[tuple[int, int, int]], vaddr: int) -> int | None:
    for start, offset, filesz in loads:
        if start <= vaddr < start + filesz:
            return vaddr - start + offset
    return None


def _sonames(data: bytes) -> tuple[str, ...]:
    names = dict.fromkeys(m.group(1).decode("ascii") for m in _SONAME.finditer(data))
    return tuple(names)[:MAX_NAMES]


def _c_string(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _string_at(strtab: bytes, offset: int) -> str:
    if offset >= len(strtab):
        return ""
    end = strtab.find(b"\0", offset, offset + MAX_NAME_BYTES)
    return strtab[offset:end].decode("utf-8", "surrogateescape") if end >= 0 else ""


__all__ = ["ElfDependencies", "MAGIC", "MULTIARCH", "looks_like_elf", "read_dependencies"]
