"""A v1 task and its exec'd processes: the runtime contract (plugins/runtime) over one v1 shim's
Shim API (containerd's runtime/v1/linux/task.go and process.go).

The daemon side publishes the task events a v1 shim does not: /tasks/start (Start),
/tasks/paused, /tasks/resumed, /tasks/checkpointed, /tasks/exec-started (an exec's Start);
/tasks/create and /tasks/delete come from the runtime, /tasks/exit from the shim. Stats read the
task's cgroup from the daemon, as containerd does for v1 tasks (through the runc package's
cgroups module: v1 and v2 hierarchies).
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from betterproto.lib.google.protobuf import Any as ProtoAny
from betterproto.lib.google.protobuf import Empty

from pycontainerd.api.gen.containerd.events import (
    TaskCheckpointed, TaskExecStarted, TaskPaused, TaskResumed, TaskStart,
)
from pycontainerd.api.gen.containerd.runtime.linux.shim import v1 as shimapi
from pycontainerd.core import errdefs, identifiers
from pycontainerd.plugins.runtime.v2.runc import cgroups

from .. import ExecOpts, Exit, ProcessInfo, State

if TYPE_CHECKING:
    from .bundle import Bundle
    from .shim_client import Shim

TASK_START = "/tasks/start"
TASK_PAUSED = "/tasks/paused"
TASK_RESUMED = "/tasks/resumed"
TASK_CHECKPOINTED = "/tasks/checkpointed"
TASK_EXEC_STARTED = "/tasks/exec-started"


def _state(resp: shimapi.StateResponse) -> State:
    return State(pid=resp.pid, status=resp.status, stdin=resp.stdin, stdout=resp.stdout, stderr=resp.stderr,
                 terminal=resp.terminal, exit_status=resp.exit_status, exited_at=resp.exited_at)


class LinuxTask:
    """A task run by a v1 shim. `id` is the container's id (and its init process's)."""

    def __init__(self, bundle: "Bundle", shim: "Shim", pid: int, events: Any, runc_options: Any = None,
                 cgroup: Any = None):
        self.bundle = bundle
        self.shim = shim
        self._pid = pid
        self.events = events
        self.runc_options = runc_options
        self._cgroup = cgroup

    @property
    def id(self) -> str:
        return self.bundle.id

    @property
    def namespace(self) -> str:
        return self.bundle.namespace

    def __repr__(self) -> str:
        return f"<v1 task {self.namespace}/{self.id}>"

    def _publish(self, topic: str, event: Any) -> None:
        self.events.publish(self.namespace, topic, event)

    # ------------------------------------------------------------------------ the process API

    async def pid(self) -> int:
        return self._pid

    async def state(self, process_id: str = "", timeout: float | None = None) -> State:
        try:
            resp = await self.shim.api.state(shimapi.StateRequest(id=process_id or self.id), timeout=timeout)
        except errdefs.ContainerdError as err:
            if self.shim.client.closed:
                raise errdefs.NotFound() from err
            raise
        return _state(resp)

    async def start(self) -> int:
        resp = await self.shim.api.start(shimapi.StartRequest(id=self.id))
        self._pid = resp.pid
        if self._cgroup is None and self._pid > 0:
            self._cgroup = await asyncio.to_thread(cgroups.load, self._pid)
        self._publish(TASK_START, TaskStart(container_id=self.id, pid=self._pid))
        return self._pid

    async def kill(self, signal: int, all: bool = False) -> None:
        await self.shim.api.kill(shimapi.KillRequest(id=self.id, signal=signal, all=all))

    async def resize_pty(self, width: int, height: int) -> None:
        await self.shim.api.resize_pty(shimapi.ResizePtyRequest(id=self.id, width=width, height=height))

    async def close_io(self) -> None:
        await self.shim.api.close_io(shimapi.CloseIoRequest(id=self.id, stdin=True))

    async def wait(self) -> Exit:
        resp = await self.shim.api.wait(shimapi.WaitRequest(id=self.id))
        return Exit(pid=self._pid, status=resp.exit_status, timestamp=resp.exited_at)

    async def delete(self) -> Exit:  # pragma: no cover - the runtime deletes tasks
        raise errdefs.FailedPrecondition("delete a task through its runtime")

    # ------------------------------------------------------------------------ the task API

    async def pause(self) -> None:
        await self.shim.api.pause(Empty())
        self._publish(TASK_PAUSED, TaskPaused(container_id=self.id))

    async def resume(self) -> None:
        await self.shim.api.resume(Empty())
        self._publish(TASK_RESUMED, TaskResumed(container_id=self.id))

    async def exec(self, exec_id: str, opts: ExecOpts) -> "LinuxProcess":
        try:
            identifiers.validate(exec_id)
        except errdefs.InvalidArgument as err:
            raise errdefs.InvalidArgument(f"invalid exec id: {err.message}") from None
        request = shimapi.ExecProcessRequest(id=exec_id, stdin=opts.io.stdin, stdout=opts.io.stdout,
                                             stderr=opts.io.stderr, terminal=opts.io.terminal)
        if opts.spec is not None:
            request.spec = opts.spec
        await self.shim.api.exec(request)
        return LinuxProcess(self, exec_id)

    async def pids(self) -> list[ProcessInfo]:
        resp = await self.shim.api.list_pids(shimapi.ListPidsRequest(id=self.id))
        return [ProcessInfo(pid=p.pid, info=p.info if p.info is not None and p.info.type_url else None)
                for p in resp.processes]

    async def checkpoint(self, path: str, options: Any = None) -> None:
        request = shimapi.CheckpointTaskRequest(path=path)
        if options is not None:
            request.options = options
        await self.shim.api.checkpoint(request)
        self._publish(TASK_CHECKPOINTED, TaskCheckpointed(container_id=self.id))

    async def update(self, resources: Any = None, annotations: dict[str, str] | None = None) -> None:
        request = shimapi.UpdateTaskRequest()
        if resources is not None:
            request.resources = resources
        await self.shim.api.update(request)

    async def process(self, exec_id: str) -> "LinuxProcess":
        proc = LinuxProcess(self, exec_id)
        await proc.state()
        return proc

    async def stats(self) -> Any:
        cgroup = self._cgroup
        if cgroup is None:
            raise errdefs.NotFound("cgroup does not exist")
        try:
            data = await asyncio.to_thread(cgroup.stat)
        except OSError as err:
            raise errdefs.Unknown(str(err)) from None
        return ProtoAny(type_url=cgroup.url, value=data)


class LinuxProcess:
    """An exec'd process of a LinuxTask (containerd's runtime/v1/linux Process)."""

    def __init__(self, task: LinuxTask, exec_id: str):
        self.task = task
        self.exec_id = exec_id

    @property
    def id(self) -> str:
        return self.exec_id

    async def state(self, timeout: float | None = None) -> State:
        return await self.task.state(self.exec_id, timeout=timeout)

    async def kill(self, signal: int, all: bool = False) -> None:
        # a v1 shim kills one exec'd process, never "all"
        await self.task.shim.api.kill(shimapi.KillRequest(id=self.exec_id, signal=signal))

    async def resize_pty(self, width: int, height: int) -> None:
        await self.task.shim.api.resize_pty(shimapi.ResizePtyRequest(id=self.exec_id, width=width, height=height))

    async def close_io(self) -> None:
        await self.task.shim.api.close_io(shimapi.CloseIoRequest(id=self.exec_id, stdin=True))

    async def start(self) -> int:
        resp = await self.task.shim.api.start(shimapi.StartRequest(id=self.exec_id))
        self.task._publish(TASK_EXEC_STARTED, TaskExecStarted(container_id=self.task.id, exec_id=self.exec_id,
                                                               pid=resp.pid))
        return resp.pid

    async def wait(self) -> Exit:
        resp = await self.task.shim.api.wait(shimapi.WaitRequest(id=self.exec_id))
        return Exit(pid=0, status=resp.exit_status, timestamp=resp.exited_at)

    async def delete(self) -> Exit:
        resp = await self.task.shim.api.delete_process(shimapi.DeleteProcessRequest(id=self.exec_id))
        return Exit(pid=resp.pid, status=resp.exit_status, timestamp=resp.exited_at)
