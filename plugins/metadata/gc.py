"""Garbage collection of the metadata database and of the backends behind it, with containerd's
rules (metadata/gc.go): mark what is reachable from the roots of every namespace, delete the
rows nothing reaches in one transaction, then remove backend blobs and snapshots no row of any
namespace names any more.

Owns the mark-and-sweep (`Collector`). Stores tell the scheduler (plugins/gc), which decides
*when* to collect, about deletions through `MetadataDB.mark_dirty()`: call it in the write that
deletes an image, a lease or one of its resources, a container (plain), a `blobs` or `ingests`
row (`content=True`) or a `snapshots` row (`snapshotter=NAME`). Every committed write is a
mutation the scheduler counts (`MetadataDB.register_mutation_callback`). The collector writes
no row but the ones it sweeps, and publishes no event (containerd publishes none either).

Roots, per namespace:
- leases whose `containerd.io/gc.expire` (RFC 3339) has not passed, with the content, snapshots
  and ingests they hold; `containerd.io/gc.flat` on a lease makes its content and snapshots
  "flat": their labels are not followed (a flat snapshot's parents still are). An expired lease
  is no root: it is swept, and what only it held goes with it. A lease label that does not parse
  as a time never expires (containerd logs and ignores it);
- images: the target digest, and references in the image's labels;
- containers: `snapshotter/snapshot_key`, and references in the container's labels;
- blobs and snapshots labelled `containerd.io/gc.root`;
- ingests no lease holds. containerd gives those a 24 hour expiry; our ingests table has no
  expiry column, so they stay until their ingest ends. An ingest a lease holds goes with the
  lease: swept when the lease expires, dropped when it is deleted (`drop_unleased_ingests`).

References followed from a reached node:
- content (a blob row) and snapshot rows: labels `containerd.io/gc.ref.content` or
  `containerd.io/gc.ref.content.<anything>` / `.../<anything>` (value: a digest), and
  `containerd.io/gc.ref.snapshot.<snapshotter>[/<anything>]` (value: a snapshot key);
- a snapshot's parent (same snapshotter, same namespace);
- an ingest's expected digest.

Swept rows: leases (their resources go with them), blobs, ingests and snapshots not reached.
Images and containers are never swept: they are roots.

Backend sweeps run after the rows are committed, each under the exclusive side of the lock its
namespaced store holds shared while it creates a backend object before recording its row (the
content store's `lock`), so a sweep never removes an object whose row is on its way:
- content: every blob the backend `walk`s whose digest is in no `blobs` row of any namespace
  and is no ingest's expected digest is `delete`d, and every backend ingest
  (`walk_status_refs`) that no `ingests` row records is `abort`ed;
- snapshots, per snapshotter backend (the `io.containerd.snapshotter.v1` plugins): every
  backend snapshot whose key is no `snapshots.backend_key` row of that snapshotter is
  `remove`d, children before parents; a FailedPrecondition from the backend is logged and
  skipped, as containerd does. A snapshotter without a backend is left alone.
A backend sweep runs when rows of its kind were swept, when a store marked it dirty, or on a
`full` collection (what `schedule_and_wait` asks for).
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, AsyncIterator, Callable, Iterable, NamedTuple

import structlog

from pycontainerd.core import errdefs

from .db import Dirty, MetadataDB, load_labels, now
from .leases import Lease, expiry

log = structlog.get_logger(__name__)

ROOT_LABEL = "containerd.io/gc.root"
CONTENT_REF_LABEL = "containerd.io/gc.ref.content"
SNAPSHOT_REF_PREFIX = "containerd.io/gc.ref.snapshot."
FLAT_LABEL = "containerd.io/gc.flat"


# -- the hooks on MetadataDB -----------------------------------------------------------------

def take_dirty(db: MetadataDB) -> Dirty:
    """The deletions marked since the last collection; the database's record is reset."""
    taken = Dirty(db.dirty.deletions, db.dirty.content, set(db.dirty.snapshotters))
    db.dirty = Dirty()
    return taken


def ingests_only_in(db: MetadataDB, namespace: str, lease_id: str) -> list[str]:
    """The refs of the ingests lease `lease_id` holds and no other lease of the namespace does."""
    rows = db.read("SELECT r.id FROM lease_resources r WHERE r.namespace = ? AND r.lease = ? AND r.type = 'ingests'"
                   " AND NOT EXISTS (SELECT 1 FROM lease_resources o WHERE o.namespace = r.namespace"
                   " AND o.type = 'ingests' AND o.id = r.id AND o.lease != r.lease)", (namespace, lease_id))
    return [r["id"] for r in rows]


def drop_unleased_ingests(db: MetadataDB, namespace: str, refs: Iterable[str]) -> int:
    """Delete the ingest rows among `refs` that no lease holds (any more): an ingest a lease held
    lives as long as the lease (ingests no lease ever held are roots, see above). The content
    backend's sweep then aborts their data. Returns how many rows went."""
    refs = list(refs)
    if not refs:
        return 0
    gone = 0
    with db.write() as cur:
        for ref in refs:
            if cur.execute("SELECT 1 FROM lease_resources WHERE namespace = ? AND type = 'ingests' AND id = ?",
                           (namespace, ref)).fetchone():
                continue
            gone += cur.execute("DELETE FROM ingests WHERE namespace = ? AND ref = ?", (namespace, ref)).rowcount
        if gone:
            db.mark_dirty(content=True)
    return gone


# -- nodes -------------------------------------------------------------------------------------

class Kind(enum.Enum):
    CONTENT = "content"
    SNAPSHOT = "snapshot"
    LEASE = "lease"
    INGEST = "ingest"
    CONTENT_FLAT = "content-flat"    # held by a flat lease: labels not followed
    SNAPSHOT_FLAT = "snapshot-flat"  # parents followed, labels not


_BASE = {Kind.CONTENT_FLAT: Kind.CONTENT, Kind.SNAPSHOT_FLAT: Kind.SNAPSHOT}


class Node(NamedTuple):
    """A resource in one namespace; a snapshot's key is "<snapshotter>/<key>"."""

    kind: Kind
    namespace: str
    key: str


def label_refs(namespace: str, labels: dict[str, str]) -> Iterable[Node]:
    """The content and snapshot nodes a label map references (containerd's sendLabelRefs)."""
    for key, value in sorted(labels.items()):
        if key.startswith(CONTENT_REF_LABEL):
            rest = key[len(CONTENT_REF_LABEL):]
            if rest == "" or rest[0] in "./":
                yield Node(Kind.CONTENT, namespace, value)
        elif key.startswith(SNAPSHOT_REF_PREFIX):
            snapshotter = key[len(SNAPSHOT_REF_PREFIX):].split("/", 1)[0]
            yield Node(Kind.SNAPSHOT, namespace, f"{snapshotter}/{value}")


def lease_expired(labels: dict[str, str], at: datetime) -> tuple[bool, datetime | None]:
    """(expired, expiry) for a lease's labels; an unparsable expiry never expires."""
    when = expiry(Lease("", labels))
    if when is None:
        return False, None
    return at > when, when


# -- the collector -----------------------------------------------------------------------------

@dataclass
class Stats:
    """What one collection did and how long its phases took (seconds)."""

    meta: float = 0.0
    content: float = 0.0
    snapshots: dict[str, float] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)
    """Rows and backend objects removed: leases, blobs, ingests, snapshots, backend blobs, and
    "snapshots/<snapshotter>" for backend snapshots."""
    next_expiry: datetime | None = None
    """The earliest expiry among the leases left, for the scheduler."""

    def elapsed(self) -> float:
        """The metadata phase, as containerd's GCStats.Elapsed (what pause_threshold paces)."""
        return self.meta


@dataclass
class Backend:
    """A backend to sweep, and the lock of the namespaced store over it (an object with an
    async `exclusive()` context manager; None when nothing writes through such a store)."""

    instance: Any
    lock: Any = None


@dataclass
class _Tables:
    """Every row the mark phase reads, loaded once per collection."""

    blobs: dict[tuple[str, str], dict[str, str]]                   # (ns, digest) -> labels
    snapshots: dict[tuple[str, str, str], tuple[str, dict[str, str]]]  # (ns, ss, key) -> (parent, labels)
    ingests: dict[tuple[str, str], str]                            # (ns, ref) -> expected


class Collector:
    """Mark and sweep over one MetadataDB and the backends behind it.

    content: returns the content Backend (None while there is none).
    snapshotters: returns the snapshotter Backends by snapshotter name.
    Both are asked at each collection, so backends that appear later are found."""

    def __init__(self, db: MetadataDB, content: Callable[[], Backend | None] = lambda: None,
                 snapshotters: Callable[[], dict[str, Backend]] = dict):
        self.db = db
        self._content = content
        self._snapshotters = snapshotters
        self._lock = asyncio.Lock()
        self.sweeping = False
        """True while the row sweep writes (the scheduler does not count that write)."""

    # -- mark ---------------------------------------------------------------------------------

    def _load(self, cur) -> _Tables:
        blobs = {(r["namespace"], r["digest"]): load_labels(r["labels"])
                 for r in cur.execute("SELECT namespace, digest, labels FROM blobs")}
        snapshots = {(r["namespace"], r["snapshotter"], r["key"]): (r["parent"], load_labels(r["labels"]))
                     for r in cur.execute("SELECT namespace, snapshotter, key, parent, labels FROM snapshots")}
        ingests = {(r["namespace"], r["ref"]): r["expected"]
                   for r in cur.execute("SELECT namespace, ref, expected FROM ingests")}
        return _Tables(blobs, snapshots, ingests)

    def roots(self, cur, tables: _Tables, at: datetime) -> tuple[list[Node], datetime | None]:
        """Every root node (see the module docstring), and the earliest expiry of a live lease."""
        roots: list[Node] = []
        next_expiry: datetime | None = None
        live: dict[tuple[str, str], bool] = {}  # (ns, lease) -> flat
        for r in cur.execute("SELECT namespace, id, labels FROM leases"):
            labels = load_labels(r["labels"])
            expired, when = lease_expired(labels, at)
            if expired:
                continue
            if when is not None and (next_expiry is None or when < next_expiry):
                next_expiry = when
            live[(r["namespace"], r["id"])] = FLAT_LABEL in labels
            roots.append(Node(Kind.LEASE, r["namespace"], r["id"]))
        leased_ingests: set[tuple[str, str]] = set()
        for r in cur.execute("SELECT namespace, lease, type, id FROM lease_resources"):
            ns, rtype, rid = r["namespace"], r["type"], r["id"]
            if rtype == "ingests":
                leased_ingests.add((ns, rid))
            flat = live.get((ns, r["lease"]))
            if flat is None:
                continue  # the lease expired
            if rtype == "content":
                roots.append(Node(Kind.CONTENT_FLAT if flat else Kind.CONTENT, ns, rid))
            elif rtype.startswith("snapshots/"):
                snapshotter = rtype[len("snapshots/"):]
                roots.append(Node(Kind.SNAPSHOT_FLAT if flat else Kind.SNAPSHOT, ns, f"{snapshotter}/{rid}"))
            elif rtype == "ingests":
                roots.append(Node(Kind.INGEST, ns, rid))
        for r in cur.execute("SELECT namespace, digest, labels FROM images"):
            roots.append(Node(Kind.CONTENT, r["namespace"], r["digest"]))
            roots.extend(label_refs(r["namespace"], load_labels(r["labels"])))
        for (ns, ref) in tables.ingests:
            if (ns, ref) not in leased_ingests:
                roots.append(Node(Kind.INGEST, ns, ref))
        for (ns, dgst), labels in tables.blobs.items():
            if ROOT_LABEL in labels:
                roots.append(Node(Kind.CONTENT, ns, dgst))
        for r in cur.execute("SELECT namespace, snapshotter, snapshot_key, labels FROM containers"):
            if r["snapshotter"]:
                roots.append(Node(Kind.SNAPSHOT, r["namespace"], f"{r['snapshotter']}/{r['snapshot_key']}"))
            roots.extend(label_refs(r["namespace"], load_labels(r["labels"])))
        for (ns, ss, key), (_, labels) in tables.snapshots.items():
            if ROOT_LABEL in labels:
                roots.append(Node(Kind.SNAPSHOT, ns, f"{ss}/{key}"))
        return roots, next_expiry

    @staticmethod
    def references(tables: _Tables, node: Node) -> Iterable[Node]:
        """The nodes `node` references (containerd's references())."""
        if node.kind is Kind.CONTENT:
            labels = tables.blobs.get((node.namespace, node.key))
            if labels:
                yield from label_refs(node.namespace, labels)
        elif node.kind in (Kind.SNAPSHOT, Kind.SNAPSHOT_FLAT):
            snapshotter, sep, key = node.key.partition("/")
            if not sep:
                return
            row = tables.snapshots.get((node.namespace, snapshotter, key))
            if row is None:
                return  # a dead edge
            parent, labels = row
            if parent:
                yield Node(node.kind, node.namespace, f"{snapshotter}/{parent}")
            if node.kind is Kind.SNAPSHOT:
                yield from label_refs(node.namespace, labels)
        elif node.kind is Kind.INGEST:
            expected = tables.ingests.get((node.namespace, node.key))
            if expected:
                yield Node(Kind.CONTENT, node.namespace, expected)

    def mark(self, cur, at: datetime | None = None) -> tuple[set[Node], datetime | None, _Tables]:
        """Every node reachable from the roots (flat kinds folded into their base kind), the next
        lease expiry, and the rows read. `cur` is a cursor inside the collection's transaction."""
        at = at or now()
        tables = self._load(cur)
        roots, next_expiry = self.roots(cur, tables, at)
        seen: set[Node] = set()
        reachable: set[Node] = set()
        grays = list(roots)
        while grays:
            node = grays.pop()
            if node in seen:
                continue
            seen.add(node)
            for ref in self.references(tables, node):
                if ref not in seen:
                    grays.append(ref)
            reachable.add(Node(_BASE.get(node.kind, node.kind), node.namespace, node.key))
        return reachable, next_expiry, tables

    # -- sweep ---------------------------------------------------------------------------------

    def sweep_rows(self, at: datetime | None = None) -> tuple[Stats, Dirty]:
        """Mark, then delete every lease, blob, ingest and snapshot row not reached, in one
        transaction. Returns the stats so far and what the backend sweeps must look at."""
        t0 = time.monotonic()
        stats = Stats()
        self.sweeping = True
        try:
            with self.db.write() as cur:
                marked, stats.next_expiry, tables = self.mark(cur, at)
                dead_leases = [(r["namespace"], r["id"]) for r in cur.execute("SELECT namespace, id FROM leases")
                               if Node(Kind.LEASE, r["namespace"], r["id"]) not in marked]
                dead_blobs = [k for k in tables.blobs if Node(Kind.CONTENT, *k) not in marked]
                dead_ingests = [k for k in tables.ingests if Node(Kind.INGEST, *k) not in marked]
                dead_snapshots = [k for k in tables.snapshots
                                  if Node(Kind.SNAPSHOT, k[0], f"{k[1]}/{k[2]}") not in marked]
                cur.executemany("DELETE FROM leases WHERE namespace = ? AND id = ?", dead_leases)
                cur.executemany("DELETE FROM blobs WHERE namespace = ? AND digest = ?", dead_blobs)
                cur.executemany("DELETE FROM ingests WHERE namespace = ? AND ref = ?", dead_ingests)
                cur.executemany("DELETE FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
                                dead_snapshots)
                dirty = take_dirty(self.db)
        finally:
            self.sweeping = False
        if dead_blobs or dead_ingests:
            dirty.content = True
        dirty.snapshotters.update(ss for _, ss, _ in dead_snapshots)
        for ns, lease_id in dead_leases:
            log.info("lease expired", namespace=ns, lease=lease_id)
        stats.removed = {"leases": len(dead_leases), "blobs": len(dead_blobs), "ingests": len(dead_ingests),
                         "snapshots": len(dead_snapshots)}
        stats.meta = time.monotonic() - t0
        return stats, dirty

    async def collect(self, full: bool = False) -> Stats:
        """One collection: the row sweep, then the backend sweeps that are due (all of them
        when `full`). Collections never overlap. A failing backend sweep is logged, as
        containerd does, and does not fail the collection."""
        async with self._lock:
            stats, dirty = self.sweep_rows()
            content = self._content() if (full or dirty.content) else None
            due = {name: backend for name, backend in (self._snapshotters() or {}).items()
                   if full or name in dirty.snapshotters}
            if content is not None:
                t0 = time.monotonic()
                try:
                    async with _exclusive(content.lock):
                        blobs, ingests = await self.sweep_content(content.instance)
                    stats.removed["backend blobs"], stats.removed["backend ingests"] = blobs, ingests
                except Exception:
                    log.warning("content garbage collection failed", exc_info=True)
                stats.content = time.monotonic() - t0
            for name, backend in sorted(due.items()):
                t0 = time.monotonic()
                try:
                    async with _exclusive(backend.lock):
                        stats.removed[f"snapshots/{name}"] = await self.sweep_snapshotter(name, backend.instance)
                except Exception:
                    log.warning("snapshot garbage collection failed", snapshotter=name, exc_info=True)
                stats.snapshots[name] = time.monotonic() - t0
            return stats

    async def sweep_content(self, backend: Any) -> tuple[int, int]:
        """Delete every backend blob no `blobs` row of any namespace names and no ingest expects,
        and abort every backend ingest no `ingests` row records (when the backend can list
        them). Returns (blobs, ingests) removed. Hold the content store's lock exclusively."""
        infos = await _maybe_await(backend.walk())
        seen = {r["digest"] for r in self.db.read("SELECT DISTINCT digest FROM blobs")}
        seen |= {r["expected"] for r in self.db.read("SELECT DISTINCT expected FROM ingests WHERE expected != ''")}
        blobs = 0
        for info in infos:
            dgst = _field(info, "digest")
            if not dgst or dgst in seen:
                continue
            try:
                await _maybe_await(backend.delete(dgst))
            except errdefs.NotFound:
                continue
            blobs += 1
            log.debug("removed content", digest=dgst)
        ingests = 0
        walk_refs = getattr(backend, "walk_status_refs", None)
        if walk_refs is not None and hasattr(backend, "abort"):
            from .content import backend_ref

            recorded = {backend_ref(r["namespace"], r["ref"])
                        for r in self.db.read("SELECT namespace, ref FROM ingests")}
            for ref in await _maybe_await(walk_refs()):
                if ref in recorded:
                    continue
                try:
                    await _maybe_await(backend.abort(ref))
                except errdefs.NotFound:
                    continue
                ingests += 1
                log.debug("cleanup aborting ingest", ref=ref)
        return blobs, ingests

    async def sweep_snapshotter(self, name: str, backend: Any) -> int:
        """Remove every backend snapshot of snapshotter `name` that no `snapshots` row names
        (as its backend_key), children before parents; then the backend's cleanup, when it has
        one. Returns how many were removed. Hold that snapshotter's store lock exclusively."""
        infos = await _maybe_await(backend.walk())
        seen = {r["backend_key"] for r in self.db.read(
            "SELECT backend_key FROM snapshots WHERE snapshotter = ?", (name,))}
        parents: dict[str, str] = {}
        for info in infos:
            parents[_field(info, "name")] = _field(info, "parent")
        parents.pop("", None)
        children: dict[str, list[str]] = {}
        for key, parent in parents.items():
            if parent in parents:
                children.setdefault(parent, []).append(key)
        removed = 0
        # children before parents: a post-order walk from the snapshots without a (known) parent
        stack = [(key, False) for key in sorted((k for k, p in parents.items() if p not in parents), reverse=True)]
        done: set[str] = set()
        while stack:
            key, expanded = stack.pop()
            if key in done:
                continue
            if not expanded:
                stack.append((key, True))
                stack.extend((c, False) for c in sorted(children.get(key, ()), reverse=True) if c not in done)
                continue
            done.add(key)
            if key in seen:
                continue
            try:
                await _maybe_await(backend.remove(key))
            except errdefs.FailedPrecondition as err:
                log.warning("failed to remove snapshot", snapshotter=name, key=key, error=str(err))
                continue
            except errdefs.NotFound:
                continue
            removed += 1
            log.debug("removed snapshot", snapshotter=name, key=key)
        cleanup = getattr(backend, "cleanup", None)
        if cleanup is not None:
            try:
                await _maybe_await(cleanup())
            except errdefs.Unimplemented:
                pass
        return removed


# -- helpers -----------------------------------------------------------------------------------

async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


@contextlib.asynccontextmanager
async def _exclusive(lock: Any) -> AsyncIterator[None]:
    if lock is None:
        yield
        return
    async with lock.exclusive():
        yield


def _field(info: Any, name: str) -> str:
    value = info.get(name) if isinstance(info, dict) else getattr(info, name, "")
    return str(value) if value else ""


__all__ = ["Backend", "Collector", "Kind", "Node", "Stats", "label_refs", "lease_expired", "take_dirty",
           "drop_unleased_ingests", "ingests_only_in",
           "ROOT_LABEL", "CONTENT_REF_LABEL", "SNAPSHOT_REF_PREFIX", "FLAT_LABEL"]
