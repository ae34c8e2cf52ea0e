"""Leases: the lease manager (`io.containerd.lease.v1.manager`), which also removes leases whose
`containerd.io/gc.expire` time has passed, and the leases gRPC service (`io.containerd.grpc.v1.leases`)."""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import structlog
from betterproto.lib.google.protobuf import Empty

from pycontainerd.api.gen.containerd.services.leases import v1 as api
from pycontainerd.core.context import namespace
from pycontainerd.core.plugin import InitContext, PluginType, Registration, hookimpl
from pycontainerd.plugins.metadata.leases import Lease, LeaseStore, Resource

log = structlog.get_logger(__name__)


@dataclass
class ManagerConfig:
    expiry_check_interval: float = 10.0
    """Seconds between two sweeps for expired leases."""


class LeaseManager:
    """Leases of the request's namespace, over the metadata store."""

    def __init__(self, store: LeaseStore, interval: float):
        self.store = store
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep(interval))

    async def _sweep(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                for ns, lease_id in self.store.delete_expired():
                    log.info("lease expired", namespace=ns, lease=lease_id)
            except Exception:
                log.warning("expired lease sweep failed", exc_info=True)

    async def close(self) -> None:
        self._sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sweeper

    def create(self, lease_id: str, labels: dict[str, str]) -> Lease:
        return self.store.create(namespace(), lease_id, labels)

    def delete(self, lease_id: str) -> None:
        self.store.delete(namespace(), lease_id)

    def list(self, filters: list[str]) -> list[Lease]:
        return self.store.list(namespace(), filters)

    def add_resource(self, lease_id: str, resource: Resource) -> None:
        self.store.add_resource(namespace(), lease_id, resource)

    def delete_resource(self, lease_id: str, resource: Resource) -> None:
        self.store.delete_resource(namespace(), lease_id, resource)

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
        self.manager.delete(request.id)
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
    return LeaseManager(ctx.get(PluginType.METADATA).leases, ctx.config.expiry_check_interval)


async def close_manager(manager: LeaseManager) -> None:
    await manager.close()


async def init_service(ctx: InitContext) -> LeasesService:
    return LeasesService(ctx.get(PluginType.LEASE))


@hookimpl
def pycontainerd_register(registry):
    registry.register(Registration(PluginType.LEASE, "manager", init_manager, requires=(PluginType.METADATA,),
                                   config=ManagerConfig, close=close_manager))
    registry.register(Registration(PluginType.GRPC, "leases", init_service, requires=(PluginType.LEASE,)))
