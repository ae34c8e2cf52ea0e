"""`client.images`: the images of the client's namespace (list, get, create, update, labels, tag,
delete) and what ctr works out from an image's content: its size and platforms, whether all of
its content is present (`check`), whether it is unpacked in a snapshotter.

    async with Client(address, namespace="default") as client:
        for image in await client.images.list(["labels.team==a"]):
            print(image.name, image.target.digest, await client.images.size(image))
        await client.images.delete("docker.io/library/busybox:latest", sync=True)

The content walks follow containerd's images package (Manifest, Platforms, Check, Size, RootFS)
with the default platform matcher (`platforms.Default()`: this host's platform, plus what it can
also run: 386 on amd64, older arm variants on arm). Content is read through `client.content`,
snapshots are stat'ed through the snapshots service.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Awaitable, Callable, Iterable, Mapping, Optional, Sequence

from betterproto.lib.google.protobuf import FieldMask

from pycontainerd.api.gen.containerd import types as pbtypes
from pycontainerd.api.gen.containerd.services.images import v1 as api
from pycontainerd.api.gen.containerd.services.snapshots import v1 as snapshots_api
from pycontainerd.core import errdefs

from ._base import DEFAULT, ServiceAPI
from .types import Platform, rfc3339

# media types (containerd's images package)
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
CHECKPOINT = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
CHECKPOINT_CONFIG = "application/vnd.containerd.container.checkpoint.config.v1+proto"
DOCKER_LAYERS = ("application/vnd.docker.image.rootfs.diff.tar", "application/vnd.docker.image.rootfs.diff.tar.gzip",
                 "application/vnd.docker.image.rootfs.foreign.diff.tar",
                 "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip")

DEFAULT_SNAPSHOTTER = os.environ.get("CONTAINERD_SNAPSHOTTER") or "overlayfs"


def is_manifest(mt: str) -> bool:
    return mt in (OCI_MANIFEST, DOCKER_MANIFEST)


def is_index(mt: str) -> bool:
    return mt in (OCI_INDEX, DOCKER_MANIFEST_LIST)


def is_config(mt: str) -> bool:
    return mt in (OCI_CONFIG, DOCKER_CONFIG)


def is_layer(mt: str) -> bool:
    return mt.startswith("application/vnd.oci.image.layer.") or mt.split("+")[0] in DOCKER_LAYERS


def _childless(mt: str) -> bool:
    return is_layer(mt) or mt in (OCI_CONFIG, DOCKER_CONFIG, CHECKPOINT, CHECKPOINT_CONFIG)


# -- plain types -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Descriptor:
    """What an image points at (media type, digest, size, annotations) and, inside an index, the
    platform of a manifest."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: Optional[Platform] = None

    @classmethod
    def from_proto(cls, msg: Any) -> "Descriptor":
        return cls(media_type=msg.media_type, digest=msg.digest, size=int(msg.size),
                   annotations=dict(sorted((msg.annotations or {}).items())))

    def to_proto(self) -> pbtypes.Descriptor:
        return pbtypes.Descriptor(media_type=self.media_type, digest=self.digest, size=self.size,
                                  annotations=dict(self.annotations))

    @classmethod
    def from_json(cls, d: Any) -> "Descriptor":
        """A descriptor from a manifest or index (OCI JSON)."""
        if not isinstance(d, dict):
            raise errdefs.InvalidArgument("descriptor is not a JSON object")
        p = d.get("platform")
        platform = None
        if isinstance(p, dict):
            platform = Platform(str(p.get("os", "")), str(p.get("architecture", "")), str(p.get("variant", "") or ""))
        size = d.get("size", 0)
        return cls(media_type=str(d.get("mediaType", "") or ""), digest=str(d.get("digest", "") or ""),
                   size=size if isinstance(size, int) and not isinstance(size, bool) else 0,
                   annotations={str(k): str(v) for k, v in (d.get("annotations") or {}).items()},
                   platform=platform)

    def to_dict(self) -> dict:
        return {"media_type": self.media_type, "digest": self.digest, "size": self.size,
                "annotations": dict(self.annotations)}


@dataclass(frozen=True)
class Image:
    name: str
    target: Descriptor
    labels: dict[str, str] = field(default_factory=dict)
    created_at: Optional[datetime] = None
    updated_at: Optional[datetime] = None

    @classmethod
    def from_proto(cls, msg: Any) -> "Image":
        return cls(name=msg.name, target=Descriptor.from_proto(msg.target),
                   labels=dict(sorted((msg.labels or {}).items())),
                   created_at=msg.created_at, updated_at=msg.updated_at)

    def to_dict(self) -> dict:
        return {"name": self.name, "target": self.target.to_dict(), "labels": dict(self.labels),
                "created_at": rfc3339(self.created_at), "updated_at": rfc3339(self.updated_at)}


@dataclass(frozen=True)
class CheckResult:
    """containerd's images.Check: with `available`, `required` is all the image needs for the
    platform (config and layers of its manifest), `present` and `missing` split it; without, the
    manifest itself could not be read (`missing` holds the target)."""

    available: bool
    required: tuple[Descriptor, ...] = ()
    present: tuple[Descriptor, ...] = ()
    missing: tuple[Descriptor, ...] = ()

    @property
    def complete(self) -> bool:
        return self.available and not self.missing

    @property
    def status(self) -> str:
        """What `ctr images check` prints in STATUS."""
        if not self.available:
            return f"unavailable ({len(self.present)}/?)"
        word = "incomplete" if self.missing else "complete"
        return f"{word} ({len(self.present)}/{len(self.required)})"

    def to_dict(self) -> dict:
        return {"available": self.available, "complete": self.complete,
                "required": [d.to_dict() for d in self.required],
                "present": [d.to_dict() for d in self.present],
                "missing": [d.to_dict() for d in self.missing]}


# -- platforms (containerd's platforms package, what Default() matches) -----------------------

_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "armv6l": "arm", "i686": "386",
           "i386": "386", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


def normalize(p: Platform) -> Platform:
    """containerd's platforms.Normalize (an empty OS is this host's, "linux")."""
    os_ = (p.os or "linux").lower()
    if os_ == "macos":
        os_ = "darwin"
    arch, variant = p.architecture.lower(), p.variant.lower()
    if arch == "i386":
        arch, variant = "386", ""
    elif arch in ("x86_64", "x86-64", "amd64"):
        arch, variant = "amd64", ("" if variant == "v1" else variant)
    elif arch in ("aarch64", "arm64"):
        arch, variant = "arm64", ("" if variant in ("8", "v8") else variant)
    elif arch == "armhf":
        arch, variant = "arm", "v7"
    elif arch == "armel":
        arch, variant = "arm", "v6"
    elif arch == "arm":
        variant = {"": "v7", "7": "v7", "5": "v5", "6": "v6", "8": "v8"}.get(variant, variant)
    return Platform(os_, arch, variant)


def default_platform() -> Platform:
    machine = os.uname().machine
    variant = ""
    if machine.startswith("armv"):
        variant = "v" + machine[4:5]
    return normalize(Platform("linux", _GOARCH.get(machine, machine), variant))


def _vector(p: Platform) -> list[Platform]:
    """The platforms `p` runs, best first (containerd's platformVector)."""
    out = [p]
    if p.architecture == "amd64":
        version = p.variant[1:] if p.variant.startswith("v") else ""
        if version.isdigit() and int(version) > 1:
            out += [Platform(p.os, "amd64", f"v{v}") for v in range(int(version) - 1, 0, -1)]
        out.append(Platform(p.os, "386"))
    elif p.architecture == "arm":
        version = p.variant[1:] if p.variant.startswith("v") else ""
        if version.isdigit() and int(version) > 5:
            out += [Platform(p.os, "arm", f"v{v}") for v in range(int(version) - 1, 4, -1)]
    elif p.architecture == "arm64":
        out += _vector(Platform(p.os, "arm", p.variant or "v8"))
    return out


class PlatformMatcher:
    """containerd's platforms.Only(p): matches what `p` runs, orders best first."""

    def __init__(self, platform: Optional[Platform] = None):
        self.platform = normalize(platform or default_platform())
        self.vector = [normalize(p) for p in _vector(self.platform)]

    def _index(self, p: Platform) -> int:
        n = normalize(p)
        for i, m in enumerate(self.vector):
            if (m.os, m.architecture, m.variant) == (n.os, n.architecture, n.variant):
                return i
        return len(self.vector)

    def match(self, p: Platform) -> bool:
        return self._index(p) < len(self.vector)

    def less(self, a: Platform, b: Platform) -> bool:
        return self._index(a) < self._index(b)

    def sort(self, descs: list[Descriptor]) -> list[Descriptor]:
        """Stable: descriptors without a platform last, the rest best first."""
        def key(d: Descriptor) -> int:
            return len(self.vector) + 1 if d.platform is None else self._index(d.platform)
        return sorted(descs, key=key)


def chain_id(diff_ids: Sequence[str]) -> str:
    """The identity of a stack of layers (OCI ChainID): what unpack names committed snapshots."""
    chain = ""
    for diff in diff_ids:
        chain = diff if not chain else "sha256:" + hashlib.sha256(f"{chain} {diff}".encode()).hexdigest()
    return chain


class _SkipChildren(Exception):
    pass


# -- the API -----------------------------------------------------------------------------------

class _SnapshotStat(ServiceAPI):
    stub_class = snapshots_api.SnapshotsStub

    async def exists(self, snapshotter: str, key: str) -> bool:
        try:
            await self._unary("stat", snapshots_api.StatSnapshotRequest(snapshotter=snapshotter, key=key))
            return True
        except errdefs.NotFound:
            return False


class ImagesAPI(ServiceAPI):
    stub_class = api.ImagesStub

    def __init__(self, client: Any):
        super().__init__(client)
        self._snapshots = _SnapshotStat(client)

    async def _exists(self, digest: str) -> bool:
        try:
            await self._client.content.info(digest)
            return True
        except errdefs.NotFound:
            return False

    # -- records ---------------------------------------------------------------------------------

    async def list(self, filters: Iterable[str] = (), *, timeout: Any = DEFAULT) -> list[Image]:
        """Images matching any of the filters (fields: name, target.digest, target.mediatype,
        labels.KEY, annotations.KEY), in name order."""
        resp = await self._unary("list", api.ListImagesRequest(filters=list(filters)), timeout=timeout)
        return [Image.from_proto(i) for i in resp.images]

    async def get(self, name: str, *, timeout: Any = DEFAULT) -> Image:
        resp = await self._unary("get", api.GetImageRequest(name=name), timeout=timeout)
        return Image.from_proto(resp.image)

    async def create(self, name: str, target: Descriptor, labels: Optional[Mapping[str, str]] = None, *,
                     timeout: Any = DEFAULT) -> Image:
        """Create image `name` pointing at `target` (AlreadyExists when the name is taken)."""
        req = api.CreateImageRequest(image=api.Image(name=name, labels=dict(labels or {}), target=target.to_proto()))
        resp = await self._unary("create", req, timeout=timeout)
        return Image.from_proto(resp.image)

    async def update(self, name: str, *, labels: Optional[Mapping[str, str]] = None,
                     target: Optional[Descriptor] = None, paths: Sequence[str] = (),
                     timeout: Any = DEFAULT) -> Image:
        """containerd's Update: `paths` among "labels", "labels.KEY", "target", "annotations",
        "annotations.KEY" (the target's); no paths replaces labels and target at once."""
        image = api.Image(name=name, labels=dict(labels or {}),
                          target=target.to_proto() if target is not None else pbtypes.Descriptor())
        req = api.UpdateImageRequest(image=image, update_mask=FieldMask(paths=list(paths)) if paths else None)
        resp = await self._unary("update", req, timeout=timeout)
        return Image.from_proto(resp.image)

    async def set_labels(self, name: str, labels: Mapping[str, str], *, replace: bool = False,
                         timeout: Any = DEFAULT) -> Image:
        """Set labels (an empty value removes one); with replace=True the labels become exactly
        `labels`. What `ctr images label [-r]` does."""
        labels = dict(labels)
        if replace:
            paths = ["labels"]
        elif labels:
            paths = [f"labels.{k}" for k in labels]
        else:
            return await self.get(name, timeout=timeout)
        return await self.update(name, labels=labels, paths=paths, timeout=timeout)

    async def tag(self, source: str, target: str, *, force: bool = False, timeout: Any = DEFAULT) -> Image:
        """Create `target` as a copy of image `source` (target descriptor and labels); with force,
        an existing `target` is replaced (deleted, then created again), as `ctr images tag`."""
        src = await self.get(source, timeout=timeout)
        try:
            return await self.create(target, src.target, src.labels, timeout=timeout)
        except errdefs.AlreadyExists:
            if not force:
                raise
        await self.delete(target, timeout=timeout)
        return await self.create(target, src.target, src.labels, timeout=timeout)

    async def delete(self, name: str, sync: bool = False, *, timeout: Any = DEFAULT) -> None:
        """Delete image `name`; with sync=True the daemon returns once a garbage collection has
        run after it (its content is gone unless something else holds it)."""
        await self._unary("delete", api.DeleteImageRequest(name=name, sync=sync), timeout=timeout)

    # -- content ---------------------------------------------------------------------------------

    async def _read_json(self, desc: Descriptor) -> Any:
        data = await self._client.content.read_all(desc.digest)
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as err:
            raise errdefs.InvalidArgument(f"{desc.digest}: invalid JSON: {err}") from None

    async def _document(self, desc: Descriptor, what: str) -> dict:
        """A manifest or index, with containerd's media type checks."""
        doc = await self._read_json(desc)
        if not isinstance(doc, dict):
            raise errdefs.InvalidArgument(f"{what}: invalid desc {desc.digest}: not a JSON object")
        if doc.get("fsLayers"):
            raise errdefs.InvalidArgument(f"{what}: invalid desc {desc.digest}: media-type: schema 1 not supported")
        inner = doc.get("mediaType", "")
        if is_manifest(desc.media_type) and (doc.get("manifests") or is_index(inner)):
            raise errdefs.InvalidArgument(f"{what}: invalid desc {desc.digest}: media-type: expected manifest but "
                                          f"found index ({desc.media_type})")
        if is_index(desc.media_type) and (doc.get("config") or doc.get("layers") or is_manifest(inner)):
            raise errdefs.InvalidArgument(f"{what}: invalid desc {desc.digest}: media-type: expected index but "
                                          f"found manifest ({desc.media_type})")
        return doc

    async def children(self, desc: Descriptor) -> list[Descriptor]:
        """The descriptors a manifest (config, layers) or an index (manifests) names; nothing for
        anything else (containerd's images.Children)."""
        if is_manifest(desc.media_type):
            doc = await self._document(desc, "children")
            return [Descriptor.from_json(doc.get("config") or {})] + \
                [Descriptor.from_json(d) for d in doc.get("layers") or []]
        if is_index(desc.media_type):
            doc = await self._document(desc, "children")
            return [Descriptor.from_json(d) for d in doc.get("manifests") or []]
        return []

    async def _walk(self, desc: Descriptor, handler: Callable[[Descriptor], Awaitable[list[Descriptor]]]) -> None:
        try:
            children = await handler(desc)
        except _SkipChildren:
            return
        for child in children:
            await self._walk(child, handler)

    async def size(self, image: Image, platform: Optional[Platform] = None) -> int:
        """The packed size of what the image needs on `platform` (default: this host's): the
        target, the best matching manifest, its config and layers (containerd's Image.Size).
        Raises when content is missing; `size_partial` gives what could be counted."""
        total, err = await self.size_partial(image, platform)
        if err is not None:
            raise err
        return total

    async def size_partial(self, image: Image, platform: Optional[Platform] = None
                           ) -> tuple[int, Optional[Exception]]:
        """(size counted so far, the error that stopped the walk or None): what ctr prints."""
        matcher = PlatformMatcher(platform)
        total = 0

        async def handler(desc: Descriptor) -> list[Descriptor]:
            nonlocal total
            if desc.size < 0:
                raise errdefs.InvalidArgument(f"invalid size {desc.size} in {desc.digest} ({desc.media_type})")
            total += desc.size
            children = [c for c in await self.children(desc) if c.platform is None or matcher.match(c.platform)]
            if is_index(desc.media_type):
                children = matcher.sort(children)
                if not children:
                    raise errdefs.NotFound("no match for platform in manifest")
                children = children[:1]
            return children

        try:
            await self._walk(image.target, handler)
        except errdefs.ContainerdError as err:
            return total, err
        return total, None

    async def platforms(self, image: Image) -> list[Platform]:
        """Every platform the image names (index entries, or its config's os/architecture),
        normalized, as containerd's images.Platforms."""
        found: list[Platform] = []

        async def handler(desc: Descriptor) -> list[Descriptor]:
            if desc.platform is not None:
                found.append(desc.platform)
                raise _SkipChildren()
            if is_config(desc.media_type):
                config = await self._read_json(desc)
                if isinstance(config, dict):
                    found.append(normalize(Platform(str(config.get("os", "")), str(config.get("architecture", "")))))
            return await self.children(desc)

        await self._walk(image.target, handler)
        return found

    async def manifest(self, target: Descriptor, platform: Optional[Platform] = None) -> dict:
        """The manifest of `target` for `platform` (default: this host's), as containerd's
        images.Manifest; NotFound when content is missing or nothing matches."""
        matcher = PlatformMatcher(platform)
        found: list[dict] = []
        was_index = False

        async def handler(desc: Descriptor) -> list[Descriptor]:
            nonlocal was_index
            if is_manifest(desc.media_type):
                doc = await self._document(desc, "manifest")
                if desc.digest != target.digest:
                    if desc.platform is not None and not matcher.match(desc.platform):
                        return []
                    if desc.platform is None:
                        config = await self._read_json(Descriptor.from_json(doc.get("config") or {}))
                        config = config if isinstance(config, dict) else {}
                        if not matcher.match(Platform(str(config.get("os", "")), str(config.get("architecture", "")))):
                            return []
                found.append(doc)
                return []
            if is_index(desc.media_type):
                doc = await self._document(desc, "manifest")
                descs = [Descriptor.from_json(d) for d in doc.get("manifests") or []]
                descs = matcher.sort([d for d in descs if d.platform is None or matcher.match(d.platform)])
                was_index = True
                return descs[:1]
            raise errdefs.NotFound(f"unexpected media type {desc.media_type} for {desc.digest}")

        await self._walk(target, handler)
        if not found:
            if was_index:
                raise errdefs.NotFound(f"no match for platform in manifest {target.digest}")
            raise errdefs.NotFound(f"manifest {target.digest}")
        return found[0]

    async def check(self, image: Image, platform: Optional[Platform] = None) -> CheckResult:
        """Whether everything the image needs on `platform` is in the content store (containerd's
        images.Check: the manifest's config and layers; their children are not looked at)."""
        try:
            manifest = await self.manifest(image.target, platform)
        except errdefs.NotFound:
            return CheckResult(False, (image.target,), (), (image.target,))
        except errdefs.ContainerdError as err:
            raise type(err)(f"failed to check image {image.target.digest}: {err.message}") from None
        required = [Descriptor.from_json(manifest.get("config") or {})]
        required += [Descriptor.from_json(d) for d in manifest.get("layers") or []]
        present, missing = [], []
        for desc in required:
            (present if await self._exists(desc.digest) else missing).append(desc)
        return CheckResult(True, tuple(required), tuple(present), tuple(missing))

    async def rootfs(self, image: Image, platform: Optional[Platform] = None) -> list[str]:
        """The diff ids of the image's layers on `platform`, from its config."""
        manifest = await self.manifest(image.target, platform)
        config = await self._read_json(Descriptor.from_json(manifest.get("config") or {}))
        rootfs = config.get("rootfs") if isinstance(config, dict) else None
        if not isinstance(rootfs, dict):
            return []
        return [str(d) for d in rootfs.get("diff_ids") or []]

    async def unpacked(self, image: Image, snapshotter: str = "", platform: Optional[Platform] = None) -> bool:
        """Whether the image's layers are unpacked in `snapshotter` (default: $CONTAINERD_SNAPSHOTTER
        or overlayfs): its chain id is a committed snapshot there."""
        diff_ids = await self.rootfs(image, platform)
        return await self._snapshots.exists(snapshotter or DEFAULT_SNAPSHOTTER, chain_id(diff_ids))
