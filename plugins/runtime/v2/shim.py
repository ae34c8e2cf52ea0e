"""One connected shim and the task it serves: the Task API (containerd.task.v2.Task over ttrpc)
wrapped as a runtime Task, and its exec'd processes as runtime Processes.

Owns the ttrpc connection to the shim, the shim's log fifo, and noticing the connection go away
(`on_close`, called once, unless we closed it ourselves). Errors come back as the errdefs classes
of the shim's status codes; a call on a connection that is gone raises errdefs.Unavailable
("ttrpc: closed") from our client; ShimTask turns it into ShimClosed, UNKNOWN "ttrpc: closed" as
containerd reports it, except State, which says NotFound as containerd's does.
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import betterproto
import structlog

from pycontainerd.api.gen.containerd import types as pbtypes
from pycontainerd.api.gen.containerd.task import v2 as shimapi
from pycontainerd.core import errdefs, identifiers
from pycontainerd.core.ttrpc import TtrpcClient

from .. import CreateOpts, ExecOpts, Exit, ProcessInfo, State
from .binary import ShimBinary, ShimLog
from .bundle import Bundle

log = structlog.get_logger(__name__)


def wrap(err: BaseException, prefix: str) -> errdefs.ContainerdError:
    """`err` with "prefix: " in front of its message, keeping its errdefs class (Go's %w)."""
    if isinstance(err, errdefs.ContainerdError):
        msg = err.message
        if msg == err.suffix:
            msg = ""
        elif msg.endswith(": " + err.suffix):
            msg = msg[: -len(err.suffix) - 2]
        wrapped = type(err)(f"{prefix}: {msg}" if msg else prefix)
    else:
        wrapped = errdefs.Unknown(f"{prefix}: {err}")
    wrapped.__cause__ = err
    return wrapped


class ShimClosed(errdefs.Unknown):
    """A call on a shim connection that is gone: Go's ttrpc.ErrClosed, which reaches clients as
    UNKNOWN "ttrpc: closed" through containerd's error mapping."""

    def __init__(self, message: str = "ttrpc: closed"):
        super().__init__(message)


class _TaskAPI:
    """The shim's TaskStub, with calls on a closed connection raising ShimClosed."""

    def __init__(self, stub: Any, client: TtrpcClient):
        self._stub, self._client = stub, client

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return await method(*args, **kwargs)
            except errdefs.Unavailable as err:
                if self._client.closed:
                    raise ShimClosed() from err
                raise

        return call


def _state(resp: shimapi.StateResponse) -> State:
    return State(pid=resp.pid, status=resp.status, stdin=resp.stdin, stdout=resp.stdout, stderr=resp.stderr,
                 terminal=resp.terminal, exit_status=resp.exit_status, exited_at=resp.exited_at)


class ShimTask:
    """A task served by a shim (containerd's shimTask). `id` is the container's id."""

    def __init__(self, bundle: Bundle, binary: ShimBinary, client: TtrpcClient, shim_log: ShimLog | None,
                 on_close: Callable[["ShimTask"], Awaitable[None]] | None = None):
        self.bundle = bundle
        self.binary = binary
        self.client = client
        self.shim_log = shim_log
        self.task: Any = _TaskAPI(client.stub(shimapi.TaskStub, namespace=bundle.namespace), client)
        self._on_close = on_close
        self._closing = False
        self.cleanup_lock = asyncio.Lock()
        self.cleaned = False
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name=f"shim-watch-{bundle.id}")

    # identity
    @property
    def id(self) -> str:
        return self.bundle.id

    @property
    def namespace(self) -> str:
        return self.bundle.namespace

    def __repr__(self) -> str:
        return f"<ShimTask {self.namespace}/{self.id}>"

    # connection lifecycle
    async def _watch(self) -> None:
        await self.client.wait_closed()
        if self.shim_log is not None:
            self.shim_log.close()
        if self._closing or self._on_close is None:
            return
        log.info("shim disconnected", id=self.id, namespace=self.namespace)
        try:
            await self._on_close(self)
        except Exception:
            log.exception("cleaning up after shim disconnected failed", id=self.id, namespace=self.namespace)

    def disconnected(self, err: BaseException) -> bool:
        """True when `err` means the shim's connection is gone (Go's ttrpc.ErrClosed)."""
        return isinstance(err, ShimClosed) or (isinstance(err, errdefs.Unavailable) and self.client.closed)

    async def close(self) -> None:
        """Close the connection without treating it as the shim dying (shutdown, delete)."""
        self._closing = True
        await self.client.close()
        if self.shim_log is not None:
            self.shim_log.close()

    # the Task API
    async def connect(self, timeout: float | None = None) -> shimapi.ConnectResponse:
        return await self.task.connect(shimapi.ConnectRequest(id=self.id), timeout=timeout)

    async def pid(self, timeout: float | None = None) -> int:
        return (await self.connect(timeout)).task_pid

    async def create(self, opts: CreateOpts) -> None:
        topts = opts.task_options if opts.task_options is not None else opts.runtime_options
        request = shimapi.CreateTaskRequest(
            id=self.id, bundle=str(self.bundle.path), stdin=opts.io.stdin, stdout=opts.io.stdout,
            stderr=opts.io.stderr, terminal=opts.io.terminal, checkpoint=opts.checkpoint,
            rootfs=[pbtypes.Mount(type=m.type, source=m.source, options=list(m.options)) for m in opts.rootfs])
        if topts is not None:
            request.options = topts
        await self.task.create(request)

    async def state(self, exec_id: str = "", timeout: float | None = None) -> State:
        try:
            resp = await self.task.state(shimapi.StateRequest(id=self.id, exec_id=exec_id), timeout=timeout)
        except errdefs.ContainerdError as err:
            if self.disconnected(err):
                raise errdefs.NotFound() from err
            raise
        return _state(resp)

    async def start(self, exec_id: str = "") -> int:
        return (await self.task.start(shimapi.StartRequest(id=self.id, exec_id=exec_id))).pid

    async def kill(self, signal: int, all: bool = False, exec_id: str = "") -> None:
        await self.task.kill(shimapi.KillRequest(id=self.id, exec_id=exec_id, signal=signal, all=all))

    async def pause(self) -> None:
        await self.task.pause(shimapi.PauseRequest(id=self.id))

    async def resume(self) -> None:
        await self.task.resume(shimapi.ResumeRequest(id=self.id))

    async def exec(self, exec_id: str, opts: ExecOpts) -> "ShimProcess":
        try:
            identifiers.validate(exec_id)
        except errdefs.InvalidArgument as err:
            raise errdefs.InvalidArgument(f"invalid exec id {exec_id}: {err.message}") from None
        request = shimapi.ExecProcessRequest(id=self.id, exec_id=exec_id, stdin=opts.io.stdin,
                                             stdout=opts.io.stdout, stderr=opts.io.stderr,
                                             terminal=opts.io.terminal)
        if opts.spec is not None:
            request.spec = opts.spec
        await self.task.exec(request)
        return ShimProcess(self, exec_id)

    async def pids(self) -> list[ProcessInfo]:
        resp = await self.task.pids(shimapi.PidsRequest(id=self.id))
        return [ProcessInfo(pid=p.pid, info=p.info if betterproto.serialized_on_wire(p.info) else None) for p in resp.processes]

    async def resize_pty(self, width: int, height: int, exec_id: str = "") -> None:
        await self.task.resize_pty(shimapi.ResizePtyRequest(id=self.id, exec_id=exec_id, width=width,
                                                            height=height))

    async def close_io(self, exec_id: str = "") -> None:
        await self.task.close_io(shimapi.CloseIoRequest(id=self.id, exec_id=exec_id, stdin=True))

    async def wait(self, exec_id: str = "") -> Exit:
        pid = 0
        if not exec_id:
            pid = await self.pid()
        resp = await self.task.wait(shimapi.WaitRequest(id=self.id, exec_id=exec_id))
        return Exit(pid=pid, status=resp.exit_status, timestamp=resp.exited_at)

    async def delete_process(self, exec_id: str) -> Exit:
        resp = await self.task.delete(shimapi.DeleteRequest(id=self.id, exec_id=exec_id))
        return Exit(pid=resp.pid, status=resp.exit_status, timestamp=resp.exited_at)

    async def checkpoint(self, path: str, options: Any = None) -> None:
        request = shimapi.CheckpointTaskRequest(id=self.id, path=path)
        if options is not None:
            request.options = options
        await self.task.checkpoint(request)

    async def update(self, resources: Any = None, annotations: dict[str, str] | None = None) -> None:
        request = shimapi.UpdateTaskRequest(id=self.id, annotations=dict(annotations or {}))
        if resources is not None:
            request.resources = resources
        await self.task.update(request)

    async def stats(self) -> Any:
        resp = await self.task.stats(shimapi.StatsRequest(id=self.id))
        return resp.stats if betterproto.serialized_on_wire(resp.stats) else None

    async def shutdown(self, timeout: float | None = None) -> None:
        """Ask the shim to exit (it refuses while it still serves containers); a connection that
        closes under the call is what success looks like."""
        try:
            await self.task.shutdown(shimapi.ShutdownRequest(id=self.id), timeout=timeout)
        except errdefs.ContainerdError as err:
            if not self.disconnected(err):
                raise

    async def process(self, exec_id: str) -> "ShimProcess":
        """The exec'd process `exec_id`, after checking the shim knows it."""
        proc = ShimProcess(self, exec_id)
        await proc.state()
        return proc

    # the task as its own init process (runtime.Process)
    async def delete(self) -> Exit:  # pragma: no cover - the manager deletes tasks
        raise errdefs.FailedPrecondition("delete a task through its runtime")


class ShimProcess:
    """An exec'd process of a ShimTask (containerd's runtime/v2 `process`)."""

    def __init__(self, shim: ShimTask, exec_id: str):
        self.shim = shim
        self.exec_id = exec_id

    @property
    def id(self) -> str:
        return self.exec_id

    async def state(self, timeout: float | None = None) -> State:
        return await self.shim.state(self.exec_id, timeout=timeout)

    async def kill(self, signal: int, all: bool = False) -> None:
        await self.shim.kill(signal, False, self.exec_id)

    async def resize_pty(self, width: int, height: int) -> None:
        await self.shim.resize_pty(width, height, self.exec_id)

    async def close_io(self) -> None:
        await self.shim.close_io(self.exec_id)

    async def start(self) -> int:
        return await self.shim.start(self.exec_id)

    async def wait(self) -> Exit:
        return await self.shim.wait(self.exec_id)

    async def delete(self) -> Exit:
        return await self.shim.delete_process(self.exec_id)
