"""Proxy snapshotters (containerd's snapshots/proxy): a backend that is a gRPC client of the
snapshots API served by another process, configured as

    [proxy_plugins.NAME]
      type = "snapshot"
      address = "/run/NAME.sock"

`proxy_registrations(config.proxy_plugins)` turns those entries into SNAPSHOT plugin
registrations (cmd/daemon.py adds them to the built-in ones); the snapshots service then wraps
them in the namespaced layer like any local backend. Requests carry the `snapshotter` field set
to NAME and the caller's namespace header; errors come back as errdefs.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from betterproto.lib.google.protobuf import FieldMask

from pycontainerd.api.gen.containerd.services.snapshots import v1 as api
from pycontainerd.core import errdefs
from pycontainerd.core.context import NAMESPACE_HEADER, namespace
from pycontainerd.core.mount import Mount
from pycontainerd.core.plugin import InitContext, PluginType, Registration

from .base import Info, Snapshotter, Usage
from .grpc import info_from_pb, info_to_pb, mounts_from_pb

SNAPSHOT_PROXY_TYPES = ("snapshot", str(PluginType.SNAPSHOT))


class ProxySnapshotter(Snapshotter):
    def __init__(self, address: str, name: str):
        self.address, self.name = address, name
        self._conn: Any = None

    def _api(self):
        # Imported here: the client library lives in api/, which plugins need not load otherwise.
        from pycontainerd.api.client._base import Connection
        if self._conn is None:
            self._conn = Connection(self.address)
        return self._conn

    async def _call(self, method: str, request: Any) -> Any:
        from pycontainerd.api.client._base import translate_errors
        conn = self._api()
        with translate_errors(self.address):
            stub = api.SnapshotsStub(await conn.channel(), metadata=self._metadata())
            return await getattr(stub, method)(request)

    def _metadata(self) -> dict[str, str]:
        try:
            return {NAMESPACE_HEADER: namespace()}
        except errdefs.FailedPrecondition:
            return {}

    async def stat(self, key: str) -> Info:
        resp = await self._call("stat", api.StatSnapshotRequest(snapshotter=self.name, key=key))
        return info_from_pb(resp.info)

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        req = api.UpdateSnapshotRequest(snapshotter=self.name, info=info_to_pb(info),
                                        update_mask=FieldMask(paths=list(fieldpaths)))
        return info_from_pb((await self._call("update", req)).info)

    async def usage(self, key: str) -> Usage:
        resp = await self._call("usage", api.UsageRequest(snapshotter=self.name, key=key))
        return Usage(size=resp.size, inodes=resp.inodes)

    async def mounts(self, key: str) -> list[Mount]:
        resp = await self._call("mounts", api.MountsRequest(snapshotter=self.name, key=key))
        return mounts_from_pb(resp.mounts)

    async def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        req = api.PrepareSnapshotRequest(snapshotter=self.name, key=key, parent=parent, labels=dict(labels or {}))
        return mounts_from_pb((await self._call("prepare", req)).mounts)

    async def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        req = api.ViewSnapshotRequest(snapshotter=self.name, key=key, parent=parent, labels=dict(labels or {}))
        return mounts_from_pb((await self._call("view", req)).mounts)

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        req = api.CommitSnapshotRequest(snapshotter=self.name, name=name, key=key, labels=dict(labels or {}))
        await self._call("commit", req)

    async def remove(self, key: str) -> None:
        await self._call("remove", api.RemoveSnapshotRequest(snapshotter=self.name, key=key))

    async def walk(self, filter_strings: Sequence[str] = ()) -> list[Info]:
        from pycontainerd.api.client._base import translate_errors
        conn = self._api()
        out: list[Info] = []
        with translate_errors(self.address):
            stub = api.SnapshotsStub(await conn.channel(), metadata=self._metadata())
            req = api.ListSnapshotsRequest(snapshotter=self.name, filters=list(filter_strings))
            async for resp in stub.list(req):
                out.extend(info_from_pb(i) for i in resp.info)
        return out

    async def cleanup(self) -> None:
        await self._call("cleanup", api.CleanupRequest(snapshotter=self.name))

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def proxy_registration(name: str, address: str) -> Registration:
    """A SNAPSHOT plugin `name` whose backend is the snapshots API at `address`."""

    async def init(ctx: InitContext) -> ProxySnapshotter:
        ctx.meta.exports["address"] = address
        if not address:
            raise errdefs.InvalidArgument(f"proxy snapshotter {name}: address is empty")
        return ProxySnapshotter(address, name)

    async def close(sn: ProxySnapshotter) -> None:
        await sn.close()

    return Registration(PluginType.SNAPSHOT, name, init, close=close)


def proxy_registrations(proxy_plugins: Mapping[str, Any]) -> list[Registration]:
    """Registrations for the `type = "snapshot"` entries of config's proxy_plugins."""
    return [proxy_registration(name, p.address) for name, p in sorted(proxy_plugins.items())
            if getattr(p, "type", "") in SNAPSHOT_PROXY_TYPES]
