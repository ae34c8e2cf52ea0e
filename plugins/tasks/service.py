"""The tasks service in plain Python (containerd's services/tasks/local.go): it finds a task's
container through the containers service, picks the runtime by the container's runtime name
(a registered runtime plugin of that name, else runtime v2, which resolves any name to a shim
binary), and forwards each call to the runtime's task or exec'd process.

Works in the request's namespace (core.context). Takes and returns plain values and the runtime
contract's dataclasses; the gRPC adapter (plugins/tasks/__init__.py) owns the messages.

Events: none are published here. In containerd 1.6 the shim publishes /tasks/create, /start,
/exit, /delete, /exec-added, /exec-started, /paused, /resumed and /oom (they reach the exchange
through the ttrpc Events service); the v2 runtime publishes /tasks/exit and /tasks/delete only for
a task whose shim died. Publishing here too would double them.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Optional

import structlog
from betterproto.lib.google.protobuf import Any as ProtoAny

from pycontainerd.core import errdefs, filters
from pycontainerd.core.context import namespace
from pycontainerd.plugins.runtime import IO, CreateOpts, ExecOpts, Exit, PlatformRuntime, ProcessInfo, State, Status

log = structlog.get_logger(__name__)

STATE_TIMEOUT = "io.containerd.timeout.task.state"
RUNC_OPTIONS_URL = "containerd.runc.v1.Options"
RUNTIME_LINUX_V1 = "io.containerd.runtime.v1.linux"
RUNTIME_RUNC_V1 = "io.containerd.runc.v1"
RUNTIME_RUNC_V2 = "io.containerd.runc.v2"


@dataclass
class ProcessState:
    """What Get and List report for a process (containerd's types.task.Process)."""

    id: str
    pid: int = 0
    status: Status = Status.UNKNOWN
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    exit_status: int = 0
    exited_at: Optional[datetime] = None


@dataclass
class Metric:
    timestamp: datetime
    id: str
    data: Any


class _StatusError(errdefs.InvalidArgument):
    """An error containerd makes with status.Errorf: the message is sent without a suffix."""

    def __str__(self) -> str:
        return self.message


def to_any(value: Any) -> Optional[ProtoAny]:
    """A protobuf Any from an Any, a store TypedValue or None."""
    if value is None:
        return None
    if isinstance(value, ProtoAny):
        return value
    return ProtoAny(type_url=getattr(value, "type_url", ""), value=bytes(getattr(value, "value", b"")))


def check_runtime(current: str, expected: str) -> bool:
    """containerd's checkRuntime: `expected`'s dot-separated parts prefix `current`'s."""
    cp = current.split(".")
    for i, part in enumerate(expected.split(".")):
        if i >= len(cp) or cp[i] != part:
            return False
    return True


def restore_path(runtime: str, options: Optional[ProtoAny]) -> str:
    """The CRIU image a Create's runc options point at ("" when none)."""
    if options is None or not options.type_url:
        return ""
    if check_runtime(runtime, "io.containerd.runc"):
        if not options.type_url.endswith(RUNC_OPTIONS_URL):
            raise errdefs.InvalidArgument(f"invalid task create option for {runtime}")
        from pycontainerd.api.gen.containerd.runc.v1 import Options

        return Options().parse(options.value).criu_image_path
    return ""


class TasksService:
    def __init__(self, containers: Any, v2_runtime: PlatformRuntime,
                 runtimes: Optional[dict[str, PlatformRuntime]] = None,
                 state_timeout: Callable[[], float] = lambda: 2.0):
        """`containers` is the containers service (get(id) in the request's namespace);
        `runtimes` maps a runtime plugin's full name (e.g. io.containerd.runtime.v1.linux) to it."""
        self.containers = containers
        self.v2 = v2_runtime
        self.runtimes = dict(runtimes or {})
        self.state_timeout = state_timeout

    # ------------------------------------------------------------------------ lookups

    def _container(self, container_id: str) -> Any:
        return self.containers.get(container_id)

    def _runtime(self, name: str) -> PlatformRuntime:
        return self.runtimes.get(name, self.v2)

    def _all_runtimes(self) -> list[PlatformRuntime]:
        return [*self.runtimes.values(), self.v2]

    def _task_of(self, container: Any):
        runtime = self._runtime(container.runtime_name)
        try:
            return runtime.get(namespace(), container.id)
        except errdefs.NotFound:
            raise errdefs.NotFound(f"task {container.id} not found") from None

    def _task(self, container_id: str):
        return self._task_of(self._container(container_id))

    async def _process(self, container_id: str, exec_id: str = ""):
        task = self._task(container_id)
        if exec_id:
            return await task.process(exec_id)
        return task

    # ------------------------------------------------------------------------ lifecycle

    async def create(self, container_id: str, rootfs: Iterable[Any] = (), io: IO | None = None,
                     checkpoint: Any = None, options: Optional[ProtoAny] = None,
                     runtime_path: str = "") -> tuple[str, int]:
        """Create the task of container `container_id`; (container id, pid)."""
        ns = namespace()
        container = self._container(container_id)
        checkpoint_path = restore_path(container.runtime_name, options)
        if not checkpoint_path and checkpoint is not None and getattr(checkpoint, "digest", ""):
            raise errdefs.Unimplemented("restoring a task from a checkpoint image is not supported")
        opts = CreateOpts(
            spec=to_any(container.spec), rootfs=list(rootfs), io=io or IO(), checkpoint=checkpoint_path,
            runtime=runtime_path or container.runtime_name, runtime_options=to_any(container.runtime_options),
            task_options=options if options is not None and options.type_url else None)
        if container.runtime_name.startswith("io.containerd.runtime.v1."):
            log.warning("runtime v1 is deprecated since containerd v1.4, consider using runtime v2")
        elif container.runtime_name == RUNTIME_RUNC_V1:
            log.warning(f"{RUNTIME_RUNC_V1!r} is deprecated since containerd v1.4, consider using {RUNTIME_RUNC_V2!r}")
        runtime = self._runtime(container.runtime_name)
        try:
            runtime.get(ns, container_id)
        except errdefs.NotFound:
            pass
        else:
            raise errdefs.AlreadyExists(f"task {container_id}")
        task = await runtime.create(ns, container_id, opts)
        try:
            pid = await task.pid()
        except errdefs.ContainerdError as err:
            raise errdefs.Unknown(f"failed to get task pid: {err}") from None
        return container_id, pid

    async def start(self, container_id: str, exec_id: str = "") -> int:
        process = await self._process(container_id, exec_id)
        await process.start()
        return (await process.state()).pid

    async def delete(self, container_id: str) -> Exit:
        container = self._container(container_id)
        runtime = self._runtime(container.runtime_name)
        try:
            runtime.get(namespace(), container.id)
        except errdefs.NotFound:
            raise errdefs.NotFound(f"task {container.id} not found") from None
        return await runtime.delete(namespace(), container_id)

    async def delete_process(self, container_id: str, exec_id: str) -> Exit:
        process = await self._task(container_id).process(exec_id)
        return await process.delete()

    # ------------------------------------------------------------------------ state

    async def _process_state(self, process: Any) -> ProcessState:
        try:
            async with asyncio.timeout(self.state_timeout()):
                state = await process.state()
        except errdefs.NotFound:
            raise
        except (errdefs.ContainerdError, TimeoutError) as err:
            log.error("get state", id=process.id, error=str(err) or type(err).__name__)
            state = State()
        return ProcessState(id=process.id, pid=state.pid, status=state.status, stdin=state.stdin,
                            stdout=state.stdout, stderr=state.stderr, terminal=state.terminal,
                            exit_status=state.exit_status, exited_at=state.exited_at)

    async def get(self, container_id: str, exec_id: str = "") -> ProcessState:
        return await self._process_state(await self._process(container_id, exec_id))

    async def list(self) -> list[ProcessState]:
        ns = namespace()
        tasks = [t for r in self._all_runtimes() for t in r.tasks(ns)]
        states = await asyncio.gather(*(self._process_state(t) for t in tasks), return_exceptions=True)
        out = []
        for task, state in zip(tasks, states):
            if isinstance(state, errdefs.NotFound):  # deleted while we looked
                continue
            if isinstance(state, BaseException):
                log.error("converting task to protobuf", id=task.id, error=str(state))
                continue
            out.append(state)
        return out

    async def list_pids(self, container_id: str) -> list[ProcessInfo]:
        return await self._task(container_id).pids()

    async def wait(self, container_id: str, exec_id: str = "") -> Exit:
        process = await self._process(container_id, exec_id)
        return await process.wait()

    async def metrics(self, filter_strings: Iterable[str] = ()) -> list[Metric]:
        match = filters.parse(*filter_strings)
        ns = namespace()
        out = []
        for runtime in self._all_runtimes():
            for task in runtime.tasks(ns):
                def field(fieldpath, task=task):
                    if not fieldpath:
                        return "", False
                    if fieldpath[0] == "id":
                        return task.id, True
                    if fieldpath[0] == "namespace":
                        return task.namespace, True
                    return "", False

                if not match.match(field):
                    continue
                collected = datetime.now(timezone.utc)
                try:
                    stats = await task.stats()
                except errdefs.ContainerdError as err:
                    if not isinstance(err, errdefs.NotFound):
                        log.error("collecting metrics", id=task.id, error=str(err))
                    continue
                out.append(Metric(timestamp=collected, id=task.id, data=stats))
        return out

    # ------------------------------------------------------------------------ control

    async def kill(self, container_id: str, signal: int, exec_id: str = "", all: bool = False) -> None:
        process = await self._process(container_id, exec_id)
        await process.kill(signal, all)

    async def exec(self, container_id: str, exec_id: str, spec: Optional[ProtoAny] = None,
                   io: IO | None = None) -> None:
        if not exec_id:
            raise _StatusError("exec id cannot be empty")
        task = self._task(container_id)
        await task.exec(exec_id, ExecOpts(spec=spec, io=io or IO()))

    async def resize_pty(self, container_id: str, width: int, height: int, exec_id: str = "") -> None:
        process = await self._process(container_id, exec_id)
        await process.resize_pty(width, height)

    async def close_io(self, container_id: str, exec_id: str = "", stdin: bool = True) -> None:
        process = await self._process(container_id, exec_id)
        if stdin:
            await process.close_io()

    async def pause(self, container_id: str) -> None:
        await self._task(container_id).pause()

    async def resume(self, container_id: str) -> None:
        await self._task(container_id).resume()

    async def update(self, container_id: str, resources: Optional[ProtoAny] = None,
                     annotations: Optional[dict[str, str]] = None) -> None:
        await self._task(container_id).update(resources, annotations)

    async def checkpoint(self, container_id: str, options: Optional[ProtoAny] = None) -> list:
        """Checkpoint to the image path the runc options name; writing a checkpoint image into
        the content store is not supported yet."""
        container = self._container(container_id)
        task = self._task_of(container)
        path = ""
        if options is not None and options.type_url and check_runtime(container.runtime_name, "io.containerd.runc"):
            from pycontainerd.api.gen.containerd.runc.v1 import CheckpointOptions

            if not options.type_url.endswith("containerd.runc.v1.CheckpointOptions"):
                raise errdefs.InvalidArgument(f"invalid task checkpoint option for {container.runtime_name}")
            path = CheckpointOptions().parse(options.value).image_path
        if not path:
            raise errdefs.Unimplemented("checkpoint into the content store is not supported; set an image path")
        await task.checkpoint(path, options)
        return []
