"""Content in the metadata database: which namespace holds which blob (table `blobs`), which
ingests a namespace has open (table `ingests`), and the leases that keep them (table
`lease_resources`, types "content" and "ingests"), over the one backend blob store
(plugins/content/local.py), which knows no namespace.

Owns the namespaced view of content (containerd's metadata/content.go): a blob committed in
namespace A is not visible in B until B commits the same digest. Must not touch blob files itself:
every byte goes through the backend.

Semantics kept from containerd:
- Info/Update/Walk/Delete/ReaderAt see only the namespace's `blobs` rows; an unknown digest is
  NotFound "content digest <digest>". Delete removes the row only: the backend blob stays until
  the garbage collector finds no namespace referencing it.
- `writer(ns, ref, total, expected)`: if the namespace already has `expected`, AlreadyExists
  "content <digest>" (after adding it to the request's lease). With the "shared" policy (the
  default) and `expected` already in the backend (committed in another namespace) with the same
  size (or no size given), no backend ingest is opened: the writer reports offset = size, and a
  commit with nothing written just adds the row ("content exists in another namespace"). Bytes
  written to such a writer first copy the backend blob into a fresh ingest, so they are
  verified as any other. With "isolated", the client always sends every byte.
- Backend ingests are keyed `<namespace>/1/<ref>` (`backend_ref()`), containerd's key shape.
- The committed blob joins the request's lease ("content", digest) and the ingest leaves it
  ("ingests", ref); an open ingest joins the lease while it lives. A lease that does not exist
  is NotFound "lease does not exist". The namespace row is created on first write.
- One sqlite transaction per update; no transaction spans an await (the backend's slow work,
  fsync and hashing, happens before or after it).

For the garbage collector: `lock` is a shared/exclusive lock. Writer creation, commit, delete,
update and abort hold it shared; the collector must hold `lock.exclusive()` while it compares
the backend (`backend.walk()`, `backend.walk_status_refs()`) against the `blobs` / `ingests`
rows and calls `backend.delete(digest)` / `backend.abort(ref)`, so that a blob renamed into the
backend but not yet recorded is never swept. Ingest rows with a non-empty `expected` keep that
digest alive too (it may live only in another namespace). `on_dirty(fn)` registers a callback
run after each Delete (containerd marks the store dirty there to trigger a collection).
"""
from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime
from typing import Any, AsyncIterator, Callable, Mapping

import structlog

from pycontainerd.core import digest as digests
from pycontainerd.core import errdefs, filters, identifiers
from pycontainerd.core.identifiers import go_quote
from pycontainerd.plugins.content.local import (CHUNK, Info, LocalStore, ReaderAt, Status, Writer,
                                                adapt_info, adapt_status)

from .db import MetadataDB, dump_labels, load_labels, now, parse_ts, ts

log = structlog.get_logger(__name__)

SHARED, ISOLATED = "shared", "isolated"


def backend_ref(namespace: str, ref: str) -> str:
    """The backend ingest key of a namespace's ref (containerd's `<ns>/<seq>/<ref>`; the
    sequence of a fresh ingest bucket is always 1 there)."""
    return f"{namespace}/1/{ref}"


def validate_info_labels(labels: Mapping[str, str] | None) -> None:
    try:
        identifiers.validate_labels(labels)
    except errdefs.InvalidArgument as e:
        raise errdefs.InvalidArgument(f"info.Labels: {e.message}") from None


class SharedLock:
    """An asyncio lock with many shared holders or one exclusive holder (writer-preferring)."""

    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: not self._exclusive and not self._waiting_exclusive)
            self._shared += 1
        try:
            yield
        finally:
            async with cond:
                self._shared -= 1
                cond.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        cond = self._condition()
        async with cond:
            self._waiting_exclusive += 1
            try:
                await cond.wait_for(lambda: not self._exclusive and not self._shared)
            finally:
                self._waiting_exclusive -= 1
            self._exclusive = True
        try:
            yield
        finally:
            async with cond:
                self._exclusive = False
                cond.notify_all()


def _info(row) -> Info:
    return Info(row["digest"], row["size"], parse_ts(row["created_at"]), parse_ts(row["updated_at"]),
                load_labels(row["labels"]))


def _lease_add(cur, namespace: str, lease: str | None, kind: str, resource: str) -> bool:
    """Put a resource in the request's lease (no lease: nothing to do, False)."""
    if not lease:
        return False
    if not cur.execute("SELECT 1 FROM leases WHERE namespace = ? AND id = ?", (namespace, lease)).fetchone():
        raise errdefs.NotFound("lease does not exist")
    cur.execute("INSERT OR IGNORE INTO lease_resources(namespace, lease, type, id) VALUES (?, ?, ?, ?)",
                (namespace, lease, kind, resource))
    return True


def _lease_remove(cur, namespace: str, lease: str | None, kind: str, resource: str) -> None:
    if lease:
        cur.execute("DELETE FROM lease_resources WHERE namespace = ? AND lease = ? AND type = ? AND id = ?",
                    (namespace, lease, kind, resource))


class ContentStore:
    """The namespaced content store. Every method takes the namespace explicitly and, where
    containerd consults the request's lease, a `lease` (None: no lease)."""

    def __init__(self, db: MetadataDB, backend: LocalStore, policy: str = SHARED):
        if policy not in (SHARED, ISOLATED):
            raise errdefs.InvalidArgument(f"content sharing policy {policy!r}: must be 'shared' or 'isolated'")
        self.db = db
        self.backend = backend
        self.shared = policy == SHARED
        self.lock = SharedLock()
        self.dirty = 0
        self._dirty_callbacks: list[Callable[[], Any]] = []

    def on_dirty(self, fn: Callable[[], Any]) -> None:
        """Call `fn()` after every Delete (the garbage collector's trigger)."""
        self._dirty_callbacks.append(fn)

    def _mark_dirty(self) -> None:
        self.dirty += 1
        for fn in list(self._dirty_callbacks):
            try:
                fn()
            except Exception:
                log.warning("content dirty callback failed", exc_info=True)

    # -- blobs -------------------------------------------------------------------------------

    def _row(self, namespace: str, digest: str):
        rows = self.db.read("SELECT * FROM blobs WHERE namespace = ? AND digest = ?", (namespace, digest))
        return rows[0] if rows else None

    def has(self, namespace: str, digest: str) -> bool:
        """True when the namespace holds the digest."""
        return self._row(namespace, digest) is not None

    def info(self, namespace: str, digest: str) -> Info:
        row = self._row(namespace, digest)
        if row is None:
            raise errdefs.NotFound(f"content digest {digest}")
        return _info(row)

    async def update(self, namespace: str, info: Info, paths: list[str] | tuple[str, ...] = ()) -> Info:
        """Labels only: all of them (no paths, or "labels") or `labels.<key>` paths (an empty
        value removes the key). Any other path is InvalidArgument."""
        async with self.lock.shared():
            with self.db.write() as cur:
                row = cur.execute("SELECT * FROM blobs WHERE namespace = ? AND digest = ?",
                                  (namespace, info.digest)).fetchone()
                if row is None:
                    raise errdefs.NotFound(f"content digest {info.digest}")
                updated = _info(row)
                given = info.labels or {}
                if paths:
                    for path in paths:
                        if path.startswith("labels."):
                            key = path[len("labels."):]
                            updated.labels[key] = given.get(key, "")
                        elif path == "labels":
                            updated.labels = dict(given)
                        else:
                            raise errdefs.InvalidArgument(
                                f"cannot update {go_quote(path)} field on content info {go_quote(info.digest)}")
                else:
                    updated.labels = dict(given)
                validate_info_labels(updated.labels)
                updated.labels = {k: v for k, v in updated.labels.items() if v}
                updated.updated_at = now()
                cur.execute("UPDATE blobs SET labels = ?, updated_at = ? WHERE namespace = ? AND digest = ?",
                            (dump_labels(updated.labels), ts(updated.updated_at), namespace, info.digest))
        return updated

    def walk(self, namespace: str, *filter_strings: str) -> list[Info]:
        """The namespace's blobs matching the filters (`digest`, `labels.<key>`), by digest."""
        match = filters.parse(*filter_strings)
        rows = self.db.read("SELECT * FROM blobs WHERE namespace = ? ORDER BY digest", (namespace,))
        infos = (_info(r) for r in rows)
        return [info for info in infos if match.match(adapt_info(info))]

    async def delete(self, namespace: str, digest: str, lease: str | None = None) -> None:
        """Forget the blob in this namespace (and in the request's lease); the bytes stay in the
        backend until garbage collection."""
        async with self.lock.shared():
            with self.db.write() as cur:
                if cur.execute("DELETE FROM blobs WHERE namespace = ? AND digest = ?",
                               (namespace, digest)).rowcount == 0:
                    raise errdefs.NotFound(f"content digest {digest}")
                _lease_remove(cur, namespace, lease, "content", digest)
        self._mark_dirty()

    async def reader(self, namespace: str, digest: str) -> ReaderAt:
        """A ReaderAt on a blob the namespace holds."""
        if self._row(namespace, digest) is None:
            raise errdefs.NotFound(f"content digest {digest}")
        return await self.backend.reader(digest)

    async def read(self, namespace: str, digest: str, offset: int = 0, size: int = -1) -> bytes:
        """A blob's bytes (or a range of them) in one piece."""
        with await self.reader(namespace, digest) as ra:
            n = ra.size - offset if size < 0 else size
            return await ra.read_at(offset, n)

    # -- ingests -----------------------------------------------------------------------------

    def _ingest_row(self, namespace: str, ref: str):
        rows = self.db.read("SELECT * FROM ingests WHERE namespace = ? AND ref = ?", (namespace, ref))
        return rows[0] if rows else None

    async def writer(self, namespace: str, ref: str, total: int = 0, expected: str = "",
                     lease: str | None = None) -> "NamespacedWriter":
        """Open or resume the namespace's ingest `ref` (see the module docstring)."""
        if not ref:
            raise errdefs.InvalidArgument("ref must not be empty")
        if expected:
            digests.parse(expected)
        async with self.lock.shared():
            shared = False
            if expected:
                if self._row(namespace, expected) is not None:
                    with self.db.write() as cur:
                        _lease_add(cur, namespace, lease, "content", expected)
                    raise errdefs.AlreadyExists(f"content {expected}")
                if self.shared and self.backend.exists(expected):
                    try:
                        size = self.backend.info_sync(expected).size
                    except errdefs.NotFound:
                        size = -1
                    if size >= 0 and (total == 0 or total == size):
                        shared, total = True, size
            bref = backend_ref(namespace, ref)
            backend_writer = None
            if not shared:
                # The expected digest is not passed down: the blob must be committed in this
                # namespace before it counts here. Its algorithm still picks the running hash.
                backend_writer = await self.backend.writer(
                    bref, total, algorithm=expected.partition(":")[0] if expected else "")
            try:
                with self.db.write() as cur:
                    self.db.ensure_namespace(cur, namespace)
                    cur.execute("INSERT INTO ingests(namespace, ref, expected) VALUES (?, ?, ?) "
                                "ON CONFLICT(namespace, ref) DO NOTHING", (namespace, ref, ""))
                    if shared:
                        cur.execute("UPDATE ingests SET expected = ? WHERE namespace = ? AND ref = ?",
                                    (expected, namespace, ref))
                    _lease_add(cur, namespace, lease, "ingests", ref)
            except BaseException:
                if backend_writer is not None:
                    await backend_writer.close()
                raise
        return NamespacedWriter(self, namespace, ref, bref, backend_writer, total,
                                expected if shared else "", lease)

    async def status(self, namespace: str, ref: str) -> Status:
        row = self._ingest_row(namespace, ref)
        if row is None:
            raise errdefs.NotFound(f"reference {ref}")
        status = await self.backend.status(backend_ref(namespace, ref))
        status.ref = ref
        return status

    async def list_statuses(self, namespace: str, *filter_strings: str) -> list[Status]:
        match = filters.parse(*filter_strings)
        rows = self.db.read("SELECT ref FROM ingests WHERE namespace = ? ORDER BY ref", (namespace,))
        found = []
        for row in rows:
            try:
                status = await self.backend.status(backend_ref(namespace, row["ref"]))
            except errdefs.NotFound:
                continue
            status.ref = row["ref"]
            if match.match(adapt_status(status)):
                found.append(status)
        return found

    async def abort(self, namespace: str, ref: str, lease: str | None = None) -> None:
        """Drop the namespace's ingest and, unless it only borrowed a shared blob, its backend
        data. A backend ingest that is already gone is not an error here (the row still goes)."""
        async with self.lock.shared():
            with self.db.write() as cur:
                row = cur.execute("SELECT expected FROM ingests WHERE namespace = ? AND ref = ?",
                                  (namespace, ref)).fetchone()
                if row is None:
                    raise errdefs.NotFound(f"reference {ref}")
                cur.execute("DELETE FROM ingests WHERE namespace = ? AND ref = ?", (namespace, ref))
                _lease_remove(cur, namespace, lease, "ingests", ref)
            if not row["expected"]:
                try:
                    await self.backend.abort(backend_ref(namespace, ref))
                except errdefs.NotFound:
                    pass


class NamespacedWriter:
    """A writer in one namespace: a backend Writer, or none yet when it borrows a blob shared
    from another namespace (see ContentStore.writer)."""

    def __init__(self, store: ContentStore, namespace: str, ref: str, bref: str, writer: Writer | None,
                 size: int, shared_digest: str, lease: str | None):
        self.store, self.namespace, self.ref, self.bref = store, namespace, ref, bref
        self._w = writer
        self._size = size
        self._shared_digest = shared_digest
        self.lease = lease
        self._started = now()

    def status(self) -> Status:
        if self._w is not None:
            st = self._w.status()
            st.ref = self.ref
            return st
        return Status(ref=self.ref, offset=self._size, total=self._size, expected=self._shared_digest,
                      started_at=self._started, updated_at=self._started)

    def digest(self) -> str:
        return self._w.digest() if self._w is not None else self._shared_digest

    async def write(self, data: bytes | memoryview) -> int:
        if self._w is None:
            if not data:
                return 0
            await self._create_and_copy(self._size)
        assert self._w is not None
        return await self._w.write(data)

    async def truncate(self, size: int) -> None:
        if self._w is not None:
            await self._w.truncate(size)
            return
        await self._create_and_copy(size)

    async def _create_and_copy(self, size: int) -> None:
        """Stop borrowing: open a backend ingest and copy the shared blob's first `size` bytes."""
        w = await self.store.backend.writer(self.bref, self._size,
                                            algorithm=self._shared_digest.partition(":")[0])
        try:
            if size > 0:
                with await self.store.backend.reader(self._shared_digest) as ra:
                    async for chunk in ra.chunks(w.offset, size - w.offset, CHUNK):
                        await w.write(chunk)
                if w.offset < size:
                    raise errdefs.Unknown("failed to copy: unexpected EOF")
        except BaseException:
            await w.close()
            raise
        self._w = w

    async def commit(self, size: int = 0, expected: str = "", labels: Mapping[str, str] | None = None) -> str:
        """Commit into the namespace; the digest. AlreadyExists when the namespace has it
        already (the ingest is gone all the same)."""
        labels = dict(labels or {})
        try:
            validate_info_labels(labels)
        except errdefs.InvalidArgument:
            await self.close()
            raise
        store = self.store
        async with store.lock.shared():
            if self._w is None:
                if size != 0 and size != self._size:
                    raise errdefs.FailedPrecondition(
                        f"{go_quote(self.ref)} failed size validation: {self._size} != {size}")
                if expected and expected != self._shared_digest:
                    raise errdefs.FailedPrecondition(f"{go_quote(self.ref)} unexpected digest")
                size, actual = self._size, self._shared_digest
            else:
                offset = self._w.offset
                if size != 0 and size != offset:
                    await self._w.close()
                    raise errdefs.FailedPrecondition(
                        f"{go_quote(self.ref)} failed size validation: {offset} != {size}")
                size = offset
                try:
                    actual = await self._w.commit(size, expected)
                except errdefs.AlreadyExists as e:
                    actual = getattr(e, "digest", "") or self._w.digest()
            inner = None
            stamp = ts(now())
            with store.db.write() as cur:
                store.db.ensure_namespace(cur, self.namespace)
                if cur.execute("SELECT 1 FROM blobs WHERE namespace = ? AND digest = ?",
                               (self.namespace, actual)).fetchone():
                    inner = errdefs.AlreadyExists(f"content {actual}")
                else:
                    cur.execute("INSERT INTO blobs(namespace, digest, size, labels, created_at, updated_at) "
                                "VALUES (?, ?, ?, ?, ?, ?)",
                                (self.namespace, actual, size, dump_labels(
                                    {k: v for k, v in labels.items() if v}), stamp, stamp))
                cur.execute("DELETE FROM ingests WHERE namespace = ? AND ref = ?", (self.namespace, self.ref))
                _lease_remove(cur, self.namespace, self.lease, "ingests", self.ref)
                _lease_add(cur, self.namespace, self.lease, "content", actual)
        if inner is not None:
            raise inner
        return actual

    async def close(self) -> None:
        """Keep the ingest for a later resume (no-op after commit)."""
        if self._w is not None:
            await self._w.close()
