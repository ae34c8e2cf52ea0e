"""Namespaces in the metadata database: create, get, list, label updates, delete-when-empty."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime

from pycontainerd.core import errdefs, identifiers
from pycontainerd.core.identifiers import go_quote

from .db import OWNED_BY_NAMESPACE, MetadataDB, dump_labels, load_labels, now, parse_ts, ts


@dataclass
class Namespace:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None


def _row(row) -> Namespace:
    return Namespace(row["name"], load_labels(row["labels"]), parse_ts(row["created_at"]), parse_ts(row["updated_at"]))


class NamespaceStore:
    def __init__(self, db: MetadataDB):
        self.db = db
        # list() keeps what it read until the next committed write to the database (any store's:
        # writing into a namespace creates it), so a busy Namespaces.List does not query and parse
        # the same rows on every call.
        self._listed: list[Namespace] | None = None
        self._writes = 0
        db.register_mutation_callback(self._forget_listed)

    def _forget_listed(self, _dirty: bool) -> None:
        self._writes += 1
        self._listed = None

    def create(self, name: str, labels: dict[str, str] | None = None) -> Namespace:
        identifiers.validate(name)
        labels = {k: v for k, v in (labels or {}).items() if v}
        identifiers.validate_labels(labels)
        stamp = ts(now())
        with self.db.write() as cur:
            if cur.execute("SELECT 1 FROM namespaces WHERE name = ?", (name,)).fetchone():
                raise errdefs.AlreadyExists(f"namespace {go_quote(name)}")
            cur.execute("INSERT INTO namespaces(name, labels, created_at, updated_at) VALUES (?, ?, ?, ?)",
                        (name, dump_labels(labels), stamp, stamp))
        return self.get(name)

    def get(self, name: str) -> Namespace:
        rows = self.db.read("SELECT * FROM namespaces WHERE name = ?", (name,))
        if not rows:
            raise errdefs.NotFound(f"namespace {go_quote(name)}")
        return _row(rows[0])

    def list(self) -> list[Namespace]:
        listed = self._listed
        if listed is None:
            writes = self._writes
            listed = [_row(r) for r in self.db.read("SELECT * FROM namespaces ORDER BY name")]
            if writes == self._writes:  # no write (from another thread) committed meanwhile
                self._listed = listed
        return [replace(ns, labels=dict(ns.labels)) for ns in listed]

    def update(self, name: str, labels: dict[str, str], paths: list[str]) -> Namespace:
        """Replace the labels, or only the `labels.KEY` paths given (an absent or empty value deletes)."""
        with self.db.write() as cur:
            row = cur.execute("SELECT labels FROM namespaces WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise errdefs.NotFound(f"namespace {go_quote(name)}")
            current = load_labels(row["labels"])
            if not paths:
                current = dict(labels)
            for path in paths:
                if path == "labels":
                    current = dict(labels)
                elif path.startswith("labels."):
                    key = path[len("labels."):]
                    if labels.get(key):
                        current[key] = labels[key]
                    else:
                        current.pop(key, None)
                else:
                    raise errdefs.InvalidArgument(f"cannot update {go_quote(path)} field on namespace {go_quote(name)}")
            current = {k: v for k, v in current.items() if v}
            identifiers.validate_labels(current)
            cur.execute("UPDATE namespaces SET labels = ?, updated_at = ? WHERE name = ?",
                        (dump_labels(current), ts(now()), name))
        return self.get(name)

    def delete(self, name: str) -> None:
        with self.db.write() as cur:
            if not cur.execute("SELECT 1 FROM namespaces WHERE name = ?", (name,)).fetchone():
                raise errdefs.NotFound(f"namespace {go_quote(name)}")
            held = self.db.namespace_contents(cur, name)
            if held:
                raise errdefs.FailedPrecondition(
                    f"namespace {go_quote(name)} must be empty, but it still has {', '.join(held)}")
            for table in OWNED_BY_NAMESPACE:
                cur.execute(f"DELETE FROM {table} WHERE namespace = ?", (name,))
            cur.execute("DELETE FROM namespaces WHERE name = ?", (name,))
