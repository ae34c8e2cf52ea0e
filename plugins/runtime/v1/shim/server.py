"""One v1 shim process, as the Go `containerd-shim` runs: a child subreaper serving the Shim API on
the listening socket it inherits as fd 3 (or on -socket PATH), logging to stderr (the daemon hands
it the `shim.stderr.log` fifo of the work dir), its working directory the bundle.

It lives until it is killed: containerd SIGKILLs a v1 shim after deleting its task. SIGTERM and
SIGINT make it do what the Go shim does — stop serving, SIGKILL the container's processes and
delete the container — then flush pending events (5 s at most) and exit 0.
"""
from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import sys

import structlog

from pycontainerd.core import log as corelog
from pycontainerd.core.ttrpc import TtrpcServer

from . import main as shim_main
from . import runc
from .publisher import V1Events, new_publisher
from .service import ShimConfig, ShimService

log = structlog.get_logger("pyrunc-v1.server")


def _show_as_shim(argv: list[str]) -> None:
    """/proc/PID/cmdline without the interpreter in front (`ps` shows the shim as a Go shim's)."""
    try:
        runc("zygote").set_cmdline([os.path.abspath(sys.argv[0]) if sys.argv else shim_main.NAME, *argv])
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def main(flags: shim_main.Flags) -> int:
    _show_as_shim(sys.argv[1:])
    runc("server").set_subreaper()
    corelog.configure("debug" if flags.debug else "info", "text", stream=sys.stderr)
    structlog.contextvars.bind_contextvars(runtime=shim_main.NAME, namespace=flags.namespace)
    gc.set_threshold(2000, 20, 20)
    try:
        return asyncio.run(serve(flags))
    except Exception:  # noqa: BLE001
        log.exception("shim failed")
        return 1


async def serve(flags: shim_main.Flags) -> int:
    loop = asyncio.get_running_loop()
    reaper = runc("reaper").Reaper()
    reaper.install(loop)
    publisher = new_publisher(flags, reaper)
    publisher.start()
    events = V1Events(publisher)
    done = asyncio.Event()
    tasks = runc("service").TaskService(flags.namespace, events, reaper, lambda: None)
    config = ShimConfig(flags.namespace, workdir=flags.workdir, runtime_root=flags.runtime_root,
                        criu=flags.criu, systemd_cgroup=flags.systemd_cgroup)
    service = ShimService(tasks, config, events)
    server = TtrpcServer()
    server.register_betterproto(service)
    if flags.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = flags.socket[len("unix://"):] if flags.socket.startswith("unix://") else flags.socket
        sock.bind(path)
        sock.listen(socket.SOMAXCONN)
    else:
        sock = socket.socket(fileno=3)
    os.set_inheritable(sock.fileno(), False)
    await server.start_socket(sock)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    log.info("serving shim api", path=os.getcwd(), pid=os.getpid(), workdir=flags.workdir)
    await done.wait()
    log.debug("shutting down")
    await server.close(grace=1.0)
    await service.terminate()
    await tasks.close()
    await publisher.close(timeout=5.0)
    reaper.uninstall()
    return 0
