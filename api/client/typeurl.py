"""Pack generated messages into google.protobuf.Any and unpack them again, by protobuf full name.

containerd puts event payloads in an Any whose type_url is the message's full proto name
("containerd.events.TaskIO"); betterproto renames classes ("TaskIo"), so the exact names are read
once from the .proto sources shipped in pycontainerd.api/protos, and the Python class is found in
the generated module of the same package (pycontainerd.api.gen.<package>). Owns nothing else.
"""
from __future__ import annotations

import importlib
import re
from functools import lru_cache
from pathlib import Path
from typing import Optional

import betterproto
from betterproto.lib.google.protobuf import Any as AnyMessage

GEN_PACKAGE = "pycontainerd.api.gen"
PROTO_DIR = Path(__file__).resolve().parent.parent / "protos"

_PACKAGE_RE = re.compile(r"^\s*package\s+([\w.]+)\s*;", re.M)
# Top-level messages only: "message Name {" at the start of a line (nested ones are indented).
_MESSAGE_RE = re.compile(r"^message\s+(\w+)\s*\{", re.M)


@lru_cache(maxsize=1)
def _proto_names() -> dict[tuple[str, str], str]:
    """{(package, lowercased message name): exact message name} over every shipped .proto."""
    names: dict[tuple[str, str], str] = {}
    for path in sorted(PROTO_DIR.rglob("*.proto")):
        text = path.read_text(encoding="utf-8", errors="replace")
        match = _PACKAGE_RE.search(text)
        if not match:
            continue
        for name in _MESSAGE_RE.findall(text):
            names[(match.group(1), name.lower())] = name
    return names


def full_name(message_or_class) -> str:
    """The protobuf full name of a generated message (instance or class), e.g.
    "containerd.events.NamespaceCreate"."""
    cls = message_or_class if isinstance(message_or_class, type) else type(message_or_class)
    module = cls.__module__
    if not module.startswith(GEN_PACKAGE + "."):
        raise ValueError(f"{cls.__qualname__} is not a generated pycontainerd message")
    package = module[len(GEN_PACKAGE) + 1:]
    name = _proto_names().get((package, cls.__name__.lower()), cls.__name__)
    return f"{package}.{name}"


def pack(message: betterproto.Message, type_url: Optional[str] = None) -> AnyMessage:
    """`message` wrapped in an Any the way containerd's typeurl.MarshalAny does it."""
    return AnyMessage(type_url=type_url or full_name(message), value=bytes(message))


def message_class(type_url: str):
    """The generated class for `type_url` (any "host/" prefix ignored), or None if unknown."""
    name = type_url.rsplit("/", 1)[-1]
    package, _, short = name.rpartition(".")
    if not package or not short:
        return None
    try:
        module = importlib.import_module(f"{GEN_PACKAGE}.{package}")
    except ImportError:
        return None
    wanted = short.lower()
    for attr, value in vars(module).items():
        if (attr.lower() == wanted and isinstance(value, type)
                and issubclass(value, betterproto.Message)):
            return value
    return None


def unpack(any_message: Optional[AnyMessage]):
    """The decoded message inside `any_message`, or None when it is empty or of an unknown type."""
    if any_message is None or not any_message.type_url:
        return None
    cls = message_class(any_message.type_url)
    if cls is None:
        return None
    return cls().parse(any_message.value)
