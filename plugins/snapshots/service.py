"""The snapshots service (`io.containerd.service.v1.snapshots-service`): every loaded backend
snapshotter wrapped in the namespaced layer (plugins/metadata/snapshots.py) and in event
publishing (/snapshot/prepare, /snapshot/commit, /snapshot/remove, in the caller's namespace),
looked up by name. Plain Python: the gRPC adapter (grpc.py), CRI and tests call it in-process.

    svc = ctx.get(PluginType.SERVICE, "snapshots-service")
    sn = svc.get("overlayfs")                 # InvalidArgument when not loaded
    mounts = await sn.prepare("key", "parent", {"containerd.io/gc.root": "..."})
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from pycontainerd.api.gen.containerd import events as ev
from pycontainerd.core import errdefs
from pycontainerd.core.context import namespace
from pycontainerd.core.mount import Mount
from pycontainerd.plugins.metadata.snapshots import NamespacedSnapshotter

from .base import Info, Snapshotter, Usage


class PublishingSnapshotter(Snapshotter):
    """A namespaced snapshotter that publishes containerd's snapshot events after each
    successful Prepare, Commit and Remove (View publishes nothing, as in containerd)."""

    def __init__(self, inner: NamespacedSnapshotter, events: Any):
        self.inner, self.events = inner, events

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def backend(self) -> Snapshotter:
        return self.inner.backend

    def _publish(self, topic: str, event: Any) -> None:
        if self.events is not None:
            self.events.publish(namespace(), topic, event)

    async def stat(self, key: str) -> Info:
        return await self.inner.stat(key)

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        return await self.inner.update(info, fieldpaths)

    async def usage(self, key: str) -> Usage:
        return await self.inner.usage(key)

    async def mounts(self, key: str) -> list[Mount]:
        return await self.inner.mounts(key)

    async def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        mounts = await self.inner.prepare(key, parent, labels)
        self._publish("/snapshot/prepare", ev.SnapshotPrepare(key=key, parent=parent))
        return mounts

    async def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return await self.inner.view(key, parent, labels)

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        await self.inner.commit(name, key, labels)
        self._publish("/snapshot/commit", ev.SnapshotCommit(key=key, name=name))

    async def remove(self, key: str) -> None:
        await self.inner.remove(key)
        self._publish("/snapshot/remove", ev.SnapshotRemove(key=key))

    async def walk(self, filter_strings: Sequence[str] = ()) -> list[Info]:
        return await self.inner.walk(filter_strings)

    async def cleanup(self) -> None:
        await self.inner.cleanup()


class SnapshotsService:
    """The namespaced snapshotters by name."""

    def __init__(self, db: Any, backends: Mapping[str, Snapshotter], events: Any):
        self.namespaced = {name: NamespacedSnapshotter(db, name, backend) for name, backend in backends.items()}
        for name, backend in backends.items():
            # GC (plugins/gc) sweeps a backend under `backend.gc_lock.exclusive()`: the lock the
            # namespaced layer holds shared while a backend snapshot waits for its row.
            backend.gc_lock = self.namespaced[name].lock
        self.snapshotters = {name: PublishingSnapshotter(sn, events) for name, sn in self.namespaced.items()}

    def names(self) -> list[str]:
        return sorted(self.snapshotters)

    def get(self, name: str) -> PublishingSnapshotter:
        """The snapshotter called `name`; InvalidArgument when it is empty or not loaded (as
        containerd's snapshots service answers)."""
        if not name:
            raise errdefs.InvalidArgument("snapshotter argument missing")
        sn = self.snapshotters.get(name)
        if sn is None:
            raise errdefs.InvalidArgument(f"snapshotter not loaded: {name}")
        return sn

    __getitem__ = get
