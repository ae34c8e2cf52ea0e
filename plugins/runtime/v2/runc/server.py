"""One shim server process: what the Go shim's `run` does once it is neither `start` nor `delete`.

  * child subreaper (prctl PR_SET_CHILD_SUBREAPER), so container processes are reparented here;
  * the bundle's `log` fifo (opened non-blocking; containerd holds its read side) becomes
    stderr, where the logs go in logrus' text format (debug level with -debug);
  * the ttrpc Task service on the inherited listening socket (fd 3) or on -socket PATH;
  * events to TTRPC_ADDRESS through the publisher, in the shim's namespace;
  * SIGTERM/SIGINT or a Shutdown call with no containers left end it: stop serving, remove the
    socket named in the bundle's `address` file, flush events (5 s at most), exit 0.
"""
from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import signal
import socket
import sys

import structlog

from pycontainerd.core import log as corelog
from pycontainerd.core.ttrpc import TtrpcServer

from . import launch
from .publisher import Publisher
from .reaper import Reaper
from .service import TaskService

log = structlog.get_logger("pyrunc.server")

PR_SET_CHILD_SUBREAPER = 36


_libc = None


def set_subreaper_lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def set_subreaper() -> None:
    libc = set_subreaper_lib()
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def open_log(path: str = "log") -> None:
    """Point stderr at the bundle's log fifo when someone reads it (containerd does)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return  # no reader, or no fifo: keep stderr as it is
    os.set_blocking(fd, True)
    os.dup2(fd, 2, inheritable=False)
    os.close(fd)


def warm_up() -> None:
    """Exercise what every shim uses, so the zygote's children inherit it ready (betterproto
    builds its per-class field tables on first use)."""
    from betterproto.lib.google.protobuf import Any as ProtoAny
    from pycontainerd.api.gen.containerd import events
    from pycontainerd.api.gen.containerd.runc import v1 as runc_v1
    from pycontainerd.api.gen.containerd.services.events.ttrpc.v1 import Envelope, ForwardRequest
    from pycontainerd.api.gen.containerd.task import v2 as task_v2
    from pycontainerd.api.gen.containerd.types import Mount
    from pycontainerd.api.gen.containerd.v1.types import ProcessInfo
    from pycontainerd.core.events import type_url
    import betterproto

    modules = (events, runc_v1, task_v2)
    for module in modules:
        for name in dir(module):
            cls = getattr(module, name)
            if isinstance(cls, type) and issubclass(cls, betterproto.Message):
                try:
                    cls().parse(bytes(cls()))
                    type_url(cls)
                except Exception:  # noqa: BLE001 - warming up only
                    pass
    for cls in (ProtoAny, Envelope, ForwardRequest, Mount, ProcessInfo):
        cls().parse(bytes(cls()))
    corelog.configure("info", "text", stream=sys.stderr)
    from pycontainerd.core import mount as mountlib
    mountlib._lib()  # loads libc through ctypes.util.find_library, which runs `ldconfig -p`
    set_subreaper_lib()
    import asyncio.unix_events  # noqa: F401
    import selectors  # noqa: F401
    TtrpcServer().register_betterproto(TaskService.__new__(TaskService))


def main(flags: launch.Flags, listen_fd: int | None = 3) -> int:
    if not flags.namespace:
        sys.stderr.write(f"{launch.NAME}: shim namespace cannot be empty")
        return 1
    set_subreaper()
    open_log()
    corelog.configure("debug" if flags.debug else "info", "text", stream=sys.stderr)
    structlog.contextvars.bind_contextvars(runtime=launch.NAME)
    gc.set_threshold(2000, 20, 20)
    try:
        return asyncio.run(serve(flags, listen_fd))
    except Exception:  # noqa: BLE001
        log.exception("shim failed")
        return 1


async def serve(flags: launch.Flags, listen_fd: int | None) -> int:
    loop = asyncio.get_running_loop()
    reaper = Reaper()
    reaper.install(loop)
    done = asyncio.Event()
    publisher = Publisher(os.environ.get("TTRPC_ADDRESS", ""), flags.namespace)
    publisher.start()
    service = TaskService(flags.namespace, publisher, reaper, done.set)
    server = TtrpcServer()
    server.register_betterproto(service)
    if listen_fd is not None:
        sock = socket.socket(fileno=listen_fd)
    else:
        if len(flags.socket) > launch.SOCKET_PATH_LIMIT:
            log.error("unix socket path too long", socket=flags.socket)
            return 1
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(flags.socket)
        sock.listen(socket.SOMAXCONN)
    os.set_inheritable(sock.fileno(), False)
    await server.start_socket(sock)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    log.info("starting signal loop", namespace=flags.namespace, path=os.getcwd(), pid=os.getpid())
    await done.wait()
    log.debug("shutting down")
    await server.close(grace=1.0)
    try:
        launch.remove_socket(launch.read_address("address"))
    except (OSError, launch.ShimError):
        pass
    await service.close()
    await publisher.close(timeout=5.0)
    reaper.uninstall()
    return 0
