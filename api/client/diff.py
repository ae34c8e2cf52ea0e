"""`client.diff`: the Diff service — apply a layer blob from the content store onto snapshot
mounts (what unpacking an image does per layer), and compare two mounts into a new layer blob.

    applied = await client.diff.apply(layer_desc, await client.snapshots.prepare(key, parent))
    # applied.digest is the layer's diff_id (media type ...layer.v1.tar)
    desc = await client.diff.compare(lower_mounts, upper_mounts)   # gzip layer in the content store

Descriptors go in as anything with media_type/digest/size (or a dict, or a generated message)
and come back as this module's Descriptor (media_type, digest, size, annotations); mounts are core.mount.Mount (what `client.snapshots` returns), dicts or
generated messages. Both calls run in the client's namespace.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

from pycontainerd.api.gen.containerd import types
from pycontainerd.api.gen.containerd.services.diff import v1 as api
from pycontainerd.core.mount import Mount

from ._base import DEFAULT, ServiceAPI

MEDIA_TYPE_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_LAYER_GZIP = MEDIA_TYPE_LAYER + "+gzip"


@dataclass(frozen=True)
class Descriptor:
    """A layer descriptor as the Diff service returns it."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)


def _desc_pb(d: Any) -> types.Descriptor:
    if isinstance(d, types.Descriptor):
        return d
    if isinstance(d, dict):
        return types.Descriptor(media_type=d.get("media_type") or d.get("mediaType", ""),
                                digest=d.get("digest", ""), size=int(d.get("size", 0)),
                                annotations=dict(d.get("annotations") or {}))
    return types.Descriptor(media_type=d.media_type, digest=d.digest, size=d.size,
                            annotations=dict(getattr(d, "annotations", None) or {}))


def _desc(msg: Optional[types.Descriptor]) -> Descriptor:
    if msg is None:
        return Descriptor("", "", 0)
    return Descriptor(media_type=msg.media_type, digest=msg.digest, size=msg.size,
                      annotations=dict(msg.annotations or {}))


def _mounts_pb(mounts: Iterable[Any]) -> list[types.Mount]:
    out = []
    for m in mounts:
        m = Mount.from_any(m)
        out.append(types.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options)))
    return out


class DiffAPI(ServiceAPI):
    stub_class = api.DiffStub

    async def apply(self, desc: Any, mounts: Iterable[Any], *, payloads: Optional[Mapping[str, Any]] = None,
                    timeout: Any = DEFAULT) -> Descriptor:
        """Apply the layer `desc` (a Descriptor, dict or generated message naming a blob in the
        content store) onto `mounts`; the applied uncompressed descriptor (digest = diff_id)."""
        req = api.ApplyRequest(diff=_desc_pb(desc), mounts=_mounts_pb(mounts), payloads=dict(payloads or {}))
        resp = await self._unary("apply", req, timeout=timeout)
        return _desc(resp.applied)

    async def compare(self, lower: Iterable[Any], upper: Iterable[Any], *, media_type: str = "",
                      ref: str = "", labels: Optional[Mapping[str, str]] = None,
                      timeout: Any = DEFAULT) -> Descriptor:
        """Write the layer turning `lower` into `upper` into the content store (gzip unless
        `media_type` says ...layer.v1.tar) and return its descriptor. The blob carries the
        `containerd.io/uncompressed` label and `labels` (e.g. a gc root or lease-related ones)."""
        req = api.DiffRequest(left=_mounts_pb(lower), right=_mounts_pb(upper), media_type=media_type,
                              ref=ref, labels=dict(labels or {}))
        resp = await self._unary("diff", req, timeout=timeout)
        return _desc(resp.diff)
