"""OCI and Docker image media types, descriptors, and the rules containerd applies to them:
which documents are manifests or indexes, which blobs are layers or configs, the gc.ref labels a
parent gets for its children, and the checks a manifest or index must pass before it is trusted.

Pure data and functions, no I/O.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from pycontainerd.api.gen.containerd import types as gen_types
from pycontainerd.core import digest as digests
from pycontainerd.core import errdefs

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYOUT_VERSION = "1.0.0"

DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"

CONTAINERD_CHECKPOINT = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
CONTAINERD_CHECKPOINT_CONFIG = "application/vnd.containerd.container.checkpoint.config.v1+proto"

ANNOTATION_IMAGE_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

LABEL_UNCOMPRESSED = "containerd.io/uncompressed"
LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"
LABEL_DISTRIBUTION_SOURCE = "containerd.io/distribution.source."

# containerd's resolver refuses manifests bigger than this (its MaxManifestSize, 4*1048*1048).
MAX_MANIFEST_SIZE = 4 * 1048 * 1048


def _base(mt: str) -> tuple[str, list[str]]:
    parts = mt.split("+")
    return parts[0], parts[1:]


def is_manifest(mt: str) -> bool:
    return mt in (DOCKER_MANIFEST, OCI_MANIFEST)


def is_index(mt: str) -> bool:
    return mt in (OCI_INDEX, DOCKER_MANIFEST_LIST)


def is_config(mt: str) -> bool:
    return mt in (DOCKER_CONFIG, OCI_CONFIG)


def is_known_config(mt: str) -> bool:
    return mt in (DOCKER_CONFIG, OCI_CONFIG, CONTAINERD_CHECKPOINT, CONTAINERD_CHECKPOINT_CONFIG)


def is_layer(mt: str) -> bool:
    if mt.startswith("application/vnd.oci.image.layer."):
        return True
    base, _ = _base(mt)
    return base in (DOCKER_LAYER, DOCKER_LAYER_GZIP, DOCKER_LAYER_FOREIGN, DOCKER_LAYER_FOREIGN_GZIP)


def is_non_distributable(mt: str) -> bool:
    return (mt.startswith("application/vnd.oci.image.layer.nondistributable.")
            or mt.startswith("application/vnd.docker.image.rootfs.foreign."))


def child_gc_label(mt: str) -> str:
    """containerd's ChildGCLabels: the label key (prefix) a parent uses for a child of type `mt`."""
    if is_known_config(mt):
        return "containerd.io/gc.ref.content.config"
    if is_manifest(mt):
        return "containerd.io/gc.ref.content.m."
    if is_layer(mt):
        return "containerd.io/gc.ref.content.l."
    return "containerd.io/gc.ref.content."


def children_labels(children: list["Descriptor"]) -> dict[str, str]:
    """The gc.ref labels for a parent with `children` (SetChildrenLabels): keys ending in "." are
    numbered from 0; a repeated plain key gets its index appended from the second one on."""
    labels: dict[str, str] = {}
    counts: dict[str, int] = {}
    for ch in children:
        key = child_gc_label(ch.media_type)
        idx = counts.get(key, 0)
        counts[key] = idx + 1
        if idx > 0 or key.endswith("."):
            key = f"{key}{idx}"
        labels[key] = ch.digest
    return labels


@dataclass
class Platform:
    os: str = ""
    architecture: str = ""
    variant: str = ""
    os_version: str = ""
    os_features: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, d: Optional[dict]) -> Optional["Platform"]:
        if not isinstance(d, dict):
            return None
        return cls(os=str(d.get("os", "")), architecture=str(d.get("architecture", "")),
                   variant=str(d.get("variant", "") or ""), os_version=str(d.get("os.version", "") or ""),
                   os_features=list(d.get("os.features") or []))

    def to_json(self) -> dict:
        d: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            d["os.version"] = self.os_version
        if self.os_features:
            d["os.features"] = list(self.os_features)
        if self.variant:
            d["variant"] = self.variant
        return d

    def __str__(self) -> str:
        s = f"{self.os or 'unknown'}/{self.architecture or 'unknown'}"
        return f"{s}/{self.variant}" if self.variant else s


@dataclass
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    urls: list[str] = field(default_factory=list)
    platform: Optional[Platform] = None

    @classmethod
    def from_json(cls, d: Any, where: str = "descriptor") -> "Descriptor":
        if not isinstance(d, dict):
            raise errdefs.InvalidArgument(f"{where}: not a JSON object")
        dg = d.get("digest")
        size = d.get("size", 0)
        if not isinstance(dg, str):
            raise errdefs.InvalidArgument(f"{where}: missing digest")
        digests.parse(dg)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise errdefs.InvalidArgument(f"{where}: invalid size {size!r}")
        mt = d.get("mediaType") or ""
        if not isinstance(mt, str):
            raise errdefs.InvalidArgument(f"{where}: invalid mediaType")
        ann = d.get("annotations") or {}
        if not isinstance(ann, dict):
            raise errdefs.InvalidArgument(f"{where}: invalid annotations")
        return cls(media_type=mt, digest=dg, size=size,
                   annotations={str(k): str(v) for k, v in ann.items()},
                   urls=[str(u) for u in (d.get("urls") or [])],
                   platform=Platform.from_json(d.get("platform")))

    def to_json(self) -> dict:
        """Go's ocispec.Descriptor field order: mediaType, digest, size, urls, annotations, platform."""
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if not self.media_type:
            del d["mediaType"]
        if self.urls:
            d["urls"] = list(self.urls)
        if self.annotations:
            d["annotations"] = dict(sorted(self.annotations.items()))
        if self.platform is not None:
            d["platform"] = self.platform.to_json()
        return d

    @classmethod
    def from_proto(cls, p: Any) -> "Descriptor":
        return cls(media_type=p.media_type, digest=p.digest, size=p.size, annotations=dict(p.annotations))

    def to_proto(self) -> Any:
        return gen_types.Descriptor(media_type=self.media_type, digest=self.digest, size=self.size,
                                    annotations=dict(self.annotations))

    def copy(self, **changes: Any) -> "Descriptor":
        values = dict(media_type=self.media_type, digest=self.digest, size=self.size,
                      annotations=dict(self.annotations), urls=list(self.urls), platform=self.platform)
        values.update(changes)
        return Descriptor(**values)


def go_json(obj: Any) -> bytes:
    """JSON bytes as Go's encoding/json writes them: compact, HTML characters escaped."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text.encode()


def parse_document(data: bytes, desc: Descriptor) -> dict:
    """Parse manifest or index `data` for `desc` with containerd's checks (valid JSON object, no
    schema 1, a manifest that is not an index and vice versa). InvalidArgument when it fails."""
    if len(data) > MAX_MANIFEST_SIZE:
        raise errdefs.InvalidArgument(
            f"{desc.digest}: {len(data)} byte manifest exceeds the {MAX_MANIFEST_SIZE} byte limit")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise errdefs.InvalidArgument(f"{desc.digest}: not valid JSON: {err}") from None
    if not isinstance(doc, dict):
        raise errdefs.InvalidArgument(f"{desc.digest}: not a JSON object")
    if doc.get("fsLayers"):
        raise errdefs.InvalidArgument(f"{desc.digest}: media-type: schema 1 not supported")
    inner = doc.get("mediaType", "")
    if is_manifest(desc.media_type):
        if doc.get("manifests") or is_index(inner):
            raise errdefs.InvalidArgument(
                f"{desc.digest}: media-type: expected manifest but found index ({desc.media_type})")
        if not isinstance(doc.get("config"), dict):
            raise errdefs.InvalidArgument(f"{desc.digest}: manifest has no config")
        if not isinstance(doc.get("layers", []), list):
            raise errdefs.InvalidArgument(f"{desc.digest}: manifest layers is not a list")
    elif is_index(desc.media_type):
        if doc.get("config") or doc.get("layers") or is_manifest(inner):
            raise errdefs.InvalidArgument(
                f"{desc.digest}: media-type: expected index but found manifest ({desc.media_type})")
        if not isinstance(doc.get("manifests", []), list):
            raise errdefs.InvalidArgument(f"{desc.digest}: index manifests is not a list")
    return doc


def document_media_type(data: bytes) -> str:
    """The media type a manifest or index declares for itself (or guesses from its fields)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(doc, dict):
        return ""
    mt = doc.get("mediaType")
    if isinstance(mt, str) and mt:
        return mt
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc:
        return OCI_MANIFEST
    return ""


def children(doc: dict, desc: Descriptor) -> list[Descriptor]:
    """containerd's images.Children for a parsed manifest or index."""
    if is_manifest(desc.media_type):
        out = [Descriptor.from_json(doc["config"], f"{desc.digest} config")]
        out += [Descriptor.from_json(layer, f"{desc.digest} layer {i}")
                for i, layer in enumerate(doc.get("layers") or [])]
        return out
    if is_index(desc.media_type):
        return [Descriptor.from_json(m, f"{desc.digest} manifest {i}")
                for i, m in enumerate(doc.get("manifests") or [])]
    return []
