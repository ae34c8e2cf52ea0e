"""`client.tasks`: running containers (tasks) and their exec processes, over the Tasks service.

Two layers:

- `TasksAPI` (the `client.tasks` attribute) maps the Tasks RPCs one to one: create, start,
  delete, delete_process, get, list, kill, exec, resize_pty, close_io, pause, resume, pids,
  update, metrics, wait, checkpoint. Results are plain dataclasses (`ProcessStatus`,
  `ExitStatus`, `ProcessPid`, `MetricData`).
- `Process` couples one process (a task's init process or an exec) with its client-side IO
  (cio.py), the way containerd's Go client does: `new_task(...)`/`exec(...)` create it with
  its FIFOs, `wait()` starts a Wait call (do it before `start()`, as ctr does, to never miss a
  fast exit), `delete()` removes the process, lets the shim drain the output and closes the IO,
  `detach()` leaves it running (a CloseIO for the end of stdin already under way is finished).

Signal names parse like ctr's (`parse_signal("SIGTERM")`, "TERM", "15"). Owns nothing on the
daemon side.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal as _signal
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Optional, Sequence

import betterproto
from betterproto.lib.google.protobuf import Any as AnyMessage

from pycontainerd.api.gen.containerd import types as ctypes
from pycontainerd.api.gen.containerd.services.tasks import v1 as api
from pycontainerd.api.gen.containerd.v1 import types as v1types
from pycontainerd.core import errdefs
from pycontainerd.core.mount import Mount

from . import cio
from ._base import DEFAULT, ServiceAPI

PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
RESOURCES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _ts(value: Optional[datetime]) -> Optional[datetime]:
    return None if value is None or value == _EPOCH else value


def _mount_pb(m: Any) -> ctypes.Mount:
    m = Mount.from_any(m)
    return ctypes.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))


@dataclass(frozen=True)
class ProcessStatus:
    """A task or exec process as the Tasks service describes it. `status` is one of "unknown",
    "created", "running", "stopped", "paused", "pausing"."""

    container_id: str
    id: str
    pid: int
    status: str
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    exit_status: int = 0
    exited_at: Optional[datetime] = None

    @classmethod
    def from_proto(cls, p: v1types.Process) -> "ProcessStatus":
        try:
            status = v1types.Status(p.status).name.lower()
        except ValueError:
            status = "unknown"
        return cls(p.container_id, p.id, p.pid, status, p.stdin, p.stdout, p.stderr, p.terminal,
                   p.exit_status, _ts(p.exited_at))

    @property
    def io_config(self) -> cio.IOConfig:
        return cio.IOConfig(self.stdin, self.stdout, self.stderr, self.terminal)

    def to_dict(self) -> dict:
        return {"container_id": self.container_id, "id": self.id, "pid": self.pid, "status": self.status,
                "stdin": self.stdin, "stdout": self.stdout, "stderr": self.stderr, "terminal": self.terminal,
                "exit_status": self.exit_status,
                "exited_at": self.exited_at.isoformat() if self.exited_at else None}


@dataclass(frozen=True)
class ExitStatus:
    code: int
    exited_at: Optional[datetime] = None
    pid: int = 0


@dataclass(frozen=True)
class ProcessPid:
    """One process of a task (ListPids): its host pid and the runtime's info, when sent."""

    pid: int
    info: Optional[AnyMessage] = None


@dataclass(frozen=True)
class MetricData:
    id: str
    timestamp: Optional[datetime]
    data: Optional[AnyMessage]


# -- signals ---------------------------------------------------------------------------------

def parse_signal(value: str | int) -> int:
    """ctr's signal parsing: a number, or a name with or without "SIG" ("SIGKILL", "kill")."""
    if isinstance(value, int):
        return value
    text = value.strip()
    if text.isdigit():
        number = int(text)
        if number <= 0 or number > _signal.SIGRTMAX:
            raise errdefs.InvalidArgument(f"invalid signal number {number}")
        return number
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    if name.startswith("SIGRTMIN+") or name.startswith("SIGRTMAX-"):
        base = _signal.SIGRTMIN if name.startswith("SIGRTMIN") else _signal.SIGRTMAX
        try:
            offset = int(name[9:])
        except ValueError:
            raise errdefs.InvalidArgument(f"invalid signal: {value}") from None
        return base + offset if name.startswith("SIGRTMIN") else base - offset
    try:
        return int(getattr(_signal.Signals, name))
    except AttributeError:
        raise errdefs.InvalidArgument(f"invalid signal: {value}") from None


def _pack(type_url: str, obj: Any) -> AnyMessage:
    return AnyMessage(type_url=type_url, value=json.dumps(obj, separators=(",", ":")).encode())


# -- the raw API -----------------------------------------------------------------------------

class TasksAPI(ServiceAPI):
    stub_class = api.TasksStub

    async def create(self, container_id: str, *, rootfs: Sequence[Any] = (), io: cio.IOConfig = cio.IOConfig(),
                     options: Optional[AnyMessage] = None, checkpoint: Optional[ctypes.Descriptor] = None,
                     runtime_path: str = "", timeout: Any = DEFAULT) -> int:
        """Create the task of `container_id` (its init process, not started); returns its pid."""
        req = api.CreateTaskRequest(container_id=container_id, rootfs=[_mount_pb(m) for m in rootfs],
                                    stdin=io.stdin, stdout=io.stdout, stderr=io.stderr, terminal=io.terminal,
                                    runtime_path=runtime_path)
        if options is not None:
            req.options = options
        if checkpoint is not None:
            req.checkpoint = checkpoint
        return (await self._unary("create", req, timeout=timeout)).pid

    async def start(self, container_id: str, exec_id: str = "", *, timeout: Any = DEFAULT) -> int:
        resp = await self._unary("start", api.StartRequest(container_id=container_id, exec_id=exec_id),
                                 timeout=timeout)
        return resp.pid

    async def delete(self, container_id: str, *, timeout: Any = DEFAULT) -> ExitStatus:
        """Delete a stopped (or never started) task; returns its exit status."""
        resp = await self._unary("delete", api.DeleteTaskRequest(container_id=container_id), timeout=timeout)
        return ExitStatus(resp.exit_status, _ts(resp.exited_at), resp.pid)

    async def delete_process(self, container_id: str, exec_id: str, *, timeout: Any = DEFAULT) -> ExitStatus:
        resp = await self._unary("delete_process",
                                 api.DeleteProcessRequest(container_id=container_id, exec_id=exec_id),
                                 timeout=timeout)
        return ExitStatus(resp.exit_status, _ts(resp.exited_at), resp.pid)

    async def get(self, container_id: str, exec_id: str = "", *, timeout: Any = DEFAULT) -> ProcessStatus:
        resp = await self._unary("get", api.GetRequest(container_id=container_id, exec_id=exec_id),
                                 timeout=timeout)
        return ProcessStatus.from_proto(resp.process)

    async def list(self, filter: str = "", *, timeout: Any = DEFAULT) -> list[ProcessStatus]:
        resp = await self._unary("list", api.ListTasksRequest(filter=filter), timeout=timeout)
        return [ProcessStatus.from_proto(p) for p in resp.tasks]

    async def kill(self, container_id: str, signal: int | str = _signal.SIGTERM, *, exec_id: str = "",
                   all: bool = False, timeout: Any = DEFAULT) -> None:
        req = api.KillRequest(container_id=container_id, exec_id=exec_id, signal=parse_signal(signal), all=all)
        await self._unary("kill", req, timeout=timeout)

    async def exec(self, container_id: str, exec_id: str, process: Mapping[str, Any], *,
                   io: cio.IOConfig = cio.IOConfig(), timeout: Any = DEFAULT) -> None:
        """Add exec process `exec_id` running `process` (an OCI process spec dict); start it
        with `start(container_id, exec_id)`."""
        if not exec_id:
            raise errdefs.InvalidArgument("exec id must not be empty")
        req = api.ExecProcessRequest(container_id=container_id, exec_id=exec_id, stdin=io.stdin,
                                     stdout=io.stdout, stderr=io.stderr, terminal=io.terminal,
                                     spec=_pack(PROCESS_TYPE_URL, process))
        await self._unary("exec", req, timeout=timeout)

    async def resize_pty(self, container_id: str, width: int, height: int, *, exec_id: str = "",
                         timeout: Any = DEFAULT) -> None:
        req = api.ResizePtyRequest(container_id=container_id, exec_id=exec_id, width=width, height=height)
        await self._unary("resize_pty", req, timeout=timeout)

    async def close_io(self, container_id: str, *, exec_id: str = "", stdin: bool = True,
                       timeout: Any = DEFAULT) -> None:
        req = api.CloseIoRequest(container_id=container_id, exec_id=exec_id, stdin=stdin)
        await self._unary("close_io", req, timeout=timeout)

    async def pause(self, container_id: str, *, timeout: Any = DEFAULT) -> None:
        await self._unary("pause", api.PauseTaskRequest(container_id=container_id), timeout=timeout)

    async def resume(self, container_id: str, *, timeout: Any = DEFAULT) -> None:
        await self._unary("resume", api.ResumeTaskRequest(container_id=container_id), timeout=timeout)

    async def pids(self, container_id: str, *, timeout: Any = DEFAULT) -> list[ProcessPid]:
        resp = await self._unary("list_pids", api.ListPidsRequest(container_id=container_id), timeout=timeout)
        return [ProcessPid(p.pid, p.info if p.info is not None and betterproto.serialized_on_wire(p.info) else None)
                for p in resp.processes]

    async def update(self, container_id: str, resources: Optional[Mapping[str, Any]] = None,
                     annotations: Optional[Mapping[str, str]] = None, *, timeout: Any = DEFAULT) -> None:
        """Change a running task's resources (an OCI LinuxResources dict) and/or annotations."""
        req = api.UpdateTaskRequest(container_id=container_id, annotations=dict(annotations or {}))
        if resources is not None:
            req.resources = _pack(RESOURCES_TYPE_URL, resources)
        await self._unary("update", req, timeout=timeout)

    async def metrics(self, filters: Iterable[str] = (), *, timeout: Any = DEFAULT) -> list[MetricData]:
        """Metrics of the tasks matching `filters` (e.g. "id==web")."""
        resp = await self._unary("metrics", api.MetricsRequest(filters=list(filters)), timeout=timeout)
        return [MetricData(m.id, _ts(m.timestamp), m.data) for m in resp.metrics]

    async def wait(self, container_id: str, exec_id: str = "", *, timeout: Any = None) -> ExitStatus:
        """Block until the process exits (no deadline unless `timeout`)."""
        resp = await self._unary("wait", api.WaitRequest(container_id=container_id, exec_id=exec_id),
                                 timeout=timeout)
        return ExitStatus(resp.exit_status, _ts(resp.exited_at))

    async def checkpoint(self, container_id: str, parent_checkpoint: str = "",
                         options: Optional[AnyMessage] = None, *, timeout: Any = DEFAULT) -> list[ctypes.Descriptor]:
        req = api.CheckpointTaskRequest(container_id=container_id, parent_checkpoint=parent_checkpoint)
        if options is not None:
            req.options = options
        return list((await self._unary("checkpoint", req, timeout=timeout)).descriptors)


# -- processes with their IO -----------------------------------------------------------------

class Process:
    """A task's init process (`exec_id == ""`) or one of its exec processes, with its IO.

    Mirrors containerd's client: `wait()` returns an asyncio.Task resolving to the ExitStatus
    (start waiting before `start()`); `delete()` refuses a process that still runs unless
    `force=True` (SIGKILL to all, then wait), then removes it, waits for its output to drain and
    closes the IO."""

    def __init__(self, tasks: TasksAPI, container_id: str, exec_id: str = "", *,
                 io: Optional[cio.IO] = None, pid: int = 0):
        self.tasks, self.container_id, self.exec_id = tasks, container_id, exec_id
        self.io, self.pid = io, pid
        # CloseIO calls the stdin thread has scheduled on the loop; `detach()` settles them
        self._stdin_lock = threading.Lock()
        self._stdin_closes: list[concurrent.futures.Future] = []
        self._stdin_settled = False

    @property
    def id(self) -> str:
        return self.exec_id or self.container_id

    def __repr__(self) -> str:
        return f"Process(container_id={self.container_id!r}, exec_id={self.exec_id!r}, pid={self.pid})"

    async def start(self) -> int:
        """Start the process; from then on the end of its stdin stream closes its stdin."""
        try:
            self.pid = await self.tasks.start(self.container_id, self.exec_id)
        except BaseException:
            if self.io is not None:
                self.io.cancel()
                self.io.close()
            raise
        when_eof = getattr(self.io, "when_stdin_eof", None)
        if when_eof is not None and self.io.config.stdin:
            loop = asyncio.get_running_loop()

            def closed() -> None:
                with self._stdin_lock:
                    if not self._stdin_settled:
                        self._stdin_closes.append(
                            asyncio.run_coroutine_threadsafe(self._close_stdin_quietly(), loop))
            when_eof(closed)
        return self.pid

    async def detach(self, timeout: float = 2.0) -> None:
        """Leave the process to run on its own: stop turning the end of its stdin stream into
        CloseIO, and let a CloseIO already under way finish (for at most `timeout` seconds), so
        that nothing is left pending when the caller's event loop ends."""
        with self._stdin_lock:
            self._stdin_settled = True
            pending, self._stdin_closes = self._stdin_closes, []
        if pending:
            await asyncio.wait([asyncio.wrap_future(f) for f in pending], timeout=timeout)
            for f in pending:
                f.cancel()

    async def _close_stdin_quietly(self) -> None:
        try:
            await self.close_stdin()
        except errdefs.ContainerdError:
            pass

    def wait(self) -> "asyncio.Task[ExitStatus]":
        return asyncio.ensure_future(self.tasks.wait(self.container_id, self.exec_id))

    async def kill(self, sig: int | str = _signal.SIGTERM, *, all: bool = False) -> None:
        await self.tasks.kill(self.container_id, sig, exec_id=self.exec_id, all=all)

    async def close_stdin(self) -> None:
        await self.tasks.close_io(self.container_id, exec_id=self.exec_id, stdin=True)

    async def resize(self, width: int, height: int) -> None:
        await self.tasks.resize_pty(self.container_id, width, height, exec_id=self.exec_id)

    async def status(self) -> ProcessStatus:
        return await self.tasks.get(self.container_id, self.exec_id)

    async def delete(self, *, force: bool = False, drain_timeout: float = 5.0) -> ExitStatus:
        if force:
            waiter = self.wait()
            try:
                await self.kill(_signal.SIGKILL, all=not self.exec_id)
            except errdefs.FailedPrecondition:
                pass
            except errdefs.NotFound:
                pass
            try:
                await asyncio.wait_for(asyncio.shield(waiter), 30)
            except (asyncio.TimeoutError, errdefs.ContainerdError):
                pass
            finally:
                waiter.cancel()
        st = await self.status()
        if st.status not in ("stopped", "unknown", "") and not (st.status == "created" and self.pid == 0):
            raise errdefs.FailedPrecondition(f"task must be stopped before deletion: {st.status}")
        try:
            if self.exec_id:
                result = await self.tasks.delete_process(self.container_id, self.exec_id)
            else:
                result = await self.tasks.delete(self.container_id)
        finally:
            await self.detach()
            if self.io is not None:
                await self.io.wait(drain_timeout)
                self.io.close()
        return result


async def new_task(tasks: TasksAPI, container_id: str, io: cio.IO, *, rootfs: Sequence[Any] = (),
                   options: Optional[AnyMessage] = None) -> Process:
    """Create the task of a container with `io` (closed again if the create fails)."""
    try:
        pid = await tasks.create(container_id, rootfs=rootfs, io=io.config, options=options)
    except BaseException:
        io.cancel()
        io.close()
        raise
    return Process(tasks, container_id, io=io, pid=pid)


async def exec_process(tasks: TasksAPI, container_id: str, exec_id: str, process: Mapping[str, Any],
                       io: cio.IO) -> Process:
    """Add an exec process with `io` (not started)."""
    try:
        await tasks.exec(container_id, exec_id, process, io=io.config)
    except BaseException:
        io.cancel()
        io.close()
        raise
    return Process(tasks, container_id, exec_id, io=io)


# -- cgroups metrics (the Any in a Metric's data) ---------------------------------------------
# The subset of containerd/cgroups' stats messages pyctr shows; other fields are skipped when
# parsing. Field numbers are those of io.containerd.cgroups.v1.Metrics / .v2.Metrics.

@dataclass(eq=False, repr=False)
class _PidsStat(betterproto.Message):
    current: int = betterproto.uint64_field(1)
    limit: int = betterproto.uint64_field(2)


@dataclass(eq=False, repr=False)
class _CPUUsageV1(betterproto.Message):
    total: int = betterproto.uint64_field(1)
    kernel: int = betterproto.uint64_field(2)
    user: int = betterproto.uint64_field(3)
    per_cpu: list[int] = betterproto.uint64_field(4)


@dataclass(eq=False, repr=False)
class _ThrottleV1(betterproto.Message):
    periods: int = betterproto.uint64_field(1)
    throttled_periods: int = betterproto.uint64_field(2)
    throttled_time: int = betterproto.uint64_field(3)


@dataclass(eq=False, repr=False)
class _CPUStatV1(betterproto.Message):
    usage: _CPUUsageV1 = betterproto.message_field(1)
    throttling: _ThrottleV1 = betterproto.message_field(2)


@dataclass(eq=False, repr=False)
class _MemoryEntryV1(betterproto.Message):
    limit: int = betterproto.uint64_field(1)
    usage: int = betterproto.uint64_field(2)
    max: int = betterproto.uint64_field(3)
    failcnt: int = betterproto.uint64_field(4)


@dataclass(eq=False, repr=False)
class _MemoryStatV1(betterproto.Message):
    cache: int = betterproto.uint64_field(1)
    rss: int = betterproto.uint64_field(2)
    total_cache: int = betterproto.uint64_field(18)
    total_rss: int = betterproto.uint64_field(19)
    usage: _MemoryEntryV1 = betterproto.message_field(33)
    swap: _MemoryEntryV1 = betterproto.message_field(34)
    kernel: _MemoryEntryV1 = betterproto.message_field(35)
    kernel_tcp: _MemoryEntryV1 = betterproto.message_field(36)


@dataclass(eq=False, repr=False)
class CgroupsV1Metrics(betterproto.Message):
    pids: _PidsStat = betterproto.message_field(2)
    cpu: _CPUStatV1 = betterproto.message_field(3)
    memory: _MemoryStatV1 = betterproto.message_field(4)


@dataclass(eq=False, repr=False)
class _CPUStatV2(betterproto.Message):
    usage_usec: int = betterproto.uint64_field(1)
    user_usec: int = betterproto.uint64_field(2)
    system_usec: int = betterproto.uint64_field(3)
    nr_periods: int = betterproto.uint64_field(4)
    nr_throttled: int = betterproto.uint64_field(5)
    throttled_usec: int = betterproto.uint64_field(6)


@dataclass(eq=False, repr=False)
class _MemoryStatV2(betterproto.Message):
    anon: int = betterproto.uint64_field(1)
    file: int = betterproto.uint64_field(2)
    usage: int = betterproto.uint64_field(32)
    usage_limit: int = betterproto.uint64_field(33)
    swap_usage: int = betterproto.uint64_field(34)
    swap_limit: int = betterproto.uint64_field(35)


@dataclass(eq=False, repr=False)
class CgroupsV2Metrics(betterproto.Message):
    pids: _PidsStat = betterproto.message_field(1)
    cpu: _CPUStatV2 = betterproto.message_field(2)
    memory: _MemoryStatV2 = betterproto.message_field(4)


CGROUPS_V1_METRICS = "io.containerd.cgroups.v1.Metrics"
CGROUPS_V2_METRICS = "io.containerd.cgroups.v2.Metrics"


def decode_metrics(data: Optional[AnyMessage]) -> Optional[betterproto.Message]:
    """The cgroups metrics inside a Metric's data (v1 or v2), or None for anything else."""
    if data is None or not data.type_url:
        return None
    name = data.type_url.rsplit("/", 1)[-1]
    if name == CGROUPS_V1_METRICS:
        return CgroupsV1Metrics().parse(data.value)
    if name == CGROUPS_V2_METRICS:
        return CgroupsV2Metrics().parse(data.value)
    return None
