"""Leases: the lease manager (`io.containerd.lease.v1.manager`) and the leases gRPC service
(`io.containerd.grpc.v1.leases`).

Leases whose `containerd.io/gc.expire` time has passed are removed by the garbage collector
(plugins/metadata/gc.py, scheduled by plugins/gc, which wakes up for the next expiry), not here.
Deleting a lease, or a resource from one, marks the metadata database dirty so a collection
follows; Delete with sync waits for that collection, as containerd's does. The ingests only the
deleted lease held go with it (containerd collects them once their lease is gone).
"""
from __future__ import annotations

from typing import Any

from betterproto.lib.google.protobuf import Empty

from pycontainerd.api.gen.containerd.services.leases import v1 as api
from pycontainerd.core.context import namespace
from pycontainerd.core.plugin import InitContext, PluginType, Registration, hookimpl
from pycontainerd.plugins.metadata.gc import drop_unleased_ingests, ingests_only_in
from pycontainerd.plugins.metadata.leases import Lease, LeaseStore, Resource


class LeaseManager:
    """Leases of the request's namespace, over the metadata store; `gc` is the GC scheduler."""

    def __init__(self, store: LeaseStore, gc: Any):
        self.store = store
        self.gc = gc

    def create(self, lease_id: str, labels: dict[str, str]) -> Lease:
        return self.store.create(namespace(), lease_id, labels)

    async def delete(self, lease_id: str, sync: bool = False) -> None:
        """Delete the lease; with `sync`, return after a collection that started afterwards."""
        ns = namespace()
        db = self.store.db
        orphans = ingests_only_in(db, ns, lease_id)
        self.store.delete(ns, lease_id)
        drop_unleased_ingests(db, ns, orphans)
        db.mark_dirty()
        if sync:
            await self.gc.schedule_and_wait()

    def list(self, filters: list[str]) -> list[Lease]:
        return self.store.list(namespace(), filters)

    def add_resource(self, lease_id: str, resource: Resource) -> None:
        self.store.add_resource(namespace(), lease_id, resource)

    def delete_resource(self, lease_id: str, resource: Resource) -> None:
        self.store.delete_resource(namespace(), lease_id, resource)
        self.store.db.mark_dirty()

    def list_resources(self, lease_id: str) -> list[Resource]:
        return self.store.list_resources(namespace(), lease_id)


def _pb(lease: Lease) -> api.Lease:
    return api.Lease(id=lease.id, created_at=lease.created_at, labels=lease.labels)


class LeasesService(api.LeasesBase):
    def __init__(self, manager: LeaseManager):
        self.manager = manager

    async def create(self, request: api.CreateRequest) -> api.CreateResponse:
        return api.CreateResponse(lease=_pb(self.manager.create(request.id, dict(request.labels))))

    async def delete(self, request: api.DeleteRequest) -> Empty:
        await self.manager.delete(request.id, sync=request.sync)
        return Empty()

    async def list(self, request: api.ListRequest) -> api.ListResponse:
        return api.ListResponse(leases=[_pb(lease) for lease in self.manager.list(list(request.filters))])

    async def add_resource(self, request: api.AddResourceRequest) -> Empty:
        self.manager.add_resource(request.id, Resource(request.resource.id, request.resource.type))
        return Empty()

    async def delete_resource(self, request: api.DeleteResourceRequest) -> Empty:
        self.manager.delete_resource(request.id, Resource(request.resource.id, request.resource.type))
        return Empty()

    async def list_resources(self, request: api.ListResourcesRequest) -> api.ListResourcesResponse:
        return api.ListResourcesResponse(resources=[api.Resource(id=r.id, type=r.type)
                                                    for r in self.manager.list_resources(request.id)])


async def init_manager(ctx: InitContext) -> LeaseManager:
    return LeaseManager(ctx.get(PluginType.METADATA).leases, ctx.get(PluginType.GC))


async def init_service(ctx: InitContext) -> LeasesService:
    return LeasesService(ctx.get(PluginType.LEASE))


@hookimpl
def pycontainerd_register(registry):
    registry.register(Registration(PluginType.LEASE, "manager", init_manager,
                                   requires=(PluginType.METADATA, PluginType.GC)))
    registry.register(Registration(PluginType.GRPC, "leases", init_service, requires=(PluginType.LEASE,)))
