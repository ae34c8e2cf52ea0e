"""The content service (`io.containerd.service.v1.content-service`): the namespaced content
store for the request's namespace and lease, publishing /content/delete; and its gRPC adapter
(`io.containerd.grpc.v1.content`, containerd.services.content.v1.Content).

ContentService is plain Python: it reads the namespace and lease from the request context
(core/context.py) and returns plain types (plugins/content/local.py Info and Status). Other
plugins and tests call it in-process. ContentGRPC only translates messages and reproduces the
status codes and messages of containerd's contentserver, including its Write state machine.
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Mapping

import structlog
from betterproto.lib.google.protobuf import Empty
from grpclib.const import Handler
from grpclib.const import Status as GrpcStatus
from grpclib.exceptions import GRPCError

from pycontainerd.api.gen.containerd import events as ev
from pycontainerd.api.gen.containerd.services.content import v1 as api
from pycontainerd.core import context, errdefs, identifiers
from pycontainerd.core import digest as digests
from pycontainerd.core.identifiers import go_quote
from pycontainerd.plugins.metadata.content import ContentStore, NamespacedWriter

from .local import CHUNK, Info, ReaderAt, Status

log = structlog.get_logger(__name__)

LIST_BATCH = 100
"""Infos per List response message, as containerd batches them."""


def request_namespace() -> str:
    """The request's namespace, required and valid (containerd's NamespaceRequired)."""
    ns = context.namespace()
    try:
        identifiers.validate(ns)
    except errdefs.InvalidArgument as e:
        raise errdefs.InvalidArgument(f"namespace validation: {e.message}") from None
    return ns


class ContentService:
    """The namespaced content store, bound to the request's namespace and lease."""

    def __init__(self, store: ContentStore, events: Any):
        self.store = store
        self.events = events

    @property
    def backend(self):
        return self.store.backend

    def info(self, digest: str) -> Info:
        return self.store.info(request_namespace(), digest)

    async def update(self, info: Info, paths: list[str] | tuple[str, ...] = ()) -> Info:
        return await self.store.update(request_namespace(), info, paths)

    def list(self, filters: list[str] | tuple[str, ...] = ()) -> list[Info]:
        return self.store.walk(request_namespace(), *filters)

    async def delete(self, digest: str) -> None:
        ns = request_namespace()
        await self.store.delete(ns, digest, context.lease())
        self.events.publish(ns, "/content/delete", ev.ContentDelete(digest=digest))

    async def reader(self, digest: str) -> ReaderAt:
        return await self.store.reader(request_namespace(), digest)

    async def read(self, digest: str, offset: int = 0, size: int = -1) -> bytes:
        return await self.store.read(request_namespace(), digest, offset, size)

    async def writer(self, ref: str, total: int = 0, expected: str = "") -> NamespacedWriter:
        return await self.store.writer(request_namespace(), ref, total, expected, context.lease())

    async def write_blob(self, ref: str, data: bytes, expected: str = "",
                         labels: Mapping[str, str] | None = None) -> str:
        """Ingest `data` in one go (already present: its digest, nothing written)."""
        try:
            w = await self.writer(ref, len(data), expected)
        except errdefs.AlreadyExists:
            return expected
        try:
            st = w.status()
            if st.offset and st.offset != len(data):
                await w.truncate(0)
            if w.status().offset == 0:
                await w.write(data)
            try:
                return await w.commit(len(data), expected, labels)
            except errdefs.AlreadyExists:
                return w.digest()
        finally:
            await w.close()

    async def status(self, ref: str) -> Status:
        return await self.store.status(request_namespace(), ref)

    async def list_statuses(self, filters: list[str] | tuple[str, ...] = ()) -> list[Status]:
        return await self.store.list_statuses(request_namespace(), *filters)

    async def abort(self, ref: str) -> None:
        await self.store.abort(request_namespace(), ref, context.lease())


# ---------------------------------------------------------------------------------------------
# gRPC


class OutOfRange(errdefs.ContainerdError):
    """gRPC OUT_OF_RANGE with a bare message (errdefs has no such class; only this API uses it)."""

    code, suffix = GrpcStatus.OUT_OF_RANGE, ""

    def __str__(self) -> str:
        return self.message


def digest_error(value: str) -> str | None:
    """go-digest's Validate() text for an invalid digest, None for a valid one."""
    try:
        digests.parse(value)
        return None
    except errdefs.InvalidArgument:
        pass
    algorithm, sep, encoded = value.partition(":")
    if not sep or not algorithm or not encoded:
        return "invalid checksum digest format"
    size = digests.ALGORITHMS.get(algorithm)
    if size is None:
        return "unsupported digest algorithm" if digests._FORM.match(value) else "invalid checksum digest format"
    if len(encoded) != size:
        return "invalid checksum digest length"
    return "invalid checksum digest format"


def _info_pb(info: Info, updated: bool = True) -> api.Info:
    pb = api.Info(digest=info.digest, size=info.size, created_at=info.created_at, labels=dict(info.labels))
    if updated:
        pb.updated_at = info.updated_at
    return pb


def _status_pb(st: Status) -> api.Status:
    return api.Status(started_at=st.started_at, updated_at=st.updated_at, ref=st.ref, offset=st.offset,
                      total=st.total, expected=st.expected)


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint too long")


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _skip(buf, pos: int, wire: int) -> int:
    if wire == 0:
        return _varint(buf, pos)[1]
    if wire == 1:
        return pos + 8
    if wire == 2:
        n, pos = _varint(buf, pos)
        return pos + n
    if wire == 5:
        return pos + 4
    raise ValueError(f"unsupported wire type {wire}")


def _map_entry(view: memoryview) -> tuple[str, str]:
    key = value = ""
    pos, end = 0, len(view)
    while pos < end:
        tag, pos = _varint(view, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 2 and field in (1, 2):
            n, pos = _varint(view, pos)
            text = bytes(view[pos:pos + n]).decode()
            pos += n
            if field == 1:
                key = text
            else:
                value = text
        else:
            pos = _skip(view, pos, wire)
    return key, value


class FastWriteContentRequest(api.WriteContentRequest):
    """WriteContentRequest decoded without betterproto's copies: `data` is a memoryview over
    the received message (betterproto copies each 1 MiB chunk several times)."""

    @classmethod
    def FromString(cls, data: bytes) -> api.WriteContentRequest:
        view = memoryview(data)
        fields: dict[str, Any] = {}
        labels: dict[str, str] = {}
        pos, end = 0, len(view)
        try:
            while pos < end:
                tag, pos = _varint(view, pos)
                field, wire = tag >> 3, tag & 7
                if wire == 0 and field in (1, 3, 5):
                    value, pos = _varint(view, pos)
                    if field == 1:
                        fields["action"] = api.WriteAction(value)
                    else:
                        fields["total" if field == 3 else "offset"] = _int64(value)
                elif wire == 2 and field in (2, 4, 6, 7):
                    n, pos = _varint(view, pos)
                    if pos + n > end:
                        raise ValueError("truncated field")
                    chunk = view[pos:pos + n]
                    pos += n
                    if field == 6:
                        fields["data"] = chunk
                    elif field == 7:
                        key, value = _map_entry(chunk)
                        labels[key] = value
                    else:
                        fields["ref" if field == 2 else "expected"] = bytes(chunk).decode()
                else:
                    pos = _skip(view, pos, wire)
        except (IndexError, ValueError, UnicodeDecodeError) as e:
            raise GRPCError(GrpcStatus.INTERNAL, f"grpc: failed to unmarshal the received message: {e}") from None
        if labels:
            fields["labels"] = labels
        msg = api.WriteContentRequest(**fields)
        return msg


class FastReadContentRequest(api.ReadContentRequest):
    """ReadContentRequest decoded by hand: ctr reads a blob in 32 KiB ReadAt calls, one Read
    RPC each, so this small decode runs thousands of times per blob."""

    @classmethod
    def FromString(cls, data: bytes) -> api.ReadContentRequest:
        fields: dict[str, Any] = {}
        pos, end = 0, len(data)
        try:
            while pos < end:
                tag, pos = _varint(data, pos)
                field, wire = tag >> 3, tag & 7
                if field == 1 and wire == 2:
                    n, pos = _varint(data, pos)
                    fields["digest"] = data[pos:pos + n].decode()
                    pos += n
                elif field in (2, 3) and wire == 0:
                    value, pos = _varint(data, pos)
                    fields["offset" if field == 2 else "size"] = _int64(value)
                else:
                    pos = _skip(data, pos, wire)
        except (IndexError, ValueError, UnicodeDecodeError) as e:
            raise GRPCError(GrpcStatus.INTERNAL, f"grpc: failed to unmarshal the received message: {e}") from None
        return api.ReadContentRequest(**fields)


class FastReadContentResponse(api.ReadContentResponse):
    """ReadContentResponse encoded in one join (offset, then the data bytes as is)."""

    def SerializeToString(self) -> bytes:
        data = self.data
        head = bytearray()
        if self.offset:
            head.append(0x08)
            _put_varint(head, self.offset & 0xFFFFFFFFFFFFFFFF)
        if data:
            head.append(0x12)
            _put_varint(head, len(data))
        return b"".join((head, data)) if data else bytes(head)

    __bytes__ = SerializeToString


def _put_varint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


class ContentGRPC(api.ContentBase):
    def __init__(self, service: ContentService):
        self.service = service

    def __mapping__(self) -> dict[str, Handler]:
        """The generated table, with Write decoding and Read encoding swapped for fast ones."""
        mapping = super().__mapping__()
        for path, request, reply in (
                ("/containerd.services.content.v1.Content/Write", FastWriteContentRequest, None),
                ("/containerd.services.content.v1.Content/Read", FastReadContentRequest,
                 FastReadContentResponse)):
            h = mapping[path]
            mapping[path] = Handler(h.func, h.cardinality, request or h.request_type, reply or h.reply_type)
        return mapping

    async def info(self, request: api.InfoRequest) -> api.InfoResponse:
        if digest_error(request.digest):
            raise errdefs.InvalidArgument(f"{go_quote(request.digest)} failed validation")
        return api.InfoResponse(info=_info_pb(self.service.info(request.digest)))

    async def update(self, request: api.UpdateRequest) -> api.UpdateResponse:
        pb = request.info or api.Info()
        if digest_error(pb.digest):
            raise errdefs.InvalidArgument(f"{go_quote(pb.digest)} failed validation")
        paths = list(request.update_mask.paths) if request.update_mask else []
        info = Info(pb.digest, pb.size, labels=dict(pb.labels))
        return api.UpdateResponse(info=_info_pb(await self.service.update(info, paths)))

    async def list(self, request: api.ListContentRequest) -> AsyncIterator[api.ListContentResponse]:
        infos = self.service.list(list(request.filters))
        for start in range(0, len(infos), LIST_BATCH):
            yield api.ListContentResponse(info=[_info_pb(i, updated=False)
                                                for i in infos[start:start + LIST_BATCH]])

    async def delete(self, request: api.DeleteContentRequest) -> Empty:
        err = digest_error(request.digest)
        if err:
            raise errdefs.InvalidArgument(err)
        await self.service.delete(request.digest)
        return Empty()

    async def read(self, request: api.ReadContentRequest) -> AsyncIterator[api.ReadContentResponse]:
        err = digest_error(request.digest)
        if err:
            raise errdefs.InvalidArgument(f"{request.digest}: {err}")
        with await self.service.reader(request.digest) as ra:  # NotFound as Info would say
            offset, size, length = max(request.offset, 0), request.size, ra.size
            if offset > length:
                raise OutOfRange(f"read past object length {length} bytes")
            if size <= 0 or offset + size > length:
                size = length - offset
            async for data in ra.chunks(offset, size, CHUNK):
                yield FastReadContentResponse(offset=offset, data=data)
                offset += len(data)

    async def status(self, request: api.StatusRequest) -> api.StatusResponse:
        try:
            st = await self.service.status(request.ref)
        except errdefs.ContainerdError as e:
            raise type(e)(f"could not get status for ref {go_quote(request.ref)}: {e}") from None
        return api.StatusResponse(status=_status_pb(st))

    async def list_statuses(self, request: api.ListStatusesRequest) -> api.ListStatusesResponse:
        statuses = await self.service.list_statuses(list(request.filters))
        return api.ListStatusesResponse(statuses=[_status_pb(s) for s in statuses])

    async def abort(self, request: api.AbortRequest) -> Empty:
        await self.service.abort(request.ref)
        return Empty()

    async def write(self, requests: AsyncIterator[api.WriteContentRequest]) -> AsyncIterator[api.WriteContentResponse]:
        """containerd's Write loop: the first message names the ref (and may announce total and
        expected); each message is answered with the writer's offset (and digest), STAT adds the
        times and total; COMMIT ends the stream. A closed request stream keeps the ingest for a
        later resume. As containerd, the last answer is sent once more when the stream ends
        without error."""
        service = self.service
        req = await requests.__anext__()
        ref = req.ref
        if not ref:
            raise errdefs.InvalidArgument("first message must have a reference")
        total, expected = req.total, req.expected
        wr = await service.writer(ref, total, expected)
        msg = api.WriteContentResponse()
        try:
            while True:
                msg.action = req.action
                ws = wr.status()
                msg.offset = ws.offset
                if req.expected:
                    expected = req.expected
                    if service.store.has(request_namespace(), req.expected):
                        await wr.close()
                        try:
                            await service.abort(ref)
                        except errdefs.ContainerdError as e:
                            log.error("failed to abort write", ref=ref, error=str(e))
                        raise errdefs.AlreadyExists(f"blob with expected digest {req.expected} exists")
                if req.total > 0:
                    total = req.total
                action = req.action
                if action == api.WriteAction.STAT:
                    msg.digest = wr.digest()
                    msg.started_at = ws.started_at
                    msg.updated_at = ws.updated_at
                    msg.total = total
                elif action in (api.WriteAction.WRITE, api.WriteAction.COMMIT):
                    if req.offset > 0 and req.offset != ws.offset:
                        raise OutOfRange(f"write @{req.offset} must occur at current offset {ws.offset}")
                    if req.offset == 0 and ws.offset > 0:
                        await wr.truncate(0)
                        msg.offset = 0
                    if req.data:
                        n = await wr.write(req.data)
                        if n != len(req.data):
                            raise GRPCError(GrpcStatus.DATA_LOSS, f"wrote {n} of {len(req.data)} bytes")
                        msg.offset += n
                    if action == api.WriteAction.COMMIT:
                        await wr.commit(total, expected, dict(req.labels) if req.labels else None)
                    msg.digest = wr.digest()
                yield msg
                if action == api.WriteAction.COMMIT:
                    break
                try:
                    req = await requests.__anext__()
                except StopAsyncIteration:
                    break
            yield msg
        finally:
            await wr.close()
