"""Tasks: the plain service (`io.containerd.service.v1.tasks-service`, plugins/tasks/service.py)
and its gRPC adapter (`io.containerd.grpc.v1.tasks`: containerd.services.tasks.v1.Tasks).

The adapter only turns messages into service calls and results into messages; errors are the
errdefs classes the service, the containers store and the shims raise.
"""
from __future__ import annotations

import betterproto
from betterproto.lib.google.protobuf import Empty

from pycontainerd import config as configmod
from pycontainerd.api.gen.containerd import types as pbtypes
from pycontainerd.api.gen.containerd.services.tasks import v1 as api
from pycontainerd.api.gen.containerd.v1 import types as tasktypes
from pycontainerd.core.plugin import InitContext, PluginType, Registration, hookimpl
from pycontainerd.plugins.runtime import IO

from .service import STATE_TIMEOUT, ProcessState, TasksService

SERVICE_ID = "tasks-service"
CONTAINERS_SERVICE = f"{PluginType.SERVICE}.containers-service"


def _present(msg) -> bool:
    return msg is not None and betterproto.serialized_on_wire(msg)


def _process_pb(state: ProcessState) -> tasktypes.Process:
    pb = tasktypes.Process(id=state.id, pid=state.pid, status=state.status, stdin=state.stdin,
                           stdout=state.stdout, stderr=state.stderr, terminal=state.terminal,
                           exit_status=state.exit_status)
    if state.exited_at is not None:
        pb.exited_at = state.exited_at
    return pb


def _exit_pb(exit, id: str = "") -> api.DeleteResponse:
    pb = api.DeleteResponse(id=id, pid=exit.pid, exit_status=exit.status)
    if exit.timestamp is not None:
        pb.exited_at = exit.timestamp
    return pb


class TasksGRPC(api.TasksBase):
    """Thin adapter over TasksService."""

    def __init__(self, service: TasksService):
        self.service = service

    async def create(self, request: api.CreateTaskRequest) -> api.CreateTaskResponse:
        container_id, pid = await self.service.create(
            request.container_id, rootfs=list(request.rootfs),
            io=IO(stdin=request.stdin, stdout=request.stdout, stderr=request.stderr, terminal=request.terminal),
            checkpoint=request.checkpoint if _present(request.checkpoint) else None,
            options=request.options if _present(request.options) else None,
            runtime_path=request.runtime_path)
        return api.CreateTaskResponse(container_id=container_id, pid=pid)

    async def start(self, request: api.StartRequest) -> api.StartResponse:
        return api.StartResponse(pid=await self.service.start(request.container_id, request.exec_id))

    async def delete(self, request: api.DeleteTaskRequest) -> api.DeleteResponse:
        return _exit_pb(await self.service.delete(request.container_id))

    async def delete_process(self, request: api.DeleteProcessRequest) -> api.DeleteResponse:
        exit = await self.service.delete_process(request.container_id, request.exec_id)
        return _exit_pb(exit, request.exec_id)

    async def get(self, request: api.GetRequest) -> api.GetResponse:
        return api.GetResponse(process=_process_pb(await self.service.get(request.container_id, request.exec_id)))

    async def list(self, request: api.ListTasksRequest) -> api.ListTasksResponse:
        return api.ListTasksResponse(tasks=[_process_pb(s) for s in await self.service.list()])

    async def kill(self, request: api.KillRequest) -> Empty:
        await self.service.kill(request.container_id, request.signal, request.exec_id, request.all)
        return Empty()

    async def exec(self, request: api.ExecProcessRequest) -> Empty:
        await self.service.exec(
            request.container_id, request.exec_id, spec=request.spec if _present(request.spec) else None,
            io=IO(stdin=request.stdin, stdout=request.stdout, stderr=request.stderr, terminal=request.terminal))
        return Empty()

    async def resize_pty(self, request: api.ResizePtyRequest) -> Empty:
        await self.service.resize_pty(request.container_id, request.width, request.height, request.exec_id)
        return Empty()

    async def close_io(self, request: api.CloseIoRequest) -> Empty:
        await self.service.close_io(request.container_id, request.exec_id, request.stdin)
        return Empty()

    async def pause(self, request: api.PauseTaskRequest) -> Empty:
        await self.service.pause(request.container_id)
        return Empty()

    async def resume(self, request: api.ResumeTaskRequest) -> Empty:
        await self.service.resume(request.container_id)
        return Empty()

    async def list_pids(self, request: api.ListPidsRequest) -> api.ListPidsResponse:
        infos = await self.service.list_pids(request.container_id)
        out = []
        for p in infos:
            pb = tasktypes.ProcessInfo(pid=p.pid)
            if p.info is not None:
                pb.info = p.info
            out.append(pb)
        return api.ListPidsResponse(processes=out)

    async def checkpoint(self, request: api.CheckpointTaskRequest) -> api.CheckpointTaskResponse:
        descriptors = await self.service.checkpoint(
            request.container_id, request.options if _present(request.options) else None)
        return api.CheckpointTaskResponse(descriptors=descriptors)

    async def update(self, request: api.UpdateTaskRequest) -> Empty:
        await self.service.update(request.container_id,
                                  request.resources if _present(request.resources) else None,
                                  dict(request.annotations))
        return Empty()

    async def metrics(self, request: api.MetricsRequest) -> api.MetricsResponse:
        out = []
        for m in await self.service.metrics(request.filters):
            pb = pbtypes.Metric(timestamp=m.timestamp, id=m.id)
            if m.data is not None:
                pb.data = m.data
            out.append(pb)
        return api.MetricsResponse(metrics=out)

    async def wait(self, request: api.WaitRequest) -> api.WaitResponse:
        exit = await self.service.wait(request.container_id, request.exec_id)
        pb = api.WaitResponse(exit_status=exit.status)
        if exit.timestamp is not None:
            pb.exited_at = exit.timestamp
        return pb


def _state_timeout(ctx: InitContext):
    cfg = ctx.daemon_config
    if cfg is None:
        return lambda: 2.0
    return lambda: configmod.timeout(cfg, STATE_TIMEOUT)


async def init_service(ctx: InitContext) -> TasksService:
    v2 = ctx.get(PluginType.RUNTIME_V2, "task")
    runtimes = {f"{PluginType.RUNTIME}.{id}": rt for id, rt in ctx.get_all(PluginType.RUNTIME).items()}
    containers = ctx.get(PluginType.SERVICE, "containers-service")
    return TasksService(containers, v2, runtimes, state_timeout=_state_timeout(ctx))


async def init_grpc(ctx: InitContext) -> TasksGRPC:
    return TasksGRPC(ctx.get(PluginType.SERVICE, SERVICE_ID))


@hookimpl
def pycontainerd_register(registry):
    registry.register(Registration(
        PluginType.SERVICE, SERVICE_ID, init_service,
        requires=(PluginType.RUNTIME, PluginType.RUNTIME_V2, PluginType.METADATA, PluginType.EVENT,
                  PluginType.TASK_MONITOR, CONTAINERS_SERVICE)))
    registry.register(Registration(PluginType.GRPC, "tasks", init_grpc,
                                   requires=(f"{PluginType.SERVICE}.{SERVICE_ID}",)))
