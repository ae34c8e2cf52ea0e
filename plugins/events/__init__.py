"""Events: the exchange as a plugin (`io.containerd.event.v1.exchange`), the events gRPC service
(`io.containerd.grpc.v1.events`: Publish, Forward, Subscribe) and the ttrpc Events service shims
forward their task events to (`containerd.services.events.ttrpc.v1.Events/Forward`)."""
from __future__ import annotations

from typing import AsyncIterator

from betterproto.lib.google.protobuf import Empty

from pycontainerd.api.gen.containerd.services.events import v1 as api
from pycontainerd.api.gen.containerd.services.events.ttrpc import v1 as ttrpc_api
from pycontainerd.core import events as exchange_mod
from pycontainerd.core.context import namespace
from pycontainerd.core.plugin import InitContext, PluginType, Registration, hookimpl


def envelope_from_pb(pb) -> exchange_mod.Envelope:
    return exchange_mod.Envelope(timestamp=pb.timestamp, namespace=pb.namespace, topic=pb.topic, event=pb.event)


class EventsService(api.EventsBase):
    def __init__(self, exchange: exchange_mod.Exchange):
        self.exchange = exchange

    async def publish(self, request: api.PublishRequest) -> Empty:
        self.exchange.publish_any(namespace(), request.topic, request.event)
        return Empty()

    async def forward(self, request: api.ForwardRequest) -> Empty:
        self.exchange.forward(envelope_from_pb(request.envelope))
        return Empty()

    async def subscribe(self, request: api.SubscribeRequest) -> AsyncIterator[api.Envelope]:
        async for env in self.exchange.subscribe(*request.filters):
            yield api.Envelope(timestamp=env.timestamp, namespace=env.namespace, topic=env.topic, event=env.event)


class TTRPCEventsService(ttrpc_api.EventsBase):
    def __init__(self, exchange: exchange_mod.Exchange):
        self.exchange = exchange

    async def forward(self, request: ttrpc_api.ForwardRequest) -> Empty:
        self.exchange.forward(envelope_from_pb(request.envelope))
        return Empty()


class EventsPlugin:
    """The grpc plugin's instance: one service on each server."""

    def __init__(self, exchange: exchange_mod.Exchange):
        self.grpc_services = [EventsService(exchange)]
        self.ttrpc_services = [TTRPCEventsService(exchange)]


async def init_exchange(ctx: InitContext) -> exchange_mod.Exchange:
    return ctx.events


async def init_service(ctx: InitContext) -> EventsPlugin:
    return EventsPlugin(ctx.get(PluginType.EVENT))


@hookimpl
def pycontainerd_register(registry):
    registry.register(Registration(PluginType.EVENT, "exchange", init_exchange))
    registry.register(Registration(PluginType.GRPC, "events", init_service, requires=(PluginType.EVENT,)))
