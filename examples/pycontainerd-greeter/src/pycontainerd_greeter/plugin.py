"""The plugin itself: its config, its init and close, and the hook that registers it.

The daemon imports this module through the entry point declared in pyproject.toml

    [project.entry-points."pycontainerd.plugins"]
    greeter = "pycontainerd_greeter.plugin"

and calls `pycontainerd_register(registry)`, which adds one Registration. From then on the plugin
is configured, disabled, required and listed like any built-in one:

    [plugins."io.containerd.grpc.v1.greeter"]
      greeting = "ahoy"
      shout = false
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from pycontainerd.core.plugin import InitContext, PluginType, Registration, hookimpl

from .server import GreeterService
from .service import Greeter

COUNTS_FILE = "calls.json"


@dataclass
class GreeterConfig:
    """The `[plugins."io.containerd.grpc.v1.greeter"]` table; every field needs a default."""

    greeting: str = "hello"
    shout: bool = False


async def init(ctx: InitContext) -> GreeterService:
    """Build the service from the config; fail (status "error" in `plugins ls`) on a bad one."""
    cfg: GreeterConfig = ctx.config
    greeter = Greeter(cfg.greeting, shout=cfg.shout, path=ctx.root / COUNTS_FILE)
    await asyncio.to_thread(greeter.load)  # file I/O stays off the event loop
    ctx.meta.exports["greeting"] = cfg.greeting
    # A betterproto ServiceBase returned by an io.containerd.grpc.v1 plugin is served on the
    # daemon's gRPC socket. To serve more than one service (or on ttrpc too), return any object
    # with `grpc_services` / `ttrpc_services` lists instead.
    return GreeterService(greeter)


async def close(service: GreeterService) -> None:
    """Keep the counts across restarts; the daemon calls this on a clean shutdown."""
    await asyncio.to_thread(service.greeter.save)


@hookimpl
def pycontainerd_register(registry):
    """Called once at daemon start: register, do no I/O, start nothing."""
    registry.register(Registration(
        type=PluginType.GRPC,
        id="greeter",
        init=init,
        close=close,
        config=GreeterConfig,
    ))
