"""The snapshotter contract (containerd's snapshots.Snapshotter) and its plain types.

Owns `Kind`, `Info`, `Usage`, the abstract `Snapshotter` every backend implements (overlayfs,
native, proxy) and the namespaced layer presents too, and the small rules they share: which
labels a backend inherits, label updates by field path, the Walk filter adaptor, key checks.
Imports no other plugin module, so the metadata layer and the backends can both import it.

Terms (as containerd's): `key` names an active or view snapshot, `name` a committed one, and
both live in one key space per snapshotter. Prepare/View create an active/view snapshot on a
committed parent ("" for none); Commit turns an active snapshot into a committed one under a
new name (the key goes away); Remove refuses a snapshot that has children (FailedPrecondition).

Errors (core.errdefs): AlreadyExists for a key or name in use, NotFound for a missing key,
parent or name, InvalidArgument for a parent that is not committed, an empty key, an update of
an immutable field or bad labels, FailedPrecondition for committing a snapshot that is not
active, for Mounts on a committed snapshot and for removing a snapshot with children.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Iterable, Mapping, Sequence

from pycontainerd.core import errdefs, filters, identifiers
from pycontainerd.core.mount import Mount

INHERITED_LABELS_PREFIX = "containerd.io/snapshot/"
LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"
"""With Prepare: the committed name the caller is about to create (unpack sets it to the chain
id); the namespaced layer answers AlreadyExists at once when it exists already."""
LABEL_UPPERDIR = "containerd.io/snapshot/overlay.upperdir"
"""Set by the overlayfs backend on Stat/Update/Walk when its `upperdir_label` config is on."""
GC_ROOT_LABEL = "containerd.io/gc.root"

UNPACK_KEY_PREFIX = "extract"


class Kind(enum.IntEnum):
    """Snapshot kinds, numbered as the snapshots API's enum (and containerd's Kind)."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    def __str__(self) -> str:  # "View", "Active", "Committed" as ctr prints them
        return self.name.capitalize()

    @classmethod
    def parse(cls, s: str) -> "Kind":
        return {"view": cls.VIEW, "active": cls.ACTIVE, "committed": cls.COMMITTED}.get(s.lower(), cls.UNKNOWN)

    @property
    def filter_name(self) -> str:
        return {Kind.VIEW: "view", Kind.ACTIVE: "active", Kind.COMMITTED: "committed"}.get(self, "")


@dataclass
class Info:
    """What Stat, Update and Walk return. `parent` is a committed snapshot's name or ""."""

    name: str
    kind: Kind = Kind.UNKNOWN
    parent: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    created: datetime | None = None
    updated: datetime | None = None

    def copy(self) -> "Info":
        return replace(self, labels=dict(self.labels))


@dataclass
class Usage:
    """Disk used by the snapshot itself (not its parents): bytes and inodes."""

    size: int = 0
    inodes: int = 0


class Snapshotter:
    """The contract. Every method is a coroutine; blocking work runs off the event loop.

    Backends (overlayfs, native, proxy) implement it over their own store; the namespaced layer
    (plugins/metadata/snapshots.py) implements it again on top of a backend, per namespace.

    `gc_lock` (set on backends by the snapshots service) is the namespaced layer's lock: GC holds
    its `exclusive()` side while it sweeps the backend.
    """

    gc_lock = None

    async def stat(self, key: str) -> Info:
        raise NotImplementedError

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        """Change the mutable fields of `info.name`: "labels" (all of them) or "labels.KEY"
        (one; an absent or empty value removes it); no paths replaces every label."""
        raise NotImplementedError

    async def usage(self, key: str) -> Usage:
        raise NotImplementedError

    async def mounts(self, key: str) -> list[Mount]:
        """The mounts of an active or view snapshot."""
        raise NotImplementedError

    async def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        raise NotImplementedError

    async def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        raise NotImplementedError

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        raise NotImplementedError

    async def remove(self, key: str) -> None:
        raise NotImplementedError

    async def walk(self, filter_strings: Sequence[str] = ()) -> list[Info]:
        """Every snapshot matching any of the filters (fields: name, parent, kind
        (active|view|committed), labels.KEY), ordered by name."""
        raise NotImplementedError

    async def cleanup(self) -> None:
        """Free disk space of removed snapshots (containerd's Cleaner); Unimplemented when the
        snapshotter has nothing to clean up later."""
        raise errdefs.Unimplemented("snapshotter does not implement Cleanup method")

    async def close(self) -> None:
        return None


# -- shared rules ----------------------------------------------------------------------------

def filter_inherited_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    """The labels a backend keeps: `containerd.io/snapshot/...` and `containerd.io/snapshot.ref`."""
    return {k: v for k, v in (labels or {}).items()
            if k == LABEL_SNAPSHOT_REF or k.startswith(INHERITED_LABELS_PREFIX)}


def clean_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    """Labels as stored: empty values dropped (containerd never writes them)."""
    return {k: v for k, v in (labels or {}).items() if v}


def validate_labels(labels: Mapping[str, str] | None) -> None:
    """containerd's validateSnapshot: each label within 4096 bytes; InvalidArgument otherwise."""
    try:
        identifiers.validate_labels(labels)
    except errdefs.InvalidArgument as e:
        raise errdefs.InvalidArgument(f"info.Labels: {e.message}") from None


def check_key(key: str, what: str = "key") -> str:
    """Keys are free-form strings (never paths) but must not be empty."""
    if not isinstance(key, str) or not key:
        raise errdefs.InvalidArgument(f"snapshot {what} must not be empty")
    return key


def apply_label_update(current: Mapping[str, str], info: Info, fieldpaths: Sequence[str]) -> dict[str, str]:
    """The labels after an Update of `info.name` with `fieldpaths` (containerd's rules)."""
    labels = dict(current)
    if not fieldpaths:
        return clean_labels(info.labels)
    for path in fieldpaths:
        if path.startswith("labels."):
            key = path[len("labels."):]
            labels[key] = (info.labels or {}).get(key, "")
        elif path == "labels":
            labels = dict(info.labels or {})
        else:
            raise errdefs.InvalidArgument(
                f"cannot update {identifiers.go_quote(path)} field on snapshot {identifiers.go_quote(info.name)}")
    return clean_labels(labels)


def adaptor(info: Info) -> filters.Adaptor:
    """The Walk filter view of `info` (containerd's adaptSnapshot)."""

    def lookup(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if not fieldpath:
            return "", False
        head = fieldpath[0]
        if head == "kind":
            name = Kind(info.kind).filter_name if info.kind in Kind._value2member_map_ else ""
            return (name, True) if name else ("", False)
        if head == "name":
            return info.name, True
        if head == "parent":
            return info.parent, True
        if head == "labels":
            if not info.labels:
                return "", False
            key = ".".join(fieldpath[1:])
            return (info.labels[key], True) if key in info.labels else ("", False)
        return "", False

    return lookup


def match(filter_strings: Iterable[str]) -> filters.Filter:
    return filters.parse(*list(filter_strings))
