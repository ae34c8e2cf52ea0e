"""HTTP/2 for our gRPC server: the server side of RFC 9113 that grpclib uses, in place of h2.

grpclib drives an `h2.connection.H2Connection`, and on a unary call h2 (with hyperframe and hpack)
was over half of the daemon's CPU: every frame is parsed into objects, run through two state
machines, logged as a repr, and every header list is validated and HPACK-encoded through the
dynamic table. `ServerConnection` offers the same methods and emits the same `h2.events` classes
as far as grpclib's server uses them, with less per frame:

- Frames are parsed straight from the receive buffer (struct at an offset, no frame objects).
- Header blocks are decoded with the dynamic table the peer keeps (HeaderDecoder, Huffman codes
  through hpack's table), and a block that left the table as it was is remembered: a client
  repeating a call sends the same block of indexes each time. Headers are encoded without the
  dynamic table: static-table indexes and literals "without indexing". An encoding then depends
  only on the header list, so each (name, value) field is encoded once and cached: a response's
  `:status 200`, `content-type` and `grpc-status 0` cost a dict lookup.
- Received data is credited back (WINDOW_UPDATE) only when a quarter of the window has been
  consumed or less than a quarter remains, so small requests cause no window traffic at all.

What it does not do: server push, stream priorities (PRIORITY information is read and ignored, as
RFC 9113 allows), opening streams, and header validation beyond what grpclib relies on (a request
needs :method and :path; names and values must be ASCII). Errors follow RFC 9113: a connection
error queues GOAWAY with its code and raises a `ProtocolError`; a stream error resets that stream
(RST_STREAM) and tells grpclib with a `StreamReset(remote_reset=False)` if it knew the stream.
"""
from __future__ import annotations

import struct
from typing import Any, Callable

from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated, DataReceived, Event, PingAckReceived, PingReceived, RemoteSettingsChanged,
    RequestReceived, SettingsAcknowledged, StreamEnded, StreamReset, TrailersReceived, WindowUpdated,
)
from h2.exceptions import FlowControlError, FrameTooLargeError, ProtocolError, StreamClosedError
from h2.settings import ChangedSetting, SettingCodes
from hpack import HPACKError
from hpack.hpack import decode_integer, encode_integer
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
FLAG_END_STREAM = FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20

WINDOW_MAX = 2 ** 31 - 1
DEFAULT_WINDOW = 65535
FRAME_SIZE_MIN = 16384
FRAME_SIZE_MAX = 2 ** 24 - 1
RESET_MEMORY = 256

# A frame header is 24 bits of length, 8 of type, 8 of flags, 32 of stream id: length and type
# pack together as one 32-bit word.
_HEAD = struct.Struct(">IBI")
_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")
_GOAWAY = struct.Struct(">II")


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return _HEAD.pack(len(payload) << 8 | kind, flags, stream_id) + payload


class Http2Error(ProtocolError):
    """A connection error: GOAWAY with `code` has been queued."""

    def __init__(self, code: ErrorCodes, message: str):
        super().__init__(message)
        self.error_code = code


class _StreamError(Exception):
    def __init__(self, stream_id: int, code: ErrorCodes):
        self.stream_id = stream_id
        self.code = code


# --------------------------------------------------------------------------------------- HPACK out

class _Memo(dict):
    """`make(key)` remembered per key; everything is forgotten once `limit` keys are held."""

    def __init__(self, make: Callable[[Any], Any], limit: int):
        super().__init__()
        self._make = make
        self._limit = limit

    def __missing__(self, key: Any) -> Any:
        value = self._make(key)
        if len(self) >= self._limit:
            self.clear()
        self[key] = value
        return value


def _hpack_str(text: str) -> bytes:
    raw = text.encode("utf-8")
    return bytes(encode_integer(len(raw), 7)) + raw


_STATIC_FIELD: dict[tuple[str, str], int] = {}
_STATIC_NAME: dict[str, int] = {}
for _index, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, 1):
    _STATIC_FIELD.setdefault((_name.decode(), _value.decode()), _index)
    _STATIC_NAME.setdefault(_name.decode(), _index)


def encode_field(name: str, value: str) -> bytes:
    """One header field, never added to the dynamic table (RFC 7541 6.1 and 6.2.2)."""
    index = _STATIC_FIELD.get((name, value))
    if index is not None:
        return bytes((0x80 | index,))
    index = _STATIC_NAME.get(name)
    head = bytes(encode_integer(index, 4)) if index is not None else b"\x00" + _hpack_str(name)
    return head + _hpack_str(value)


# An encoding depends on the field alone, so one cache serves every connection.
_FIELDS = _Memo(lambda field: encode_field(*field), 1024)


# ---------------------------------------------------------------------------------------- HPACK in

class HeaderDecoder:
    """RFC 7541 decoding with the dynamic table the peer's encoder keeps in step with.

    A client repeating a call sends the same block of table indexes every time, and such a block
    means the same headers for as long as the table does not change; so decoded blocks are
    remembered until the next insertion into the table or change of its size. Names and values
    come out as latin-1 text (every byte kept); whether they are ASCII is the caller's question.
    """

    cache_limit = 256

    def __init__(self, max_table_size: int = 4096, max_header_list_size: int = 65536):
        self.max_allowed_table_size = max_table_size
        self.max_header_list_size = max_header_list_size
        self._table_size = max_table_size
        self._dynamic: list[tuple[str, str]] = []   # newest first
        self._used = 0
        self._cache: dict[bytes, list[tuple[str, str]]] = {}

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        cached = self._cache.get(block)
        if cached is not None:
            return list(cached)
        headers: list[tuple[str, str]] = []
        changed = False
        listed = 0
        view = memoryview(block)
        pos, end = 0, len(block)
        while pos < end:
            first = block[pos]
            if first & 0x80:
                index, pos = _read_int(view, pos, 7)
                headers.append(self._entry(index))
            elif first & 0x40:
                name, value, pos = self._literal(view, pos, 6)
                self._insert(name, value)
                headers.append((name, value))
                changed = True
            elif first & 0x20:
                if headers:
                    raise HPACKError("a table size update after a header field")
                size, pos = _read_int(view, pos, 5)
                if size > self.max_allowed_table_size:
                    raise HPACKError(f"table size {size} above the allowed {self.max_allowed_table_size}")
                self._table_size = size
                self._evict(0)
                changed = True
                continue
            else:
                name, value, pos = self._literal(view, pos, 4)
                headers.append((name, value))
            name, value = headers[-1]
            listed += len(name) + len(value) + 32
            if listed > self.max_header_list_size:
                raise HPACKError(f"header list larger than {self.max_header_list_size} bytes")
        if changed:
            self._cache.clear()
        else:
            if len(self._cache) >= self.cache_limit:
                self._cache.clear()
            self._cache[block] = list(headers)
        return headers

    def _entry(self, index: int) -> tuple[str, str]:
        if 0 < index <= _STATIC_COUNT:
            return _STATIC_ENTRIES[index - 1]
        dynamic = index - _STATIC_COUNT - 1
        if index <= 0 or dynamic >= len(self._dynamic):
            raise HPACKError(f"no table entry {index}")
        return self._dynamic[dynamic]

    def _literal(self, view: memoryview, pos: int, prefix: int) -> tuple[str, str, int]:
        index, pos = _read_int(view, pos, prefix)
        if index:
            name = self._entry(index)[0]
        else:
            name, pos = _read_str(view, pos)
        value, pos = _read_str(view, pos)
        return name, value, pos

    def _insert(self, name: str, value: str) -> None:
        size = len(name) + len(value) + 32
        if size > self._table_size:
            self._dynamic.clear()
            self._used = 0
            return
        self._evict(size)
        self._dynamic.insert(0, (name, value))
        self._used += size

    def _evict(self, room: int) -> None:
        while self._dynamic and self._used + room > self._table_size:
            name, value = self._dynamic.pop()
            self._used -= len(name) + len(value) + 32


_STATIC_ENTRIES = [(name.decode("latin-1"), value.decode("latin-1"))
                   for name, value in HeaderTable.STATIC_TABLE]
_STATIC_COUNT = len(_STATIC_ENTRIES)


def _read_int(view: memoryview, pos: int, prefix: int) -> tuple[int, int]:
    value, used = decode_integer(view[pos:], prefix)
    return value, pos + used


# Every connection's first call of a method sends its path as a Huffman literal: decoded once
# per process, not once per connection.
_HUFFMAN = _Memo(lambda raw: decode_huffman(raw).decode("latin-1"), 4096)


def _read_str(view: memoryview, pos: int) -> tuple[str, int]:
    if pos >= len(view):
        raise HPACKError("a truncated string")
    huffman = view[pos] & 0x80
    length, pos = _read_int(view, pos, 7)
    end = pos + length
    if end > len(view):
        raise HPACKError("a truncated string")
    raw = view[pos:end].tobytes()
    return (_HUFFMAN[raw] if huffman else raw.decode("latin-1")), end


# ----------------------------------------------------------------------------------------- streams

class _Inbound:
    """A receive window: what the peer may still send, and the consumed bytes not yet credited
    back. Credit goes out once it is a quarter of the window or less than a quarter is left."""

    __slots__ = ("left", "size", "unacked")

    def __init__(self, size: int):
        self.left = self.size = size
        self.unacked = 0

    def grow(self, increment: int) -> None:
        self.left += increment
        self.size += increment

    def credit(self, consumed: int) -> int:
        """The WINDOW_UPDATE increment to send now for `consumed` more bytes (0: none yet)."""
        self.unacked += consumed
        quarter = self.size >> 2
        if not self.unacked or (self.unacked < quarter and self.left >= quarter):
            return 0
        increment, self.unacked = self.unacked, 0
        self.left += increment
        return increment


class _Stream:
    """A stream the peer opened and that is not closed yet (closed streams leave `streams`)."""

    __slots__ = ("stream_id", "window", "inbound", "recv_ended", "sent_ended")

    def __init__(self, stream_id: int, window: int, inbound: int):
        self.stream_id = stream_id
        self.window = window            # what we may still send
        self.inbound = _Inbound(inbound)
        self.recv_ended = False
        self.sent_ended = False

    open = property(lambda self: True)
    closed = property(lambda self: False)


class _LocalSettings:
    def __init__(self) -> None:
        self.header_table_size = 4096
        self.max_concurrent_streams = 100
        self.initial_window_size = DEFAULT_WINDOW
        self.max_frame_size = FRAME_SIZE_MIN
        self.max_header_list_size = 65536


class _StateMachine:
    def __init__(self) -> None:
        self.state = ConnectionState.IDLE


# ------------------------------------------------------------------------------------- connection

class ServerConnection:
    """The server end of one HTTP/2 connection, with h2's `H2Connection` interface (the part
    grpclib's server uses). Sans-IO: bytes in through `receive_data`, out through `data_to_send`."""

    def __init__(self) -> None:
        self.local_settings = _LocalSettings()
        self.state_machine = _StateMachine()
        self.streams: dict[int, _Stream] = {}
        self.max_outbound_frame_size = FRAME_SIZE_MIN
        self._out: list[bytes] = []
        self._buffer = b""
        self._preface = False
        self._decoder = HeaderDecoder(self.local_settings.header_table_size,
                                      self.local_settings.max_header_list_size)
        self._table_size_update = False
        self._highest = 0                      # highest stream id the peer opened
        self._block: list[bytes] | None = None  # a header block waiting for CONTINUATION
        self._block_stream = 0
        self._block_size = 0
        self._block_end_stream = False
        self._reset: dict[int, None] = {}      # recently reset stream ids, oldest first
        self._pending_settings: list[dict[Any, int]] = []
        self._inbound_initial = DEFAULT_WINDOW
        self._peer_initial = DEFAULT_WINDOW
        self._window = DEFAULT_WINDOW          # connection: what we may still send
        self._inbound = _Inbound(DEFAULT_WINDOW)  # connection: what the peer may still send

    # -------------------------------------------------------------------------- what grpclib calls

    def initiate_connection(self) -> None:
        s = self.local_settings
        self.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: s.max_concurrent_streams,
                              SettingCodes.MAX_HEADER_LIST_SIZE: s.max_header_list_size})
        self.state_machine.state = ConnectionState.SERVER_OPEN

    def update_settings(self, changes: dict[Any, int]) -> None:
        self._pending_settings.append(dict(changes))
        self._out.append(_frame(SETTINGS, 0, 0, b"".join(
            _SETTING.pack(int(code), value) for code, value in changes.items())))

    def increment_flow_control_window(self, increment: int) -> None:
        self._inbound.grow(increment)
        self._out.append(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(increment)))

    def data_to_send(self, amount: int | None = None) -> bytes:
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def local_flow_control_window(self, stream_id: int) -> int:
        return min(self._window, self._stream(stream_id).window)

    def send_headers(self, stream_id: int, headers: list[tuple[str, str]],
                     end_stream: bool = False) -> None:
        stream = self._stream(stream_id)
        block = b"".join([_FIELDS[field] for field in headers])
        if self._table_size_update:
            self._table_size_update = False
            block = b"\x20" + block
        flags = FLAG_END_STREAM if end_stream else 0
        size = self.max_outbound_frame_size
        if len(block) <= size:
            self._out.append(_frame(HEADERS, flags | FLAG_END_HEADERS, stream_id, block))
        else:
            chunks = [block[i:i + size] for i in range(0, len(block), size)]
            self._out.append(_frame(HEADERS, flags, stream_id, chunks[0]))
            for i, chunk in enumerate(chunks[1:], 2):
                last = FLAG_END_HEADERS if i == len(chunks) else 0
                self._out.append(_frame(CONTINUATION, last, stream_id, chunk))
        if end_stream:
            self._sent_end(stream)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        stream = self._stream(stream_id)
        size = len(data)
        if size > self._window or size > stream.window:
            raise FlowControlError(f"{size} bytes exceed the flow control window")
        if size > self.max_outbound_frame_size:
            raise FrameTooLargeError(f"{size} bytes exceed the peer's frame size")
        self._window -= size
        stream.window -= size
        self._out.append(_frame(DATA, FLAG_END_STREAM if end_stream else 0, stream_id, data))
        if end_stream:
            self._sent_end(stream)

    def end_stream(self, stream_id: int) -> None:
        stream = self._stream(stream_id)
        self._out.append(_frame(DATA, FLAG_END_STREAM, stream_id))
        self._sent_end(stream)

    def reset_stream(self, stream_id: int, error_code: int = 0) -> None:
        if self.streams.pop(stream_id, None) is None:
            raise StreamClosedError(stream_id)
        self._was_reset(stream_id)
        self._out.append(_frame(RST_STREAM, 0, stream_id, _U32.pack(error_code)))

    def ping(self, opaque_data: bytes) -> None:
        if len(opaque_data) != 8:
            raise ValueError("a PING carries 8 bytes")
        self._out.append(_frame(PING, 0, 0, opaque_data))

    def acknowledge_received_data(self, acknowledged_size: int, stream_id: int) -> None:
        self._credit(acknowledged_size)
        stream = self.streams.get(stream_id)
        if stream is not None and not stream.recv_ended:
            increment = stream.inbound.credit(acknowledged_size)
            if increment:
                self._out.append(_frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment)))

    # ----------------------------------------------------------------------------------- receiving

    def receive_data(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        if self.state_machine.state is ConnectionState.CLOSED:
            return events
        buf = self._buffer + data if self._buffer else data
        pos = 0
        try:
            if not self._preface:
                if len(buf) < len(PREFACE):
                    if not PREFACE.startswith(buf):
                        raise Http2Error(ErrorCodes.PROTOCOL_ERROR, "invalid connection preface")
                    self._buffer = buf
                    return events
                if not buf.startswith(PREFACE):
                    raise Http2Error(ErrorCodes.PROTOCOL_ERROR, "invalid connection preface")
                self._preface = True
                pos = len(PREFACE)
            end = len(buf)
            limit = self.local_settings.max_frame_size
            while end - pos >= 9:
                word, flags, stream_id = _HEAD.unpack_from(buf, pos)
                length = word >> 8
                if length > limit:
                    raise Http2Error(ErrorCodes.FRAME_SIZE_ERROR,
                                     f"a frame of {length} bytes exceeds {limit}")
                if end - pos - 9 < length:
                    break
                payload = buf[pos + 9:pos + 9 + length]
                pos += 9 + length
                try:
                    self._on_frame(word & 0xFF, flags, stream_id & 0x7FFFFFFF, payload, events)
                except _StreamError as e:
                    self._stream_error(e.stream_id, e.code, events)
                if self.state_machine.state is ConnectionState.CLOSED:
                    pos = end
                    break
        except Http2Error as e:
            self.state_machine.state = ConnectionState.CLOSED
            self._buffer = b""
            self._out.append(_frame(GOAWAY, 0, 0, _GOAWAY.pack(self._highest, e.error_code)))
            raise
        self._buffer = buf[pos:] if pos < end else b""
        return events

    def _on_frame(self, kind: int, flags: int, stream_id: int, payload: bytes,
                  events: list[Event]) -> None:
        if self._block is not None and (kind != CONTINUATION or stream_id != self._block_stream):
            raise Http2Error(ErrorCodes.PROTOCOL_ERROR, "a header block was interrupted")
        if kind == DATA:
            self._data(flags, stream_id, payload, events)
        elif kind == HEADERS:
            self._headers(flags, stream_id, payload, events)
        elif kind == CONTINUATION:
            if self._block is None:
                raise Http2Error(ErrorCodes.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            self._block.append(payload)
            self._block_size += len(payload)
            if self._block_size > self.local_settings.max_header_list_size:
                raise Http2Error(ErrorCodes.ENHANCE_YOUR_CALM, "a header block without end")
            if flags & FLAG_END_HEADERS:
                block, self._block = b"".join(self._block), None
                self._header_block(stream_id, block, self._block_end_stream, events)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload, events)
        elif kind == SETTINGS:
            self._settings(flags, stream_id, payload, events)
        elif kind == PING:
            if stream_id:
                raise Http2Error(ErrorCodes.PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise Http2Error(ErrorCodes.FRAME_SIZE_ERROR, "PING must carry 8 bytes")
            if flags & FLAG_ACK:
                events.append(PingAckReceived(ping_data=payload))
            else:
                self._out.append(_frame(PING, FLAG_ACK, 0, payload))
                events.append(PingReceived(ping_data=payload))
        elif kind == RST_STREAM:
            self._rst_stream(stream_id, payload, events)
        elif kind == PRIORITY:
            if not stream_id:
                raise Http2Error(ErrorCodes.PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                raise _StreamError(stream_id, ErrorCodes.FRAME_SIZE_ERROR)
        elif kind == GOAWAY:
            if stream_id:
                raise Http2Error(ErrorCodes.PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise Http2Error(ErrorCodes.FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
            last, code = _GOAWAY.unpack_from(payload)
            event = ConnectionTerminated()
            event.last_stream_id = last & 0x7FFFFFFF
            event.error_code = _error_code(code)
            event.additional_data = payload[8:] or None
            events.append(event)
            self.state_machine.state = ConnectionState.CLOSED
        elif kind == PUSH_PROMISE:
            raise Http2Error(ErrorCodes.PROTOCOL_ERROR, "a client cannot push")

    def _data(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if not stream_id:
            raise Http2Error(ErrorCodes.PROTOCOL_ERROR, "DATA on stream 0")
        flow = len(payload)
        self._inbound.left -= flow
        if self._inbound.left < 0:
            raise Http2Error(ErrorCodes.FLOW_CONTROL_ERROR, "the peer overran the connection window")
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self._highest:
                raise Http2Error(ErrorCodes.PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            self._credit(flow)
            return
        if stream.recv_ended:
            self._credit(flow)
            raise _StreamError(stream_id, ErrorCodes.STREAM_CLOSED)
        stream.inbound.left -= flow
        if stream.inbound.left < 0:
            self._credit(flow)
            raise _StreamError(stream_id, ErrorCodes.FLOW_CONTROL_ERROR)
        if flags & FLAG_PADDED:
            payload = _unpad(payload)
        event = DataReceived(stream_id=stream_id, data=payload, flow_controlled_length=flow)
        events.append(event)
        if flags & FLAG_END_STREAM:
            event.stream_ended = self._recv_end(stream, events)

    def _headers(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if not stream_id:
            raise Http2Error(ErrorCodes.PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & FLAG_PADDED:
            payload = _unpad(payload)
        if flags & FLAG_PRIORITY:
            if len(payload) < 5:
                raise Http2Error(ErrorCodes.FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            payload = payload[5:]
        end_stream = bool(flags & FLAG_END_STREAM)
        if flags & FLAG_END_HEADERS:
            self._header_block(stream_id, payload, end_stream, events)
        else:
            self._block = [payload]
            self._block_size = len(payload)
            self._block_stream = stream_id
            self._block_end_stream = end_stream

    def _header_block(self, stream_id: int, block: bytes, end_stream: bool,
                      events: list[Event]) -> None:
        try:
            headers = self._decoder.decode(block)
        except HPACKError as e:
            raise Http2Error(ErrorCodes.COMPRESSION_ERROR, f"cannot decode a header block: {e}")
        stream = self.streams.get(stream_id)
        if stream is not None:
            if stream.recv_ended:
                raise _StreamError(stream_id, ErrorCodes.STREAM_CLOSED)
            if not end_stream:
                raise Http2Error(ErrorCodes.PROTOCOL_ERROR, "trailers without END_STREAM")
            if not _is_ascii(headers):
                raise _StreamError(stream_id, ErrorCodes.PROTOCOL_ERROR)
            event = TrailersReceived(stream_id=stream_id, headers=headers)
            events.append(event)
            event.stream_ended = self._recv_end(stream, events)
            return
        if stream_id in self._reset:
            return
        if not stream_id & 1 or stream_id <= self._highest:
            raise Http2Error(ErrorCodes.PROTOCOL_ERROR, f"a client cannot open stream {stream_id}")
        self._highest = stream_id
        if len(self.streams) >= self.local_settings.max_concurrent_streams:
            self._stream_error(stream_id, ErrorCodes.REFUSED_STREAM, events)
            return
        if not _is_ascii(headers) or not _is_request(headers):
            self._stream_error(stream_id, ErrorCodes.PROTOCOL_ERROR, events)
            return
        inbound = self._inbound_initial
        for pending in self._pending_settings:
            inbound = max(inbound, pending.get(SettingCodes.INITIAL_WINDOW_SIZE, inbound))
        stream = _Stream(stream_id, self._peer_initial, inbound)
        self.streams[stream_id] = stream
        event = RequestReceived(stream_id=stream_id, headers=headers)
        events.append(event)
        if end_stream:
            event.stream_ended = self._recv_end(stream, events)

    def _window_update(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            raise Http2Error(ErrorCodes.FRAME_SIZE_ERROR, "WINDOW_UPDATE must carry 4 bytes")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not stream_id:
            if not increment:
                raise Http2Error(ErrorCodes.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._window += increment
            if self._window > WINDOW_MAX:
                raise Http2Error(ErrorCodes.FLOW_CONTROL_ERROR, "the connection window overflowed")
            events.append(WindowUpdated(stream_id=0, delta=increment))
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self._highest:
                raise Http2Error(ErrorCodes.PROTOCOL_ERROR,
                                 f"WINDOW_UPDATE on idle stream {stream_id}")
            return
        if not increment:
            raise _StreamError(stream_id, ErrorCodes.PROTOCOL_ERROR)
        stream.window += increment
        if stream.window > WINDOW_MAX:
            raise _StreamError(stream_id, ErrorCodes.FLOW_CONTROL_ERROR)
        events.append(WindowUpdated(stream_id=stream_id, delta=increment))

    def _settings(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id:
            raise Http2Error(ErrorCodes.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & FLAG_ACK:
            if payload:
                raise Http2Error(ErrorCodes.FRAME_SIZE_ERROR, "a SETTINGS ACK carries nothing")
            event = SettingsAcknowledged()
            if self._pending_settings:
                for code, value in self._pending_settings.pop(0).items():
                    event.changed_settings[code] = self._apply_local(code, value)
            events.append(event)
            return
        if len(payload) % 6:
            raise Http2Error(ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        event = RemoteSettingsChanged()
        for offset in range(0, len(payload), 6):
            code, value = _SETTING.unpack_from(payload, offset)
            try:
                code = SettingCodes(code)
            except ValueError:
                continue
            original = self._apply_remote(code, value)
            event.changed_settings[code] = ChangedSetting(code, original, value)
        self._out.append(_frame(SETTINGS, FLAG_ACK, 0))
        events.append(event)

    def _apply_remote(self, code: SettingCodes, value: int) -> int | None:
        if code == SettingCodes.INITIAL_WINDOW_SIZE:
            if value > WINDOW_MAX:
                raise Http2Error(ErrorCodes.FLOW_CONTROL_ERROR, f"initial window {value} too big")
            original, self._peer_initial = self._peer_initial, value
            delta = value - original
            for stream in self.streams.values():
                stream.window += delta
                if stream.window > WINDOW_MAX:
                    raise Http2Error(ErrorCodes.FLOW_CONTROL_ERROR, "a stream window overflowed")
            return original
        if code == SettingCodes.MAX_FRAME_SIZE:
            if not FRAME_SIZE_MIN <= value <= FRAME_SIZE_MAX:
                raise Http2Error(ErrorCodes.PROTOCOL_ERROR, f"max frame size {value} out of range")
            original, self.max_outbound_frame_size = self.max_outbound_frame_size, value
            return original
        if code == SettingCodes.ENABLE_PUSH:
            if value > 1:
                raise Http2Error(ErrorCodes.PROTOCOL_ERROR, f"ENABLE_PUSH of {value}")
        elif code == SettingCodes.HEADER_TABLE_SIZE:
            self._table_size_update = True
        return None

    def _apply_local(self, code: Any, value: int) -> ChangedSetting:
        s = self.local_settings
        if code == SettingCodes.INITIAL_WINDOW_SIZE:
            original, s.initial_window_size = s.initial_window_size, value
            self._inbound_initial = value
        elif code == SettingCodes.MAX_CONCURRENT_STREAMS:
            original, s.max_concurrent_streams = s.max_concurrent_streams, value
        elif code == SettingCodes.MAX_FRAME_SIZE:
            original, s.max_frame_size = s.max_frame_size, value
        elif code == SettingCodes.MAX_HEADER_LIST_SIZE:
            original, s.max_header_list_size = s.max_header_list_size, value
            self._decoder.max_header_list_size = value
        else:
            original = None
        return ChangedSetting(code, original, value)

    def _rst_stream(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if not stream_id:
            raise Http2Error(ErrorCodes.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise Http2Error(ErrorCodes.FRAME_SIZE_ERROR, "RST_STREAM must carry 4 bytes")
        if stream_id > self._highest:
            raise Http2Error(ErrorCodes.PROTOCOL_ERROR, f"RST_STREAM on idle stream {stream_id}")
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            self._was_reset(stream_id)
            events.append(StreamReset(stream_id=stream_id,
                                      error_code=_error_code(_U32.unpack(payload)[0]),
                                      remote_reset=True))

    # ----------------------------------------------------------------------------------- internals

    def _stream(self, stream_id: int) -> _Stream:
        stream = self.streams.get(stream_id)
        if stream is None or stream.sent_ended:
            raise StreamClosedError(stream_id)
        return stream

    def _recv_end(self, stream: _Stream, events: list[Event]) -> StreamEnded:
        stream.recv_ended = True
        if stream.sent_ended:
            del self.streams[stream.stream_id]
        ended = StreamEnded(stream_id=stream.stream_id)
        events.append(ended)
        return ended

    def _sent_end(self, stream: _Stream) -> None:
        stream.sent_ended = True
        if stream.recv_ended:
            del self.streams[stream.stream_id]

    def _stream_error(self, stream_id: int, code: ErrorCodes, events: list[Event]) -> None:
        self._out.append(_frame(RST_STREAM, 0, stream_id, _U32.pack(code)))
        self._was_reset(stream_id)
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            events.append(StreamReset(stream_id=stream_id, error_code=code, remote_reset=False))

    def _was_reset(self, stream_id: int) -> None:
        """Remember `stream_id` for a while: frames the peer sent before it knew are ignored."""
        reset = self._reset
        reset[stream_id] = None
        if len(reset) > RESET_MEMORY:
            del reset[next(iter(reset))]

    def _credit(self, size: int) -> None:
        """Connection-level credit for `size` consumed bytes, sent once it is worth a frame."""
        increment = self._inbound.credit(size)
        if increment:
            self._out.append(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(increment)))


def _unpad(payload: bytes) -> bytes:
    if not payload or payload[0] >= len(payload):
        raise Http2Error(ErrorCodes.PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1:len(payload) - payload[0]]


def _error_code(code: int) -> ErrorCodes | int:
    try:
        return ErrorCodes(code)
    except ValueError:
        return code


def _is_ascii(headers: list[tuple[str, str]]) -> bool:
    for name, value in headers:
        if not (name.isascii() and value.isascii()):
            return False
    return True


def _is_request(headers: list[tuple[str, str]]) -> bool:
    method = path = False
    for name, _ in headers:
        if name[:1] != ":":
            break
        if name == ":method":
            method = True
        elif name == ":path":
            path = True
    return method and path
