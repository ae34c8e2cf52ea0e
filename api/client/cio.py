"""Client-side IO for tasks and exec processes, as containerd's cio package does it.

A task's stdio reaches the client through named pipes (FIFOs) the client creates in a private
temp dir (`<fifo_dir>/<random>/<id>-stdin|-stdout|-stderr`) and names in the Create/Exec
request; the shim opens the other ends. `fifo_io(...)` makes such a set and copies between the
FIFOs and the caller's streams; `attach(...)` does the same for FIFOs that already exist (a task
started elsewhere, `pyctr tasks attach`); `null_io()` sends nothing; `log_uri(...)`,
`log_file(...)` and `binary_io(...)` name a `file://` or `binary://` URI the shim writes stdout
and stderr to instead (ctr's --log-uri). `Console` puts the caller's terminal in raw mode and
reports its size (ctr's -t).

How the copying works: one daemon thread per stream. A FIFO open blocks until the other side
opens (the shim opens stdout/stderr for writing while creating the process and blocks until our
reader is there — containerd's fifo package semantics), so each thread opens its FIFO itself and
then copies; `cancel()` releases a thread still blocked in open by opening that FIFO from the
other side. stdout/stderr copies end at EOF, which comes once the shim closes its end (at task
or process delete, after it has drained the process's output): `wait()` waits for that. The
stdin copy ends at EOF of the caller's stdin and then calls `on_stdin_eof` (tasks.py makes it the
process's CloseIO once the process has started: the shim keeps a writer of its own on the stdin
FIFO, so only CloseIO lets the process see EOF), like ctr's stdinCloser.

Owns nothing on the daemon side and never talks to it: tasks.py wires IO to the Tasks API.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import fcntl
import os
import shutil
import stat
import struct
import sys
import tempfile
import termios
import threading
import tty
import urllib.parse
from dataclasses import dataclass
from typing import IO as FileIO
from typing import BinaryIO, Callable, Mapping, Optional, Union

DEFAULT_FIFO_DIR = "/run/pycontainerd/fifo"
"""Where FIFO sets are made unless the caller names another dir (containerd's is
/run/containerd/fifo)."""

_BUF = 32 * 1024

Stream = Union[int, BinaryIO, FileIO, None]
"""A file descriptor, a binary (or text: its .buffer is used) file object, or None."""


@dataclass(frozen=True)
class IOConfig:
    """What a Create/Exec request says about IO: three paths or URIs, and the terminal flag."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


class IO:
    """The IO of one process. Subclasses copy; this base one (null IO, log URIs) does not."""

    def __init__(self, config: IOConfig):
        self.config = config

    def cancel(self) -> None:
        """Stop waiting for FIFOs the other side never opened."""

    async def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait until the output copies are done (True) or `timeout` passed (False)."""
        return True

    def close(self) -> None:
        """Close what is open and remove the FIFOs."""

    @property
    def closed(self) -> bool:
        return True


def null_io() -> IO:
    """No stdio at all (ctr's --null-io): the shim sends the process's output to /dev/null."""
    return IO(IOConfig())


def log_uri(uri: str, terminal: bool = False) -> IO:
    """stdout and stderr go to `uri` (`file:///path`, `binary:///path?k=v`, or what the shim
    understands), as ctr's --log-uri: the URI is passed on as given, the shim interprets it."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme in ("file", "binary") and not parsed.path.startswith("/"):
        raise ValueError(f"log uri {uri!r}: an absolute path is needed")
    return IO(IOConfig(stdout=uri, stderr=uri, terminal=terminal))


def _generate_uri(scheme: str, path: str, args: Optional[Mapping[str, str]]) -> str:
    path = os.path.normpath(path)
    if not path.startswith("/"):
        raise ValueError("absolute path needed")
    query = urllib.parse.urlencode(sorted((args or {}).items()))
    return f"{scheme}://{urllib.parse.quote(path)}" + (f"?{query}" if query else "")


def log_file(path: str) -> IO:
    """stdout and stderr appended to the file at `path` by the shim (`file://` URI)."""
    return log_uri(_generate_uri("file", path, None))


def binary_io(binary: str, args: Optional[Mapping[str, str]] = None, terminal: bool = False) -> IO:
    """stdout and stderr handed to a logging binary the shim starts (`binary://` URI, with
    `args` as its query)."""
    return log_uri(_generate_uri("binary", binary, args), terminal=terminal)


# -- FIFO sets -------------------------------------------------------------------------------

@dataclass
class FIFOSet:
    """The paths of a process's FIFOs and the dir to remove afterwards ("" for none)."""

    config: IOConfig
    dir: str = ""

    def remove(self) -> None:
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            for path in (self.config.stdin, self.config.stdout, self.config.stderr):
                if path and _is_fifo(path):
                    try:
                        os.unlink(path)
                    except OSError:
                        pass


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def new_fifo_set(process_id: str, *, terminal: bool = False, fifo_dir: str = "",
                 stdin: bool = True, stdout: bool = True, stderr: bool = True) -> FIFOSet:
    """Make `<fifo_dir>/<random>/` and the FIFOs `<process_id>-stdin|stdout|stderr` in it (the
    stderr one is left out with a terminal, whose output all comes on stdout)."""
    root = fifo_dir or DEFAULT_FIFO_DIR
    os.makedirs(root, mode=0o700, exist_ok=True)
    d = tempfile.mkdtemp(dir=root)
    paths = {}
    for name, wanted in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr and not terminal)):
        if wanted:
            path = os.path.join(d, f"{process_id}-{name}")
            os.mkfifo(path, 0o700)
            paths[name] = path
    return FIFOSet(IOConfig(paths.get("stdin", ""), paths.get("stdout", ""), paths.get("stderr", ""), terminal), d)


# -- copying ---------------------------------------------------------------------------------

def _fileno(stream: Stream) -> Optional[int]:
    if stream is None:
        return None
    if isinstance(stream, int):
        return stream
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _reader(stream: Stream) -> Callable[[], bytes]:
    fd = _fileno(stream)
    if fd is not None:
        return lambda: os.read(fd, _BUF)
    buf = getattr(stream, "buffer", stream)
    read1 = getattr(buf, "read1", None) or buf.read
    return lambda: read1(_BUF)


def _writer(stream: Stream) -> Callable[[bytes], None]:
    if isinstance(stream, int):
        fd = stream

        def write_fd(data: bytes) -> None:
            view = memoryview(data)
            while view:
                try:
                    n = os.write(fd, view)
                except BlockingIOError:
                    import select
                    select.select([], [fd], [])
                    continue
                view = view[n:]
        return write_fd
    buf = getattr(stream, "buffer", stream)

    def write_obj(data: bytes) -> None:
        if hasattr(stream, "buffer"):
            stream.flush()  # text written before must come first
        buf.write(data)
        buf.flush()
    return write_obj


class _Copy:
    """One stream copied in a daemon thread; `future` resolves when the copy ends. The thread
    owns the FIFO's fd: it opens it, copies, closes it, then calls `after` (if any)."""

    def __init__(self, name: str, path: str, flags: int, run: Callable[[int], None],
                 after: Optional[Callable[[], None]] = None):
        self.name, self.path, self.flags = name, path, flags
        self.opened = threading.Event()
        self.cancelled = False
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self._run, self._after = run, after
        self.thread = threading.Thread(target=self._main, name=f"cio-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _main(self) -> None:
        result: Optional[BaseException] = None
        try:
            try:
                fd = os.open(self.path, self.flags | os.O_CLOEXEC)
            except OSError as err:
                result = err
                return
            self.opened.set()
            try:
                if not self.cancelled:
                    self._run(fd)
            finally:
                os.close(fd)
            if self._after is not None and not self.cancelled:
                self._after()
        except BaseException as err:  # never let a copy thread print a traceback
            result = err
        finally:
            self.future.set_result(result)

    def unblock(self) -> None:
        """Release the thread if it is still blocked opening its FIFO."""
        self.cancelled = True
        if self.opened.is_set() or self.future.done():
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return
        # The blocked open returns now; give it a moment before our end goes away again.
        self.opened.wait(0.5)
        os.close(fd)


class CopyIO(IO):
    """FIFOs copied to and from the caller's streams (see the module docstring)."""

    def __init__(self, fifos: FIFOSet, stdin: Stream = None, stdout: Stream = None, stderr: Stream = None,
                 on_stdin_eof: Optional[Callable[[], None]] = None, remove_fifos: bool = True):
        super().__init__(fifos.config)
        self.fifos = fifos
        self.on_stdin_eof = on_stdin_eof
        self._eof_lock = threading.Lock()
        self._stdin_eof = False
        self._remove_fifos = remove_fifos
        self._closed = False
        self._copies: list[_Copy] = []
        self._out: list[_Copy] = []
        cfg = fifos.config
        if cfg.stdin and stdin is not None:
            read = _reader(stdin)

            def pump_in(fd: int) -> None:
                write = _writer(fd)
                while True:
                    try:
                        data = read()
                    except OSError:
                        data = b""
                    if not data:
                        return
                    try:
                        write(data)
                    except OSError:
                        return

            def stdin_done() -> None:
                with self._eof_lock:
                    self._stdin_eof = True
                    callback = self.on_stdin_eof
                if callback is not None:
                    callback()
            self._copies.append(_Copy("stdin", cfg.stdin, os.O_WRONLY, pump_in, stdin_done))
        for name, path, target in (("stdout", cfg.stdout, stdout), ("stderr", cfg.stderr, stderr)):
            if not path or target is None or (name == "stderr" and cfg.terminal):
                continue
            write = _writer(target)

            def pump_out(fd: int, write=write) -> None:
                while True:
                    try:
                        data = os.read(fd, _BUF)
                    except OSError:
                        return
                    if not data:
                        return
                    try:
                        write(data)
                    except (BrokenPipeError, ValueError, OSError):
                        # the caller's side went away: keep draining so the process never blocks
                        write = lambda _data: None  # noqa: E731
            copy = _Copy(name, path, os.O_RDONLY, pump_out)
            self._copies.append(copy)
            self._out.append(copy)
        for copy in self._copies:
            copy.start()

    def when_stdin_eof(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from the copy thread) once the caller's stdin has ended and our end
        of the stdin FIFO is closed; right away when that already happened."""
        with self._eof_lock:
            self.on_stdin_eof = callback
            done = self._stdin_eof
        if done:
            callback()

    async def wait(self, timeout: Optional[float] = None) -> bool:
        futures = [asyncio.wrap_future(c.future) for c in self._out]
        if not futures:
            return True
        done, pending = await asyncio.wait(futures, timeout=timeout)
        return not pending

    def wait_opened(self, timeout: Optional[float] = None) -> bool:
        """Block until every FIFO is open on our side (the shim opened its ends)."""
        return all(c.opened.wait(timeout) or c.future.done() for c in self._copies)

    def cancel(self) -> None:
        for copy in self._copies:
            copy.unblock()

    def close(self) -> None:
        """Release threads still waiting for the other side and remove our FIFOs. A stdin copy
        blocked reading the caller's stream stays until that stream ends (a daemon thread)."""
        if self._closed:
            return
        self._closed = True
        self.cancel()
        if self._remove_fifos:
            self.fifos.remove()

    @property
    def closed(self) -> bool:
        return self._closed


def fifo_io(process_id: str, *, stdin: Stream = None, stdout: Stream = None, stderr: Stream = None,
            terminal: bool = False, fifo_dir: str = "",
            on_stdin_eof: Optional[Callable[[], None]] = None) -> CopyIO:
    """A new FIFO set for `process_id`, copied to and from the given streams (None: that FIFO is
    not made, the process gets no such stream). The usual pick: `stdio()`."""
    fifos = new_fifo_set(process_id, terminal=terminal, fifo_dir=fifo_dir,
                         stdin=stdin is not None, stdout=stdout is not None, stderr=stderr is not None)
    return CopyIO(fifos, stdin, stdout, stderr, on_stdin_eof=on_stdin_eof)


def stdio() -> dict:
    """The caller's own stdin, stdout and stderr as keyword arguments for `fifo_io`/`attach`."""
    return {"stdin": sys.stdin.fileno(), "stdout": sys.stdout.fileno(), "stderr": sys.stderr.fileno()}


def attach(config: IOConfig, *, stdin: Stream = None, stdout: Stream = None, stderr: Stream = None,
           on_stdin_eof: Optional[Callable[[], None]] = None) -> CopyIO:
    """Copy to and from the FIFOs of a process that already runs (their paths come from the
    task's Get). Only FIFO paths are attached to; URIs (file://, binary://) have nothing to
    attach to. The FIFOs are left in place by close(); the task's delete removes them."""
    def fifo_or_empty(path: str) -> str:
        return path if path and _is_fifo(path) else ""

    cfg = IOConfig(fifo_or_empty(config.stdin), fifo_or_empty(config.stdout),
                   fifo_or_empty(config.stderr), config.terminal)
    return CopyIO(FIFOSet(cfg), stdin, stdout, stderr, on_stdin_eof=on_stdin_eof, remove_fifos=False)


def remove_fifos(config: IOConfig) -> None:
    """Remove a process's FIFOs and their dir when they are FIFOs we made (cio's Load closer)."""
    dirs = set()
    for path in (config.stdin, config.stdout, config.stderr):
        if path and _is_fifo(path):
            try:
                os.unlink(path)
            except OSError:
                pass
            dirs.add(os.path.dirname(path))
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:
            pass


# -- the terminal ----------------------------------------------------------------------------

class Console:
    """The caller's terminal: raw mode for the time a process with a TTY runs, and its size.

        with Console.current() as con:
            con.set_raw()
            width, height = con.size()
    """

    def __init__(self, fd: int):
        self.fd = fd
        self._saved: Optional[list] = None

    @classmethod
    def current(cls) -> "Console":
        """The terminal on stdin (or stdout, or stderr); errors when none of them is one."""
        for fd in (0, 1, 2):
            if os.isatty(fd):
                return cls(fd)
        raise OSError(errno.ENOTTY, "provided file is not a console")

    def set_raw(self) -> None:
        if self._saved is None:
            self._saved = termios.tcgetattr(self.fd)
        tty.setraw(self.fd, termios.TCSANOW)

    def reset(self) -> None:
        if self._saved is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSANOW, self._saved)
            except termios.error:
                pass
            self._saved = None

    def size(self) -> tuple[int, int]:
        """(width, height) in characters."""
        packed = fcntl.ioctl(self.fd, termios.TIOCGWINSZ, b"\0" * 8)
        rows, cols, _, _ = struct.unpack("HHHH", packed)
        return cols, rows

    def __enter__(self) -> "Console":
        return self

    def __exit__(self, *exc) -> None:
        self.reset()
