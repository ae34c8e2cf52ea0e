"""The snapshots gRPC API (`containerd.services.snapshots.v1.Snapshots`) over anything that
picks a snapshotter by name: the daemon's SnapshotsService (`io.containerd.grpc.v1.snapshots`)
or, in the standalone server (serve.py), one backend whatever name the caller sends.

Thin: converts messages to the plain types of base.py and back; errors travel as errdefs.
Also holds the message <-> plain conversions the proxy backend and the client reuse.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import AsyncIterator, Callable

from betterproto.lib.google.protobuf import Empty

from pycontainerd.api.gen.containerd import types as pbtypes
from pycontainerd.api.gen.containerd.services.snapshots import v1 as api
from pycontainerd.core.mount import Mount

from .base import Info, Kind, Snapshotter

LIST_BATCH = 100
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)  # what betterproto reads for an unset Timestamp


def kind_to_pb(kind: Kind) -> api.Kind:
    if kind == Kind.ACTIVE:
        return api.Kind.ACTIVE
    if kind == Kind.VIEW:
        return api.Kind.VIEW
    return api.Kind.COMMITTED


def kind_from_pb(kind: int) -> Kind:
    if kind == api.Kind.ACTIVE:
        return Kind.ACTIVE
    if kind == api.Kind.VIEW:
        return Kind.VIEW
    return Kind.COMMITTED


def info_to_pb(info: Info) -> api.Info:
    msg = api.Info(name=info.name, parent=info.parent, kind=kind_to_pb(info.kind), labels=dict(info.labels or {}))
    if info.created is not None:
        msg.created_at = info.created
    if info.updated is not None:
        msg.updated_at = info.updated
    return msg


def info_from_pb(msg: api.Info | None) -> Info:
    if msg is None:
        return Info(name="")
    created = msg.created_at if msg.created_at and msg.created_at != _EPOCH else None
    updated = msg.updated_at if msg.updated_at and msg.updated_at != _EPOCH else None
    return Info(name=msg.name, parent=msg.parent, kind=kind_from_pb(msg.kind), labels=dict(msg.labels or {}),
                created=created, updated=updated)


def mounts_to_pb(mounts: list[Mount]) -> list[pbtypes.Mount]:
    return [pbtypes.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options)) for m in mounts]


def mounts_from_pb(mounts: list[pbtypes.Mount]) -> list[Mount]:
    return [Mount.from_any(m) for m in mounts]


class SnapshotsGRPC(api.SnapshotsBase):
    """`resolve(name)` returns the Snapshotter for a request's `snapshotter` field (or raises)."""

    def __init__(self, resolve: Callable[[str], Snapshotter]):
        self.resolve = resolve

    async def prepare(self, request: api.PrepareSnapshotRequest) -> api.PrepareSnapshotResponse:
        sn = self.resolve(request.snapshotter)
        mounts = await sn.prepare(request.key, request.parent, dict(request.labels or {}))
        return api.PrepareSnapshotResponse(mounts=mounts_to_pb(mounts))

    async def view(self, request: api.ViewSnapshotRequest) -> api.ViewSnapshotResponse:
        sn = self.resolve(request.snapshotter)
        mounts = await sn.view(request.key, request.parent, dict(request.labels or {}))
        return api.ViewSnapshotResponse(mounts=mounts_to_pb(mounts))

    async def mounts(self, request: api.MountsRequest) -> api.MountsResponse:
        sn = self.resolve(request.snapshotter)
        return api.MountsResponse(mounts=mounts_to_pb(await sn.mounts(request.key)))

    async def commit(self, request: api.CommitSnapshotRequest) -> Empty:
        sn = self.resolve(request.snapshotter)
        await sn.commit(request.name, request.key, dict(request.labels or {}))
        return Empty()

    async def remove(self, request: api.RemoveSnapshotRequest) -> Empty:
        await self.resolve(request.snapshotter).remove(request.key)
        return Empty()

    async def stat(self, request: api.StatSnapshotRequest) -> api.StatSnapshotResponse:
        info = await self.resolve(request.snapshotter).stat(request.key)
        return api.StatSnapshotResponse(info=info_to_pb(info))

    async def update(self, request: api.UpdateSnapshotRequest) -> api.UpdateSnapshotResponse:
        sn = self.resolve(request.snapshotter)
        paths = list(request.update_mask.paths) if request.update_mask else []
        info = await sn.update(info_from_pb(request.info), paths)
        return api.UpdateSnapshotResponse(info=info_to_pb(info))

    async def list(self, request: api.ListSnapshotsRequest) -> AsyncIterator[api.ListSnapshotsResponse]:
        infos = await self.resolve(request.snapshotter).walk(list(request.filters))
        for i in range(0, len(infos), LIST_BATCH):
            yield api.ListSnapshotsResponse(info=[info_to_pb(x) for x in infos[i:i + LIST_BATCH]])

    async def usage(self, request: api.UsageRequest) -> api.UsageResponse:
        usage = await self.resolve(request.snapshotter).usage(request.key)
        return api.UsageResponse(size=usage.size, inodes=usage.inodes)

    async def cleanup(self, request: api.CleanupRequest) -> Empty:
        await self.resolve(request.snapshotter).cleanup()
        return Empty()
