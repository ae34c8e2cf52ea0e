"""What the local snapshotter backends (native, overlay) share: a metastore (storage.py) in their
root and one directory per snapshot id under `<root>/snapshots`, and the contract calls that are
only metastore work (stat, update, walk, usage, mounts, prepare, view, commit).

A backend says where a snapshot's contents live (`data_dir`: the tree whose disk usage is the
snapshot's), how it creates one and what its mounts are (`_create`, `_mounts`), and how it
removes one (`remove`); `_info` may add to the Info it reports (overlay's upperdir label).
Blocking work (sqlite, the filesystem) runs in worker threads.
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Mapping, Sequence

from pycontainerd.core.mount import Mount

from .base import Info, Kind, Snapshotter, Usage, check_key
from .fsutil import disk_usage
from .storage import MetaStore, Snapshot


class LocalSnapshotter(Snapshotter):
    def __init__(self, root: str | Path):
        self.root = str(root)
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        os.makedirs(self.snapshots_dir, mode=0o700, exist_ok=True)
        self.ms = MetaStore(Path(self.root) / "metadata.db")

    @property
    def snapshots_dir(self) -> str:
        return os.path.join(self.root, "snapshots")

    def data_dir(self, sid: str) -> str:
        """The tree holding the contents of snapshot id `sid`."""
        raise NotImplementedError

    def _info(self, sid: str, info: Info) -> Info:
        return info

    def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None) -> list[Mount]:
        raise NotImplementedError

    def _mounts(self, s: Snapshot) -> list[Mount]:
        raise NotImplementedError

    async def stat(self, key: str) -> Info:
        def run() -> Info:
            with self.ms.read() as tx:
                sid, info, _ = tx.get_info(key)
            return self._info(sid, info)
        return await asyncio.to_thread(run)

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        def run() -> Info:
            with self.ms.transaction() as tx:
                updated = tx.update(info, fieldpaths)
                sid, _, _ = tx.get_info(info.name)
            return self._info(sid, updated)
        return await asyncio.to_thread(run)

    async def usage(self, key: str) -> Usage:
        def run() -> Usage:
            with self.ms.read() as tx:
                sid, info, usage = tx.get_info(key)
            if info.kind == Kind.ACTIVE:
                return disk_usage(self.data_dir(sid))
            return usage
        return await asyncio.to_thread(run)

    async def mounts(self, key: str) -> list[Mount]:
        def run() -> list[Mount]:
            with self.ms.read() as tx:
                s = tx.get_snapshot(key)
            return self._mounts(s)
        return await asyncio.to_thread(run)

    async def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return await asyncio.to_thread(self._create, Kind.ACTIVE, key, parent, labels)

    async def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return await asyncio.to_thread(self._create, Kind.VIEW, key, parent, labels)

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        check_key(name, "name")

        def run() -> None:
            with self.ms.read() as tx:
                sid, _, _ = tx.get_info(key)
            # the caller no longer changes an active snapshot it commits: measure outside the lock
            usage = disk_usage(self.data_dir(sid))
            with self.ms.transaction() as tx:
                tx.commit_active(key, name, usage, labels)
        await asyncio.to_thread(run)

    async def walk(self, filter_strings: Sequence[str] = ()) -> list[Info]:
        def run() -> list[Info]:
            with self.ms.read() as tx:
                pairs = tx.walk(filter_strings)
            return [self._info(sid, info) for sid, info in pairs]
        return await asyncio.to_thread(run)

    async def close(self) -> None:
        self.ms.close()
