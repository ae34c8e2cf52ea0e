"""The introspection gRPC service (`io.containerd.grpc.v1.introspection`): every plugin the init
graph saw, with its status, and the server's UUID (created once, kept under the plugin's root)."""
from __future__ import annotations

import os
import uuid as uuidlib
from pathlib import Path

from betterproto.lib.google.protobuf import Empty
from grpclib.const import Status

from pycontainerd.api.gen.containerd.services.introspection import v1 as api
from pycontainerd.api.gen.containerd.types import Platform
from pycontainerd.api.gen.google.rpc import Status as RpcStatus
from pycontainerd.core import filters
from pycontainerd.core.initgraph import ERROR, SKIP, PluginRecord
from pycontainerd.core.plugin import InitContext, PluginType, Registration, hookimpl

SKIP_MESSAGE = "skip plugin"
"""The stock ctr shows a plugin as `skip` when its init error contains these words."""


def load_uuid(root: Path) -> str:
    """The server UUID stored under `root`, written atomically the first time."""
    path = root / "uuid"
    try:
        return str(uuidlib.UUID(path.read_text().strip()))
    except (FileNotFoundError, ValueError):
        pass
    root.mkdir(parents=True, exist_ok=True)
    value = str(uuidlib.uuid4())
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(value)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return value


def plugin_pb(rec: PluginRecord) -> api.Plugin:
    reg = rec.registration
    pb = api.Plugin(type=reg.type, id=reg.id, requires=list(reg.requires), exports=dict(rec.meta.exports),
                    capabilities=list(rec.meta.capabilities),
                    platforms=[Platform(os=p.get("os", ""), architecture=p.get("architecture", ""),
                                        variant=p.get("variant", "")) for p in rec.meta.platforms])
    if rec.status == SKIP:
        pb.init_err = RpcStatus(code=Status.UNIMPLEMENTED.value, message=f"{rec.error}: {SKIP_MESSAGE}")
    elif rec.status == ERROR:
        pb.init_err = RpcStatus(code=Status.UNKNOWN.value, message=rec.error)
    return pb


class IntrospectionService(api.IntrospectionBase):
    def __init__(self, ctx: InitContext, server_uuid: str):
        self.ctx, self.uuid = ctx, server_uuid

    async def plugins(self, request: api.PluginsRequest) -> api.PluginsResponse:
        match = filters.parse(*request.filters)
        return api.PluginsResponse(plugins=[
            plugin_pb(rec) for rec in self.ctx.plugins()
            if match.match(filters.adaptor_for(type=rec.registration.type, id=rec.registration.id))])

    async def server(self, request: Empty) -> api.ServerResponse:
        return api.ServerResponse(uuid=self.uuid)


async def init(ctx: InitContext) -> IntrospectionService:
    return IntrospectionService(ctx, load_uuid(ctx.root))


@hookimpl
def pycontainerd_register(registry):
    registry.register(Registration(PluginType.GRPC, "introspection", init, requires=("*",)))
