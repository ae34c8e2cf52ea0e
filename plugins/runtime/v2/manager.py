"""The v2 task manager: starts a shim per task, keeps the connected shims by namespace and id,
deletes them, reconnects to them when the daemon starts, and cleans up after shims that died.

containerd 1.6's runtime/v2 ShimManager + TaskManager in one class, with the same behaviour:

  * Create: new bundle -> shim `start` -> ttrpc connect -> Task.Create. A failed Create deletes the
    task in the shim, shuts the shim down and removes the bundle ("failed to create shim task: ...").
    Unlike containerd, a shim that prints its address before listening gets a short grace period.
  * Delete: Task.Delete, then Shutdown (io.containerd.timeout.shim.shutdown), close, remove the
    bundle. When the shim is already gone (or says NotFound) the task stays listed until the
    dead-shim cleanup has run, so /tasks/exit and /tasks/delete are published for it.
  * A shim whose connection drops while its task is listed is "dead": its `delete` action runs
    (io.containerd.timeout.shim.cleanup), the bundle goes, and the daemon publishes /tasks/exit
    (status 255 when the action failed) and /tasks/delete. Every other task event comes from the
    shim itself, forwarded to the daemon's ttrpc Events service; the manager publishes nothing else.
  * Load (daemon start): every `<state>/<ns>/<id>` bundle's shim is reconnected from its `address`
    file and checked with Connect (io.containerd.timeout.shim.load). The runtime binary comes from
    `shim-binary-path`, else from the container's runtime name. Unreachable shims are cleaned up as
    above, and — unlike containerd, which stays silent — /tasks/exit and /tasks/delete are
    published for them, so in-process subscribers learn the task stopped. Work dirs under
    `<root>/<ns>` with no live task, and bundles a crash left half-deleted, are removed.
  * Daemon shutdown closes the connections and leaves every shim and task running.

The manager never mounts: the shim mounts the Create request's rootfs mounts on the bundle's
rootfs/ and unmounts them on delete; bundle removal unmounts whatever a dead shim left behind.
"""
from __future__ import annotations

import asyncio
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import structlog

from pycontainerd.api.gen.containerd.events import TaskDelete, TaskExit
from pycontainerd.core import errdefs
from pycontainerd.core.ttrpc import TtrpcClient

from .. import CreateOpts, Exit
from .binary import RuntimeResolver, ShimBinary, ShimLog, publish_binary, socket_path
from .bundle import ADDRESS_FILE, LOG_FIFO, SHIM_BINARY_PATH_FILE, Bundle, load_bundle, new_bundle, unmount_all
from .runc import launch as pyrunc_launch
from .shim import ShimTask, wrap

log = structlog.get_logger(__name__)

PLUGIN_ID = "io.containerd.runtime.v2.task"
TASK_EXIT_TOPIC = "/tasks/exit"
TASK_DELETE_TOPIC = "/tasks/delete"

LOAD_TIMEOUT = "io.containerd.timeout.shim.load"
CLEANUP_TIMEOUT = "io.containerd.timeout.shim.cleanup"
SHUTDOWN_TIMEOUT = "io.containerd.timeout.shim.shutdown"
DEFAULT_TIMEOUTS = {LOAD_TIMEOUT: 5.0, CLEANUP_TIMEOUT: 5.0, SHUTDOWN_TIMEOUT: 3.0}

CONNECT_TIMEOUT = 100.0  # containerd dials a new shim with a 100s timeout
START_TIMEOUT = 120.0    # a shim's `start` action should take milliseconds; never wait forever
NEW_SHIM_GRACE = 2.0     # how long a new shim's socket may take to appear after `start` printed it


class TaskManager:
    """The `io.containerd.runtime.v2.task` plugin's instance (a runtime.PlatformRuntime)."""

    def __init__(self, *, root: Path, state: Path, address: str, ttrpc_address: str, events: Any,
                 timeout: Callable[[str], float] | None = None,
                 container_runtime: Callable[[str, str], str | None] | None = None,
                 sched_core: bool = False, runtime_paths: dict[str, str] | None = None,
                 debug: bool = False, publish_binary_path: str | None = None):
        self.root, self.state = Path(root), Path(state)
        self.address, self.ttrpc_address = address, ttrpc_address
        self.events = events
        self._timeout = timeout or (lambda key: DEFAULT_TIMEOUTS.get(key, 1.0))
        self._container_runtime = container_runtime
        self.sched_core, self.debug = sched_core, debug
        self.resolver = RuntimeResolver(runtime_paths)
        self.publish_binary = publish_binary_path or publish_binary()
        self._tasks: dict[tuple[str, str], ShimTask] = {}
        self._reserved: set[tuple[str, str]] = set()
        self._background: set[asyncio.Task] = set()
        self.closed = False
        for d in (self.root, self.state):
            d.mkdir(mode=0o711, parents=True, exist_ok=True)

    def id(self) -> str:
        return PLUGIN_ID

    def timeout(self, key: str) -> float:
        return self._timeout(key)

    # ------------------------------------------------------------------------ the task list

    def get(self, namespace: str, id: str) -> ShimTask:
        shim = self._tasks.get((namespace, id))
        if shim is None:
            raise errdefs.NotFound(f"task {id} does not exist")
        return shim

    def tasks(self, namespace: str | None) -> list[ShimTask]:
        return [t for (ns, _), t in self._tasks.items() if namespace is None or ns == namespace]

    def _remove(self, shim: ShimTask) -> None:
        key = (shim.namespace, shim.id)
        if self._tasks.get(key) is shim:
            del self._tasks[key]

    def _binary(self, bundle: Bundle, runtime_path: str) -> ShimBinary:
        return ShimBinary(bundle, runtime_path, address=self.address, ttrpc_address=self.ttrpc_address,
                          publish_binary=self.publish_binary, sched_core=self.sched_core, debug=self.debug)

    # ------------------------------------------------------------------------ create

    async def create(self, namespace: str, id: str, opts: CreateOpts) -> ShimTask:
        """Start a shim for task `id` and create the task in it."""
        key = (namespace, id)
        if key in self._tasks or key in self._reserved:
            raise errdefs.AlreadyExists(f"task {id}")
        if self.closed:
            raise errdefs.Unavailable("runtime is shutting down")
        self._reserved.add(key)
        try:
            try:
                shim = await self._start(namespace, id, opts)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                raise wrap(err, "failed to start shim") from None
            self._tasks[key] = shim
            try:
                await shim.create(opts)
            except BaseException as err:
                self._remove(shim)
                cleanup = self._spawn(self._abandon(shim))
                if isinstance(err, asyncio.CancelledError):
                    raise
                await asyncio.shield(cleanup)
                raise wrap(err, "failed to create shim task") from None
            return shim
        finally:
            self._reserved.discard(key)

    async def _start(self, namespace: str, id: str, opts: CreateOpts) -> ShimTask:
        if opts.spec is None:
            raise errdefs.InvalidArgument("container spec must be set")
        spec = bytes(getattr(opts.spec, "value", opts.spec) or b"")
        bundle = await asyncio.to_thread(new_bundle, self.root, self.state, namespace, id, spec)
        shim_log: ShimLog | None = None
        try:
            try:
                runtime_path = self.resolver.resolve(opts.runtime)
            except errdefs.ContainerdError as err:
                raise wrap(err, "failed to resolve runtime path") from None
            binary = self._binary(bundle, runtime_path)
            shim_log = ShimLog(bundle.path / LOG_FIFO)
            topts = opts.task_options if opts.task_options is not None else opts.runtime_options
            try:
                address = await binary.start(topts, timeout=START_TIMEOUT)
            except asyncio.TimeoutError:
                raise errdefs.DeadlineExceeded("start failed: shim start action timed out") from None
            except errdefs.ContainerdError as err:
                raise wrap(err, "start failed") from None
            try:
                client = await _connect_new_shim(address, namespace)
            except BaseException:
                await self._cleanup_dead(bundle, binary, publish=False)
                raise
            return ShimTask(bundle, binary, client, shim_log, on_close=self._shim_disconnected)
        except BaseException:
            if shim_log is not None:
                shim_log.close()
            await asyncio.shield(asyncio.to_thread(_delete_bundle_quietly, bundle))
            raise

    async def _abandon(self, shim: ShimTask) -> None:
        """After a failed Create: delete whatever the shim made, shut it down, drop the bundle."""
        try:
            async with asyncio.timeout(self.timeout(CLEANUP_TIMEOUT)):
                try:
                    await shim.task.delete(_delete_request(shim.id))
                except errdefs.ContainerdError:
                    pass
                await shim.shutdown()
        except Exception as err:
            log.warning("shutting down shim after failed create", id=shim.id, namespace=shim.namespace,
                        error=str(err))
        await shim.close()
        await asyncio.to_thread(_delete_bundle_quietly, shim.bundle)
        await _remove_stale_socket(_read_address(shim.bundle))

    # ------------------------------------------------------------------------ delete

    async def delete(self, namespace: str, id: str) -> Exit:
        """Delete the task in its shim, shut the shim down, remove the bundle; the task's exit."""
        shim = self.get(namespace, id)
        resp = None
        shim_err: errdefs.ContainerdError | None = None
        try:
            resp = await shim.task.delete(_delete_request(id))
        except errdefs.ContainerdError as err:
            if not (shim.disconnected(err) or isinstance(err, errdefs.NotFound)):
                raise wrap(err, "failed to delete task") from None
            shim_err = err
        if shim_err is None:
            self._remove(shim)
        await asyncio.shield(self._spawn(self._finish_delete(shim, shim_err is not None)))
        if shim_err is not None:
            raise wrap(shim_err, "failed to delete task") from None
        return Exit(pid=resp.pid, status=resp.exit_status, timestamp=resp.exited_at)

    async def _finish_delete(self, shim: ShimTask, dead: bool) -> None:
        try:
            await shim.shutdown(timeout=self.timeout(SHUTDOWN_TIMEOUT))
        except Exception as err:
            log.error("failed to shutdown shim task", id=shim.id, namespace=shim.namespace, error=str(err))
        await shim.close()
        if dead:
            await self._cleanup_shim(shim)
        else:
            try:
                await asyncio.to_thread(shim.bundle.delete)
            except Exception as err:
                log.error("failed to delete bundle", id=shim.id, namespace=shim.namespace, error=str(err))
        self._remove(shim)

    # ------------------------------------------------------------------------ dead shims

    async def _shim_disconnected(self, shim: ShimTask) -> None:
        if self.closed:
            return
        await self._cleanup_shim(shim)

    async def _cleanup_shim(self, shim: ShimTask) -> None:
        """cleanupAfterDeadShim for a shim we were connected to; runs once per shim."""
        async with shim.cleanup_lock:
            if shim.cleaned:
                return
            shim.cleaned = True
            listed = self._tasks.get((shim.namespace, shim.id)) is shim
            await self._cleanup_dead(shim.bundle, shim.binary, publish=listed)
            self._remove(shim)

    async def _cleanup_dead(self, bundle: Bundle, binary: ShimBinary, publish: bool) -> None:
        log.warning("cleaning up after shim disconnected", id=bundle.id, namespace=bundle.namespace)
        address = _read_address(bundle)
        exit: Exit | None = None
        try:
            exit = await binary.delete(timeout=self.timeout(CLEANUP_TIMEOUT))
        except Exception as err:
            log.warning("failed to clean up after shim disconnected", id=bundle.id, namespace=bundle.namespace,
                        error=str(err) or type(err).__name__)
            await asyncio.to_thread(_delete_bundle_quietly, bundle)
        await _remove_stale_socket(address)
        if not publish:
            return
        if exit is None:
            exit = Exit(pid=0, status=255, timestamp=datetime.now(timezone.utc))
        exited_at = exit.timestamp or datetime.now(timezone.utc)
        try:
            self.events.publish(bundle.namespace, TASK_EXIT_TOPIC, TaskExit(
                container_id=bundle.id, id=bundle.id, pid=exit.pid, exit_status=exit.status, exited_at=exited_at))
            self.events.publish(bundle.namespace, TASK_DELETE_TOPIC, TaskDelete(
                container_id=bundle.id, pid=exit.pid, exit_status=exit.status, exited_at=exited_at))
        except Exception as err:
            log.error("publishing exit of dead shim's task", id=bundle.id, namespace=bundle.namespace, error=str(err))

    # ------------------------------------------------------------------------ daemon start and stop

    async def load_existing(self) -> None:
        """Reconnect to the shims of every bundle on disk; clean up the dead ones."""
        for ns_dir in _subdirs(self.state):
            namespace = ns_dir.name
            log.debug("loading tasks in namespace", namespace=namespace)
            ids = [d.name for d in _subdirs(ns_dir)]
            results = await asyncio.gather(*(self._load_one(namespace, id) for id in ids), return_exceptions=True)
            for id, result in zip(ids, results):
                if isinstance(result, BaseException):
                    log.error("loading task", id=id, namespace=namespace, error=str(result) or type(result).__name__)
            await asyncio.to_thread(self._cleanup_leftovers, namespace)

    async def _load_one(self, namespace: str, id: str) -> None:
        bundle = load_bundle(self.state, namespace, id)
        try:
            entries = os.listdir(bundle.path)
        except OSError as err:
            log.error("fast path read bundle path", path=str(bundle.path), error=str(err))
            await asyncio.to_thread(_delete_bundle_quietly, bundle)
            return
        if not entries:
            await asyncio.to_thread(_delete_bundle_quietly, bundle)
            return
        runtime = ""
        try:
            runtime = (bundle.path / SHIM_BINARY_PATH_FILE).read_text()
        except FileNotFoundError:
            pass
        except OSError as err:
            log.error("failed to read `runtime` path from bundle", path=str(bundle.path), error=str(err))
        if not runtime and self._container_runtime is not None:
            try:
                runtime = self._container_runtime(namespace, id) or ""
            except Exception as err:
                log.error("loading container", id=id, namespace=namespace, error=str(err))
        if not runtime:
            log.error("no runtime known for bundle; removing it", id=id, namespace=namespace)
            await asyncio.to_thread(_delete_bundle_quietly, bundle)
            return
        try:
            runtime_path = self.resolver.resolve(runtime)
        except errdefs.ContainerdError as err:
            log.error("failed to resolve runtime path", id=id, namespace=namespace, error=str(err))
            await asyncio.to_thread(_delete_bundle_quietly, bundle)
            return
        binary = self._binary(bundle, runtime_path)
        try:
            shim = await self._load_shim(bundle, binary)
        except Exception as err:
            log.warning("unable to load shim", id=id, namespace=namespace, error=str(err) or type(err).__name__)
            await self._cleanup_dead(bundle, binary, publish=True)
            return
        self._tasks[(namespace, id)] = shim

    async def _load_shim(self, bundle: Bundle, binary: ShimBinary) -> ShimTask:
        address = (bundle.path / ADDRESS_FILE).read_text().strip()
        if not address:
            raise errdefs.NotFound("no shim address")
        load_timeout = self.timeout(LOAD_TIMEOUT)
        client = await TtrpcClient.connect(address, timeout=load_timeout, namespace=bundle.namespace)
        shim_log = None
        try:
            shim_log = ShimLog(bundle.path / LOG_FIFO)
            shim = ShimTask(bundle, binary, client, shim_log, on_close=self._shim_disconnected)
        except BaseException:
            if shim_log is not None:
                shim_log.close()
            await client.close()
            raise
        try:
            await shim.pid(timeout=load_timeout)
        except BaseException:
            await shim.close()
            raise
        return shim

    def _cleanup_leftovers(self, namespace: str) -> None:
        """Work dirs with no live task (a reboot emptied the state dir, say) and bundles a crash
        left half-deleted (renamed to a hidden name by the atomic delete)."""
        for d in _subdirs(self.root / namespace, hidden=True):
            if (namespace, d.name) not in self._tasks:
                shutil.rmtree(d, ignore_errors=True)
        for d in _subdirs(self.state / namespace, hidden=True):
            if d.name.startswith("."):
                try:
                    unmount_all(d / "rootfs")
                except OSError as err:
                    log.error("unmounting a half-deleted bundle", path=str(d), error=str(err))
                    continue
                shutil.rmtree(d, ignore_errors=True)

    async def close(self) -> None:
        """Daemon shutdown: disconnect from every shim, leaving shims and tasks running. The
        pyrunc zygote that forked our shims goes: a restarted daemon makes a new one."""
        self.closed = True
        shims = list(self._tasks.values())
        await asyncio.gather(*(s.close() for s in shims), return_exceptions=True)
        if self._background:
            await asyncio.wait(list(self._background), timeout=self.timeout(CLEANUP_TIMEOUT) + 1)
        if await asyncio.to_thread(pyrunc_launch.stop_zygote, self.address, os.environ):
            log.info("pyrunc zygote told to exit", address=self.address)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task


async def _connect_new_shim(address: str, namespace: str) -> TtrpcClient:
    """Connect to a shim that just printed its address. Go shims listen before they print it;
    a shim that prints first gets NEW_SHIM_GRACE seconds to start listening (containerd would
    fail at once and leave that shim running)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + NEW_SHIM_GRACE
    delay = 0.005
    while True:
        try:
            return await TtrpcClient.connect(address, timeout=CONNECT_TIMEOUT, namespace=namespace)
        except errdefs.Unavailable:
            if loop.time() >= deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)


def _delete_request(id: str):
    from pycontainerd.api.gen.containerd.task.v2 import DeleteRequest

    return DeleteRequest(id=id)


def _subdirs(path: Path, hidden: bool = False) -> list[Path]:
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return []
    return [Path(e.path) for e in entries
            if e.is_dir(follow_symlinks=False) and (hidden or not e.name.startswith("."))]


def _delete_bundle_quietly(bundle: Bundle) -> None:
    try:
        bundle.delete()
    except Exception as err:
        log.error("failed to delete bundle", id=bundle.id, namespace=bundle.namespace, error=str(err))


def _read_address(bundle: Bundle) -> str:
    try:
        return (bundle.path / ADDRESS_FILE).read_text().strip()
    except OSError:
        return ""


async def _remove_stale_socket(address: str) -> None:
    """Remove a dead shim's socket file: one nobody listens on (connection refused). A live one
    (a shim shared by a group) is kept, and so is one whose answer is merely slow or whose
    backlog is full: a busy shim's socket must never go from under it."""
    path = socket_path(address) if address else None
    if not path or not os.path.exists(path):
        return
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), 5.0)
    except ConnectionRefusedError:
        try:
            os.unlink(path)
        except OSError:
            pass
        return
    except (OSError, asyncio.TimeoutError):
        return
    writer.close()


__all__ = ["PLUGIN_ID", "TaskManager"]
