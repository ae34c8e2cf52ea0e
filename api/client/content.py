"""`client.content`: the content store of the client's namespace: blobs by digest (list, info,
read, label, delete) and ingests (write streams, status, abort).

    async with Client(address) as client:
        dgst = await client.content.write_blob("my-ref", b"hello\\n")
        data = await client.content.read_all(dgst)
        await client.content.update(dgst, {"team": "a"})      # labels.team=a
        async with client.content.writer("big", total=size, expected=dgst) as w:
            ...  # w.offset, await w.write(chunk), await w.commit(size, dgst)

`write_blob` follows containerd's content.WriteBlob: a digest the namespace already has is not
sent again (the call returns at once), an interrupted ingest with the same ref is resumed from
its offset when the data can seek (bytes, seekable files), and otherwise started over.
Failures are core.errdefs errors.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, AsyncIterable, AsyncIterator, BinaryIO, Iterable, Mapping, Optional, Union

from betterproto.lib.google.protobuf import FieldMask
from grpclib.const import Cardinality
from grpclib.exceptions import StreamTerminatedError

from pycontainerd.api.gen.containerd.services.content import v1 as api
from pycontainerd.core import errdefs
from pycontainerd.core.context import LEASE_HEADER, NAMESPACE_HEADER

from ._base import DEFAULT, ServiceAPI, translate_errors
from .types import rfc3339

CHUNK = 1 << 20
"""Bytes per Write message, as containerd's clients send."""

WRITE_METHOD = "/containerd.services.content.v1.Content/Write"

_DIGEST_FORM = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
_DIGEST_SIZES = {"sha256": 64, "sha384": 96, "sha512": 128}


def validate_digest(value: str) -> str:
    """`value` when it is a valid digest, else InvalidArgument with go-digest's text
    ("invalid checksum digest format", "... length", "unsupported digest algorithm")."""
    algorithm, sep, encoded = value.partition(":")
    if not sep or not algorithm or not encoded:
        raise errdefs.InvalidArgument("invalid checksum digest format")
    size = _DIGEST_SIZES.get(algorithm)
    if size is None:
        raise errdefs.InvalidArgument("unsupported digest algorithm" if _DIGEST_FORM.match(value)
                                      else "invalid checksum digest format")
    if len(encoded) != size:
        raise errdefs.InvalidArgument("invalid checksum digest length")
    if not re.fullmatch(r"[a-f0-9]+", encoded):
        raise errdefs.InvalidArgument("invalid checksum digest format")
    return value


Data = Union[bytes, bytearray, memoryview, BinaryIO, AsyncIterable[bytes], Iterable[bytes]]


_EPOCH_YEAR = 1970


def _ts(value: Optional[datetime]) -> Optional[datetime]:
    """An unset timestamp (betterproto decodes it as the epoch) is None."""
    if value is None or (value.year == _EPOCH_YEAR and value.timestamp() == 0):
        return None
    return value


@dataclass(frozen=True)
class ContentInfo:
    digest: str
    size: int
    created_at: Optional[datetime] = None
    updated_at: Optional[datetime] = None
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, msg: Any) -> "ContentInfo":
        return cls(digest=msg.digest, size=msg.size, created_at=_ts(msg.created_at),
                   updated_at=_ts(msg.updated_at), labels=dict(sorted((msg.labels or {}).items())))

    def to_dict(self) -> dict:
        return {"digest": self.digest, "size": self.size, "created_at": rfc3339(self.created_at),
                "updated_at": rfc3339(self.updated_at), "labels": dict(self.labels)}


@dataclass(frozen=True)
class ContentStatus:
    """Progress of an ingest."""

    ref: str
    offset: int = 0
    total: int = 0
    expected: str = ""
    started_at: Optional[datetime] = None
    updated_at: Optional[datetime] = None

    @classmethod
    def from_proto(cls, msg: Any) -> "ContentStatus":
        return cls(ref=msg.ref, offset=msg.offset, total=msg.total, expected=msg.expected,
                   started_at=_ts(msg.started_at), updated_at=_ts(msg.updated_at))

    def to_dict(self) -> dict:
        return {"ref": self.ref, "offset": self.offset, "total": self.total, "expected": self.expected,
                "started_at": rfc3339(self.started_at), "updated_at": rfc3339(self.updated_at)}


class ContentWriter:
    """One Write stream (containerd's remote writer): every call is a request and its answer.

    `offset` is where the next write goes; `digest` the server's digest of what it has."""

    def __init__(self, stream: Any, ref: str, address: str):
        self._stream = stream
        self.ref = ref
        self._address = address
        self.offset = 0
        self.total = 0
        self.digest = ""
        self.started_at: Optional[datetime] = None
        self.updated_at: Optional[datetime] = None
        self.committed = False

    async def _send(self, req: api.WriteContentRequest) -> api.WriteContentResponse:
        with translate_errors(self._address):
            try:
                await self._stream.send_message(req)
                resp = await self._stream.recv_message()
            except StreamTerminatedError:
                # The server answered with an error status and reset the stream: report that.
                self._stream._maybe_raise()
                raise
        if resp is None:
            raise errdefs.Unavailable("write stream ended without an answer")
        if resp.digest:
            self.digest = resp.digest
        return resp

    async def _negotiate(self, total: int, expected: str) -> None:
        resp = await self._send(api.WriteContentRequest(action=api.WriteAction.STAT, ref=self.ref,
                                                        total=total, expected=expected))
        self.offset = resp.offset
        self.total = resp.total
        self.started_at, self.updated_at = resp.started_at, resp.updated_at

    async def status(self) -> ContentStatus:
        resp = await self._send(api.WriteContentRequest(action=api.WriteAction.STAT))
        self.total, self.started_at, self.updated_at = resp.total, resp.started_at, resp.updated_at
        return ContentStatus(ref=self.ref, offset=resp.offset, total=resp.total,
                             started_at=resp.started_at, updated_at=resp.updated_at)

    async def write(self, data: bytes) -> int:
        """Send `data` at the current offset; the bytes the server took."""
        resp = await self._send(api.WriteContentRequest(action=api.WriteAction.WRITE, offset=self.offset,
                                                        data=bytes(data)))
        n = resp.offset - self.offset
        self.offset = resp.offset
        if n < len(data):
            raise errdefs.Unknown(f"short write: {n} of {len(data)} bytes")
        return n

    def truncate(self, size: int = 0) -> None:
        """Start over: the next write (at offset 0) makes the server drop what it has."""
        if size != 0:
            raise errdefs.InvalidArgument("only truncating to 0 is supported")
        self.offset = 0

    async def commit(self, size: int = 0, expected: str = "",
                     labels: Optional[Mapping[str, str]] = None) -> str:
        """Commit what was written (checked against `size` and `expected` when given); the digest."""
        resp = await self._send(api.WriteContentRequest(
            action=api.WriteAction.COMMIT, total=size, offset=self.offset, expected=expected,
            labels=dict(labels or {})))
        self.committed = True
        if size and resp.offset != size:
            raise errdefs.FailedPrecondition(f"unexpected size: {resp.offset} != {size}")
        if expected and resp.digest != expected:
            raise errdefs.FailedPrecondition(f"unexpected digest: {resp.digest} != {expected}")
        self.offset, self.digest = resp.offset, resp.digest
        return resp.digest

    async def close(self) -> None:
        """End the stream; an uncommitted ingest stays on the server for a later resume."""
        with contextlib.suppress(Exception):
            await self._stream.end()
        with contextlib.suppress(Exception):
            while await self._stream.recv_message() is not None:
                pass
        with contextlib.suppress(Exception):
            await self._stream.__aexit__(None, None, None)


async def _chunks(data: Data, skip: int) -> AsyncIterator[bytes]:
    """`data` from byte `skip` in CHUNK pieces (bytes, binary files, iterables of bytes)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        for start in range(skip, len(view), CHUNK):
            yield bytes(view[start:start + CHUNK])
        return
    if hasattr(data, "read"):
        if skip:
            data.seek(skip)
        while True:
            chunk = data.read(CHUNK)
            if not chunk:
                return
            yield chunk
    buf = bytearray()
    source = data.__aiter__() if hasattr(data, "__aiter__") else None
    iterator = None if source is not None else iter(data)  # type: ignore[arg-type]
    while True:
        try:
            part = await source.__anext__() if source is not None else next(iterator)  # type: ignore[union-attr]
        except (StopAsyncIteration, StopIteration):
            break
        buf += part
        while len(buf) >= CHUNK:
            yield bytes(buf[:CHUNK])
            del buf[:CHUNK]
    if buf:
        yield bytes(buf)


def _seekable(data: Data) -> bool:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return True
    if hasattr(data, "seekable"):
        try:
            return bool(data.seekable())
        except (OSError, ValueError):
            return False
    return False


class ContentAPI(ServiceAPI):
    stub_class = api.ContentStub

    async def info(self, digest: str, *, timeout: Any = DEFAULT) -> ContentInfo:
        """A blob's size, times and labels (NotFound: 'content digest ...: not found')."""
        resp = await self._unary("info", api.InfoRequest(digest=digest), timeout=timeout)
        return ContentInfo.from_proto(resp.info)

    async def walk(self, filters: Iterable[str] = (), *, timeout: Any = None) -> AsyncIterator[ContentInfo]:
        """The namespace's blobs as they stream in; filters like 'labels.k==v', 'digest==...'."""
        async for resp in self._stream("list", api.ListContentRequest(filters=list(filters)), timeout=timeout):
            for info in resp.info:
                yield ContentInfo.from_proto(info)

    async def list(self, filters: Iterable[str] = (), *, timeout: Any = None) -> list[ContentInfo]:
        return [info async for info in self.walk(filters, timeout=timeout)]

    async def update(self, digest: str, labels: Mapping[str, str], *, replace: bool = False,
                     timeout: Any = DEFAULT) -> ContentInfo:
        """Set the given labels (an empty value removes one); replace=True makes the labels
        exactly `labels`."""
        labels = dict(labels)
        mask = None if replace else FieldMask(paths=[f"labels.{k}" for k in labels])
        if not replace and not labels:
            return await self.info(digest, timeout=timeout)
        req = api.UpdateRequest(info=api.Info(digest=digest, labels={k: v for k, v in labels.items() if v}),
                                update_mask=mask)
        resp = await self._unary("update", req, timeout=timeout)
        return ContentInfo.from_proto(resp.info)

    async def delete(self, digest: str, *, timeout: Any = DEFAULT) -> None:
        await self._unary("delete", api.DeleteContentRequest(digest=digest), timeout=timeout)

    async def read(self, digest: str, offset: int = 0, size: int = 0, *,
                   timeout: Any = None) -> AsyncIterator[bytes]:
        """A blob's bytes from `offset` (`size` of them; 0: to the end), in the server's chunks."""
        req = api.ReadContentRequest(digest=digest, offset=offset, size=size)
        async for resp in self._stream("read", req, timeout=timeout):
            yield resp.data

    async def read_all(self, digest: str, offset: int = 0, size: int = 0, *, timeout: Any = None) -> bytes:
        return b"".join([chunk async for chunk in self.read(digest, offset, size, timeout=timeout)])

    async def status(self, ref: str, *, timeout: Any = DEFAULT) -> ContentStatus:
        resp = await self._unary("status", api.StatusRequest(ref=ref), timeout=timeout)
        return ContentStatus.from_proto(resp.status)

    async def list_statuses(self, filters: Iterable[str] = (), *, timeout: Any = DEFAULT) -> list[ContentStatus]:
        """Active ingests; filters on `ref` ('ref==x', 'ref~=^layer-')."""
        resp = await self._unary("list_statuses", api.ListStatusesRequest(filters=list(filters)), timeout=timeout)
        return [ContentStatus.from_proto(s) for s in resp.statuses]

    async def abort(self, ref: str, *, timeout: Any = DEFAULT) -> None:
        await self._unary("abort", api.AbortRequest(ref=ref), timeout=timeout)

    # -- writing -------------------------------------------------------------------------------

    async def open_writer(self, ref: str, total: int = 0, expected: str = "", *,
                          lease: Optional[str] = None, timeout: Any = None) -> ContentWriter:
        """Open (or resume) the ingest `ref`; close the writer when done. AlreadyExists when
        the namespace already has `expected`."""
        client = self._client
        metadata = {NAMESPACE_HEADER: client.namespace}
        if lease:
            metadata[LEASE_HEADER] = lease
        with translate_errors(client.address):
            channel = await client._conn.channel()
            stream = channel.request(WRITE_METHOD, Cardinality.STREAM_STREAM, api.WriteContentRequest,
                                     api.WriteContentResponse, timeout=None if timeout is DEFAULT else timeout,
                                     metadata=metadata)
            await stream.__aenter__()
        writer = ContentWriter(stream, ref, client.address)
        try:
            await writer._negotiate(total, expected)
        except BaseException:
            await writer.close()
            raise
        return writer

    @contextlib.asynccontextmanager
    async def writer(self, ref: str, total: int = 0, expected: str = "", *,
                     lease: Optional[str] = None) -> AsyncIterator[ContentWriter]:
        """`async with client.content.writer(ref) as w:` a ContentWriter, closed afterwards."""
        w = await self.open_writer(ref, total, expected, lease=lease)
        try:
            yield w
        finally:
            await w.close()

    async def write_blob(self, ref: str, data: Data, total: int = 0, expected: str = "",
                         labels: Optional[Mapping[str, str]] = None, *,
                         lease: Optional[str] = None) -> str:
        """Ingest `data` (bytes, a binary file, or an iterable / async iterable of bytes) and
        commit it; the digest. `total` defaults to len(data) for bytes."""
        if isinstance(data, (bytes, bytearray, memoryview)) and not total:
            total = len(data)
        try:
            w = await self.open_writer(ref, total, expected, lease=lease)
        except errdefs.AlreadyExists:
            return expected
        try:
            if w.offset > 0 and not _seekable(data):
                w.truncate(0)
            async for chunk in _chunks(data, w.offset):
                await w.write(chunk)
            try:
                return await w.commit(total, expected, labels)
            except errdefs.AlreadyExists:
                return expected or w.digest
        finally:
            await w.close()

