"""`client.events`: subscribe to the daemon's event stream and publish events into it."""
from __future__ import annotations

from typing import Any, AsyncIterator, Iterable, Optional

import betterproto
from betterproto.lib.google.protobuf import Any as AnyMessage

from pycontainerd.api.gen.containerd.services.events import v1 as api

from . import typeurl
from ._base import DEFAULT, ServiceAPI
from .types import Envelope


class EventsAPI(ServiceAPI):
    stub_class = api.EventsStub

    async def subscribe(self, filters: Iterable[str] = (), *,
                        timeout: Optional[float] = None) -> AsyncIterator[Envelope]:
        """Events from every namespace as they happen, until the caller stops iterating.

        `filters` are containerd filter expressions, e.g. 'topic~="/namespaces/"' or
        'namespace==default'; several are OR-ed."""
        req = api.SubscribeRequest(filters=list(filters))
        async for env in self._stream("subscribe", req, timeout=timeout):
            event = env.event
            yield Envelope(
                timestamp=env.timestamp,
                namespace=env.namespace,
                topic=env.topic,
                type_url=event.type_url if event is not None else "",
                value=bytes(event.value) if event is not None else b"",
                event=typeurl.unpack(event),
            )

    async def publish(self, topic: str, event: Any, *, type_url: Optional[str] = None,
                      timeout: Any = DEFAULT) -> None:
        """Publish `event` (a generated message, or an Any already packed) on `topic` in the
        client's namespace. Topics look like paths: "/my/thing/happened"."""
        if isinstance(event, AnyMessage):
            packed = event
        elif isinstance(event, betterproto.Message):
            packed = typeurl.pack(event, type_url)
        else:
            raise TypeError(f"event must be a generated message or an Any, not {type(event).__name__}")
        await self._unary("publish", api.PublishRequest(topic=topic, event=packed), timeout=timeout)
