"""grpc.health.v1 (`io.containerd.grpc.v1.healthcheck`): SERVING once the daemon serves at all."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

from pycontainerd.api.gen.grpc.health import v1 as api
from pycontainerd.core.plugin import InitContext, PluginType, Registration, hookimpl

SERVING = api.HealthCheckResponseServingStatus.SERVING


class HealthService(api.HealthBase):
    async def check(self, request: api.HealthCheckRequest) -> api.HealthCheckResponse:
        return api.HealthCheckResponse(status=SERVING)

    async def watch(self, request: api.HealthCheckRequest) -> AsyncIterator[api.HealthCheckResponse]:
        yield api.HealthCheckResponse(status=SERVING)
        await asyncio.Event().wait()


async def init(ctx: InitContext) -> HealthService:
    return HealthService()


@hookimpl
def pycontainerd_register(registry):
    registry.register(Registration(PluginType.GRPC, "healthcheck", init))
