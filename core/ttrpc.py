"""ttrpc over unix sockets: a server and a client, wire-compatible with containerd's Go ttrpc (v1.1).

Owns the framing (10-byte big-endian header: length, stream id, type, flags), the Request/Response
envelopes, stream-id allocation, deadlines from `timeout_nano`, metadata and the namespace key, and
how a connection reacts to malformed input. It does not own error classes or their status codes
(core.errdefs) nor the namespace context variable (core.context); it knows no service.

Wire facts this module keeps:
  * requests are type 1, responses type 2; client stream ids are odd, 1, 3, 5, ...
  * a message body may be at most 4 MiB (MESSAGE_LENGTH_MAX);
  * every response carries a google.rpc.Status (code 0 when OK) and the payload;
  * an unknown service or method answers UNIMPLEMENTED ("service X" / "method Y"), as Go does.

Where we are stricter than Go: a frame the server cannot accept (oversized, a type other than
request, a header or body cut short by EOF) closes that connection; Go instead skips unknown types
and discards oversized bodies. Before closing on an oversized frame the server still answers that
stream with RESOURCE_EXHAUSTED, so a Go client sees the same error it would from a Go server.

The envelopes are encoded and decoded by hand (see `encode_request` and friends) rather than through
the betterproto classes in pycontainerd.api.gen.ttrpc: they are on every call's path and the
generated classes cost several hundred microseconds per call. The unit tests check both agree.
Frames queued during one event-loop iteration leave in one write, so concurrent calls share syscalls.

Handlers run as one task per request, with core.context's namespace bound from the request metadata
and the whole metadata readable through `request_metadata()`; `timeout_nano` cancels the handler at
its deadline (DEADLINE_EXCEEDED), and a connection that goes away cancels its handlers, as Go
cancels their contexts.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Mapping, TypeVar

import structlog
from betterproto.casing import safe_snake_case
from grpclib.const import Cardinality, Status

from . import errdefs
from .context import TTRPC_NAMESPACE_HEADER, bind_request, unbind_request

log = structlog.get_logger(__name__)

MESSAGE_HEADER_LENGTH = 10
MESSAGE_LENGTH_MAX = 4 << 20
MESSAGE_TYPE_REQUEST = 0x1
MESSAGE_TYPE_RESPONSE = 0x2

_HEADER = struct.Struct(">IIBB")
_MASK64 = (1 << 64) - 1
_STREAM_ID_MAX = (1 << 32) - 1
_MAX_INFLIGHT_PER_CONN = 4096
_CLOSED_MESSAGE = "ttrpc: closed"

T = TypeVar("T")
Metadata = Mapping[str, "str | bytes | Iterable[str]"] | Iterable[tuple[str, "str | bytes"]]


class MalformedMessage(ValueError):
    """An envelope or frame that does not follow the wire format."""


# --------------------------------------------------------------------------------------------------
# Envelope codec (protobuf, hand-written for the five fields that matter)

def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    n = len(data)
    while True:
        if pos >= n:
            raise MalformedMessage("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise MalformedMessage("varint too long")


def _fields(data: bytes):
    """Yield (field number, wire type, value) for every field; value is int (varint) or bytes (len)."""
    pos = 0
    n = len(data)
    while pos < n:
        b = data[pos]
        if b < 0x80:
            key = b
            pos += 1
        else:
            key, pos = _read_varint(data, pos)
        wire = key & 7
        if wire == 2:
            b = data[pos] if pos < n else 0x80
            if b < 0x80:
                length = b
                pos += 1
            else:
                length, pos = _read_varint(data, pos)
            end = pos + length
            if end > n:
                raise MalformedMessage("truncated length-delimited field")
            yield key >> 3, 2, data[pos:end]
            pos = end
        elif wire == 0:
            value, pos = _read_varint(data, pos)
            yield key >> 3, 0, value
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
            if pos > n:
                raise MalformedMessage("truncated fixed field")
        else:
            raise MalformedMessage(f"unsupported wire type {wire}")


def _len_field(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        return bytes((tag, n)) + value
    return bytes((tag,)) + _varint(n) + value


# Encoded (service, method) and metadata fields, reused across calls: both repeat endlessly.
_prefix_cache: dict[tuple[str, str], bytes] = {}
_metadata_cache: dict[tuple[tuple[str, str], ...], bytes] = {}
_CACHE_MAX = 512


def _encode_metadata(metadata: tuple[tuple[str, str], ...]) -> bytes:
    encoded = _metadata_cache.get(metadata)
    if encoded is None:
        parts = []
        for key, value in metadata:
            kv = b""
            if key:
                kv = _len_field(0x0A, key.encode())
            if value:
                kv += _len_field(0x12, value.encode())
            parts.append(_len_field(0x2A, kv))
        encoded = b"".join(parts)
        if len(_metadata_cache) >= _CACHE_MAX:
            _metadata_cache.clear()
        _metadata_cache[metadata] = encoded
    return encoded


def encode_request(service: str, method: str, payload: bytes = b"", timeout_nano: int = 0,
                   metadata: Iterable[tuple[str, str]] = ()) -> bytes:
    """The Request envelope: service=1, method=2, payload=3, timeout_nano=4 (int64), metadata=5."""
    prefix = _prefix_cache.get((service, method))
    if prefix is None:
        prefix = _len_field(0x0A, service.encode()) + _len_field(0x12, method.encode())
        if len(_prefix_cache) >= _CACHE_MAX:
            _prefix_cache.clear()
        _prefix_cache[(service, method)] = prefix
    body = prefix
    if payload:
        body += _len_field(0x1A, payload)
    if timeout_nano:
        body += b"\x20" + _varint(timeout_nano & _MASK64)
    if metadata:
        body += _encode_metadata(tuple((k, v) for k, v in metadata))
    return body


def decode_request(data: bytes) -> tuple[str, str, bytes, int, list[tuple[str, str]]]:
    """(service, method, payload, timeout_nano, metadata pairs) of a Request envelope."""
    service = method = ""
    payload = b""
    timeout_nano = 0
    metadata: list[tuple[str, str]] = []
    pos = 0
    n = len(data)
    try:
        while pos < n:
            key = data[pos]
            if key < 0x80:
                pos += 1
            else:
                key, pos = _read_varint(data, pos)
            if key & 7 == 2:
                length = data[pos] if pos < n else 0x80
                if length < 0x80:
                    pos += 1
                else:
                    length, pos = _read_varint(data, pos)
                end = pos + length
                if end > n:
                    raise MalformedMessage("truncated length-delimited field")
                if key == 0x0A:
                    service = data[pos:end].decode()
                elif key == 0x12:
                    method = data[pos:end].decode()
                elif key == 0x1A:
                    payload = data[pos:end]
                elif key == 0x2A:
                    k = v = ""
                    for knum, kwire, kvalue in _fields(data[pos:end]):
                        if knum == 1 and kwire == 2:
                            k = kvalue.decode()
                        elif knum == 2 and kwire == 2:
                            v = kvalue.decode()
                    metadata.append((k, v))
                elif key >> 3 <= 5:
                    raise MalformedMessage(f"field {key >> 3} has wire type 2")
                pos = end
            elif key == 0x20:
                value, pos = _read_varint(data, pos)
                timeout_nano = value & _MASK64
                if timeout_nano >= 1 << 63:
                    timeout_nano -= 1 << 64
            elif key >> 3 <= 5:
                raise MalformedMessage(f"field {key >> 3} has wire type {key & 7}")
            else:  # a field this version does not know: skip it
                pos = _skip_field(data, pos, key & 7)
    except UnicodeDecodeError as err:
        raise MalformedMessage(f"invalid utf-8: {err}") from None
    return service, method, payload, timeout_nano, metadata


def _skip_field(data: bytes, pos: int, wire: int) -> int:
    if wire == 0:
        return _read_varint(data, pos)[1]
    if wire == 1 or wire == 5:
        pos += 8 if wire == 1 else 4
    else:
        raise MalformedMessage(f"unsupported wire type {wire}")
    if pos > len(data):
        raise MalformedMessage("truncated fixed field")
    return pos


_OK_STATUS_FIELD = b"\x0a\x00"


def encode_response(code: int, message: str = "", payload: bytes = b"") -> bytes:
    """The Response envelope: status=1 (google.rpc.Status: code=1, message=2), payload=2."""
    if code == 0 and not message:
        status = _OK_STATUS_FIELD
    else:
        st = b""
        if code:
            st = b"\x08" + _varint(code & _MASK64)
        if message:
            st += _len_field(0x12, message.encode())
        status = _len_field(0x0A, st)
    if payload:
        return status + _len_field(0x12, payload)
    return status


def decode_response(data: bytes) -> tuple[int, str, bytes]:
    """(status code, status message, payload) of a Response envelope; status details are ignored."""
    # Fast path for what every OK answer from us and from Go looks like: empty status, payload.
    if data[:2] == _OK_STATUS_FIELD:
        n = len(data)
        if n == 2:
            return 0, "", b""
        if data[2] == 0x12 and n > 3 and data[3] < 0x80 and n == 4 + data[3]:
            return 0, "", data[4:]
    code = 0
    message = ""
    payload = b""
    try:
        for num, wire, value in _fields(data):
            if num == 1 and wire == 2:
                for snum, swire, svalue in _fields(value):
                    if snum == 1 and swire == 0:
                        code = svalue & 0xFFFFFFFF
                        if code >= 1 << 31:
                            code -= 1 << 32
                    elif snum == 2 and swire == 2:
                        message = svalue.decode()
            elif num == 2 and wire == 2:
                payload = value
            elif num <= 2:
                raise MalformedMessage(f"field {num} has wire type {wire}")
    except UnicodeDecodeError as err:
        raise MalformedMessage(f"invalid utf-8: {err}") from None
    return code, message, payload


def _frame(stream_id: int, mtype: int, body: bytes) -> bytes:
    return _HEADER.pack(len(body), stream_id, mtype, 0) + body


def _unix_path(address: str) -> str:
    if address.startswith("unix://"):
        address = address[len("unix://"):]
    if address.startswith("@"):
        address = "\0" + address[1:]
    return address


# --------------------------------------------------------------------------------------------------
# A framed connection, shared by both ends

class _Channel(asyncio.Protocol):
    """Splits the byte stream into frames and writes frames; subclasses handle each frame."""

    _kind = "channel"
    _accepted_type = 0

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = bytearray()
        self._skip = 0
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future] = []
        self._outgoing: list[bytes] | None = None
        self._loop = asyncio.get_running_loop()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return
            data = data[self._skip:]
            self._skip = 0
        buf = self._buf
        buf += data
        pos = 0
        n = len(buf)
        accepted = self._accepted_type
        while n - pos >= MESSAGE_HEADER_LENGTH:
            length, stream_id, mtype, _flags = _HEADER.unpack_from(buf, pos)
            if length > MESSAGE_LENGTH_MAX:
                del buf[:pos + MESSAGE_HEADER_LENGTH]
                self._oversized(stream_id, length)
                return
            if mtype != accepted:
                self.malformed(f"unexpected message type {mtype} on stream {stream_id}")
                return
            end = pos + MESSAGE_HEADER_LENGTH + length
            if end > n:
                break
            body = bytes(buf[pos + MESSAGE_HEADER_LENGTH:end])
            pos = end
            self.frame_received(stream_id, body)
            if self.closed:
                return
        if pos:
            del buf[:pos]

    def eof_received(self) -> bool | None:
        if self._buf:
            self.malformed(f"connection closed inside a message ({len(self._buf)} bytes pending)")
        return None  # let the transport close

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._buf.clear()
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    # helpers
    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            fut = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(fut)
            await fut

    def send(self, stream_id: int, mtype: int, body: bytes) -> None:
        """Queue one frame. Frames queued in one loop iteration go out in a single write at its
        end (one syscall for many concurrent calls); a frame is never split or interleaved."""
        if self.closed:
            return
        frame = _HEADER.pack(len(body), stream_id, mtype, 0) + body
        if self._outgoing is None:
            self._outgoing = [frame]
            self._loop.call_soon(self._flush)
        else:
            self._outgoing.append(frame)

    def _flush(self) -> None:
        frames, self._outgoing = self._outgoing, None
        if frames and not self.closed:
            self.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    def malformed(self, reason: str) -> None:
        log.warning("ttrpc: malformed input, closing connection", side=self._kind, reason=reason)
        self.abort()

    def abort(self, force: bool = False) -> None:
        """Close the connection: flushing what was written, or at once when `force`."""
        if not self.closed:
            if not force and self._outgoing:
                self._flush()
            self.closed = True
            self._buf.clear()
            if self.transport is not None:
                self.transport.close()
        if force and self.transport is not None:
            self.transport.abort()

    # for subclasses
    def frame_received(self, stream_id: int, body: bytes) -> None:
        raise NotImplementedError

    def _oversized(self, stream_id: int, length: int) -> None:
        raise NotImplementedError


def _oversize_message(length: int) -> str:
    return f"message length {length} exceed maximum message size of {MESSAGE_LENGTH_MAX}"


# --------------------------------------------------------------------------------------------------
# Server

Handler = Callable[[Any], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Method:
    """One unary method: the request message type (None: the raw payload bytes are passed), the
    response type (documentation only; a handler may return a message, bytes, or None for an empty
    message) and the async handler taking the request and returning the response."""

    request_type: type | None
    response_type: type | None
    handler: Handler


_request_metadata: contextvars.ContextVar[dict[str, list[str]] | None] = contextvars.ContextVar(
    "ttrpc_request_metadata", default=None)


def request_metadata() -> dict[str, list[str]]:
    """The metadata of the ttrpc request being handled (key -> values, like Go's ttrpc.MD)."""
    return _request_metadata.get() or {}


class _ServerConnection(_Channel):
    _kind = "server"
    _accepted_type = MESSAGE_TYPE_REQUEST

    def __init__(self, server: "TtrpcServer") -> None:
        super().__init__()
        self.server = server
        self.tasks: set[asyncio.Task] = set()
        self._read_paused = False
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.server._connections.add(self)
        if self.server._closing:
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # The peer is gone: like Go cancelling the request contexts, stop the handlers.
        for task in list(self.tasks):
            task.cancel()
        self.server._connection_gone(self)

    def frame_received(self, stream_id: int, body: bytes) -> None:
        if not stream_id & 1:
            self._respond(stream_id, Status.INVALID_ARGUMENT.value,
                          "StreamID must be odd for client initiated streams")
            return
        try:
            service, method_name, payload, timeout_nano, metadata = decode_request(body)
        except MalformedMessage as err:
            self._respond(stream_id, Status.INVALID_ARGUMENT.value, f"unmarshal request error: {err}")
            return
        methods = self.server._services.get(service)
        if methods is None:
            self._respond(stream_id, Status.UNIMPLEMENTED.value, f"service {service}")
            return
        method = methods.get(method_name)
        if method is None:
            self._respond(stream_id, Status.UNIMPLEMENTED.value, f"method {method_name}")
            return
        task = self._loop.create_task(
            self.server._run(self, stream_id, service, method_name, method, payload, timeout_nano, metadata))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        if len(self.tasks) >= _MAX_INFLIGHT_PER_CONN and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if self._read_paused and len(self.tasks) < _MAX_INFLIGHT_PER_CONN // 2 and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()
        if self.closing and not self.tasks:
            self.abort()

    def _respond(self, stream_id: int, code: int, message: str, payload: bytes = b"") -> None:
        self.send(stream_id, MESSAGE_TYPE_RESPONSE, encode_response(code, message, payload))

    def _oversized(self, stream_id: int, length: int) -> None:
        self._respond(stream_id, Status.RESOURCE_EXHAUSTED.value, _oversize_message(length))
        self.malformed(_oversize_message(length))

    def close_when_idle(self) -> None:
        self.closing = True
        if not self.tasks:
            self.abort()


class TtrpcServer:
    """Serves registered unary methods over ttrpc on unix sockets.

        server = TtrpcServer()
        server.register("containerd.task.v2.Task", {"Connect": Method(ConnectRequest, ConnectResponse, connect)})
        server.register_betterproto(MyTaskService())      # a betterproto ServiceBase subclass
        await server.start_unix("/run/x.sock")
        ...
        await server.close()
    """

    def __init__(self) -> None:
        self._services: dict[str, dict[str, Method]] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._paths: list[tuple[str, int]] = []  # socket files we created: (path, inode)
        self._connections: set[_ServerConnection] = set()
        self._closing = False
        self._idle: asyncio.Event | None = None

    # registration
    def register(self, service_name: str, methods: Mapping[str, Method]) -> None:
        if service_name in self._services:
            raise ValueError(f"duplicate service {service_name} registered")
        self._services[service_name] = dict(methods)

    def register_betterproto(self, service_obj: Any) -> list[str]:
        """Serve the unary methods of a betterproto-generated grpclib ServiceBase instance.

        Returns the service names registered. Streaming methods are skipped (ttrpc 1.1 has none).
        """
        by_service: dict[str, dict[str, Method]] = {}
        for route, handler in service_obj.__mapping__().items():
            service_name, _, method_name = route.lstrip("/").rpartition("/")
            if handler.cardinality is not Cardinality.UNARY_UNARY:
                log.debug("ttrpc: skipping streaming method", route=route)
                continue
            func = getattr(service_obj, safe_snake_case(method_name), None)
            if func is None:
                raise ValueError(f"{type(service_obj).__name__} has no method for {route}")
            by_service.setdefault(service_name, {})[method_name] = Method(
                handler.request_type, handler.reply_type, func)
        for service_name, methods in by_service.items():
            self.register(service_name, methods)
        return list(by_service)

    @property
    def services(self) -> dict[str, list[str]]:
        return {name: sorted(methods) for name, methods in self._services.items()}

    # listening
    async def start_unix(self, path: str, mode: int = 0o660) -> None:
        """Listen on a unix socket at `path` (a stale socket file there is removed first).

        May be called more than once to listen on several paths."""
        if self._closing:
            raise errdefs.Unavailable("ttrpc: server closed")
        path = _unix_path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            if not path.startswith("\0"):
                parent = os.path.dirname(path)
                if parent:
                    os.makedirs(parent, exist_ok=True)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    pass
                else:
                    if not stat.S_ISSOCK(st.st_mode):
                        raise FileExistsError(f"{path} exists and is not a socket")
                    os.unlink(path)
            sock.bind(path)
            bound = True
            if not path.startswith("\0"):
                os.chmod(path, mode)  # before listen(): no one connects through a wider mode
                self._paths.append((path, os.lstat(path).st_ino))
            sock.listen(1024)
            await self.start_socket(sock)
        except BaseException:
            sock.close()
            if bound and not path.startswith("\0"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                self._paths = [entry for entry in self._paths if entry[0] != path]
            raise
        log.info("ttrpc: serving", address=path)

    async def start_socket(self, sock: socket.socket) -> None:
        """Serve on an already listening socket (e.g. the one a shim inherits as fd 3).

        The socket file, if any, is left in place on close()."""
        if self._closing:
            raise errdefs.Unavailable("ttrpc: server closed")
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        self._servers.append(await loop.create_unix_server(lambda: _ServerConnection(self), sock=sock))

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, let in-flight calls finish (up to `grace` seconds), close every
        connection and remove the socket files start_unix created."""
        self._closing = True
        for srv in self._servers:
            srv.close()
        for conn in list(self._connections):
            conn.close_when_idle()
        if self._connections:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except asyncio.TimeoutError:
                log.warning("ttrpc: calls still running after grace period, cancelling",
                            connections=len(self._connections))
                for conn in list(self._connections):
                    for task in list(conn.tasks):
                        task.cancel()
                    conn.abort(force=True)
        for srv in self._servers:
            await srv.wait_closed()
        self._servers.clear()
        for path, ino in self._paths:
            try:
                if os.lstat(path).st_ino == ino:
                    os.unlink(path)
            except FileNotFoundError:
                pass
        self._paths.clear()

    def _connection_gone(self, conn: _ServerConnection) -> None:
        self._connections.discard(conn)
        if self._idle is not None and not self._connections:
            self._idle.set()

    # one call
    async def _run(self, conn: _ServerConnection, stream_id: int, service: str, method_name: str,
                   method: Method, payload: bytes, timeout_nano: int,
                   metadata: list[tuple[str, str]]) -> None:
        md: dict[str, list[str]] = {}
        for key, value in metadata:
            md.setdefault(key, []).append(value)
        ns_tokens = bind_request(metadata)
        md_token = _request_metadata.set(md)
        code = 0
        message = ""
        data = b""
        try:
            if method.request_type is None:
                request = payload
            else:
                try:
                    request = method.request_type().parse(payload)
                except Exception as err:  # noqa: BLE001 - betterproto raises assorted errors
                    raise _StatusError(Status.INTERNAL, f"ttrpc: error unmarshalling payload: {err}")
            if timeout_nano:
                if timeout_nano < 0:
                    raise errdefs.DeadlineExceeded()
                timer = asyncio.timeout(timeout_nano / 1e9)
                try:
                    async with timer:
                        response = await method.handler(request)
                except TimeoutError:
                    if timer.expired():
                        raise errdefs.DeadlineExceeded() from None
                    raise
            else:
                response = await method.handler(request)
            data = b"" if response is None else bytes(response)
            if len(data) > MESSAGE_LENGTH_MAX - 64:  # room for the envelope around it
                code, message = Status.RESOURCE_EXHAUSTED.value, _oversize_message(len(data))
                data = b""
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # we were cancelled (peer gone, server closing): nobody to answer
            # the handler let through a cancellation that was not ours: answer it
            status, message = errdefs.to_status(errdefs.Canceled())
            code = status.value
        except _StatusError as err:
            code, message = err.code.value, err.message
        except errdefs.ContainerdError as err:
            status, message = errdefs.to_status(err)
            code = status.value
        except Exception as err:  # noqa: BLE001 - every handler failure becomes a status
            log.exception("ttrpc: handler failed", service=service, method=method_name)
            status, message = errdefs.to_status(err)
            code = status.value
        finally:
            _request_metadata.reset(md_token)
            unbind_request(ns_tokens)
        conn._respond(stream_id, code, message, data)
        await conn.drain()


class _StatusError(Exception):
    def __init__(self, code: Status, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------------------------------
# Client

class _ClientConnection(_Channel):
    _kind = "client"
    _accepted_type = MESSAGE_TYPE_RESPONSE

    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[int, asyncio.Future] = {}
        self.lost = asyncio.get_running_loop().create_future()

    def frame_received(self, stream_id: int, body: bytes) -> None:
        fut = self.pending.pop(stream_id, None)
        if fut is None:
            log.debug("ttrpc: response for unknown stream (late or abandoned call)", stream_id=stream_id)
            return
        if fut.done():
            return
        try:
            code, message, payload = decode_response(body)
        except MalformedMessage as err:
            fut.set_exception(errdefs.Unknown(f"ttrpc: malformed response: {err}"))
            return
        if code:
            fut.set_exception(errdefs.from_status(code, message))
        else:
            fut.set_result(payload)

    def _oversized(self, stream_id: int, length: int) -> None:
        # As Go's client does: discard the body, fail only that call.
        self._skip = length
        data, self._buf = bytes(self._buf), bytearray()
        fut = self.pending.pop(stream_id, None)
        if fut is not None and not fut.done():
            fut.set_exception(errdefs.from_status(Status.RESOURCE_EXHAUSTED, _oversize_message(length)))
        if data:
            self.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(errdefs.Unavailable(_CLOSED_MESSAGE))
        if not self.lost.done():
            self.lost.set_result(None)


def _metadata_pairs(metadata: Metadata | None, namespace: str | None) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    if metadata:
        items = metadata.items() if isinstance(metadata, Mapping) else metadata
        for key, value in items:
            key = key.lower()
            if isinstance(value, bytes):
                pairs.append((key, value.decode()))
            elif isinstance(value, str):
                pairs.append((key, value))
            else:
                pairs.extend((key, v) for v in value)
    if namespace:
        pairs = [kv for kv in pairs if kv[0] != TTRPC_NAMESPACE_HEADER]
        pairs.append((TTRPC_NAMESPACE_HEADER, namespace))
    return pairs


class TtrpcClient:
    """A ttrpc client on one unix-socket connection; calls are multiplexed by stream id.

        client = await TtrpcClient.connect("/run/pycontainerd/s/abc", timeout=5)
        resp = await client.call("containerd.task.v2.Task", "Connect", ConnectRequest(id="x"), ConnectResponse)
        task = client.stub(TaskStub, namespace="default")
        await task.connect(ConnectRequest(id="x"))
        await client.close()
    """

    def __init__(self, conn: _ClientConnection, namespace: str | None = None) -> None:
        self._conn = conn
        self._next_stream_id = 1
        self.namespace = namespace

    @classmethod
    async def connect(cls, path: str, timeout: float | None = 10.0, namespace: str | None = None) -> "TtrpcClient":
        """Connect to the unix socket at `path` ("unix://" prefix and "@abstract" names accepted).

        `namespace`, when given, is sent with every call that does not name its own."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_unix_connection(_ClientConnection, _unix_path(path))
        except TimeoutError:
            raise errdefs.DeadlineExceeded(f"ttrpc: connect {path}") from None
        except OSError as err:
            raise errdefs.Unavailable(f"ttrpc: connect {path}: {err.strerror or err}") from None
        return cls(conn, namespace)

    @property
    def closed(self) -> bool:
        return self._conn.closed

    async def wait_closed(self) -> None:
        """Return when the connection is gone (closed by either side)."""
        await asyncio.shield(self._conn.lost)

    async def call(self, service: str, method: str, request: Any, response_type: type[T] | None,
                   timeout: float | None = None, metadata: Metadata | None = None,
                   namespace: str | None = None) -> T:
        """One unary call. `request` is a betterproto message (or raw bytes); the response is parsed
        as `response_type` (None: the raw payload bytes are returned).

        A non-OK status raises the errdefs class for its code; a lost connection raises
        errdefs.Unavailable("ttrpc: closed"); an expired `timeout` raises errdefs.DeadlineExceeded
        (the server gets the same deadline through timeout_nano)."""
        conn = self._conn
        if conn.closed:
            raise errdefs.Unavailable(_CLOSED_MESSAGE)
        payload = request if isinstance(request, bytes) else bytes(request)
        timeout_nano = 0
        if timeout is not None:
            if timeout <= 0:
                raise errdefs.DeadlineExceeded()
            timeout_nano = int(timeout * 1e9) or 1
        ns = namespace or self.namespace
        if metadata:
            pairs = _metadata_pairs(metadata, ns)
        else:
            pairs = ((TTRPC_NAMESPACE_HEADER, ns),) if ns else ()
        body = encode_request(service, method, payload, timeout_nano, pairs)
        if len(body) > MESSAGE_LENGTH_MAX:
            raise errdefs.from_status(Status.RESOURCE_EXHAUSTED, _oversize_message(len(body)))

        stream_id = self._next_stream_id
        self._next_stream_id = stream_id + 2 if stream_id + 2 <= _STREAM_ID_MAX else 1
        fut = asyncio.get_running_loop().create_future()
        conn.pending[stream_id] = fut
        try:
            await conn.drain()
            if conn.closed:
                raise errdefs.Unavailable(_CLOSED_MESSAGE)
            conn.send(stream_id, MESSAGE_TYPE_REQUEST, body)
            if timeout is None:
                data = await fut
            else:
                try:
                    async with asyncio.timeout(timeout):
                        data = await fut
                except TimeoutError:
                    raise errdefs.DeadlineExceeded(f"ttrpc: {service}/{method}") from None
        finally:
            conn.pending.pop(stream_id, None)
        if response_type is None:
            return data
        return response_type().parse(data)

    def stub(self, stub_class: type[T], namespace: str | None = None, *, timeout: float | None = None,
             metadata: Metadata | None = None) -> T:
        """An instance of a betterproto-generated `XxxStub` whose unary calls go over this client."""
        cls = _ttrpc_stub_class(stub_class)
        stub = cls(self, timeout=timeout, metadata=metadata)
        stub._ttrpc_namespace = namespace
        return stub

    async def close(self) -> None:
        """Close the connection; calls still pending fail with Unavailable."""
        self._conn.abort(force=True)
        await asyncio.shield(self._conn.lost)

    async def __aenter__(self) -> "TtrpcClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class _TtrpcStubMixin:
    """Replaces betterproto's grpclib transport in a generated stub with a TtrpcClient."""

    channel: TtrpcClient
    timeout: float | None
    deadline: Any
    metadata: Metadata | None
    _ttrpc_namespace: str | None = None

    async def _unary_unary(self, route: str, request: Any, response_type: type[T], *,
                           timeout: float | None = None, deadline: Any = None,
                           metadata: Metadata | None = None) -> T:
        timeout = self.timeout if timeout is None else timeout
        deadline = self.deadline if deadline is None else deadline
        if deadline is not None:
            remaining = deadline.time_remaining()
            timeout = remaining if timeout is None else min(timeout, remaining)
        service, _, method = route.lstrip("/").rpartition("/")
        return await self.channel.call(
            service, method, request, response_type, timeout=timeout,
            metadata=self.metadata if metadata is None else metadata, namespace=self._ttrpc_namespace)

    def _unary_stream(self, route: str, *args: Any, **kwargs: Any):
        raise errdefs.Unimplemented(f"ttrpc: streaming call {route}")

    _stream_unary = _stream_stream = _unary_stream


_stub_classes: dict[type, type] = {}


def _ttrpc_stub_class(stub_class: type) -> type:
    cls = _stub_classes.get(stub_class)
    if cls is None:
        cls = type(f"Ttrpc{stub_class.__name__}", (_TtrpcStubMixin, stub_class), {})
        _stub_classes[stub_class] = cls
    return cls


__all__ = [
    "MESSAGE_LENGTH_MAX", "MESSAGE_TYPE_REQUEST", "MESSAGE_TYPE_RESPONSE", "MalformedMessage",
    "Method", "TtrpcClient", "TtrpcServer", "decode_request", "decode_response", "encode_request",
    "encode_response", "request_metadata",
]
