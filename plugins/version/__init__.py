"""The version gRPC service (`io.containerd.grpc.v1.version`)."""
from __future__ import annotations

from betterproto.lib.google.protobuf import Empty

from pycontainerd.api.gen.containerd.services.version import v1 as api
from pycontainerd.core.plugin import InitContext, PluginType, Registration, hookimpl
from pycontainerd.core.version import REVISION, VERSION


class VersionService(api.VersionBase):
    def __init__(self) -> None:
        # The answer never changes: built once, not per call (only ever serialised).
        self._response = api.VersionResponse(version=VERSION, revision=REVISION)

    async def version(self, request: Empty) -> api.VersionResponse:
        return self._response


async def init(ctx: InitContext) -> VersionService:
    return VersionService()


@hookimpl
def pycontainerd_register(registry):
    registry.register(Registration(PluginType.GRPC, "version", init))
