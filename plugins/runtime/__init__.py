"""Runtimes: what the tasks service drives to run containers, and the contract every runtime keeps.

Owns the plain types a runtime takes and returns (CreateOpts, IO, ExecOpts, State, Exit,
ProcessInfo) and the shape of a runtime (`PlatformRuntime`), its tasks (`Task`) and their exec
processes (`Process`) — containerd's runtime/runtime.go and runtime/task.go. The runtimes
themselves live in subpackages: `v2` (io.containerd.runtime.v2.task, which starts shim binaries;
its `runc` subpackage is the Python shim's own code) and `v1` (the legacy shim runtime).

Each runtime subpackage (v1, v2) that has a `pycontainerd_register` function gets it called from
this package's hook: plugins/__init__.py only discovers top-level subpackages.

Statuses are the generated `containerd.v1.types.Status` enum (CREATED, RUNNING, STOPPED, PAUSED,
PAUSING, UNKNOWN), timestamps are aware datetimes (a process still running has ExitedAt at Go's
zero time, year 1, as shims report it), mounts and Anys are the generated protobuf messages.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from pycontainerd.api.gen.containerd.types import Mount
from pycontainerd.api.gen.containerd.v1.types import Status
from pycontainerd.core.plugin import hookimpl

__all__ = ["CreateOpts", "ExecOpts", "Exit", "IO", "PlatformRuntime", "Process", "ProcessInfo", "State",
           "Status", "Task"]


@dataclass
class IO:
    """Where a process's stdio goes: paths (usually fifos) the client made, or URIs."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


@dataclass
class CreateOpts:
    """Everything a runtime needs to create a task (containerd's runtime.CreateOpts)."""

    spec: Any = None                       # google.protobuf.Any holding the OCI spec JSON
    rootfs: list[Mount] = field(default_factory=list)
    io: IO = field(default_factory=IO)
    checkpoint: str = ""                   # a checkpoint directory to restore from
    runtime: str = ""                      # runtime name or absolute path of the shim binary
    runtime_options: Any = None            # the container's runtime options (Any)
    task_options: Any = None               # the Create request's options (Any), preferred when set


@dataclass
class ExecOpts:
    spec: Any = None                       # google.protobuf.Any holding the OCI process JSON
    io: IO = field(default_factory=IO)


@dataclass
class State:
    pid: int = 0
    status: Status = Status.UNKNOWN
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    exit_status: int = 0
    exited_at: datetime | None = None


@dataclass
class Exit:
    pid: int = 0
    status: int = 0
    timestamp: datetime | None = None


@dataclass
class ProcessInfo:
    pid: int
    info: Any = None                       # google.protobuf.Any, runtime specific


class Process(Protocol):
    """A process in a task: the init process (the task itself) or an exec'd one."""

    @property
    def id(self) -> str: ...
    async def state(self) -> State: ...
    async def kill(self, signal: int, all: bool = False) -> None: ...
    async def resize_pty(self, width: int, height: int) -> None: ...
    async def close_io(self) -> None: ...
    async def start(self) -> None: ...
    async def wait(self) -> Exit: ...
    async def delete(self) -> Exit: ...


class Task(Process, Protocol):
    """A container's running task, as a runtime hands it to the tasks service."""

    @property
    def namespace(self) -> str: ...
    async def pid(self) -> int: ...
    async def pause(self) -> None: ...
    async def resume(self) -> None: ...
    async def exec(self, exec_id: str, opts: ExecOpts) -> Process: ...
    async def pids(self) -> list[ProcessInfo]: ...
    async def checkpoint(self, path: str, options: Any = None) -> None: ...
    async def update(self, resources: Any = None, annotations: dict[str, str] | None = None) -> None: ...
    async def process(self, exec_id: str) -> Process: ...
    async def stats(self) -> Any: ...


class PlatformRuntime(Protocol):
    """A runtime plugin's instance. Every call names the namespace it works in."""

    def id(self) -> str: ...
    async def create(self, namespace: str, id: str, opts: CreateOpts) -> Task: ...
    def get(self, namespace: str, id: str) -> Task: ...          # errdefs.NotFound when absent
    def tasks(self, namespace: str | None) -> list[Task]: ...    # None: every namespace
    async def delete(self, namespace: str, id: str) -> Exit: ...


@hookimpl
def pycontainerd_register(registry):
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.ispkg or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "pycontainerd_register", None)
        if register is not None:
            register(registry)
