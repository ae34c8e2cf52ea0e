"""The metadata database: one sqlite file (WAL) under the metadata plugin's root.

Owns the connection, the schema and its version (PRAGMA user_version), and the transaction
helper. Every update is one transaction: `with db.write() as cur:` commits on success and rolls
back on any exception, so a crash leaves the old state or the new one. Each store (namespaces,
leases, and later content, images, containers, snapshots) declares its tables as a migration step
and, when it holds per-namespace records, a NamespaceHolder so namespace deletion can refuse a
namespace that is not empty.

sqlite calls run on the event loop thread: with WAL and synchronous=NORMAL a commit is a write()
into the log (no fsync; checkpoints fsync), which costs less than a thread hop.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

MIGRATIONS: list[str] = [
    """
    CREATE TABLE namespaces (
        name TEXT PRIMARY KEY,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE leases (
        namespace TEXT NOT NULL REFERENCES namespaces(name),
        id TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL,
        PRIMARY KEY (namespace, id)
    );
    CREATE TABLE lease_resources (
        namespace TEXT NOT NULL,
        lease TEXT NOT NULL,
        type TEXT NOT NULL,
        id TEXT NOT NULL,
        PRIMARY KEY (namespace, lease, type, id),
        FOREIGN KEY (namespace, lease) REFERENCES leases(namespace, id) ON DELETE CASCADE
    );
    CREATE TABLE blobs (
        namespace TEXT NOT NULL REFERENCES namespaces(name),
        digest TEXT NOT NULL,
        size INTEGER NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (namespace, digest)
    );
    CREATE INDEX blobs_by_digest ON blobs(digest);
    CREATE TABLE ingests (
        namespace TEXT NOT NULL REFERENCES namespaces(name),
        ref TEXT NOT NULL,
        expected TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (namespace, ref)
    );
    CREATE TABLE images (
        namespace TEXT NOT NULL REFERENCES namespaces(name),
        name TEXT NOT NULL,
        media_type TEXT NOT NULL,
        digest TEXT NOT NULL,
        size INTEGER NOT NULL,
        annotations TEXT NOT NULL DEFAULT '{}',
        labels TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (namespace, name)
    );
    CREATE TABLE containers (
        namespace TEXT NOT NULL REFERENCES namespaces(name),
        id TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        image TEXT NOT NULL DEFAULT '',
        runtime_name TEXT NOT NULL,
        runtime_options BLOB,
        spec BLOB,
        snapshotter TEXT NOT NULL DEFAULT '',
        snapshot_key TEXT NOT NULL DEFAULT '',
        sandbox_id TEXT NOT NULL DEFAULT '',
        extensions BLOB,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (namespace, id)
    );
    CREATE TABLE snapshots (
        namespace TEXT NOT NULL REFERENCES namespaces(name),
        snapshotter TEXT NOT NULL,
        key TEXT NOT NULL,
        backend_key TEXT NOT NULL,
        parent TEXT NOT NULL DEFAULT '',
        kind INTEGER NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (namespace, snapshotter, key)
    );
    CREATE UNIQUE INDEX snapshots_by_backend_key ON snapshots(snapshotter, backend_key);
    """,
]
"""Schema steps, applied in order; the database's user_version counts the steps applied. A
released step is never edited: a change is a new step appended here."""

SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class NamespaceHolder:
    """A table with a `namespace` column whose rows keep a namespace from being deleted.

    With `per`, one entry per distinct value of that column, `what` formatted with it."""

    what: str
    table: str
    per: str = ""


OWNED_BY_NAMESPACE = ("lease_resources", "leases", "ingests")
"""Tables whose rows are removed together with their namespace."""


NAMESPACE_HOLDERS: list[NamespaceHolder] = [
    NamespaceHolder("images", "images"),
    NamespaceHolder("blobs", "blobs"),
    NamespaceHolder("containers", "containers"),
    NamespaceHolder('snapshots on "{}" snapshotter', "snapshots", per="snapshotter"),
]
"""As containerd: leases and ingests do not keep a namespace alive; they go with it."""


@dataclass
class Dirty:
    """Deletions since the last garbage collection, as `MetadataDB.mark_dirty` records them; the
    collector (plugins/metadata/gc.py) takes and resets them."""

    deletions: int = 0
    content: bool = False
    snapshotters: set[str] = field(default_factory=set)


def now() -> datetime:
    return datetime.now(timezone.utc)


def ts(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat()


def parse_ts(s: str) -> datetime:
    return datetime.fromisoformat(s)


def dump_labels(labels: dict[str, str] | None) -> str:
    return json.dumps(dict(labels or {}), sort_keys=True)


def load_labels(s: str) -> dict[str, str]:
    return json.loads(s) if s else {}


class MetadataDB:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.dirty = Dirty()
        self._mutation_callbacks: list[Callable[[bool], None]] = []
        self._in_write = False
        self._migrate()

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"metadata database {self.path} has schema version {version}, newer than this "
                               f"pycontainerd knows ({SCHEMA_VERSION}); refusing to touch it")
        for step in range(version, SCHEMA_VERSION):
            with self.write() as cur:
                for statement in MIGRATIONS[step].split(";"):
                    if statement.strip():
                        cur.execute(statement)
                cur.execute(f"PRAGMA user_version={step + 1}")

    @property
    def schema_version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Cursor]:
        """One write transaction: committed when the block ends, rolled back when it raises."""
        cur = self.conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        self._in_write = True
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        else:
            cur.execute("COMMIT")
        finally:
            self._in_write = False
            cur.close()
        self._notify_mutation()

    def register_mutation_callback(self, fn: Callable[[bool], None]) -> None:
        """Call `fn(dirty)` after every committed write, `dirty` telling whether a deletion was
        marked since the last collection (containerd's RegisterMutationCallback)."""
        self._mutation_callbacks.append(fn)

    def mark_dirty(self, *, content: bool = False, snapshotter: str = "") -> None:
        """A reference went away (see plugins/metadata/gc.py): call inside the deleting write, or
        after it (then the callbacks hear of it at once)."""
        self.dirty.deletions += 1
        self.dirty.content = self.dirty.content or content
        if snapshotter:
            self.dirty.snapshotters.add(snapshotter)
        if not self._in_write:
            self._notify_mutation()

    def _notify_mutation(self) -> None:
        dirty = self.dirty.deletions > 0
        for fn in list(self._mutation_callbacks):
            fn(dirty)

    def read(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        return self.conn.execute(sql, params).fetchall()

    def close(self) -> None:
        self.conn.close()

    @staticmethod
    def ensure_namespace(cur: sqlite3.Cursor, namespace: str) -> None:
        """Create `namespace` on first use, as containerd does for any write into a namespace."""
        stamp = ts(now())
        cur.execute("INSERT OR IGNORE INTO namespaces(name, labels, created_at, updated_at) VALUES (?, '{}', ?, ?)",
                    (namespace, stamp, stamp))

    @staticmethod
    def namespace_contents(cur: sqlite3.Cursor, namespace: str) -> list[str]:
        """What still lives in `namespace` (e.g. ["images", "leases"]), in holder order."""
        held = []
        for holder in NAMESPACE_HOLDERS:
            if holder.per:
                rows = cur.execute(f"SELECT DISTINCT {holder.per} FROM {holder.table} WHERE namespace = ? "
                                   f"ORDER BY {holder.per}", (namespace,)).fetchall()
                held += [holder.what.format(row[0]) for row in rows]
            elif cur.execute(f"SELECT 1 FROM {holder.table} WHERE namespace = ? LIMIT 1", (namespace,)).fetchone():
                held.append(holder.what)
        return held
