"""The daemon services a transfer drives (content, images, leases, snapshots, diff), called straight
through the generated stubs with the namespace *and* the transfer's lease on every request.

A transfer runs under a lease (the `containerd-lease` header), as ctr does: what it writes is
held by the lease until images and gc.ref labels hold it, and when the transfer fails the lease
goes away and the collector takes the rest. `Services` is that view: one Client connection, one
namespace, at most one lease. Content writes stream through `ContentWriter`, which pipelines
its chunks (it does not wait for each reply before sending the next).

Owns only this plumbing; the transfer logic lives in the sibling modules.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import struct
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, AsyncIterator, Iterable, Mapping, Optional

from betterproto.lib.google.protobuf import FieldMask
from grpclib.client import Channel, Handler
from grpclib.const import Cardinality
from grpclib.protocol import Connection as GrpclibConnection
from grpclib.protocol import H2Protocol
from grpclib.protocol import Stream as GrpclibStream
from h2.connection import ConnectionInputs
from h2.stream import StreamInputs
from grpclib.exceptions import StreamTerminatedError

from pycontainerd.api.gen.containerd.services.content import v1 as content_api
from pycontainerd.api.gen.containerd.services.diff import v1 as diff_api
from pycontainerd.api.gen.containerd.services.images import v1 as images_api
from pycontainerd.api.gen.containerd.services.leases import v1 as leases_api
from pycontainerd.api.gen.containerd.services.snapshots import v1 as snapshots_api
from pycontainerd.api.gen.containerd import types as gen_types
from pycontainerd.core import errdefs
from pycontainerd.core.context import LEASE_HEADER, NAMESPACE_HEADER

from .._base import parse_address, translate_errors
from . import _wire
from .mediatypes import Descriptor

# Chunk size of content writes and reads (what ctr's io.Copy buffer uses: 1 MiB).
CHUNK = 1 << 20
# Writes in flight on one Write stream before the writer waits for replies.
WRITE_WINDOW = 8

# How long a writer waits for another writer of the same ref (a concurrent pull) to finish.
LOCK_WAIT = 1800.0
_WRITE_PATH = "/containerd.services.content.v1.Content/Write"
_READ_PATH = "/containerd.services.content.v1.Content/Read"


def random_lease_id() -> str:
    """An id shaped like the Go client's WithRandomID: "<nanoseconds>-<4 base64 chars>"."""
    return f"{time.time_ns() % 1_000_000_000}-{base64.urlsafe_b64encode(os.urandom(3)).decode()}"


@dataclass
class ContentInfo:
    digest: str
    size: int
    labels: dict[str, str] = field(default_factory=dict)
    created_at: Optional[datetime] = None
    updated_at: Optional[datetime] = None


@dataclass
class ImageRecord:
    name: str
    target: Descriptor
    labels: dict[str, str] = field(default_factory=dict)
    created_at: Optional[datetime] = None
    updated_at: Optional[datetime] = None

    @classmethod
    def from_proto(cls, img: Any) -> "ImageRecord":
        return cls(name=img.name, target=Descriptor.from_proto(img.target), labels=dict(img.labels),
                   created_at=img.created_at, updated_at=img.updated_at)


class _CoalescingTransport:
    """A transport wrapper that gathers everything written in one loop iteration into one
    write. grpclib writes each 16 KiB HTTP/2 DATA frame separately (a syscall and a wake-up of
    the daemon per frame); gathered, a 1 MiB content chunk goes out in a few large writes."""

    def __init__(self, transport: Any):
        self._transport = transport
        self._buf: list[bytes] = []
        self._scheduled = False
        self._loop = asyncio.get_event_loop()

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._buf.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._buf:
            data = b"".join(self._buf) if len(self._buf) > 1 else self._buf[0]
            self._buf.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _BulkStream(GrpclibStream):
    """A grpclib stream whose large messages are framed in one go: for each flow-control window
    it runs h2's state checks and window accounting once and writes the DATA frames (at most the
    peer's max frame size each) straight into h2's output buffer, instead of one h2 call per
    16 KiB frame. Small messages and the stream's end go through grpclib as usual."""

    async def send_data(self, data: bytes, end_stream: bool = False) -> None:
        if end_stream or len(data) < _BULK_MIN:
            return await super().send_data(data, end_stream)
        h2 = self._h2_connection
        view = memoryview(data)
        pos, total = 0, len(data)
        sid = struct.pack(">I", self.id & 0x7FFFFFFF)
        while pos < total:
            await self.connection.write_ready.wait()
            window = h2.local_flow_control_window(self.id)
            if window <= 0:
                self.window_updated.clear()
                await self.window_updated.wait()
                continue
            size = min(window, total - pos)
            frame_max = h2.max_outbound_frame_size
            stream = h2.streams[self.id]
            h2.state_machine.process_input(ConnectionInputs.SEND_DATA)
            stream.state_machine.process_input(StreamInputs.SEND_DATA)
            out = h2._data_to_send
            end = pos + size
            while pos < end:
                n = min(frame_max, end - pos)
                out += struct.pack(">I", n)[1:] + b"\x00\x00" + sid
                out += view[pos:pos + n]
                pos += n
            stream.outbound_flow_control_window -= size
            h2.outbound_flow_control_window -= size
            self._transport.write(h2.data_to_send())
            self.data_sent += size
            self.connection.data_sent += size
            self.connection.data_send_process()


_BULK_MIN = int(os.environ.get("PYCTR_BULK_MIN", 64 * 1024))


class _BulkConnection(GrpclibConnection):
    def create_stream(self, *, stream_id: Optional[int] = None, wrapper: Any = None) -> GrpclibStream:
        return _BulkStream(self, self._connection, self._transport, stream_id=stream_id, wrapper=wrapper)


class _TransferProtocol(H2Protocol):
    def connection_made(self, transport: Any) -> None:
        super().connection_made(_CoalescingTransport(transport))
        if _bulk_framing_supported(self.connection):
            self.connection.__class__ = _BulkConnection


def _bulk_framing_supported(conn: Any) -> bool:
    """The h2 internals _BulkStream relies on are there (else grpclib's path is used)."""
    h2 = getattr(conn, "_connection", None)
    return (isinstance(getattr(h2, "_data_to_send", None), bytearray)
            and hasattr(h2, "outbound_flow_control_window") and hasattr(h2, "state_machine"))


class _TransferChannel(Channel):
    """A grpclib Channel of the transfer's own, with write coalescing (bulk content moves
    through it; ordinary clients keep grpclib's behaviour)."""

    def _protocol_factory(self) -> H2Protocol:
        return _TransferProtocol(Handler(), self._config, self._h2_config)


class _ChannelHolder:
    def __init__(self, address: str):
        self.address = address
        self.channel: Optional[Channel] = None

    async def get(self) -> Channel:
        if self.channel is None:
            self.channel = _TransferChannel(**parse_address(self.address))
        return self.channel

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None


class Services:
    """The services of one daemon in one namespace, under an optional lease. Close it (or use
    `async with`) to close its connection; copies made by `with_lease`/`leased` share it."""

    def __init__(self, client: Any, lease: Optional[str] = None, namespace: Optional[str] = None,
                 *, _holder: Optional[_ChannelHolder] = None):
        self.client = client
        self.namespace = namespace or client.namespace
        self.lease = lease
        self._holder = _holder or _ChannelHolder(client.address)

    def with_lease(self, lease: Optional[str]) -> "Services":
        return Services(self.client, lease, self.namespace, _holder=self._holder)

    async def close(self) -> None:
        self._holder.close()

    async def __aenter__(self) -> "Services":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @property
    def address(self) -> str:
        return self.client.address

    def metadata(self) -> dict[str, str]:
        md = {NAMESPACE_HEADER: self.namespace}
        if self.lease:
            md[LEASE_HEADER] = self.lease
        return md

    async def channel(self) -> Channel:
        return await self._holder.get()

    async def _stub(self, cls: Any) -> Any:
        return cls(await self.channel(), metadata=self.metadata(), timeout=self.client.timeout)

    async def _call(self, cls: Any, method: str, request: Any) -> Any:
        with translate_errors(self.address):
            stub = await self._stub(cls)
            return await getattr(stub, method)(request)

    # -- leases ----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def leased(self, expire_hours: float = 24.0, sync_on_error: bool = True):
        """A Services under a new lease (24h expiry, as ctr's), deleted on the way out; when the
        block fails the deletion is synchronous so what the transfer wrote is collected now."""
        if self.lease:
            yield self
            return
        lease_id = random_lease_id()
        expires = datetime.utcfromtimestamp(time.time() + expire_hours * 3600)
        labels = {"containerd.io/gc.expire": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}
        await self._call(leases_api.LeasesStub, "create",
                         leases_api.CreateRequest(id=lease_id, labels=labels))
        leased = self.with_lease(lease_id)
        ok = False
        try:
            yield leased
            ok = True
        finally:
            with contextlib.suppress(errdefs.ContainerdError):
                await asyncio.shield(self._call(
                    leases_api.LeasesStub, "delete",
                    leases_api.DeleteRequest(id=lease_id, sync=not ok and sync_on_error)))

    # -- content ---------------------------------------------------------------------------------

    async def info(self, digest: str) -> ContentInfo:
        resp = await self._call(content_api.ContentStub, "info", content_api.InfoRequest(digest=digest))
        i = resp.info
        return ContentInfo(i.digest, i.size, dict(i.labels), i.created_at, i.updated_at)

    async def exists(self, digest: str) -> Optional[ContentInfo]:
        try:
            return await self.info(digest)
        except errdefs.NotFound:
            return None

    async def update_labels(self, digest: str, labels: Mapping[str, str]) -> None:
        """Set (or, with an empty value, clear) only the given labels of blob `digest`."""
        if not labels:
            return
        req = content_api.UpdateRequest(
            info=content_api.Info(digest=digest, labels={k: v for k, v in labels.items() if v}),
            update_mask=FieldMask(paths=[f"labels.{k}" for k in labels]))
        await self._call(content_api.ContentStub, "update", req)

    async def list_content(self, filters: Iterable[str] = ()) -> list[ContentInfo]:
        out = []
        with translate_errors(self.address):
            stub = await self._stub(content_api.ContentStub)
            async for resp in stub.list(content_api.ListContentRequest(filters=list(filters))):
                out += [ContentInfo(i.digest, i.size, dict(i.labels), i.created_at, i.updated_at)
                        for i in resp.info]
        return out

    async def list_statuses(self, filters: Iterable[str] = ()) -> list[Any]:
        resp = await self._call(content_api.ContentStub, "list_statuses",
                                content_api.ListStatusesRequest(filters=list(filters)))
        return list(resp.statuses)

    async def abort(self, ref: str) -> None:
        """Drop the ingest `ref` (best effort: an error is not worth more than the one at hand)."""
        with contextlib.suppress(errdefs.ContainerdError):
            await self._call(content_api.ContentStub, "abort", content_api.AbortRequest(ref=ref))

    async def read_chunks(self, digest: str, offset: int = 0, size: int = 0) -> AsyncIterator[bytes]:
        """The bytes of blob `digest` as the daemon streams them."""
        with translate_errors(self.address):
            channel = await self.channel()
            async with channel.request(_READ_PATH, Cardinality.UNARY_STREAM,
                                       content_api.ReadContentRequest, _wire.ReadResponse,
                                       metadata=self.metadata()) as stream:
                await stream.send_message(
                    content_api.ReadContentRequest(digest=digest, offset=offset, size=size), end=True)
                async for msg in stream:
                    if msg.data:
                        yield msg.data

    async def read_all(self, digest: str, limit: Optional[int] = None) -> bytes:
        parts = []
        total = 0
        async for chunk in self.read_chunks(digest):
            total += len(chunk)
            if limit is not None and total > limit:
                raise errdefs.InvalidArgument(f"blob {digest} is larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def writer(self, ref: str, total: int = 0, expected: str = "") -> "ContentWriter":
        return ContentWriter(self, ref, total, expected)

    async def write_blob(self, ref: str, data: bytes, expected: str,
                         labels: Optional[Mapping[str, str]] = None) -> bool:
        """Write a small blob in one go; False when it was already there."""
        async with self.writer(ref, len(data), expected) as w:
            if w.exists:
                return False
            if w.offset:
                data = data[w.offset:]
            await w.write(data)
            await w.commit(labels=labels)
        return True

    # -- images ----------------------------------------------------------------------------------

    async def image_get(self, name: str) -> ImageRecord:
        resp = await self._call(images_api.ImagesStub, "get", images_api.GetImageRequest(name=name))
        return ImageRecord.from_proto(resp.image)

    async def image_list(self, filters: Iterable[str] = ()) -> list[ImageRecord]:
        resp = await self._call(images_api.ImagesStub, "list", images_api.ListImagesRequest(filters=list(filters)))
        return [ImageRecord.from_proto(i) for i in resp.images]

    async def image_put(self, name: str, target: Descriptor, labels: Optional[Mapping[str, str]] = None,
                        *, update_fields: Optional[list[str]] = None) -> ImageRecord:
        """Create image `name`, or point the existing one at `target` (ctr import: Update of
        "target" first, Create when not found; pull: Create first, Update when it exists)."""
        img = images_api.Image(name=name, target=target.to_proto(), labels=dict(labels or {}))
        if update_fields is not None:
            try:
                req = images_api.UpdateImageRequest(image=img, update_mask=FieldMask(paths=update_fields))
                return ImageRecord.from_proto((await self._call(images_api.ImagesStub, "update", req)).image)
            except errdefs.NotFound:
                pass
        for _ in range(3):
            try:
                resp = await self._call(images_api.ImagesStub, "create", images_api.CreateImageRequest(image=img))
                return ImageRecord.from_proto(resp.image)
            except errdefs.AlreadyExists:
                pass
            try:
                req = images_api.UpdateImageRequest(image=img)
                return ImageRecord.from_proto((await self._call(images_api.ImagesStub, "update", req)).image)
            except errdefs.NotFound:
                continue
        raise errdefs.Aborted(f"image {name} kept changing while it was being recorded")

    # -- snapshots and diff ------------------------------------------------------------------------

    async def snapshot_stat(self, snapshotter: str, key: str) -> Any:
        resp = await self._call(snapshots_api.SnapshotsStub, "stat",
                                snapshots_api.StatSnapshotRequest(snapshotter=snapshotter, key=key))
        return resp.info

    async def snapshot_prepare(self, snapshotter: str, key: str, parent: str,
                               labels: Mapping[str, str]) -> list[Any]:
        resp = await self._call(snapshots_api.SnapshotsStub, "prepare", snapshots_api.PrepareSnapshotRequest(
            snapshotter=snapshotter, key=key, parent=parent, labels=dict(labels)))
        return list(resp.mounts)

    async def snapshot_commit(self, snapshotter: str, name: str, key: str, labels: Mapping[str, str]) -> None:
        await self._call(snapshots_api.SnapshotsStub, "commit", snapshots_api.CommitSnapshotRequest(
            snapshotter=snapshotter, name=name, key=key, labels=dict(labels)))

    async def snapshot_remove(self, snapshotter: str, key: str) -> None:
        await self._call(snapshots_api.SnapshotsStub, "remove",
                         snapshots_api.RemoveSnapshotRequest(snapshotter=snapshotter, key=key))

    async def diff_apply(self, desc: Descriptor, mounts: list[Any]) -> Descriptor:
        resp = await self._call(diff_api.DiffStub, "apply",
                                diff_api.ApplyRequest(diff=desc.to_proto(), mounts=mounts))
        return Descriptor.from_proto(resp.applied)


@contextlib.contextmanager
def _stream_errors(address: str, stream: Any):
    """translate_errors, plus: a stream the server reset right after sending its status (grpc-go
    does that when it ends a call the client has not half-closed) raises that status."""
    with translate_errors(address):
        try:
            yield
        except StreamTerminatedError:
            if stream is not None:
                stream._maybe_raise()  # the status in the trailers, when there is one
            raise


class ContentWriter:
    """One Content.Write stream: Stat on open (offset > 0 means a resumable partial ingest,
    `exists` that the blob is already committed), pipelined Write chunks, Commit.

        async with services.writer(ref, size, digest) as w:
            if not w.exists:
                await w.write(data) ...
                await w.commit(labels=...)
    """

    def __init__(self, services: Services, ref: str, total: int, expected: str):
        self.services = services
        self.ref = ref
        self.total = total
        self.expected = expected
        self.offset = 0
        self.exists = False
        self.digest = ""
        self._stream = None
        self._cm = None
        self._pending = 0
        self._sent_offset = 0
        self._ended = False

    async def __aenter__(self) -> "ContentWriter":
        # Another writer holding the ref (a concurrent pull or import of the same blob) answers
        # Unavailable "locked": wait for it with a growing random backoff, as containerd's
        # content.OpenWriter does; once it committed, our open finds the blob and reports exists.
        backoff = 0.016
        give_up = time.monotonic() + LOCK_WAIT
        while True:
            try:
                return await self._open()
            except errdefs.Unavailable as err:
                if "locked" not in str(err) or time.monotonic() > give_up:
                    raise
            await asyncio.sleep(random.uniform(0, backoff))
            backoff = min(backoff * 2, 2.048)

    async def _open(self) -> "ContentWriter":
        try:
            with _stream_errors(self.services.address, self._stream):
                channel = await self.services.channel()
                self._cm = channel.request(_WRITE_PATH, Cardinality.STREAM_STREAM,
                                           _wire.WriteRequest, _wire.WriteResponse,
                                           metadata=self.services.metadata())
                self._stream = await self._cm.__aenter__()
            with _stream_errors(self.services.address, self._stream):
                await self._stream.send_request()
                await self._stream.send_message(_wire.WriteRequest(
                    action=_wire.WRITE_STAT, ref=self.ref, total=self.total,
                    expected=self.expected))
                resp = await self._stream.recv_message()
        except errdefs.AlreadyExists:
            await self._abandon()
            self.exists = True
            return self
        except BaseException:
            await self._abandon()
            raise
        if resp is None:
            raise errdefs.Unavailable(f"content writer for {self.ref}: stream closed")
        self.offset = self._sent_offset = resp.offset
        if self.total and resp.offset > self.total:
            self.offset = self._sent_offset = 0
        return self

    async def _abandon(self) -> None:
        cm, self._cm = self._cm, None
        if cm is None:
            return
        with contextlib.suppress(Exception):
            await self._stream.cancel()
        with contextlib.suppress(Exception):
            await cm.__aexit__(None, None, None)

    async def __aexit__(self, et, ev, tb) -> None:
        if self._cm is None:
            return
        if et is not None or not self._ended:
            await self._abandon()
            return
        cm, self._cm = self._cm, None
        with translate_errors(self.services.address):
            await cm.__aexit__(None, None, None)

    async def _recv(self) -> Any:
        with _stream_errors(self.services.address, self._stream):
            resp = await self._stream.recv_message()
            if resp is None:
                # the server ended the call: its status (an error, when it has one) is in the trailers
                await self._stream.recv_trailing_metadata()
        if resp is None:
            raise errdefs.Unavailable(f"content writer for {self.ref}: stream closed early")
        self._pending -= 1
        self.offset = resp.offset
        if resp.digest:
            self.digest = resp.digest
        return resp

    async def write(self, data: bytes) -> None:
        """Send `data` at the current offset, in CHUNK pieces, without waiting for each reply."""
        view = memoryview(data)
        for start in range(0, len(view), CHUNK):
            piece = data if len(data) <= CHUNK else bytes(view[start:start + CHUNK])
            with _stream_errors(self.services.address, self._stream):
                await self._stream.send_message(_wire.WriteRequest(
                    action=_wire.WRITE_WRITE, offset=self._sent_offset, data=piece))
            self._sent_offset += len(piece)
            self._pending += 1
            while self._pending >= WRITE_WINDOW:
                await self._recv()

    async def drain(self) -> None:
        while self._pending > 0:
            await self._recv()
        if self.offset != self._sent_offset:
            raise errdefs.Unknown(f"short write to {self.ref}: {self.offset} != {self._sent_offset}")

    async def commit(self, size: int = 0, expected: str = "",
                     labels: Optional[Mapping[str, str]] = None) -> str:
        await self.drain()
        size = size or self.total
        expected = expected or self.expected
        with _stream_errors(self.services.address, self._stream):
            await self._stream.send_message(_wire.WriteRequest(
                action=_wire.WRITE_COMMIT, total=size, offset=self._sent_offset,
                expected=expected, labels=dict(labels or {})), end=True)
            self._ended = True
            self._pending += 1
        try:
            resp = await self._recv()
        except errdefs.AlreadyExists:
            self._ended = False
            return expected
        if size and resp.offset != size:
            raise errdefs.FailedPrecondition(f"unexpected size: {resp.offset} != {size}")
        if expected and resp.digest and resp.digest != expected:
            raise errdefs.FailedPrecondition(f"unexpected digest: {resp.digest} != {expected}")
        return resp.digest or expected


def mount_to_proto(m: Any) -> Any:
    return gen_types.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))
