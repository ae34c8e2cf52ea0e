"""A container's init process and its exec'd processes, with containerd's state machines
(pkg/process: init.go, init_state.go, exec.go, exec_state.go, deleted_state.go).

Init states: created, created-checkpoint (restored at start), running, paused, stopped, deleted.
Exec states: created, running, stopped, deleted. Each process has one asyncio lock held across a
transition (Go's p.mu); `set_exited` is synchronous and runs under that lock. Errors keep
containerd's wording, and their errdefs class decides the status code: a plain message is
Unknown, "cannot delete a deleted process" is NotFound, and so on.
"""
from __future__ import annotations

import asyncio
import json
import os
from datetime import datetime, timezone
from typing import Any

import structlog

from pycontainerd.core import errdefs
from pycontainerd.core import mount as mountlib

from .reaper import Reaper
from .runc import IOFds, Runc, RuncError, read_pid_file
from .stdio import Console, ConsoleSocket, ProcessIO, Stdio, StdioError, create_io, open_stdin_writer

log = structlog.get_logger("pyrunc.process")

INIT_PID_FILE = "init.pid"
IO_WAIT_TIMEOUT = 2.0
ZERO_TIME = datetime(1, 1, 1, tzinfo=timezone.utc)


def check_kill_error(err: Exception) -> errdefs.ContainerdError:
    """containerd's checkKillError."""
    text = str(err)
    lower = text.lower()
    if ("os: process already finished" in text or "container not running" in text
            or "no such process" in lower or getattr(err, "errno", None) == 3):
        return errdefs.NotFound("process already finished")
    if "does not exist" in text:
        return errdefs.NotFound("no such container")
    return errdefs.Unknown(f"unknown error after kill: {text}")


class _Process:
    """What init and exec processes share: identity, stdio, exit, console."""

    kind = "process"

    def __init__(self, id: str, stdio: Stdio) -> None:
        self.id = id
        self.stdio = stdio
        self.pid = 0
        self.status = 0
        self.exited_at: datetime | None = None
        self.exited = asyncio.Event()
        self.lock = asyncio.Lock()
        self.console: Console | None = None
        self.io: ProcessIO | None = None
        self.stdin_writer: int | None = None

    @property
    def exited_at_or_zero(self) -> datetime:
        return self.exited_at or ZERO_TIME

    def close_stdin(self) -> None:
        fd, self.stdin_writer = self.stdin_writer, None
        if fd is not None:
            os.close(fd)

    async def wait(self) -> None:
        await self.exited.wait()

    def _exit(self, status: int, when: float | None) -> None:
        self.status = status
        self.exited_at = datetime.fromtimestamp(when, timezone.utc) if when else datetime.now(timezone.utc)
        if self.console is not None:
            self.console.shutdown()
        self.exited.set()

    async def _wait_io(self) -> None:
        if self.console is not None:
            try:
                await asyncio.wait_for(self.console.done.wait(), IO_WAIT_TIMEOUT)
            except asyncio.TimeoutError:
                pass

    async def _close_io(self) -> None:
        self.close_stdin()
        if self.io is not None:
            self.io.close_stdin()
        if self.console is not None:
            await self.console.close()
        if self.io is not None:
            await self.io.close()

    async def _setup_io(self, reaper: Reaper, runc_id: str, namespace: str) -> tuple[IOFds, ConsoleSocket | None]:
        """Console socket (terminal) or the process's fds; the stdin writer either way."""
        socket = None
        try:
            if self.stdio.terminal:
                socket = ConsoleSocket()
                fds = IOFds()
            else:
                try:
                    self.io = await create_io(reaper, self.id, namespace, self.stdio)
                except (OSError, StdioError) as err:
                    raise errdefs.Unknown(f"failed to create {self.kind} process I/O: {err}") from None
                fds = self.io.fds
            return fds, socket
        except BaseException:
            if socket is not None:
                socket.close()
            raise

    async def _after_runc(self, reaper: Reaper, namespace: str, socket: ConsoleSocket | None) -> None:
        """After runc created the process: take over the stdin writer (from now on CloseIO closes
        it; before, like the Go shim, CloseIO had nothing to close), start copying the console."""
        if self.io is not None:
            self.io.close_after_start()
            if self.io.stdin_writer is not None:
                self.stdin_writer, self.io.stdin_writer = self.io.stdin_writer, None
        if socket is not None:
            try:
                master = await socket.receive_master()
            except (OSError, StdioError) as err:
                raise errdefs.Unknown(f"failed to retrieve console master: {err}") from None
            self.console = Console(master)
            try:
                await self.console.start_copy(reaper, self.id, namespace, self.stdio.stdin, self.stdio.stdout)
            except (OSError, StdioError) as err:
                raise errdefs.Unknown(f"failed to start console copy: {err}") from None
            if self.stdio.stdin and self.stdin_writer is None:
                try:
                    self.stdin_writer = open_stdin_writer(self.stdio.stdin)
                except StdioError as err:
                    raise errdefs.Unknown(str(err)) from None

    def resize(self, width: int, height: int) -> None:
        if self.console is not None:
            self.console.resize(width, height)


# --------------------------------------------------------------------------------------------
# Init


class Init(_Process):
    kind = "init"

    def __init__(self, id: str, runc: Runc, stdio: Stdio, *, bundle: str, rootfs: str, namespace: str,
                 reaper: Reaper, no_pivot: bool = False, no_new_keyring: bool = False,
                 criu_work_path: str = "") -> None:
        super().__init__(id, stdio)
        self.runc = runc
        self.bundle = bundle
        self.rootfs = rootfs
        self.namespace = namespace
        self.reaper = reaper
        self.no_pivot = no_pivot
        self.no_new_keyring = no_new_keyring
        self.work_dir = os.path.join(bundle, "work")
        self.criu_work_path = criu_work_path or self.work_dir
        self.state = "created"
        self.pausing = False
        self._restore: dict[str, Any] | None = None

    @property
    def pid_file(self) -> str:
        return os.path.join(self.bundle, INIT_PID_FILE)

    def _runtime_error(self, err: Exception, message: str) -> errdefs.ContainerdError:
        return errdefs.Unknown(self.runc.runtime_error(err, message))

    async def create(self, checkpoint: str = "", parent_checkpoint: str = "") -> None:
        """Create the container with runc (or prepare a restore); sets `pid`."""
        fds, socket = await self._setup_io(self.reaper, self.id, self.namespace)
        try:
            if checkpoint:
                self._restore = {"image_path": checkpoint, "parent_path": parent_checkpoint, "fds": fds}
                self.state = "created-checkpoint"
                if socket is not None:
                    socket.close()
                    socket = None
                return
            try:
                await self.runc.create(self.id, self.bundle, fds, pid_file=self.pid_file,
                                       console_socket=socket.path if socket else "", no_pivot=self.no_pivot,
                                       no_new_keyring=self.no_new_keyring)
            except RuncError as err:
                raise self._runtime_error(err, "OCI runtime create failed") from None
            await self._after_runc(self.reaper, self.namespace, socket)
            try:
                self.pid = read_pid_file(self.pid_file)
            except (OSError, ValueError) as err:
                raise errdefs.Unknown(f"failed to retrieve OCI runtime container pid: {err}") from None
        except BaseException:
            await self._close_io()
            raise
        finally:
            if socket is not None:
                socket.close()

    def status_name(self) -> str:
        if self.pausing:
            return "pausing"
        if self.state == "deleted":
            return "stopped"
        if self.state == "created-checkpoint":
            return "created"
        return self.state

    async def start(self) -> None:
        async with self.lock:
            if self.state == "created":
                try:
                    await self.runc.start(self.id)
                except RuncError as err:
                    raise self._runtime_error(err, "OCI runtime start failed") from None
                self.state = "running"
            elif self.state == "created-checkpoint":
                await self._start_restore()
                self.state = "running"
            else:
                raise errdefs.Unknown(f"cannot start a {_state_word(self.state)} process")

    async def _start_restore(self) -> None:
        assert self._restore is not None
        socket = ConsoleSocket() if self.stdio.terminal else None
        try:
            try:
                await self.runc.restore(self.id, self.bundle, self._restore["fds"],
                                        image_path=self._restore["image_path"], work_dir=self.criu_work_path,
                                        parent_path=self._restore["parent_path"], pid_file=self.pid_file,
                                        console_socket=socket.path if socket else "", no_pivot=self.no_pivot)
            except RuncError as err:
                raise self._runtime_error(err, "OCI runtime restore failed") from None
            await self._after_runc(self.reaper, self.namespace, socket)
            try:
                self.pid = read_pid_file(self.pid_file)
            except (OSError, ValueError) as err:
                raise errdefs.Unknown(f"failed to retrieve OCI runtime container pid: {err}") from None
        finally:
            if socket is not None:
                socket.close()

    def set_exited(self, status: int, when: float | None = None) -> None:
        """Called under `lock` by the service when the init process's exit was reaped."""
        if self.state in ("stopped", "deleted"):
            return
        was_paused = self.state == "paused"
        self._exit(status, when)
        self.state = "stopped"
        if was_paused:  # a frozen cgroup must be thawed or nothing in it can be reaped
            asyncio.get_running_loop().create_task(self._resume_quietly())

    async def _resume_quietly(self) -> None:
        try:
            await self.runc.resume(self.id)
        except RuncError as err:
            log.error("resuming exited container from paused state", error=str(err))

    async def delete(self) -> None:
        async with self.lock:
            if self.state in ("created", "created-checkpoint", "stopped"):
                await self._delete()
                self.state = "deleted"
            elif self.state == "deleted":
                raise errdefs.NotFound("cannot delete a deleted process")
            else:
                raise errdefs.Unknown(f"cannot delete a {_state_word(self.state)} process")

    async def _delete(self) -> None:
        await self._wait_io()
        error: errdefs.ContainerdError | None = None
        try:
            await self.runc.delete(self.id)
        except RuncError as err:
            if "does not exist" not in str(err):
                error = self._runtime_error(err, "failed to delete task")
        await self._close_io()
        if self.rootfs:
            try:
                await asyncio.to_thread(mountlib.unmount_all, self.rootfs)
            except OSError as err:
                log.warning("failed to cleanup rootfs mount", error=str(err))
                if error is None:
                    error = errdefs.Unknown(f"failed rootfs umount: {err}")
        if error is not None:
            raise error

    async def kill(self, sig: int, all: bool = False) -> None:
        async with self.lock:
            if self.state == "deleted":
                raise errdefs.NotFound("cannot kill a deleted process")
            try:
                await self.runc.kill(self.id, sig, all)
            except RuncError as err:
                raise check_kill_error(err) from None

    async def kill_all(self) -> None:
        async with self.lock:
            try:
                await self.runc.kill(self.id, 9, True)
            except RuncError as err:
                raise self._runtime_error(err, "OCI runtime killall failed") from None

    async def pause(self) -> None:
        async with self.lock:
            if self.state != "running":
                raise errdefs.Unknown(_PAUSE_ERRORS.get(self.state, f"cannot pause a {self.state} process"))
            self.pausing = True
            try:
                await self.runc.pause(self.id)
            except RuncError as err:
                raise self._runtime_error(err, "OCI runtime pause failed") from None
            finally:
                self.pausing = False
            self.state = "paused"

    async def resume(self) -> None:
        async with self.lock:
            if self.state != "paused":
                raise errdefs.Unknown(_RESUME_ERRORS.get(self.state, f"cannot resume a {self.state} process"))
            try:
                await self.runc.resume(self.id)
            except RuncError as err:
                raise self._runtime_error(err, "OCI runtime resume failed") from None
            self.state = "running"

    async def update(self, resources_json: bytes) -> None:
        async with self.lock:
            if self.state == "stopped":
                raise errdefs.Unknown("cannot update a stopped container")
            if self.state == "deleted":
                raise errdefs.Unknown("cannot update a deleted process")
            try:
                json.loads(resources_json or b"{}")
            except ValueError as err:
                raise errdefs.Unknown(str(err)) from None
            try:
                await self.runc.update(self.id, resources_json)
            except RuncError as err:
                raise errdefs.Unknown(str(err)) from None

    async def checkpoint(self, path: str, *, exit: bool = False, open_tcp: bool = False,
                         external_unix_sockets: bool = False, terminal: bool = False,
                         file_locks: bool = False, empty_namespaces: list[str] | None = None,
                         work_path: str = "") -> None:
        async with self.lock:
            if self.state in ("created", "created-checkpoint"):
                raise errdefs.Unknown("cannot checkpoint a task in created state")
            if self.state == "stopped":
                raise errdefs.Unknown("cannot checkpoint a stopped container")
            if self.state == "deleted":
                raise errdefs.Unknown("cannot checkpoint a deleted process")
            work = work_path or os.path.join(self.work_dir, "criu-work")
            try:
                await self.runc.checkpoint(self.id, image_path=path, work_dir=work,
                                           allow_open_tcp=open_tcp, allow_external_unix_sockets=external_unix_sockets,
                                           allow_terminal=terminal, file_locks=file_locks,
                                           empty_namespaces=empty_namespaces, leave_running=not exit)
            except RuncError as err:
                dump_log = os.path.join(self.bundle, "criu-dump.log")
                try:
                    with open(os.path.join(work, "dump.log"), "rb") as src, open(dump_log, "wb") as dst:
                        dst.write(src.read())
                except OSError:
                    pass
                raise errdefs.Unknown(f"{str(err).splitlines()[0]} path= {dump_log}") from None
            finally:
                if not work_path:
                    import shutil
                    shutil.rmtree(work, ignore_errors=True)

    def check_exec(self) -> None:
        """May an exec be added in this state?"""
        if self.state in ("created", "running"):
            return
        if self.state == "created-checkpoint":
            raise errdefs.Unknown("cannot exec in a created state")
        raise errdefs.Unknown(f"cannot exec in a {self.state} state")


_PAUSE_ERRORS = {
    "created": "cannot pause task in created state",
    "created-checkpoint": "cannot pause task in created state",
    "paused": "cannot pause a paused container",
    "stopped": "cannot pause a stopped container",
    "deleted": "cannot pause a deleted process",
}
_RESUME_ERRORS = {
    "created": "cannot resume task in created state",
    "created-checkpoint": "cannot resume task in created state",
    "running": "cannot resume a running process",
    "stopped": "cannot resume a stopped container",
    "deleted": "cannot resume a deleted process",
}


def _state_word(state: str) -> str:
    return "created" if state == "created-checkpoint" else state


# --------------------------------------------------------------------------------------------
# Exec


class Exec(_Process):
    kind = "exec"

    def __init__(self, id: str, parent: Init, spec: dict, stdio: Stdio) -> None:
        super().__init__(id, stdio)
        self.parent = parent
        self.spec = dict(spec)
        self.spec["terminal"] = stdio.terminal
        self.state = "created"

    @property
    def pid_file(self) -> str:
        return os.path.join(self.parent.bundle, f"{self.id}.pid")

    def status_name(self) -> str:
        parent = self.parent.status_name()
        if parent in ("paused", "pausing"):
            return parent
        return "stopped" if self.state == "deleted" else self.state

    async def start(self) -> None:
        """runc exec --detach; sets `pid`. Caller holds `lock`."""
        if self.state != "created":
            raise errdefs.Unknown(f"cannot start a {self.state} process")
        parent = self.parent
        fds, socket = await self._setup_io(parent.reaper, parent.id, parent.namespace)
        process_file = os.path.join(parent.bundle, f".{self.id}-process.json")
        try:
            with open(process_file, "w") as f:
                json.dump(self.spec, f)
            try:
                await parent.runc.exec(parent.id, process_file, fds, pid_file=self.pid_file,
                                       console_socket=socket.path if socket else "")
            except RuncError as err:
                self.exited.set()  # Go closes waitBlock: a Wait on it returns at once
                raise errdefs.Unknown(parent.runc.runtime_error(err, "OCI runtime exec failed")) from None
            await self._after_runc(parent.reaper, parent.namespace, socket)
            try:
                self.pid = read_pid_file(self.pid_file)
            except (OSError, ValueError) as err:
                raise errdefs.Unknown(f"failed to retrieve OCI runtime exec pid: {err}") from None
            self.state = "running"
        except BaseException:
            await self._close_io()
            raise
        finally:
            if socket is not None:
                socket.close()
            try:
                os.unlink(process_file)
            except OSError:
                pass

    def set_exited(self, status: int, when: float | None = None) -> None:
        if self.state in ("stopped", "deleted"):
            return
        self._exit(status, when)
        self.state = "stopped"

    async def delete(self) -> None:
        async with self.lock:
            if self.state == "running":
                raise errdefs.Unknown("cannot delete a running process")
            if self.state == "deleted":
                raise errdefs.NotFound("cannot delete a deleted process")
            await self._wait_io()
            await self._close_io()
            try:
                os.unlink(self.pid_file)
            except OSError:
                pass
            self.state = "deleted"

    async def kill(self, sig: int, all: bool = False) -> None:
        async with self.lock:
            if self.state == "deleted":
                raise errdefs.NotFound("cannot kill a deleted process")
            if self.pid == 0:
                raise errdefs.FailedPrecondition("process not created")
            if self.exited_at is not None:
                raise errdefs.NotFound("process already finished")
            try:
                os.kill(self.pid, sig)
            except OSError as err:
                inner = check_kill_error(err)
                raise type(inner)(f"exec kill error: {inner.message}") from None

    def resize(self, width: int, height: int) -> None:
        if self.state == "stopped":
            raise errdefs.Unknown("cannot resize a stopped container")
        if self.state == "deleted":
            raise errdefs.Unknown("cannot resize a deleted process")
        super().resize(width, height)
