"""The namespaces gRPC service (`io.containerd.grpc.v1.namespaces`) over the metadata store,
publishing /namespaces/create, /update and /delete."""
from __future__ import annotations

from pycontainerd.api.gen.containerd import events as ev
from pycontainerd.api.gen.containerd.services.namespaces import v1 as api
from pycontainerd.core.context import namespace
from pycontainerd.core.plugin import InitContext, PluginType, Registration, hookimpl
from pycontainerd.plugins.metadata.namespaces import Namespace, NamespaceStore

from betterproto.lib.google.protobuf import Empty


def _pb(ns: Namespace) -> api.Namespace:
    return api.Namespace(name=ns.name, labels=ns.labels)


class NamespacesService(api.NamespacesBase):
    def __init__(self, store: NamespaceStore, events):
        self.store, self.events = store, events

    async def get(self, request: api.GetNamespaceRequest) -> api.GetNamespaceResponse:
        return api.GetNamespaceResponse(namespace=_pb(self.store.get(request.name)))

    async def list(self, request: api.ListNamespacesRequest) -> api.ListNamespacesResponse:
        return api.ListNamespacesResponse(namespaces=[_pb(ns) for ns in self.store.list()])

    async def create(self, request: api.CreateNamespaceRequest) -> api.CreateNamespaceResponse:
        ns = self.store.create(request.namespace.name, request.namespace.labels)
        self.events.publish(namespace(), "/namespaces/create", ev.NamespaceCreate(name=ns.name, labels=ns.labels))
        return api.CreateNamespaceResponse(namespace=_pb(ns))

    async def update(self, request: api.UpdateNamespaceRequest) -> api.UpdateNamespaceResponse:
        paths = list(request.update_mask.paths) if request.update_mask else []
        ns = self.store.update(request.namespace.name, request.namespace.labels, paths)
        self.events.publish(namespace(), "/namespaces/update", ev.NamespaceUpdate(name=ns.name, labels=ns.labels))
        return api.UpdateNamespaceResponse(namespace=_pb(ns))

    async def delete(self, request: api.DeleteNamespaceRequest) -> Empty:
        self.store.delete(request.name)
        self.events.publish(request.name, "/namespaces/delete", ev.NamespaceDelete(name=request.name))
        return Empty()


async def init(ctx: InitContext) -> NamespacesService:
    return NamespacesService(ctx.get(PluginType.METADATA).namespaces, ctx.events)


@hookimpl
def pycontainerd_register(registry):
    registry.register(Registration(PluginType.GRPC, "namespaces", init, requires=(PluginType.METADATA,)))
