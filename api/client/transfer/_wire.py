"""Hand-written protobuf codecs for the three messages content moves in bulk through
(WriteContentRequest, WriteContentResponse, ReadContentResponse), wire-identical to the generated
ones in api.gen.containerd.services.content.v1 but without betterproto's per-field machinery: a
1 MiB chunk is encoded with one concatenation and decoded with one slice. grpclib's codec calls
`SerializeToString` / `FromString` on them like on any message class.
"""
from __future__ import annotations

from typing import Mapping, Optional

WRITE_STAT, WRITE_WRITE, WRITE_COMMIT = 0, 1, 2


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _field_bytes(num: int, data: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def _field_varint(num: int, value: int) -> bytes:
    return _varint(num << 3) + _varint(value) if value else b""


def _skip(buf: bytes, pos: int, wire: int) -> int:
    if wire == 0:
        return _read_varint(buf, pos)[1]
    if wire == 1:
        return pos + 8
    if wire == 2:
        n, pos = _read_varint(buf, pos)
        return pos + n
    if wire == 5:
        return pos + 4
    raise ValueError(f"unsupported protobuf wire type {wire}")


class WriteRequest:
    """containerd.services.content.v1.WriteContentRequest."""

    __slots__ = ("action", "ref", "total", "expected", "offset", "data", "labels")

    def __init__(self, action: int = WRITE_STAT, ref: str = "", total: int = 0, expected: str = "",
                 offset: int = 0, data: bytes = b"", labels: Optional[Mapping[str, str]] = None):
        self.action, self.ref, self.total, self.expected = action, ref, total, expected
        self.offset, self.data, self.labels = offset, data, labels

    def SerializeToString(self) -> bytes:
        parts = [_field_varint(1, self.action)]
        if self.ref:
            parts.append(_field_bytes(2, self.ref.encode()))
        parts.append(_field_varint(3, self.total))
        if self.expected:
            parts.append(_field_bytes(4, self.expected.encode()))
        parts.append(_field_varint(5, self.offset))
        for k, v in (self.labels or {}).items():
            parts.append(_field_bytes(7, _field_bytes(1, k.encode()) + _field_bytes(2, v.encode())))
        head = b"".join(parts)
        if self.data:
            return head + _varint(6 << 3 | 2) + _varint(len(self.data)) + self.data
        return head

    @classmethod
    def FromString(cls, data: bytes) -> "WriteRequest":  # pragma: no cover - server side only
        raise NotImplementedError


class WriteResponse:
    """containerd.services.content.v1.WriteContentResponse (timestamps skipped)."""

    __slots__ = ("action", "offset", "total", "digest")

    def __init__(self) -> None:
        self.action = self.offset = self.total = 0
        self.digest = ""

    @classmethod
    def FromString(cls, buf: bytes) -> "WriteResponse":
        msg = cls()
        pos, end = 0, len(buf)
        while pos < end:
            key, pos = _read_varint(buf, pos)
            num, wire = key >> 3, key & 7
            if wire == 0 and num in (1, 4, 5):
                value, pos = _read_varint(buf, pos)
                if num == 1:
                    msg.action = value
                elif num == 4:
                    msg.offset = value
                else:
                    msg.total = value
            elif wire == 2 and num == 6:
                n, pos = _read_varint(buf, pos)
                msg.digest = bytes(buf[pos:pos + n]).decode()
                pos += n
            else:
                pos = _skip(buf, pos, wire)
        return msg

    def SerializeToString(self) -> bytes:  # pragma: no cover - server side only
        raise NotImplementedError


class ReadResponse:
    """containerd.services.content.v1.ReadContentResponse."""

    __slots__ = ("offset", "data")

    def __init__(self) -> None:
        self.offset = 0
        self.data = b""

    @classmethod
    def FromString(cls, buf: bytes) -> "ReadResponse":
        msg = cls()
        pos, end = 0, len(buf)
        while pos < end:
            key, pos = _read_varint(buf, pos)
            num, wire = key >> 3, key & 7
            if wire == 0 and num == 1:
                msg.offset, pos = _read_varint(buf, pos)
            elif wire == 2 and num == 2:
                n, pos = _read_varint(buf, pos)
                msg.data = buf[pos:pos + n]
                pos += n
            else:
                pos = _skip(buf, pos, wire)
        return msg

    def SerializeToString(self) -> bytes:  # pragma: no cover
        raise NotImplementedError
