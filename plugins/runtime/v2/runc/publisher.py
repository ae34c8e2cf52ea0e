"""Events from the shim to the daemon: containerd.services.events.ttrpc.v1.Events/Forward on the
daemon's ttrpc address (TTRPC_ADDRESS), in the shim's namespace.

`publish` never blocks and never fails: it stamps the envelope (now, namespace, topic, the event
packed in an Any under containerd's type URL) and queues it. One sender forwards the queue in
order, each call with a 5 s deadline (as the Go shim). While the daemon is away (not listening,
restarting, answering errors) the sender keeps the event at the head of the queue and retries
with backoff (0.1 s doubling to 2 s), reconnecting as needed; an event that still fails after
MAX_ATTEMPTS tries is dropped with an error in the log, so one poisoned event cannot stall the
stream forever. Unlike the Go shim (which requeues a failed event behind later ones), order is
kept: a subscriber never sees /tasks/exit before the /tasks/start it follows.

`close(timeout)` stops taking events and flushes what is queued for at most `timeout` seconds
(the Go shim waits 5 s for its publisher on exit).
"""
from __future__ import annotations

import asyncio
import collections
from datetime import datetime, timezone
from typing import Any

import structlog
from betterproto.lib.google.protobuf import Any as ProtoAny

from pycontainerd.api.gen.containerd.services.events.ttrpc.v1 import Envelope, ForwardRequest
from pycontainerd.core import errdefs
from pycontainerd.core.events import type_url
from pycontainerd.core.ttrpc import TtrpcClient

log = structlog.get_logger("pyrunc.publisher")

SERVICE = "containerd.services.events.ttrpc.v1.Events"
FORWARD_TIMEOUT = 5.0
MAX_ATTEMPTS = 12
BACKOFF_MIN = 0.1
BACKOFF_MAX = 2.0
QUEUE_MAX = 8192


class Publisher:
    def __init__(self, address: str, namespace: str) -> None:
        self.address = address
        self.namespace = namespace
        self._queue: collections.deque[tuple[str, bytes]] = collections.deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._client: TtrpcClient | None = None
        self._task: asyncio.Task | None = None
        self.sent = 0
        self.dropped = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def publish(self, topic: str, event: Any) -> None:
        if self._closing:
            log.warning("event published after close, dropped", topic=topic)
            return
        if len(self._queue) >= QUEUE_MAX:
            dropped = self._queue.popleft()
            self.dropped += 1
            log.error("event queue full, dropping the oldest event", topic=dropped[0])
        envelope = Envelope(timestamp=datetime.now(timezone.utc), namespace=self.namespace, topic=topic,
                            event=ProtoAny(type_url=type_url(event), value=bytes(event)))
        self._queue.append((topic, bytes(ForwardRequest(envelope=envelope))))
        self._wakeup.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def _connect(self) -> TtrpcClient:
        if self._client is None or self._client.closed:
            if self._client is not None:
                await self._client.close()
            self._client = await TtrpcClient.connect(self.address, timeout=FORWARD_TIMEOUT,
                                                     namespace=self.namespace)
        return self._client

    async def _forward(self, payload: bytes) -> None:
        client = await self._connect()
        await client.call(SERVICE, "Forward", payload, None, timeout=FORWARD_TIMEOUT)

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            topic, payload = self._queue[0]
            attempt = 0
            backoff = BACKOFF_MIN
            while True:
                attempt += 1
                try:
                    await self._forward(payload)
                    self.sent += 1
                    break
                except (errdefs.ContainerdError, OSError) as err:
                    if isinstance(err, errdefs.Unavailable) and self._client is not None and self._client.closed:
                        self._client = None
                    if attempt >= MAX_ATTEMPTS:
                        self.dropped += 1
                        log.error("evicting event from queue because of retry count", topic=topic,
                                  error=str(err))
                        break
                    log.error("forward event", topic=topic, error=str(err), attempt=attempt)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
            if self._queue and self._queue[0][1] is payload:
                self._queue.popleft()

    async def close(self, timeout: float = 5.0) -> None:
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except asyncio.TimeoutError:
                log.error("publisher not closed", pending=len(self._queue))
                self._task.cancel()
        if self._client is not None:
            await self._client.close()
            self._client = None

