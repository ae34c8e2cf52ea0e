"""Protobuf encoding by hand for the messages the project does not generate (containerd's cgroups
metrics), in proto3's wire format as gogo marshals it: scalars omitted when zero, a sub-message
present (possibly empty) when set, repeated scalars packed, fields in the order they are added."""
from __future__ import annotations

_MASK64 = (1 << 64) - 1


def varint(value: int) -> bytes:
    value &= _MASK64
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(num: int, wire: int) -> bytes:
    return varint((num << 3) | wire)


class Msg:
    """A message being built: `m.u64(1, 5); m.str(2, "x"); m.msg(3, sub); bytes = m.bytes()`."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u64(self, num: int, value: int) -> "Msg":
        if value:
            self._parts.append(_tag(num, 0) + varint(value))
        return self

    def str(self, num: int, value: str) -> "Msg":
        if value:
            data = value.encode()
            self._parts.append(_tag(num, 2) + varint(len(data)) + data)
        return self

    def msg(self, num: int, sub: "Msg | None") -> "Msg":
        if sub is not None:
            data = sub.bytes()
            self._parts.append(_tag(num, 2) + varint(len(data)) + data)
        return self

    def packed(self, num: int, values: list[int]) -> "Msg":
        if values:
            data = b"".join(varint(v) for v in values)
            self._parts.append(_tag(num, 2) + varint(len(data)) + data)
        return self

    def bytes(self) -> bytes:
        return b"".join(self._parts)
