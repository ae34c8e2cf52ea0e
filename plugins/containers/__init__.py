"""Containers: the plain service (`io.containerd.service.v1.containers-service`) over the metadata
store, publishing /containers/create, /update and /delete with containerd's payloads, and the
gRPC adapter (`io.containerd.grpc.v1.containers`: Get, List, ListStream, Create, Update, Delete).

The service works in the request's namespace (core.context) and takes and returns the store's
plain `Container` records; only the adapter sees protobuf messages. It must not know tasks:
deleting a container that still has a task is the client's check, as in containerd.
"""
from __future__ import annotations

from typing import AsyncIterator, Iterable, Optional

import betterproto
from betterproto.lib.google.protobuf import Any as ProtoAny
from betterproto.lib.google.protobuf import Empty

from pycontainerd.api.gen.containerd import events as ev
from pycontainerd.api.gen.containerd.services.containers import v1 as api
from pycontainerd.core import errdefs
from pycontainerd.core.context import namespace
from pycontainerd.core.plugin import InitContext, PluginType, Registration, hookimpl
from pycontainerd.plugins.metadata.containers import Container, ContainerStore, TypedValue

SERVICE_ID = "containers-service"


class ContainersService:
    """containerd's local containers service: the store in the request's namespace, plus events."""

    def __init__(self, store: ContainerStore, events):
        self.store, self.events = store, events

    def get(self, container_id: str) -> Container:
        return self.store.get(namespace(), container_id)

    def list(self, filters: Iterable[str] = ()) -> list[Container]:
        return self.store.list(namespace(), list(filters))

    def create(self, container: Container) -> Container:
        ns = namespace()
        created = self.store.create(ns, container)
        self.events.publish(ns, "/containers/create", ev.ContainerCreate(
            id=created.id, image=created.image,
            runtime=ev.ContainerCreateRuntime(name=created.runtime_name,
                                              options=_any_pb(created.runtime_options))))
        return created

    def update(self, container: Container, paths: Iterable[str] = ()) -> Container:
        ns = namespace()
        updated = self.store.update(ns, container, paths)
        self.events.publish(ns, "/containers/update", ev.ContainerUpdate(
            id=updated.id, image=updated.image, labels=dict(updated.labels),
            snapshot_key=updated.snapshot_key))
        return updated

    def delete(self, container_id: str) -> None:
        ns = namespace()
        self.store.delete(ns, container_id)
        self.events.publish(ns, "/containers/delete", ev.ContainerDelete(id=container_id))


# -- protobuf <-> records --------------------------------------------------------------------

def _present(msg: Optional[betterproto.Message]) -> bool:
    return msg is not None and betterproto.serialized_on_wire(msg)


def _any_value(msg: Optional[ProtoAny]) -> Optional[TypedValue]:
    if not _present(msg):
        return None
    return TypedValue(msg.type_url, bytes(msg.value))


def _any_pb(value: Optional[TypedValue]) -> Optional[ProtoAny]:
    if value is None:
        return None
    return ProtoAny(type_url=value.type_url, value=value.value)


def from_pb(pb: Optional[api.Container]) -> Container:
    if pb is None:
        return Container(id="")
    runtime = pb.runtime if _present(pb.runtime) else None
    return Container(
        id=pb.id, labels=dict(pb.labels), image=pb.image,
        runtime_name=runtime.name if runtime else "",
        runtime_options=_any_value(runtime.options) if runtime else None,
        spec=_any_value(pb.spec), snapshotter=pb.snapshotter, snapshot_key=pb.snapshot_key,
        extensions={k: TypedValue(v.type_url, bytes(v.value)) for k, v in pb.extensions.items()})


def to_pb(c: Container) -> api.Container:
    pb = api.Container(
        id=c.id, labels=dict(c.labels), image=c.image,
        runtime=api.ContainerRuntime(name=c.runtime_name, options=_any_pb(c.runtime_options)),
        snapshotter=c.snapshotter, snapshot_key=c.snapshot_key,
        created_at=c.created_at, updated_at=c.updated_at,
        extensions={k: ProtoAny(type_url=v.type_url, value=v.value) for k, v in c.extensions.items()})
    if c.spec is not None:
        pb.spec = _any_pb(c.spec)
    return pb


class ContainersGRPC(api.ContainersBase):
    """Thin adapter: messages in, service calls, messages out."""

    def __init__(self, service: ContainersService):
        self.service = service

    async def get(self, request: api.GetContainerRequest) -> api.GetContainerResponse:
        return api.GetContainerResponse(container=to_pb(self.service.get(request.id)))

    async def list(self, request: api.ListContainersRequest) -> api.ListContainersResponse:
        return api.ListContainersResponse(containers=[to_pb(c) for c in self.service.list(request.filters)])

    async def list_stream(self, request: api.ListContainersRequest) -> AsyncIterator[api.ListContainerMessage]:
        # One read of the store (a consistent snapshot), then one message per container, as
        # containerd streams them.
        for c in self.service.list(request.filters):
            yield api.ListContainerMessage(container=to_pb(c))

    async def create(self, request: api.CreateContainerRequest) -> api.CreateContainerResponse:
        return api.CreateContainerResponse(container=to_pb(self.service.create(from_pb(request.container))))

    async def update(self, request: api.UpdateContainerRequest) -> api.UpdateContainerResponse:
        if request.container is None or not request.container.id:
            raise errdefs.InvalidArgument("Container.ID required")
        paths = list(request.update_mask.paths) if _present(request.update_mask) else []
        updated = self.service.update(from_pb(request.container), paths)
        return api.UpdateContainerResponse(container=to_pb(updated))

    async def delete(self, request: api.DeleteContainerRequest) -> Empty:
        self.service.delete(request.id)
        return Empty()


async def init_service(ctx: InitContext) -> ContainersService:
    md = ctx.get(PluginType.METADATA)
    return ContainersService(ContainerStore(md.db), ctx.get(PluginType.EVENT))


async def init_grpc(ctx: InitContext) -> ContainersGRPC:
    return ContainersGRPC(ctx.get(PluginType.SERVICE, SERVICE_ID))


@hookimpl
def pycontainerd_register(registry):
    registry.register(Registration(PluginType.SERVICE, SERVICE_ID, init_service,
                                   requires=(PluginType.EVENT, PluginType.METADATA)))
    registry.register(Registration(PluginType.GRPC, "containers", init_grpc,
                                   requires=(f"{PluginType.SERVICE}.{SERVICE_ID}",)))
