"""``lazyfs.elf``: the interpreter and libraries an ELF object names, read
from real binaries of this machine and from crafted ones (32-bit,
big-endian, RUNPATH vs RPATH, malformed)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import trio

from lazyfs.elf import ElfDependencies, read_dependencies


def _deps(data: bytes) -> ElfDependencies | None:
    async def read(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    return trio.run(read_dependencies, read, len(data))


def test_real_binaries_of_this_machine() -> None:
    python = _deps(Path("/usr/bin/python3.11").read_bytes())
    assert python is not None and python.machine == 62 and python.is_64 and python.multiarch == "x86_64-linux-gnu"
    assert python.interpreter == "/lib64/ld-linux-x86-64.so.2"
    assert python.needed == ("libm.so.6", "libz.so.1", "libexpat.so.1", "libc.so.6")  # as `readelf -d` lists them
    libc = _deps(Path("/lib/x86_64-linux-gnu/libc.so.6").read_bytes())
    assert libc is not None and libc.needed == ("ld-linux-x86-64.so.2",)
    static = _deps(Path("/bin/busybox").read_bytes())  # busybox-static
    assert static is not None and static.interpreter == "" and static.needed == ()


def _crafted(*, is_64: bool, little: bool, needed: list[str], runpath: str = "", rpath: str = "",
             interp: str = "/lib/ld-linux.so.3", machine: int = 40) -> bytes:
    """A minimal ELF: header, PT_LOAD over the whole file, PT_INTERP, PT_DYNAMIC."""
    end = "<" if little else ">"
    strtab = b"\0"
    offsets = []
    for name in [*needed, runpath, rpath]:
        offsets.append(len(strtab))
        strtab += name.encode() + b"\0"
    ehsize, phentsize = (64, 56) if is_64 else (52, 32)
    phoff = ehsize
    interp_at = phoff + 3 * phentsize
    interp_bytes = interp.encode() + b"\0"
    strtab_at = interp_at + len(interp_bytes)
    dyn_at = strtab_at + len(strtab)
    vbase = 0x10000
    tags = [(1, offsets[i]) for i in range(len(needed))]
    if runpath:
        tags.append((29, offsets[len(needed)]))
    if rpath:
        tags.append((15, offsets[len(needed) + 1]))
    tags += [(5, vbase + strtab_at), (10, len(strtab)), (0, 0)]
    dyn_fmt = end + ("qQ" if is_64 else "iI")
    dynamic = b"".join(struct.pack(dyn_fmt, t, v) for t, v in tags)
    total = dyn_at + len(dynamic)
    ident = b"\x7fELF" + bytes([2 if is_64 else 1, 1 if little else 2, 1]) + bytes(9)
    if is_64:
        header = ident + struct.pack(end + "HHIQQQIHHHHHH", 3, machine, 1, 0, phoff, 0, 0, ehsize, phentsize, 3, 0, 0, 0)
        ph = lambda t, off, size: struct.pack(end + "IIQQQQQQ", t, 5, off, vbase + off, vbase + off, size, size, 8)  # noqa: E731
    else:
        header = ident + struct.pack(end + "HHIIIIIHHHHHH", 3, machine, 1, 0, phoff, 0, 0, ehsize, phentsize, 3, 0, 0, 0)
        ph = lambda t, off, size: struct.pack(end + "IIIIIIII", t, off, vbase + off, vbase + off, size, size, 5, 4)  # noqa: E731
    phdrs = ph(1, 0, total) + ph(3, interp_at, len(interp_bytes)) + ph(2, dyn_at, len(dynamic))
    data = header + phdrs + interp_bytes + strtab + dynamic
    assert len(data) == total
    return data


@pytest.mark.parametrize("is_64", [True, False])
@pytest.mark.parametrize("little", [True, False])
def test_crafted_classes_and_byte_orders(is_64: bool, little: bool) -> None:
    deps = _deps(_crafted(is_64=is_64, little=little, needed=["liba.so.1", "libb.so.2"], runpath="$ORIGIN/../lib:/opt/x"))
    assert deps == ElfDependencies(40, is_64, "/lib/ld-linux.so.3", ("liba.so.1", "libb.so.2"), ("$ORIGIN/../lib", "/opt/x"))
    assert deps.multiarch == "arm-linux-gnueabihf"


def test_runpath_wins_over_rpath_and_rpath_alone_counts() -> None:
    both = _deps(_crafted(is_64=True, little=True, needed=["l.so"], runpath="/run", rpath="/r"))
    assert both is not None and both.search_path == ("/run",)
    only = _deps(_crafted(is_64=True, little=True, needed=["l.so"], rpath="/r1:/r2"))
    assert only is not None and only.search_path == ("/r1", "/r2")


def test_malformed_objects_give_nothing_or_less_never_an_error() -> None:
    good = _crafted(is_64=True, little=True, needed=["liba.so.1"])
    assert _deps(b"") is None
    assert _deps(b"#!/bin/sh\necho not elf\n") is None
    assert _deps(good[:40]) is None  # truncated header
    assert _deps(good[:100]) is None  # program headers cut off
    huge_phnum = bytearray(good)
    struct.pack_into("<H", huge_phnum, 56, 60000)
    assert _deps(bytes(huge_phnum)) is None
    bad_class = bytearray(good)
    bad_class[4] = 7
    assert _deps(bytes(bad_class)) is None
    # a dynamic segment pointing past the end: the interpreter is still known
    cut = _deps(good[:-8])
    assert cut is not None and cut.interpreter == "/lib/ld-linux.so.3" and cut.needed == ()
    # a string offset past the string table: that name is dropped
    bogus = bytearray(good)
    dyn_at = len(good) - 4 * 16
    struct.pack_into("<qQ", bogus, dyn_at, 1, 10**6)
    assert _deps(bytes(bogus)).needed == ()


def test_the_early_guess_comes_from_the_first_segment_before_the_dynamic_segment_is_read() -> None:
    """python3.11's dynamic segment lies 5.5 MB in (another 4 MiB chunk);
    the names in its first segment are the guess, given before that read."""
    data = Path("/usr/bin/python3.11").read_bytes()
    reads: list[int] = []
    guesses: list[tuple[ElfDependencies, int]] = []

    async def read(offset: int, length: int) -> bytes:
        reads.append(offset)
        return data[offset : offset + length]

    final = trio.run(lambda: read_dependencies(read, len(data), early=lambda g: guesses.append((g, len(reads)))))
    [(guess, reads_before)] = guesses
    assert guess.guessed and guess.interpreter == "/lib64/ld-linux-x86-64.so.2"
    assert set(final.needed) <= set(guess.needed)
    assert max(reads[:reads_before]) < 4 << 20  # nothing past the first chunk read yet
    assert max(reads) > 4 << 20 and not final.guessed
