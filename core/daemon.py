"""The daemon's lifecycle: collect plugins, initialise them in order, serve them over gRPC and
ttrpc, tell systemd we are ready, and shut down cleanly on SIGTERM/SIGINT.

Serving starts only after every plugin has initialised. Shutdown stops accepting, lets calls in
flight finish (bounded), closes plugins in reverse init order and removes the sockets.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path
from typing import Any, Callable

import structlog
from betterproto.grpc.grpclib_server import ServiceBase

from .events import Exchange
from .grpcserver import GRPCServer
from .initgraph import OK, InitGraph
from .plugin import PluginType, Registration
from .ttrpc import TtrpcServer

log = structlog.get_logger(__name__)


def notify_ready() -> None:
    """Send READY=1 to $NOTIFY_SOCKET (systemd's sd_notify) when it is set."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(address)
        s.sendall(b"READY=1")


def services_of(record: Any) -> tuple[list[Any], list[Any]]:
    """The gRPC and ttrpc services a plugin instance exports.

    An instance may carry `grpc_services` / `ttrpc_services` lists; a grpc plugin whose instance
    is itself a betterproto service serves that on gRPC, a ttrpc plugin's on ttrpc.
    """
    inst, kind = record.instance, record.registration.type
    grpc = list(getattr(inst, "grpc_services", []))
    ttrpc = list(getattr(inst, "ttrpc_services", []))
    if isinstance(inst, ServiceBase):
        if kind == PluginType.TTRPC:
            ttrpc.append(inst)
        elif kind == PluginType.GRPC:
            grpc.append(inst)
    return grpc, ttrpc


class Daemon:
    def __init__(self, cfg: Any, registrations: list[Registration], plugin_config: Any):
        """plugin_config(registration) gives a plugin's config instance (built by pycontainerd.config)."""
        self.cfg = cfg
        self.registrations = registrations
        self.plugin_config = plugin_config
        self.exchange = Exchange()
        self.graph: InitGraph | None = None
        self.grpc: GRPCServer | None = None
        self.ttrpc: TtrpcServer | None = None

    @property
    def ttrpc_address(self) -> str:
        return self.cfg.ttrpc.address or self.cfg.grpc.address + ".ttrpc"

    async def start(self) -> None:
        cfg = self.cfg
        for d in (cfg.root, cfg.state):
            Path(d).mkdir(parents=True, exist_ok=True, mode=0o711)
        self.graph = InitGraph(
            root=Path(cfg.root), state=Path(cfg.state), events=self.exchange, grpc_address=cfg.grpc.address,
            ttrpc_address=self.ttrpc_address, daemon_config=cfg, plugin_config=self.plugin_config,
            disabled=cfg.disabled_plugins, required=cfg.required_plugins, timeouts=cfg.timeouts)
        await self.graph.run(self.registrations)
        grpc_services, ttrpc_services = [], []
        for rec in self.graph.records:
            if rec.status == OK:
                g, t = services_of(rec)
                grpc_services += g
                ttrpc_services += t
        self.grpc = GRPCServer(grpc_services)
        await self.grpc.start_unix(cfg.grpc.address, cfg.grpc.uid, cfg.grpc.gid)
        if cfg.grpc.tcp_address:
            await self.grpc.start_tcp(cfg.grpc.tcp_address, cfg.grpc.tcp_tls_cert, cfg.grpc.tcp_tls_key,
                                      cfg.grpc.tcp_tls_ca)
        self.ttrpc = TtrpcServer()
        for svc in ttrpc_services:
            self.ttrpc.register_betterproto(svc)
        await self.ttrpc.start_unix(self.ttrpc_address)
        if cfg.ttrpc.uid or cfg.ttrpc.gid:
            os.chown(self.ttrpc_address, cfg.ttrpc.uid, cfg.ttrpc.gid)
        log.info("serving", address=cfg.grpc.address, ttrpc=self.ttrpc_address, plugins=len(self.graph.records))
        notify_ready()

    async def stop(self) -> None:
        log.info("stopping")
        if self.grpc is not None:
            await self.grpc.close()
        if self.ttrpc is not None:
            await self.ttrpc.close()
        if self.graph is not None:
            await self.graph.close()
        log.info("stopped")

    async def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Start, call `on_ready` (when given) once serving, serve until SIGTERM or SIGINT, stop."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
            if on_ready is not None:
                on_ready()
            await stop.wait()
        finally:
            await self.stop()
