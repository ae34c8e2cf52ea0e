"""Our ttrpc against the real Go peer, containerd-shim-runc-v2, in both directions.

The tests play containerd's part in starting a shim (runtime/v2/binary.go): a bundle directory named
after the task id with a config.json and a `log` fifo, then `containerd-shim-runc-v2 -namespace NS
-address ADDR -publish-binary BIN -id ID start` run from the bundle with TTRPC_ADDRESS in the
environment; it prints the shim's socket address. TTRPC_ADDRESS points at our own TtrpcServer,
standing in for the daemon's ttrpc endpoint, where the shim's Go ttrpc client forwards events.

  * our client -> Go server: Task.Connect and friends on the shim's socket;
  * Go client -> our server: the shim forwards /tasks/create to our Events service.

Whatever happens, shims are killed, their `delete` action runs and the temp dir is removed.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import pytest
import structlog

from pycontainerd.core import context, errdefs
from pycontainerd.core.ttrpc import TtrpcClient, TtrpcServer, request_metadata

SHIM = shutil.which("containerd-shim-runc-v2")

pytestmark = [
    pytest.mark.compat,
    pytest.mark.root,
    pytest.mark.skipif(SHIM is None, reason="containerd-shim-runc-v2 is not on PATH"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the Go shim needs root (/run/containerd/s, subreaper)"),
]

TASK = "containerd.task.v2.Task"
NAMESPACE = "pyttrpc-compat"
log = structlog.get_logger(__name__)


# ---------------------------------------------------------------------------- processes

def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _shim_pids(task_id: str) -> list[int]:
    """Running shims serving `task_id` (found even when Connect never answered)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and b"containerd-shim" in argv[0] and b"-id" in argv and task_id.encode() in argv:
            pids.append(int(entry))
    return [pid for pid in pids if _alive(pid)]


async def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        await asyncio.sleep(0.05)
    return not _alive(pid)


async def _run(argv: list[str], cwd: str | None = None, env: dict[str, str] | None = None,
               timeout: float = 30) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out, err


def _drain_fifo(fd: int) -> str:
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


# ---------------------------------------------------------------------------- a shim, started and cleaned up

@dataclass
class GoShim:
    task_id: str
    bundle: str
    address: str
    pid: int
    log_fd: int
    shim_log: list[str] = field(default_factory=list)

    def read_log(self) -> str:
        self.shim_log.append(_drain_fifo(self.log_fd))
        return "".join(self.shim_log)


@contextlib.asynccontextmanager
async def go_shim(ttrpc_server: TtrpcServer, spec: dict | None = None):
    """Start containerd-shim-runc-v2 as containerd does, with `ttrpc_server` as the daemon's
    ttrpc address; always tear everything down."""
    task_id = f"ttrpc-{uuid.uuid4().hex[:12]}"
    root = tempfile.mkdtemp(prefix="ttrpc-goshim-", dir="/tmp")
    bundle = os.path.join(root, task_id)  # the shim's delete finds the bundle at dirname(cwd)/id
    daemon_address = os.path.join(root, "containerd.sock")
    ttrpc_address = daemon_address + ".ttrpc"
    env = dict(os.environ, TTRPC_ADDRESS=ttrpc_address, GOMAXPROCS="2")
    common = [SHIM, "-namespace", NAMESPACE, "-address", daemon_address, "-publish-binary", "/bin/true"]
    log_fd: int | None = None
    socket_path: str | None = None
    shim: GoShim | None = None
    try:
        os.makedirs(bundle)
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(spec or {"ociVersion": "1.0.2", "annotations": {}}, f)
        with open(os.path.join(bundle, "runtime"), "w") as f:
            f.write("runc")  # what the shim's delete action reads
        os.mkfifo(os.path.join(bundle, "log"), 0o700)
        log_fd = os.open(os.path.join(bundle, "log"), os.O_RDONLY | os.O_NONBLOCK)
        await ttrpc_server.start_unix(ttrpc_address)

        code, out, err = await _run([*common, "-id", task_id, "start"], cwd=bundle, env=env)
        assert code == 0, f"shim start failed ({code}): {err.decode(errors='replace')}"
        address = out.decode().strip()
        assert address.startswith("unix://"), address
        socket_path = address[len("unix://"):]
        running = _shim_pids(task_id)
        assert len(running) == 1, running
        shim = GoShim(task_id, bundle, address, running[0], log_fd)
        yield shim
    except BaseException:
        if log_fd is not None:
            text = shim.read_log() if shim else _drain_fifo(log_fd)
            if text:
                log.error("go shim log", log=text[-4000:])
        raise
    finally:
        for pid in _shim_pids(task_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            await _wait_gone(pid, 5)
        if os.path.isdir(bundle):
            with contextlib.suppress(Exception):
                await _run(["runc", "--root", f"/run/containerd/runc/{NAMESPACE}", "delete", "--force",
                            task_id])
            with contextlib.suppress(Exception):
                await _run([*common, "-id", task_id, "-bundle", bundle, "delete"], cwd=bundle, env=env)
        if socket_path and os.path.exists(socket_path):
            os.unlink(socket_path)
        with contextlib.suppress(OSError):  # runc's state root for our namespace, when empty
            os.rmdir(f"/run/containerd/runc/{NAMESPACE}")
        if log_fd is not None:
            os.close(log_fd)
        await ttrpc_server.close(grace=1)
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------- our client, Go server

async def test_client_against_go_shim():
    from pycontainerd.api.gen.containerd.task.v2 import (
        ConnectRequest, ConnectResponse, ShutdownRequest, StateRequest, TaskStub,
    )

    async with go_shim(TtrpcServer()) as shim:  # a daemon endpoint serving nothing
        client = await TtrpcClient.connect(shim.address, timeout=10)
        try:
            task = client.stub(TaskStub, namespace=NAMESPACE)
            resp = await task.connect(ConnectRequest(id=shim.task_id), timeout=10)
            assert resp.shim_pid > 0
            assert resp.shim_pid == shim.pid
            assert _alive(resp.shim_pid)
            assert resp.task_pid == 0  # no container was created

            # many calls multiplexed on one connection, answered by Go's server
            resps = await asyncio.gather(*(
                client.call(TASK, "Connect", ConnectRequest(id=shim.task_id), ConnectResponse,
                            timeout=10, namespace=NAMESPACE) for _ in range(64)))
            assert {r.shim_pid for r in resps} == {shim.pid}

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
            with contextlib.suppress(errdefs.Unavailable):
                await task.shutdown(ShutdownRequest(id=shim.task_id), timeout=10)
            assert await _wait_gone(shim.pid, 10), "shim still running after Shutdown"
            await asyncio.wait_for(client.wait_closed(), 10)
        finally:
            await client.close()


# ---------------------------------------------------------------------------- Go client, our server

def _busybox_spec(bundle: str) -> dict:
    """An OCI spec from `runc spec`, running a static busybox that sleeps."""
    busybox = shutil.which("busybox")
    rootfs = os.path.join(bundle, "rootfs")
    os.makedirs(os.path.join(rootfs, "bin"))
    shutil.copy(busybox, os.path.join(rootfs, "bin", "busybox"))
    subprocess.run(["runc", "spec", "--bundle", bundle], check=True)
    with open(os.path.join(bundle, "config.json")) as f:
        spec = json.load(f)
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["/bin/busybox", "sleep", "60"]
    spec["root"] = {"path": rootfs, "readonly": True}
    return spec


@pytest.mark.skipif(shutil.which("runc") is None or shutil.which("busybox") is None,
                    reason="needs runc and busybox")
async def test_go_shim_forwards_events_to_our_server():
    """The shim's Go ttrpc client calls our Events.Forward: our first answer is an error status,
    which Go must decode (it logs it and retries), the second is OK, which Go must accept (no
    further retry)."""
    from pycontainerd.api.gen.containerd.services.events.ttrpc.v1 import EventsBase, ForwardRequest
    from pycontainerd.api.gen.containerd.task.v2 import (
        CreateTaskRequest, DeleteRequest, KillRequest, TaskStub, WaitRequest,
    )
    from betterproto.lib.google.protobuf import Empty

    calls: list[tuple[str, str, str, dict]] = []
    second_create = asyncio.Event()

    class Events(EventsBase):
        async def forward(self, request: ForwardRequest) -> Empty:
            env = request.envelope
            calls.append((env.topic, env.namespace, context.namespace(), request_metadata()))
            creates = [c for c in calls if c[0] == "/tasks/create"]
            if env.topic == "/tasks/create" and len(creates) == 1:
                raise errdefs.Unavailable("pyttrpc says try again")
            if len(creates) == 2:
                second_create.set()
            return Empty()

    server = TtrpcServer()
    server.register_betterproto(Events())
    scratch = tempfile.mkdtemp(prefix="ttrpc-spec-", dir="/tmp")  # holds the rootfs
    try:
        spec = _busybox_spec(scratch)
        async with go_shim(server, spec) as shim:
            client = await TtrpcClient.connect(shim.address, timeout=10)
            task = client.stub(TaskStub, namespace=NAMESPACE)
            try:
                created = await task.create(CreateTaskRequest(id=shim.task_id, bundle=shim.bundle),
                                            timeout=30)
                assert created.pid > 0
                await asyncio.wait_for(second_create.wait(), 15)
                await asyncio.sleep(2.5)  # a response Go failed to decode would be retried after 2s

                creates = [c for c in calls if c[0] == "/tasks/create"]
                assert len(creates) == 2, calls
                for _topic, env_ns, ctx_ns, md in creates:
                    assert env_ns == NAMESPACE
                    assert ctx_ns == NAMESPACE  # from containerd-namespace-ttrpc, set by Go's client
                    assert md.get("containerd-namespace-ttrpc") == [NAMESPACE]
                # Go decoded our error status: Publish logs "post event" with it, then its retry
                # queue forwards again; an OK it could not decode would log "forward event".
                shim_log = shim.read_log()
                errors = [line for line in shim_log.splitlines() if "level=error" in line]
                assert len(errors) == 1, shim_log
                assert "code = Unavailable desc = pyttrpc says try again: unavailable" in errors[0]

                await task.kill(KillRequest(id=shim.task_id, signal=signal.SIGKILL), timeout=10)
                await task.wait(WaitRequest(id=shim.task_id), timeout=10)
                await task.delete(DeleteRequest(id=shim.task_id), timeout=10)
            finally:
                await client.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
