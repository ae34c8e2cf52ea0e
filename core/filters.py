"""containerd's filter language: parse filter strings, match them against objects through adaptors.

Owns the syntax (scanner, parser, quoting), the matching semantics and a few adaptors; it must not
know any service's objects: services describe theirs with `adapt_mapping`/`adaptor_for` or
`adapt_message`, or pass any callable `(fieldpath: list[str]) -> (value: str, present: bool)`.

Syntax (containerd 1.6 filters/, whose behaviour this mirrors, quirks included):

    filters   := one string per alternative; `parse(a, b)` matches when a OR b matches
    selectors := selector ("," selector)*             all selectors must match (AND)
    selector  := fieldpath [operator value]
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_]+
    operator  := "==" | "!=" | "~="
    value     := quoted | a run of characters other than "," and whitespace
    quoted    := "..." (Go string escapes); after "~=" also /.../ or |...| (handy for regexps)

- A bare fieldpath tests presence (`labels.foo`); `==` needs presence and equality; `!=` is true
  when the value differs, *including when the field is absent*; `~=` searches the value (absent
  fields read as "") with the regular expression, unanchored.
- Quoted field components hold anything: `labels."a.b"==c`, `labels."with space"=="x y"`.
- `/` and `|` start a quoted literal wherever they appear unquoted at the start of a token, so
  `topic==/tasks/exit` is a parse error (write `topic=="/tasks/exit"`), and inside `/.../` the only
  escapes are Go's (`\\/`, `\\n`, ...): a regexp `\\d` needs `"\\\\d"`.
- Whitespace may precede a field, an operator or a value; anywhere else (after a value, or
  between a bare field and ",") it is a parse error, as with containerd's scanner.
- An empty filter string, or no strings at all, matches everything.

Differences from containerd, on purpose:
- `~=` values are compiled when parsing, so a bad regular expression is an InvalidArgument at once
  (containerd logs it and silently matches nothing). Patterns go to Python's `re` after a small
  translation of RE2-only spellings: `\\z` and `$` (end of text, unless the pattern sets `(?m)`), and
  POSIX classes such as `[[:alpha:]]`.
- Positions in error messages count characters, not UTF-8 bytes.

Every parse error is `errdefs.InvalidArgument` with containerd's text, which marks the spot:
`filters: parse error: [labels. >|?|< foo]: expected field or quoted: invalid argument`.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import betterproto
from betterproto.lib.google.protobuf import Any as ProtoAny

from . import errdefs

Adaptor = Callable[[Sequence[str]], "tuple[str, bool]"]
"""Gives the value of a field path and whether it is present."""

__all__ = [
    "Adaptor", "Filter", "ALWAYS", "AnyOf", "AllOf", "Selector", "parse", "parse_one",
    "adapt_mapping", "adaptor_for", "adapt_message", "LABEL_MAPS",
]

# --------------------------------------------------------------------------------------------
# filters


class Filter:
    """Something that matches objects seen through an adaptor."""

    def match(self, adaptor: Adaptor | Mapping[str, Any]) -> bool:
        """True when the object behind `adaptor` passes. A mapping is accepted and wrapped with
        `adapt_mapping`."""
        if isinstance(adaptor, Mapping):
            adaptor = adapt_mapping(adaptor)
        return self._match(adaptor)

    __call__ = match

    def _match(self, adaptor: Adaptor) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError


class _Always(Filter):
    def _match(self, adaptor: Adaptor) -> bool:
        return True

    def __repr__(self) -> str:
        return "ALWAYS"


ALWAYS: Filter = _Always()
"""Matches everything (the empty filter)."""


@dataclass(frozen=True)
class AnyOf(Filter):
    """Matches when any of its filters matches (the OR between filter strings)."""

    filters: tuple[Filter, ...]

    def _match(self, adaptor: Adaptor) -> bool:
        return any(f._match(adaptor) for f in self.filters)


@dataclass(frozen=True)
class AllOf(Filter):
    """Matches when all of its filters match (the comma-separated selectors of one string)."""

    filters: tuple[Filter, ...]

    def _match(self, adaptor: Adaptor) -> bool:
        return all(f._match(adaptor) for f in self.filters)


PRESENT, EQUAL, NOT_EQUAL, MATCHES = "?", "==", "!=", "~="


@dataclass(frozen=True)
class Selector(Filter):
    """One `fieldpath[op value]` test. `operator` is one of "?" (presence), "==", "!=", "~="."""

    fieldpath: tuple[str, ...]
    operator: str = PRESENT
    value: str = ""
    regexp: re.Pattern | None = field(default=None, compare=False)

    def _match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(list(self.fieldpath))
        if self.operator == PRESENT:
            return bool(present)
        if self.operator == EQUAL:
            return bool(present) and value == self.value
        if self.operator == NOT_EQUAL:
            return value != self.value
        if self.operator == MATCHES:
            assert self.regexp is not None
            return self.regexp.search(value or "") is not None
        return False


# --------------------------------------------------------------------------------------------
# parsing


def parse(*filter_strings: str) -> Filter:
    """Parse filter strings into one Filter: OR between the strings, AND inside each.

    No strings, or an empty string among them, match everything. A syntax error raises
    errdefs.InvalidArgument whose message shows where (see the module docstring).
    """
    if not filter_strings:
        return ALWAYS
    parsed = tuple(parse_one(s) for s in filter_strings)
    if any(f is ALWAYS for f in parsed):
        return ALWAYS
    return parsed[0] if len(parsed) == 1 else AnyOf(parsed)


def parse_one(s: str) -> Filter:
    """Parse one filter string (comma-separated selectors, all of which must match)."""
    if not isinstance(s, str):
        raise errdefs.InvalidArgument(f"filters: filter must be a string, not {type(s).__name__}")
    if s == "":
        return ALWAYS
    return _Parser(s).parse()


class _ParseError(Exception):
    def __init__(self, pos: int, msg: str):
        super().__init__(msg)
        self.pos = pos
        self.msg = msg


# Token kinds. Any other token is a single unexpected character.
_EOF, _QUOTED, _VALUE, _FIELD, _SEPARATOR, _OPERATOR, _ILLEGAL = (
    "EOF", "Quoted", "Value", "Field", "Separator", "Operator", "Illegal")


def _is_field_char(ch: str) -> bool:
    return ch == "_" or ("a" <= ch <= "z") or ("A" <= ch <= "Z") or ("0" <= ch <= "9")


def _is_space(ch: str) -> bool:
    # Go's unicode.IsSpace: '\t', '\n', '\v', '\f', '\r', ' ', U+0085, U+00A0 and category Z*.
    return ch in "\t\n\v\f\r \x85\xa0" or unicodedata.category(ch) in ("Zs", "Zl", "Zp")


def _is_value_char(ch: str) -> bool:
    # Go: not ',' nor space, and a letter, digit, number, graphic or punctuation rune.
    if ch == "," or _is_space(ch):
        return False
    cat = unicodedata.category(ch)
    return cat[0] in "LMNPS"


def _digit_val(ch: str) -> int:
    if "0" <= ch <= "9":
        return ord(ch) - ord("0")
    if "a" <= ch <= "f":
        return ord(ch) - ord("a") + 10
    if "A" <= ch <= "F":
        return ord(ch) - ord("A") + 10
    return 16


class _Scanner:
    """A port of containerd's filters scanner; positions are indexes into the string."""

    def __init__(self, text: str):
        self.input = text
        self.pos = 0    # start of the current character
        self.ppos = 0   # just past the current character
        self.value = False  # the next plain token is a value (an operator came before it)
        self.err = ""

    def error(self, msg: str) -> None:
        if not self.err:
            self.err = msg

    def next(self) -> str:
        """The next character, or _EOF / _ILLEGAL."""
        if self.pos >= len(self.input) or self.ppos >= len(self.input):
            self.pos = len(self.input)
            self.ppos = len(self.input)
            return _EOF
        self.pos = self.ppos
        ch = self.input[self.ppos]
        self.ppos += 1
        if ch == "\ufffd" or "\ud800" <= ch <= "\udfff":
            self.error("rune error")
            return _ILLEGAL
        if ch == "\x00":
            self.error("unexpected null")
            return _ILLEGAL
        return ch

    def peek(self) -> str:
        pos, ppos = self.pos, self.ppos
        ch = self.next()
        self.pos, self.ppos = pos, ppos
        return ch

    def scan(self) -> tuple[int, str, str]:
        """(position, token kind or the unexpected character, token text)."""
        ch = self.next()
        pos = self.pos
        while ch not in (_EOF, _ILLEGAL) and _is_space(ch):
            ch = self.next()
            pos = self.pos
        if ch in (_EOF, _ILLEGAL):
            return self.pos, ch, ""
        if ch in '/|"':
            if not self._scan_quoted(ch):
                return pos, _ILLEGAL, self.input[pos:self.ppos]
            return pos, _QUOTED, self.input[pos:self.ppos]
        if ch in ",.":
            self.value = False
            return pos, _SEPARATOR, self.input[pos:self.ppos]
        if ch in "=!~":
            while self.peek() in ("=", "!", "~"):
                self.next()
            self.value = True
            return pos, _OPERATOR, self.input[pos:self.ppos]
        if self.value:
            while True:
                nxt = self.peek()
                if nxt in (_EOF, _ILLEGAL) or not _is_value_char(nxt):
                    break
                self.next()
            self.value = False
            return pos, _VALUE, self.input[pos:self.ppos]
        if _is_field_char(ch):
            while True:
                nxt = self.peek()
                if nxt in (_EOF, _ILLEGAL) or not _is_field_char(nxt):
                    break
                self.next()
            return pos, _FIELD, self.input[pos:self.ppos]
        return self.pos, ch, ""

    def _scan_quoted(self, quote: str) -> bool:
        illegal = False
        ch = self.next()
        while ch != quote:
            if ch in ("\n", _EOF, _ILLEGAL):
                self.error("quoted literal not terminated")
                return False
            if ch == "\\":
                ch, legal = self._scan_escape(quote)
                if not legal:
                    illegal = True
            else:
                ch = self.next()
        return not illegal

    def _scan_escape(self, quote: str) -> tuple[str, bool]:
        ch = self.next()
        if ch in ("a", "b", "f", "n", "r", "t", "v", "\\", quote):
            return self.next(), True
        if ch in ("0", "1", "2", "3", "4", "5", "6", "7"):
            return self._scan_digits(ch, 8, 3)
        if ch == "x":
            return self._scan_digits(self.next(), 16, 2)
        if ch == "u":
            return self._scan_digits(self.next(), 16, 4)
        if ch == "U":
            return self._scan_digits(self.next(), 16, 8)
        self.error("illegal escape sequence")
        return ch, False

    def _scan_digits(self, ch: str, base: int, n: int) -> tuple[str, bool]:
        while n > 0 and len(ch) == 1 and _digit_val(ch) < base:
            ch = self.next()
            n -= 1
        if n > 0:
            self.error("illegal numeric escape sequence")
            return ch, False
        return ch, True


class _Parser:
    def __init__(self, text: str):
        self.input = text
        self.scanner = _Scanner(text)

    def parse(self) -> Filter:
        try:
            selectors = self._selectors()
        except _ParseError as err:
            raise errdefs.InvalidArgument(f"filters: parse error: {self._where(err.pos)}: {err.msg}") from None
        return selectors[0] if len(selectors) == 1 else AllOf(tuple(selectors))

    def _where(self, pos: int) -> str:
        s = self.input
        if pos < len(s):
            return f"[{s[:pos]} >|{s[pos]}|< {s[pos + 1:]}]"
        return f"[{s}]"

    def _selectors(self) -> list[Selector]:
        selectors = [self._selector()]
        while True:
            tok = self.scanner.peek()
            if tok == ",":
                pos, kind, _ = self.scanner.scan()
                if kind != _SEPARATOR:  # pragma: no cover - ',' always scans as one
                    raise _ParseError(pos, "expected a separator")
                selectors.append(self._selector())
            elif tok == _EOF:
                return selectors
            else:
                if tok == _ILLEGAL:  # containerd prints U+FFFD here; the scanner's reason is clearer
                    raise _ParseError(self.scanner.ppos, self.scanner.err)
                raise _ParseError(self.scanner.ppos, f"unexpected input: {tok}")

    def _selector(self) -> Selector:
        fieldpath = self._fieldpath()
        if self.scanner.peek() in (",", _EOF):
            return Selector(tuple(fieldpath))
        op_pos, op = self._operator()
        value_pos, value = self._value(allow_alt_quotes=(op == MATCHES))
        regexp = None
        if op == MATCHES:
            try:
                regexp = compile_regexp(value)
            except re.error as err:
                raise _ParseError(value_pos, f"invalid regular expression {value!r}: {err}") from None
        return Selector(tuple(fieldpath), op, value, regexp)

    def _fieldpath(self) -> list[str]:
        fields = [self._field()]
        while self.scanner.peek() == ".":
            pos, kind, _ = self.scanner.scan()
            if kind != _SEPARATOR:  # pragma: no cover - '.' always scans as one
                raise _ParseError(pos, "expected a field separator (`.`)")
            fields.append(self._field())
        return fields

    def _field(self) -> str:
        pos, kind, text = self.scanner.scan()
        if kind == _FIELD:
            return text
        if kind == _QUOTED:
            return self._unquote(pos, text, allow_alts=False)
        if kind == _ILLEGAL:
            raise _ParseError(pos, self.scanner.err)
        raise _ParseError(pos, "expected field or quoted")

    def _operator(self) -> tuple[int, str]:
        pos, kind, text = self.scanner.scan()
        if kind == _OPERATOR:
            if text in (EQUAL, NOT_EQUAL, MATCHES):
                return pos, text
            raise _ParseError(pos, f"unsupported operator {_go_quote(text)}")
        if kind == _ILLEGAL:
            raise _ParseError(pos, self.scanner.err)
        raise _ParseError(pos, 'expected an operator ("=="|"!="|"~=")')

    def _value(self, allow_alt_quotes: bool) -> tuple[int, str]:
        pos, kind, text = self.scanner.scan()
        if kind in (_VALUE, _FIELD):
            return pos, text
        if kind == _QUOTED:
            return pos, self._unquote(pos, text, allow_alt_quotes)
        if kind == _ILLEGAL:
            raise _ParseError(pos, self.scanner.err)
        raise _ParseError(pos, "expected value or quoted")

    def _unquote(self, pos: int, text: str, allow_alts: bool) -> str:
        if not allow_alts and text[0] not in ("'", '"'):
            raise _ParseError(pos, "invalid quote encountered")
        try:
            return unquote(text)
        except ValueError as err:
            raise _ParseError(pos, f"unquoting failed: {err}") from None


def _go_quote(s: str) -> str:
    from .identifiers import go_quote

    return go_quote(s)


_SIMPLE_ESCAPES = {"a": 0x07, "b": 0x08, "f": 0x0C, "n": 0x0A, "r": 0x0D, "t": 0x09, "v": 0x0B,
                   "\\": 0x5C}


def unquote(text: str) -> str:
    """Decode a quoted literal as containerd's filters do (Go's strconv.Unquote, with `/` and `|`
    accepted as double-quote-like delimiters). Raises ValueError("quote syntax error")."""
    bad = ValueError("quote syntax error")
    if len(text) < 2 or text[0] != text[-1]:
        raise bad
    quote, body = text[0], text[1:-1]
    if quote == "`":
        if "`" in body:
            raise bad
        return body.replace("\r", "")
    if quote not in "\"'|/":
        raise bad
    if "\n" in body:
        raise bad
    if "\\" not in body and quote not in body:
        if quote != "'":
            return body
        if len(body) == 1:
            return body
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c == quote:
            raise bad
        if c != "\\":
            out += c.encode("utf-8", "surrogatepass")
            i += 1
        else:
            if i + 1 >= len(body):
                raise bad
            e = body[i + 1]
            i += 2
            if e in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[e])
            elif e in "xuU":
                n = {"x": 2, "u": 4, "U": 8}[e]
                digits = body[i:i + n]
                if len(digits) < n or any(_digit_val(d) > 15 for d in digits):
                    raise bad
                v = int(digits, 16)
                i += n
                if e == "x":
                    out.append(v)
                else:
                    if v > 0x10FFFF:
                        raise bad
                    if 0xD800 <= v <= 0xDFFF:
                        v = 0xFFFD  # Go encodes a surrogate as the replacement character
                    out += chr(v).encode("utf-8")
            elif e in "01234567":
                digits = body[i:i + 2]
                if len(digits) < 2 or any(not "0" <= d <= "7" for d in digits):
                    raise bad
                v = int(e + digits, 8)
                i += 2
                if v > 255:
                    raise bad
                out.append(v)
            elif e in "'\"|/":
                if e != quote:
                    raise bad
                out.append(ord(e))
            else:
                raise bad
        if quote == "'" and i < len(body):
            raise bad
    return out.decode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------------------------
# regular expressions: Go's RE2 spellings that Python's re reads differently

_POSIX_CLASSES = {
    "alnum": "0-9A-Za-z", "alpha": "A-Za-z", "ascii": "\\x00-\\x7f", "blank": "\\t ",
    "cntrl": "\\x00-\\x1f\\x7f", "digit": "0-9", "graph": "!-~", "lower": "a-z",
    "print": " -~", "punct": "!-/:-@\\[-`{-~", "space": "\\t\\n\\v\\f\\r ", "upper": "A-Z",
    "word": "0-9A-Za-z_", "xdigit": "0-9A-Fa-f",
}
_MULTILINE_FLAG = re.compile(r"\(\?[a-zA-Z]*m")


def compile_regexp(pattern: str) -> re.Pattern:
    """Compile a `~=` pattern with Go RE2 meaning where Python's `re` would differ: `\\z` is end of
    text, `$` is end of text unless `(?m)` is set (Python's `$` also matches before a final
    newline), `\\Q...\\E` quotes literal text, `[[:alpha:]]`-style POSIX classes work, and `\\d`, `\\w`,
    `\\s`, `\\b` are ASCII-only. Unicode classes (`\\pL`) are not supported. Raises re.error."""
    multiline = _MULTILINE_FLAG.search(pattern) is not None
    out: list[str] = []
    i, in_class, class_start = 0, False, False
    n = len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            nxt = pattern[i + 1]
            if nxt == "Q":  # \Q...\E: literal text
                end = pattern.find("\\E", i + 2)
                literal = pattern[i + 2:] if end == -1 else pattern[i + 2:end]
                out.append(re.escape(literal))
                i = n if end == -1 else end + 2
                class_start = False
                continue
            out.append("\\Z" if (nxt == "z" and not in_class) else pattern[i:i + 2])
            i += 2
            class_start = False
            continue
        if in_class:
            if c == "[" and pattern.startswith("[:", i):
                end = pattern.find(":]", i + 2)
                if end != -1:
                    name = pattern[i + 2:end]
                    negated = name.startswith("^")
                    ranges = _POSIX_CLASSES.get(name.lstrip("^"))
                    if ranges is None:
                        raise re.error(f"invalid character class range: [:{name}:]")
                    if negated:
                        raise re.error(f"negated POSIX class [:{name}:] is not supported")
                    out.append(ranges)
                    i = end + 2
                    continue
            if c == "]" and not class_start:
                in_class = False
            out.append(c)
            class_start = False
            i += 1
            continue
        if c == "[":
            in_class = True
            out.append(c)
            i += 1
            if i < n and pattern[i] == "^":
                out.append("^")
                i += 1
            class_start = True  # a ']' right after '[' or '[^' is a literal
            continue
        if c == "$" and not multiline:
            out.append("\\Z")  # Python's \Z is the very end, as Go's $ without (?m)
            i += 1
            continue
        out.append(c)
        i += 1
    # re.ASCII: in RE2, \d \w \s \b are ASCII-only.
    return re.compile("".join(out), re.ASCII)


# --------------------------------------------------------------------------------------------
# adaptors

LABEL_MAPS = frozenset({"labels", "annotations"})
"""Field names whose mapping values are looked up as containerd looks labels up."""


def _scalar(value: Any, rest: Sequence[str]) -> tuple[str, bool]:
    if rest:
        return "", False
    if isinstance(value, bool):
        return ("true" if value else "false"), True
    if isinstance(value, str):
        return value, len(value) > 0
    if isinstance(value, (int, float)):
        return str(value), True
    return "", False


def adapt_mapping(fields: Mapping[str, Any], label_maps: Iterable[str] = LABEL_MAPS) -> Adaptor:
    """An adaptor over a plain description of an object, in containerd's adaptor style.

    - a str field is present when non-empty (`name==x`, bare `name`); bools read "true"/"false"
      and numbers their decimal text, always present; None is absent;
    - a field named in `label_maps` ("labels", "annotations") holds a str->str mapping looked up
      with the rest of the path joined by "." — `labels.a.b` and `labels."a.b"` both find key
      "a.b" — and a key is present when it exists, even with an empty value (containerd's
      checkMap); an empty mapping has nothing present;
    - any other mapping is a nested object (`target.digest==sha256:...`); anything else, and any
      path that goes deeper than the data, is absent.
    """
    maps = frozenset(label_maps)

    def lookup(obj: Mapping[str, Any], path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        name, rest = path[0], path[1:]
        if name not in obj:
            return "", False
        value = obj[name]
        if value is None:
            return "", False
        if name in maps and isinstance(value, Mapping):
            if not value or not rest:
                return "", False
            key = ".".join(rest)
            if key not in value:
                return "", False
            found = value[key]
            return (found if isinstance(found, str) else str(found)), True
        if isinstance(value, Mapping):
            return lookup(value, rest)
        return _scalar(value, rest)

    def adaptor(fieldpath: Sequence[str]) -> tuple[str, bool]:
        return lookup(fields, list(fieldpath))

    return adaptor


def adaptor_for(**fields: Any) -> Adaptor:
    """`adaptor_for(name="x", labels={...})` is `adapt_mapping({"name": "x", "labels": {...}})`."""
    return adapt_mapping(fields)


def adapt_message(message: Any, decode_any: Callable[[Any], Any] | None = None) -> Adaptor:
    """An adaptor over a betterproto message with the rules of containerd's generated `Field`
    methods (protobuf/plugin/fieldpath): string fields (present when non-empty), bool fields
    ("true"/"false", always present), a map field named "labels" (joined-path lookup as in
    adapt_mapping), singular message fields (recursed into; unset, i.e. not
    `betterproto.serialized_on_wire`, is absent as a nil pointer is in Go), and
    google.protobuf.Any fields, recursed into once `decode_any(any)` turns them into a message
    (no decoder, or None from it: absent). Numbers, enums, bytes, repeated fields and timestamps
    are "unhandled": absent, as in containerd."""

    def lookup(msg: Any, path: Sequence[str]) -> tuple[str, bool]:
        meta = getattr(msg, "_betterproto", None)
        if meta is None or not path:
            return "", False
        name, rest = path[0], path[1:]
        fmeta = meta.meta_by_field_name.get(name)
        if fmeta is None:
            return "", False
        value = getattr(msg, name, None)
        kind = fmeta.proto_type
        if kind == "string":
            if rest or not isinstance(value, str):
                return "", False
            return value, len(value) > 0
        if kind == "bool":
            if rest:
                return "", False
            return ("true" if value else "false"), True
        if kind == "map":
            if name != "labels" or not value or not rest:
                return "", False
            key = ".".join(rest)
            return (value[key], True) if key in value else ("", False)
        if kind == "message":
            if not isinstance(value, betterproto.Message):
                return "", False  # repeated, or unwrapped (datetime, timedelta, wrapper values)
            if not betterproto.serialized_on_wire(value):
                return "", False  # unset: nil in Go
            if isinstance(value, ProtoAny):
                if decode_any is None:
                    return "", False
                try:
                    decoded = decode_any(value)
                except Exception:
                    return "", False
                return lookup(decoded, rest) if decoded is not None else ("", False)
            return lookup(value, rest)
        return "", False

    def adaptor(fieldpath: Sequence[str]) -> tuple[str, bool]:
        return lookup(message, list(fieldpath))

    return adaptor
