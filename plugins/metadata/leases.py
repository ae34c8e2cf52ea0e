"""Leases in the metadata database: records that keep content, ingests and snapshots from garbage
collection while a client works, with the resources they hold and the expiry label."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

import secrets
import time

from pycontainerd.core import digest, errdefs, filters, identifiers
from pycontainerd.core.identifiers import go_quote

from .db import MetadataDB, dump_labels, load_labels, now, parse_ts, ts

EXPIRE_LABEL = "containerd.io/gc.expire"


@dataclass
class Lease:
    id: str
    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None


@dataclass(frozen=True)
class Resource:
    id: str
    type: str


def check_resource(resource: Resource) -> Resource:
    """containerd's resource types: "content" (a digest), "ingests", "snapshots/<snapshotter>"."""
    kind, _, rest = resource.type.partition("/")
    if kind in ("content", "ingests"):
        if rest:
            raise errdefs.InvalidArgument(f"invalid resource type {resource.type}")
        if kind == "content":
            try:
                digest.parse(resource.id)
            except errdefs.InvalidArgument as e:
                raise errdefs.InvalidArgument(f"invalid content resource id {resource.id}: {e.message}") from e
    elif kind == "snapshots":
        if not rest or "/" in rest:
            raise errdefs.InvalidArgument(f"invalid snapshot resource type {resource.type}")
    else:
        raise errdefs.Unimplemented(f"resource type {resource.type} not supported yet")
    if not resource.id:
        raise errdefs.InvalidArgument("resource id must not be empty")
    return resource


def expiry(lease: Lease) -> datetime | None:
    """When the lease expires by its `containerd.io/gc.expire` label (RFC 3339), or None."""
    value = lease.labels.get(EXPIRE_LABEL)
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


MAX_LEASE_ID = 1024


def check_lease_id(lease_id: str) -> None:
    if len(lease_id) > MAX_LEASE_ID or not lease_id.isprintable():
        raise errdefs.InvalidArgument(f"lease id {go_quote(lease_id[:80])} must be printable and at most "
                                      f"{MAX_LEASE_ID} characters")


def random_id() -> str:
    """containerd's random lease id shape ("<nanoseconds>-<random>"), kept a valid identifier."""
    return f"{time.time_ns() % 1_000_000_000}-{secrets.token_hex(3)}"


class LeaseStore:
    def __init__(self, db: MetadataDB):
        self.db = db

    def create(self, namespace: str, lease_id: str, labels: dict[str, str] | None = None) -> Lease:
        """Create a lease; an empty id gets a random one as containerd's service gives.

        Lease ids are not identifiers: ctr makes them client-side as "<ns>-<base64url>", which may
        hold "_" or end in "-". Like containerd we take any id; ours must also be printable and
        bounded, since it never names a file."""
        lease_id = lease_id or random_id()
        check_lease_id(lease_id)
        labels = {k: v for k, v in (labels or {}).items() if v}
        identifiers.validate_labels(labels)
        with self.db.write() as cur:
            self.db.ensure_namespace(cur, namespace)
            if cur.execute("SELECT 1 FROM leases WHERE namespace = ? AND id = ?", (namespace, lease_id)).fetchone():
                raise errdefs.AlreadyExists(f"lease {go_quote(lease_id)}")
            cur.execute("INSERT INTO leases(namespace, id, labels, created_at) VALUES (?, ?, ?, ?)",
                        (namespace, lease_id, dump_labels(labels), ts(now())))
        return self._get(namespace, lease_id)

    def _get(self, namespace: str, lease_id: str) -> Lease:
        rows = self.db.read("SELECT * FROM leases WHERE namespace = ? AND id = ?", (namespace, lease_id))
        if not rows:
            raise errdefs.NotFound(f"lease {go_quote(lease_id)}")
        r = rows[0]
        return Lease(r["id"], load_labels(r["labels"]), parse_ts(r["created_at"]))

    def list(self, namespace: str, filter_strings: list[str] | tuple[str, ...] = ()) -> list[Lease]:
        match = filters.parse(*filter_strings)
        rows = self.db.read("SELECT * FROM leases WHERE namespace = ? ORDER BY created_at, id", (namespace,))
        leases = [Lease(r["id"], load_labels(r["labels"]), parse_ts(r["created_at"])) for r in rows]
        return [lease for lease in leases if match.match(filters.adaptor_for(id=lease.id, labels=lease.labels))]

    def delete(self, namespace: str, lease_id: str) -> None:
        with self.db.write() as cur:
            if cur.execute("DELETE FROM leases WHERE namespace = ? AND id = ?", (namespace, lease_id)).rowcount == 0:
                raise errdefs.NotFound(f"lease {go_quote(lease_id)}")

    def add_resource(self, namespace: str, lease_id: str, resource: Resource) -> None:
        check_resource(resource)
        with self.db.write() as cur:
            if not cur.execute("SELECT 1 FROM leases WHERE namespace = ? AND id = ?", (namespace, lease_id)).fetchone():
                raise errdefs.NotFound("lease does not exist")
            cur.execute("INSERT OR IGNORE INTO lease_resources(namespace, lease, type, id) VALUES (?, ?, ?, ?)",
                        (namespace, lease_id, resource.type, resource.id))

    def delete_resource(self, namespace: str, lease_id: str, resource: Resource) -> None:
        check_resource(resource)
        with self.db.write() as cur:
            if not cur.execute("SELECT 1 FROM leases WHERE namespace = ? AND id = ?", (namespace, lease_id)).fetchone():
                raise errdefs.NotFound("lease does not exist")
            cur.execute("DELETE FROM lease_resources WHERE namespace = ? AND lease = ? AND type = ? AND id = ?",
                        (namespace, lease_id, resource.type, resource.id))

    def list_resources(self, namespace: str, lease_id: str) -> list[Resource]:
        self._get(namespace, lease_id)
        rows = self.db.read("SELECT type, id FROM lease_resources WHERE namespace = ? AND lease = ? ORDER BY type, id",
                            (namespace, lease_id))
        return [Resource(r["id"], r["type"]) for r in rows]

    def delete_expired(self, at: datetime | None = None) -> list[tuple[str, str]]:
        """Remove every lease whose expiry label has passed; returns (namespace, id) of each."""
        at = at or now()
        expired = []
        for r in self.db.read("SELECT namespace, id, labels FROM leases WHERE labels LIKE ?", (f'%"{EXPIRE_LABEL}"%',)):
            when = expiry(Lease(r["id"], load_labels(r["labels"])))
            if when is not None and when <= at:
                expired.append((r["namespace"], r["id"]))
        if expired:
            with self.db.write() as cur:
                cur.executemany("DELETE FROM leases WHERE namespace = ? AND id = ?", expired)
        return expired
