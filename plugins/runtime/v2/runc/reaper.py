"""Reaping children as a subreaper, and running commands without asyncio's child watchers.

The shim is a child subreaper: container processes (runc's grandchildren) are reparented to it,
so one SIGCHLD handler must `waitpid(-1)` everything. asyncio's subprocess support waits per pid
(ThreadedChildWatcher) and would race with that, so commands (runc, logging binaries) are
started here with posix_spawn and their exits delivered through the same reaper.

Routing of one exit (pid, status), decided synchronously in the loop's SIGCHLD callback:
  1. a command started by `spawn`/`run` resolves its waiter;
  2. otherwise `handler(pid, status, when)` is asked (the task service: known container
     processes), and returns True when it took the exit;
  3. otherwise the exit is appended to every open subscription. A create or exec subscribes
     before runc runs and, once it has read the new pid from runc's pid file, looks in its
     subscription for an exit that came first (the process exited before its pid was known).
Anything else (an orphan of a container sharing the host's pid namespace) is dropped.

Statuses are containerd's: the exit code, or 128 + signal number for a process killed by one.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import signal
import time
from typing import Callable, Iterable

_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)

ExitHandler = Callable[[int, int, float], bool]


def exit_status(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 0


class Reaper:
    def __init__(self) -> None:
        self._waiters: dict[int, asyncio.Future] = {}
        self._subscriptions: list[list[tuple[int, int, float]]] = []
        self.handler: ExitHandler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()  # anything that exited before the handler existed

    def uninstall(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)

    # ---------------------------------------------------------------------------- exits

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            self.dispatch(pid, exit_status(status), time.time())

    def dispatch(self, pid: int, code: int, when: float) -> None:
        fut = self._waiters.pop(pid, None)
        if fut is not None:
            if not fut.done():
                fut.set_result(code)
            return
        if self.handler is not None and self.handler(pid, code, when):
            return
        for sub in self._subscriptions:
            sub.append((pid, code, when))

    def subscribe(self) -> list[tuple[int, int, float]]:
        sub: list[tuple[int, int, float]] = []
        self._subscriptions.append(sub)
        return sub

    def unsubscribe(self, sub: list) -> None:
        try:
            self._subscriptions.remove(sub)
        except ValueError:
            pass

    # ---------------------------------------------------------------------------- commands

    def spawn(self, argv: list[str], *, stdin: int | None = None, stdout: int | None = None,
              stderr: int | None = None, fds: dict[int, int] | None = None,
              env: dict[str, str] | None = None) -> tuple[int, asyncio.Future]:
        """Start a command: 0-2 from the given fds (None: /dev/null), `fds` maps more target fd
        numbers to source fds; every other fd of ours is close-on-exec. Returns (pid, future of
        its exit status). Must be called from the loop's thread."""
        loop = self._loop or asyncio.get_running_loop()
        actions = []
        temps = []
        try:
            # move every source above the targets first, so no dup2 clobbers a later source
            for target, source in [(0, stdin), (1, stdout), (2, stderr), *sorted((fds or {}).items())]:
                if source is None:
                    actions.append((os.POSIX_SPAWN_OPEN, target, os.devnull,
                                    os.O_RDONLY if target == 0 else os.O_WRONLY, 0))
                    continue
                high = fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, 100)
                temps.append(high)
                actions.append((os.POSIX_SPAWN_DUP2, high, target))
            pid = os.posix_spawnp(argv[0], argv, os.environ if env is None else env, file_actions=actions,
                                  setsigdef=_RESET_SIGNALS, setsigmask=())
        finally:
            for fd in temps:
                os.close(fd)
        fut = loop.create_future()
        self._waiters[pid] = fut
        return pid, fut

    async def run(self, argv: list[str], *, input: bytes | None = None, stdin: int | None = None,
                  stdout: int | None = None, stderr: int | None = None, combined: bool = True,
                  env: dict[str, str] | None = None, fds: dict[int, int] | None = None,
                  on_start: Callable[[int], None] | None = None) -> tuple[int, bytes]:
        """Run a command to completion: (exit status, captured output). Output is captured from
        stdout (and stderr when `combined`) unless those are given."""
        loop = asyncio.get_running_loop()
        out_r = out_w = in_r = in_w = None
        try:
            if stdout is None or (combined and stderr is None):
                out_r, out_w = os.pipe()
                if stdout is None:
                    stdout = out_w
                if combined and stderr is None:
                    stderr = out_w
            if input is not None:
                in_r, in_w = os.pipe()
                stdin = in_r
            pid, fut = self.spawn(argv, stdin=stdin, stdout=stdout, stderr=stderr, fds=fds, env=env)
        except BaseException:
            for fd in (out_r, out_w, in_r, in_w):
                if fd is not None:
                    os.close(fd)
            raise
        if out_w is not None:
            os.close(out_w)
        if in_r is not None:
            os.close(in_r)
        if on_start is not None:
            on_start(pid)
        writer = None
        if in_w is not None:
            writer = loop.create_task(write_all(in_w, input or b""))
        reader = loop.create_task(read_all(out_r)) if out_r is not None else None
        try:
            code = await fut
        except asyncio.CancelledError:
            kill_quietly(pid)
            raise
        finally:
            if writer is not None:
                if not writer.done():
                    writer.cancel()
        output = b""
        if reader is not None:
            try:  # a grandchild holding the pipe must not hang us: bounded wait after the exit
                output = await asyncio.wait_for(reader, 2.0)
            except asyncio.TimeoutError:
                output = b""
        return code, output


def kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


async def read_all(fd: int, limit: int = 16 << 20) -> bytes:
    """Read a pipe to EOF without blocking the loop; closes `fd`."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    size = 0
    done = loop.create_future()

    def readable() -> None:
        nonlocal size
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                if not done.done():
                    done.set_result(None)
                loop.remove_reader(fd)
                return
            if size < limit:
                chunks.append(data)
                size += len(data)

    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return b"".join(chunks)


async def write_all(fd: int, data: bytes) -> None:
    """Write `data` to a pipe without blocking the loop, then close it."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    view = memoryview(data)
    try:
        while view:
            try:
                n = os.write(fd, view)
                view = view[n:]
                continue
            except BlockingIOError:
                pass
            except OSError as err:
                if err.errno == errno.EPIPE:
                    return
                raise
            ready = loop.create_future()
            loop.add_writer(fd, lambda: ready.done() or ready.set_result(None))
            try:
                await ready
            finally:
                loop.remove_writer(fd)
    finally:
        os.close(fd)


def close_all(fds: Iterable[int | None]) -> None:
    for fd in fds:
        if fd is not None and fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
