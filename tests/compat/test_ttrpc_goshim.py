"""Our ttrpc client against the real Go peer: containerd-shim-runc-v2.

The test plays containerd's part in starting a shim (runtime/v2/binary.go): a bundle directory named
after the task id with a config.json and a `log` fifo, `containerd-shim-runc-v2 -namespace NS
-address ADDR -publish-binary BIN -id ID start` run from the bundle with TTRPC_ADDRESS in the
environment, which prints the shim's socket address. TTRPC_ADDRESS points at our own TtrpcServer,
serving nothing, standing in for the daemon's event endpoint. Whatever happens, the shim is killed,
its `delete` action is run and the temp dir is removed.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
import time
import uuid

import pytest

from pycontainerd.core import errdefs
from pycontainerd.core.ttrpc import TtrpcClient, TtrpcServer

SHIM = shutil.which("containerd-shim-runc-v2")

pytestmark = [
    pytest.mark.compat,
    pytest.mark.root,
    pytest.mark.skipif(SHIM is None, reason="containerd-shim-runc-v2 is not on PATH"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the Go shim needs root (/run/containerd/s, subreaper)"),
]

TASK = "containerd.task.v2.Task"


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie nobody reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _shim_pids(task_id: str) -> list[int]:
    """Pids of running shims serving `task_id` (to clean up even when Connect never answered)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"-id" in argv and task_id.encode() in argv and any(b"containerd-shim" in a for a in argv[:1]):
            pids.append(int(entry))
    return [pid for pid in pids if _alive(pid)]


async def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        await asyncio.sleep(0.05)
    return not _alive(pid)


async def _run_shim(args: list[str], cwd: str, env: dict[str, str], timeout: float = 30) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        SHIM, *args, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out, err


def _drain_fifo(fd: int | None) -> str:
    if fd is None:
        return ""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


async def test_client_against_go_shim():
    from pycontainerd.api.gen.containerd.task.v2 import (
        ConnectRequest, ConnectResponse, ShutdownRequest, StateRequest, TaskStub,
    )

    namespace = "pyttrpc-compat"
    task_id = f"ttrpc-{uuid.uuid4().hex[:12]}"
    root = tempfile.mkdtemp(prefix="ttrpc-goshim-", dir="/tmp")
    bundle = os.path.join(root, task_id)  # the shim's delete finds itself at dirname(cwd)/id
    daemon_address = os.path.join(root, "containerd.sock")
    ttrpc_address = daemon_address + ".ttrpc"
    env = dict(os.environ, TTRPC_ADDRESS=ttrpc_address, GOMAXPROCS="2")
    common = ["-namespace", namespace, "-address", daemon_address, "-publish-binary", "/bin/true"]

    fake_daemon = TtrpcServer()  # the events endpoint the shim publishes to; serves nothing
    log_fd: int | None = None
    shim_pid: int | None = None
    socket_path: str | None = None
    client: TtrpcClient | None = None
    try:
        os.makedirs(bundle)
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump({"ociVersion": "1.0.2", "annotations": {}}, f)
        with open(os.path.join(bundle, "runtime"), "w") as f:
            f.write("runc")
        os.mkfifo(os.path.join(bundle, "log"), 0o700)
        log_fd = os.open(os.path.join(bundle, "log"), os.O_RDONLY | os.O_NONBLOCK)
        await fake_daemon.start_unix(ttrpc_address)

        code, out, err = await _run_shim([*common, "-id", task_id, "start"], bundle, env)
        assert code == 0, f"shim start failed ({code}): {err.decode(errors='replace')}"
        address = out.decode().strip()
        assert address.startswith("unix://"), address
        socket_path = address[len("unix://"):]
        running = _shim_pids(task_id)
        assert len(running) == 1, running
        shim_pid = running[0]

        client = await TtrpcClient.connect(address, timeout=10)
        task = client.stub(TaskStub, namespace=namespace)

        resp = await task.connect(ConnectRequest(id=task_id), timeout=10)
        assert resp.shim_pid > 0
        assert resp.shim_pid == shim_pid
        assert _alive(resp.shim_pid)
        assert resp.task_pid == 0  # no container was created

        # many calls multiplexed on one connection, answered by Go's server
        resps = await asyncio.gather(*(
            client.call(TASK, "Connect", ConnectRequest(id=task_id), ConnectResponse, timeout=10,
                        namespace=namespace) for _ in range(64)))
        assert {r.shim_pid for r in resps} == {shim_pid}

        # Go's statuses come back as our errdefs classes
        with pytest.raises(errdefs.NotFound):
            await task.state(StateRequest(id="no-such-container"), timeout=10)
        with pytest.raises(errdefs.Unimplemented) as info:
            await client.call(TASK, "NoSuchMethod", ConnectRequest(), ConnectResponse, timeout=10)
        assert info.value.message == "method NoSuchMethod"
        with pytest.raises(errdefs.Unimplemented) as info:
            await client.call("containerd.task.v2.Nope", "Connect", ConnectRequest(), ConnectResponse)
        assert info.value.message == "service containerd.task.v2.Nope"

        # Shutdown: the shim exits, possibly before its answer reaches us
        try:
            await task.shutdown(ShutdownRequest(id=task_id), timeout=10)
        except errdefs.Unavailable:
            pass
        assert await _wait_gone(shim_pid, 10), "shim still running after Shutdown"
        await asyncio.wait_for(client.wait_closed(), 10)
    except BaseException:
        logs = _drain_fifo(log_fd)
        if logs:
            import structlog
            structlog.get_logger(__name__).error("go shim log", log=logs[-4000:])
        raise
    finally:
        if client is not None:
            await client.close()
        for pid in {*_shim_pids(task_id), *([shim_pid] if shim_pid else [])}:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await _wait_gone(pid, 5)
        if os.path.isdir(bundle):
            try:
                await _run_shim([*common, "-id", task_id, "-bundle", bundle, "delete"], bundle, env)
            except Exception:  # noqa: BLE001 - cleanup is best effort
                pass
        if socket_path and os.path.exists(socket_path):
            os.unlink(socket_path)
        if log_fd is not None:
            os.close(log_fd)
        await fake_daemon.close(grace=1)
        shutil.rmtree(root, ignore_errors=True)
