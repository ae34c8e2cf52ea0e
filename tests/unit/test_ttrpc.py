"""ttrpc server and client over real unix sockets: round trips, multiplexing, status mapping,
metadata and namespace, deadlines, malformed frames, shutdown and connection loss.

Raw-socket tests build and read frames with the generated betterproto envelopes, so the hand-written
codec in core.ttrpc is checked against an independent encoder."""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import stat
import struct
import tempfile
from dataclasses import dataclass
from typing import Optional

import betterproto
import grpclib.const
import pytest
from betterproto.grpc.grpclib_client import ServiceStub
from betterproto.grpc.grpclib_server import ServiceBase
from grpclib.const import Cardinality, Status

from pycontainerd.api.gen.google.rpc import Status as RpcStatus
from pycontainerd.api.gen.ttrpc import KeyValue, Request, Response
from pycontainerd.core import context, errdefs
from pycontainerd.core.ttrpc import (
    MESSAGE_LENGTH_MAX, Method, TtrpcClient, TtrpcServer, decode_request, decode_response,
    encode_request, encode_response, request_metadata,
)

HEADER = struct.Struct(">IIBB")


# ---------------------------------------------------------------------------- test messages/services

@dataclass(eq=False, repr=False)
class EchoRequest(betterproto.Message):
    text: str = betterproto.string_field(1)
    delay_ms: int = betterproto.int32_field(2)


@dataclass(eq=False, repr=False)
class EchoResponse(betterproto.Message):
    text: str = betterproto.string_field(1)
    namespace: str = betterproto.string_field(2)
    metadata: list[KeyValue] = betterproto.message_field(3)


class EchoServiceBase(ServiceBase):
    """Shaped like betterproto's generated server base (see its template)."""

    async def echo(self, echo_request: EchoRequest) -> EchoResponse:
        raise NotImplementedError

    async def get_thing(self, echo_request: EchoRequest) -> EchoResponse:
        raise NotImplementedError

    async def watch(self, echo_request: EchoRequest):
        raise NotImplementedError

    async def __rpc_echo(self, stream) -> None:  # pragma: no cover - grpclib only
        raise NotImplementedError

    def __mapping__(self):
        return {
            "/test.v1.Echo/Echo": grpclib.const.Handler(
                self.__rpc_echo, Cardinality.UNARY_UNARY, EchoRequest, EchoResponse),
            "/test.v1.Echo/GetThing": grpclib.const.Handler(
                self.__rpc_echo, Cardinality.UNARY_UNARY, EchoRequest, EchoResponse),
            "/test.v1.Echo/Watch": grpclib.const.Handler(
                self.__rpc_echo, Cardinality.UNARY_STREAM, EchoRequest, EchoResponse),
        }


class EchoStub(ServiceStub):
    """Shaped like betterproto's generated client stub."""

    async def echo(self, echo_request: EchoRequest, *, timeout: Optional[float] = None,
                   deadline=None, metadata=None) -> EchoResponse:
        return await self._unary_unary("/test.v1.Echo/Echo", echo_request, EchoResponse,
                                       timeout=timeout, deadline=deadline, metadata=metadata)

    async def get_thing(self, echo_request: EchoRequest, *, timeout: Optional[float] = None,
                        deadline=None, metadata=None) -> EchoResponse:
        return await self._unary_unary("/test.v1.Echo/GetThing", echo_request, EchoResponse,
                                       timeout=timeout, deadline=deadline, metadata=metadata)

    async def watch(self, echo_request: EchoRequest, *, timeout=None, deadline=None, metadata=None):
        async for response in self._unary_stream("/test.v1.Echo/Watch", echo_request, EchoResponse,
                                                 timeout=timeout, deadline=deadline, metadata=metadata):
            yield response


class EchoService(EchoServiceBase):
    def __init__(self):
        self.finished: list[str] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.gates: dict[str, asyncio.Event] = {}  # text -> held until set
        self.arrived: list[str] = []                # gated calls that reached the handler

    async def echo(self, request: EchoRequest) -> EchoResponse:
        self.started.set()
        try:
            if request.text == "block":
                await self.release.wait()
            elif request.text in self.gates:
                self.arrived.append(request.text)
                await self.gates[request.text].wait()
            elif request.delay_ms:
                await asyncio.sleep(request.delay_ms / 1000)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        if request.text == "notfound":
            raise errdefs.NotFound("thing x")
        if request.text == "boom":
            raise ValueError("kaboom")
        if request.text == "needns":
            context.namespace()
        if request.text == "stray-cancel":  # a cancellation that is not the server's
            fut = asyncio.get_running_loop().create_future()
            fut.cancel()
            await fut
        self.finished.append(request.text)
        md = [KeyValue(key=k, value=v) for k, values in sorted(request_metadata().items()) for v in values]
        return EchoResponse(text=request.text, namespace=context.namespace_or_default(), metadata=md)

    async def get_thing(self, request: EchoRequest) -> EchoResponse:
        return EchoResponse(text="thing:" + request.text)


# ---------------------------------------------------------------------------- fixtures and helpers

@pytest.fixture
def sock_dir():
    d = tempfile.mkdtemp(prefix="ttrpc-", dir="/tmp")  # unix socket paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def served(sock_dir):
    server = TtrpcServer()
    service = EchoService()
    server.register_betterproto(service)
    path = os.path.join(sock_dir, "ttrpc.sock")
    await server.start_unix(path)
    yield server, service, path
    await server.close(grace=1)


async def wait_until(condition, timeout: float = 30.0) -> None:
    """Poll `condition` on the loop until it holds; a generous timeout, never a fixed sleep."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


async def raw_connect(path):
    return await asyncio.open_unix_connection(path)


def frame(stream_id: int, mtype: int, body: bytes, length: int | None = None) -> bytes:
    return HEADER.pack(len(body) if length is None else length, stream_id, mtype, 0) + body


async def read_frame(reader) -> tuple[int, int, bytes]:
    length, stream_id, mtype, _ = HEADER.unpack(await reader.readexactly(10))
    return stream_id, mtype, await reader.readexactly(length)


def raw_request(service: str, method: str, payload: bytes = b"", timeout_nano: int = 0) -> bytes:
    return bytes(Request(service=service, method=method, payload=payload, timeout_nano=timeout_nano))


@contextlib.asynccontextmanager
async def raw_server(path, handle):
    """A hand-driven peer on a real unix socket; its connections are closed on exit."""
    writers = []

    async def tracked(reader, writer):
        writers.append(writer)
        try:
            await handle(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_unix_server(tracked, path)
    try:
        yield server
    finally:
        server.close()
        for writer in writers:
            writer.transport.abort()
        await server.wait_closed()
        await asyncio.sleep(0)


# ---------------------------------------------------------------------------- codec

def test_envelope_codec_matches_generated_messages():
    md = [("containerd-namespace-ttrpc", "default"), ("k", ""), ("Key", "välue")]
    for timeout in (0, 1, 10**9, -5):
        generated = Request(service="a.b.Svc", method="Do", payload=b"\x01\x02", timeout_nano=timeout,
                            metadata=[KeyValue(key=k, value=v) for k, v in md])
        assert encode_request("a.b.Svc", "Do", b"\x01\x02", timeout, md) == bytes(generated)
        assert decode_request(bytes(generated)) == ("a.b.Svc", "Do", b"\x01\x02", timeout, md)
    assert decode_request(b"") == ("", "", b"", 0, [])

    for code, message, payload in ((0, "", b""), (0, "", b"abc"), (5, "x: not found", b""), (2, "é", b"p")):
        generated = Response(status=RpcStatus(code=code, message=message), payload=payload)
        assert encode_response(code, message, payload) == bytes(generated)
        assert decode_response(bytes(generated)) == (code, message, payload)
        parsed = Response().parse(encode_response(code, message, payload))
        assert (parsed.status.code, parsed.status.message, parsed.payload) == (code, message, payload)


def test_decode_rejects_garbage():
    from pycontainerd.core.ttrpc import MalformedMessage
    for bad in (b"\x0a\x05ab", b"\x08", b"\x0f", b"\x08\x01"):
        with pytest.raises(MalformedMessage):
            decode_request(bad)


# ---------------------------------------------------------------------------- calls

async def test_round_trip(served):
    _, _, path = served
    async with await TtrpcClient.connect(path) as client:
        resp = await client.call("test.v1.Echo", "Echo", EchoRequest(text="hello"), EchoResponse)
        assert resp.text == "hello"
        assert resp.namespace == "default"  # none sent
        resp = await client.call("test.v1.Echo", "GetThing", EchoRequest(text="a"), EchoResponse)
        assert resp.text == "thing:a"
        raw = await client.call("test.v1.Echo", "Echo", bytes(EchoRequest(text="raw")), None)
        assert EchoResponse().parse(raw).text == "raw"


async def test_register_plain_methods_and_none_response(sock_dir):
    server = TtrpcServer()
    seen = []

    async def handler(request: KeyValue):
        seen.append(request.key)
        return None  # an empty message

    server.register("plain.Svc", {"Put": Method(KeyValue, KeyValue, handler)})
    with pytest.raises(ValueError):
        server.register("plain.Svc", {})
    path = os.path.join(sock_dir, "p.sock")
    await server.start_unix(path)
    try:
        client = await TtrpcClient.connect("unix://" + path)
        resp = await client.call("plain.Svc", "Put", KeyValue(key="k1"), KeyValue)
        assert resp.key == "" and seen == ["k1"]
        await client.close()
    finally:
        await server.close()


async def test_concurrent_calls_complete_out_of_order(served):
    _, service, path = served
    client = await TtrpcClient.connect(path)
    n = 40
    texts = [f"m{i}" for i in range(n)]
    service.gates = {t: asyncio.Event() for t in texts}
    calls = asyncio.gather(*(
        client.call("test.v1.Echo", "Echo", EchoRequest(text=t), EchoResponse) for t in texts))
    # all calls are in flight on the one connection; the server lets them go last first,
    # each answered (and its frame queued) before the next is released
    await wait_until(lambda: len(service.arrived) == n)
    for t in reversed(texts):
        service.gates[t].set()
        await wait_until(lambda: service.finished[-1:] == [t])
    results = await asyncio.wait_for(calls, 30)
    assert [r.text for r in results] == texts
    assert service.finished == list(reversed(texts))
    await client.close()


async def test_client_uses_odd_stream_ids_and_matches_out_of_order_responses(sock_dir):
    """A raw server answers three calls in reverse order; each caller gets its own answer."""
    path = os.path.join(sock_dir, "raw.sock")
    seen_ids = []

    async def handle(reader, writer):
        frames = [await read_frame(reader) for _ in range(3)]
        for stream_id, mtype, body in reversed(frames):
            assert mtype == 1
            seen_ids.append(stream_id)
            req = Request().parse(body)
            echo = EchoRequest().parse(req.payload)
            payload = bytes(EchoResponse(text=f"{echo.text}@{stream_id}"))
            writer.write(frame(stream_id, 2, bytes(Response(status=RpcStatus(), payload=payload))))
        await writer.drain()
        await reader.read()
        writer.close()

    async with raw_server(path, handle):
        client = await TtrpcClient.connect(path)
        calls = [asyncio.create_task(client.call("s", "m", EchoRequest(text=t), EchoResponse))
                 for t in ("a", "b", "c")]
        results = await asyncio.gather(*calls)
        assert [r.text for r in results] == ["a@1", "b@3", "c@5"]
        assert seen_ids == [5, 3, 1]
        await client.close()


async def test_status_mapping_both_ways(served):
    _, _, path = served
    client = await TtrpcClient.connect(path)
    with pytest.raises(errdefs.NotFound) as info:
        await client.call("test.v1.Echo", "Echo", EchoRequest(text="notfound"), EchoResponse)
    assert str(info.value) == "thing x: not found"
    with pytest.raises(errdefs.Unknown) as info:
        await client.call("test.v1.Echo", "Echo", EchoRequest(text="boom"), EchoResponse)
    assert "kaboom" in str(info.value)
    with pytest.raises(errdefs.FailedPrecondition):
        await client.call("test.v1.Echo", "Echo", EchoRequest(text="needns"), EchoResponse)
    with pytest.raises(errdefs.Canceled):
        await client.call("test.v1.Echo", "Echo", EchoRequest(text="stray-cancel"), EchoResponse, timeout=5)
    # the connection is still good after errors
    assert (await client.call("test.v1.Echo", "Echo", EchoRequest(text="ok"), EchoResponse)).text == "ok"
    await client.close()

    # on the wire: code 5 and containerd's message
    reader, writer = await raw_connect(path)
    writer.write(frame(1, 1, raw_request("test.v1.Echo", "Echo", bytes(EchoRequest(text="notfound")))))
    stream_id, mtype, body = await read_frame(reader)
    resp = Response().parse(body)
    assert (stream_id, mtype) == (1, 2)
    assert (resp.status.code, resp.status.message) == (Status.NOT_FOUND.value, "thing x: not found")
    writer.close()


async def test_metadata_and_namespace_reach_handler(served):
    _, _, path = served
    client = await TtrpcClient.connect(path, namespace="client-ns")
    resp = await client.call("test.v1.Echo", "Echo", EchoRequest(text="md"), EchoResponse,
                             metadata={"X-Trace": "t1", "multi": ["a", "b"]})
    assert resp.namespace == "client-ns"
    got = [(kv.key, kv.value) for kv in resp.metadata]
    assert got == [("containerd-namespace-ttrpc", "client-ns"), ("multi", "a"), ("multi", "b"),
                   ("x-trace", "t1")]
    # a per-call namespace wins over the client's; one in metadata is replaced
    resp = await client.call("test.v1.Echo", "Echo", EchoRequest(text="md"), EchoResponse,
                             metadata=[("containerd-namespace-ttrpc", "old")], namespace="call-ns")
    assert resp.namespace == "call-ns"
    assert [(kv.key, kv.value) for kv in resp.metadata] == [("containerd-namespace-ttrpc", "call-ns")]
    # the namespace is bound per call, never leaking into the server's own context
    assert context.namespace_or_default() == "default"
    await client.close()


async def test_stub_over_ttrpc(served):
    _, _, path = served
    client = await TtrpcClient.connect(path)
    stub = client.stub(EchoStub, namespace="stub-ns", metadata={"a": "1"})
    assert isinstance(stub, EchoStub)
    resp = await stub.echo(EchoRequest(text="via stub"))
    assert (resp.text, resp.namespace) == ("via stub", "stub-ns")
    assert ("a", "1") in [(kv.key, kv.value) for kv in resp.metadata]
    assert (await stub.get_thing(EchoRequest(text="z"))).text == "thing:z"
    with pytest.raises(errdefs.DeadlineExceeded):
        await stub.echo(EchoRequest(text="block"), timeout=0.1)  # never answers in time
    with pytest.raises(errdefs.Unimplemented):  # streaming is not served over ttrpc
        async for _ in stub.watch(EchoRequest()):
            pass
    await client.close()


async def test_timeout_nano_is_the_handler_deadline(served):
    _, service, path = served
    # the server enforces timeout_nano by itself (the raw client never gives up)
    reader, writer = await raw_connect(path)
    writer.write(frame(1, 1, raw_request("test.v1.Echo", "Echo", bytes(EchoRequest(text="block")),
                                         timeout_nano=100_000_000)))
    stream_id, _, body = await asyncio.wait_for(read_frame(reader), 5)
    resp = Response().parse(body)
    assert stream_id == 1
    assert resp.status.code == Status.DEADLINE_EXCEEDED.value
    assert service.cancelled.is_set()
    writer.close()

    # and our client sends its timeout and raises DeadlineExceeded
    client = await TtrpcClient.connect(path)
    with pytest.raises(errdefs.DeadlineExceeded):
        await client.call("test.v1.Echo", "Echo", EchoRequest(text="block"), EchoResponse,
                          timeout=0.2)
    # a generous timeout does not disturb a quick call
    resp = await client.call("test.v1.Echo", "Echo", EchoRequest(text="quick"), EchoResponse, timeout=5)
    assert resp.text == "quick"
    await client.close()


async def test_unknown_service_and_method(served):
    _, _, path = served
    client = await TtrpcClient.connect(path)
    with pytest.raises(errdefs.Unimplemented) as info:
        await client.call("no.such.Service", "Echo", EchoRequest(), EchoResponse)
    assert info.value.message == "service no.such.Service"
    with pytest.raises(errdefs.Unimplemented) as info:
        await client.call("test.v1.Echo", "Nope", EchoRequest(), EchoResponse)
    assert info.value.message == "method Nope"
    with pytest.raises(errdefs.Unimplemented):  # streaming methods are not registered
        await client.call("test.v1.Echo", "Watch", EchoRequest(), EchoResponse)
    await client.close()


async def test_protocol_errors_answered_on_the_stream(served):
    """Well-framed but bad requests get a status, as Go answers them, and the connection lives on."""
    _, _, path = served
    reader, writer = await raw_connect(path)
    writer.write(frame(2, 1, raw_request("test.v1.Echo", "Echo")))  # even stream id
    stream_id, _, body = await read_frame(reader)
    assert stream_id == 2 and Response().parse(body).status.code == Status.INVALID_ARGUMENT.value
    writer.write(frame(3, 1, b"\x0a\x09short"))  # envelope cut short
    stream_id, _, body = await read_frame(reader)
    assert stream_id == 3 and Response().parse(body).status.code == Status.INVALID_ARGUMENT.value
    writer.write(frame(5, 1, raw_request("test.v1.Echo", "Echo", b"\x0a\xff")))  # bad payload
    stream_id, _, body = await read_frame(reader)
    assert stream_id == 5 and Response().parse(body).status.code == Status.INTERNAL.value
    writer.write(frame(7, 1, raw_request("test.v1.Echo", "Echo", bytes(EchoRequest(text="fine")))))
    stream_id, _, body = await read_frame(reader)
    assert stream_id == 7 and EchoResponse().parse(Response().parse(body).payload).text == "fine"
    writer.close()


async def test_frames_split_and_coalesced_on_the_wire(served):
    """Three requests in one write, then one request dribbled a byte at a time."""
    _, _, path = served
    reader, writer = await raw_connect(path)
    writer.write(b"".join(
        frame(sid, 1, raw_request("test.v1.Echo", "Echo", bytes(EchoRequest(text=f"t{sid}"))))
        for sid in (1, 3, 5)))
    answers = {}
    for _ in range(3):
        sid, _, body = await asyncio.wait_for(read_frame(reader), 5)
        answers[sid] = EchoResponse().parse(Response().parse(body).payload).text
    assert answers == {1: "t1", 3: "t3", 5: "t5"}
    for byte in frame(7, 1, raw_request("test.v1.Echo", "Echo", bytes(EchoRequest(text="slow")))):
        writer.write(bytes((byte,)))
        await writer.drain()
        await asyncio.sleep(0)
    sid, _, body = await asyncio.wait_for(read_frame(reader), 5)
    assert (sid, EchoResponse().parse(Response().parse(body).payload).text) == (7, "slow")
    writer.close()


@pytest.mark.parametrize("case", ["oversize", "unknown_type", "response_type", "truncated_header",
                                  "truncated_body"])
async def test_malformed_frame_closes_only_that_connection(served, case):
    _, _, path = served
    bystander = await TtrpcClient.connect(path)
    assert (await bystander.call("test.v1.Echo", "Echo", EchoRequest(text="before"), EchoResponse)).text == "before"

    reader, writer = await raw_connect(path)
    if case == "oversize":
        writer.write(HEADER.pack(MESSAGE_LENGTH_MAX + 1, 1, 1, 0) + b"x" * 64)
    elif case == "unknown_type":
        writer.write(frame(1, 3, raw_request("test.v1.Echo", "Echo")))
    elif case == "response_type":
        writer.write(frame(1, 2, bytes(Response())))
    elif case == "truncated_header":
        writer.write(HEADER.pack(20, 1, 1, 0)[:5])
        writer.write_eof()
    elif case == "truncated_body":
        writer.write(HEADER.pack(100, 1, 1, 0) + b"y" * 10)
        writer.write_eof()
    await writer.drain()
    if case == "oversize":  # Go's answer first: RESOURCE_EXHAUSTED on that stream
        stream_id, _, body = await asyncio.wait_for(read_frame(reader), 5)
        assert stream_id == 1 and Response().parse(body).status.code == Status.RESOURCE_EXHAUSTED.value
    assert await asyncio.wait_for(reader.read(), 5) == b""  # then the server closes
    writer.close()

    # the other connection and fresh ones are served
    assert (await bystander.call("test.v1.Echo", "Echo", EchoRequest(text="after"), EchoResponse)).text == "after"
    fresh = await TtrpcClient.connect(path)
    assert (await fresh.call("test.v1.Echo", "Echo", EchoRequest(text="fresh"), EchoResponse)).text == "fresh"
    await fresh.close()
    await bystander.close()


async def test_clean_close_with_call_in_flight(sock_dir):
    server = TtrpcServer()
    service = EchoService()
    server.register_betterproto(service)
    path = os.path.join(sock_dir, "c.sock")
    await server.start_unix(path, mode=0o600)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    client = await TtrpcClient.connect(path)
    call = asyncio.create_task(client.call("test.v1.Echo", "Echo", EchoRequest(text="block"), EchoResponse))
    await asyncio.wait_for(service.started.wait(), 5)

    closing = asyncio.create_task(server.close(grace=5))
    await asyncio.sleep(0.1)
    assert not closing.done()  # waiting for the call
    with pytest.raises(errdefs.Unavailable):  # no new connections
        await TtrpcClient.connect(path, timeout=1)
    service.release.set()
    resp = await asyncio.wait_for(call, 5)
    assert resp.text == "block"
    await asyncio.wait_for(closing, 5)
    assert not os.path.exists(path)
    await asyncio.wait_for(client.wait_closed(), 5)
    with pytest.raises(errdefs.Unavailable):
        await client.call("test.v1.Echo", "Echo", EchoRequest(text="late"), EchoResponse)


async def test_close_grace_expires_cancels_handlers(sock_dir):
    server = TtrpcServer()
    service = EchoService()
    server.register_betterproto(service)
    path = os.path.join(sock_dir, "g.sock")
    await server.start_unix(path)
    client = await TtrpcClient.connect(path)
    call = asyncio.create_task(client.call("test.v1.Echo", "Echo", EchoRequest(text="block"), EchoResponse))
    await asyncio.wait_for(service.started.wait(), 5)
    await asyncio.wait_for(server.close(grace=0.2), 5)
    assert service.cancelled.is_set()
    with pytest.raises(errdefs.Unavailable) as info:
        await asyncio.wait_for(call, 5)
    assert "ttrpc: closed" in str(info.value)


async def test_client_sees_unavailable_when_server_goes_away(sock_dir):
    """A raw server that accepts a request and then drops the connection."""
    path = os.path.join(sock_dir, "gone.sock")
    got_request = asyncio.Event()

    async def handle(reader, writer):
        await read_frame(reader)
        got_request.set()
        await asyncio.sleep(0.1)
        writer.transport.abort()

    async with raw_server(path, handle):
        client = await TtrpcClient.connect(path)
        calls = [asyncio.create_task(client.call("s", "m", EchoRequest(), EchoResponse)) for _ in range(3)]
        for call in calls:
            with pytest.raises(errdefs.Unavailable) as info:
                await asyncio.wait_for(call, 5)
            assert "ttrpc: closed" in str(info.value)
        assert got_request.is_set()
        assert client.closed
        with pytest.raises(errdefs.Unavailable):
            await client.call("s", "m", EchoRequest(), EchoResponse)
        await client.close()


async def test_client_handles_oversized_and_malformed_responses(sock_dir):
    """Like Go's client: an oversized response fails only its call; a bad frame type closes."""
    path = os.path.join(sock_dir, "big.sock")

    async def handle(reader, writer):
        (s1, _, _), (s2, _, _) = await read_frame(reader), await read_frame(reader)
        body = b"z" * (MESSAGE_LENGTH_MAX + 1)
        ok = bytes(Response(status=RpcStatus(), payload=bytes(EchoResponse(text="small"))))
        writer.write(frame(s1, 2, body) + frame(s2, 2, ok))
        await writer.drain()
        _s3, _, _ = await read_frame(reader)
        writer.write(frame(99, 7, b"junk"))
        await writer.drain()
        await reader.read()

    async with raw_server(path, handle):
        client = await TtrpcClient.connect(path)
        big = asyncio.create_task(client.call("s", "m", EchoRequest(text="big"), EchoResponse))
        small = asyncio.create_task(client.call("s", "m", EchoRequest(text="small"), EchoResponse))
        with pytest.raises(errdefs.ContainerdError) as info:
            await asyncio.wait_for(big, 10)
        assert "exceed maximum message size" in str(info.value)
        assert (await asyncio.wait_for(small, 10)).text == "small"
        with pytest.raises(errdefs.Unavailable):
            await asyncio.wait_for(client.call("s", "m", EchoRequest(), EchoResponse), 5)
        assert client.closed
        await client.close()


async def test_start_unix_replaces_stale_socket_but_not_other_files(sock_dir):
    path = os.path.join(sock_dir, "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    server = TtrpcServer()
    server.register_betterproto(EchoService())
    await server.start_unix(path)
    try:
        client = await TtrpcClient.connect(path)
        assert (await client.call("test.v1.Echo", "Echo", EchoRequest(text="x"), EchoResponse)).text == "x"
        await client.close()
    finally:
        await server.close()

    regular = os.path.join(sock_dir, "file")
    open(regular, "w").close()
    with pytest.raises(FileExistsError):
        await TtrpcServer().start_unix(regular)
    assert os.path.exists(regular)


async def test_connect_failures_are_unavailable(sock_dir):
    with pytest.raises(errdefs.Unavailable):
        await TtrpcClient.connect(os.path.join(sock_dir, "missing.sock"), timeout=1)


async def test_many_callers_on_one_connection(served):
    _, _, path = served
    client = await TtrpcClient.connect(path, namespace="n")

    async def caller(i):
        for j in range(25):
            resp = await client.call("test.v1.Echo", "Echo", EchoRequest(text=f"{i}-{j}"), EchoResponse)
            assert resp.text == f"{i}-{j}"

    await asyncio.gather(*(caller(i) for i in range(32)))
    await client.close()
