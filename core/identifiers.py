"""Validation of identifiers and labels with containerd's rules and error messages.

Owns: `validate(s)` for every name that becomes a path component or a key (namespaces, container,
snapshot, lease and task ids, event topic components), `validate_labels(labels)` for label maps,
and `go_quote(s)`, which renders a string the way Go's `%q` does so that our messages read like
containerd's. It must not know about any service: callers validate at their boundary and let the
`errdefs.InvalidArgument` travel up.

Rules (containerd 1.6 identifiers/validate.go, labels/validate.go):
- an identifier is non-empty, at most 76 *bytes* long (UTF-8; Go measures `len(s)` in bytes) and
  matches `^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$` over the whole string: no leading, trailing
  or doubled separators, no trailing newline (Python's `$` would allow one; we don't);
- a label's key and value together are at most 4096 bytes.
"""
from __future__ import annotations

import re
from typing import Mapping

from . import errdefs

MAX_LENGTH = 76
"""Longest identifier, in bytes."""

MAX_LABEL_SIZE = 4096
"""Longest label key + value, in bytes."""

IDENTIFIER_PATTERN = r"^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$"
"""The pattern as containerd prints it in its error messages."""

_IDENTIFIER_RE = re.compile(r"[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*")

_GO_ESCAPES = {"\a": r"\a", "\b": r"\b", "\f": r"\f", "\n": r"\n", "\r": r"\r", "\t": r"\t",
               "\v": r"\v", "\\": "\\\\", '"': '\\"'}


def _utf8_len(s: str) -> int:
    return len(s.encode("utf-8", "surrogatepass"))


def go_quote(s: str) -> str:
    """`s` as Go's `%q` (strconv.Quote) renders it: double quotes, Go escapes, printable
    Unicode kept as is, other characters as \\xNN, \\uNNNN or \\UNNNNNNNN."""
    out = ['"']
    for ch in s:
        esc = _GO_ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
        elif ch == " " or (ch.isprintable() and not 0xD800 <= ord(ch) <= 0xDFFF):
            out.append(ch)
        else:
            code = ord(ch)
            if code < 0x80:
                out.append(f"\\x{code:02x}")
            elif 0xD800 <= code <= 0xDFFF:  # lone surrogate: Go sees invalid UTF-8 there
                out.append("\\ufffd")
            elif code < 0x10000:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def is_valid(s: str) -> bool:
    """True when `validate(s)` would accept `s`."""
    return (isinstance(s, str) and 0 < _utf8_len(s) <= MAX_LENGTH
            and _IDENTIFIER_RE.fullmatch(s) is not None)


def validate(s: str) -> str:
    """Return `s` when it is a valid identifier; raise errdefs.InvalidArgument otherwise.

    Messages are containerd's: `identifier must not be empty`, `identifier "x..." greater than
    maximum length (76 characters)`, `identifier "a..b" must match ^[A-Za-z0-9]+(...)*$`, each
    followed by ": invalid argument" when rendered with str().
    """
    if not isinstance(s, str):
        raise errdefs.InvalidArgument(f"identifier must be a string, not {type(s).__name__}")
    if not s:
        raise errdefs.InvalidArgument("identifier must not be empty")
    if _utf8_len(s) > MAX_LENGTH:
        raise errdefs.InvalidArgument(
            f"identifier {go_quote(s)} greater than maximum length ({MAX_LENGTH} characters)")
    if _IDENTIFIER_RE.fullmatch(s) is None:
        raise errdefs.InvalidArgument(f"identifier {go_quote(s)} must match {IDENTIFIER_PATTERN}")
    return s


def validate_label(key: str, value: str) -> None:
    """containerd's labels.Validate: key and value together at most 4096 bytes."""
    key_bytes = key.encode("utf-8", "surrogatepass")
    if len(key_bytes) + _utf8_len(value) > MAX_LABEL_SIZE:
        shown = key_bytes[:10].decode("utf-8", "replace") if len(key_bytes) > 10 else key
        raise errdefs.InvalidArgument(
            f"label key and value greater than maximum size ({MAX_LABEL_SIZE} bytes), key: {shown}")


def validate_labels(labels: Mapping[str, str] | None) -> None:
    """Validate every label of a map (None and {} are fine); the first offender raises
    errdefs.InvalidArgument with containerd's message (the key is cut to its first 10 bytes)."""
    if not labels:
        return
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise errdefs.InvalidArgument(
                f"label {key!r}: key and value must be strings, not "
                f"{type(key).__name__} and {type(value).__name__}")
        validate_label(key, value)
