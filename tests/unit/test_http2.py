"""core/http2.py: the server side of HTTP/2 that grpclib runs on instead of h2's H2Connection.

ServerConnection offers the part of h2.connection.H2Connection that grpclib's server uses and emits
h2's own event classes, so every test here runs twice through the `make_server` fixture: once on
ours and once on h2's H2Connection configured the way grpclib configures it (the reference
adapter). A test that passes on h2 shows the test itself is right, which is how this file was
checked before ours existed; where ours differs from h2 on purpose (no HPACK dynamic table when
encoding, lazy WINDOW_UPDATEs, stream errors where h2 drops the whole connection, a refused stream
past MAX_CONCURRENT_STREAMS), a test asserts what each side does or runs on ours only.

The peer is a real h2 client connection, wired back to back in memory (`Wire`), or frames built
by hand with hyperframe for what a well-behaved client never sends. Checked:
  - round trips: handshake, gRPC unary calls, 300 calls on one connection (the client's HPACK
    dynamic table in use), interleaved streams, header blocks over CONTINUATION frames both ways,
    padding, priority information (ignored), PING, SETTINGS, WINDOW_UPDATE, RST_STREAM, GOAWAY;
  - flow control both ways: the server's send window, a 5 MiB response, a 20 MiB upload that
    must never stall, DATA on finished streams still credited to the connection;
  - hostile input: each connection error raises ProtocolError and queues a GOAWAY with the right
    code, each stream error resets the stream only;
  - input split at any byte boundary yields the same events as the whole input.
"""
from __future__ import annotations

import base64
import random
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import pytest
from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    PingAckReceived,
    PingReceived,
    PriorityUpdated,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    SettingsAcknowledged,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    UnknownFrameReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes
from hpack import Decoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MiB = 1 << 20
DEFAULT_WINDOW = 65535

# How grpclib configures h2 for a server; ServerConnection always behaves like this.
H2_SERVER_CONFIG = H2Configuration(
    client_side=False, header_encoding="ascii",
    validate_inbound_headers=False, validate_outbound_headers=False,
    normalize_inbound_headers=False, normalize_outbound_headers=False,
)


def h2_server() -> H2Connection:
    """The reference adapter: h2's own connection, as grpclib builds it."""
    return H2Connection(config=H2_SERVER_CONFIG)


def h2_client() -> H2Connection:
    return H2Connection(config=H2Configuration(client_side=True, header_encoding="ascii"))


@pytest.fixture(params=["h2", "ours"])
def make_server(request) -> Callable[[], Any]:
    """A factory of fresh server connections: h2's (the reference) or ours."""
    if request.param == "h2":
        return h2_server
    try:
        from pycontainerd.core.http2 import ServerConnection
    except ImportError as e:
        pytest.skip(f"pycontainerd.core.http2 is not importable yet: {e}")
    return ServerConnection


@pytest.fixture
def impl(make_server) -> str:
    return "h2" if make_server is h2_server else "ours"


def only_ours(impl: str, why: str) -> None:
    if impl != "ours":
        pytest.skip(f"intentional difference from h2: {why}")


# -- frames on the wire --------------------------------------------------------------------------

def raw(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """A frame byte for byte, for what hyperframe refuses to build (bad lengths, unknown types)."""
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) + payload


def raw_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of each frame, for what hyperframe would refuse to parse."""
    frames, pos = [], 0
    while pos < len(data):
        head = data[pos:pos + 9]
        length = int.from_bytes(head[:3], "big")
        frames.append((head[3], head[4], int.from_bytes(head[5:], "big"), data[pos + 9:pos + 9 + length]))
        pos += 9 + length
    return frames


def parse(data: bytes) -> list[Frame]:
    frames, pos = [], 0
    while pos < len(data):
        frame, length = Frame.parse_frame_header(memoryview(data[pos:pos + 9]))
        frame.parse_body(memoryview(data[pos + 9:pos + 9 + length]))
        frames.append(frame)
        pos += 9 + length
    assert pos == len(data), "the server wrote a truncated frame"
    return frames


def goaway_code(data: bytes) -> int | None:
    codes = [f.error_code for f in parse(data) if isinstance(f, GoAwayFrame)]
    assert len(codes) <= 1, f"more than one GOAWAY: {codes}"
    return codes[0] if codes else None


def resets(data: bytes) -> dict[int, int]:
    return {f.stream_id: f.error_code for f in parse(data) if isinstance(f, RstStreamFrame)}


def window_credit(data: bytes, stream_id: int) -> int:
    return sum(f.window_increment for f in parse(data)
               if isinstance(f, WindowUpdateFrame) and f.stream_id == stream_id)


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out, value = bytearray([first | limit]), value - limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def hpack_literal(headers: Iterable[tuple[str, str | bytes]], *, index: bool = False) -> bytes:
    """A header block of literals with new names, no Huffman: decodable by any HPACK decoder, and
    touching the peer's dynamic table only with index=True (literal with incremental indexing)."""
    out = bytearray()
    for name, value in headers:
        out.append(0x40 if index else 0x00)
        for s in (name.encode(), value if isinstance(value, bytes) else value.encode()):
            out += _hpack_int(len(s), 7) + s
    return bytes(out)


def headers_frame(stream_id: int, headers: Iterable[tuple[str, str | bytes]], *, end_stream: bool = False,
                  index: bool = False) -> bytes:
    flags = ["END_HEADERS"] + (["END_STREAM"] if end_stream else [])
    return HeadersFrame(stream_id, hpack_literal(headers, index=index), flags=flags).serialize()


def data_frame(stream_id: int, data: bytes, *, end_stream: bool = False, pad_length: int | None = None) -> bytes:
    flags = (["END_STREAM"] if end_stream else []) + (["PADDED"] if pad_length is not None else [])
    return DataFrame(stream_id, data, flags=flags, pad_length=pad_length or 0).serialize()


# -- gRPC-shaped messages ------------------------------------------------------------------------

def grpc_request(path: str = "/containerd.services.version.v1.Version/Version",
                 extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    trace = base64.b64encode(bytes(range(0, 256, 7))).decode().rstrip("=")
    return [
        (":method", "POST"), (":scheme", "http"), (":path", path),
        (":authority", "unix:///run/containerd/containerd.sock"),
        ("content-type", "application/grpc"), ("te", "trailers"), ("grpc-timeout", "9999999u"),
        ("user-agent", "grpc-go/1.59.0"), ("containerd-namespace", "default"),
        ("grpc-trace-bin", trace), *extra,
    ]


def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(payload)) + payload


REQ = [(":method", "POST"), (":scheme", "http"), (":path", "/a.B/C"), (":authority", "x")]
RESPONSE = [(":status", "200"), ("content-type", "application/grpc")]
TRAILERS = [("grpc-status", "0"), ("grpc-message", "")]


# -- events ------------------------------------------------------------------------------------

IGNORED = (PriorityUpdated, UnknownFrameReceived)  # h2 reports these; ours ignores the frames


def summary(events: Iterable[Event]) -> list[tuple]:
    """The attributes grpclib reads from each event, as comparable tuples."""
    out: list[tuple] = []
    for e in events:
        name = type(e).__name__
        if isinstance(e, IGNORED):
            continue
        if isinstance(e, (RequestReceived, ResponseReceived, TrailersReceived)):
            headers = [tuple(h) for h in e.headers]
            assert all(type(n) is str and type(v) is str for n, v in headers), headers
            out.append((name, e.stream_id, headers, bool(e.stream_ended)))
        elif isinstance(e, DataReceived):
            out.append((name, e.stream_id, bytes(e.data), e.flow_controlled_length, bool(e.stream_ended)))
        elif isinstance(e, StreamEnded):
            out.append((name, e.stream_id))
        elif isinstance(e, StreamReset):
            out.append((name, e.stream_id, int(e.error_code), e.remote_reset))
        elif isinstance(e, WindowUpdated):
            out.append((name, e.stream_id, e.delta))
        elif isinstance(e, RemoteSettingsChanged):
            known = {int(k): v.new_value for k, v in e.changed_settings.items() if k in set(SettingCodes)}
            if known:
                out.append((name, known))
        elif isinstance(e, (PingReceived, PingAckReceived)):
            out.append((name, bytes(e.ping_data)))
        elif isinstance(e, ConnectionTerminated):
            out.append((name, int(e.error_code), e.last_stream_id, e.additional_data or b""))
        elif isinstance(e, SettingsAcknowledged):
            out.append((name,))
        else:
            raise AssertionError(f"unexpected event {e!r}")
    return out


def request(sid: int, headers: list, end: bool = False) -> tuple:
    return ("RequestReceived", sid, [tuple(h) for h in headers], end)


def data(sid: int, payload: bytes, *, ended: bool = False, length: int | None = None) -> tuple:
    return ("DataReceived", sid, payload, len(payload) if length is None else length, ended)


def ended(sid: int) -> tuple:
    return ("StreamEnded", sid)


# -- a server and a real h2 client, back to back -------------------------------------------------

class Wire:
    """The server under test and an h2 client connection, connected in memory."""

    def __init__(self, server: Any, client: H2Connection | None = None) -> None:
        self.server = server
        self.client = client or h2_client()
        self.down = b""  # the server's bytes last delivered to the client

    def handshake(self, *, initiate_server: bool = True) -> None:
        if initiate_server:
            self.server.initiate_connection()
        self.client.initiate_connection()
        self.exchange()

    def to_server(self, data: bytes | None = None) -> list[Event]:
        data = self.client.data_to_send() if data is None else data
        return self.server.receive_data(data) if data else []

    def to_client(self) -> list[Event]:
        self.down = self.server.data_to_send()
        if not self.down:
            return []
        for f in parse(self.down):  # what h2's client might forgive or report only as an event
            assert not isinstance(f, WindowUpdateFrame) or f.window_increment > 0, "a WINDOW_UPDATE of 0"
            assert not isinstance(f, GoAwayFrame), f"the server sent {f}"
        return self.client.receive_data(self.down)

    def exchange(self) -> tuple[list[Event], list[Event]]:
        """Moves bytes both ways until both sides are quiet."""
        server_events: list[Event] = []
        client_events: list[Event] = []
        for _ in range(20):
            up = self.client.data_to_send()
            if up:
                server_events += self.server.receive_data(up)
            down = self.server.data_to_send()
            if down:
                client_events += self.client.receive_data(down)
            if not up and not down:
                return server_events, client_events
        raise AssertionError("the connection never went quiet")

    def respond(self, sid: int, payload: bytes, *, trailers: list = TRAILERS,
                headers: list = RESPONSE) -> list[Event]:
        self.server.send_headers(sid, headers)
        self.server.send_data(sid, grpc_message(payload))
        self.server.send_headers(sid, trailers, end_stream=True)
        return self.to_client()


def started(make_server: Callable[[], Any]) -> Any:
    """A server past the handshake with a hand-made client (preface and empty SETTINGS)."""
    server = make_server()
    server.initiate_connection()
    server.receive_data(PREFACE + SettingsFrame(0).serialize())
    server.data_to_send()
    return server


def unary(w: Wire, sid: int, headers: list, body: bytes) -> list[Event]:
    w.client.send_headers(sid, headers)
    w.client.send_data(sid, body, end_stream=True)
    return w.to_server()


def assert_gone_or_closed(impl: str, server: Any, sid: int) -> None:
    if impl == "ours":
        assert sid not in server.streams, "a finished stream stays in ServerConnection.streams"
    else:
        assert sid not in server.streams or server.streams[sid].closed


# == round trips with a real client ==============================================================

def test_handshake(make_server):
    server = make_server()
    client = h2_client()
    server.initiate_connection()
    settings = server.data_to_send()
    frames = parse(settings)
    assert [type(f) for f in frames] == [SettingsFrame] and "ACK" not in frames[0].flags
    assert frames[0].settings.get(SettingCodes.MAX_CONCURRENT_STREAMS) == 100

    client.initiate_connection()
    events = server.receive_data(client.data_to_send())
    assert [type(e) for e in events] == [RemoteSettingsChanged]
    changed = events[0].changed_settings
    assert changed[SettingCodes.INITIAL_WINDOW_SIZE].new_value == DEFAULT_WINDOW
    assert changed[SettingCodes.MAX_FRAME_SIZE].new_value == 16384
    reply = server.data_to_send()
    assert [(type(f), "ACK" in f.flags) for f in parse(reply)] == [(SettingsFrame, True)]

    client_events = client.receive_data(settings + reply)
    assert [type(e) for e in client_events] == [RemoteSettingsChanged, SettingsAcknowledged]
    assert client.remote_settings.max_concurrent_streams == 100
    assert [type(e) for e in server.receive_data(client.data_to_send())] == [SettingsAcknowledged]
    assert server.data_to_send() == b""
    assert server.local_settings.initial_window_size == DEFAULT_WINDOW
    assert server.max_outbound_frame_size == 16384
    assert not server.streams


def test_grpclib_window_setup(make_server):
    """What grpclib's H2Protocol.connection_made does: bigger connection and stream windows."""
    server = make_server()
    server.initiate_connection()
    initial = server.local_settings.initial_window_size
    assert initial == DEFAULT_WINDOW
    server.increment_flow_control_window(4 * MiB - initial)
    server.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 4 * MiB})
    w = Wire(server)
    w.handshake(initiate_server=False)
    assert server.local_settings.initial_window_size == 4 * MiB
    assert w.client.outbound_flow_control_window == 4 * MiB

    w.client.send_headers(1, grpc_request())
    w.to_server()
    assert w.client.local_flow_control_window(1) == 4 * MiB
    for _ in range(64):  # 1 MiB with no WINDOW_UPDATE needed
        w.client.send_data(1, bytes(16384))
    events = w.to_server()
    assert sum(e.flow_controlled_length for e in events if isinstance(e, DataReceived)) == MiB


def test_unary_call(make_server, impl):
    w = Wire(make_server())
    w.handshake()
    headers = grpc_request(extra=[("x-custom", "value"), ("x-id-bin", base64.b64encode(b"\x00\xff\x10").decode())])
    body = grpc_message(b"\x0a\x03abc")
    events = unary(w, 1, headers, body)
    assert summary(events) == [request(1, headers), data(1, body, ended=True), ended(1)]
    assert w.server.streams[1].open and not w.server.streams[1].closed  # half closed (remote)

    w.server.acknowledge_received_data(len(body), 1)
    assert not parse(w.server.data_to_send()), "a small request needs no WINDOW_UPDATE"

    reply = b"\x0a\x05hello"
    client_events = w.respond(1, reply, headers=RESPONSE + [("x-meta-bin", "AAEC")])
    assert [type(f) for f in parse(w.down)] == [HeadersFrame, DataFrame, HeadersFrame]
    assert "END_STREAM" in parse(w.down)[-1].flags
    assert summary(client_events) == [
        ("ResponseReceived", 1, RESPONSE + [("x-meta-bin", "AAEC")], False),
        data(1, grpc_message(reply)),
        ("TrailersReceived", 1, TRAILERS, True),
        ended(1),
    ]
    assert_gone_or_closed(impl, w.server, 1)
    with pytest.raises(StreamClosedError):
        w.server.send_headers(1, RESPONSE)
    with pytest.raises(StreamClosedError):
        w.server.send_data(1, b"late")


def test_request_trailers(make_server, impl):
    w = Wire(make_server())
    w.handshake()
    w.client.send_headers(1, grpc_request())
    w.client.send_data(1, b"body")
    w.client.send_headers(1, [("x-checksum", "abc")], end_stream=True)
    assert summary(w.to_server()) == [
        request(1, grpc_request()), data(1, b"body"), ("TrailersReceived", 1, [("x-checksum", "abc")], True), ended(1)]
    w.respond(1, b"")
    assert_gone_or_closed(impl, w.server, 1)


def test_trailers_only_response_and_end_stream(make_server, impl):
    """grpclib ends errors with a single HEADERS(END_STREAM), streams with end_stream()."""
    w = Wire(make_server())
    w.handshake()
    unary(w, 1, grpc_request(), grpc_message(b""))
    unary(w, 3, grpc_request(), grpc_message(b""))
    error = RESPONSE + [("grpc-status", "5"), ("grpc-message", "not%20found")]
    w.server.send_headers(1, error, end_stream=True)
    assert summary(w.to_client()) == [("ResponseReceived", 1, error, True), ended(1)]
    assert_gone_or_closed(impl, w.server, 1)

    w.server.send_headers(3, RESPONSE)
    w.server.send_data(3, b"abc")
    w.server.end_stream(3)
    assert summary(w.to_client()) == [
        ("ResponseReceived", 3, RESPONSE, False), data(3, b"abc"), data(3, b"", ended=True), ended(3)]
    last = parse(w.down)[-1]
    assert isinstance(last, DataFrame) and last.data == b"" and "END_STREAM" in last.flags
    assert_gone_or_closed(impl, w.server, 3)


def _headers_block(down: bytes) -> bytes:
    frames = parse(down)
    assert isinstance(frames[0], HeadersFrame) and "END_HEADERS" in frames[0].flags
    return frames[0].data


def test_header_encoding_never_uses_the_dynamic_table(make_server, impl):
    w = Wire(make_server())
    w.handshake()
    headers = RESPONSE + [("x-request-owner", "containerd"), ("x-long", "v" * 100)]
    blocks = []
    for sid in (1, 3, 5):
        unary(w, sid, grpc_request(), grpc_message(b""))
        w.server.send_headers(sid, headers)
        client_events = w.to_client()
        assert summary(client_events) == [("ResponseReceived", sid, headers, False)]
        blocks.append(_headers_block(w.down))
    if impl == "h2":
        assert len(blocks[1]) < len(blocks[0])  # h2 indexes, the second block refers to the table
        return
    # the first block may open with a table size update to 0 (the client's SETTINGS named a size)
    first = blocks[0][1:] if blocks[0][:1] == b"\x20" else blocks[0]
    assert first == blocks[1] == blocks[2], "identical header lists must encode identically"
    decoder = Decoder()  # a fresh decoder: the block must not rely on earlier blocks
    assert decoder.decode(blocks[2], raw=False) == headers
    assert len(decoder.header_table.dynamic_entries) == 0, "ours added to the peer's dynamic table"


@pytest.mark.parametrize("table_size", [0, 1024])
def test_peer_header_table_size_change(make_server, impl, table_size):
    w = Wire(make_server())
    w.handshake()
    w.client.update_settings({SettingCodes.HEADER_TABLE_SIZE: table_size})
    w.exchange()
    headers = RESPONSE + [("x-a", "1" * 50)]
    blocks = []
    for sid in (1, 3, 5):
        unary(w, sid, grpc_request(), grpc_message(b""))
        w.server.send_headers(sid, headers, end_stream=True)
        assert summary(w.to_client()) == [("ResponseReceived", sid, headers, True), ended(sid)]
        blocks.append(_headers_block(w.down))
    assert blocks[0][0] & 0xE0 == 0x20, "the first block after the change starts with a table size update"
    if impl == "ours":
        assert blocks[0][0] == 0x20, "ours sets its dynamic table size to 0"
        assert blocks[1] == blocks[2]


def test_300_calls_on_one_connection(make_server, impl):
    """The client's encoder indexes headers and evicts old entries: our decoder must follow."""
    w = Wire(make_server())
    w.handshake()
    for i in range(300):
        sid = 2 * i + 1
        headers = grpc_request(path=f"/svc.S/M{i % 7}", extra=[
            ("x-request-id", f"{i:08d}"), ("x-tenant", f"t{i % 13}"), ("x-pad", "p" * (100 + i % 50))])
        body = grpc_message(i.to_bytes(2, "big"))
        assert summary(unary(w, sid, headers, body)) == [request(sid, headers), data(sid, body, ended=True), ended(sid)]
        w.server.acknowledge_received_data(len(body), sid)
        reply_headers = RESPONSE + [("x-request-id", f"{i:08d}")]
        client_events = w.respond(sid, b"r%d" % i, headers=reply_headers)
        assert summary(client_events) == [
            ("ResponseReceived", sid, reply_headers, False), data(sid, grpc_message(b"r%d" % i)),
            ("TrailersReceived", sid, TRAILERS, True), ended(sid)]
        for e in client_events:
            if isinstance(e, DataReceived):
                w.client.acknowledge_received_data(e.flow_controlled_length, sid)
        w.exchange()
    if impl == "ours":
        assert not w.server.streams
    else:
        assert all(s.closed for s in w.server.streams.values())


def test_server_finishing_first_frees_the_stream(make_server, impl):
    """An early answer (status and trailers) before the client ends its request stream: the
    stream closes when the client's END_STREAM comes, and no longer counts against the 100."""
    w = Wire(make_server())
    w.handshake()
    for i in range(150):
        sid = 2 * i + 1
        w.client.send_headers(sid, grpc_request())
        assert summary(w.to_server()) == [request(sid, grpc_request())]
        w.server.send_headers(sid, RESPONSE + [("grpc-status", "3")], end_stream=True)
        w.to_client()
        assert w.server.streams[sid].open  # half closed (local)
        w.client.send_data(sid, b"late", end_stream=True)
        assert summary(w.to_server()) == [data(sid, b"late", ended=True), ended(sid)]
        assert_gone_or_closed(impl, w.server, sid)
        w.server.acknowledge_received_data(4, sid)
    assert goaway_code(w.server.data_to_send()) is None


def test_hpack_dynamic_table_on_the_decode_side(make_server):
    """The same block of indexes means different headers once the table has changed: insertions,
    size updates and evictions must all be followed."""
    server = started(make_server)

    def call(sid: int, block: bytes) -> list:
        frame = HeadersFrame(sid, block, flags=["END_HEADERS", "END_STREAM"]).serialize()
        [event, _] = server.receive_data(frame)
        return [tuple(h) for h in event.headers]

    newest = hpack_literal(REQ) + b"\xbe"  # REQ and dynamic entry 62, the newest
    assert call(1, hpack_literal(REQ) + hpack_literal([("x-a", "1")], index=True)) == REQ + [("x-a", "1")]
    assert call(3, newest) == REQ + [("x-a", "1")]
    assert call(5, newest) == REQ + [("x-a", "1")]
    assert call(7, hpack_literal(REQ) + hpack_literal([("x-a", "2")], index=True)) == REQ + [("x-a", "2")]
    assert call(9, newest) == REQ + [("x-a", "2")]
    assert call(11, newest + b"\xbf") == REQ + [("x-a", "2"), ("x-a", "1")]
    # emptied by a size update to 0, back to 4096, then a new entry
    block = b"\x20" + _hpack_int(4096, 5, 0x20) + hpack_literal(REQ) + hpack_literal([("x-b", "3")], index=True)
    assert call(13, block) == REQ + [("x-b", "3")]
    assert call(15, newest) == REQ + [("x-b", "3")]
    # three entries of 1532 bytes: the table (4096) keeps the last two
    big = [(f"x-big{i}", str(i) * 1494) for i in range(3)]
    assert call(17, hpack_literal(REQ) + hpack_literal(big, index=True)) == REQ + big
    assert call(19, hpack_literal(REQ) + b"\xbe\xbf") == REQ + [big[2], big[1]]
    assert call(21, newest) == REQ + [big[2]]
    with pytest.raises(ProtocolError):  # entry 64 was evicted
        server.receive_data(HeadersFrame(23, hpack_literal(REQ) + b"\xc0", flags=["END_HEADERS"]).serialize())


def test_interleaved_streams(make_server):
    w = Wire(make_server())
    w.handshake()
    ids = [1, 3, 5, 7]
    expected = []
    for sid in ids:
        w.client.send_headers(sid, grpc_request(path=f"/s/{sid}"))
        expected.append(request(sid, grpc_request(path=f"/s/{sid}")))
    for part in range(3):
        for sid in ids:
            payload = b"%d-%d" % (sid, part)
            w.client.send_data(sid, payload)
            expected.append(data(sid, payload))
    for sid in reversed(ids):
        w.client.end_stream(sid)
        expected += [data(sid, b"", ended=True), ended(sid)]
    assert summary(w.to_server()) == expected

    for sid in (7, 1, 5, 3):
        w.server.send_headers(sid, RESPONSE)
    for part in range(2):
        for sid in ids:
            w.server.send_data(sid, b"r%d-%d" % (sid, part))
    for sid in (3, 7, 1, 5):
        w.server.send_headers(sid, TRAILERS, end_stream=True)
    got: dict[int, list] = {sid: [] for sid in ids}
    for e in summary(w.to_client()):
        got[e[1]].append(e)
    for sid in ids:
        assert got[sid] == [("ResponseReceived", sid, RESPONSE, False), data(sid, b"r%d-0" % sid),
                            data(sid, b"r%d-1" % sid), ("TrailersReceived", sid, TRAILERS, True), ended(sid)]


def test_large_header_blocks_over_continuation(make_server):
    w = Wire(make_server())
    w.handshake()
    blob = base64.b64encode(random.Random(1).randbytes(30000)).decode().rstrip("=")
    headers = grpc_request(extra=[("x-blob-bin", blob)])
    w.client.send_headers(1, headers, end_stream=True)
    up = w.client.data_to_send()
    kinds = [type(f) for f in parse(up)]
    assert kinds[0] is HeadersFrame and ContinuationFrame in kinds  # the client split the block
    assert summary(w.server.receive_data(up)) == [request(1, headers, True), ended(1)]

    big = RESPONSE + [("x-big", "b" * 40000)]
    w.server.send_headers(1, big)
    w.server.send_headers(1, TRAILERS + [("x-big-trailer", "t" * 20000)], end_stream=True)
    client_events = w.to_client()
    frames = parse(w.down)
    assert all(len(f.serialize()) - 9 <= 16384 for f in frames), "a frame over the peer's MAX_FRAME_SIZE"
    assert ContinuationFrame in [type(f) for f in frames]
    assert summary(client_events) == [
        ("ResponseReceived", 1, big, False),
        ("TrailersReceived", 1, TRAILERS + [("x-big-trailer", "t" * 20000)], True), ended(1)]


def test_header_block_in_one_byte_continuations(make_server):
    server = started(make_server)
    block = hpack_literal(REQ)
    up = HeadersFrame(1, block[:1], flags=["END_STREAM"]).serialize()
    for i in range(1, len(block)):
        up += ContinuationFrame(1, block[i:i + 1], flags=["END_HEADERS"] if i == len(block) - 1 else []).serialize()
    assert summary(server.receive_data(up)) == [request(1, REQ, True), ended(1)]
    # then an empty CONTINUATION ends a block just as well
    up = HeadersFrame(3, block).serialize() + ContinuationFrame(3, b"", flags=["END_HEADERS"]).serialize()
    assert summary(server.receive_data(up)) == [request(3, REQ)]


def test_padded_headers_and_data(make_server):
    server = started(make_server)
    up = (HeadersFrame(1, hpack_literal(REQ), flags=["END_HEADERS", "PADDED", "PRIORITY"], pad_length=9,
                       depends_on=0, stream_weight=200, exclusive=True).serialize()
          + data_frame(1, b"hello", pad_length=20)
          + data_frame(1, b"", pad_length=0)  # the PADDED flag with a zero pad length: 1 byte
          + data_frame(1, b"", pad_length=255, end_stream=True))
    assert summary(server.receive_data(up)) == [
        request(1, REQ), data(1, b"hello", length=26), data(1, b"", length=1),
        data(1, b"", length=256, ended=True), ended(1)]
    assert not parse(server.data_to_send())
    server.acknowledge_received_data(26 + 1 + 256, 1)


def test_priority_is_ignored(make_server):
    w = Wire(make_server())
    w.handshake()
    w.client.prioritize(1, weight=10)  # an idle stream, before its HEADERS
    w.client.send_headers(1, grpc_request(), priority_weight=200, priority_depends_on=0, priority_exclusive=True)
    w.client.prioritize(5, weight=3, depends_on=1)  # an idle stream, skipped by what follows
    w.client.send_headers(3, grpc_request(path="/x.Y/Z"), end_stream=True)
    w.client.prioritize(1, weight=1, depends_on=3, exclusive=False)
    w.client.send_data(1, b"body", end_stream=True)
    assert summary(w.to_server()) == [
        request(1, grpc_request()), request(3, grpc_request(path="/x.Y/Z"), True), ended(3),
        data(1, b"body", ended=True), ended(1)]
    assert not parse(w.server.data_to_send())
    w.client.send_headers(5, REQ, end_stream=True)  # stream 5 still idle: PRIORITY opened nothing
    assert summary(w.to_server()) == [request(5, REQ, True), ended(5)]


def test_ping_both_ways(make_server):
    w = Wire(make_server())
    w.handshake()
    w.client.ping(b"12345678")
    assert summary(w.to_server()) == [("PingReceived", b"12345678")]
    assert summary(w.to_client()) == [("PingAckReceived", b"12345678")]
    [ack] = parse(w.down)
    assert isinstance(ack, PingFrame) and "ACK" in ack.flags and ack.opaque_data == b"12345678"

    w.server.ping(b"abcdefgh")
    assert summary(w.to_client()) == [("PingReceived", b"abcdefgh")]
    [ping] = parse(w.down)
    assert "ACK" not in ping.flags
    assert summary(w.to_server()) == [("PingAckReceived", b"abcdefgh")]
    assert w.server.data_to_send() == b""


def test_initial_window_size_change_applies_to_open_streams(make_server):
    w = Wire(make_server())
    w.handshake()
    w.client.increment_flow_control_window(1_000_000)  # the connection window is not the limit
    w.client.send_headers(1, grpc_request())
    w.exchange()
    assert w.server.local_flow_control_window(1) == DEFAULT_WINDOW
    w.server.send_headers(1, RESPONSE)
    w.server.send_data(1, bytes(10000))
    w.to_client()
    assert w.server.local_flow_control_window(1) == DEFAULT_WINDOW - 10000

    w.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 100000})
    [event] = w.to_server()
    assert isinstance(event, RemoteSettingsChanged)
    change = event.changed_settings[SettingCodes.INITIAL_WINDOW_SIZE]
    assert (change.original_value, change.new_value) == (DEFAULT_WINDOW, 100000)
    assert w.server.local_flow_control_window(1) == 90000
    w.exchange()

    w.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    w.exchange()
    assert w.server.local_flow_control_window(1) == 1000 - 10000  # may go negative
    w.client.send_headers(3, grpc_request())
    w.exchange()
    assert w.server.local_flow_control_window(3) == 1000
    w.client.increment_flow_control_window(9500, stream_id=1)
    assert summary(w.exchange()[0]) == [("WindowUpdated", 1, 9500)]
    assert w.server.local_flow_control_window(1) == 500


def test_max_frame_size_from_client(make_server):
    w = Wire(make_server())
    w.handshake()
    assert w.server.max_outbound_frame_size == 16384
    w.client.update_settings({SettingCodes.MAX_FRAME_SIZE: 65536})
    w.client.increment_flow_control_window(1_000_000)
    w.client.send_headers(1, grpc_request())
    w.client.increment_flow_control_window(1_000_000, stream_id=1)
    w.exchange()
    assert w.server.max_outbound_frame_size == 65536
    payload = random.Random(2).randbytes(150000)
    w.server.send_headers(1, RESPONSE)
    for pos in range(0, len(payload), 65536):
        w.server.send_data(1, payload[pos:pos + 65536])
    client_events = w.to_client()
    assert [len(f.data) for f in parse(w.down) if isinstance(f, DataFrame)] == [65536, 65536, 150000 - 131072]
    assert b"".join(e.data for e in client_events if isinstance(e, DataReceived)) == payload


def test_window_updates_from_client(make_server):
    w = Wire(make_server())
    w.handshake()
    w.client.send_headers(1, grpc_request())
    w.exchange()
    w.server.send_headers(1, RESPONSE)
    for _ in range(4):
        w.server.send_data(1, bytes(15000))
    w.to_client()
    assert w.server.local_flow_control_window(1) == DEFAULT_WINDOW - 60000
    w.client.increment_flow_control_window(1000, stream_id=1)
    assert summary(w.to_server()) == [("WindowUpdated", 1, 1000)]
    assert w.server.local_flow_control_window(1) == DEFAULT_WINDOW - 60000  # the connection limits
    w.client.increment_flow_control_window(50000)
    assert summary(w.to_server()) == [("WindowUpdated", 0, 50000)]
    assert w.server.local_flow_control_window(1) == DEFAULT_WINDOW - 60000 + 1000


def test_client_resets_a_stream(make_server, impl):
    w = Wire(make_server())
    w.handshake()
    w.client.send_headers(1, grpc_request())
    w.client.send_data(1, b"partial")
    w.client.reset_stream(1, ErrorCodes.CANCEL)
    assert summary(w.to_server()) == [
        request(1, grpc_request()), data(1, b"partial"), ("StreamReset", 1, ErrorCodes.CANCEL, True)]
    w.server.acknowledge_received_data(7, 1)  # grpclib releases the stream's buffer: must not raise
    assert_gone_or_closed(impl, w.server, 1)
    with pytest.raises(StreamClosedError):
        w.server.send_headers(1, RESPONSE)
    with pytest.raises(StreamClosedError):
        w.server.send_data(1, b"x")
    if impl == "ours":
        with pytest.raises(StreamClosedError):
            w.server.local_flow_control_window(1)
    # the connection carries on
    body = grpc_message(b"ok")
    assert summary(unary(w, 3, grpc_request(), body)) == [request(3, grpc_request()), data(3, body, ended=True), ended(3)]


def test_server_resets_a_stream(make_server, impl):
    w = Wire(make_server())
    w.handshake()
    w.client.send_headers(1, grpc_request())
    w.client.send_headers(3, grpc_request())
    w.exchange()
    w.server.reset_stream(1, error_code=ErrorCodes.CANCEL)
    w.server.reset_stream(3)
    assert summary(w.to_client()) == [("StreamReset", 1, ErrorCodes.CANCEL, True), ("StreamReset", 3, 0, True)]
    assert resets(w.down) == {1: ErrorCodes.CANCEL, 3: ErrorCodes.NO_ERROR}
    for sid in (1, 3):
        assert_gone_or_closed(impl, w.server, sid)
        with pytest.raises(StreamClosedError):
            w.server.send_data(sid, b"x")


def test_goaway_from_client(make_server):
    w = Wire(make_server())
    w.handshake()
    unary(w, 1, grpc_request(), grpc_message(b""))
    w.client.close_connection(error_code=ErrorCodes.NO_ERROR, additional_data=b"bye", last_stream_id=0)
    assert summary(w.to_server()) == [("ConnectionTerminated", 0, 0, b"bye")]
    assert w.server.state_machine.state is ConnectionState.CLOSED


# == flow control ==============================================================================

def test_5mib_response(make_server):
    w = Wire(make_server())
    w.handshake()
    unary(w, 1, grpc_request(), grpc_message(b""))
    payload = random.Random(3).randbytes(5 * MiB)
    w.server.send_headers(1, RESPONSE)
    w.to_client()
    received, pos, idle = bytearray(), 0, 0
    while pos < len(payload):
        window = w.server.local_flow_control_window(1)  # how grpclib's Stream.send_data goes
        assert idle < 3, f"the server's window stayed at {window} after the client consumed everything"
        if window > 0:
            chunk = payload[pos:pos + min(window, w.server.max_outbound_frame_size)]
            pos += len(chunk)
            w.server.send_data(1, chunk, end_stream=pos == len(payload))
            if pos < len(payload):  # after END_STREAM the stream is closed: ours raises then
                assert w.server.local_flow_control_window(1) == window - len(chunk)
            idle = 0
        else:
            idle += 1
        for e in w.to_client():
            if isinstance(e, DataReceived):
                received += e.data
                w.client.acknowledge_received_data(e.flow_controlled_length, 1)
        for e in w.to_server():
            assert isinstance(e, WindowUpdated)
    assert received == payload


@pytest.mark.parametrize("windows", ["default", "grpclib"])
def test_20mib_upload_never_stalls(make_server, windows):
    server = make_server()
    server.initiate_connection()
    if windows == "grpclib":
        server.increment_flow_control_window(4 * MiB - DEFAULT_WINDOW)
        server.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 4 * MiB})
    w = Wire(server)
    w.handshake(initiate_server=False)
    w.client.send_headers(1, grpc_request())
    total, sent, received = 20 * MiB, 0, 0
    chunk = bytes(16384)
    while sent < total:
        window = w.client.local_flow_control_window(1)
        assert window > 0, f"the upload stalled after {sent} bytes, all of them acknowledged by the server"
        n = min(window, len(chunk), total - sent)
        w.client.send_data(1, chunk[:n], end_stream=sent + n == total)
        sent += n
        for e in w.to_server():
            if isinstance(e, DataReceived):
                received += e.flow_controlled_length
                w.server.acknowledge_received_data(e.flow_controlled_length, 1)
        w.to_client()
    assert received == total


def test_window_updates_are_lazy_but_complete(make_server):
    w = Wire(make_server())
    w.handshake()
    w.client.send_headers(1, grpc_request())
    w.to_server()
    for i in range(4):
        w.client.send_data(1, bytes(10000))
        w.to_server()
        w.server.acknowledge_received_data(10000, 1)
        w.to_client()
        if i == 0:
            assert not any(isinstance(f, WindowUpdateFrame) for f in parse(w.down)), \
                "a WINDOW_UPDATE for 10000 bytes of a 65535 window"
    assert w.client.local_flow_control_window(1) == DEFAULT_WINDOW, "acknowledged bytes never credited"


def test_window_update_when_the_window_runs_low(make_server, impl):
    """Ours credits even a small acknowledgement once the peer's window falls under a quarter."""
    w = Wire(make_server())
    w.handshake()
    w.client.send_headers(1, grpc_request())
    for _ in range(4):
        w.client.send_data(1, bytes(15000))
    w.to_server()
    w.server.acknowledge_received_data(1000, 1)
    w.to_client()
    left = DEFAULT_WINDOW - 60000
    assert w.client.local_flow_control_window(1) == (left + 1000 if impl == "ours" else left)


def test_acknowledging_nothing_sends_nothing(make_server):
    server = started(make_server)
    server.receive_data(headers_frame(1, REQ) + data_frame(1, bytes(15000)) * 4)  # under a quarter left
    server.acknowledge_received_data(0, 1)
    updates = [(sid, payload) for kind, _, sid, payload in raw_frames(server.data_to_send()) if kind == 0x8]
    assert updates == [], "WINDOW_UPDATE frames for 0 acknowledged bytes (an increment of 0 is a protocol error)"


def test_acknowledging_data_of_gone_streams(make_server, impl):
    """grpclib acknowledges a stream's unread data when it releases the stream, whatever became
    of the stream meanwhile; the connection window still gets the credit."""
    server = started(make_server)
    server.receive_data(headers_frame(1, REQ) + data_frame(1, bytes(16000)) * 3)
    server.receive_data(RstStreamFrame(1, error_code=ErrorCodes.CANCEL).serialize())
    server.receive_data(headers_frame(3, REQ, end_stream=True) + headers_frame(5, REQ))
    server.send_headers(3, RESPONSE, end_stream=True)
    server.reset_stream(5, ErrorCodes.CANCEL)
    server.data_to_send()
    server.acknowledge_received_data(48000, 1)  # reset by the client
    server.acknowledge_received_data(1, 3)  # finished
    server.acknowledge_received_data(1, 5)  # reset by the server
    if impl == "ours":
        server.acknowledge_received_data(1, 99)  # never opened: h2 raises NoSuchStreamError
    assert window_credit(server.data_to_send(), 0) >= 48000


@pytest.mark.parametrize("how", ["completed", "reset by the server", "reset by the client"])
def test_data_on_a_finished_stream_is_ignored_but_credited(make_server, how):
    server = started(make_server)
    if how == "completed":
        server.receive_data(headers_frame(1, REQ, end_stream=True))
        server.send_headers(1, RESPONSE, end_stream=True)
    elif how == "reset by the server":
        server.receive_data(headers_frame(1, REQ))
        server.reset_stream(1, ErrorCodes.CANCEL)
    else:
        server.receive_data(headers_frame(1, REQ) + RstStreamFrame(1, error_code=ErrorCodes.CANCEL).serialize())
    server.data_to_send()
    window = DEFAULT_WINDOW  # the client's view of the connection window
    for i in range(20):  # 320000 bytes: far more than the window, so it must be credited
        assert window >= 16000, f"the connection window leaked: {window} left after {i} frames"
        events = server.receive_data(data_frame(1, bytes(16000)))
        assert summary(events) == []
        out = server.data_to_send()
        assert goaway_code(out) is None
        window += window_credit(out, 0) - 16000
    events = server.receive_data(headers_frame(3, REQ) + data_frame(3, b"alive", end_stream=True))
    assert summary(events) == [request(3, REQ), data(3, b"alive", ended=True), ended(3)]


# == intentional differences from h2: stream errors where h2 has connection errors =================

def test_stream_beyond_max_concurrent_streams_is_refused(make_server, impl):
    server = started(make_server)
    ids = [2 * i + 1 for i in range(101)]
    up = b"".join(headers_frame(sid, REQ) for sid in ids[:100])
    up += headers_frame(201, REQ + [("x-refused", "yes")], index=True)  # index 62 in the HPACK table
    if impl == "h2":
        with pytest.raises(ProtocolError):
            server.receive_data(up)
        assert goaway_code(server.data_to_send()) == ErrorCodes.PROTOCOL_ERROR
        return
    events = server.receive_data(up)
    assert [e.stream_id for e in events if isinstance(e, RequestReceived)] == ids[:100]
    assert not [e for e in events if getattr(e, "stream_id", None) == 201 and not isinstance(e, StreamReset)]
    assert resets(server.data_to_send()) == {201: ErrorCodes.REFUSED_STREAM}
    assert 201 not in server.streams
    assert summary(server.receive_data(data_frame(201, b"in flight"))) == []  # ignored
    # a stream ends, so a new one is welcome; its block refers to the refused one's HPACK entry
    server.receive_data(data_frame(1, b"", end_stream=True))
    server.send_headers(1, RESPONSE, end_stream=True)
    events = server.receive_data(HeadersFrame(203, hpack_literal(REQ) + b"\xbe", flags=["END_HEADERS"]).serialize())
    assert summary(events) == [request(203, REQ + [("x-refused", "yes")])]
    assert goaway_code(server.data_to_send()) is None


def test_non_ascii_header_value_resets_the_stream(make_server, impl):
    only_ours(impl, "h2 raises UnicodeDecodeError out of receive_data")
    server = started(make_server)
    bad = REQ + [("x-name", "caf\xe9".encode("latin-1")), ("x-ok", "yes")]
    events = server.receive_data(headers_frame(1, bad, index=True))  # x-ok becomes index 62
    assert not [e for e in events if isinstance(e, RequestReceived)]
    assert resets(server.data_to_send()) == {1: ErrorCodes.PROTOCOL_ERROR}
    assert summary(server.receive_data(data_frame(1, b"x"))) == []
    events = server.receive_data(HeadersFrame(3, hpack_literal(REQ) + b"\xbe", flags=["END_HEADERS"]).serialize())
    assert summary(events) == [request(3, REQ + [("x-ok", "yes")])]
    assert server.state_machine.state is not ConnectionState.CLOSED


@pytest.mark.parametrize("missing", [":method", ":path"])
def test_request_without_method_or_path_is_reset(make_server, impl, missing):
    server = started(make_server)
    headers = [h for h in REQ if h[0] != missing]
    events = server.receive_data(headers_frame(1, headers))
    if impl == "h2":  # validate_inbound_headers=False: h2 passes it on
        assert summary(events) == [request(1, headers)]
        return
    assert summary([e for e in events if not isinstance(e, StreamReset)]) == []
    assert resets(server.data_to_send()) == {1: ErrorCodes.PROTOCOL_ERROR}
    assert summary(server.receive_data(headers_frame(3, REQ, end_stream=True))) == [request(3, REQ, True), ended(3)]


def test_frames_after_the_clients_end_stream_do_not_reach_the_app(make_server):
    """RFC 9113 5.1, half-closed (remote): a stream error STREAM_CLOSED (what h2 does; ours may
    also drop them). Either way the connection lives and the DATA is credited."""
    server = started(make_server)
    assert summary(server.receive_data(headers_frame(1, REQ, end_stream=True))) == [request(1, REQ, True), ended(1)]
    events = server.receive_data(headers_frame(1, [("grpc-status", "0")], end_stream=True))
    assert summary([e for e in events if not isinstance(e, StreamReset)]) == []
    assert goaway_code(server.data_to_send()) is None
    window = DEFAULT_WINDOW
    for _ in range(10):
        assert window >= 16000, "DATA after END_STREAM was never credited to the connection"
        events = server.receive_data(data_frame(1, bytes(16000)))
        assert summary([e for e in events if not isinstance(e, StreamReset)]) == []
        out = server.data_to_send()
        assert goaway_code(out) is None
        window += window_credit(out, 0) - 16000
    assert summary(server.receive_data(headers_frame(3, REQ, end_stream=True))) == [request(3, REQ, True), ended(3)]


@pytest.mark.parametrize("how", ["reset by the server", "reset by the client"])
def test_headers_on_a_reset_stream_are_ignored(make_server, how):
    """RFC 9113 5.1: frames on a stream we reset MUST be ignored (the client may have sent them
    before it saw our RST_STREAM); after the client's RST_STREAM they are a stream error at most.
    The header block is still decoded, to keep HPACK in sync, and the connection lives."""
    server = started(make_server)
    server.receive_data(headers_frame(1, REQ))
    if how == "reset by the server":
        server.reset_stream(1, ErrorCodes.CANCEL)
    else:
        server.receive_data(RstStreamFrame(1, error_code=ErrorCodes.CANCEL).serialize())
    server.data_to_send()
    block = hpack_literal([("x-trailer", "v" * 200)], index=True)  # becomes dynamic entry 62
    late = (HeadersFrame(1, block[:10], flags=["END_STREAM"]).serialize()
            + ContinuationFrame(1, block[10:], flags=["END_HEADERS"]).serialize())
    events = server.receive_data(late + HeadersFrame(3, hpack_literal(REQ) + b"\xbe", flags=["END_HEADERS"]).serialize())
    assert summary([e for e in events if not isinstance(e, StreamReset)]) == [request(3, REQ + [("x-trailer", "v" * 200)])]
    assert goaway_code(server.data_to_send()) is None


def test_hpack_bomb_is_refused(make_server):
    """A 6 KB block that decodes to an 8 MB header list (one 4000-byte entry referenced 2000
    times) must not reach the app: h2 answers ENHANCE_YOUR_CALM; resetting the stream is fine too."""
    server = started(make_server)
    block = hpack_literal(REQ) + hpack_literal([("x-bomb", "a" * 4000)], index=True) + b"\xbe" * 2000
    try:
        events = server.receive_data(raw(0x1, 0x5, 1, block))
    except ProtocolError:
        assert goaway_code(server.data_to_send()) is not None
        return
    assert not [e for e in events if isinstance(e, RequestReceived)], "an 8 MB header list was accepted"
    assert resets(server.data_to_send()).keys() == {1}


def test_continuation_flood_is_refused(make_server):
    """HEADERS and then CONTINUATION frames that never end the block: the server must give up
    (h2 after 64 frames) rather than buffer without limit."""
    server = started(make_server)
    server.receive_data(HeadersFrame(1, hpack_literal(REQ)[:3]).serialize())
    continuation = ContinuationFrame(1, bytes(16000)).serialize()
    with pytest.raises(ProtocolError):
        for _ in range(1000):  # 16 MB
            server.receive_data(continuation)
    assert goaway_code(server.data_to_send()) in {ErrorCodes.PROTOCOL_ERROR, ErrorCodes.ENHANCE_YOUR_CALM,
                                                  ErrorCodes.COMPRESSION_ERROR}


class StreamErrorCase(NamedTuple):
    setup: Callable[[Any], None]
    frames: bytes
    code: int
    events: list  # what ours reports before the reset; h2 raises instead unless h2_survives
    h2_survives: bool = False


def _big_connection_window(server: Any) -> None:
    server.increment_flow_control_window(MiB)


STREAM_ERRORS = {
    "DATA beyond the stream window": StreamErrorCase(
        _big_connection_window,
        headers_frame(1, REQ) + data_frame(1, bytes(16000)) * 4 + data_frame(1, bytes(2000)),
        ErrorCodes.FLOW_CONTROL_ERROR, [request(1, REQ)] + [data(1, bytes(16000))] * 4),
    "WINDOW_UPDATE of 0 on a stream": StreamErrorCase(
        lambda s: None, headers_frame(1, REQ) + raw(0x8, 0, 1, struct.pack(">I", 0)),
        ErrorCodes.PROTOCOL_ERROR, [request(1, REQ)]),
    "stream WINDOW_UPDATE past 2^31-1": StreamErrorCase(
        lambda s: None, headers_frame(1, REQ) + WindowUpdateFrame(1, 2**31 - 1).serialize(),
        ErrorCodes.FLOW_CONTROL_ERROR, [request(1, REQ)], h2_survives=True),
}


@pytest.mark.parametrize("case", STREAM_ERRORS.values(), ids=STREAM_ERRORS.keys())
def test_stream_error(make_server, impl, case):
    server = started(make_server)
    case.setup(server)
    server.data_to_send()
    if impl == "h2" and not case.h2_survives:
        with pytest.raises(ProtocolError):
            server.receive_data(case.frames)
        assert goaway_code(server.data_to_send()) == case.code  # h2 ends the whole connection
        return
    events = server.receive_data(case.frames)
    # grpclib must hear of the reset, or the handler of stream 1 would wait for more request data
    assert summary(events) == case.events + [("StreamReset", 1, case.code, False)]
    assert resets(server.data_to_send()) == {1: case.code}
    assert summary(server.receive_data(headers_frame(3, REQ, end_stream=True))) == [request(3, REQ, True), ended(3)]
    assert goaway_code(server.data_to_send()) is None


def test_trailers_without_end_stream(make_server, impl):
    """h2 makes this a connection error; ours may do the same or reset just the stream, but the
    error is PROTOCOL_ERROR either way and no TrailersReceived comes out of it."""
    server = started(make_server)
    up = headers_frame(1, REQ) + data_frame(1, b"x") + headers_frame(1, [("grpc-status", "0")])
    try:
        events = server.receive_data(up)
    except ProtocolError:
        assert goaway_code(server.data_to_send()) == ErrorCodes.PROTOCOL_ERROR
        assert server.state_machine.state is ConnectionState.CLOSED
        return
    assert impl == "ours", "h2 raises ProtocolError"
    assert summary(events) == [request(1, REQ), data(1, b"x"), ("StreamReset", 1, ErrorCodes.PROTOCOL_ERROR, False)]
    assert resets(server.data_to_send()) == {1: ErrorCodes.PROTOCOL_ERROR}


def test_unknown_frames_flags_and_settings_are_ignored(make_server):
    server = started(make_server)
    up = (headers_frame(1, REQ)
          + raw(0xFA, 0xFF, 0, b"abc") + raw(0x0B, 0, 1, b"xyz") + raw(0xFA, 0, 99, b"")
          + raw(0x0, 0x22, 1, b"hi")  # DATA with flags it does not define
          + raw(0x4, 0, 0, struct.pack(">HI", 0x99, 5))  # an unknown setting
          + raw(0x6, 0xF0, 0, b"8 bytes!")  # PING with undefined flags
          + raw(0x0, 0x1, 1, b""))
    assert summary(server.receive_data(up)) == [
        request(1, REQ), data(1, b"hi"), ("PingReceived", b"8 bytes!"), data(1, b"", ended=True), ended(1)]
    frames = parse(server.data_to_send())
    assert [(type(f), "ACK" in f.flags) for f in frames] == [(SettingsFrame, True), (PingFrame, True)]


# == connection errors ===========================================================================

class ConnectionErrorCase(NamedTuple):
    frames: bytes
    code: int
    h2_code: int | None | str = "same"  # where h2 answers otherwise: its code, None for no GOAWAY
    handshake: bool = True


H1 = headers_frame(1, REQ)
CONNECTION_ERRORS = {
    "bad preface": ConnectionErrorCase(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ErrorCodes.PROTOCOL_ERROR,
                                       h2_code=None, handshake=False),
    "frame larger than 16384": ConnectionErrorCase(H1 + raw(0x0, 0, 1, bytes(16385)), ErrorCodes.FRAME_SIZE_ERROR),
    "DATA on stream 0": ConnectionErrorCase(raw(0x0, 0, 0, b"x"), ErrorCodes.PROTOCOL_ERROR),
    "HEADERS on stream 0": ConnectionErrorCase(raw(0x1, 0x4, 0, hpack_literal(REQ)), ErrorCodes.PROTOCOL_ERROR),
    "HEADERS on an even stream": ConnectionErrorCase(headers_frame(2, REQ), ErrorCodes.PROTOCOL_ERROR),
    "DATA on an idle stream": ConnectionErrorCase(H1 + data_frame(5, b"x"), ErrorCodes.PROTOCOL_ERROR),
    "SETTINGS length not a multiple of 6": ConnectionErrorCase(raw(0x4, 0, 0, bytes(7)), ErrorCodes.FRAME_SIZE_ERROR),
    "SETTINGS ACK with a payload": ConnectionErrorCase(raw(0x4, 0x1, 0, bytes(6)), ErrorCodes.FRAME_SIZE_ERROR,
                                                       h2_code=ErrorCodes.PROTOCOL_ERROR),
    "SETTINGS on a stream": ConnectionErrorCase(raw(0x4, 0, 1, b""), ErrorCodes.PROTOCOL_ERROR),
    "SETTINGS_ENABLE_PUSH of 2": ConnectionErrorCase(raw(0x4, 0, 0, struct.pack(">HI", 2, 2)),
                                                     ErrorCodes.PROTOCOL_ERROR),
    "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1": ConnectionErrorCase(
        raw(0x4, 0, 0, struct.pack(">HI", 4, 2**31)), ErrorCodes.FLOW_CONTROL_ERROR),
    "SETTINGS_MAX_FRAME_SIZE below 16384": ConnectionErrorCase(
        raw(0x4, 0, 0, struct.pack(">HI", 5, 16383)), ErrorCodes.PROTOCOL_ERROR),
    "SETTINGS_MAX_FRAME_SIZE above 2^24-1": ConnectionErrorCase(
        raw(0x4, 0, 0, struct.pack(">HI", 5, 2**24)), ErrorCodes.PROTOCOL_ERROR),
    "PING of 7 bytes": ConnectionErrorCase(raw(0x6, 0, 0, bytes(7)), ErrorCodes.FRAME_SIZE_ERROR),
    "WINDOW_UPDATE of 5 bytes": ConnectionErrorCase(raw(0x8, 0, 0, bytes(5)), ErrorCodes.FRAME_SIZE_ERROR),
    "RST_STREAM of 3 bytes": ConnectionErrorCase(H1 + raw(0x3, 0, 1, bytes(3)), ErrorCodes.FRAME_SIZE_ERROR),
    "RST_STREAM on stream 0": ConnectionErrorCase(raw(0x3, 0, 0, bytes(4)), ErrorCodes.PROTOCOL_ERROR),
    "GOAWAY on a stream": ConnectionErrorCase(raw(0x7, 0, 1, bytes(8)), ErrorCodes.PROTOCOL_ERROR),
    "WINDOW_UPDATE of 0 on the connection": ConnectionErrorCase(
        raw(0x8, 0, 0, struct.pack(">I", 0)), ErrorCodes.PROTOCOL_ERROR),
    "connection WINDOW_UPDATE past 2^31-1": ConnectionErrorCase(
        WindowUpdateFrame(0, 2**31 - 1).serialize(), ErrorCodes.FLOW_CONTROL_ERROR),
    "SETTINGS_INITIAL_WINDOW_SIZE overflowing an open stream's window": ConnectionErrorCase(
        H1 + WindowUpdateFrame(1, 2**31 - 1 - DEFAULT_WINDOW).serialize()
        + SettingsFrame(0, settings={SettingCodes.INITIAL_WINDOW_SIZE: DEFAULT_WINDOW + 1}).serialize(),
        ErrorCodes.FLOW_CONTROL_ERROR),
    "CONTINUATION without HEADERS": ConnectionErrorCase(
        ContinuationFrame(1, hpack_literal(REQ), flags=["END_HEADERS"]).serialize(), ErrorCodes.PROTOCOL_ERROR),
    "CONTINUATION after a complete header block": ConnectionErrorCase(
        H1 + ContinuationFrame(1, hpack_literal(REQ), flags=["END_HEADERS"]).serialize(), ErrorCodes.PROTOCOL_ERROR),
    "PING inside a header block": ConnectionErrorCase(
        HeadersFrame(1, hpack_literal(REQ)[:5]).serialize() + PingFrame(0, bytes(8)).serialize(),
        ErrorCodes.PROTOCOL_ERROR),
    "CONTINUATION of another stream inside a header block": ConnectionErrorCase(
        HeadersFrame(1, hpack_literal(REQ)[:5]).serialize()
        + ContinuationFrame(3, hpack_literal(REQ)[5:], flags=["END_HEADERS"]).serialize(), ErrorCodes.PROTOCOL_ERROR),
    "unknown frame inside a header block": ConnectionErrorCase(
        HeadersFrame(1, hpack_literal(REQ)[:5]).serialize() + raw(0xFA, 0, 1, b""), ErrorCodes.PROTOCOL_ERROR),
    "PUSH_PROMISE from a client": ConnectionErrorCase(
        H1 + PushPromiseFrame(1, promised_stream_id=2, data=hpack_literal(REQ), flags=["END_HEADERS"]).serialize(),
        ErrorCodes.PROTOCOL_ERROR),
    "DATA padding longer than the frame": ConnectionErrorCase(H1 + raw(0x0, 0x8, 1, bytes([10]) + b"abc"),
                                                              ErrorCodes.PROTOCOL_ERROR),
    "HEADERS padding longer than the frame": ConnectionErrorCase(
        raw(0x1, 0xC, 1, bytes([200]) + hpack_literal(REQ)), ErrorCodes.PROTOCOL_ERROR),
    "invalid HPACK integer": ConnectionErrorCase(raw(0x1, 0x4, 1, b"\xff" * 12), ErrorCodes.COMPRESSION_ERROR,
                                                 h2_code=ErrorCodes.PROTOCOL_ERROR),
    "HPACK index past the table": ConnectionErrorCase(raw(0x1, 0x4, 1, hpack_literal(REQ) + b"\xbe"),
                                                      ErrorCodes.COMPRESSION_ERROR, h2_code=ErrorCodes.PROTOCOL_ERROR),
    "truncated HPACK block": ConnectionErrorCase(raw(0x1, 0x4, 1, hpack_literal(REQ)[:-2]),
                                                 ErrorCodes.COMPRESSION_ERROR, h2_code=ErrorCodes.PROTOCOL_ERROR),
    "HPACK table size update after a header": ConnectionErrorCase(
        raw(0x1, 0x4, 1, hpack_literal(REQ) + b"\x20"), ErrorCodes.COMPRESSION_ERROR,
        h2_code=ErrorCodes.PROTOCOL_ERROR),
    "HPACK table size update above SETTINGS_HEADER_TABLE_SIZE": ConnectionErrorCase(
        raw(0x1, 0x4, 1, b"\x3f\xe1\x3f" + hpack_literal(REQ)), ErrorCodes.COMPRESSION_ERROR,  # 8192 > 4096
        h2_code=ErrorCodes.PROTOCOL_ERROR),
    "stream id lower than one already used": ConnectionErrorCase(
        headers_frame(3, REQ, end_stream=True) + headers_frame(1, REQ), ErrorCodes.PROTOCOL_ERROR),
    "DATA beyond the connection window": ConnectionErrorCase(
        b"".join(headers_frame(sid, REQ) + data_frame(sid, bytes(16000)) for sid in (1, 3, 5, 7, 9)),
        ErrorCodes.FLOW_CONTROL_ERROR),
}


def _feed(server: Any, data: bytes, mode: str) -> list[Event]:
    if mode == "whole":
        return server.receive_data(data)
    if mode == "bytewise":
        sizes: Iterable[int] = [1] * len(data)
    else:
        rng = random.Random(mode)
        sizes = []
        while sum(sizes) < len(data):
            sizes.append(rng.choice([1, 2, 3, 7, 9, 10, 64, 1000, 16393]))
    events, pos = [], 0
    for size in sizes:
        events += server.receive_data(data[pos:pos + size])
        pos += size
    return events


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
@pytest.mark.parametrize("case", CONNECTION_ERRORS.values(), ids=CONNECTION_ERRORS.keys())
def test_connection_error(make_server, impl, case, mode):
    if case.handshake:
        server = started(make_server)
    else:
        server = make_server()
        server.initiate_connection()
        server.data_to_send()
    with pytest.raises(ProtocolError):
        _feed(server, case.frames, mode)
    code = goaway_code(server.data_to_send())
    assert code == (case.code if impl == "ours" or case.h2_code == "same" else case.h2_code)
    if code is not None:
        assert server.state_machine.state is ConnectionState.CLOSED


# == input split anywhere =======================================================================

def client_transcript() -> bytes:
    """Everything a busy client sends: h2's own frames plus hand-built ones, in one byte string."""
    client = h2_client()
    client.initiate_connection()
    peer = h2_server()  # only to give the client its SETTINGS ACK
    peer.initiate_connection()
    client.receive_data(peer.data_to_send())
    up = client.data_to_send()
    big = grpc_request(extra=[("x-blob", "z" * 20000)])
    client.send_headers(1, big)
    client.send_data(1, b"first part")
    client.ping(b"pingpong")
    client.send_headers(3, grpc_request(path="/p.Q/R"), priority_weight=32, priority_depends_on=0)
    client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 100000, SettingCodes.MAX_FRAME_SIZE: 32768})
    client.increment_flow_control_window(5000)
    client.increment_flow_control_window(7000, stream_id=1)
    client.prioritize(3, weight=7)
    client.send_data(3, bytes(16000))
    client.reset_stream(3, ErrorCodes.CANCEL)
    up += client.data_to_send()
    up += data_frame(1, b"padded", pad_length=33) + raw(0xFA, 0, 0, b"unknown")
    up += HeadersFrame(5, hpack_literal(REQ)[:7], flags=["PADDED", "END_STREAM"], pad_length=3).serialize()
    up += ContinuationFrame(5, hpack_literal(REQ)[7:], flags=["END_HEADERS"]).serialize()
    client.send_data(1, b"last", end_stream=True)
    client.send_headers(7, grpc_request(extra=[("x-blob", "z" * 20000)]), end_stream=True)  # indexed before
    return up + client.data_to_send()


def outbound_summary(data: bytes) -> list[tuple]:
    """What the server wrote, less what ours may write differently (HPACK bytes, WINDOW_UPDATEs)."""
    return [(type(f).__name__, sorted(f.flags), getattr(f, "opaque_data", None), getattr(f, "error_code", None))
            for f in parse(data) if not isinstance(f, WindowUpdateFrame)]


def test_split_input_gives_the_same_events(make_server):
    """The same bytes fed whole, one at a time and in random chunks give the events (and the
    replies) h2 gives for them fed whole."""
    transcript = client_transcript()
    reference = h2_server()
    reference.initiate_connection()
    expected = summary(reference.receive_data(transcript))
    expected_out = outbound_summary(reference.data_to_send())
    assert ("RequestReceived", 7, grpc_request(extra=[("x-blob", "z" * 20000)]), True) in expected
    for mode in ["whole", "bytewise", "chunks 1", "chunks 2", "chunks 3", "chunks 4"]:
        server = make_server()
        server.initiate_connection()
        assert summary(_feed(server, transcript, mode)) == expected, f"fed as {mode}"
        assert outbound_summary(server.data_to_send()) == expected_out, f"fed as {mode}"


def test_header_decoder_agrees_with_hpack():
    """Ours' HPACK decoder (with its cache of blocks that left the table unchanged) against the
    hpack library's on what hpack's encoder writes: indexing, Huffman or not, never-indexed
    fields, small tables with evictions, and calls repeated so that cached blocks come back."""
    from hpack import Encoder

    from pycontainerd.core.http2 import HeaderDecoder

    rnd = random.Random(7)
    names = [b":method", b":path", b"content-type", b"user-agent", b"x-a", b"grpc-timeout",
             b"containerd-namespace", b"te", b"x-long-" + b"n" * 50]
    repeats = 0
    for _ in range(60):
        encoder, reference, ours = Encoder(), Decoder(), HeaderDecoder()
        encoder.header_table_size = rnd.choice([0, 100, 256, 4096])
        headers = None
        for _ in range(40):
            if headers is None or rnd.random() < 0.5:
                headers = [(rnd.choice(names),
                            bytes(rnd.choice(b"abcdefgh/:.-0123456789") for _ in range(rnd.randrange(120))),
                            rnd.random() < 0.1)
                           for _ in range(rnd.randrange(1, 12))]
            block = encoder.encode(headers, huffman=rnd.random() < 0.7)
            repeats += block in ours._cache
            expected = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in reference.decode(block, raw=True)]
            assert ours.decode(block) == expected
    assert repeats > 100
