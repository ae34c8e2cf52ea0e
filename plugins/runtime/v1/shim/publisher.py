"""Events from the v1 shim to the daemon.

`new_publisher` picks the transport: with TTRPC_ADDRESS in the environment (our v1 runtime sets
it) the runc package's Publisher forwards envelopes over ttrpc (Events/Forward); without it — a
shim started by containerd itself — `BinaryPublisher` runs the daemon binary as the Go shim does:
`<containerd-binary> --address GRPC publish --topic T --namespace NS` with the marshalled Any on
stdin. Both keep the runc Publisher's queue, order, retries and `close(timeout)` flush:
BinaryPublisher only replaces how one queued envelope is sent.

`V1Events` sits between the runc TaskService and the publisher: a v1 shim sends its processes'
exits (and, since our daemon has no cgroups task monitor, OOMs); /tasks/create, /start, /delete,
/paused, /resumed and /exec-started come from the daemon's v1 runtime itself.
"""
from __future__ import annotations

import asyncio
import os

from . import runc

_publisher = runc("publisher")

FORWARDED_TOPICS = frozenset({"/tasks/exit", "/tasks/oom"})


class BinaryPublisher(_publisher.Publisher):
    """Sends each event by running the daemon's `publish` subcommand (containerd's
    remoteEventsPublisher)."""

    def __init__(self, binary: str, address: str, namespace: str, reaper) -> None:
        super().__init__(address, namespace)
        self.binary = binary
        self.reaper = reaper

    async def _forward(self, payload: bytes) -> None:
        from pycontainerd.api.gen.containerd.services.events.ttrpc.v1 import ForwardRequest
        from pycontainerd.core import errdefs

        envelope = ForwardRequest().parse(payload).envelope
        argv = [self.binary, "--address", self.address, "publish", "--topic", envelope.topic,
                "--namespace", self.namespace]
        code, out = await asyncio.wait_for(
            self.reaper.run(argv, input=bytes(envelope.event)), _publisher.FORWARD_TIMEOUT * 2)
        if code != 0:
            raise errdefs.Unknown(f"failed to publish event: {out.decode(errors='replace').strip()}: "
                                  f"exit status {code}")


def new_publisher(flags, reaper):
    ttrpc_address = os.environ.get("TTRPC_ADDRESS", "")
    if ttrpc_address:
        return _publisher.Publisher(ttrpc_address, flags.namespace)
    return BinaryPublisher(flags.containerd_binary, flags.address, flags.namespace, reaper)


class V1Events:
    """What the runc TaskService publishes through, keeping only what a v1 shim sends."""

    def __init__(self, publisher) -> None:
        self.publisher = publisher

    def publish(self, topic: str, event) -> None:
        if topic in FORWARDED_TOPICS:
            self.publisher.publish(topic, event)

    async def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far was sent (or dropped); False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.publisher.pending:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True
