"""Snapshots in the metadata database: the namespaced view of one backend snapshotter
(containerd's metadata/snapshot.go).

Each namespace has its own key space. A row of the `snapshots` table maps (namespace,
snapshotter, key) to the backend's key (`backend_key`, "<namespace>/<n>/<key>", unique and never
reused), and keeps the namespaced parent, kind, labels and timestamps. Every backend call goes
through that mapping, so two namespaces may use the same key, and Stat/Walk show parents by their
namespaced names. Backends only ever see the labels they inherit (`containerd.io/snapshot/...`
and `containerd.io/snapshot.ref`); the namespaced labels live here.

Rules, as containerd's:
- Prepare/View with the label `containerd.io/snapshot.ref=TARGET` answers AlreadyExists at once
  when TARGET exists in this namespace (unpack relies on it to skip layers it has). When the
  backend itself answers AlreadyExists (a remote snapshotter that has TARGET), the committed
  backend snapshot carrying that ref label with the same parent is adopted under the name
  TARGET, and AlreadyExists is still returned.
- Commit makes a new row (new backend key) for the name and drops the key's row; the backend
  commits in between.
- Remove refuses a snapshot with children (FailedPrecondition) and deletes the row; the backend
  snapshot is removed right after (containerd leaves that to GC; GC's sweep still finds any
  backend snapshot no row refers to, see `prune`).
- Writes create the namespace on first use; under a lease (core.context.lease()) created keys
  are added to the lease as ("snapshots/<snapshotter>", key) and committed/removed keys leave it.

For GC: rows are in `snapshots`; `backend_keys()` gives the referenced backend keys of this
snapshotter, `prune()` removes every backend snapshot no row refers to (children first) and then
runs the backend's Cleanup, holding `exclusive()` so no create/commit interleaves.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import datetime
from typing import AsyncIterator, Mapping, Sequence

import structlog

from pycontainerd.core import errdefs
from pycontainerd.core.context import lease as current_lease
from pycontainerd.core.context import namespace as current_namespace
from pycontainerd.core.identifiers import go_quote
from pycontainerd.core.mount import Mount
from pycontainerd.plugins.snapshots.base import (LABEL_SNAPSHOT_REF, Info, Kind, Snapshotter, Usage, adaptor,
                                                 apply_label_update, check_key, clean_labels,
                                                 filter_inherited_labels, match, validate_labels)

from .db import MetadataDB, dump_labels, load_labels, now, parse_ts, ts

log = structlog.get_logger(__name__)


class RWLock:
    """Many shared holders or one exclusive holder (asyncio); writers are not starved."""

    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0
        self._cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and not self._waiting_writers)
            self._readers += 1
        try:
            yield
        finally:
            async with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            self._waiting_writers += 1
            try:
                await self._cond.wait_for(lambda: not self._writer and not self._readers)
            finally:
                self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            async with self._cond:
                self._writer = False
                self._cond.notify_all()


def _merge(backend: Info, local: Info) -> Info:
    """containerd's overlayInfo: the backend's kind (and inherited labels), the namespaced
    name, parent, timestamps and labels on top."""
    labels = dict(backend.labels or {})
    labels.update(local.labels or {})
    return Info(name=local.name, kind=backend.kind, parent=local.parent, labels=labels,
                created=local.created, updated=local.updated)


class NamespacedSnapshotter(Snapshotter):
    """One backend snapshotter seen per namespace (the request's, from core.context)."""

    def __init__(self, db: MetadataDB, name: str, backend: Snapshotter):
        self.db, self.name, self.backend = db, name, backend
        self.lock = RWLock()
        self._reserved: set[tuple[str, str]] = set()
        self._last_seq = 0

    def __repr__(self) -> str:
        return f"NamespacedSnapshotter({self.name!r})"

    # -- helpers -------------------------------------------------------------------------------

    def _next_seq(self) -> int:
        """A number for backend keys that grows for as long as the clock does not go back,
        across restarts too (so a backend key is never reused)."""
        self._last_seq = max(time.time_ns(), self._last_seq + 1)
        return self._last_seq

    def _backend_key(self, ns: str, key: str) -> str:
        return f"{ns}/{self._next_seq()}/{key}"

    def _row(self, ns: str, key: str):
        rows = self.db.read("SELECT * FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
                            (ns, self.name, key))
        return rows[0] if rows else None

    def _local(self, row) -> Info:
        return Info(name=row["key"], kind=Kind(row["kind"]), parent=row["parent"],
                    labels=load_labels(row["labels"]), created=parse_ts(row["created_at"]),
                    updated=parse_ts(row["updated_at"]))

    def _resolve(self, key: str) -> str:
        ns = current_namespace()
        row = self._row(ns, key)
        if row is None:
            raise errdefs.NotFound(f"snapshot {key} does not exist")
        return row["backend_key"]

    @contextlib.contextmanager
    def _reserve(self, ns: str, *keys: str):
        """Claim keys in flight so two concurrent creations of one key cannot both reach the
        backend; the final transaction still checks the table."""
        claimed = [(ns, k) for k in keys if k]
        for c in claimed:
            if c in self._reserved:
                raise errdefs.AlreadyExists(f"snapshot {go_quote(c[1])}")
        self._reserved.update(claimed)
        try:
            yield
        finally:
            self._reserved.difference_update(claimed)

    def _lease_add(self, cur, ns: str, key: str) -> None:
        lid = current_lease()
        if not lid:
            return
        if not cur.execute("SELECT 1 FROM leases WHERE namespace = ? AND id = ?", (ns, lid)).fetchone():
            raise errdefs.NotFound("lease does not exist")
        cur.execute("INSERT OR IGNORE INTO lease_resources(namespace, lease, type, id) VALUES (?, ?, ?, ?)",
                    (ns, lid, f"snapshots/{self.name}", key))

    def _lease_remove(self, cur, ns: str, key: str) -> None:
        lid = current_lease()
        if not lid:
            return
        cur.execute("DELETE FROM lease_resources WHERE namespace = ? AND lease = ? AND type = ? AND id = ?",
                    (ns, lid, f"snapshots/{self.name}", key))

    # -- reads ---------------------------------------------------------------------------------

    async def stat(self, key: str) -> Info:
        ns = current_namespace()
        row = self._row(ns, key)
        if row is None:
            raise errdefs.NotFound(f"snapshot {key} does not exist")
        info = await self.backend.stat(row["backend_key"])
        return _merge(info, self._local(row))

    async def usage(self, key: str) -> Usage:
        return await self.backend.usage(self._resolve(key))

    async def mounts(self, key: str) -> list[Mount]:
        return await self.backend.mounts(self._resolve(key))

    async def walk(self, filter_strings: Sequence[str] = ()) -> list[Info]:
        ns = current_namespace()
        flt = match(filter_strings)
        rows = self.db.read("SELECT * FROM snapshots WHERE namespace = ? AND snapshotter = ? ORDER BY key",
                            (ns, self.name))
        if not rows:
            return []
        if len(rows) <= 8:
            backend: dict[str, Info] = {}
            for r in rows:
                try:
                    backend[r["backend_key"]] = await self.backend.stat(r["backend_key"])
                except errdefs.NotFound:
                    continue
        else:
            backend = {i.name: i for i in await self.backend.walk()}
        out = []
        for r in rows:
            binfo = backend.get(r["backend_key"])
            if binfo is None:  # gone from the backend: containerd skips it too
                continue
            info = _merge(binfo, self._local(r))
            if flt.match(adaptor(info)):
                out.append(info)
        return out

    # -- writes --------------------------------------------------------------------------------

    async def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return await self._create(key, parent, labels, readonly=False)

    async def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return await self._create(key, parent, labels, readonly=True)

    async def _create(self, key: str, parent: str, labels: Mapping[str, str] | None, readonly: bool) -> list[Mount]:
        ns = current_namespace()
        check_key(key)
        base_labels = dict(labels or {})
        validate_labels(base_labels)
        target = base_labels.get(LABEL_SNAPSHOT_REF, "")
        async with self.lock.shared():
            if target and self._row(ns, target) is not None:
                raise errdefs.AlreadyExists(f"target snapshot {go_quote(target)}")
            if self._row(ns, key) is not None:
                raise errdefs.AlreadyExists(f"snapshot {go_quote(key)}")
            bparent = ""
            if parent:
                prow = self._row(ns, parent)
                if prow is None:
                    raise errdefs.NotFound(f"parent snapshot {parent} does not exist")
                bparent = prow["backend_key"]
            with self._reserve(ns, key):
                bkey = self._backend_key(ns, key)
                inherited = filter_inherited_labels(base_labels)
                created_bkey = ""
                result_error: errdefs.ContainerdError | None = None
                mounts: list[Mount] = []
                created = updated = now()
                kind = Kind.VIEW if readonly else Kind.ACTIVE
                try:
                    if readonly:
                        mounts = await self.backend.view(bkey, bparent, inherited)
                    else:
                        mounts = await self.backend.prepare(bkey, bparent, inherited)
                    created_bkey = bkey
                except errdefs.AlreadyExists as err:
                    if not target:
                        raise errdefs.Unknown(f"unexpected error from snapshotter: {err}") from None
                    tinfo = await self._find_target(target, bparent)
                    key, bkey, bparent, kind = target, tinfo.name, tinfo.parent, tinfo.kind
                    created = tinfo.created or created
                    updated = tinfo.updated or updated
                    for k, v in (tinfo.labels or {}).items():
                        base_labels.setdefault(k, v)
                    result_error = errdefs.AlreadyExists(f"target snapshot {go_quote(target)} from snapshotter")
                try:
                    self._insert(ns, key, bkey, parent, bparent, target, kind, base_labels, created, updated)
                except errdefs.AlreadyExists as err:
                    result_error = result_error or err
                except BaseException:
                    if created_bkey:
                        await self._discard(created_bkey)
                    raise
                if result_error is not None:
                    if created_bkey:
                        await self._discard(created_bkey)
                    raise result_error
                return mounts

    async def _find_target(self, target: str, bparent: str) -> Info:
        flt = f'labels."{LABEL_SNAPSHOT_REF}"=={json.dumps(target)},parent=={json.dumps(bparent)}'
        try:
            infos = await self.backend.walk([flt])
        except errdefs.ContainerdError as err:
            raise errdefs.Unknown(f"failed walking backend snapshots: {err}") from None
        for i in infos:
            if i.kind == Kind.COMMITTED and i.labels.get(LABEL_SNAPSHOT_REF) == target and i.parent == bparent:
                return i
        raise errdefs.NotFound(f"target snapshot {go_quote(target)} in backend")

    def _insert(self, ns: str, key: str, bkey: str, parent: str, bparent: str, target: str, kind: Kind,
                labels: dict[str, str], created: datetime, updated: datetime) -> None:
        with self.db.write() as cur:
            self.db.ensure_namespace(cur, ns)
            self._lease_add(cur, ns, key)
            if cur.execute("SELECT 1 FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
                           (ns, self.name, key)).fetchone():
                raise errdefs.AlreadyExists(f"snapshot {go_quote(key)}")
            if parent:
                prow = cur.execute("SELECT backend_key FROM snapshots WHERE namespace = ? AND snapshotter = ? "
                                   "AND key = ?", (ns, self.name, parent)).fetchone()
                if prow is None:
                    raise errdefs.NotFound(f"parent snapshot {parent} does not exist")
                if prow["backend_key"] != bparent:
                    raise errdefs.InvalidArgument(f"mismatched parent {parent} from target {target}")
            cur.execute("INSERT INTO snapshots(namespace, snapshotter, key, backend_key, parent, kind, labels, "
                        "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (ns, self.name, key, bkey, parent, int(kind), dump_labels(clean_labels(labels)),
                         ts(created), ts(updated)))

    async def _discard(self, bkey: str) -> None:
        try:
            await self.backend.remove(bkey)
        except Exception as err:
            log.error("failed to cleanup unreferenced snapshot", snapshotter=self.name, key=bkey, error=str(err))

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        ns = current_namespace()
        check_key(name, "name")
        labels = dict(labels or {})
        validate_labels(labels)
        async with self.lock.shared():
            if self._row(ns, name) is not None:
                raise errdefs.AlreadyExists(f"snapshot {go_quote(name)}")
            row = self._row(ns, key)
            if row is None:
                raise errdefs.NotFound(f"snapshot {key} does not exist")
            with self._reserve(ns, name):
                bkey = row["backend_key"]
                name_bkey = self._backend_key(ns, name)
                parent = row["parent"]
                if parent and self._row(ns, parent) is None:
                    raise errdefs.NotFound(f"parent snapshot {parent} does not exist")
                await self.backend.commit(name_bkey, bkey, filter_inherited_labels(labels))
                try:
                    with self.db.write() as cur:
                        self.db.ensure_namespace(cur, ns)
                        if cur.execute("SELECT 1 FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
                                       (ns, self.name, name)).fetchone():
                            raise errdefs.AlreadyExists(f"snapshot {go_quote(name)}")
                        self._lease_add(cur, ns, name)
                        stamp = ts(now())
                        cur.execute("DELETE FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
                                    (ns, self.name, key))
                        cur.execute(
                            "INSERT INTO snapshots(namespace, snapshotter, key, backend_key, parent, kind, labels, "
                            "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (ns, self.name, name, name_bkey, parent, int(Kind.COMMITTED),
                             dump_labels(clean_labels(labels)), stamp, stamp))
                        self._lease_remove(cur, ns, key)
                except BaseException as err:
                    log.error("uncommittable snapshot: transaction failed after commit, snapshot should be removed",
                              snapshotter=self.name, key=key, bname=name_bkey, error=str(err))
                    raise

    async def remove(self, key: str) -> None:
        ns = current_namespace()
        async with self.lock.shared():
            with self.db.write() as cur:
                row = cur.execute("SELECT * FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
                                  (ns, self.name, key)).fetchone()
                if row is None:
                    raise errdefs.NotFound(f"snapshot {key} does not exist")
                if cur.execute("SELECT 1 FROM snapshots WHERE namespace = ? AND snapshotter = ? AND parent = ? LIMIT 1",
                               (ns, self.name, key)).fetchone():
                    raise errdefs.FailedPrecondition("cannot remove snapshot with child")
                cur.execute("DELETE FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
                            (ns, self.name, key))
                self._lease_remove(cur, ns, key)
                mark_dirty = getattr(self.db, "mark_dirty", None)  # tells GC's scheduler
                if mark_dirty is not None:
                    mark_dirty(snapshotter=self.name)
                bkey = row["backend_key"]
                shared = cur.execute("SELECT 1 FROM snapshots WHERE snapshotter = ? AND backend_key = ? LIMIT 1",
                                     (self.name, bkey)).fetchone()
            if not shared:
                try:
                    await self.backend.remove(bkey)
                except (errdefs.NotFound, errdefs.FailedPrecondition):
                    pass  # already gone, or still a parent in the backend: GC's sweep decides
                except Exception as err:
                    log.warning("failed to remove backend snapshot", snapshotter=self.name, key=bkey,
                                error=str(err))

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        ns = current_namespace()
        if not info.name:
            raise errdefs.InvalidArgument("snapshot name must not be empty")
        async with self.lock.shared():
            row = self._row(ns, info.name)
            if row is None:
                raise errdefs.NotFound(f"snapshot {info.name} does not exist")
            local = self._local(row)
            labels = apply_label_update(local.labels, info, fieldpaths)
            validate_labels(labels)
            inner = Info(name=row["backend_key"], labels=filter_inherited_labels(labels))
            binfo = await self.backend.update(inner, list(fieldpaths))
            stamp = now()
            with self.db.write() as cur:
                done = cur.execute("UPDATE snapshots SET labels = ?, updated_at = ? WHERE namespace = ? AND "
                                   "snapshotter = ? AND key = ? AND backend_key = ?",
                                   (dump_labels(labels), ts(stamp), ns, self.name, info.name, row["backend_key"]))
                if done.rowcount == 0:
                    raise errdefs.NotFound(f"snapshot {info.name} does not exist")
            local.labels, local.updated = labels, stamp
            return _merge(binfo, local)

    async def cleanup(self) -> None:
        await self.backend.cleanup()

    # -- for GC --------------------------------------------------------------------------------

    def exclusive(self):
        """Async context manager: no Prepare/View/Commit/Remove/Update runs while it is held."""
        return self.lock.exclusive()

    def backend_keys(self) -> set[str]:
        """Every backend key some namespace's row of this snapshotter refers to."""
        rows = self.db.read("SELECT backend_key FROM snapshots WHERE snapshotter = ?", (self.name,))
        return {r["backend_key"] for r in rows}

    async def prune(self) -> list[str]:
        """Remove every backend snapshot that no row refers to, children before parents, then
        run the backend's Cleanup (Unimplemented is fine). Returns the removed backend keys."""
        removed: list[str] = []
        async with self.lock.exclusive():
            seen = self.backend_keys()
            infos = await self.backend.walk()
            children: dict[str, list[str]] = {}
            for i in infos:
                children.setdefault(i.parent, []).append(i.name)
            names = {i.name for i in infos}

            async def prune_branch(name: str) -> None:
                for child in children.get(name, []):
                    await prune_branch(child)
                if name in names and name not in seen:
                    try:
                        await self.backend.remove(name)
                        removed.append(name)
                    except errdefs.FailedPrecondition as err:
                        log.warning("failed to remove snapshot", snapshotter=self.name, key=name, error=str(err))

            for root in children.get("", []):
                await prune_branch(root)
            with contextlib.suppress(errdefs.Unimplemented):
                await self.backend.cleanup()
        return removed
