"""Starting, connecting to and killing v1 shims, from the daemon's side (containerd's
runtime/v1/shim/client).

Start, as containerd does for `containerd-shim`:
  * the socket `unix:///run/pycontainerd/s/<sha256(<grpc address>/<namespace>/<id>)>` (containerd's
    name, under our launch.SOCKET_ROOT rather than containerd's /run/containerd/s; the directory
    created 0711 when missing) is created here (mode 0600; a stale one is replaced) and handed to
    the shim as fd 3, for our shim and the Go one alike;
  * the shim runs from the bundle directory with `-namespace NS -workdir WORK -address GRPC
    -containerd-binary BIN [-criu PATH] [-runtime-root DIR] [-systemd-cgroup] [-debug]`, the
    environment plus GOMAXPROCS=2 (and TTRPC_ADDRESS, which our Python shim uses to forward
    events over ttrpc; the Go shim ignores it), in a process group of its own, stdout and stderr
    the work dir's `shim.stdout.log` / `shim.stderr.log` fifos, which the daemon reads (copied to
    its own stdout/stderr with `shim_debug`, discarded otherwise);
  * `address` and `shim.pid` are written in the bundle, the shim joins the task options'
    `shim_cgroup` when one is given, its oom_score_adj becomes the daemon's + 1;
  * the shim is our child: its exit (seen through a pidfd) calls `on_exit`, which cleans up
    after it if its task is still listed. A shim reconnected after a daemon restart is not our
    child: there the connection closing calls `on_exit`.

The shim is started with posix_spawn (fd 3 placed there, no preexec_fn in a threaded daemon, and
no asyncio subprocess transport, which would kill a long-lived child when it is collected) through
`/bin/sh -c 'cd -- BUNDLE && exec SHIM ...'`, posix_spawn having no way to change directory.
Calls on a connection that is gone raise errdefs.Unknown("ttrpc: closed"), as containerd reports
Go's ttrpc.ErrClosed.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

import structlog
from betterproto.lib.google.protobuf import Empty

from pycontainerd.api.gen.containerd.runtime.linux.shim.v1 import ShimStub
from pycontainerd.core import errdefs
from pycontainerd.core.ttrpc import TtrpcClient
from pycontainerd.plugins.runtime.v2.runc import launch

from .bundle import SHIM_PID_FILE, Bundle, write_file

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT = 100.0  # containerd dials a shim with a 100 s timeout
SOCKET_PATH_LIMIT = 106
STDOUT_LOG = "shim.stdout.log"
STDERR_LOG = "shim.stderr.log"


class ShimLog:
    """One of the work dir's log fifos: the shim writes it, the daemon reads it (non-blocking, on the
    loop) until the last writer is gone."""

    def __init__(self, path: Path, sink: Any | None):
        self.path = path
        self.sink = sink
        self.fd: int | None = None
        self._loop = asyncio.get_running_loop()
        try:
            os.mkfifo(path, 0o700)
        except FileExistsError:
            pass

    def child_end(self) -> int:
        """A read-write descriptor for the shim's stdout/stderr (as containerd's O_RDWR fifo: the
        shim never gets EPIPE while the daemon is away). Open it before `start`."""
        return os.open(self.path, os.O_RDWR | os.O_CLOEXEC)

    def start(self) -> None:
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        if self.fd is None:
            return
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # every writer is gone: the shim exited
            self.close()
            return
        if self.sink is not None:
            try:
                self.sink.write(data.decode(errors="replace"))
                self.sink.flush()
            except Exception:  # noqa: BLE001 - the daemon's own output gone: drop the shim's
                pass

    def drain_and_close(self) -> None:
        """Copy what the fifo still holds, then close (the shim is gone)."""
        for _ in range(64):
            if self.fd is None:
                return
            try:
                data = os.read(self.fd, 65536)
            except OSError:
                break
            if not data:
                break
            if self.sink is not None:
                try:
                    self.sink.write(data.decode(errors="replace"))
                    self.sink.flush()
                except Exception:  # noqa: BLE001
                    pass
        self.close()

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            self._loop.remove_reader(fd)
        except Exception:  # noqa: BLE001
            pass
        os.close(fd)


class ShimLogs:
    def __init__(self, work_dir: Path, debug: bool):
        self.stdout = ShimLog(work_dir / STDOUT_LOG, sys.stdout if debug else None)
        self.stderr = ShimLog(work_dir / STDERR_LOG, sys.stderr if debug else None)

    def start(self) -> None:
        self.stdout.start()
        self.stderr.start()

    def drain_and_close(self) -> None:
        self.stdout.drain_and_close()
        self.stderr.drain_and_close()

    def close(self) -> None:
        self.stdout.close()
        self.stderr.close()


class _ShimAPI:
    """The generated ShimStub over ttrpc; calls on a closed connection raise Unknown "ttrpc: closed"."""

    def __init__(self, stub: Any, client: TtrpcClient):
        self._stub, self._client = stub, client

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return await method(*args, **kwargs)
            except errdefs.Unavailable as err:
                if self._client.closed:
                    raise errdefs.Unknown("ttrpc: closed") from err
                raise

        return call


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _looks_like_shim(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"containerd-shim" in f.read()
    except OSError:
        return False


class Shim:
    """One connected v1 shim."""

    def __init__(self, bundle: Bundle, client: TtrpcClient, *, proc: "ShimProcess | None" = None,
                 logs: ShimLogs | None = None, socket_inode: int = 0,
                 on_exit: Callable[["Shim"], Awaitable[None]] | None = None):
        self.bundle = bundle
        self.client = client
        self.api: Any = _ShimAPI(client.stub(ShimStub, namespace=bundle.namespace), client)
        self.proc = proc
        self.logs = logs
        self.socket_inode = socket_inode
        self.address = bundle.address()
        self._on_exit = on_exit
        self._closing = False
        self._gone = False
        self.cleaning = False  # the runtime is cleaning up after this shim's death
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future = loop.create_future()
        self._watchers: list[asyncio.Task] = []   # cancelled by close()
        self._callbacks: set[asyncio.Task] = set()  # on_exit runs: never cancelled (they close us)
        self._pidfd: int | None = None
        if proc is not None:
            self._watch_process(loop)
        else:
            self._watchers.append(loop.create_task(self._watch_connection(), name=f"v1-shim-{bundle.id}"))

    def __repr__(self) -> str:
        return f"<v1 Shim {self.bundle.namespace}/{self.bundle.id}>"

    @property
    def pid(self) -> int:
        """The shim's pid as we know it without asking it (0 when unknown)."""
        if self.proc is not None:
            return self.proc.pid
        return self.bundle.read_pid(SHIM_PID_FILE)

    # ------------------------------------------------------------------------ noticing the end

    def set_on_exit(self, on_exit: Callable[["Shim"], Awaitable[None]] | None) -> None:
        self._on_exit = on_exit
        if self._gone and not self._closing and on_exit is not None:
            self._call_on_exit()

    def _watch_process(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.proc is not None
        try:
            fd = os.pidfd_open(self.proc.pid)
        except OSError:
            task = loop.create_task(asyncio.to_thread(self.proc.wait))
            task.add_done_callback(lambda _t: self._process_exited())
            self._watchers.append(task)
            return
        self._pidfd = fd

        def ready() -> None:
            self._stop_pidfd()
            self._process_exited()

        loop.add_reader(fd, ready)

    def _stop_pidfd(self) -> None:
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            try:
                asyncio.get_running_loop().remove_reader(fd)
            except Exception:  # noqa: BLE001
                pass
            os.close(fd)

    def _process_exited(self) -> None:
        if self.proc is not None:
            self.proc.poll()
        log.info("shim reaped", id=self.bundle.id, namespace=self.bundle.namespace,
                 status=self.proc.returncode if self.proc else None)
        self._gone_now()

    async def _watch_connection(self) -> None:
        await self.client.wait_closed()
        if not self._closing:
            log.info("shim disconnected", id=self.bundle.id, namespace=self.bundle.namespace)
        self._gone_now()

    def _gone_now(self) -> None:
        if self._gone:
            return
        self._gone = True
        if not self.exited.done():
            self.exited.set_result(None)
        if self.logs is not None:
            self.logs.drain_and_close()
        if self.proc is not None:
            self._remove_socket()
        if self._closing or self._on_exit is None:
            return
        self._call_on_exit()

    def _call_on_exit(self) -> None:
        task = asyncio.get_running_loop().create_task(self._run_on_exit())
        self._callbacks.add(task)
        task.add_done_callback(self._callbacks.discard)

    async def _run_on_exit(self) -> None:
        try:
            await self._on_exit(self)
        except Exception:  # noqa: BLE001
            log.exception("cleaning up after shim exit failed", id=self.bundle.id, namespace=self.bundle.namespace)

    def _remove_socket(self) -> None:
        """The dead shim's socket file, unless a newer shim of the same task took its place."""
        path = launch.socket_path(self.address) if self.address.startswith("unix://") else ""
        if not path or not self.socket_inode:
            return
        try:
            if os.lstat(path).st_ino == self.socket_inode:
                os.unlink(path)
        except OSError:
            pass

    # ------------------------------------------------------------------------ ending it

    async def kill_shim(self, timeout: float = 10.0) -> None:
        """SIGKILL the shim and wait for it to be gone (containerd's KillShim)."""
        pid = 0
        try:
            pid = (await self.api.shim_info(Empty(), timeout=2.0)).shim_pid
        except errdefs.ContainerdError as err:
            pid = self.pid
            if not pid or (self.proc is None and not _looks_like_shim(pid)):
                raise
            log.debug("shim info failed; killing the pid we know", pid=pid, error=str(err))
        if pid == os.getpid() or pid <= 0:
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc is not None and self.proc.pid == pid:
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), timeout)
            except asyncio.TimeoutError:
                log.warning("timed out while waiting for shim to exit", pid=pid)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while alive(pid):
            if loop.time() > deadline:
                log.warning("timed out while waiting for shim to exit", pid=pid)
                return
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Disconnect (daemon shutdown, or after killing the shim) without treating it as dying."""
        self._closing = True
        await self.client.close()
        self._stop_pidfd()
        if self.logs is not None:
            self.logs.close()
        current = asyncio.current_task()
        for task in self._watchers:
            if not task.done() and task is not current:
                task.cancel()


# ---------------------------------------------------------------------------- start and connect


def _new_socket(address: str) -> tuple[socket.socket, int]:
    """The listening socket (replacing a stale one) and its inode."""
    path = launch.socket_path(address)
    if len(address) > SOCKET_PATH_LIMIT:
        raise errdefs.InvalidArgument(f"{address!r}: unix socket path too long (> {SOCKET_PATH_LIMIT})")
    try:
        sock = launch.new_socket(address)
    except OSError as err:
        if err.errno != errno.EADDRINUSE:
            raise errdefs.Unknown(f"failed to listen to unix socket {address!r}: {err.strerror or err}") from None
        try:
            os.unlink(path)
        except OSError as rm_err:
            raise errdefs.Unknown(f"remove already used socket: {rm_err}") from None
        try:
            sock = launch.new_socket(address)
        except OSError as err2:
            raise errdefs.Unknown(f"failed to listen to unix socket {address!r}: {err2.strerror or err2}") from None
    return sock, os.lstat(path).st_ino


class ShimProcess:
    """Our child shim process (what Popen would be, for a process started with posix_spawn)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                self.returncode = -1
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


_SPAWN_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)  # Python ignores them; a shim must not inherit that


def _spawn(argv: list[str], cwd: str, env: dict[str, str], sock_fd: int, stdout_fd: int,
           stderr_fd: int) -> ShimProcess:
    """posix_spawn the shim, the socket at fd 3, in a process group of its own, from `cwd` (through
    `/bin/sh -c 'cd -- "$0" && exec "$@"'`: posix_spawn cannot change directory)."""
    temps = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (sock_fd, stdout_fd, stderr_fd)]
    try:
        actions = [(os.POSIX_SPAWN_DUP2, temps[0], 3),
                   (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_DUP2, temps[1], 1),
                   (os.POSIX_SPAWN_DUP2, temps[2], 2)]
        sh_argv = ["/bin/sh", "-c", 'cd -- "$0" && exec "$@"', cwd, *argv]
        pid = os.posix_spawn(sh_argv[0], sh_argv, env, file_actions=actions, setpgroup=0,
                             setsigdef=_SPAWN_DEFAULT_SIGNALS, setsigmask=())
    finally:
        for fd in temps:
            os.close(fd)
    return ShimProcess(pid)


def _adjust_oom_score(pid: int) -> None:
    """The shim's oom_score_adj: the daemon's + 1, capped at 1000. A refused write (no
    CAP_SYS_RESOURCE) or a shim already gone is not an error."""
    try:
        with open("/proc/self/oom_score_adj") as f:
            score = int(f.read().strip() or 0)
    except (OSError, ValueError) as err:
        raise errdefs.Unknown(f"get daemon OOM score: {err}") from None
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(min(score + 1, 1000)))
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EPERM, errno.ESRCH, errno.ENOENT):
            raise errdefs.Unknown(f"set shim OOM score: {err}") from None


def shim_args(bundle: Bundle, *, daemon_address: str, publish_binary: str, runtime_root: str = "",
              criu: str = "", systemd_cgroup: bool = False, debug: bool = False) -> list[str]:
    args = ["-namespace", bundle.namespace, "-workdir", str(bundle.work_dir), "-address", daemon_address,
            "-containerd-binary", publish_binary]
    if criu:
        args += ["-criu", criu]
    if runtime_root:
        args += ["-runtime-root", runtime_root]
    if systemd_cgroup:
        args.append("-systemd-cgroup")
    if debug:
        args.append("-debug")
    return args


async def start_shim(binary: str, bundle: Bundle, *, daemon_address: str, ttrpc_address: str,
                     publish_binary: str, runtime_root: str = "", criu: str = "", systemd_cgroup: bool = False,
                     debug: bool = False, cgroup: str = "",
                     on_exit: Callable[[Shim], Awaitable[None]] | None = None) -> Shim:
    """Start a shim for `bundle` and connect to it."""
    address = launch.socket_address(daemon_address, bundle.namespace, bundle.id)
    sock, inode = await asyncio.to_thread(_new_socket, address)
    logs = ShimLogs(bundle.work_dir, debug)
    proc: ShimProcess | None = None
    argv = [binary, *shim_args(bundle, daemon_address=daemon_address, publish_binary=publish_binary,
                               runtime_root=runtime_root, criu=criu, systemd_cgroup=systemd_cgroup, debug=debug)]
    env = dict(os.environ, GOMAXPROCS="2", TTRPC_ADDRESS=ttrpc_address)
    try:
        try:
            out_fd = logs.stdout.child_end()
            err_fd = logs.stderr.child_end()
            try:
                proc = await asyncio.to_thread(_spawn, argv, str(bundle.path), env, sock.fileno(), out_fd, err_fd)
            except OSError as err:
                raise errdefs.Unknown(f"failed to start shim: {err}") from None
            finally:
                os.close(out_fd)
                os.close(err_fd)
        finally:
            sock.close()
        logs.start()
        log.info("shim started", binary=binary, pid=proc.pid, address=address, debug=debug)
        await asyncio.to_thread(write_file, bundle.path / "address", address)
        await asyncio.to_thread(write_file, bundle.path / SHIM_PID_FILE, str(proc.pid))
        if cgroup:
            try:
                await asyncio.to_thread(launch.join_cgroup, proc.pid, cgroup)
            except launch.ShimError as err:
                raise errdefs.Unknown(str(err)) from None
            log.info("shim placed in cgroup", pid=proc.pid, cgroup=cgroup)
        _adjust_oom_score(proc.pid)
        client = await TtrpcClient.connect(address, timeout=CONNECT_TIMEOUT, namespace=bundle.namespace)
    except BaseException:
        if proc is not None:
            proc.kill()
            await asyncio.to_thread(proc.wait)
        logs.close()
        try:
            if os.lstat(launch.socket_path(address)).st_ino == inode:
                os.unlink(launch.socket_path(address))
        except OSError:
            pass
        raise
    return Shim(bundle, client, proc=proc, logs=logs, socket_inode=inode, on_exit=on_exit)


async def connect_shim(bundle: Bundle, *, timeout: float, debug: bool = False,
                       on_exit: Callable[[Shim], Awaitable[None]] | None = None) -> Shim:
    """Reconnect to the running shim of `bundle` (daemon start); checks it answers ShimInfo."""
    client = await TtrpcClient.connect(bundle.address(), timeout=timeout, namespace=bundle.namespace)
    shim = Shim(bundle, client)
    try:
        await shim.api.shim_info(Empty(), timeout=timeout)
    except BaseException:
        await shim.close()
        raise
    try:
        shim.logs = ShimLogs(bundle.work_dir, debug)
        shim.logs.start()
    except OSError as err:
        log.error("opening shim log pipes", id=bundle.id, namespace=bundle.namespace, error=str(err))
    shim.set_on_exit(on_exit)
    return shim
