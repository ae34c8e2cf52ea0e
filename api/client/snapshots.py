"""`client.snapshots`: the snapshots of the client's namespace, in any snapshotter the daemon has
loaded (`snapshotter=`, default "overlayfs", as ctr's).

    mounts = await client.snapshots.prepare("work", parent="sha256:...")
    await client.snapshots.commit("layer-1", "work", labels={"containerd.io/gc.root": "..."})
    for info in await client.snapshots.list(["kind==committed"], snapshotter="native"):
        print(info.name, info.parent, info.kind)

Mounts come back as core.mount.Mount (mount them with core.mount.mount_all / temp_mount).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Optional

from betterproto.lib.google.protobuf import FieldMask

from pycontainerd.api.gen.containerd.services.snapshots import v1 as api
from pycontainerd.core.mount import Mount

from ._base import DEFAULT, ServiceAPI

DEFAULT_SNAPSHOTTER = "overlayfs"

_KIND_NAMES = {1: "View", 2: "Active", 3: "Committed"}
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def go_json_time(ts: Optional[datetime]) -> str:
    """Go's time.Time JSON form (RFC 3339 with nanoseconds, trailing zeros trimmed), in UTC."""
    if ts is None:
        return "0001-01-01T00:00:00Z"
    ts = ts.astimezone(timezone.utc)
    frac = f"{ts.microsecond:06d}".rstrip("0")
    return ts.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    parent: str = ""
    kind: str = "Unknown"  # "View", "Active" or "Committed"
    labels: dict = field(default_factory=dict)
    created_at: Optional[datetime] = None
    updated_at: Optional[datetime] = None

    @classmethod
    def from_proto(cls, msg: Any) -> "SnapshotInfo":
        def when(ts: Any) -> Optional[datetime]:
            return ts if ts and ts != _EPOCH else None
        return cls(name=msg.name, parent=msg.parent, kind=_KIND_NAMES.get(int(msg.kind), "Unknown"),
                   labels=dict(sorted((msg.labels or {}).items())),
                   created_at=when(msg.created_at), updated_at=when(msg.updated_at))

    def to_dict(self) -> dict:
        """The JSON ctr prints for `snapshots info` (Go's snapshots.Info field names)."""
        d: dict = {"Kind": self.kind, "Name": self.name}
        if self.parent:
            d["Parent"] = self.parent
        if self.labels:
            d["Labels"] = dict(self.labels)
        d["Created"] = go_json_time(self.created_at)
        d["Updated"] = go_json_time(self.updated_at)
        return d


@dataclass(frozen=True)
class SnapshotUsage:
    size: int = 0
    inodes: int = 0

    def to_dict(self) -> dict:
        return {"size": self.size, "inodes": self.inodes}


def _mounts(msgs: Iterable[Any]) -> list[Mount]:
    return [Mount.from_any(m) for m in msgs]


class SnapshotsAPI(ServiceAPI):
    stub_class = api.SnapshotsStub

    async def prepare(self, key: str, parent: str = "", labels: Optional[Mapping[str, str]] = None, *,
                      snapshotter: str = DEFAULT_SNAPSHOTTER, timeout: Any = DEFAULT) -> list[Mount]:
        """Create active snapshot `key` on committed `parent` ("" for an empty one); its mounts."""
        req = api.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent, labels=dict(labels or {}))
        return _mounts((await self._unary("prepare", req, timeout=timeout)).mounts)

    async def view(self, key: str, parent: str = "", labels: Optional[Mapping[str, str]] = None, *,
                   snapshotter: str = DEFAULT_SNAPSHOTTER, timeout: Any = DEFAULT) -> list[Mount]:
        """Create read-only view `key` of committed `parent`; its mounts."""
        req = api.ViewSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent, labels=dict(labels or {}))
        return _mounts((await self._unary("view", req, timeout=timeout)).mounts)

    async def mounts(self, key: str, *, snapshotter: str = DEFAULT_SNAPSHOTTER,
                     timeout: Any = DEFAULT) -> list[Mount]:
        req = api.MountsRequest(snapshotter=snapshotter, key=key)
        return _mounts((await self._unary("mounts", req, timeout=timeout)).mounts)

    async def commit(self, name: str, key: str, labels: Optional[Mapping[str, str]] = None, *,
                     snapshotter: str = DEFAULT_SNAPSHOTTER, timeout: Any = DEFAULT) -> None:
        """Commit active snapshot `key` as `name` (the key goes away)."""
        req = api.CommitSnapshotRequest(snapshotter=snapshotter, name=name, key=key, labels=dict(labels or {}))
        await self._unary("commit", req, timeout=timeout)

    async def remove(self, key: str, *, snapshotter: str = DEFAULT_SNAPSHOTTER, timeout: Any = DEFAULT) -> None:
        await self._unary("remove", api.RemoveSnapshotRequest(snapshotter=snapshotter, key=key), timeout=timeout)

    async def stat(self, key: str, *, snapshotter: str = DEFAULT_SNAPSHOTTER,
                   timeout: Any = DEFAULT) -> SnapshotInfo:
        resp = await self._unary("stat", api.StatSnapshotRequest(snapshotter=snapshotter, key=key), timeout=timeout)
        return SnapshotInfo.from_proto(resp.info)

    info = stat

    async def update(self, key: str, labels: Mapping[str, str], *, replace: bool = False,
                     snapshotter: str = DEFAULT_SNAPSHOTTER, timeout: Any = DEFAULT) -> SnapshotInfo:
        """Set labels on `key` and return it as it now is: only the given keys (an empty value
        removes one, what `ctr snapshots label` does), or with replace=True exactly `labels`."""
        labels = dict(labels)
        if replace:
            paths = ["labels"]
        elif labels:
            paths = [f"labels.{k}" for k in labels]
        else:
            return await self.stat(key, snapshotter=snapshotter, timeout=timeout)
        req = api.UpdateSnapshotRequest(snapshotter=snapshotter,
                                        info=api.Info(name=key, labels={k: v for k, v in labels.items() if v}),
                                        update_mask=FieldMask(paths=paths))
        return SnapshotInfo.from_proto((await self._unary("update", req, timeout=timeout)).info)

    async def set_label(self, key: str, label: str, value: str, *, snapshotter: str = DEFAULT_SNAPSHOTTER,
                        timeout: Any = DEFAULT) -> SnapshotInfo:
        return await self.update(key, {label: value}, snapshotter=snapshotter, timeout=timeout)

    async def list(self, filters: Iterable[str] = (), *, snapshotter: str = DEFAULT_SNAPSHOTTER,
                   timeout: Any = None) -> list[SnapshotInfo]:
        """Every snapshot matching any filter (name, parent, kind, labels.KEY), by name."""
        req = api.ListSnapshotsRequest(snapshotter=snapshotter, filters=list(filters))
        out: list[SnapshotInfo] = []
        async for resp in self._stream("list", req, timeout=timeout):
            out.extend(SnapshotInfo.from_proto(i) for i in resp.info)
        return out

    async def usage(self, key: str, *, snapshotter: str = DEFAULT_SNAPSHOTTER,
                    timeout: Any = DEFAULT) -> SnapshotUsage:
        resp = await self._unary("usage", api.UsageRequest(snapshotter=snapshotter, key=key), timeout=timeout)
        return SnapshotUsage(size=resp.size, inodes=resp.inodes)

    async def cleanup(self, *, snapshotter: str = DEFAULT_SNAPSHOTTER, timeout: Any = DEFAULT) -> None:
        await self._unary("cleanup", api.CleanupRequest(snapshotter=snapshotter), timeout=timeout)
