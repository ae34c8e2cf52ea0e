"""The metastore of a local snapshotter backend (containerd's snapshots/storage): one sqlite file
in the backend's root mapping each key to a numeric id (the directory name on disk), its parent,
kind, labels, timestamps and, once committed, its usage.

Owns the schema and the rules of the key space: keys and names share it, a parent must be
committed, ids are never reused, commit keeps the id and moves the record to the new name,
a snapshot with children cannot be removed. It knows nothing of directories or mounts: the
backend does its filesystem work inside `transaction()` so a failure rolls the record back.

Blocking (sqlite): backends call it from worker threads. One connection, one lock: every
transaction holds the lock from BEGIN to COMMIT.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from pycontainerd.core import errdefs
from pycontainerd.core.identifiers import go_quote

from .base import Info, Kind, Usage, adaptor, apply_label_update, clean_labels, match

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    key TEXT PRIMARY KEY,
    id INTEGER NOT NULL UNIQUE,
    parent TEXT NOT NULL DEFAULT '',
    kind INTEGER NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_by_parent ON snapshots(parent);
CREATE TABLE IF NOT EXISTS sequence (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


@dataclass
class Snapshot:
    """A snapshot's id and its ancestors' ids, nearest first (what mounts are built from)."""

    id: str
    kind: Kind
    parent_ids: list[str] = field(default_factory=list)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _ts(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat()


def _info(row: sqlite3.Row) -> Info:
    return Info(name=row["key"], kind=Kind(row["kind"]), parent=row["parent"],
                labels=json.loads(row["labels"] or "{}"),
                created=datetime.fromisoformat(row["created_at"]),
                updated=datetime.fromisoformat(row["updated_at"]))


class Tx:
    """The operations of one transaction (see MetaStore.transaction / MetaStore.read)."""

    def __init__(self, cur: sqlite3.Cursor):
        self.cur = cur

    def _row(self, key: str) -> sqlite3.Row | None:
        return self.cur.execute("SELECT * FROM snapshots WHERE key = ?", (key,)).fetchone()

    def _next_id(self) -> int:
        row = self.cur.execute("SELECT value FROM sequence WHERE name = 'snapshots'").fetchone()
        value = (row["value"] if row else 0) + 1
        self.cur.execute("INSERT INTO sequence(name, value) VALUES ('snapshots', ?) "
                         "ON CONFLICT(name) DO UPDATE SET value = excluded.value", (value,))
        return value

    def _parent_ids(self, parent: str) -> list[str]:
        ids = []
        seen = set()
        while parent:
            row = self._row(parent)
            if row is None:
                raise errdefs.NotFound("missing parent")
            if parent in seen:  # a cycle would be corruption; never loop forever
                raise errdefs.Unknown(f"parent chain of {go_quote(parent)} loops")
            seen.add(parent)
            ids.append(str(row["id"]))
            parent = row["parent"]
        return ids

    def exists(self, key: str) -> bool:
        return self._row(key) is not None

    def get_info(self, key: str) -> tuple[str, Info, Usage]:
        """(id, info, stored usage) of `key`; NotFound when absent."""
        row = self._row(key)
        if row is None:
            raise errdefs.NotFound(f"snapshot {key} does not exist")
        return str(row["id"]), _info(row), Usage(row["size"], row["inodes"])

    def get_snapshot(self, key: str) -> Snapshot:
        """The id and parent ids of an active or view snapshot (FailedPrecondition otherwise)."""
        row = self._row(key)
        if row is None:
            raise errdefs.NotFound(f"snapshot {key} does not exist")
        kind = Kind(row["kind"])
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise errdefs.FailedPrecondition(f"requested snapshot {key} not active or view")
        return Snapshot(str(row["id"]), kind, self._parent_ids(row["parent"]))

    def check_parent(self, parent: str) -> str:
        """The id of committed snapshot `parent`: NotFound / InvalidArgument otherwise."""
        row = self._row(parent)
        if row is None:
            raise errdefs.NotFound(f"missing parent {go_quote(parent)} bucket")
        if row["kind"] != Kind.COMMITTED:
            raise errdefs.InvalidArgument(f"parent {go_quote(parent)} is not committed snapshot")
        return str(row["id"])

    def create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None) -> Snapshot:
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise errdefs.InvalidArgument(
                f"snapshot type {kind} invalid; only snapshots of type Active or View can be created")
        parent_ids: list[str] = []
        if parent:
            self.check_parent(parent)
        if self._row(key) is not None:
            raise errdefs.AlreadyExists(f"snapshot {key}")
        if parent:
            parent_ids = self._parent_ids(parent)
        sid = self._next_id()
        stamp = _ts(_now())
        self.cur.execute(
            "INSERT INTO snapshots(key, id, parent, kind, labels, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, sid, parent, int(kind), json.dumps(clean_labels(labels), sort_keys=True), stamp, stamp))
        return Snapshot(str(sid), kind, parent_ids)

    def commit_active(self, key: str, name: str, usage: Usage, labels: Mapping[str, str] | None) -> str:
        """Move active `key` to committed `name` (same id, labels replaced); returns the id."""
        if self._row(name) is not None:
            raise errdefs.AlreadyExists(f"committed snapshot {name}")
        row = self._row(key)
        if row is None:
            raise errdefs.NotFound(f"failed to get active snapshot {go_quote(key)}")
        if row["kind"] != Kind.ACTIVE:
            raise errdefs.FailedPrecondition(f"snapshot {go_quote(key)} is not active")
        stamp = _ts(_now())
        self.cur.execute("DELETE FROM snapshots WHERE key = ?", (key,))
        self.cur.execute(
            "INSERT INTO snapshots(key, id, parent, kind, labels, created_at, updated_at, size, inodes) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (name, row["id"], row["parent"], int(Kind.COMMITTED), json.dumps(clean_labels(labels), sort_keys=True),
             stamp, stamp, usage.size, usage.inodes))
        return str(row["id"])

    def remove(self, key: str) -> tuple[str, Kind]:
        """Delete `key`'s record (FailedPrecondition when it has children); (id, kind)."""
        row = self._row(key)
        if row is None:
            raise errdefs.NotFound(f"snapshot {key}")
        if self.cur.execute("SELECT 1 FROM snapshots WHERE parent = ? LIMIT 1", (key,)).fetchone():
            raise errdefs.FailedPrecondition("cannot remove snapshot with child")
        self.cur.execute("DELETE FROM snapshots WHERE key = ?", (key,))
        return str(row["id"]), Kind(row["kind"])

    def update(self, info: Info, fieldpaths: Sequence[str]) -> Info:
        row = self._row(info.name)
        if row is None:
            raise errdefs.NotFound("snapshot does not exist")
        current = _info(row)
        labels = apply_label_update(current.labels, info, fieldpaths)
        stamp = _now()
        self.cur.execute("UPDATE snapshots SET labels = ?, updated_at = ? WHERE key = ?",
                         (json.dumps(labels, sort_keys=True), _ts(stamp), info.name))
        current.labels, current.updated = labels, stamp
        return current

    def walk(self, filter_strings: Sequence[str] = ()) -> list[tuple[str, Info]]:
        """(id, info) of every snapshot matching the filters, ordered by key (bytewise)."""
        flt = match(filter_strings)
        out = []
        for row in self.cur.execute("SELECT * FROM snapshots ORDER BY key").fetchall():
            info = _info(row)
            if flt.match(adaptor(info)):
                out.append((str(row["id"]), info))
        return out

    def id_map(self) -> dict[str, str]:
        """id -> key of every snapshot (what a directory scan compares against)."""
        return {str(r["id"]): r["key"] for r in self.cur.execute("SELECT id, key FROM snapshots").fetchall()}


class MetaStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        with self.transaction() as tx:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    tx.cur.execute(statement)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        """A write transaction: committed when the block ends, rolled back when it raises."""
        with self._lock:
            cur = self.conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(cur)
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")
            finally:
                cur.close()

    @contextlib.contextmanager
    def read(self) -> Iterator[Tx]:
        """A read-only, consistent view."""
        with self._lock:
            cur = self.conn.cursor()
            cur.execute("BEGIN")
            try:
                yield Tx(cur)
            finally:
                cur.execute("ROLLBACK")
                cur.close()

    @property
    def lock(self) -> threading.RLock:
        """Held by every transaction; a backend holds it across work that must not interleave
        with other transactions (e.g. scanning directories against the id map)."""
        return self._lock

    def close(self) -> None:
        with self._lock:
            self.conn.close()
