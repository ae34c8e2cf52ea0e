"""containerd.task.v2.Task served by driving runc: containerd's runc task service
(runtime/v2/runc/task/service.go and container.go), in one asyncio loop.

Containers live in `containers` (one per task id; several when shims are grouped). Events go to
the publisher in the order the Go shim sends them:
  Create  -> /tasks/create (TaskCreate)         Exec   -> /tasks/exec-added (TaskExecAdded)
  Start   -> /tasks/start or /tasks/exec-started Pause  -> /tasks/paused, Resume -> /tasks/resumed
  exit    -> /tasks/exit (TaskExit)             Delete -> /tasks/delete (TaskDelete, init only)
  OOM     -> /tasks/oom (TaskOOM)
Start holds `_event_lock` from before runc starts the process until its start event is queued;
exits take it before queueing /tasks/exit, so an exit never overtakes its start.

Exits: the reaper hands every exit of a known pid to `_on_exit` (synchronously), which queues it
for `_process_exits`, one at a time as the Go shim's processExits: kill the rest of the container
when it shares the host's pid namespace, mark the process exited under its lock, publish. A pid
that is not known yet (a process that exits before runc's pid file was read) lands in the
subscription the create/exec opened before running runc, and is queued the moment the pid is
learnt (in the same loop step, so it cannot also arrive the other way).
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from typing import Callable

import structlog
from betterproto.lib.google.protobuf import Any as ProtoAny
from betterproto.lib.google.protobuf import Empty

from pycontainerd.api.gen.containerd.events import (
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIo, TaskOom, TaskPaused,
    TaskResumed, TaskStart,
)
from pycontainerd.api.gen.containerd.runc.v1 import CheckpointOptions, Options, ProcessDetails
from pycontainerd.api.gen.containerd.task.v2 import (
    CheckpointTaskRequest, CloseIoRequest, ConnectRequest, ConnectResponse, CreateTaskRequest,
    CreateTaskResponse, DeleteRequest, DeleteResponse, ExecProcessRequest, KillRequest, PauseRequest,
    PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest,
    StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, TaskBase, UpdateTaskRequest,
    WaitRequest, WaitResponse,
)
from pycontainerd.api.gen.containerd.v1.types import ProcessInfo, Status
from pycontainerd.core import errdefs
from pycontainerd.core import mount as mountlib
from pycontainerd.core.events import type_url

from . import cgroups
from .process import ZERO_TIME, Exec, Init
from .publisher import Publisher
from .reaper import Reaper
from .runc import Runc, RuncError
from .stdio import Stdio

log = structlog.get_logger("pyrunc.service")

_STATUS = {"created": Status.CREATED, "running": Status.RUNNING, "stopped": Status.STOPPED,
           "paused": Status.PAUSED, "pausing": Status.PAUSING}

_OPTIONS_JSON_KEYS = ("no_pivot_root", "no_new_keyring", "shim_cgroup", "io_uid", "io_gid", "binary_name",
                      "root", "criu_path", "systemd_cgroup", "criu_image_path", "criu_work_path")


def options_json(opts: Options) -> bytes:
    """The Options as Go's encoding/json writes the gogo struct (snake_case, omitempty)."""
    out = {}
    for key in _OPTIONS_JSON_KEYS:
        value = getattr(opts, key)
        if value:
            out[key] = value
    return json.dumps(out, separators=(",", ":")).encode()


def should_kill_all_on_exit(bundle: str) -> bool:
    """True unless the spec gives the container a private pid namespace (containerd's
    ShouldKillAllOnExit); True as well when the spec cannot be read."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            spec = json.load(f)
    except (OSError, ValueError) as err:
        log.error("shouldKillAllOnExit: failed to read config.json", error=str(err))
        return True
    for ns in ((spec.get("linux") or {}).get("namespaces") or []):
        if ns.get("type") == "pid" and not ns.get("path"):
            return False
    return True


class Container:
    def __init__(self, id: str, bundle: str, init: Init, kill_all_on_exit: bool) -> None:
        self.id = id
        self.bundle = bundle
        self.init = init
        self.processes: dict[str, Exec] = {}
        self.reserved: set[str] = set()
        self.cgroup: cgroups.Cgroup | None = None
        self.kill_all_on_exit = kill_all_on_exit

    def process(self, exec_id: str) -> Init | Exec:
        if not exec_id:
            return self.init
        p = self.processes.get(exec_id)
        if p is None:
            raise errdefs.NotFound(f"process does not exist {exec_id}")
        return p


RESERVATION_TTL = 30.0  # seconds a place promised by Connect waits for its Create


class TaskService(TaskBase):
    def __init__(self, namespace: str, publisher: Publisher, reaper: Reaper,
                 shutdown: Callable[[], None], capacity: int = 0) -> None:
        self.namespace = namespace
        self.publisher = publisher
        self.reaper = reaper
        self._shutdown = shutdown
        self.containers: dict[str, Container] = {}
        self._by_pid: dict[int, tuple[Container, Init | Exec]] = {}
        self._create_lock = asyncio.Lock()
        self._event_lock = asyncio.Lock()
        self._exits: asyncio.Queue = asyncio.Queue()
        reaper.handler = self._on_exit
        self.oom = cgroups.OOMWatcher(self._oom)
        self._exit_task = asyncio.get_running_loop().create_task(self._process_exits())
        self.containers_changed: Callable[[], None] | None = None
        self.called = False  # any Task call yet (see server's orphan check)
        self.last_call = time.monotonic()
        self.closing = False  # set by the server once it decided to exit
        self.capacity = capacity  # containers this server takes at most (0: no limit)
        self._reserved: dict[str, float] = {}  # id -> when: places promised by Connect, not yet created

    def _changed(self) -> None:
        if self.containers_changed is not None:
            try:
                self.containers_changed()
            except Exception:  # noqa: BLE001 - a hook must not fail a call
                log.exception("containers_changed hook")

    # ---------------------------------------------------------------------------- helpers

    def _publish(self, topic: str, event) -> None:
        self.publisher.publish(topic, event)

    def _container(self, id: str) -> Container:
        self.called = True
        self.last_call = time.monotonic()
        container = self.containers.get(id)
        if container is None:
            raise errdefs.NotFound("container not created")
        return container

    def _oom(self, container_id: str) -> None:
        self._publish("/tasks/oom", TaskOom(container_id=container_id))

    def _index(self, container: Container, process: Init | Exec, subscription: list) -> None:
        """Register a new pid and take an exit that came before it was known. Synchronous: no
        exit can slip between the two."""
        if process.pid <= 0:
            return
        self._by_pid[process.pid] = (container, process)
        for pid, code, when in subscription:
            if pid == process.pid:
                self._by_pid.pop(pid, None)
                self._exits.put_nowait((container, process, code, when))
                break

    def _on_exit(self, pid: int, code: int, when: float) -> bool:
        entry = self._by_pid.pop(pid, None)
        if entry is None:
            return False
        self._exits.put_nowait((*entry, code, when))
        return True

    async def _process_exits(self) -> None:
        while True:
            container, process, code, when = await self._exits.get()
            try:
                await self._handle_exit(container, process, code, when)
            except Exception:  # noqa: BLE001 - the exit loop must survive anything
                log.exception("handling exit", id=container.id, pid=process.pid)

    async def _handle_exit(self, container: Container, process: Init | Exec, code: int, when: float) -> None:
        if process is container.init and container.kill_all_on_exit:
            try:
                await container.init.kill_all()
            except errdefs.ContainerdError as err:
                log.error("failed to kill init's children", id=container.id, error=str(err))
        async with process.lock:
            process.set_exited(code, when)
        async with self._event_lock:
            self._publish("/tasks/exit", TaskExit(container_id=container.id, id=process.id, pid=process.pid,
                                                  exit_status=code, exited_at=process.exited_at_or_zero))

    async def close(self) -> None:
        self._exit_task.cancel()
        self.oom.close()

    # ---------------------------------------------------------------------------- the Task service

    async def create(self, request: CreateTaskRequest) -> CreateTaskResponse:
        self.called = True
        self.last_call = time.monotonic()
        try:
            async with self._create_lock:
                return await self._create(request)
        finally:
            self._reserved.pop(request.id, None)

    async def _create(self, r: CreateTaskRequest) -> CreateTaskResponse:
        opts = Options()
        if r.options is not None and r.options.type_url:
            if not r.options.type_url.endswith("containerd.runc.v1.Options"):
                raise errdefs.InvalidArgument(f"unsupported runtime options type {r.options.type_url}")
            opts = Options().parse(r.options.value)
        rootfs = ""
        if r.rootfs:
            rootfs = os.path.join(r.bundle, "rootfs")
            try:
                os.mkdir(rootfs, 0o711)
            except FileExistsError:
                pass
        with open(os.path.join(r.bundle, "options.json"), "wb") as f:
            f.write(options_json(opts))
        with open(os.path.join(r.bundle, "runtime"), "w") as f:
            f.write(opts.binary_name)
        os.chmod(os.path.join(r.bundle, "options.json"), 0o600)
        os.chmod(os.path.join(r.bundle, "runtime"), 0o600)
        mounted = False
        try:
            for m in r.rootfs:
                try:
                    mountlib.mount(mountlib.Mount(m.type, m.source, "", list(m.options)), rootfs)
                except OSError as err:
                    raise errdefs.Unknown(f"failed to mount rootfs component {m.type}:{m.source}: {err}") from None
                mounted = True
            runc = Runc(self.reaper, command=opts.binary_name, root=opts.root, namespace=self.namespace,
                        log=os.path.join(r.bundle, "log.json"), criu=opts.criu_path,
                        systemd_cgroup=opts.systemd_cgroup)
            init = Init(r.id, runc, Stdio(r.stdin, r.stdout, r.stderr, r.terminal), bundle=r.bundle,
                        rootfs=rootfs, namespace=self.namespace, reaper=self.reaper,
                        no_pivot=opts.no_pivot_root, no_new_keyring=opts.no_new_keyring,
                        criu_work_path=opts.criu_work_path)
            subscription = self.reaper.subscribe()
            try:
                await init.create(r.checkpoint, r.parent_checkpoint)
                container = Container(r.id, r.bundle, init, should_kill_all_on_exit(r.bundle))
                self.containers[r.id] = container
                self._index(container, init, subscription)
                self._changed()
            finally:
                self.reaper.unsubscribe(subscription)
        except BaseException:
            if mounted:
                try:
                    mountlib.unmount_all(rootfs)
                except OSError as err:
                    log.warning("failed to cleanup rootfs mount", error=str(err))
            raise
        if init.pid > 0:
            container.cgroup = cgroups.load(init.pid)
        self._publish("/tasks/create", TaskCreate(
            container_id=r.id, bundle=r.bundle, rootfs=r.rootfs,
            io=TaskIo(stdin=r.stdin, stdout=r.stdout, stderr=r.stderr, terminal=r.terminal),
            checkpoint=r.checkpoint, pid=init.pid))
        return CreateTaskResponse(pid=init.pid)

    async def start(self, request: StartRequest) -> StartResponse:
        container = self._container(request.id)
        process = container.process(request.exec_id)
        async with self._event_lock:
            if isinstance(process, Exec):
                subscription = self.reaper.subscribe()
                try:
                    async with process.lock:
                        await process.start()
                        self._index(container, process, subscription)
                finally:
                    self.reaper.unsubscribe(subscription)
            elif process.state == "created-checkpoint":  # restored now: its pid is new
                subscription = self.reaper.subscribe()
                try:
                    await process.start()
                    self._index(container, process, subscription)
                finally:
                    self.reaper.unsubscribe(subscription)
            else:
                await process.start()
            if container.cgroup is None and process.pid > 0:
                container.cgroup = cgroups.load(process.pid)
            if isinstance(process, Exec):
                self._publish("/tasks/exec-started", TaskExecStarted(container_id=container.id,
                                                                     exec_id=request.exec_id, pid=process.pid))
            else:
                if isinstance(container.cgroup, cgroups.CgroupV2):
                    container.cgroup.enable_controllers()
                if container.cgroup is not None:
                    self.oom.add(container.id, container.cgroup)
                self._publish("/tasks/start", TaskStart(container_id=container.id, pid=process.pid))
        return StartResponse(pid=process.pid)

    async def delete(self, request: DeleteRequest) -> DeleteResponse:
        container = self._container(request.id)
        process = container.process(request.exec_id)
        await process.delete()
        if request.exec_id:
            container.processes.pop(request.exec_id, None)
        else:
            if self.containers.get(request.id) is container:
                del self.containers[request.id]
                self._changed()
            self.oom.remove(container.id)
            for pid, (c, _p) in list(self._by_pid.items()):
                if c is container:
                    del self._by_pid[pid]
            self._publish("/tasks/delete", TaskDelete(container_id=container.id, pid=process.pid,
                                                      exit_status=process.status,
                                                      exited_at=process.exited_at_or_zero))
        return DeleteResponse(exit_status=process.status, exited_at=process.exited_at_or_zero, pid=process.pid)

    async def exec(self, request: ExecProcessRequest) -> Empty:
        container = self._container(request.id)
        exec_id = request.exec_id
        if exec_id in container.processes or exec_id in container.reserved:
            raise errdefs.AlreadyExists(f"id {exec_id}")
        container.reserved.add(exec_id)
        try:
            init = container.init
            async with init.lock:
                init.check_exec()
            try:
                spec = json.loads(request.spec.value if request.spec is not None else b"")
            except ValueError as err:
                raise errdefs.Unknown(str(err)) from None
            process = Exec(exec_id, init, spec, Stdio(request.stdin, request.stdout, request.stderr,
                                                      request.terminal))
            container.processes[exec_id] = process
        finally:
            container.reserved.discard(exec_id)
        self._publish("/tasks/exec-added", TaskExecAdded(container_id=container.id, exec_id=exec_id))
        return Empty()

    async def resize_pty(self, request: ResizePtyRequest) -> Empty:
        process = self._container(request.id).process(request.exec_id)
        try:
            process.resize(request.width, request.height)
        except OSError as err:
            raise errdefs.Unknown(str(err)) from None
        return Empty()

    async def state(self, request: StateRequest) -> StateResponse:
        container = self._container(request.id)
        process = container.process(request.exec_id)
        s = process.stdio
        return StateResponse(
            id=process.id, bundle=container.bundle, pid=process.pid,
            status=_STATUS.get(process.status_name(), Status.UNKNOWN),
            stdin=s.stdin, stdout=s.stdout, stderr=s.stderr, terminal=s.terminal,
            exit_status=process.status, exited_at=process.exited_at_or_zero)

    async def pause(self, request: PauseRequest) -> Empty:
        container = self._container(request.id)
        await container.init.pause()
        self._publish("/tasks/paused", TaskPaused(container_id=container.id))
        return Empty()

    async def resume(self, request: ResumeRequest) -> Empty:
        container = self._container(request.id)
        await container.init.resume()
        self._publish("/tasks/resumed", TaskResumed(container_id=container.id))
        return Empty()

    async def kill(self, request: KillRequest) -> Empty:
        process = self._container(request.id).process(request.exec_id)
        await process.kill(request.signal, request.all)
        return Empty()

    async def pids(self, request: PidsRequest) -> PidsResponse:
        container = self._container(request.id)
        try:
            pids = await container.init.runc.ps(container.id)
        except RuncError as err:
            raise errdefs.Unknown(str(err)) from None
        except ValueError as err:
            raise errdefs.Unknown(f"runc ps: {err}") from None
        by_pid = {p.pid: p for p in container.processes.values() if p.pid}
        processes = []
        for pid in pids:
            info = ProcessInfo(pid=pid)
            execd = by_pid.get(pid)
            if execd is not None:
                details = ProcessDetails(exec_id=execd.id)
                info.info = ProtoAny(type_url=type_url(details), value=bytes(details))
            processes.append(info)
        return PidsResponse(processes=processes)

    async def close_io(self, request: CloseIoRequest) -> Empty:
        process = self._container(request.id).process(request.exec_id)
        try:
            process.close_stdin()
        except OSError as err:
            raise errdefs.Unknown(f"close stdin: {err}") from None
        return Empty()

    async def checkpoint(self, request: CheckpointTaskRequest) -> Empty:
        container = self._container(request.id)
        criu = container.init.runc.criu or "criu"
        if shutil.which(criu) is None:
            raise errdefs.Unimplemented(f"checkpoint needs criu, and {criu} was not found")
        opts = CheckpointOptions()
        if request.options is not None and request.options.type_url:
            opts = CheckpointOptions().parse(request.options.value)
        await container.init.checkpoint(
            request.path, exit=opts.exit, open_tcp=opts.open_tcp, external_unix_sockets=opts.external_unix_sockets,
            terminal=opts.terminal, file_locks=opts.file_locks, empty_namespaces=list(opts.empty_namespaces),
            work_path=opts.work_path)
        return Empty()

    async def update(self, request: UpdateTaskRequest) -> Empty:
        container = self._container(request.id)
        resources = request.resources.value if request.resources is not None else b""
        await container.init.update(resources or b"{}")
        return Empty()

    async def wait(self, request: WaitRequest) -> WaitResponse:
        process = self._container(request.id).process(request.exec_id)
        await process.wait()
        return WaitResponse(exit_status=process.status, exited_at=process.exited_at_or_zero)

    async def stats(self, request: StatsRequest) -> StatsResponse:
        container = self._container(request.id)
        cgroup = container.cgroup
        if cgroup is None:
            raise errdefs.NotFound("cgroup does not exist")
        try:
            data = await asyncio.to_thread(cgroup.stat)
        except OSError as err:
            raise errdefs.Unknown(str(err)) from None
        return StatsResponse(stats=ProtoAny(type_url=cgroup.url, value=data))

    async def connect(self, request: ConnectRequest) -> ConnectResponse:
        if self.closing:  # a lingering server that has just decided to go: take no one in
            raise errdefs.Unavailable("shim is shutting down")
        self.called = True
        self.last_call = time.monotonic()
        container = self.containers.get(request.id)
        if container is None and request.id and self.capacity:
            self.reserve(request.id)
        return ConnectResponse(shim_pid=os.getpid(), task_pid=container.init.pid if container else 0)

    def _reservations(self) -> dict[str, float]:
        """Places promised by Connect (launch.start asks before handing this server out) to
        containers not created yet; a promise unused for RESERVATION_TTL lapses."""
        now = time.monotonic()
        if self._reserved:
            self._reserved = {k: t for k, t in self._reserved.items() if now - t < RESERVATION_TTL}
        return self._reserved

    @property
    def idle(self) -> bool:
        """No container, and no place promised to one: the server may go."""
        return not self.containers and not self._reservations()

    def reserve(self, id: str) -> None:
        """Promise a place to a container about to be created, or refuse: the server is full."""
        reserved = self._reservations()
        if id not in reserved and len(self.containers) + len(reserved) >= self.capacity:
            raise errdefs.FailedPrecondition(f"shim serves its maximum of {self.capacity} containers")
        reserved[id] = time.monotonic()

    async def shutdown(self, request: ShutdownRequest) -> Empty:
        self.called = True
        self.last_call = time.monotonic()
        if self.idle:
            self._shutdown()
        return Empty()


__all__ = ["Container", "TaskService", "ZERO_TIME", "options_json", "should_kill_all_on_exit"]
