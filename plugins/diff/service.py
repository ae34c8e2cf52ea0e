"""The diff service (`io.containerd.service.v1.diff-service`): the configured differs tried in
order, the next one only while a differ answers NotImplemented (containerd's services/diff);
and its gRPC adapter (`io.containerd.grpc.v1.diff`), which only translates messages."""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from pycontainerd.api.gen.containerd import types
from pycontainerd.api.gen.containerd.services.diff import v1 as api
from pycontainerd.core import errdefs
from pycontainerd.core.mount import Mount

from .walking import Descriptor


class DiffService:
    def __init__(self, differs: list[Any]):
        self.differs = list(differs)

    async def apply(self, desc: Descriptor, mounts: Iterable[Any],
                    payloads: Optional[Mapping[str, Any]] = None) -> Descriptor:
        """Apply layer `desc` (in the request's namespace) onto `mounts`; the applied
        (uncompressed) descriptor."""
        mounts = [Mount.from_any(m) for m in mounts]
        err: Optional[BaseException] = errdefs.Unimplemented("no differ configured")
        for differ in self.differs:
            try:
                return await differ.apply(desc, mounts, payloads)
            except errdefs.Unimplemented as e:
                err = e
        raise err

    async def compare(self, lower: Iterable[Any], upper: Iterable[Any], media_type: str = "",
                      ref: str = "", labels: Optional[Mapping[str, str]] = None) -> Descriptor:
        """Write the layer turning `lower` into `upper` into the content store; its descriptor."""
        lower = [Mount.from_any(m) for m in lower]
        upper = [Mount.from_any(m) for m in upper]
        err: Optional[BaseException] = errdefs.Unimplemented("no differ configured")
        for differ in self.differs:
            try:
                return await differ.compare(lower, upper, media_type, ref, labels)
            except errdefs.Unimplemented as e:
                err = e
        raise err


def descriptor_from_pb(d: Optional[types.Descriptor]) -> Descriptor:
    if d is None:
        return Descriptor()
    return Descriptor(media_type=d.media_type, digest=d.digest, size=d.size,
                      annotations=dict(d.annotations or {}))


def descriptor_to_pb(d: Descriptor) -> types.Descriptor:
    return types.Descriptor(media_type=d.media_type, digest=d.digest, size=d.size,
                            annotations=dict(d.annotations or {}))


def _mounts(ms: Iterable[types.Mount]) -> list[Mount]:
    # containerd's toMounts drops the target
    return [Mount(m.type, m.source, "", list(m.options)) for m in ms or []]


class DiffGRPC(api.DiffBase):
    def __init__(self, service: DiffService):
        self.service = service

    async def apply(self, request: api.ApplyRequest) -> api.ApplyResponse:
        applied = await self.service.apply(descriptor_from_pb(request.diff), _mounts(request.mounts),
                                           dict(request.payloads or {}))
        return api.ApplyResponse(applied=descriptor_to_pb(applied))

    async def diff(self, request: api.DiffRequest) -> api.DiffResponse:
        d = await self.service.compare(_mounts(request.left), _mounts(request.right), request.media_type,
                                       request.ref, dict(request.labels or {}))
        return api.DiffResponse(diff=descriptor_to_pb(d))
