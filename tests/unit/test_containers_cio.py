"""Client-side IO (api/client/cio.py) with real FIFOs and a fake shim on the other ends (threads
that open and use the FIFOs the way containerd's runc shim does). No daemon, no root."""
from __future__ import annotations

import os
import stat
import threading
import time

import pytest

from pycontainerd.api.client import cio


class FakeShim:
    """The shim's side: stdout/stderr opened for writing (blocking until our reader is there),
    stdin opened for reading; what it reads from stdin it echoes upper-cased to stdout."""

    def __init__(self, config: cio.IOConfig, output: bytes = b"", errput: bytes = b""):
        self.config = config
        self.stdin_data = b""
        self.thread = threading.Thread(target=self.run, args=(output, errput), daemon=True)
        self.thread.start()

    def run(self, output: bytes, errput: bytes) -> None:
        out = os.open(self.config.stdout, os.O_WRONLY) if self.config.stdout else None
        err = os.open(self.config.stderr, os.O_WRONLY) if self.config.stderr else None
        if out is not None:
            os.write(out, output)
        if err is not None:
            os.write(err, errput)
        if self.config.stdin:
            fd = os.open(self.config.stdin, os.O_RDONLY)
            while True:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                self.stdin_data += chunk
                if out is not None:
                    os.write(out, chunk.upper())
            os.close(fd)
        for fd in (out, err):
            if fd is not None:
                os.close(fd)


async def test_fifo_io_copies_both_ways(tmp_path):
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    eof = threading.Event()
    io = cio.fifo_io("c1", stdin=stdin_r, stdout=out_w, stderr=err_w, fifo_dir=str(tmp_path / "fifo"),
                     on_stdin_eof=eof.set)
    cfg = io.config
    assert cfg.stdin.endswith("/c1-stdin") and cfg.stdout.endswith("/c1-stdout") and cfg.stderr.endswith("/c1-stderr")
    assert os.path.dirname(cfg.stdin).startswith(str(tmp_path / "fifo"))
    assert all(stat.S_ISFIFO(os.stat(p).st_mode) for p in (cfg.stdin, cfg.stdout, cfg.stderr))
    shim = FakeShim(cfg, b"hello\n", b"oops\n")
    os.write(stdin_w, b"abc\n")
    os.close(stdin_w)
    assert eof.wait(5)
    assert await io.wait(5)
    shim.thread.join(5)
    os.close(out_w)
    os.close(err_w)
    assert os.read(out_r, 100) == b"hello\nABC\n"
    assert os.read(err_r, 100) == b"oops\n"
    assert shim.stdin_data == b"abc\n"
    io.close()
    assert not os.path.exists(os.path.dirname(cfg.stdin))
    os.close(stdin_r)
    os.close(out_r)
    os.close(err_r)


async def test_terminal_has_no_stderr(tmp_path):
    out_r, out_w = os.pipe()
    io = cio.fifo_io("t", stdin=None, stdout=out_w, stderr=2, terminal=True, fifo_dir=str(tmp_path))
    assert io.config.terminal and io.config.stderr == "" and io.config.stdin == ""
    FakeShim(io.config, b"tty output")
    assert await io.wait(5)
    io.close()
    os.close(out_w)
    assert os.read(out_r, 100) == b"tty output"
    os.close(out_r)


async def test_cancel_releases_unopened_fifos(tmp_path):
    stdin_r, stdin_w = os.pipe()
    io = cio.fifo_io("never", stdin=stdin_r, stdout=1, stderr=2, fifo_dir=str(tmp_path))
    assert not await io.wait(0.2)  # nobody opened the other ends
    started = time.monotonic()
    io.close()  # cancel + remove
    for copy in io._copies:
        copy.thread.join(5)
        assert not copy.thread.is_alive()
    assert time.monotonic() - started < 5
    assert not os.listdir(tmp_path)
    os.close(stdin_r)
    os.close(stdin_w)


async def test_output_keeps_draining_when_the_reader_goes_away(tmp_path):
    out_r, out_w = os.pipe()
    os.close(out_r)  # our stdout is a broken pipe: the copy must still drain the FIFO
    io = cio.fifo_io("drain", stdout=out_w, stderr=None, fifo_dir=str(tmp_path))
    shim = FakeShim(io.config, b"x" * 200_000)
    assert await io.wait(5)
    shim.thread.join(5)
    assert not shim.thread.is_alive()
    io.close()
    os.close(out_w)


async def test_attach_leaves_fifos_in_place(tmp_path):
    fifos = cio.new_fifo_set("a1", fifo_dir=str(tmp_path))
    out_r, out_w = os.pipe()
    io = cio.attach(fifos.config, stdout=out_w, stderr=out_w)
    FakeShim(cio.IOConfig("", fifos.config.stdout, fifos.config.stderr), b"late\n", b"")
    assert await io.wait(5)
    io.close()
    assert os.path.exists(fifos.config.stdout)
    os.close(out_w)
    assert os.read(out_r, 100) == b"late\n"
    os.close(out_r)
    cio.remove_fifos(fifos.config)
    assert not os.path.exists(fifos.dir)


def test_attach_ignores_uris():
    io = cio.attach(cio.IOConfig("", "file:///var/log/x", "file:///var/log/x"), stdout=1, stderr=2)
    assert io.config.stdout == "" and io.config.stderr == ""
    io.close()


def test_log_uris():
    assert cio.log_file("/var/log/c.log").config == cio.IOConfig("", "file:///var/log/c.log", "file:///var/log/c.log")
    io = cio.binary_io("/usr/bin/logger", {"tag": "web", "a": "b c"})
    assert io.config.stdout == "binary:///usr/bin/logger?a=b+c&tag=web" == io.config.stderr
    assert cio.log_uri("binary:///x?y=1").config.stdout == "binary:///x?y=1"
    with pytest.raises(ValueError):
        cio.log_file("relative/path")
    with pytest.raises(ValueError):
        cio.log_uri("file://relative")
    assert cio.null_io().config == cio.IOConfig()


def test_console_requires_a_terminal(monkeypatch):
    monkeypatch.setattr(os, "isatty", lambda fd: False)
    with pytest.raises(OSError):
        cio.Console.current()


def test_console_raw_and_size():
    import pty
    import termios

    master, slave = pty.openpty()
    try:
        import fcntl
        import struct
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 120, 0, 0))
        con = cio.Console(slave)
        assert con.size() == (120, 33)
        before = termios.tcgetattr(slave)
        con.set_raw()
        assert termios.tcgetattr(slave)[3] & termios.ECHO == 0
        con.reset()
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)
