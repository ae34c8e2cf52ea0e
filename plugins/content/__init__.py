"""Content: the local blob store (`io.containerd.content.v1.content`, plugins/content/local.py),
the namespaced content service over it (`io.containerd.service.v1.content-service`) and its gRPC
API (`io.containerd.grpc.v1.content`), both in plugins/content/service.py.

What other plugins use:
- `ctx.get(PluginType.CONTENT)` -> LocalStore, the backend (not namespaced): the garbage
  collector walks and deletes blobs and ingests there (see local.py's docstring).
- `ctx.get(PluginType.SERVICE, "content-service")` -> ContentService, for the request's
  namespace and lease (core/context); its `.store` is the namespaced
  plugins.metadata.content.ContentStore, which takes the namespace explicitly and holds `lock`,
  the lock the collector takes exclusively.
"""
from __future__ import annotations

from dataclasses import dataclass

from pycontainerd.core.plugin import InitContext, PluginType, Registration, hookimpl

from .local import LocalStore


async def init_local(ctx: InitContext) -> LocalStore:
    ctx.root.mkdir(parents=True, exist_ok=True)
    store = LocalStore(ctx.root)
    ctx.meta.exports["root"] = str(ctx.root)
    return store


@dataclass
class ServiceConfig:
    content_sharing_policy: str = "shared"
    """"shared": a blob committed in one namespace can be added to another by proving its digest
    (containerd's default); "isolated": every namespace must send the bytes itself."""


async def init_service(ctx: InitContext):
    from pycontainerd.plugins.metadata.content import ContentStore

    from .service import ContentService

    metadata = ctx.get(PluginType.METADATA)
    backend = ctx.get(PluginType.CONTENT)
    return ContentService(ContentStore(metadata.db, backend, ctx.config.content_sharing_policy), ctx.events)


async def init_grpc(ctx: InitContext):
    from .service import ContentGRPC

    service = ctx.get_all(PluginType.SERVICE).get("content-service")
    if service is None:
        raise RuntimeError("content store service not found")
    return ContentGRPC(service)


@hookimpl
def pycontainerd_register(registry):
    registry.register(Registration(PluginType.CONTENT, "content", init_local))
    registry.register(Registration(PluginType.SERVICE, "content-service", init_service,
                                   requires=(PluginType.EVENT, PluginType.METADATA, PluginType.CONTENT),
                                   config=ServiceConfig))
    registry.register(Registration(PluginType.GRPC, "content", init_grpc, requires=(PluginType.SERVICE,)))
