"""Images in the metadata database: a name per namespace pointing at a target descriptor (media
type, digest, size, annotations), with labels and timestamps. containerd's metadata/images.go
rules and messages: names are any non-empty string, the target is validated on every write,
updates take containerd 1.6's field paths, deletion marks the database dirty for the GC.

Owns the `images` table only; what an image's target references is the GC's business
(plugins/metadata/gc.py) and events are the images service's (plugins/images).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterable, Sequence

from pycontainerd.core import digest as digests
from pycontainerd.core import errdefs, filters, identifiers
from pycontainerd.core.identifiers import go_quote

from .db import MetadataDB, dump_labels, load_labels, now, parse_ts, ts


@dataclass
class Descriptor:
    """An OCI descriptor as images store it (containerd keeps only these four fields)."""

    media_type: str = ""
    digest: str = ""
    size: int = 0
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class Image:
    name: str
    target: Descriptor = field(default_factory=Descriptor)
    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None


def _non_empty(m: dict[str, str] | None) -> dict[str, str]:
    """containerd drops empty values when it writes a label or annotation map."""
    return {k: v for k, v in (m or {}).items() if v}


# go-digest's errors, which containerd puts in its "Target.Digest ... invalid" message
_DIGEST_FORMAT = "invalid checksum digest format"
_DIGEST_LENGTH = "invalid checksum digest length"
_DIGEST_UNSUPPORTED = "unsupported digest algorithm"
_DIGEST_ANCHORED = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")


def digest_error(value: str) -> str | None:
    """go-digest's Digest.Validate() error text for `value`, or None when it is valid."""
    i = value.find(":")
    if i <= 0 or i + 1 == len(value):
        return _DIGEST_FORMAT
    algorithm, encoded = value[:i], value[i + 1:]
    size = digests.ALGORITHMS.get(algorithm)
    if size is None:
        return _DIGEST_FORMAT if not _DIGEST_ANCHORED.match(value) else _DIGEST_UNSUPPORTED
    if len(encoded) != size:
        return _DIGEST_LENGTH
    if not re.fullmatch(r"[a-f0-9]+", encoded):
        return _DIGEST_FORMAT
    return None


def validate_target(target: Descriptor) -> None:
    err = digest_error(target.digest)
    if err is not None:
        raise errdefs.InvalidArgument(f"Target.Digest {go_quote(target.digest)} invalid: {err}")
    if target.size <= 0:
        raise errdefs.InvalidArgument("Target.Size must be greater than zero")
    if not target.media_type:
        raise errdefs.InvalidArgument("Target.MediaType must be set")


def validate_image(image: Image) -> None:
    """containerd's validateImage: a name, labels within the size limit, a valid target."""
    if not isinstance(image.name, str) or image.name == "":
        raise errdefs.InvalidArgument("image name must not be empty")
    try:
        identifiers.validate_labels(image.labels)
    except errdefs.InvalidArgument as err:
        raise errdefs.InvalidArgument(f"image.Labels: {err.message}") from None
    validate_target(image.target)


def adapt(image: Image) -> filters.Adaptor:
    """containerd's image filter fields: name, target.digest, target.mediatype, labels.*,
    annotations.* (the target's annotations)."""

    def lookup(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if not fieldpath:
            return "", False
        head = fieldpath[0]
        if head == "name":
            return image.name, bool(image.name)
        if head == "target":
            if len(fieldpath) < 2:
                return "", False
            if fieldpath[1] == "digest":
                return image.target.digest, bool(image.target.digest)
            if fieldpath[1] == "mediatype":
                return image.target.media_type, bool(image.target.media_type)
            return "", False
        if head in ("labels", "annotations"):
            m = image.labels if head == "labels" else image.target.annotations
            if not m:
                return "", False
            key = ".".join(fieldpath[1:])
            return (m[key], True) if key in m else ("", False)
        return "", False

    return lookup


def _row(r) -> Image:
    return Image(
        name=r["name"],
        target=Descriptor(r["media_type"], r["digest"], r["size"], load_labels(r["annotations"])),
        labels=load_labels(r["labels"]),
        created_at=parse_ts(r["created_at"]),
        updated_at=parse_ts(r["updated_at"]),
    )


class ImageStore:
    """Images of every namespace; each call names its namespace."""

    def __init__(self, db: MetadataDB):
        self.db = db

    def get(self, namespace: str, name: str) -> Image:
        rows = self.db.read("SELECT * FROM images WHERE namespace = ? AND name = ?", (namespace, name))
        if not rows:
            raise errdefs.NotFound(f"image {go_quote(name)}")
        return _row(rows[0])

    def list(self, namespace: str, filter_strings: Iterable[str] = ()) -> list[Image]:
        """Images of `namespace` in name order (bytewise, as containerd's bolt keys) that match
        any of the filters."""
        strings = list(filter_strings)
        match = filters.parse(*strings)
        rows = self.db.read("SELECT * FROM images WHERE namespace = ? ORDER BY CAST(name AS BLOB)", (namespace,))
        images = [_row(r) for r in rows]
        return [image for image in images if match.match(adapt(image))]

    def create(self, namespace: str, image: Image) -> Image:
        image = Image(image.name, Descriptor(image.target.media_type, image.target.digest, image.target.size,
                                             _non_empty(image.target.annotations)),
                      _non_empty(image.labels))
        with self.db.write() as cur:
            validate_image(image)
            self.db.ensure_namespace(cur, namespace)
            if cur.execute("SELECT 1 FROM images WHERE namespace = ? AND name = ?",
                           (namespace, image.name)).fetchone():
                raise errdefs.AlreadyExists(f"image {go_quote(image.name)}")
            stamp = ts(now())
            cur.execute(
                "INSERT INTO images(namespace, name, media_type, digest, size, annotations, labels, created_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (namespace, image.name, image.target.media_type, image.target.digest, image.target.size,
                 dump_labels(image.target.annotations), dump_labels(image.labels), stamp, stamp))
        return self.get(namespace, image.name)

    def update(self, namespace: str, image: Image, fieldpaths: Sequence[str] = ()) -> Image:
        """containerd 1.6's image update: no paths replaces labels and target; otherwise
        `labels`, `labels.KEY`, `target` (as a whole), `annotations`, `annotations.KEY`; an empty
        value removes a key. Anything else is InvalidArgument."""
        if not image.name:
            raise errdefs.InvalidArgument("image name is required for update")
        with self.db.write() as cur:
            row = cur.execute("SELECT * FROM images WHERE namespace = ? AND name = ?",
                              (namespace, image.name)).fetchone()
            if row is None:
                raise errdefs.NotFound(f"image {go_quote(image.name)}")
            current = _row(row)
            if fieldpaths:
                updated = current
                for path in fieldpaths:
                    if path.startswith("labels."):
                        key = path[len("labels."):]
                        updated.labels[key] = image.labels.get(key, "")
                    elif path.startswith("annotations."):
                        key = path[len("annotations."):]
                        updated.target.annotations[key] = image.target.annotations.get(key, "")
                    elif path == "labels":
                        updated.labels = dict(image.labels)
                    elif path == "target":
                        updated.target = Descriptor(image.target.media_type, image.target.digest,
                                                    image.target.size, dict(image.target.annotations))
                    elif path == "annotations":
                        updated.target.annotations = dict(image.target.annotations)
                    else:
                        raise errdefs.InvalidArgument(
                            f"cannot update {go_quote(path)} field on image {go_quote(image.name)}")
            else:
                updated = Image(image.name, Descriptor(image.target.media_type, image.target.digest,
                                                       image.target.size, dict(image.target.annotations)),
                                dict(image.labels))
            validate_image(updated)
            updated.labels = _non_empty(updated.labels)
            updated.target.annotations = _non_empty(updated.target.annotations)
            cur.execute(
                "UPDATE images SET media_type = ?, digest = ?, size = ?, annotations = ?, labels = ?, updated_at = ?"
                " WHERE namespace = ? AND name = ?",
                (updated.target.media_type, updated.target.digest, updated.target.size,
                 dump_labels(updated.target.annotations), dump_labels(updated.labels), ts(now()),
                 namespace, image.name))
        return self.get(namespace, image.name)

    def delete(self, namespace: str, name: str) -> None:
        with self.db.write() as cur:
            if cur.execute("DELETE FROM images WHERE namespace = ? AND name = ?", (namespace, name)).rowcount == 0:
                raise errdefs.NotFound(f"image {go_quote(name)}")
            self.db.mark_dirty()
