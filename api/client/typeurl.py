"""Pack generated messages into google.protobuf.Any and unpack them again, by protobuf full name.

containerd puts event payloads in an Any whose type_url is the message's full proto name
("containerd.events.TaskIO"); betterproto renames classes ("TaskIo"), so both directions go
through the generated name table in pycontainerd.api.gen.registry. Owns nothing else.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import betterproto
from betterproto.lib.google.protobuf import Any as AnyMessage

from pycontainerd.api.gen import registry


@lru_cache(maxsize=1)
def _names_by_class() -> dict[tuple[str, str], str]:
    return {location: name for name, location in registry.MESSAGES.items()}


def full_name(message_or_class) -> str:
    """The protobuf full name of a generated message (instance or class), e.g.
    "containerd.events.TaskIO"."""
    cls = message_or_class if isinstance(message_or_class, type) else type(message_or_class)
    try:
        return _names_by_class()[(cls.__module__, cls.__name__)]
    except KeyError:
        raise ValueError(f"{cls.__module__}.{cls.__qualname__} is not a registered generated "
                         "message; pass type_url= explicitly") from None


def pack(message: betterproto.Message, type_url: Optional[str] = None) -> AnyMessage:
    """`message` wrapped in an Any the way containerd's typeurl.MarshalAny does it."""
    return AnyMessage(type_url=type_url or full_name(message), value=bytes(message))


def message_class(type_url: str):
    """The generated class for `type_url` (any "host/" prefix ignored), or None if unknown."""
    try:
        return registry.message_class(type_url)
    except (KeyError, ImportError, AttributeError):
        return None


def unpack(any_message: Optional[AnyMessage]):
    """The decoded message inside `any_message`, or None when it is empty or of an unknown type."""
    if any_message is None or not any_message.type_url:
        return None
    cls = message_class(any_message.type_url)
    if cls is None:
        return None
    return cls().parse(any_message.value)
