"""The `io.containerd.runtime.v1.linux` runtime: one v1 shim per task, started and tracked by the
daemon (containerd's runtime/v1/linux/runtime.go).

  * Create: bundle (`<state>/<ns>/<id>`, work dir `<root>/<ns>/<id>`) -> start the configured shim
    (shim_client.start_shim) -> Shim.Create with the runc binary (`runtime`, or the container's
    RuncOptions.runtime) -> list the task, publish /tasks/create. A failed Create kills the shim
    and removes the bundle.
  * Delete: Shim.Delete (NotFound tolerated), unlist, SIGKILL the shim, remove the bundle, publish
    /tasks/delete.
  * A shim that exits (ours: its process; reconnected ones: their connection) while its task is
    listed is dead: `runc delete --force` the container, unmount its rootfs, publish /tasks/exit
    (status 137) and /tasks/delete, remove the bundle.
  * Daemon start: every bundle's shim is reconnected from the bundle's `address`; shims that do
    not answer are cleaned up as dead ones; work dirs without a bundle are removed.
  * Daemon shutdown disconnects and leaves shims and tasks running.

The runc binary and root for cleanups come from the container's runtime options
(containerd.linux.runc.RuncOptions; containerd.runc.v1.Options is accepted too), else from the
plugin's `runtime` and `runtime_root`, else runc and the default root of the shim that ran the
task: ours (containerd-shim-pyrunc-v1) uses /run/pycontainerd/runc (launch.RUNC_ROOT), containerd's
Go containerd-shim (or any other) its own /run/containerd/runc. Shim sockets are created here,
under our /run/pycontainerd/s (launch.SOCKET_ROOT), for either shim.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import structlog
from betterproto.lib.google.protobuf import Empty

from pycontainerd.api.gen.containerd import types as pbtypes
from pycontainerd.api.gen.containerd.events import TaskCreate, TaskDelete, TaskExit, TaskIo
from pycontainerd.api.gen.containerd.linux.runc import CreateOptions, RuncOptions
from pycontainerd.api.gen.containerd.runc import v1 as runcopts
from pycontainerd.api.gen.containerd.runtime.linux.shim import v1 as shimapi
from pycontainerd.core import errdefs, identifiers
from pycontainerd.core import mount as mountlib
from pycontainerd.plugins.runtime.v2.runc import cgroups, launch

from .. import CreateOpts, Exit
from .bundle import INIT_PID_FILE, SHIM_PID_FILE, Bundle, load_bundle, new_bundle
from .shim.main import NAME as PY_SHIM_NAME
from .shim_client import Shim, alive, connect_shim, start_shim
from .task import LinuxTask

log = structlog.get_logger(__name__)

PLUGIN_ID = "io.containerd.runtime.v1.linux"
DEFAULT_RUNC_ROOT = launch.RUNC_ROOT  # our shim's default runc root
GO_SHIM_RUNC_ROOT = "/run/containerd/runc"  # containerd's Go containerd-shim's own default (not ours)
SIGKILL_STATUS = 128 + signal.SIGKILL
TASK_CREATE = "/tasks/create"
TASK_EXIT = "/tasks/exit"
TASK_DELETE = "/tasks/delete"
CLEANUP_TIMEOUT = 60.0

_RUNC_OPTIONS_URL = "containerd.linux.runc.RuncOptions"
_CREATE_OPTIONS_URL = "containerd.linux.runc.CreateOptions"
_V2_OPTIONS_URL = "containerd.runc.v1.Options"


def _url(any_: Any) -> str:
    return (getattr(any_, "type_url", "") or "").rsplit("/", 1)[-1]


def runc_options(any_: Any) -> RuncOptions:
    """The container's runtime options as RuncOptions (empty when it has none)."""
    url = _url(any_)
    if not url:
        return RuncOptions()
    value = bytes(getattr(any_, "value", b"") or b"")
    if url == _RUNC_OPTIONS_URL:
        return RuncOptions().parse(value)
    if url == _V2_OPTIONS_URL:
        o = runcopts.Options().parse(value)
        return RuncOptions(runtime=o.binary_name, runtime_root=o.root, criu_path=o.criu_path,
                           systemd_cgroup=o.systemd_cgroup)
    raise errdefs.Unknown("invalid runtime options format")


def shim_cgroup(any_: Any) -> str:
    """The `shim_cgroup` of a Create request's task options."""
    url = _url(any_)
    if not url:
        return ""
    if url == _CREATE_OPTIONS_URL:
        return CreateOptions().parse(bytes(any_.value)).shim_cgroup
    if url == _V2_OPTIONS_URL:
        return runcopts.Options().parse(bytes(any_.value)).shim_cgroup
    raise errdefs.InvalidArgument(f"invalid task create options type {any_.type_url} for {PLUGIN_ID}")


def _own_dirs() -> list[str]:
    dirs = []
    for candidate in (sys.argv[0] if sys.argv else "", sys.executable):
        if candidate and os.sep in candidate:
            d = os.path.dirname(os.path.abspath(candidate))
            if d not in dirs:
                dirs.append(d)
    return dirs


def resolve_shim(name: str) -> str:
    """The shim binary `name` names: an absolute path, else found on $PATH or next to the daemon's
    own executable (the venv's bin/, where containerd-shim-pyrunc-v1 is installed)."""
    if os.path.isabs(name):
        if os.path.isfile(name) and os.access(name, os.X_OK):
            return name
        raise errdefs.Unknown(f"failed to start shim: fork/exec {name}: no such file or directory")
    found = shutil.which(name)
    if not found:
        for d in _own_dirs():
            candidate = os.path.join(d, name)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                found = candidate
                break
    if not found:
        raise errdefs.Unknown(f'failed to start shim: exec: "{name}": executable file not found in $PATH')
    return os.path.abspath(found)


class LinuxRuntime:
    """The plugin's instance (a runtime.PlatformRuntime)."""

    def __init__(self, *, root: Path, state: Path, address: str, ttrpc_address: str, events: Any,
                 config: Any, publish_binary: str,
                 container_options: Callable[[str, str], Any] | None = None, load_timeout: float = 5.0):
        self.root, self.state = Path(root), Path(state)
        self.address, self.ttrpc_address = address, ttrpc_address
        self.events = events
        self.config = config
        self.publish_binary = publish_binary
        self._container_options = container_options
        self.load_timeout = load_timeout
        self._tasks: dict[tuple[str, str], LinuxTask] = {}
        self._reserved: set[tuple[str, str]] = set()
        self._background: set[asyncio.Task] = set()
        self.closed = False
        for d in (self.root, self.state):
            d.mkdir(mode=0o711, parents=True, exist_ok=True)

    def id(self) -> str:
        return PLUGIN_ID

    def default_runc_root(self) -> str:
        """Where the configured shim keeps runc state when no root is given: ours under
        /run/pycontainerd/runc, containerd's Go shim (or any other) under /run/containerd/runc."""
        return DEFAULT_RUNC_ROOT if os.path.basename(self.config.shim or "") == PY_SHIM_NAME else GO_SHIM_RUNC_ROOT

    # ------------------------------------------------------------------------ the task list

    def get(self, namespace: str, id: str) -> LinuxTask:
        task = self._tasks.get((namespace, id))
        if task is None:
            raise errdefs.NotFound(f"task {id} does not exist")
        return task

    def tasks(self, namespace: str | None) -> list[LinuxTask]:
        return [t for (ns, _), t in self._tasks.items() if namespace is None or ns == namespace]

    def _remove(self, task: LinuxTask) -> bool:
        key = (task.namespace, task.id)
        if self._tasks.get(key) is task:
            del self._tasks[key]
            return True
        return False

    # ------------------------------------------------------------------------ create

    async def create(self, namespace: str, id: str, opts: CreateOpts) -> LinuxTask:
        try:
            identifiers.validate(id)
        except errdefs.InvalidArgument as err:
            raise errdefs.InvalidArgument(f"invalid task id: {err.message}") from None
        key = (namespace, id)
        if key in self._tasks or key in self._reserved:
            raise errdefs.AlreadyExists(f"task {id}")
        if self.closed:
            raise errdefs.Unavailable("runtime is shutting down")
        if opts.spec is None:
            raise errdefs.InvalidArgument("container spec must be set")
        ropts = runc_options(opts.runtime_options)
        cgroup = shim_cgroup(opts.task_options)
        binary = resolve_shim(self.config.shim)
        self._reserved.add(key)
        try:
            spec = bytes(getattr(opts.spec, "value", opts.spec) or b"")
            bundle = await asyncio.to_thread(new_bundle, self.state, self.root, namespace, id, spec)
            try:
                shim = await start_shim(
                    binary, bundle, daemon_address=self.address, ttrpc_address=self.ttrpc_address,
                    publish_binary=self.publish_binary, runtime_root=ropts.runtime_root or self.config.runtime_root,
                    criu=ropts.criu_path, systemd_cgroup=ropts.systemd_cgroup, debug=self.config.shim_debug,
                    cgroup=cgroup, on_exit=self._shim_exited)
            except BaseException:
                await asyncio.shield(asyncio.to_thread(_delete_bundle_quietly, bundle))
                raise
            rootfs = [pbtypes.Mount(type=m.type, source=m.source, options=list(m.options)) for m in opts.rootfs]
            request = shimapi.CreateTaskRequest(
                id=id, bundle=str(bundle.path), runtime=ropts.runtime or self.config.runtime, stdin=opts.io.stdin,
                stdout=opts.io.stdout, stderr=opts.io.stderr, terminal=opts.io.terminal,
                checkpoint=opts.checkpoint, rootfs=rootfs)
            if opts.task_options is not None and _url(opts.task_options):
                request.options = opts.task_options
            try:
                resp = await shim.api.create(request)
            except BaseException:
                await asyncio.shield(self._spawn(self._abandon(shim, bundle, ropts)))
                raise
            task = LinuxTask(bundle, shim, resp.pid, self.events, ropts)
            self._tasks[key] = task  # listed before any await: a shim exit from now on cleans up
        finally:
            self._reserved.discard(key)
        if shim.exited.done():
            self._spawn(self._shim_exited(shim))
        self.events.publish(namespace, TASK_CREATE, TaskCreate(
            container_id=id, bundle=str(bundle.path), rootfs=rootfs,
            io=TaskIo(stdin=opts.io.stdin, stdout=opts.io.stdout, stderr=opts.io.stderr, terminal=opts.io.terminal),
            checkpoint=opts.checkpoint, pid=resp.pid))
        if resp.pid > 0:
            task._cgroup = await asyncio.to_thread(cgroups.load, resp.pid)
        return task

    async def _abandon(self, shim: Shim, bundle: Bundle, ropts: RuncOptions) -> None:
        """After a failed Create: kill the shim, clear what it may have left, drop the bundle."""
        try:
            await shim.kill_shim()
        except Exception as err:
            log.error("failed to kill shim", id=bundle.id, namespace=bundle.namespace, error=str(err))
        await shim.close()
        await self._terminate(bundle, ropts)
        await asyncio.to_thread(_delete_bundle_quietly, bundle)

    # ------------------------------------------------------------------------ delete

    async def delete(self, namespace: str, id: str) -> Exit:
        task = self.get(namespace, id)
        shim_err: errdefs.ContainerdError | None = None
        resp = None
        try:
            resp = await task.shim.api.delete(Empty())
        except errdefs.ContainerdError as err:
            if not isinstance(err, errdefs.NotFound):
                raise
            shim_err = err
        await asyncio.shield(self._spawn(self._finish_delete(task)))
        if shim_err is not None:
            raise shim_err
        self.events.publish(namespace, TASK_DELETE, TaskDelete(
            container_id=id, pid=resp.pid, exit_status=resp.exit_status, exited_at=resp.exited_at))
        return Exit(pid=resp.pid, status=resp.exit_status, timestamp=resp.exited_at)

    async def _finish_delete(self, task: LinuxTask) -> None:
        self._remove(task)
        try:
            await task.shim.kill_shim()
        except Exception as err:
            log.error("failed to kill shim", id=task.id, namespace=task.namespace, error=str(err))
        await task.shim.close()
        await asyncio.to_thread(_delete_bundle_quietly, task.bundle)

    # ------------------------------------------------------------------------ dead shims

    async def _shim_exited(self, shim: Shim) -> None:
        if self.closed:
            return
        bundle = shim.bundle
        task = self._tasks.get((bundle.namespace, bundle.id))
        if task is None or task.shim is not shim or shim.cleaning:
            return  # never listed, already deleted, or being cleaned up
        shim.cleaning = True
        await self._cleanup_after_dead_shim(bundle, task.runc_options, task)

    async def _cleanup_after_dead_shim(self, bundle: Bundle, ropts: RuncOptions,
                                       task: LinuxTask | None = None) -> None:
        ns, id = bundle.namespace, bundle.id
        log.warning("cleaning up after shim dead", id=id, namespace=ns)
        pid = bundle.read_pid(INIT_PID_FILE)
        shim_pid = bundle.read_pid(SHIM_PID_FILE)
        await self._terminate(bundle, ropts)
        exited_at = datetime.now(timezone.utc)
        self._publish(ns, TASK_EXIT, TaskExit(container_id=id, id=id, pid=pid, exit_status=SIGKILL_STATUS,
                                              exited_at=exited_at))
        if task is not None:
            self._remove(task)
            await task.shim.close()
        await asyncio.to_thread(_delete_bundle_quietly, bundle)
        own = task is not None and task.shim.proc is not None and task.shim.proc.pid == shim_pid
        if shim_pid > 0 and not own and alive(shim_pid) and _looks_like_shim(shim_pid):
            try:
                os.kill(shim_pid, signal.SIGKILL)
            except OSError:
                pass
        self._publish(ns, TASK_DELETE, TaskDelete(container_id=id, pid=pid, exit_status=SIGKILL_STATUS,
                                                  exited_at=exited_at))

    async def _terminate(self, bundle: Bundle, ropts: RuncOptions) -> None:
        """`runc delete --force` the task's container and unmount its rootfs."""
        cmd = ropts.runtime or self.config.runtime or "runc"
        root = os.path.join(ropts.runtime_root or self.config.runtime_root or self.default_runc_root(),
                            bundle.namespace)
        argv = [cmd, "--root", root, "--log-format", "json"]
        if ropts.systemd_cgroup:
            argv.append("--systemd-cgroup")
        argv += ["delete", "--force", bundle.id]
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.STDOUT)
            out, _ = await asyncio.wait_for(proc.communicate(), CLEANUP_TIMEOUT)
            if proc.returncode != 0 and b"does not exist" not in out:
                log.warning("delete runtime state", id=bundle.id, output=out.decode(errors="replace").strip())
        except (OSError, asyncio.TimeoutError) as err:
            log.warning("delete runtime state", id=bundle.id, error=str(err) or type(err).__name__)
        try:
            await asyncio.to_thread(_unmount_rootfs, bundle)
        except OSError as err:
            log.warning("unmount task rootfs", id=bundle.id, path=str(bundle.path), error=str(err))

    def _publish(self, namespace: str, topic: str, event: Any) -> None:
        try:
            self.events.publish(namespace, topic, event)
        except Exception as err:  # noqa: BLE001
            log.error("publishing event", topic=topic, namespace=namespace, error=str(err))

    # ------------------------------------------------------------------------ daemon start and stop

    async def load_existing(self) -> None:
        for ns_dir in _subdirs(self.state):
            namespace = ns_dir.name
            log.debug("loading tasks in namespace", namespace=namespace)
            await asyncio.gather(*(self._load_one(namespace, d.name) for d in _subdirs(ns_dir)),
                                 return_exceptions=True)
        for ns_dir in _subdirs(self.root, hidden=True):
            for work in _subdirs(ns_dir, hidden=True):
                if (ns_dir.name, work.name) not in self._tasks and not (self.state / ns_dir.name / work.name).exists():
                    shutil.rmtree(work, ignore_errors=True)

    async def _load_one(self, namespace: str, id: str) -> None:
        bundle = load_bundle(self.state, self.root, namespace, id)
        ropts = RuncOptions()
        if self._container_options is not None:
            try:
                ropts = runc_options(self._container_options(namespace, id))
            except Exception as err:  # noqa: BLE001 - a container gone or odd options: defaults
                log.debug("loading container runtime options", id=id, namespace=namespace, error=str(err))
        pid = bundle.read_pid(INIT_PID_FILE)
        try:
            shim = await connect_shim(bundle, timeout=self.load_timeout, debug=self.config.shim_debug,
                                      on_exit=self._shim_exited)
        except Exception as err:  # noqa: BLE001
            log.error("connecting to shim", id=id, namespace=namespace, error=str(err) or type(err).__name__)
            await self._cleanup_after_dead_shim(bundle, ropts)
            return
        task = LinuxTask(bundle, shim, pid, self.events, ropts)
        self._tasks[(namespace, id)] = task
        if shim.exited.done():
            self._spawn(self._shim_exited(shim))
        if pid > 0:
            task._cgroup = await asyncio.to_thread(cgroups.load, pid)

    async def close(self) -> None:
        """Daemon shutdown: disconnect from every shim, leaving shims and tasks running."""
        self.closed = True
        await asyncio.gather(*(t.shim.close() for t in self._tasks.values()), return_exceptions=True)
        if self._background:
            await asyncio.wait(list(self._background), timeout=CLEANUP_TIMEOUT)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task


def _looks_like_shim(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"containerd-shim" in f.read()
    except OSError:
        return False


def _unmount_rootfs(bundle: Bundle) -> None:
    if mountlib.mounts_under(str(bundle.rootfs)):
        mountlib.unmount_all(str(bundle.rootfs))


def _delete_bundle_quietly(bundle: Bundle) -> None:
    try:
        bundle.delete()
    except Exception as err:  # noqa: BLE001
        log.error("failed to delete bundle", id=bundle.id, namespace=bundle.namespace, error=str(err))


def _subdirs(path: Path, hidden: bool = False) -> list[Path]:
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return []
    return [Path(e.path) for e in entries
            if e.is_dir(follow_symlinks=False) and (hidden or not e.name.startswith("."))]


__all__ = ["LinuxRuntime", "PLUGIN_ID", "resolve_shim", "runc_options"]
