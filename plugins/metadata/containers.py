"""Containers in the metadata database: containerd's container records, per namespace.

A record is metadata only (no process): id, labels, image name, runtime {name, options},
the OCI spec (an opaque Any, required), snapshotter + snapshot key of its root filesystem,
extensions (name -> Any), sandbox id, created/updated times. Owns the `containers` table
(declared in db.py) and containerd 1.6's rules for it (metadata/containers.go):

- Create validates (id is an identifier; labels fit; runtime name set; spec set; extension keys
  non-empty; a snapshot key needs a snapshotter) and refuses an existing id with
  `container "x": already exists`; empty-valued labels are dropped.
- Update applies a field mask: `labels`, `labels.KEY`, `spec`, `extensions`, `extensions.KEY`,
  `image`, `snapshotkey`; any other path is InvalidArgument. With no paths, those five fields are
  replaced and a changed snapshotter or runtime name is refused (they are immutable).
  An empty label value removes the label. Unlike containerd, `extensions.KEY` with KEY absent
  from the request removes that extension (containerd would store an empty Any under it).
- List filters see `id`, `image`, `runtime.name` and `labels.*` (containerd's adaptor; other
  fields, snapshotter included, read as absent). Records come in id order, as bolt's.

Opaque values are `TypedValue(type_url, value)`; this module never decodes them. The GC reads
`snapshotter`, `snapshot_key` and `image` of this table directly; nothing else here knows GC.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Iterable, Mapping, Optional

from pycontainerd.core import errdefs, filters, identifiers
from pycontainerd.core.identifiers import go_quote

from .db import MetadataDB, dump_labels, load_labels, now, parse_ts, ts


@dataclass(frozen=True)
class TypedValue:
    """A google.protobuf.Any kept as is: its type URL and its serialized value."""

    type_url: str = ""
    value: bytes = b""


@dataclass
class Container:
    id: str
    runtime_name: str = ""
    spec: Optional[TypedValue] = None
    labels: dict[str, str] = field(default_factory=dict)
    image: str = ""
    runtime_options: Optional[TypedValue] = None
    snapshotter: str = ""
    snapshot_key: str = ""
    sandbox_id: str = ""
    extensions: dict[str, TypedValue] = field(default_factory=dict)
    created_at: Optional[datetime] = None
    updated_at: Optional[datetime] = None


UPDATABLE = ("labels", "spec", "extensions", "image", "snapshotkey")
"""The fields a mask may name (and those a mask-less update replaces)."""


# -- blob encodings --------------------------------------------------------------------------

def _dump_any(value: Optional[TypedValue]) -> Optional[bytes]:
    if value is None:
        return None
    return json.dumps({"type_url": value.type_url,
                       "value": base64.b64encode(value.value).decode()}).encode()


def _load_any(blob: Optional[bytes]) -> Optional[TypedValue]:
    if blob is None:
        return None
    data = json.loads(blob)
    return TypedValue(data.get("type_url", ""), base64.b64decode(data.get("value", "")))


def _dump_extensions(extensions: Mapping[str, TypedValue]) -> Optional[bytes]:
    if not extensions:
        return None
    return json.dumps({k: {"type_url": v.type_url, "value": base64.b64encode(v.value).decode()}
                       for k, v in sorted(extensions.items())}).encode()


def _load_extensions(blob: Optional[bytes]) -> dict[str, TypedValue]:
    if not blob:
        return {}
    return {k: TypedValue(v.get("type_url", ""), base64.b64decode(v.get("value", "")))
            for k, v in json.loads(blob).items()}


def _row(r) -> Container:
    return Container(
        id=r["id"], labels=load_labels(r["labels"]), image=r["image"], runtime_name=r["runtime_name"],
        runtime_options=_load_any(r["runtime_options"]), spec=_load_any(r["spec"]),
        snapshotter=r["snapshotter"], snapshot_key=r["snapshot_key"], sandbox_id=r["sandbox_id"],
        extensions=_load_extensions(r["extensions"]),
        created_at=parse_ts(r["created_at"]), updated_at=parse_ts(r["updated_at"]))


# -- validation and filtering ----------------------------------------------------------------

def validate(c: Container) -> None:
    """containerd's validateContainer; raises errdefs.InvalidArgument."""
    try:
        identifiers.validate(c.id)
    except errdefs.InvalidArgument as err:
        raise errdefs.InvalidArgument(f"container.ID: {err.message}") from None
    for key in c.extensions:
        if key == "":
            raise errdefs.InvalidArgument("container.Extension keys must not be zero-length")
    try:
        identifiers.validate_labels(c.labels)
    except errdefs.InvalidArgument as err:
        raise errdefs.InvalidArgument(f"containers.Labels: {err.message}") from None
    if not c.runtime_name:
        raise errdefs.InvalidArgument("container.Runtime.Name must be set")
    if c.spec is None:
        raise errdefs.InvalidArgument("container.Spec must be set")
    if c.snapshot_key and not c.snapshotter:
        raise errdefs.InvalidArgument("container.Snapshotter must be set if container.SnapshotKey is set")


def adaptor(c: Container) -> filters.Adaptor:
    """The fields a container filter can see (containerd's adaptContainer)."""

    def lookup(fieldpath) -> tuple[str, bool]:
        if not fieldpath:
            return "", False
        head = fieldpath[0]
        if head == "id":
            return c.id, bool(c.id)
        if head == "image":
            return c.image, bool(c.image)
        if head == "runtime":
            if len(fieldpath) > 1 and fieldpath[1] == "name":
                return c.runtime_name, bool(c.runtime_name)
            return "", False
        if head == "labels":
            key = ".".join(fieldpath[1:])
            if not key or key not in c.labels:
                return "", False
            return c.labels[key], True
        return "", False

    return lookup


def _nonempty(labels: Optional[Mapping[str, str]]) -> dict[str, str]:
    return {k: v for k, v in (labels or {}).items() if v != ""}


# -- the store -------------------------------------------------------------------------------

class ContainerStore:
    def __init__(self, db: MetadataDB):
        self.db = db

    def _has_any(self, cur, namespace: str) -> bool:
        return cur.execute("SELECT 1 FROM containers WHERE namespace = ? LIMIT 1", (namespace,)).fetchone() is not None

    def get(self, namespace: str, container_id: str) -> Container:
        rows = self.db.read("SELECT * FROM containers WHERE namespace = ? AND id = ?", (namespace, container_id))
        if not rows:
            raise errdefs.NotFound(f"container {go_quote(container_id)} in namespace {go_quote(namespace)}")
        return _row(rows[0])

    def list(self, namespace: str, filter_strings: Iterable[str] = ()) -> list[Container]:
        match = filters.parse(*filter_strings)
        rows = self.db.read("SELECT * FROM containers WHERE namespace = ? ORDER BY id", (namespace,))
        found = []
        for r in rows:
            c = _row(r)
            if match.match(adaptor(c)):
                found.append(c)
        return found

    def create(self, namespace: str, container: Container) -> Container:
        c = replace(container, labels=_nonempty(container.labels), extensions=dict(container.extensions))
        try:
            validate(c)
        except errdefs.InvalidArgument as err:
            raise errdefs.InvalidArgument(f"create container failed validation: {err.message}") from None
        stamp = now()
        c.created_at = c.updated_at = stamp
        with self.db.write() as cur:
            self.db.ensure_namespace(cur, namespace)
            if cur.execute("SELECT 1 FROM containers WHERE namespace = ? AND id = ?", (namespace, c.id)).fetchone():
                raise errdefs.AlreadyExists(f"container {go_quote(c.id)}")
            cur.execute(
                "INSERT INTO containers(namespace, id, labels, image, runtime_name, runtime_options, spec, "
                "snapshotter, snapshot_key, sandbox_id, extensions, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (namespace, c.id, dump_labels(c.labels), c.image, c.runtime_name, _dump_any(c.runtime_options),
                 _dump_any(c.spec), c.snapshotter, c.snapshot_key, c.sandbox_id, _dump_extensions(c.extensions),
                 ts(stamp), ts(stamp)))
        return c

    def update(self, namespace: str, container: Container, paths: Iterable[str] = ()) -> Container:
        """Apply `paths` of `container` to the stored record (see the module docstring)."""
        if not container.id:
            raise errdefs.InvalidArgument("must specify a container id")
        paths = list(paths)
        with self.db.write() as cur:
            row = cur.execute("SELECT * FROM containers WHERE namespace = ? AND id = ?",
                              (namespace, container.id)).fetchone()
            if row is None:
                if not self._has_any(cur, namespace):
                    raise errdefs.NotFound(f"cannot update container {go_quote(container.id)} in namespace "
                                           f"{go_quote(namespace)}")
                raise errdefs.NotFound(f"container {go_quote(container.id)}")
            updated = _row(row)
            if not paths:
                paths = list(UPDATABLE)
                if updated.snapshotter != container.snapshotter:
                    raise errdefs.InvalidArgument("container.Snapshotter field is immutable")
                if updated.runtime_name != container.runtime_name:
                    raise errdefs.InvalidArgument("container.Runtime.Name field is immutable")
            for path in paths:
                if path.startswith("labels."):
                    key = path[len("labels."):]
                    updated.labels[key] = container.labels.get(key, "")
                elif path.startswith("extensions."):
                    key = path[len("extensions."):]
                    if key in container.extensions:
                        updated.extensions[key] = container.extensions[key]
                    else:
                        updated.extensions.pop(key, None)
                elif path == "labels":
                    updated.labels = dict(container.labels)
                elif path == "spec":
                    updated.spec = container.spec
                elif path == "extensions":
                    updated.extensions = dict(container.extensions)
                elif path == "image":
                    updated.image = container.image
                elif path == "snapshotkey":
                    updated.snapshot_key = container.snapshot_key
                else:
                    raise errdefs.InvalidArgument(
                        f"cannot update {go_quote(path)} field on {go_quote(container.id)}")
            updated.labels = _nonempty(updated.labels)
            try:
                validate(updated)
            except errdefs.InvalidArgument as err:
                raise errdefs.InvalidArgument(f"update failed validation: {err.message}") from None
            updated.updated_at = now()
            cur.execute(
                "UPDATE containers SET labels = ?, image = ?, spec = ?, snapshot_key = ?, extensions = ?, "
                "updated_at = ? WHERE namespace = ? AND id = ?",
                (dump_labels(updated.labels), updated.image, _dump_any(updated.spec), updated.snapshot_key,
                 _dump_extensions(updated.extensions), ts(updated.updated_at), namespace, container.id))
        return updated

    def delete(self, namespace: str, container_id: str) -> None:
        with self.db.write() as cur:
            if cur.execute("DELETE FROM containers WHERE namespace = ? AND id = ?",
                           (namespace, container_id)).rowcount == 0:
                if not self._has_any(cur, namespace):
                    raise errdefs.NotFound(f"cannot delete container {go_quote(container_id)} in namespace "
                                           f"{go_quote(namespace)}")
                raise errdefs.NotFound(f"container {container_id}")
