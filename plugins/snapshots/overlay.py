"""The overlayfs snapshotter backend (`io.containerd.snapshotter.v1.overlayfs`).

On disk, under its root (the plugin root, or `root_path`):

    metadata.db                 the metastore (storage.py): key -> id, parent, kind, labels, usage
    snapshots/<id>/fs           the snapshot's own changes: the overlay upperdir while active,
                                a lowerdir once committed
    snapshots/<id>/work         the overlay workdir (active snapshots only)

Mounts (containerd's rules):
- no parent: a bind mount of fs, `rw` (Prepare) or `ro` (View), with `rbind`;
- a View of one committed parent: a read-only bind of the parent's fs;
- otherwise one overlay mount: `index=off` when the kernel has the knob, any `mount_options`,
  then `workdir=` and `upperdir=` (active only) and `lowerdir=` with the parents' fs dirs,
  nearest parent first.
So a differ finds where writes land with core.mount.overlay_upperdir(mounts).

Remove drops the record at once; the directories go at once with `sync_remove = true`,
otherwise on the next Cleanup (what GC calls after collecting), as containerd does.
The plugin skips itself (PluginSkip with the reason) when an overlay cannot be mounted under
its root: it tries a tiny two-lowerdir overlay first, as containerd's check does.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import structlog

from pycontainerd.core import mount as mountmod
from pycontainerd.core.mount import Mount

from .base import LABEL_UPPERDIR, Info, Kind, check_key
from .fsutil import remove_tree
from .local import LocalSnapshotter
from .storage import Snapshot

log = structlog.get_logger(__name__)


@dataclass
class OverlayConfig:
    root_path: str = ""
    """Where snapshots live (default: the plugin's own root directory)."""
    upperdir_label: bool = False
    """Add the label containerd.io/snapshot/overlay.upperdir (the snapshot's fs dir) to Stat,
    Update and Walk results."""
    sync_remove: bool = False
    """Remove a snapshot's directories during Remove instead of on the next Cleanup."""
    mount_options: list[str] = field(default_factory=list)
    """Extra overlay mount options (e.g. "volatile")."""


def supports_index_off() -> bool:
    """The kernel has overlay's `index` parameter, so `index=off` may be passed."""
    return os.path.exists("/sys/module/overlay/parameters/index")


def check_overlay_support(root: str) -> None:
    """Mount a tiny overlay with two lowerdirs under `root` and unmount it; raises OSError (with
    the reason) when that fails."""
    os.makedirs(root, mode=0o700, exist_ok=True)
    td = tempfile.mkdtemp(prefix="multiple-lowerdir-check", dir=root)
    try:
        for d in ("lower1", "lower2", "upper", "work", "merged"):
            os.mkdir(os.path.join(td, d), 0o755)
        opts = (f"lowerdir={td}/lower2:{td}/lower1,upperdir={td}/upper,workdir={td}/work")
        merged = os.path.join(td, "merged")
        mountmod.mount(Mount("overlay", "overlay", options=[opts]), merged)
        mountmod.unmount_all(merged)
    finally:
        with contextlib.suppress(OSError):
            mountmod.unmount_all(os.path.join(td, "merged"), mountmod.MNT_DETACH)
        remove_tree(td)


class OverlaySnapshotter(LocalSnapshotter):
    def __init__(self, root: str | Path, *, upperdir_label: bool = False, sync_remove: bool = False,
                 mount_options: Sequence[str] = (), index_off: bool | None = None):
        super().__init__(root)
        self.upperdir_label = upperdir_label
        self.sync_remove = sync_remove
        self.index_off = supports_index_off() if index_off is None else index_off
        self.mount_options = list(mount_options)

    # -- paths ---------------------------------------------------------------------------------

    def upper_path(self, sid: str) -> str:
        """The fs directory of snapshot id `sid` (upperdir while active, a lowerdir once committed)."""
        return os.path.join(self.root, "snapshots", sid, "fs")

    def work_path(self, sid: str) -> str:
        return os.path.join(self.root, "snapshots", sid, "work")

    data_dir = upper_path

    def _info(self, sid: str, info: Info) -> Info:
        if self.upperdir_label:
            info.labels = dict(info.labels)
            info.labels[LABEL_UPPERDIR] = self.upper_path(sid)
        return info

    # -- the contract --------------------------------------------------------------------------

    async def remove(self, key: str) -> None:
        def run() -> None:
            removals: list[str] = []
            with self.ms.transaction() as tx:
                tx.remove(key)
                if self.sync_remove:
                    removals = self._orphan_dirs(tx.id_map())
            for d in removals:
                try:
                    remove_tree(d)
                except OSError as e:
                    log.warning("failed to remove directory", path=d, error=str(e))
        await asyncio.to_thread(run)

    async def cleanup(self) -> None:
        """Remove the directories of snapshots no longer in the metastore (and leftovers of
        interrupted creations)."""
        def run() -> None:
            with self.ms.transaction() as tx:  # no creation may interleave with the scan
                removals = self._orphan_dirs(tx.id_map())
            for d in removals:
                try:
                    remove_tree(d)
                except OSError as e:
                    log.warning("failed to remove directory", path=d, error=str(e))
        await asyncio.to_thread(run)

    # -- internals -----------------------------------------------------------------------------

    def _orphan_dirs(self, ids: Mapping[str, str]) -> list[str]:
        try:
            names = os.listdir(self.snapshots_dir)
        except FileNotFoundError:
            return []
        return [os.path.join(self.snapshots_dir, n) for n in names if n not in ids]

    def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None) -> list[Mount]:
        check_key(key)
        labels = dict(labels or {})
        # The lock spans the temp dir's life so Cleanup never takes it for an orphan.
        with self.ms.lock:
            td = tempfile.mkdtemp(prefix="new-", dir=self.snapshots_dir)
            path = ""
            try:
                fs = os.path.join(td, "fs")
                os.mkdir(fs, 0o755)
                os.chmod(fs, 0o755)
                if kind == Kind.ACTIVE:
                    os.mkdir(os.path.join(td, "work"), 0o711)
                with self.ms.transaction() as tx:
                    s = tx.create(kind, key, parent, labels)
                    if s.parent_ids:
                        st = os.stat(self.upper_path(s.parent_ids[0]))
                        os.lchown(fs, st.st_uid, st.st_gid)
                    path = os.path.join(self.snapshots_dir, s.id)
                    os.rename(td, path)
                    td = ""
            except BaseException:
                for d in (td, path):
                    if d:
                        with contextlib.suppress(OSError):
                            remove_tree(d)
                raise
        return self._mounts(s)

    def _mounts(self, s: Snapshot) -> list[Mount]:
        if not s.parent_ids:
            return [Mount("bind", self.upper_path(s.id), options=["ro" if s.kind == Kind.VIEW else "rw", "rbind"])]
        options: list[str] = []
        if self.index_off:
            options.append("index=off")
        options += self.mount_options
        if s.kind == Kind.ACTIVE:
            options += [f"workdir={self.work_path(s.id)}", f"upperdir={self.upper_path(s.id)}"]
        elif len(s.parent_ids) == 1:
            return [Mount("bind", self.upper_path(s.parent_ids[0]), options=["ro", "rbind"])]
        options.append("lowerdir=" + ":".join(self.upper_path(p) for p in s.parent_ids))
        return [Mount("overlay", "overlay", options=options)]

