"""containerd.runtime.linux.shim.v1.Shim over the runc package's TaskService (containerd's
runtime/v1/shim/service.go, with the runc work done by the v2 shim's code).

A v1 shim serves one container. Its requests name processes: the container's own id is the init
process, anything else an exec'd one (Delete, Pause, Resume, Checkpoint and Update name nothing
and act on init). Each call becomes the TaskService call for (container id, exec id). Errors keep
the Go shim's words where they differ from the v2 service's: an unknown process is NotFound
"process X does not exist", a call needing init before Create is FailedPrecondition "container
must be created".

Options: Create takes containerd.linux.runc.CreateOptions (or, leniently, containerd.runc.v1.
Options); they become the runc.v1 Options the TaskService reads, with the runc binary from the
request's `runtime`, and root, criu and systemd-cgroup from the shim's flags. Checkpoint takes
containerd.linux.runc.CheckpointOptions. ListPids reports exec ids as containerd.linux.runc.
ProcessDetails, as the Go shim does.

Delete returns only once the exits queued so far were sent to the daemon (at most
DELETE_FLUSH_TIMEOUT): containerd kills a v1 shim with SIGKILL right after deleting its task.
"""
from __future__ import annotations

import asyncio
import os

from betterproto.lib.google.protobuf import Any as ProtoAny
from betterproto.lib.google.protobuf import Empty

from pycontainerd.api.gen.containerd.linux.runc import CheckpointOptions, CreateOptions, ProcessDetails
from pycontainerd.api.gen.containerd.runc import v1 as runcopts
from pycontainerd.api.gen.containerd.runtime.linux.shim import v1 as shimapi
from pycontainerd.api.gen.containerd.task import v2 as taskapi
from pycontainerd.api.gen.containerd.v1.types import ProcessInfo
from pycontainerd.core import errdefs
from pycontainerd.core.events import type_url

CREATE_OPTIONS_URL = "containerd.linux.runc.CreateOptions"
CHECKPOINT_OPTIONS_URL = "containerd.linux.runc.CheckpointOptions"
RUNC_OPTIONS_URL = "containerd.runc.v1.Options"
RUNC_DETAILS_URL = "containerd.runc.v1.ProcessDetails"
DELETE_FLUSH_TIMEOUT = 2.0


class _InvalidArgumentStatus(errdefs.InvalidArgument):
    """An error the Go shim makes with status.Errorf: its message goes out without a suffix."""

    def __str__(self) -> str:
        return self.message


class ShimConfig:
    """The shim's flags that shape every container it runs."""

    def __init__(self, namespace: str, workdir: str = "", runtime_root: str = "", criu: str = "",
                 systemd_cgroup: bool = False) -> None:
        self.namespace = namespace
        self.workdir = workdir
        self.runtime_root = runtime_root
        self.criu = criu
        self.systemd_cgroup = systemd_cgroup


def runc_options(request: shimapi.CreateTaskRequest, config: ShimConfig) -> runcopts.Options:
    """The runc.v1 Options the TaskService runs a v1 Create with."""
    opts = runcopts.Options()
    any_ = request.options
    if any_ is not None and any_.type_url:
        url = any_.type_url.rsplit("/", 1)[-1]
        if url == CREATE_OPTIONS_URL:
            c = CreateOptions().parse(any_.value)
            opts = runcopts.Options(no_pivot_root=c.no_pivot_root, no_new_keyring=c.no_new_keyring,
                                    shim_cgroup=c.shim_cgroup, io_uid=c.io_uid, io_gid=c.io_gid,
                                    criu_image_path=c.criu_image_path, criu_work_path=c.criu_work_path)
        elif url == RUNC_OPTIONS_URL:
            opts = runcopts.Options().parse(any_.value)
        else:
            raise errdefs.InvalidArgument(f"unsupported task create options type {any_.type_url}")
    opts.binary_name = request.runtime or opts.binary_name or "runc"
    opts.root = config.runtime_root or opts.root
    opts.criu_path = config.criu or opts.criu_path
    opts.systemd_cgroup = config.systemd_cgroup or opts.systemd_cgroup
    if not opts.criu_work_path:
        opts.criu_work_path = config.workdir
    return opts


class ShimService(shimapi.ShimBase):
    def __init__(self, tasks, config: ShimConfig, events) -> None:
        """`tasks` is a runc TaskService, `events` the V1Events it publishes through."""
        self.tasks = tasks
        self.config = config
        self.events = events
        self.id = ""
        self.bundle = ""
        self._create_lock = asyncio.Lock()

    # ---------------------------------------------------------------------------- lookups

    def _container(self):
        return self.tasks.containers.get(self.id) if self.id else None

    def _init(self):
        container = self._container()
        if container is None:
            raise errdefs.FailedPrecondition("container must be created")
        return container

    def _exec_id(self, id: str) -> str:
        """The TaskService exec id of process `id`, after checking it exists."""
        container = self._container()
        if container is not None:
            if id == self.id:
                return ""
            if id in container.processes:
                return id
        raise errdefs.NotFound(f"process {id} does not exist")

    # ---------------------------------------------------------------------------- the Shim service

    async def create(self, r: shimapi.CreateTaskRequest) -> shimapi.CreateTaskResponse:
        async with self._create_lock:
            if self.id:
                raise errdefs.AlreadyExists(f"shim already serves container {self.id}")
            opts = runc_options(r, self.config)
            request = taskapi.CreateTaskRequest(
                id=r.id, bundle=r.bundle, rootfs=r.rootfs, terminal=r.terminal, stdin=r.stdin, stdout=r.stdout,
                stderr=r.stderr, checkpoint=r.checkpoint, parent_checkpoint=r.parent_checkpoint,
                options=ProtoAny(type_url=RUNC_OPTIONS_URL, value=bytes(opts)))
            resp = await self.tasks.create(request)
            self.id, self.bundle = r.id, r.bundle
            return shimapi.CreateTaskResponse(pid=resp.pid)

    async def start(self, r: shimapi.StartRequest) -> shimapi.StartResponse:
        exec_id = self._exec_id(r.id)
        resp = await self.tasks.start(taskapi.StartRequest(id=self.id, exec_id=exec_id))
        return shimapi.StartResponse(id=r.id, pid=resp.pid)

    async def delete(self, _: Empty) -> shimapi.DeleteResponse:
        self._init()
        resp = await self.tasks.delete(taskapi.DeleteRequest(id=self.id))
        await self.events.flush(DELETE_FLUSH_TIMEOUT)
        return shimapi.DeleteResponse(pid=resp.pid, exit_status=resp.exit_status, exited_at=resp.exited_at)

    async def delete_process(self, r: shimapi.DeleteProcessRequest) -> shimapi.DeleteResponse:
        if r.id == self.id:
            raise _InvalidArgumentStatus("cannot delete init process with DeleteProcess")
        exec_id = self._exec_id(r.id)
        resp = await self.tasks.delete(taskapi.DeleteRequest(id=self.id, exec_id=exec_id))
        await self.events.flush(DELETE_FLUSH_TIMEOUT)
        return shimapi.DeleteResponse(pid=resp.pid, exit_status=resp.exit_status, exited_at=resp.exited_at)

    async def list_pids(self, r: shimapi.ListPidsRequest) -> shimapi.ListPidsResponse:
        self._init()
        resp = await self.tasks.pids(taskapi.PidsRequest(id=self.id))
        processes = []
        for p in resp.processes:
            info = ProcessInfo(pid=p.pid)
            if p.info is not None and p.info.type_url.rsplit("/", 1)[-1] == RUNC_DETAILS_URL:
                details = ProcessDetails(exec_id=runcopts.ProcessDetails().parse(p.info.value).exec_id)
                info.info = ProtoAny(type_url=type_url(details), value=bytes(details))
            processes.append(info)
        return shimapi.ListPidsResponse(processes=processes)

    async def pause(self, _: Empty) -> Empty:
        self._init()
        await self.tasks.pause(taskapi.PauseRequest(id=self.id))
        return Empty()

    async def resume(self, _: Empty) -> Empty:
        self._init()
        await self.tasks.resume(taskapi.ResumeRequest(id=self.id))
        return Empty()

    async def checkpoint(self, r: shimapi.CheckpointTaskRequest) -> Empty:
        self._init()
        request = taskapi.CheckpointTaskRequest(id=self.id, path=r.path)
        if r.options is not None and r.options.type_url:
            if r.options.type_url.rsplit("/", 1)[-1] != CHECKPOINT_OPTIONS_URL:
                raise errdefs.InvalidArgument(f"unsupported checkpoint options type {r.options.type_url}")
            c = CheckpointOptions().parse(r.options.value)
            opts = runcopts.CheckpointOptions(
                exit=c.exit, open_tcp=c.open_tcp, external_unix_sockets=c.external_unix_sockets,
                terminal=c.terminal, file_locks=c.file_locks, empty_namespaces=list(c.empty_namespaces),
                cgroups_mode=c.cgroups_mode, image_path=c.image_path, work_path=c.work_path)
            request.options = ProtoAny(type_url=type_url(opts), value=bytes(opts))
        await self.tasks.checkpoint(request)
        return Empty()

    async def kill(self, r: shimapi.KillRequest) -> Empty:
        if r.id:
            exec_id = self._exec_id(r.id)
        else:
            self._init()
            exec_id = ""
        await self.tasks.kill(taskapi.KillRequest(id=self.id, exec_id=exec_id, signal=r.signal, all=r.all))
        return Empty()

    async def exec(self, r: shimapi.ExecProcessRequest) -> Empty:
        container = self._container()
        if container is not None and (r.id == self.id or r.id in container.processes):
            raise errdefs.AlreadyExists(f"id {r.id}")
        self._init()
        request = taskapi.ExecProcessRequest(id=self.id, exec_id=r.id, terminal=r.terminal, stdin=r.stdin,
                                             stdout=r.stdout, stderr=r.stderr)
        if r.spec is not None:
            request.spec = r.spec
        await self.tasks.exec(request)
        return Empty()

    async def resize_pty(self, r: shimapi.ResizePtyRequest) -> Empty:
        if not r.id:
            raise errdefs.InvalidArgument("id not provided")
        try:
            exec_id = self._exec_id(r.id)
        except errdefs.NotFound:
            raise errdefs.Unknown(f"process does not exist {r.id}") from None
        await self.tasks.resize_pty(taskapi.ResizePtyRequest(id=self.id, exec_id=exec_id, width=r.width,
                                                             height=r.height))
        return Empty()

    async def state(self, r: shimapi.StateRequest) -> shimapi.StateResponse:
        exec_id = self._exec_id(r.id)
        s = await self.tasks.state(taskapi.StateRequest(id=self.id, exec_id=exec_id))
        return shimapi.StateResponse(id=r.id, bundle=self.bundle, pid=s.pid, status=s.status, stdin=s.stdin,
                                     stdout=s.stdout, stderr=s.stderr, terminal=s.terminal,
                                     exit_status=s.exit_status, exited_at=s.exited_at)

    async def close_io(self, r: shimapi.CloseIoRequest) -> Empty:
        exec_id = self._exec_id(r.id)
        await self.tasks.close_io(taskapi.CloseIoRequest(id=self.id, exec_id=exec_id, stdin=True))
        return Empty()

    async def shim_info(self, _: Empty) -> shimapi.ShimInfoResponse:
        return shimapi.ShimInfoResponse(shim_pid=os.getpid())

    async def update(self, r: shimapi.UpdateTaskRequest) -> Empty:
        self._init()
        request = taskapi.UpdateTaskRequest(id=self.id)
        if r.resources is not None:
            request.resources = r.resources
        await self.tasks.update(request)
        return Empty()

    async def wait(self, r: shimapi.WaitRequest) -> shimapi.WaitResponse:
        exec_id = self._exec_id(r.id)
        resp = await self.tasks.wait(taskapi.WaitRequest(id=self.id, exec_id=exec_id))
        return shimapi.WaitResponse(exit_status=resp.exit_status, exited_at=resp.exited_at)

    # ---------------------------------------------------------------------------- shutdown

    async def terminate(self, grace: float = 2.0) -> None:
        """What the Go shim does on SIGTERM: SIGKILL everything in the container, delete it."""
        container = self._container()
        if container is None:
            return
        try:
            await self.tasks.kill(taskapi.KillRequest(id=self.id, signal=9, all=True))
        except errdefs.ContainerdError:
            pass
        try:
            await asyncio.wait_for(container.init.wait(), grace)
        except asyncio.TimeoutError:
            pass
        try:
            await self.tasks.delete(taskapi.DeleteRequest(id=self.id))
        except errdefs.ContainerdError:
            pass
