"""The native snapshotter backend (`io.containerd.snapshotter.v1.native`): every snapshot is a
full directory, a Prepare on a parent copies the parent's whole tree (owners, modes, times,
xattrs, hard links, devices: `cp -a --reflink=auto`), and mounts are bind mounts. Works on any
filesystem, needs no overlay.

On disk, under its root (the plugin root, or `root_path`):

    metadata.db            the metastore (storage.py)
    snapshots/<id>         the snapshot's tree

Mounts: one `bind` mount with `rbind` and `rw` (active) or `ro` (view); a View on a parent binds
the parent's own directory read-only (no copy). Remove deletes the directory at once. The
parent's tree is copied before the metastore transaction (outside its lock) so one large copy
does not stall every other snapshot operation; the transaction then checks the parent is still
the one copied.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import structlog

from pycontainerd.core import errdefs
from pycontainerd.core.identifiers import go_quote
from pycontainerd.core.mount import Mount

from .base import Kind, check_key
from .fsutil import copy_tree, remove_tree
from .local import LocalSnapshotter
from .storage import Snapshot

log = structlog.get_logger(__name__)


@dataclass
class NativeConfig:
    root_path: str = ""
    """Where snapshots live (default: the plugin's own root directory)."""


class NativeSnapshotter(LocalSnapshotter):
    def __init__(self, root: str | Path):
        super().__init__(root)
        self._sweep_leftovers()

    def snapshot_dir(self, sid: str) -> str:
        return os.path.join(self.root, "snapshots", sid)

    data_dir = snapshot_dir

    def _sweep_leftovers(self) -> None:
        """Directories of creations or removals a crash interrupted (only safe at start)."""
        with self.ms.read() as tx:
            ids = tx.id_map()
        for name in os.listdir(self.snapshots_dir):
            if name.startswith("rm-") and name[3:] in ids and not os.path.exists(self.snapshot_dir(name[3:])):
                # renamed for removal, but the removal's transaction never committed: put it back
                os.rename(os.path.join(self.snapshots_dir, name), self.snapshot_dir(name[3:]))
                continue
            if name not in ids:
                with contextlib.suppress(OSError):
                    remove_tree(os.path.join(self.snapshots_dir, name))

    async def remove(self, key: str) -> None:
        def run() -> None:
            renamed = ""
            with self.ms.transaction() as tx:
                sid, _ = tx.remove(key)
                path = self.snapshot_dir(sid)
                if os.path.lexists(path):
                    renamed = os.path.join(self.snapshots_dir, f"rm-{sid}")
                    os.rename(path, renamed)
            if renamed:
                try:
                    remove_tree(renamed)
                except OSError as e:
                    log.warning("failed to remove root filesystem", path=renamed, error=str(e))
        await asyncio.to_thread(run)

    def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None) -> list[Mount]:
        check_key(key)
        labels = dict(labels or {})
        needs_dir = kind == Kind.ACTIVE or not parent  # a view of a parent binds the parent's dir
        copied_from = ""
        with self.ms.read() as tx:  # fail fast, before any copying
            if parent:
                copied_from = tx.check_parent(parent)
            if tx.exists(key):
                raise errdefs.AlreadyExists(f"snapshot {key}")
        td = path = ""
        try:
            if needs_dir:
                td = tempfile.mkdtemp(prefix="new-", dir=self.snapshots_dir)
                os.chmod(td, 0o755)
                if parent:
                    copy_tree(self.snapshot_dir(copied_from), td)
            with self.ms.transaction() as tx:
                s = tx.create(kind, key, parent, labels)
                if parent and s.parent_ids[0] != copied_from:
                    raise errdefs.Aborted(f"parent {go_quote(parent)} changed while it was being copied")
                if td:
                    path = self.snapshot_dir(s.id)
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
        ro = "ro" if s.kind == Kind.VIEW else "rw"
        if not s.parent_ids or s.kind == Kind.ACTIVE:
            source = self.snapshot_dir(s.id)
        else:
            source = self.snapshot_dir(s.parent_ids[0])
        return [Mount("bind", source, options=["rbind", ro])]
