"""containerd's filter language, as ``Walk`` (the ``List`` RPC) receives it.

A port of containerd 1.6 ``filters/`` (scanner.go, parser.go, filter.go):

    selectors := selector ("," selector)*
    selector  := fieldpath (operator value)
    fieldpath := field ('.' field)*
    field     := quoted | [A-Za-z0-9_]+
    operator  := "==" | "!=" | "~="
    value     := quoted | [^\\s,]+

Several filter strings are OR-ed; the selectors of one are AND-ed. containerd
itself sends e.g. ``labels."containerd.io/snapshot.ref"==sha256:…,parent==…``.
"""

from __future__ import annotations

import ast
import re
import unicodedata
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from .errors import InvalidArgument

# An adaptor answers "value of this field path, and is it present?".
Adaptor = Callable[[list[str]], tuple[str, bool]]

_EOF, _QUOTED, _VALUE, _FIELD, _SEP, _OP, _ILLEGAL, _OTHER = range(8)


class FilterSyntaxError(InvalidArgument):
    pass


def _is_field_rune(ch: str) -> bool:
    return ch == "_" or ("a" <= ch <= "z") or ("A" <= ch <= "Z") or ("0" <= ch <= "9")


def _is_value_rune(ch: str) -> bool:
    if ch == "," or ch.isspace():
        return False
    cat = unicodedata.category(ch)
    return cat[0] in "LNPSM" or ch == " "


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.expect_value = False

    def _skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        save_pos, save_val = self.pos, self.expect_value
        self._skip_space()
        ch = self.text[self.pos] if self.pos < len(self.text) else ""
        self.pos, self.expect_value = save_pos, save_val
        return ch

    def scan(self) -> tuple[int, int, str]:
        self._skip_space()
        start = self.pos
        if start >= len(self.text):
            return start, _EOF, ""
        ch = self.text[start]
        if ch == "\0":
            raise FilterSyntaxError(_where(self.text, start, "unexpected null"))
        if ch in '"/|':
            return start, _QUOTED, self._scan_quoted(ch)
        if ch in ",.":
            self.pos += 1
            self.expect_value = False
            return start, _SEP, ch
        if ch in "=!~":
            while self.pos < len(self.text) and self.text[self.pos] in "=!~":
                self.pos += 1
            self.expect_value = True
            return start, _OP, self.text[start:self.pos]
        if self.expect_value:
            while self.pos < len(self.text) and _is_value_rune(self.text[self.pos]):
                self.pos += 1
            self.expect_value = False
            if self.pos == start:
                self.pos += 1
                return start, _OTHER, ch
            return start, _VALUE, self.text[start:self.pos]
        if _is_field_rune(ch):
            while self.pos < len(self.text) and _is_field_rune(self.text[self.pos]):
                self.pos += 1
            return start, _FIELD, self.text[start:self.pos]
        self.pos += 1
        return start, _OTHER, ch

    def _scan_quoted(self, quote: str) -> str:
        start = self.pos
        i = start + 1
        while True:
            if i >= len(self.text) or self.text[i] == "\n":
                raise FilterSyntaxError(_where(self.text, start, "quoted literal not terminated"))
            ch = self.text[i]
            if ch == "\\":
                i += 2
                continue
            i += 1
            if ch == quote:
                break
        self.pos = i
        return self.text[start:i]


def _where(text: str, pos: int, msg: str) -> str:
    if pos < len(text):
        return f"filters: parse error: [{text[:pos]} >|{text[pos]}|< {text[pos + 1:]}]: {msg}"
    return f"filters: parse error: [{text}]: {msg}"


def _unquote(text: str, pos: int, quoted: str, allow_alt: bool) -> str:
    quote = quoted[0]
    if not allow_alt and quote not in "\"'":
        raise FilterSyntaxError(_where(text, pos, "invalid quote encountered"))
    body = quoted[1:-1]
    if quote != '"':
        # alternative quotes (/re/ and |re|): only the quote itself is escaped
        return body.replace("\\" + quote, quote)
    try:
        value = ast.literal_eval(quoted)
    except (SyntaxError, ValueError) as exc:
        raise FilterSyntaxError(_where(text, pos, f"unquoting failed: {exc}")) from None
    if not isinstance(value, str):
        raise FilterSyntaxError(_where(text, pos, "unquoting failed"))
    return value


@dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    operator: str  # "?" (present), "==", "!=", "~="
    value: str = ""
    regex: Optional[re.Pattern[str]] = None

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(list(self.fieldpath))
        if self.operator == "?":
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        assert self.regex is not None
        return self.regex.search(value) is not None


@dataclass(frozen=True)
class Filter:
    """Matches when any of its alternatives matches all of its selectors."""

    alternatives: tuple[tuple[Selector, ...], ...]

    def match(self, adaptor: Adaptor) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.match(adaptor) for s in alt) for alt in self.alternatives)


def _parse_one(text: str) -> tuple[Selector, ...]:
    sc = _Scanner(text)
    selectors = [_selector(sc, text)]
    while True:
        pos, tok, s = sc.scan()
        if tok == _EOF:
            return tuple(selectors)
        if tok == _SEP and s == ",":
            selectors.append(_selector(sc, text))
            continue
        raise FilterSyntaxError(_where(text, pos, f"unexpected input: {s}"))


def _field(sc: _Scanner, text: str) -> str:
    pos, tok, s = sc.scan()
    if tok == _FIELD:
        return s
    if tok == _QUOTED:
        return _unquote(text, pos, s, allow_alt=False)
    raise FilterSyntaxError(_where(text, pos, "expected field or quoted"))


def _selector(sc: _Scanner, text: str) -> Selector:
    path = [_field(sc, text)]
    while sc.peek() == ".":
        sc.scan()
        path.append(_field(sc, text))
    if sc.peek() in (",", ""):
        return Selector(tuple(path), "?")
    pos, tok, op = sc.scan()
    if tok != _OP:
        raise FilterSyntaxError(_where(text, pos, 'expected an operator ("=="|"!="|"~=")'))
    if op not in ("==", "!=", "~="):
        raise FilterSyntaxError(_where(text, pos, f"unsupported operator {op!r}"))
    pos, tok, s = sc.scan()
    if tok in (_VALUE, _FIELD):
        value = s
    elif tok == _QUOTED:
        value = _unquote(text, pos, s, allow_alt=(op == "~="))
    elif tok == _EOF:
        raise FilterSyntaxError(_where(text, pos, "unexpected EOF"))
    else:
        raise FilterSyntaxError(_where(text, pos, "expected value or quoted"))
    regex = None
    if op == "~=":
        try:
            regex = re.compile(value)
        except re.error as exc:
            raise FilterSyntaxError(f"filters: invalid regular expression {value!r}: {exc}") from None
    return Selector(tuple(path), op, value, regex)


def parse_filters(filters: Iterable[str]) -> Filter:
    """Parses containerd filter strings; raises InvalidArgument if one does not parse."""
    alternatives = []
    for text in filters:
        if text == "":
            return Filter(())  # an empty filter matches everything
        alternatives.append(_parse_one(text))
    return Filter(tuple(alternatives))
