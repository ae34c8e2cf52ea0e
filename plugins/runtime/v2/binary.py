"""Shim binaries: which file a runtime name names, and running its `start` and `delete` actions.

Runtime name -> binary, as containerd 1.6 resolves it (runtime/v2/manager.go resolveRuntimePath):

  * an absolute path is the binary itself (it must exist);
  * otherwise the name must have at least two dot-separated parts and the binary is
    `containerd-shim-<second to last>-<last>`: `io.containerd.runc.v2` -> `containerd-shim-runc-v2`,
    `io.containerd.pyrunc.v2` -> `containerd-shim-pyrunc-v2`;
  * our addition: the runtime plugin's `runtime_paths` table may map a runtime name to a binary;
  * errors are errdefs.Unknown, as containerd's (wrapped os.ErrNotExist is no errdefs class);
  * that binary is looked for relative to the runtime name's directory part (containerd's
    BinaryPath quirk), then on $PATH, then next to the daemon's own executable (for us: the
    directory of the `pycontainerd` script and of the Python interpreter, i.e. the venv's bin/,
    where `containerd-shim-pyrunc-v2` is installed).

The start protocol (runtime/v2/shim/util.go Command, binary.go Start): from the bundle directory,
`<shim> -namespace NS -address GRPC -publish-binary BIN -id ID [-debug] start` with the
environment plus GOMAXPROCS=2, TTRPC_ADDRESS, GRPC_ADDRESS, NAMESPACE (and SCHED_CORE=1 when
configured), in a process group of its own, the task options Any marshalled on stdin; the shim
prints its ttrpc address (or, from newer shims, a JSON bootstrap object holding it) and exits,
leaving the shim server running. Our addition: when the binary is our own pyrunc shim installed
for this interpreter (runc/launch.py `runs_this_code`), its `start` runs in-process, the same
code in a worker thread, saving an interpreter start per container. The `delete` action (`... -id ID -bundle PATH delete`) cleans up
after a shim that died and prints a marshalled task.v2.DeleteResponse.

-publish-binary: containerd passes its own executable, which shims (the v1 shim, older v2 ones)
run as `BIN --address GRPC publish --topic T --namespace NS` with an Any on stdin. Ours is the
`pycontainerd` script, whose `publish` subcommand does the same (cmd/daemon.py).
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import structlog

from pycontainerd.api.gen.containerd.task.v2 import DeleteResponse
from pycontainerd.core import errdefs

from .. import Exit
from .bundle import LOG_FIFO, SHIM_BINARY_PATH_FILE, Bundle
from .runc import launch as pyrunc_launch

log = structlog.get_logger(__name__)

SHIM_BINARY_FORMAT = "containerd-shim-{}-{}"


def binary_name(runtime: str) -> str:
    """`containerd-shim-<name>-<version>` for a runtime name; "" when the name is invalid."""
    parts = runtime.split(".")
    if len(parts) < 2:
        return ""
    return SHIM_BINARY_FORMAT.format(parts[-2], parts[-1])


def _own_dirs() -> list[Path]:
    dirs = []
    for candidate in (sys.argv[0] if sys.argv and sys.argv[0] else "", sys.executable):
        if candidate and os.sep in candidate:
            d = Path(os.path.abspath(candidate)).parent
            if d not in dirs:
                dirs.append(d)
    return dirs


class RuntimeResolver:
    """Runtime name -> absolute shim binary path, cached per binary name like containerd."""

    def __init__(self, configured: dict[str, str] | None = None):
        self.configured = dict(configured or {})
        self._cache: dict[str, str] = {}

    def resolve(self, runtime: str) -> str:
        if not runtime:
            raise errdefs.Unknown("no runtime name")
        if os.path.isabs(runtime):
            if not os.path.exists(runtime):
                raise errdefs.Unknown(f"invalid custom binary path: stat {runtime}: no such file or directory")
            return runtime
        configured = self.configured.get(runtime)
        if configured:
            if not os.path.exists(configured):
                raise errdefs.Unknown(f"runtime {json.dumps(runtime)} configured binary {configured}: "
                                      "file does not exist")
            return os.path.abspath(configured)
        name = binary_name(runtime)
        if not name:
            raise errdefs.Unknown(
                f"invalid runtime name {runtime}, correct runtime name should be either format like "
                "`io.containerd.runc.v1` or a full path to the binary")
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        path = ""
        relative = os.path.abspath(os.path.join(os.path.dirname(runtime), name))
        if os.path.isfile(relative) and os.access(relative, os.X_OK):
            path = relative
        if not path:
            path = shutil.which(name) or ""
        if not path:
            for d in _own_dirs():
                candidate = d / name
                if candidate.is_file() and os.access(candidate, os.X_OK):
                    path = str(candidate)
                    break
        if not path:
            raise errdefs.Unknown(
                f"runtime {json.dumps(runtime)} binary not installed {json.dumps(name)}: file does not exist")
        path = os.path.abspath(path)
        return self._cache.setdefault(name, path)


def publish_binary() -> str:
    """The executable shims run to publish events: our `pycontainerd` script."""
    for d in _own_dirs():
        candidate = d / "pycontainerd"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("pycontainerd") or "pycontainerd"


# ---------------------------------------------------------------------------- the shim's log fifo

class ShimLog:
    """The bundle's `log` fifo, opened read-write and non-blocking (so the shim's open never blocks
    and we never see EOF), copied to the daemon's stderr until closed — as containerd does."""

    def __init__(self, path: Path):
        self.path = path
        try:
            os.mkfifo(path, 0o700)
        except FileExistsError:
            pass
        self.fd: int | None = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        if self.fd is None:
            return
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        if data:
            try:
                sys.stderr.write(data.decode(errors="replace"))
                sys.stderr.flush()
            except Exception:  # stderr gone: drop the shim's log rather than the daemon
                pass

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            self._loop.remove_reader(fd)
        except Exception:
            pass
        os.close(fd)


# ---------------------------------------------------------------------------- start and delete

class ShimBinary:
    """One runtime binary acting on one bundle (containerd's runtime/v2 `binary`)."""

    def __init__(self, bundle: Bundle, runtime: str, *, address: str, ttrpc_address: str,
                 publish_binary: str, sched_core: bool = False, debug: bool = False):
        self.bundle = bundle
        self.runtime = runtime
        self.address = address
        self.ttrpc_address = ttrpc_address
        self.publish_binary = publish_binary
        self.sched_core = sched_core
        self.debug = debug

    def command(self, *args: str) -> list[str]:
        return [self.runtime, "-namespace", self.bundle.namespace, "-address", self.address,
                "-publish-binary", self.publish_binary, *args]

    def environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(GOMAXPROCS="2", TTRPC_ADDRESS=self.ttrpc_address, GRPC_ADDRESS=self.address,
                   NAMESPACE=self.bundle.namespace)
        if self.sched_core:
            env["SCHED_CORE"] = "1"
        else:
            env.pop("SCHED_CORE", None)
        return env

    async def start(self, options: Any = None, timeout: float | None = None) -> str:
        """Run the `start` action; return the address the shim serves ttrpc on. Records the
        binary in the bundle's `shim-binary-path` so a restarted daemon finds it again."""
        stdin_data = bytes(options) if options is not None else None
        address = await self._start_in_process(stdin_data or b"", timeout)
        if address is None:
            address = await self._start_binary(stdin_data, timeout)
        await asyncio.to_thread(_write_file, self.bundle.path / SHIM_BINARY_PATH_FILE, self.runtime.encode(), 0o600)
        return address

    async def _start_in_process(self, options: bytes, timeout: float | None) -> str | None:
        """Our own pyrunc shim, installed for this interpreter: its `start` action is the code we
        have loaded, so run it here (in a worker thread; it blocks on a few syscalls and the
        zygote) rather than in a fresh interpreter: the same socket, address file and server
        process from the zygote, minus ~30 ms of interpreter start per container. None when
        the binary is not ours (`runs_this_code`, which reads it: in the thread too) or it takes
        no zygote (disabled, or it failed to start): the binary does the rest."""
        flags = pyrunc_launch.Flags()
        flags.namespace, flags.id, flags.address = self.bundle.namespace, self.bundle.id, self.address
        flags.publish_binary, flags.debug, flags.action = self.publish_binary, self.debug, "start"
        env = self.environ()

        def start() -> str | None:
            if not pyrunc_launch.runs_this_code(self.runtime):
                return None
            return pyrunc_launch.start(flags, bundle=str(self.bundle.path), env=env, options=options,
                                       executable=self.runtime, direct=False)
        try:
            return await asyncio.wait_for(asyncio.to_thread(start), timeout)
        except pyrunc_launch.ZygoteUnavailable as err:
            log.warning("pyrunc zygote unavailable: running the shim's start action", id=self.bundle.id,
                        namespace=self.bundle.namespace, error=str(err))
            return None
        except pyrunc_launch.ShimError as err:
            raise errdefs.Unknown(f"{pyrunc_launch.NAME}: {err}") from None
        except OSError as err:
            raise errdefs.Unknown(f"{pyrunc_launch.NAME}: {pyrunc_launch.oserror_text(err)}") from None

    async def _start_binary(self, stdin_data: bytes | None, timeout: float | None) -> str:
        args = ["-id", self.bundle.id]
        if self.debug:
            args.append("-debug")
        args.append("start")
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command(*args), cwd=str(self.bundle.path), env=self.environ(),
                stdin=asyncio.subprocess.PIPE if stdin_data is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, process_group=0)
        except OSError as err:
            raise errdefs.Unknown(f": fork/exec {self.runtime}: {_go_errno(err)}") from None  # Go: "<output>: <err>"
        try:
            out, _ = await asyncio.wait_for(proc.communicate(stdin_data), timeout)
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        text = out.decode(errors="replace").strip()
        if proc.returncode != 0:
            raise errdefs.Unknown(f"{text}: {_exit_text(proc.returncode)}")
        return parse_start_output(text)

    async def delete(self, timeout: float | None = None) -> Exit:
        """Run the `delete` action (kills what is left of the task, unmounts its rootfs), then
        remove the bundle. Raises when the action fails; the bundle is then left in place."""
        cwd = str(self.bundle.path) if self.bundle.path.is_dir() else None
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command("-id", self.bundle.id, "-bundle", str(self.bundle.path), "delete"),
                cwd=cwd, env=self.environ(), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, process_group=0)
        except OSError as err:
            raise errdefs.Unknown(f": fork/exec {self.runtime}: {_go_errno(err)}") from None  # Go: "<output>: <err>"
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        warnings = err.decode(errors="replace").strip()
        if proc.returncode != 0:
            raise errdefs.Unknown(f"{warnings}: {_exit_text(proc.returncode)}")
        if warnings:
            log.warning("cleanup warnings", id=self.bundle.id, namespace=self.bundle.namespace, warnings=warnings)
        try:
            resp = DeleteResponse().parse(out)
        except Exception as e:
            raise errdefs.Unknown(f"shim delete: unreadable response: {e}") from None
        await asyncio.to_thread(self.bundle.delete)
        return Exit(pid=resp.pid, status=resp.exit_status, timestamp=resp.exited_at)


def parse_start_output(text: str) -> str:
    """The address in a shim's `start` output: a plain address, or a JSON bootstrap object
    ({"version": 2, "address": "unix://...", "protocol": "ttrpc"}) from newer shims."""
    if text.startswith("{"):
        try:
            params = json.loads(text)
        except ValueError:
            raise errdefs.Unknown(f"shim start: unreadable bootstrap parameters: {text!r}") from None
        protocol = params.get("protocol", "ttrpc")
        if protocol != "ttrpc":
            raise errdefs.Unimplemented(f"shim protocol {protocol!r}")
        text = str(params.get("address", ""))
    if not text:
        raise errdefs.Unknown("shim start: no address printed")
    return text


def _exit_text(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        import signal

        try:
            return f"signal: {signal.Signals(-returncode).name.lower().removeprefix('sig')}"
        except ValueError:
            return f"signal: {-returncode}"
    return f"exit status {returncode}"


def _write_file(path: Path, data: bytes, mode: int) -> None:
    tmp = path.parent / f".{path.name}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def socket_path(address: str) -> str | None:
    """The filesystem path of a "unix://" address (None for abstract sockets)."""
    if address.startswith("unix://"):
        return address[len("unix://"):]
    return None


def _go_errno(err: OSError) -> str:
    """An OSError as Go prints a syscall.Errno ("permission denied", lower case)."""
    return (err.strerror or str(err)).lower()


__all__ = ["LOG_FIFO", "RuntimeResolver", "ShimBinary", "ShimLog", "binary_name", "parse_start_output",
           "publish_binary", "socket_path"]
