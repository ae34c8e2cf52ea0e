"""A process's stdio: fifos, files and logging binaries handed to runc, and the console (pty)
of a terminal process, copied to and from the client's fifos.

Non-terminal processes get their fds straight from the shim, with no copying through Python
(containerd's Go shim pipes everything through goroutines instead; the container sees the same
thing either way):
  * a fifo path (the default scheme): the shim opens the fifo's read side first and keeps it, so
    its own write-side open never blocks and the container never gets EPIPE/SIGPIPE while the
    client is away (the Go shim keeps such a reader too); the write side goes to runc. For stdin
    the shim opens the read side (to runc) and keeps a write side open until CloseIO, so the
    container sees EOF only after CloseIO *and* the client closing its end, as with Go's shim;
  * a path that is not a fifo: opened O_WRONLY|O_APPEND (shared when stdout == stderr);
  * `file:///path`: the file (parents made, 0644, appended to) is both stdout and stderr;
  * `binary:///path?k=v`: the binary is started with CONTAINER_ID and CONTAINER_NAMESPACE as its
    whole environment, the query as arguments (`k v`), fd 3 the stdout pipe, fd 4 the stderr
    pipe and fd 5 a pipe it closes (or writes to) once ready; runc gets the pipes' write sides.
    On delete the pipes are closed and the binary gets SIGTERM, then SIGKILL after 12 s;
  * nothing at all: /dev/null.

Terminal processes: runc sends the pty master over a console socket (SCM_RIGHTS); the shim copies
the stdin fifo to the master and the master to the stdout fifo (or a logging binary), with flow
control, on the event loop; resize is TIOCSWINSZ on the master.
"""
from __future__ import annotations

import array
import asyncio
import errno
import fcntl
import os
import shutil
import signal
import socket
import stat
import struct
import tempfile
import termios
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

import structlog

from .reaper import Reaper, close_all, kill_quietly
from .runc import IOFds

log = structlog.get_logger("pyrunc.stdio")

BINARY_IO_TERM_TIMEOUT = 12.0


@dataclass
class Stdio:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False

    def is_null(self) -> bool:
        return not (self.stdin or self.stdout or self.stderr)


class StdioError(Exception):
    pass


def _open_nonblock_cloexec(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)


def _is_fifo(path: str) -> bool:
    return stat.S_ISFIFO(os.stat(path).st_mode)


def open_fifo_writer(path: str) -> tuple[int, int]:
    """(held read side, blocking write side) of a fifo; never blocks."""
    reader = _open_nonblock_cloexec(path, os.O_RDONLY)
    try:
        writer = _open_nonblock_cloexec(path, os.O_WRONLY)
    except BaseException:
        os.close(reader)
        raise
    os.set_blocking(writer, True)
    return reader, writer


def open_stdin_fifo(path: str) -> tuple[int, int | None]:
    """(blocking read side for the process, the shim's write side or None if not a fifo)."""
    if not _is_fifo(path):
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC), None
    reader = _open_nonblock_cloexec(path, os.O_RDONLY)
    try:
        writer = _open_nonblock_cloexec(path, os.O_WRONLY)
    except BaseException:
        os.close(reader)
        raise
    os.set_blocking(reader, True)
    return reader, writer


def open_stdin_writer(path: str) -> int:
    """The shim's own write side of a stdin fifo (Go's openStdin), so the reader never sees EOF
    before CloseIO."""
    try:
        return _open_nonblock_cloexec(path, os.O_WRONLY)
    except OSError as err:
        raise StdioError(f"failed to open stdin fifo {path}: {err.strerror}") from None


# --------------------------------------------------------------------------------------------
# Logging binaries


class BinaryLogger:
    """A `binary://` logging process (containerd's NewBinaryIO / NewBinaryCmd)."""

    def __init__(self, reaper: Reaper, uri: str, id: str, namespace: str) -> None:
        self.reaper = reaper
        parts = urlsplit(uri)
        self.path = parts.path
        self.args: list[str] = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key not in self.args[::2]:
                self.args += [key, value]
        self.env = {"CONTAINER_ID": id, "CONTAINER_NAMESPACE": namespace}
        self.pid = 0
        self.exited: asyncio.Future | None = None

    async def start(self, stdout_r: int, stderr_r: int) -> None:
        ready_r, ready_w = os.pipe()
        try:
            try:
                self.pid, self.exited = self.reaper.spawn([self.path, *self.args], env=self.env,
                                                          fds={3: stdout_r, 4: stderr_r, 5: ready_w})
            except OSError as err:
                raise StdioError(f"failed to start binary process: {err}") from None
            finally:
                os.close(ready_w)
            loop = asyncio.get_running_loop()
            os.set_blocking(ready_r, False)
            ready = loop.create_future()

            def readable() -> None:
                if not ready.done():
                    ready.set_result(None)

            loop.add_reader(ready_r, readable)
            try:
                await asyncio.wait({ready, self.exited}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                loop.remove_reader(ready_r)
        finally:
            os.close(ready_r)

    async def stop(self) -> None:
        if not self.pid or self.exited is None or self.exited.done():
            return
        kill_quietly(self.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), BINARY_IO_TERM_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("failed to wait for shim logger process to exit, killing")
            kill_quietly(self.pid)


# --------------------------------------------------------------------------------------------
# Non-terminal IO


class ProcessIO:
    """The fds runc hands to a non-terminal process, and what the shim holds for it."""

    def __init__(self) -> None:
        self.fds = IOFds()
        self.stdio = Stdio()
        self.after_start: list[int] = []   # our copies of fds only runc needs
        self.held: list[int] = []          # kept until close(): fifo read sides, logger pipes
        self.stdin_writer: int | None = None
        self.logger: BinaryLogger | None = None

    def close_after_start(self) -> None:
        fds, self.after_start = self.after_start, []
        close_all(fds)

    def close_stdin(self) -> None:
        fd, self.stdin_writer = self.stdin_writer, None
        close_all([fd])

    async def close(self) -> None:
        self.close_after_start()
        self.close_stdin()
        fds, self.held = self.held, []
        close_all(fds)
        if self.logger is not None:
            logger, self.logger = self.logger, None
            await logger.stop()


def scheme_of(uri: str) -> str:
    if "://" not in uri and ":" not in uri.split("/", 1)[0]:
        return ""
    return urlsplit(uri).scheme


async def create_io(reaper: Reaper, id: str, namespace: str, stdio: Stdio) -> ProcessIO:
    """The IO for a non-terminal process (containerd's createIO)."""
    pio = ProcessIO()
    pio.stdio = Stdio(stdio.stdin, stdio.stdout, stdio.stderr, stdio.terminal)
    if stdio.is_null():
        return pio
    try:
        scheme = scheme_of(stdio.stdout) or "fifo"
        if scheme == "fifo":
            _open_paths(pio, stdio.stdout, stdio.stderr)
        elif scheme == "file":
            path = urlsplit(stdio.stdout).path
            os.makedirs(os.path.dirname(path) or "/", 0o755, exist_ok=True)
            fd = os.open(path, os.O_APPEND | os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644)
            pio.after_start.append(fd)
            pio.fds.stdout = pio.fds.stderr = fd
            pio.stdio.stdout = pio.stdio.stderr = path
        elif scheme == "binary":
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            pio.held += [out_w, err_w]
            pio.after_start += [out_r, err_r]
            pio.logger = BinaryLogger(reaper, stdio.stdout, id, namespace)
            await pio.logger.start(out_r, err_r)
            pio.fds.stdout, pio.fds.stderr = out_w, err_w
            return pio  # a logging binary gets no stdin
        else:
            raise StdioError(f"unknown STDIO scheme {scheme}")
        if stdio.stdin:
            reader, writer = open_stdin_fifo(stdio.stdin)
            pio.after_start.append(reader)
            pio.fds.stdin = reader
            pio.stdin_writer = writer
    except BaseException:
        await pio.close()
        raise
    return pio


def _open_paths(pio: ProcessIO, stdout: str, stderr: str) -> None:
    shared: int | None = None
    for name, path in (("stdout", stdout), ("stderr", stderr)):
        if not path:
            continue
        try:
            fifo = _is_fifo(path)
        except OSError as err:
            raise StdioError(f"stat {path}: {err.strerror}") from None
        if fifo:
            try:
                reader, writer = open_fifo_writer(path)
            except OSError as err:
                raise StdioError(f"containerd-shim: opening w/o fifo {path!r} failed: {err.strerror}") from None
            pio.held.append(reader)
            pio.after_start.append(writer)
            fd = writer
        elif shared is not None:
            fd = shared
        else:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            except OSError as err:
                raise StdioError(f"containerd-shim: opening file {path!r} failed: {err.strerror}") from None
            pio.after_start.append(fd)
            if stdout == stderr:
                shared = fd
        setattr(pio.fds, name, fd)


# --------------------------------------------------------------------------------------------
# Console socket and console


class ConsoleSocket:
    """A temporary unix socket runc sends the pty master to (go-runc NewTempConsoleSocket)."""

    def __init__(self) -> None:
        base = os.environ.get("XDG_RUNTIME_DIR") or None
        self.dir = tempfile.mkdtemp(prefix="pty", dir=base)
        self.path = os.path.join(self.dir, "pty.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(self.path)
            self.sock.listen(1)
            self.sock.setblocking(False)
        except BaseException:
            self.close()
            raise

    async def receive_master(self, timeout: float = 30.0) -> int:
        loop = asyncio.get_running_loop()
        try:
            conn, _ = await asyncio.wait_for(loop.sock_accept(self.sock), timeout)
        except asyncio.TimeoutError:
            raise StdioError("failed to retrieve console master: timed out") from None
        with conn:
            conn.settimeout(timeout)
            fds = array.array("i")
            _msg, ancdata, _flags, _addr = conn.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize * 4))
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        if not fds:
            raise StdioError("failed to retrieve console master: no file descriptor received")
        for extra in fds[1:]:
            os.close(extra)
        os.set_inheritable(fds[0], False)
        return fds[0]

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class _Pump:
    """Copies one readable fd to one writable fd on the loop, never blocking, pausing the source
    while the destination is full."""

    def __init__(self, loop: asyncio.AbstractEventLoop, src: int, dst: int, *, name: str,
                 on_eof=None) -> None:
        self.loop = loop
        self.src = src
        self.dst = dst
        self.name = name
        self.pending = b""
        self.reading = False
        self.writing = False
        self.closed = False
        self.on_eof = on_eof

    def start(self) -> None:
        self._read_on()

    def _read_on(self) -> None:
        if not self.reading and not self.closed:
            self.loop.add_reader(self.src, self._readable)
            self.reading = True

    def _read_off(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.src)
            self.reading = False

    def _readable(self) -> None:
        try:
            data = os.read(self.src, 65536)
        except BlockingIOError:
            return
        except OSError as err:  # EIO: the pty's other side is gone
            if err.errno not in (errno.EIO, errno.EBADF):
                log.debug("console copy read failed", pump=self.name, error=str(err))
            data = b""
        if not data:
            self._read_off()
            if self.on_eof is not None:
                self.on_eof(self)
            return
        self._send(data)

    def _send(self, data: bytes) -> None:
        if self.pending:
            self.pending += data
        else:
            try:
                n = os.write(self.dst, data)
            except BlockingIOError:
                n = 0
            except OSError:  # the destination is gone: discard, like an io.Copy that failed
                self._read_off()
                return
            self.pending = data[n:]
        if self.pending:
            self._read_off()
            if not self.writing:
                self.loop.add_writer(self.dst, self._writable)
                self.writing = True

    def _writable(self) -> None:
        try:
            n = os.write(self.dst, self.pending)
        except BlockingIOError:
            return
        except OSError:
            n = len(self.pending)
        self.pending = self.pending[n:]
        if not self.pending:
            self.loop.remove_writer(self.dst)
            self.writing = False
            self._read_on()

    def drain(self) -> None:
        """Read what is readable right now and push it out (best effort, non-blocking)."""
        for _ in range(64):
            try:
                data = os.read(self.src, 65536)
            except OSError:
                return
            if not data:
                return
            if self.pending:
                self.pending += data
            else:
                self._send(data)

    def stop(self) -> None:
        self._read_off()
        if self.writing:
            self.loop.remove_writer(self.dst)
            self.writing = False
        self.closed = True


class Console:
    """A pty master received from runc, copied to/from the process's stdio."""

    def __init__(self, master: int) -> None:
        self.master = master
        os.set_blocking(master, False)
        self.loop = asyncio.get_running_loop()
        self._pumps: list[_Pump] = []
        self._fds: list[int] = []
        self.logger: BinaryLogger | None = None
        self.done = asyncio.Event()
        self._output: _Pump | None = None
        self._closed = False

    def resize(self, width: int, height: int) -> None:
        if self._closed:
            return
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    async def start_copy(self, reaper: Reaper, id: str, namespace: str, stdin: str, stdout: str) -> None:
        """containerd's CopyConsole: stdin fifo -> master, master -> stdout (fifo or binary)."""
        try:
            if stdin:
                fd = _open_nonblock_cloexec(stdin, os.O_RDONLY)
                self._fds.append(fd)
                pump = _Pump(self.loop, fd, self.master, name="stdin", on_eof=lambda p: p.stop())
                self._pumps.append(pump)
                pump.start()
            if scheme_of(stdout) == "binary":
                out_r, out_w = os.pipe()
                err_r, err_w = os.pipe()
                os.close(err_w)
                try:
                    self.logger = BinaryLogger(reaper, stdout, id, namespace)
                    await self.logger.start(out_r, err_r)
                finally:
                    os.close(out_r)
                    os.close(err_r)
                os.set_blocking(out_w, False)
                self._fds.append(out_w)
                dst = out_w
            elif stdout:
                reader, writer = open_fifo_writer(stdout)
                os.set_blocking(writer, False)
                self._fds += [reader, writer]
                dst = writer
            else:
                dst = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
                self._fds.append(dst)
            self._output = _Pump(self.loop, self.master, dst, name="stdout", on_eof=self._output_done)
            self._pumps.append(self._output)
            self._output.start()
        except BaseException:
            await self.close()
            raise

    def _output_done(self, pump: _Pump) -> None:
        if not pump.pending:
            self.done.set()
        else:
            self.loop.call_later(0.05, self._output_done, pump)

    def shutdown(self) -> None:
        """The process exited (containerd's ShutdownConsole): flush what the pty still holds."""
        if self._output is not None and not self._output.closed:
            self._output.drain()
            if not self._output.pending:
                self.done.set()
            else:
                self.loop.call_later(2.0, self.done.set)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for pump in self._pumps:
            pump.stop()
        close_all(self._fds + [self.master])
        self._fds = []
        self.done.set()
        if self.logger is not None:
            logger, self.logger = self.logger, None
            await logger.stop()
