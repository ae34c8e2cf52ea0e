"""Cheaper attribute access for betterproto messages, with the library's exact semantics.

betterproto 2.0's `Message.__getattribute__` and `__setattr__` run on every field read and
write of every message, ours and the well-known types alike: the getter looks up
`_group_current` and the class metadata through itself (nested Python-level calls) and builds a
set per access; the setter probes `hasattr(self, "_group_current")`, which raises and catches an
AttributeError for each field the dataclass `__init__` sets. In our daemon that was about a sixth
of the CPU time of a `ctr run --rm` (py-spy).

The replacements below keep the behaviour:
  * reading a field of a oneof that is not the group's current one raises AttributeError;
  * a field still holding PLACEHOLDER gets its default made, stored and returned;
  * setting a field marks the message as serialized on the wire, setting a oneof field makes
    it the group's current one and resets its siblings to PLACEHOLDER, and an empty message
    stored in a field is itself marked serialized on the wire.
They differ only in where they look things up: the oneof table of a class is read once from
its metadata and kept per class (metadata never changes after it is made).
tests/unit/test_fastmessage.py checks them against the originals.
"""
from __future__ import annotations

from typing import Any

import betterproto
from betterproto import PLACEHOLDER, Message

_raw_get = object.__getattribute__
_raw_set = object.__setattr__
_oneofs: dict[type, dict[str, str]] = {}
_empty_messages: dict[type, bool] = {}  # type of a value set -> is it a message with no fields

ORIGINAL_GETATTRIBUTE = Message.__getattribute__
ORIGINAL_SETATTR = Message.__setattr__


def _oneof_table(cls: type) -> dict[str, str]:
    table = _oneofs.get(cls)
    if table is None:
        table = _oneofs[cls] = dict(cls._betterproto.oneof_group_by_field)
    return table


def _getattribute(self: Message, name: str) -> Any:
    oneofs = _oneofs.get(type(self))
    if oneofs is None:
        oneofs = _oneof_table(type(self))
    if oneofs:
        group = oneofs.get(name)
        if group is not None:
            try:
                current = _raw_get(self, "_group_current")
            except AttributeError:
                pass
            else:
                if current[group] != name:
                    raise AttributeError(f"{group!r} is set to {current[group]!r}, not {name!r}",
                                         name=name, obj=self)
    value = _raw_get(self, name)
    if value is not PLACEHOLDER:
        return value
    value = self._get_field_default(name)
    _raw_set(self, name, value)
    return value


def _is_empty_message(cls: type) -> bool:
    """Whether `cls` is a message class without fields (isinstance on an ABC, per type once)."""
    empty = _empty_messages.get(cls)
    if empty is None:
        empty = _empty_messages[cls] = issubclass(cls, Message) and not cls._betterproto.meta_by_field_name
    return empty


def _setattr(self: Message, attr: str, value: Any) -> None:
    if _is_empty_message(type(value)):
        _raw_set(value, "_serialized_on_wire", True)
    if attr != "_serialized_on_wire":
        _raw_get(self, "__dict__")["_serialized_on_wire"] = True
    oneofs = _oneofs.get(type(self))
    if oneofs is None:
        oneofs = _oneof_table(type(self))
    if oneofs and attr in oneofs:
        try:
            current = _raw_get(self, "_group_current")
        except AttributeError:
            pass  # still in __init__: __post_init__ picks the groups' current fields
        else:
            group = oneofs[attr]
            for field in type(self)._betterproto.oneof_field_by_group[group]:
                if field.name == attr:
                    current[group] = field.name
                else:
                    _raw_set(self, field.name, PLACEHOLDER)
    _raw_set(self, attr, value)


def install() -> None:
    """Put the fast accessors on betterproto.Message (idempotent)."""
    if betterproto.Message.__getattribute__ is not _getattribute:
        betterproto.Message.__getattribute__ = _getattribute
        betterproto.Message.__setattr__ = _setattr
