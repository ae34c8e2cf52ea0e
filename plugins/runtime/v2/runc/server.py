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
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

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


def open_log(path: str = "log") -> bool:
    """Point stderr at a bundle's log fifo when someone reads it (containerd does); False, and
    stderr left as it is, when nobody does."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    os.set_blocking(fd, True)
    os.dup2(fd, 2, inheritable=False)
    os.close(fd)
    return True


class LogFollower:
    """Keeps stderr on the log fifo of a bundle that still exists.

    A server that serves several containers (grouped shims) starts with the first one's `log`;
    containerd stops reading it and removes that bundle when the container is deleted. Then the
    log moves to another container's bundle, or to /dev/null until a container comes."""

    def __init__(self, bundle: str) -> None:
        self.bundle = bundle

    def update(self, bundles: list[str]) -> None:
        if self.bundle in bundles:
            return
        for bundle in bundles:
            if open_log(os.path.join(bundle, "log")):
                self.bundle = bundle
                return
        if self.bundle:
            fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            os.dup2(fd, 2, inheritable=False)
            os.close(fd)
            self.bundle = ""


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


_logging_configured = False


def configure_logging(debug: bool) -> None:
    """logrus-like text on stderr (fd 2, whatever it points to), `runtime=` on every line. Done
    once in the zygote; a forked server only changes the level when it runs with -debug."""
    global _logging_configured
    if not _logging_configured:
        corelog.configure("info", "text", stream=sys.stderr)
        structlog.contextvars.bind_contextvars(runtime=launch.NAME)
        _logging_configured = True
    if debug:
        logging.getLogger().setLevel(logging.DEBUG)


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
    configure_logging(False)
    from pycontainerd.core import mount as mountlib
    mountlib._lib()  # loads libc through ctypes.util.find_library, which runs `ldconfig -p`
    set_subreaper_lib()
    import asyncio.unix_events  # noqa: F401
    import selectors  # noqa: F401
    TtrpcServer().register_betterproto(TaskService.__new__(TaskService))


def rehearse(rounds: int = 40) -> None:
    """Run one whole server in this process against a client and an events sink of our own.

    The zygote does this before it forks: CPython 3.11 rewrites a function's bytecode in place
    as it specialises it, and many libraries fill caches on first use; done once here, every
    child shares those pages instead of dirtying copies of its own."""
    tmp = tempfile.mkdtemp(prefix="pyrunc-rehearsal-")
    saved = os.environ.get("TTRPC_ADDRESS")
    os.environ["TTRPC_ADDRESS"] = os.path.join(tmp, "events.sock")
    try:
        asyncio.run(_rehearse(tmp, rounds))
    finally:
        if saved is None:
            os.environ.pop("TTRPC_ADDRESS", None)
        else:
            os.environ["TTRPC_ADDRESS"] = saved
        shutil.rmtree(tmp, ignore_errors=True)


async def _rehearse(tmp: str, rounds: int) -> None:
    from betterproto.lib.google.protobuf import Empty

    from pycontainerd.api.gen.containerd.events import TaskOom
    from pycontainerd.api.gen.containerd.services.events.ttrpc.v1 import EventsBase, ForwardRequest
    from pycontainerd.api.gen.containerd.task.v2 import (
        ConnectRequest, ShutdownRequest, StateRequest, TaskStub, WaitRequest,
    )
    from pycontainerd.core import errdefs
    from pycontainerd.core.ttrpc import TtrpcClient

    received = asyncio.Event()

    class Sink(EventsBase):
        count = 0

        async def forward(self, request: ForwardRequest) -> Empty:
            Sink.count += 1
            if Sink.count >= rounds:
                received.set()
            return Empty()

    sink = TtrpcServer()
    sink.register_betterproto(Sink())
    await sink.start_unix(os.environ["TTRPC_ADDRESS"])
    path = os.path.join(tmp, "shim.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    flags = launch.Flags()
    flags.namespace = flags.id = "rehearsal"
    ready = asyncio.get_running_loop().create_future()
    server_task = asyncio.get_running_loop().create_task(serve(flags, listener.detach(), ready.set_result))
    service = await ready
    client = await TtrpcClient.connect(path, timeout=5)
    task = client.stub(TaskStub, namespace=flags.namespace, timeout=5)
    for _ in range(rounds):
        await task.connect(ConnectRequest(id="rehearsal"))
        for call, request in ((task.state, StateRequest(id="none")), (task.wait, WaitRequest(id="none"))):
            try:
                await call(request)
            except errdefs.NotFound:
                pass
        service.publisher.publish("/tasks/oom", TaskOom(container_id="rehearsal"))
    for _ in range(3):
        await service.reaper.run(["runc", "--version"])
    try:
        await asyncio.wait_for(received.wait(), 10)
    except asyncio.TimeoutError:
        pass
    try:
        await task.shutdown(ShutdownRequest(id="rehearsal"))
    except errdefs.Unavailable:
        pass
    await client.close()
    await server_task
    await sink.close(grace=1)


ORPHAN_TIMEOUT = 60.0
DEFAULT_SHARED_LINGER = 10.0


def _shared() -> tuple[float, int]:
    """(linger, capacity) of the server of a slot (launch.start sets SHARED_ENV for it): seconds
    it stays after its last container, containers it takes at most (0: no limit). (0, 0) for
    the others: they go with their last container, and take whoever their group sends."""
    if launch.SHARED_ENV not in os.environ:
        return 0.0, 0
    linger = launch.env_number(os.environ, "PYRUNC_SHIM_LINGER", DEFAULT_SHARED_LINGER)
    capacity = launch.env_number(os.environ, launch.SHARED_ENV, launch.DEFAULT_GROUP_SIZE, int)
    return max(0.0, linger), max(0, capacity)


def _exit_if_orphaned(service: TaskService, done: asyncio.Event) -> None:
    """containerd calls a new shim within a moment; one that was never called (its `start`
    failed after the server was launched, or containerd could not connect) must not linger."""
    if not service.called and not service.containers:
        log.warning("nobody called this shim since it started, exiting")
        done.set()


def main(flags: launch.Flags, listen_fd: int | None = 3) -> int:
    if not flags.namespace:
        sys.stderr.write(f"{launch.NAME}: shim namespace cannot be empty")
        return 1
    # SIGTERM/SIGINT wait (blocked) until serve() handles them: one arriving while we start up
    # must still end in a clean shutdown that removes the socket
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    set_subreaper()
    follower = LogFollower(os.getcwd() if open_log() else "")
    configure_logging(flags.debug)
    from pycontainerd.core import mount as mountlib
    mountlib._lib()  # ctypes.util.find_library runs a subprocess: before our reaper owns SIGCHLD
    gc.set_threshold(2000, 20, 20)
    try:
        address = launch.read_address("address")
    except (OSError, launch.ShimError):
        address = ""
    os.chdir("/")  # the bundle may go (containerd removes it) while we serve others
    try:
        linger, capacity = _shared()
        return asyncio.run(serve(flags, listen_fd, address=address, log_follower=follower, linger=linger,
                                 capacity=capacity))
    except Exception:  # noqa: BLE001
        log.exception("shim failed")
        return 1


async def serve(flags: launch.Flags, listen_fd: int | None, on_ready=None, address: str = "",
                log_follower: LogFollower | None = None, linger: float = 0.0, capacity: int = 0) -> int:
    """Serve until shut down; `address` (this shim's, from the bundle's `address` file) names
    the socket removed on the way out, unless someone replaced it meanwhile. A slot's server
    (see _shared) lingers `linger` seconds after its last container and takes `capacity`."""
    loop = asyncio.get_running_loop()
    reaper = Reaper()
    reaper.install(loop)
    done = asyncio.Event()
    publisher = Publisher(os.environ.get("TTRPC_ADDRESS", ""), flags.namespace)
    publisher.start()

    def shutdown_requested() -> None:
        """Shutdown with no container left: exit, or first linger for a next container."""
        if linger <= 0:
            service.closing = True  # in the same loop step as the decision: no Connect slips in
            done.set()
            return

        def check() -> None:
            if service.containers or done.is_set():
                return  # serving again: the next Shutdown starts over
            idle = time.monotonic() - service.last_call
            if idle >= linger and service.idle:
                service.closing = True  # in the same loop step as the decision: no Connect slips in
                done.set()
            else:  # called meanwhile, or a place promised to a container still to come
                loop.call_later(max(linger - idle, min(linger, 1.0)), check)

        loop.call_later(linger, check)

    service = TaskService(flags.namespace, publisher, reaper, shutdown_requested, capacity)
    if capacity and flags.id:
        service.reserve(flags.id)  # the container this server was started for
    if log_follower is not None:
        service.containers_changed = lambda: log_follower.update([c.bundle for c in service.containers.values()])
    identity = _identity(launch.socket_path(address)) if address.startswith("unix://") else None
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
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    log.info("starting signal loop", namespace=flags.namespace, path=os.getcwd(), pid=os.getpid())
    if on_ready is not None:
        on_ready(service)
    orphan_timeout = launch.env_number(os.environ, "PYRUNC_ORPHAN_TIMEOUT", ORPHAN_TIMEOUT)
    orphan_check = loop.call_later(orphan_timeout, _exit_if_orphaned, service, done)
    await done.wait()
    orphan_check.cancel()
    log.debug("shutting down")
    await server.close(grace=1.0)
    if identity is not None and _identity(launch.socket_path(address)) == identity:
        try:
            launch.remove_socket(address)
        except OSError:
            pass
    await service.close()
    await publisher.close(timeout=5.0)
    reaper.uninstall()
    times = os.times()
    log.debug("exiting", cpu_user=round(times.user, 3), cpu_system=round(times.system, 3),
              events_sent=publisher.sent, events_dropped=publisher.dropped)
    return 0
