"""Reading TOML tables into dataclasses, and dataclasses back into TOML-ready dicts.

This is the contract for every config dataclass (the daemon's and each plugin's):

- a field's TOML key is its name, or `field(metadata={"toml": "SystemdCgroup"})`;
  `metadata={"toml_skip": True}` keeps a field out of TOML altogether;
- supported field types: str, int, float (an integer is accepted), bool, list[X], tuple[X, ...],
  dict[str, X], X | None, Literal[...], Enum subclasses (by value), Path, nested dataclasses,
  and Any / bare dict / bare list (taken unchecked);
- a key present in TOML replaces the default, except a nested dataclass table, which updates the
  default instance key by key, and a dict, which updates the default dict entry by entry (an
  entry whose value is a dataclass is itself updated key by key); lists replace;
- an unknown key, or a value of the wrong type, becomes a ConfigWarning and the value is ignored
  (the default, or the earlier value, stays). Nothing is raised for bad values.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import enum
import functools
import json
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from .errors import ConfigWarning, child_path


class Reject(Exception):
    """A value does not fit its declared type. str() says what was expected and what came."""


@dataclass
class Sink:
    """Where warnings go, and the file they are about."""

    file: Path | None
    warnings: list[ConfigWarning]

    def warn(self, table: str, key: str, message: str) -> None:
        self.warnings.append(ConfigWarning(self.file, table, key, message))


def toml_name(f: dataclasses.Field) -> str:
    return f.metadata.get("toml", f.name)


def toml_fields(cls: type) -> dict[str, dataclasses.Field]:
    """TOML key -> field, for the fields that live in TOML."""
    return {toml_name(f): f for f in dataclasses.fields(cls) if not f.metadata.get("toml_skip")}


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations by field name; an annotation that cannot be resolved reads as Any."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # some forward reference cannot be resolved: resolve field by field
        hints = {}
        namespace = vars(sys.modules.get(cls.__module__, typing))
        for f in dataclasses.fields(cls):
            try:
                hints[f.name] = eval(f.type, dict(namespace), dict(vars(cls))) if isinstance(f.type, str) else f.type
            except Exception:
                pass
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name, f.type)
        out[f.name] = Any if isinstance(tp, str) else tp
    return out


def is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


# ---- describing types and values in messages -------------------------------------------------

_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}
_PLURALS = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}


def describe_type(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _NAMES:
        return _NAMES[tp]
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args if a is not type(None))
    if origin is typing.Literal:
        return "one of " + ", ".join(literal(a) or repr(a) for a in args)
    if origin is typing.Annotated:
        return describe_type(args[0])
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(literal(m.value) or repr(m.value) for m in tp)
    if isinstance(tp, type) and issubclass(tp, PurePath):
        return "a string (a path)"
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple, set, frozenset):
        item = args[0] if args else Any
        if item in _PLURALS:
            return f"an array of {_PLURALS[item]}"
        if is_dataclass_type(item):
            return "an array of tables"
        return "an array"
    if origin is dict or tp is dict or is_dataclass_type(tp):
        return "a table"
    return f"a {getattr(tp, '__name__', str(tp))}"


def describe_value(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({literal(value)})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"a string ({json.dumps(shown)})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime.datetime):
        return "a datetime"
    if isinstance(value, datetime.date):
        return "a date"
    if isinstance(value, datetime.time):
        return "a time"
    return f"a {type(value).__name__}"


def literal(value: Any) -> str | None:
    """A short TOML spelling of a scalar (or a short array of scalars); None for anything else."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, PurePath)):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)) and len(value) <= 4:
        items = [literal(v) for v in value]
        if all(i is not None and not i.startswith("[") for i in items):
            return "[" + ", ".join(items) + "]"
    return None


def unknown_key_message(key: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
    hint = f'; did you mean "{close[0]}"?' if close else ""
    return f"unknown key, ignored{hint}"


def rejected_message(err: Reject, current: Any = dataclasses.MISSING) -> str:
    shown = literal(current) if current is not dataclasses.MISSING else None
    return f"{err}; ignored, keeping {shown}" if shown is not None else f"{err}; ignored"


# ---- reading -----------------------------------------------------------------------------------

def decode_present(cls: type, raw: dict, current: Any, sink: Sink, table: str) -> dict[str, Any]:
    """The valid keys of `raw` as {field name: converted value}; warnings for the rest.

    `current` (an instance of cls, or None) is what nested tables and dicts update and what
    messages call "keeping".
    """
    fields = toml_fields(cls)
    hints = field_types(cls)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        f = fields.get(key)
        if f is None:
            sink.warn(table, key, unknown_key_message(key, fields))
            continue
        cur = getattr(current, f.name) if current is not None else None
        try:
            out[f.name] = convert(hints[f.name], value, cur, sink, child_path(table, key))
        except Reject as e:
            sink.warn(table, key, rejected_message(e, cur) if current is not None else rejected_message(e))
    return out


def decode_table(cls: type, raw: dict, current: Any, sink: Sink, table: str) -> Any:
    """An instance of dataclass `cls`: `current` (or cls()) updated from the TOML table `raw`."""
    obj = copy.deepcopy(current) if isinstance(current, cls) else cls()
    for name, value in decode_present(cls, raw, obj, sink, table).items():
        setattr(obj, name, value)
    return obj


def convert(tp: Any, value: Any, current: Any, sink: Sink, where: str) -> Any:
    """`value` read as type `tp`, updating `current` where the type merges; Reject if it does not fit.

    `where` is the value's own dotted path, the table name for warnings about keys inside it.
    """
    if tp is Any or tp is object:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return convert(args[0], value, current, sink, where)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return convert(options[0], value, current, sink, where)
        for opt in options:
            trial = Sink(sink.file, [])
            try:
                out = convert(opt, value, current, trial, where)
            except Reject:
                continue
            sink.warnings.extend(trial.warnings)
            return out
        raise Reject(f"expected {describe_type(tp)}, got {describe_value(value)}")
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise Reject(f"expected {describe_type(tp)}, got {describe_value(value)}")
    if is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise Reject(f"expected a table, got {describe_value(value)}")
        return decode_table(tp, value, current, sink, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise Reject(f"expected a boolean, got {describe_value(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise Reject(f"expected an integer, got {describe_value(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise Reject(f"expected a number, got {describe_value(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise Reject(f"expected a string, got {describe_value(value)}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if member.value == value and type(member.value) is type(value):
                return member
        raise Reject(f"expected {describe_type(tp)}, got {describe_value(value)}")
    if isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, str):
            return tp(value)
        raise Reject(f"expected a string (a path), got {describe_value(value)}")
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple, set, frozenset):
        return _convert_sequence(tp, origin or tp, args, value, sink, where)
    if origin is dict or tp is dict:
        return _convert_dict(args, value, current, sink, where)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise Reject(f"expected {describe_type(tp)}, got {describe_value(value)}")
    return value  # an annotation we cannot check: taken as is


def _convert_sequence(tp: Any, kind: type, args: tuple, value: Any, sink: Sink, where: str) -> Any:
    if not isinstance(value, list):
        raise Reject(f"expected {describe_type(tp)}, got {describe_value(value)}")
    if kind is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise Reject(f"expected an array of {len(args)} items, got {len(value)}")
        item_types = list(args)
    else:
        item_types = [args[0] if args else Any] * len(value)
    out = []
    for i, (item_tp, item) in enumerate(zip(item_types, value)):
        try:
            out.append(convert(item_tp, item, None, sink, f"{where}[{i}]"))
        except Reject as e:
            raise Reject(f"expected {describe_type(tp)}, item {i} is wrong: {e}") from None
    return out if kind is list else kind(out)


def _convert_dict(args: tuple, value: Any, current: Any, sink: Sink, where: str) -> dict:
    if not isinstance(value, dict):
        raise Reject(f"expected a table, got {describe_value(value)}")
    value_tp = args[1] if len(args) == 2 else Any
    out = dict(current) if isinstance(current, dict) else {}
    for key, item in value.items():
        try:
            out[key] = convert(value_tp, item, out.get(key), sink, child_path(where, key))
        except Reject as e:
            sink.warn(where, key, rejected_message(e))
    return out


# ---- writing -----------------------------------------------------------------------------------

def encode(value: Any, where: str = "") -> Any:
    """`value` as plain TOML-ready data (dicts, lists, scalars); None values are left out."""
    if is_dataclass_type(type(value)):
        out = {}
        for key, f in toml_fields(type(value)).items():
            v = getattr(value, f.name)
            if v is not None:
                out[key] = encode(v, child_path(where, key))
        return out
    if isinstance(value, enum.Enum):
        return encode(value.value, where)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, dict):
        return {str(k): encode(v, child_path(where, str(k))) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [encode(v, f"{where}[{i}]") for i, v in enumerate(value) if v is not None]
    if isinstance(value, (set, frozenset)):
        return [encode(v, where) for v in sorted(value)]
    if isinstance(value, (str, int, float, bool, datetime.date, datetime.time)):
        return value
    raise TypeError(f"{where or 'value'}: a {type(value).__name__} cannot be written as TOML")
