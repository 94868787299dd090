"""Compact columns for the parsed TOC: a mount process keeps its layer's
TOC for its whole life, and one Python object per number or digest costs
~30-120 bytes where an ``array`` slot costs 8 and a raw sha256 32."""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator

_LIMIT = 1 << 64
_SHA256 = "sha256:"


class Ints:
    """Non-negative ints in an ``array('Q')``; the (absurd, but valid JSON)
    ones that do not fit are kept aside, so that every value reads back as
    it was written."""

    __slots__ = ("array", "_big")

    def __init__(self, values: Iterable[int] = ()) -> None:
        self.array = array("Q")
        self._big: dict[int, int] = {}
        for value in values:
            self.append(value)

    @classmethod
    def zeros(cls, n: int) -> Ints:
        ints = cls()
        ints.array = array("Q", [0]) * n
        return ints

    def copy(self) -> Ints:
        """A new object with an exact-size buffer (see ``_Columns.rehome``)."""
        ints = Ints()
        ints.array = array("Q", self.array)
        ints._big = dict(self._big)
        return ints

    def append(self, value: int) -> None:
        if value >= _LIMIT:
            self._big[len(self.array)] = value
            value = 0
        self.array.append(value)

    @property
    def has_big(self) -> bool:
        return bool(self._big)

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> int:
        if self._big and i in self._big:
            return self._big[i]
        return self.array[i]

    def __setitem__(self, i: int, value: int) -> None:
        self._big.pop(i, None)
        if value >= _LIMIT:
            self._big[i] = value
            value = 0
        self.array[i] = value

    def __iter__(self) -> Iterator[int]:
        if not self._big:
            return iter(self.array)
        return (self._big.get(i, v) for i, v in enumerate(self.array))


class Digests:
    """Digest strings by number: sha256 ones (nearly all) as their 32 raw
    bytes in one ``bytearray``, the others as they are."""

    __slots__ = ("_raw", "_other")

    def __init__(self) -> None:
        self._raw = bytearray()
        self._other: dict[int, str] = {}

    def add(self, digest: str) -> int:
        """Store ``digest`` (a valid one: ``lazyfs.stargz.digest.is_digest``); its number."""
        k = len(self._raw) // 32
        if digest.startswith(_SHA256) and len(digest) == len(_SHA256) + 64:
            self._raw += bytes.fromhex(digest[len(_SHA256) :])
        else:
            self._other[k] = digest
            self._raw += bytes(32)
        return k

    def __len__(self) -> int:
        return len(self._raw) // 32

    def __getitem__(self, k: int) -> str:
        other = self._other.get(k)
        if other is not None:
            return other
        if not 0 <= k < len(self):
            raise IndexError(k)
        return _SHA256 + self._raw[32 * k : 32 * k + 32].hex()

    def copy(self) -> Digests:
        """A new object with an exact-size buffer (see ``_Columns.rehome``)."""
        digests = Digests()
        digests._raw = bytearray(self._raw)
        digests._other = dict(self._other)
        return digests


class Strings:
    """A list of strings as one ``str`` and their offsets: built once, at
    the end of a parse, so that no small object of the parse outlives it
    (each one would keep a whole pymalloc arena of freed memory resident)."""

    __slots__ = ("_text", "_start")

    def __init__(self, values: Iterable[str] = ()) -> None:
        values = list(values)
        self._text = "".join(values)
        self._start = array("Q", [0])
        for value in values:
            self._start.append(self._start[-1] + len(value))

    def __len__(self) -> int:
        return len(self._start) - 1

    def __getitem__(self, k: int) -> str:
        if not 0 <= k < len(self):
            raise IndexError(k)
        return self._text[self._start[k] : self._start[k + 1]]


class SparseStrings:
    """Strings of a few of many entry numbers (link targets), as ``Strings``
    and the sorted entry numbers that have one."""

    __slots__ = ("_keys", "_values")

    def __init__(self, values: dict[int, str] | None = None) -> None:
        keys = sorted(values or {})
        self._keys = array("Q", keys)
        self._values = Strings((values or {})[k] for k in keys)

    def get(self, i: int, default: str = "") -> str:
        j = bisect_left(self._keys, i)
        if j < len(self._keys) and self._keys[j] == i:
            return self._values[j]
        return default

    def __contains__(self, i: int) -> bool:
        j = bisect_left(self._keys, i)
        return j < len(self._keys) and self._keys[j] == i
