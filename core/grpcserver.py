"""The gRPC server: grpclib on a unix socket (and optionally TCP with TLS) serving every service
the grpc plugins export.

Three things happen here and nowhere else: the `containerd-namespace` header becomes the request's
namespace (core/context), errdefs exceptions become gRPC statuses (core/errdefs), and a method
nobody serves gets a proper UNIMPLEMENTED answer with a content-type (grpc-go clients such as
the stock ctr cannot read grpclib's bare Trailers-Only reply).

Three things only make it faster: the namespace binding and error mapping wrap each method once
when the server is made (not per call through a grpclib event listener), what a connection
writes during one pass of the event loop goes out as one write (_CoalescingTransport), and the
HTTP/2 under grpclib is our lean server side (core/http2) instead of h2's.
"""
from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path
from typing import Any, Iterable

import hyperframe.frame
import structlog
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.protocol import Connection, EventsProcessor, H2Protocol, _set_nodelay
from grpclib.server import Server
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes

from . import errdefs
from .context import bind_request, unbind_request
from .http2 import ServerConnection

log = structlog.get_logger(__name__)


def _short_raw_data_repr(data: bytes | None) -> str:
    if not data:
        return "None"
    r = data[:10].hex()
    return "<hex:" + (r + "..." if len(data) > 10 else r) + ">"


# h2 builds repr(frame) for a trace line on every frame it receives, even with logging off, and
# hyperframe's repr hex-encodes a DATA frame's whole payload before keeping 20 characters of it:
# about a sixth of the loop's time during a bulk content write. Our server no longer runs on h2,
# but the daemon's gRPC clients (proxy plugins) do. Same text, sliced first.
hyperframe.frame._raw_data_repr = _short_raw_data_repr


def _unimplemented(path: str) -> Handler:
    async def answer(stream: Any) -> None:
        raise GRPCError(Status.UNIMPLEMENTED, f"unknown method {path}")
    return Handler(answer, Cardinality.UNARY_UNARY, None, None)


class _Mapping(dict):
    """grpclib's method table, answering unknown paths with a handler that says UNIMPLEMENTED."""

    def get(self, key: str, default: Any = None) -> Any:
        found = super().get(key)
        return _unimplemented(key) if found is None else found


def _wrap(handler: Handler) -> Handler:
    """`handler` with the request's namespace and lease bound and errdefs errors as statuses.

    Done once per method when the server is made, not per call through a RecvRequest listener:
    grpclib builds and dispatches an event object for every request when a listener exists.
    """
    method_func = handler.func

    async def handle(stream: Any) -> None:
        tokens = bind_request(stream.metadata)
        try:
            await method_func(stream)
        except errdefs.ContainerdError as e:
            code, message = errdefs.to_status(e)
            raise GRPCError(code, message) from e
        finally:
            unbind_request(tokens)
    return Handler(handle, handler.cardinality, handler.request_type, handler.reply_type)


def prepare_socket_path(path: str) -> None:
    """Create the socket's parent (0711) and remove a stale socket left by a previous run."""
    p = Path(path)
    if not p.parent.exists():
        p.parent.mkdir(parents=True, mode=0o711)
    if p.is_socket() or p.exists():
        p.unlink()


def secure_socket(path: str, uid: int, gid: int, mode: int = 0o660) -> None:
    os.chmod(path, mode)
    if uid or gid:
        os.chown(path, uid, gid)


class _CoalescingTransport:
    """A transport that sends what was written during one pass of the event loop as one write.

    grpclib writes each frame group as soon as h2 produces it: a unary call's response headers,
    message and trailers are three send() calls, and 32 calls answered in one pass are ~100.
    Here they are joined and sent once, at the end of the pass (call_soon), or as soon as
    `limit` bytes are waiting, so bulk streams reach the socket (and its flow control) without
    delay. Order is kept; close() sends what is waiting first.
    """

    limit = 64 * 1024

    def __init__(self, transport: asyncio.Transport):
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._pending: list[bytes] = []
        self._size = 0
        self._scheduled = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._pending.append(data)
        self._size += len(data)
        if self._size >= self.limit:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        self._size = 0
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._size = 0
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _H2Protocol(H2Protocol):
    """grpclib's protocol on our ServerConnection (core/http2) instead of h2's H2Connection,
    writing through a _CoalescingTransport; set up as grpclib sets up its own."""

    def connection_made(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _set_nodelay(sock)
        http2 = ServerConnection()
        http2.initiate_connection()
        initial = http2.local_settings.initial_window_size
        if self.config.http2_connection_window_size > initial:
            http2.increment_flow_control_window(self.config.http2_connection_window_size - initial)
        if self.config.http2_stream_window_size != initial:
            http2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: self.config.http2_stream_window_size})
        self.connection = Connection(http2, _CoalescingTransport(transport), config=self.config)
        self.connection.flush()
        self.connection.initialize()
        self.processor = EventsProcessor(self.handler, self.connection)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.connection.feed(data)
        except ProtocolError:
            log.debug("HTTP/2 protocol error", exc_info=True)
            self.connection.flush()
            self.processor.close("Protocol error")
            return
        self.connection.flush()
        process = self.processor.process
        for event in events:
            process(event)
        self.connection.flush()


class _Server(Server):
    """grpclib's Server whose connections run on _H2Protocol."""

    def _protocol_factory(self) -> H2Protocol:
        made = super()._protocol_factory()
        return _H2Protocol(made.handler, made.config, made.h2_config)


def _make_server(services: list[Any]) -> Server:
    server = _Server(services)
    server._mapping = _Mapping({path: _wrap(h) for path, h in server._mapping.items()})
    return server


class GRPCServer:
    """grpclib serving `services` (betterproto ServiceBase instances) on a unix socket and TCP."""

    def __init__(self, services: Iterable[Any]):
        self._services = list(services)
        self.server = _make_server(self._services)
        self._tcp: Server | None = None
        self.path = ""

    @property
    def methods(self) -> list[str]:
        return sorted(self.server._mapping)

    async def start_unix(self, path: str, uid: int = 0, gid: int = 0) -> None:
        prepare_socket_path(path)
        await self.server.start(path=path)
        secure_socket(path, uid, gid)
        self.path = path

    async def start_tcp(self, address: str, cert: str = "", key: str = "", ca: str = "") -> None:
        host, _, port = address.rpartition(":")
        ctx = None
        if cert and key:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(cert, key)
            ctx.set_alpn_protocols(["h2"])
            if ca:
                ctx.load_verify_locations(ca)
                ctx.verify_mode = ssl.CERT_REQUIRED
        self._tcp = _make_server(self._services)
        await self._tcp.start(host or "127.0.0.1", int(port), ssl=ctx)

    async def close(self, grace: float = 10.0) -> None:
        """Stop accepting, let calls in flight finish for up to `grace` seconds, then close."""
        for server in (self.server, self._tcp):
            if server is None:
                continue
            server.close()
            try:
                await asyncio.wait_for(server.wait_closed(), grace)
            except asyncio.TimeoutError:
                log.warning("calls still in flight at shutdown were cut off")
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)
