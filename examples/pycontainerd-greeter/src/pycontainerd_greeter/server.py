"""The gRPC face of the greeter: `greeter.v1.Greeter` as a betterproto service over service.Greeter.

Thin on purpose. The request's namespace comes from the daemon's request context (the gRPC server
binds the `containerd-namespace` header before a handler runs); errdefs exceptions raised here or
in the service become gRPC statuses in the daemon's server, so no handler maps errors itself.
"""
from __future__ import annotations

from pycontainerd.core.context import namespace

from .gen.greeter import v1 as api
from .service import Greeter


class GreeterService(api.GreeterBase):
    def __init__(self, greeter: Greeter):
        self.greeter = greeter

    async def greet(self, greet_request: api.GreetRequest) -> api.GreetResponse:
        ns = namespace()  # FailedPrecondition when the client named no namespace
        message, count = self.greeter.greet(ns, greet_request.name)
        return api.GreetResponse(message=message, namespace=ns, count=count)

    async def stats(self, stats_request: api.StatsRequest) -> api.StatsResponse:
        calls, total = self.greeter.stats()
        return api.StatsResponse(greeting=self.greeter.greeting, calls=calls, total=total)
