"""containerd-shim-pyrunc-v2 driven directly, the way containerd drives a shim, with runc for real.

The tests play the daemon: a bundle named after the task (config.json from `runc spec`, a `log`
fifo), the `start` action run from it with TTRPC_ADDRESS pointing at our own TtrpcServer serving
the Events service (where the shim's events land), then containerd.task.v2.Task calls over our
ttrpc client. The rootfs is a static busybox tree handed over as a bind mount in the Create
request, runc keeps its state under the test's temp dir (runc Options.root), and the zygote lives
in the temp dir too.

Every scenario ends with a leak check: no shim or container process of the test left, no mount
under the temp dir, the shim's socket removed, runc's state gone, the bundle clean of fifos we
made. Fixtures tear down even when a test fails (kill what is left, runc delete --force, the
shim's `delete` action, lazy unmounts, the zygote).

The first tests need no root: flags, socket addresses, the DeleteResponse and metrics encodings.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from betterproto.lib.google.protobuf import Any as ProtoAny
from betterproto.lib.google.protobuf import Empty

from pycontainerd.api.gen.containerd.runc.v1 import Options, ProcessDetails
from pycontainerd.api.gen.containerd.services.events.ttrpc.v1 import EventsBase, ForwardRequest
from pycontainerd.api.gen.containerd.task.v2 import (
    CloseIoRequest, ConnectRequest, CreateTaskRequest, DeleteRequest, DeleteResponse, ExecProcessRequest,
    KillRequest, PauseRequest, PidsRequest, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest,
    StateRequest, StatsRequest, TaskStub, UpdateTaskRequest, WaitRequest,
)
from pycontainerd.api.gen.containerd.types import Mount
from pycontainerd.api.gen.containerd.v1.types import Status
from pycontainerd.core import errdefs
from pycontainerd.core import events as core_events
from pycontainerd.core.ttrpc import TtrpcClient, TtrpcServer
from pycontainerd.plugins.runtime.v2.runc import launch, proto

SHIM = str(Path(sys.executable).parent / "containerd-shim-pyrunc-v2")
RUNC = shutil.which("runc")
BUSYBOX = shutil.which("busybox")
APPLETS = ("sh", "echo", "cat", "sleep", "true", "false", "tty", "stty", "head", "tail", "dd", "od", "ls", "id")


# ---------------------------------------------------------------------------- no root needed

def test_flags_parse_like_go():
    f = launch.parse_flags(["-namespace", "ns", "--address=/a.sock", "-publish-binary", "/bin/x", "-id", "t1",
                            "-debug", "start", "extra"])
    assert (f.namespace, f.address, f.publish_binary, f.id, f.debug, f.action, f.args) == \
        ("ns", "/a.sock", "/bin/x", "t1", True, "start", ["extra"])
    f = launch.parse_flags(["-debug=false", "-bundle", "/b", "delete"])
    assert (f.debug, f.bundle, f.action) == (False, "/b", "delete")
    assert launch.parse_flags(["-namespace", "n"]).action == ""
    assert launch.parse_flags(["--", "-id"]).action == "-id"
    with pytest.raises(launch.FlagError, match="flag provided but not defined: -nope"):
        launch.parse_flags(["-nope"])
    with pytest.raises(launch.FlagError, match="flag needs an argument: -id"):
        launch.parse_flags(["-id"])


def test_socket_address_is_containerds():
    # shim.SocketAddress: sha256 of filepath.Join(address, namespace, id), under our /run/pycontainerd/s
    # (never containerd's /run/containerd/s, which its Go shims use)
    want = hashlib.sha256(b"/run/containerd/containerd.sock/default/abc").hexdigest()
    assert launch.socket_address("/run/containerd/containerd.sock", "default", "abc") == \
        f"unix:///run/pycontainerd/s/{want}"
    assert launch.SOCKET_ROOT == "/run/pycontainerd/s" and launch.RUNC_ROOT == "/run/pycontainerd/runc"
    # Join cleans the path
    assert launch.socket_address("/run//x/../containerd.sock/", "default", "abc") == \
        launch.socket_address("/run/containerd.sock", "default", "abc")
    assert launch.group_id("t", {"io.kubernetes.cri.sandbox-id": "pod"}) == "pod"
    assert launch.group_id("t", {"io.containerd.runc.v2.group": "g", "io.kubernetes.cri.sandbox-id": "p"}) == "g"
    assert launch.group_id("t", {}) == "t"


def test_delete_response_encoding_parses():
    data = launch.encode_delete_response(4242, 137, 1_700_000_000_123_456_789)
    resp = DeleteResponse().parse(data)
    assert (resp.pid, resp.exit_status) == (4242, 137)
    assert int(resp.exited_at.timestamp()) == 1_700_000_000
    assert launch._shim_cgroup(bytes(ProtoAny(type_url="containerd.runc.v1.Options",
                                              value=bytes(Options(shim_cgroup="/x/y"))))) == "/x/y"


def test_metrics_encoder_wire_format():
    sub = proto.Msg().u64(1, 5)
    m = proto.Msg().u64(1, 0).u64(20, 300).str(4, "2MB").msg(3, sub).msg(5, proto.Msg()).packed(4, [1, 128])
    assert m.bytes() == bytes([0xA0, 0x01, 0xAC, 0x02, 0x22, 3]) + b"2MB" + bytes([0x1A, 2, 8, 5, 0x2A, 0,
                                                                                    0x22, 3, 1, 0x80, 1])


def test_runs_this_code_knows_our_installed_shim_only(tmp_path):
    if not os.path.exists(SHIM):
        pytest.skip("containerd-shim-pyrunc-v2 is not installed (pip install -e .)")
    assert launch.runs_this_code(SHIM)
    assert launch.runs_this_code(os.path.realpath(SHIM))
    body = Path(SHIM).read_bytes().partition(b"\n")[2]
    other = tmp_path / "other-python"
    other.write_bytes(b"#!/usr/bin/env python3\n" + body)  # another interpreter: another install
    wrapper = tmp_path / "wrapper"
    wrapper.write_text(f'#!/bin/sh\nexec {SHIM} "$@"\n')
    go_shim = shutil.which("containerd-shim-runc-v2") or "/bin/true"
    for path in (other, wrapper, go_shim, tmp_path / "missing", tmp_path):
        assert not launch.runs_this_code(str(path)), path


# ---------------------------------------------------------------------------- helpers

def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _processes_mentioning(needle: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if needle.encode() in cmdline and _alive(int(entry)):
            out.append(int(entry))
    return out


def _mounts_under(path: str) -> list[str]:
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            if mp == path or mp.startswith(path.rstrip("/") + "/"):
                found.append(mp)
    return found


async def _wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class EventSink(EventsBase):
    """The daemon's Events service: records (topic, namespace, decoded event)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, object]] = []
        self.changed = asyncio.Event()

    async def forward(self, request: ForwardRequest) -> Empty:
        env = request.envelope
        self.events.append((env.topic, env.namespace, core_events.decode(env.event)))
        self.changed.set()
        return Empty()

    def topics(self, container_id: str | None = None) -> list[str]:
        return [t for t, _ns, ev in self.events
                if container_id is None or getattr(ev, "container_id", None) == container_id]

    def of(self, topic: str) -> list:
        return [ev for t, _ns, ev in self.events if t == topic]

    async def wait_topic(self, topic: str, count: int = 1, timeout: float = 10.0) -> list:
        await _wait_for(lambda: len(self.of(topic)) >= count, timeout, f"{count} {topic} events")
        return self.of(topic)


@dataclass
class Env:
    """One test's world: temp dir, the daemon's ttrpc endpoint, a namespace, a busybox image."""

    root: Path
    namespace: str
    address: str           # the "containerd" address the shim hashes (-address)
    ttrpc_address: str
    sink: EventSink
    server: TtrpcServer | None
    image: Path
    runc_root: Path
    env: dict[str, str]
    shims: list["Shim"] = field(default_factory=list)
    in_process: bool = False  # `start` run by launch.start() in this process, as our daemon does

    def bundle_dir(self, task_id: str) -> Path:
        return self.root / "state" / self.namespace / task_id

    async def start_events(self) -> None:
        self.server = TtrpcServer()
        self.server.register_betterproto(self.sink)
        await self.server.start_unix(self.ttrpc_address)


@dataclass
class Shim:
    env: Env
    task_id: str
    bundle: Path
    address: str
    client: TtrpcClient
    task: TaskStub
    log_fd: int

    @property
    def pid(self) -> int:
        """The serving shim's pid, found by its command line (0 once it is gone). A server forked
        from the zygote names itself just after the fork: give it a moment to do so."""
        deadline = time.monotonic() + 5
        while True:
            pids = [p for p in _processes_mentioning(f"-id\0{self.task_id}\0") if p]
            if pids or time.monotonic() > deadline:
                return pids[0] if pids else 0
            time.sleep(0.05)

    def fifo(self, name: str) -> str:
        path = str(self.bundle / f"io-{name}")
        if not os.path.exists(path):
            os.mkfifo(path, 0o600)
        return path

    def create_request(self, **kw) -> CreateTaskRequest:
        opts = Options(root=str(self.env.runc_root))
        kw.setdefault("rootfs", [Mount(type="bind", source=str(self.env.image), options=["rbind", "rw"])])
        return CreateTaskRequest(id=self.task_id, bundle=str(self.bundle),
                                 options=ProtoAny(type_url="containerd.runc.v1.Options", value=bytes(opts)), **kw)


def _write_spec(bundle: Path, args: list[str], *, terminal: bool = False, host_pid: bool = False,
                annotations: dict | None = None, memory_limit: int = 0) -> None:
    subprocess.run([RUNC, "spec", "--bundle", str(bundle)], check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["args"] = args
    spec["process"]["terminal"] = terminal
    spec["root"] = {"path": "rootfs", "readonly": False}
    if host_pid:
        spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "pid"]
    if annotations:
        spec["annotations"] = annotations
    if memory_limit:
        spec["linux"].setdefault("resources", {})["memory"] = {"limit": memory_limit}
    (bundle / "config.json").write_text(json.dumps(spec))


def _drain(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def _run(argv: list[str], cwd: str | None = None, env: dict | None = None, stdin: bytes = b"",
               timeout: float = 60) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(*argv, cwd=cwd, env=env, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    return proc.returncode, out, err


needs_runc = pytest.mark.skipif(RUNC is None or BUSYBOX is None or not os.path.exists(SHIM),
                                reason="needs runc, busybox and containerd-shim-pyrunc-v2 (pip install -e .)")


@contextlib.asynccontextmanager
async def shim_world(*, zygote: bool = True, events: bool = True, in_process: bool = False):
    root = Path(tempfile.mkdtemp(prefix="pyshim-", dir="/tmp"))
    namespace = f"pyshim-{uuid.uuid4().hex[:8]}"
    image = root / "image"
    (image / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, image / "bin" / "busybox")
    for applet in APPLETS:
        os.symlink("busybox", image / "bin" / applet)
    for d in ("proc", "dev", "sys", "tmp", "etc"):
        (image / d).mkdir()
    # a server per container: these tests drive one server's protocol; the grouping tests set
    # PYRUNC_SHIM_GROUP=namespace (the default) themselves
    env = dict(os.environ, PYRUNC_ZYGOTE_DIR=str(root / "zygote"), PYRUNC_ZYGOTE_IDLE="120",
               PYRUNC_SHIM_GROUP="container")
    env["TTRPC_ADDRESS"] = str(root / "d.sock.ttrpc")
    if not zygote:
        env["PYRUNC_ZYGOTE"] = "0"
    world = Env(root=root, namespace=namespace, address=str(root / "d.sock"),
                ttrpc_address=str(root / "d.sock.ttrpc"), sink=EventSink(), server=None, image=image,
                runc_root=root / "runc", env=env, in_process=in_process)
    try:
        if events:
            await world.start_events()
        yield world
    finally:
        await _teardown(world)


async def _teardown(world: Env) -> None:
    leaks: list[str] = []
    for shim in world.shims:
        with contextlib.suppress(Exception):
            await shim.client.close()
    # what a test left running is a leak, but clean it anyway
    for shim in world.shims:
        for pid in _processes_mentioning(f"-id\0{shim.task_id}\0"):
            leaks.append(f"shim process {pid} of {shim.task_id} still running")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        runc_state = world.runc_root / world.namespace / shim.task_id
        if runc_state.exists():
            leaks.append(f"runc state left for {shim.task_id}")
            await _run([RUNC, "--root", str(world.runc_root / world.namespace), "delete", "--force", shim.task_id])
        if shim.bundle.exists():
            code, out, err = await _run([SHIM, "-namespace", world.namespace, "-address", world.address,
                                         "-publish-binary", "/bin/true", "-id", shim.task_id,
                                         "-bundle", str(shim.bundle), "delete"], cwd=str(shim.bundle), env=world.env)
            if code != 0:
                leaks.append(f"delete action failed: {err.decode(errors='replace')}")
        path = launch.socket_path(shim.address)
        if os.path.exists(path):
            with socket_checked(path) as answering:
                if not answering:
                    leaks.append(f"socket {path} left behind")
            with contextlib.suppress(OSError):
                os.unlink(path)
        os.close(shim.log_fd)
    for pid in _processes_mentioning(str(world.root)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # the zygote (its socket is under root) and strays
    mounts = _mounts_under(str(world.root))
    if mounts:
        leaks.append(f"mounts left: {mounts}")
        for mp in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], capture_output=True)
    if world.server is not None:
        await world.server.close(grace=1)
    shutil.rmtree(world.root, ignore_errors=True)
    world.leaks = leaks  # type: ignore[attr-defined]


@contextlib.contextmanager
def socket_checked(path: str):
    import socket
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(0.2)
        try:
            s.connect(path)
            yield True
        except OSError:
            yield False


async def start_shim(world: Env, task_id: str | None = None, *, args: list[str] | None = None,
                     terminal: bool = False, host_pid: bool = False, annotations: dict | None = None,
                     memory_limit: int = 0) -> Shim:
    task_id = task_id or f"t{uuid.uuid4().hex[:10]}"
    bundle = world.bundle_dir(task_id)
    bundle.mkdir(parents=True)
    _write_spec(bundle, args or ["sh", "-c", "echo hello"], terminal=terminal, host_pid=host_pid,
                annotations=annotations, memory_limit=memory_limit)
    os.mkfifo(bundle / "log", 0o700)
    log_fd = os.open(bundle / "log", os.O_RDWR | os.O_NONBLOCK)  # as containerd: read side held
    if world.in_process:
        flags = launch.parse_flags(["-namespace", world.namespace, "-address", world.address, "-id", task_id,
                                    "start"])
        try:
            address = await asyncio.to_thread(launch.start, flags, bundle=str(bundle), env=world.env,
                                              executable=SHIM, direct=False)
        except BaseException:
            os.close(log_fd)
            raise
    else:
        code, out, err = await _run([SHIM, "-namespace", world.namespace, "-address", world.address,
                                     "-publish-binary", "/bin/true", "-id", task_id, "start"],
                                    cwd=str(bundle), env=world.env)
        if code != 0:
            os.close(log_fd)
            raise AssertionError(f"start failed ({code}): {err.decode(errors='replace')}")
        address = out.decode().strip()
    assert (bundle / "address").read_text() == address
    client = await TtrpcClient.connect(address, timeout=10)
    shim = Shim(world, task_id, bundle, address, client, client.stub(TaskStub, namespace=world.namespace,
                                                                      timeout=30), log_fd)
    world.shims.append(shim)
    return shim


async def finish(shim: Shim, *, delete: bool = True) -> None:
    """Delete the task (when asked), shut the shim down and wait for it to go."""
    pid = shim.pid
    if delete:
        await shim.task.delete(DeleteRequest(id=shim.task_id))
    with contextlib.suppress(errdefs.Unavailable):
        await shim.task.shutdown(ShutdownRequest(id=shim.task_id))
    if pid:
        await _wait_for(lambda: not _alive(pid), 10, "the shim to exit")


def assert_clean(world: Env) -> None:
    leaks = getattr(world, "leaks", None)
    assert leaks == [], leaks


# ---------------------------------------------------------------------------- scenarios

@pytest.mark.parametrize("zygote,in_process", [(True, False), (False, False), (True, True)],
                         ids=["zygote", "exec", "in-process"])
@pytest.mark.root
@needs_runc
async def test_lifecycle_events_output_and_no_leaks(zygote, in_process):
    async with shim_world(zygote=zygote, in_process=in_process) as world:
        shim = await start_shim(world, args=["sh", "-c", "echo out-line; echo err-line >&2; exit 3"])
        connected = await shim.task.connect(ConnectRequest(id=shim.task_id))
        assert connected.shim_pid == shim.pid and connected.task_pid == 0
        # its socket is in our dir, named as containerd names it, and nothing is in containerd's
        name = os.path.basename(launch.socket_path(shim.address))
        assert shim.address == f"unix:///run/pycontainerd/s/{name}"
        assert not os.path.exists(f"/run/containerd/s/{name}")
        assert os.stat("/run/pycontainerd/s").st_mode & 0o777 == 0o711
        # the server looks like a Go shim to ps
        with open(f"/proc/{shim.pid}/cmdline", "rb") as f:
            argv = [a for a in f.read().split(b"\0") if a]
        assert argv[0].endswith(b"containerd-shim-pyrunc-v2")
        assert argv[1:] == [b"-namespace", world.namespace.encode(), b"-id", shim.task_id.encode(),
                            b"-address", world.address.encode()]

        out_path, err_path = shim.fifo("out"), shim.fifo("err")
        out_fd = os.open(out_path, os.O_RDONLY | os.O_NONBLOCK)
        err_fd = os.open(err_path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            created = await shim.task.create(shim.create_request(stdout=out_path, stderr=err_path))
            assert created.pid > 0
            assert json.loads((shim.bundle / "options.json").read_text()) == {"root": str(world.runc_root)}
            state = await shim.task.state(StateRequest(id=shim.task_id))
            assert (state.status, state.pid, state.stdout) == (Status.CREATED, created.pid, out_path)
            assert state.exited_at.year == 1
            started = await shim.task.start(StartRequest(id=shim.task_id))
            assert started.pid == created.pid
            waited = await shim.task.wait(WaitRequest(id=shim.task_id))
            assert waited.exit_status == 3
            state = await shim.task.state(StateRequest(id=shim.task_id))
            assert (state.status, state.exit_status) == (Status.STOPPED, 3)
            deleted = await shim.task.delete(DeleteRequest(id=shim.task_id))
            assert (deleted.pid, deleted.exit_status) == (created.pid, 3)
            assert _drain(out_fd) == b"out-line\n"
            assert _drain(err_fd) == b"err-line\n"
        finally:
            os.close(out_fd)
            os.close(err_fd)
        assert not _mounts_under(str(shim.bundle))
        await finish(shim, delete=False)
        assert not os.path.exists(launch.socket_path(shim.address))
        await world.sink.wait_topic("/tasks/delete")
        assert world.sink.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
        exit_ev = world.sink.of("/tasks/exit")[0]
        assert (exit_ev.container_id, exit_ev.id, exit_ev.pid, exit_ev.exit_status) == \
            (shim.task_id, shim.task_id, created.pid, 3)
        assert {ns for _t, ns, _e in world.sink.events} == {world.namespace}
        create_ev = world.sink.of("/tasks/create")[0]
        assert (create_ev.bundle, create_ev.pid, create_ev.io.stdout) == (str(shim.bundle), created.pid, out_path)
    assert_clean(world)


@pytest.mark.root
@needs_runc
async def test_in_process_start_without_a_zygote_leaves_nothing():
    """The daemon's in-process `start` takes a zygote or nothing (its working directory is not
    the bundle): with the zygote disabled it refuses, without a socket or address left."""
    async with shim_world(zygote=False, in_process=True) as world:
        task_id = "nozygote"
        bundle = world.bundle_dir(task_id)
        bundle.mkdir(parents=True)
        _write_spec(bundle, ["true"])
        flags = launch.parse_flags(["-namespace", world.namespace, "-address", world.address, "-id", task_id,
                                    "start"])
        with pytest.raises(launch.ZygoteUnavailable, match="disabled"):
            await asyncio.to_thread(launch.start, flags, bundle=str(bundle), env=world.env, executable=SHIM,
                                    direct=False)
        address = launch.socket_address(world.address, world.namespace, task_id)
        assert not os.path.exists(launch.socket_path(address))
        assert not (bundle / "address").exists()
        assert not _processes_mentioning(f"-id\0{task_id}\0")
    assert_clean(world)


@pytest.mark.root
@needs_runc
async def test_container_killed_with_sigkill_reports_137():
    async with shim_world() as world:
        shim = await start_shim(world, args=["sleep", "300"])
        created = await shim.task.create(shim.create_request())
        await shim.task.start(StartRequest(id=shim.task_id))
        os.kill(created.pid, signal.SIGKILL)  # from outside, behind the shim's back
        waited = await shim.task.wait(WaitRequest(id=shim.task_id))
        assert waited.exit_status == 137
        exit_ev = (await world.sink.wait_topic("/tasks/exit"))[0]
        assert (exit_ev.pid, exit_ev.exit_status) == (created.pid, 137)
        with pytest.raises(errdefs.NotFound, match="process already finished"):
            await shim.task.kill(KillRequest(id=shim.task_id, signal=signal.SIGTERM))
        await finish(shim)
    assert_clean(world)


@pytest.mark.root
@needs_runc
async def test_execs_that_exit_at_once_are_all_reported():
    """`true` exits before `runc exec --detach` returns and the pid file is read: the exit must
    still be matched to its exec, after its exec-started event."""
    async with shim_world() as world:
        shim = await start_shim(world, args=["sleep", "300"])
        await shim.task.create(shim.create_request())
        await shim.task.start(StartRequest(id=shim.task_id))
        spec = json.loads((shim.bundle / "config.json").read_text())["process"]
        n = 12
        for i in range(n):
            spec["args"] = ["sh", "-c", f"exit {i}"]
            await shim.task.exec(ExecProcessRequest(id=shim.task_id, exec_id=f"e{i}",
                                                    spec=ProtoAny(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                                                                  value=json.dumps(spec).encode())))
        starts = await asyncio.gather(*(shim.task.start(StartRequest(id=shim.task_id, exec_id=f"e{i}"))
                                        for i in range(n)))
        waits = await asyncio.gather(*(shim.task.wait(WaitRequest(id=shim.task_id, exec_id=f"e{i}"))
                                       for i in range(n)))
        assert [w.exit_status for w in waits] == list(range(n))
        exits = {ev.id: ev for ev in await world.sink.wait_topic("/tasks/exit", n)}
        for i in range(n):
            assert (exits[f"e{i}"].pid, exits[f"e{i}"].exit_status) == (starts[i].pid, i)
        topics = [(t, getattr(ev, "exec_id", None) or getattr(ev, "id", None)) for t, _ns, ev in world.sink.events]
        for i in range(n):
            assert topics.index(("/tasks/exec-started", f"e{i}")) < topics.index(("/tasks/exit", f"e{i}"))
        with pytest.raises(errdefs.AlreadyExists, match="id e0"):
            await shim.task.exec(ExecProcessRequest(id=shim.task_id, exec_id="e0",
                                                    spec=ProtoAny(type_url="x", value=json.dumps(spec).encode())))
        for i in range(n):
            await shim.task.delete(DeleteRequest(id=shim.task_id, exec_id=f"e{i}"))
        with pytest.raises(errdefs.NotFound, match="process does not exist e0"):
            await shim.task.state(StateRequest(id=shim.task_id, exec_id="e0"))
        await shim.task.kill(KillRequest(id=shim.task_id, signal=signal.SIGKILL))
        await shim.task.wait(WaitRequest(id=shim.task_id))
        await finish(shim)
    assert_clean(world)


@pytest.mark.root
@needs_runc
async def test_stdin_until_closeio():
    async with shim_world() as world:
        shim = await start_shim(world, args=["cat"])
        in_path, out_path = shim.fifo("in"), shim.fifo("out")
        out_fd = os.open(out_path, os.O_RDONLY | os.O_NONBLOCK)
        in_r = os.open(in_path, os.O_RDONLY | os.O_NONBLOCK)  # lets us open the write side now
        in_fd = os.open(in_path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(in_r)
        try:
            await shim.task.create(shim.create_request(stdin=in_path, stdout=out_path))
            await shim.task.start(StartRequest(id=shim.task_id))
            os.write(in_fd, b"line one\n")
            await _wait_for(lambda: _peek(out_fd, b"line one\n"), 10, "cat to echo the line")
            os.close(in_fd)  # the client's side closed ...
            in_fd = -1
            await asyncio.sleep(0.3)
            state = await shim.task.state(StateRequest(id=shim.task_id))
            assert state.status == Status.RUNNING  # ... but the shim holds stdin open until CloseIO
            await shim.task.close_io(CloseIoRequest(id=shim.task_id, stdin=True))
            waited = await asyncio.wait_for(shim.task.wait(WaitRequest(id=shim.task_id)), 10)
            assert waited.exit_status == 0
        finally:
            if in_fd >= 0:
                os.close(in_fd)
            os.close(out_fd)
        await finish(shim)
    assert_clean(world)


_peeked: dict[int, bytes] = {}


def _peek(fd: int, want: bytes) -> bool:
    _peeked[fd] = _peeked.get(fd, b"") + _drain(fd)
    return want in _peeked[fd]


@pytest.mark.root
@needs_runc
async def test_terminal_console_copy_and_resize():
    async with shim_world() as world:
        shim = await start_shim(world, args=["sh", "-c", "tty; read line; echo got:$line; exit 4"], terminal=True)
        in_path, out_path = shim.fifo("in"), shim.fifo("out")
        out_fd = os.open(out_path, os.O_RDONLY | os.O_NONBLOCK)
        in_r = os.open(in_path, os.O_RDONLY | os.O_NONBLOCK)
        in_fd = os.open(in_path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(in_r)
        try:
            await shim.task.create(shim.create_request(stdin=in_path, stdout=out_path, terminal=True))
            await shim.task.resize_pty(ResizePtyRequest(id=shim.task_id, width=100, height=40))
            await shim.task.start(StartRequest(id=shim.task_id))
            await _wait_for(lambda: _peek(out_fd, b"/dev/pts/0"), 10, "the tty name")
            os.write(in_fd, b"typed\n")
            waited = await asyncio.wait_for(shim.task.wait(WaitRequest(id=shim.task_id)), 10)
            assert waited.exit_status == 4
            await _wait_for(lambda: _peek(out_fd, b"got:typed"), 10, "the echoed line")
        finally:
            os.close(in_fd)
            os.close(out_fd)
        await finish(shim)
    assert_clean(world)


@pytest.mark.root
@needs_runc
async def test_pause_resume_pids_stats_update():
    async with shim_world() as world:
        shim = await start_shim(world, args=["sleep", "300"])
        created = await shim.task.create(shim.create_request())
        await shim.task.start(StartRequest(id=shim.task_id))
        spec = json.loads((shim.bundle / "config.json").read_text())["process"]
        spec["args"] = ["sleep", "300"]
        await shim.task.exec(ExecProcessRequest(id=shim.task_id, exec_id="sleeper",
                                                spec=ProtoAny(type_url="x", value=json.dumps(spec).encode())))
        exec_pid = (await shim.task.start(StartRequest(id=shim.task_id, exec_id="sleeper"))).pid
        pids = (await shim.task.pids(PidsRequest(id=shim.task_id))).processes
        assert {p.pid for p in pids} == {created.pid, exec_pid}
        info = [p for p in pids if p.pid == exec_pid][0].info
        assert info.type_url == "containerd.runc.v1.ProcessDetails"
        assert ProcessDetails().parse(info.value).exec_id == "sleeper"

        await shim.task.pause(PauseRequest(id=shim.task_id))
        assert (await shim.task.state(StateRequest(id=shim.task_id))).status == Status.PAUSED
        assert (await shim.task.state(StateRequest(id=shim.task_id, exec_id="sleeper"))).status == Status.PAUSED
        with pytest.raises(errdefs.Unknown, match="cannot pause a paused container"):
            await shim.task.pause(PauseRequest(id=shim.task_id))
        await shim.task.resume(ResumeRequest(id=shim.task_id))
        assert (await shim.task.state(StateRequest(id=shim.task_id))).status == Status.RUNNING

        stats = (await shim.task.stats(StatsRequest(id=shim.task_id))).stats
        assert stats.type_url in ("io.containerd.cgroups.v1.Metrics", "io.containerd.cgroups.v2.Metrics")
        assert stats.value
        resources = {"pids": {"limit": 77}}
        await shim.task.update(UpdateTaskRequest(id=shim.task_id, resources=ProtoAny(
            type_url="opencontainers/runtime-spec/1/LinuxResources", value=json.dumps(resources).encode())))
        if stats.type_url.endswith("v1.Metrics"):
            cgroup = [line.split(":", 2)[2] for line in Path(f"/proc/{created.pid}/cgroup").read_text().splitlines()
                      if ":pids:" in line]
            if cgroup:
                assert Path(f"/sys/fs/cgroup/pids{cgroup[0]}/pids.max").read_text().strip() == "77"

        with pytest.raises(errdefs.Unknown, match="cannot delete a running process"):
            await shim.task.delete(DeleteRequest(id=shim.task_id))
        await shim.task.kill(KillRequest(id=shim.task_id, signal=signal.SIGKILL, all=True))
        await shim.task.wait(WaitRequest(id=shim.task_id))
        await shim.task.wait(WaitRequest(id=shim.task_id, exec_id="sleeper"))
        await shim.task.delete(DeleteRequest(id=shim.task_id, exec_id="sleeper"))
        await finish(shim)
        topics = world.sink.topics()
        assert topics.index("/tasks/paused") < topics.index("/tasks/resumed")
    assert_clean(world)


@pytest.mark.root
@needs_runc
async def test_oom_kill_is_published():
    async with shim_world() as world:
        shim = await start_shim(world, args=["tail", "/dev/zero"], memory_limit=24 << 20)
        await shim.task.create(shim.create_request())
        await shim.task.start(StartRequest(id=shim.task_id))
        waited = await asyncio.wait_for(shim.task.wait(WaitRequest(id=shim.task_id)), 60)
        assert waited.exit_status == 137
        oom = await world.sink.wait_topic("/tasks/oom")
        assert oom[0].container_id == shim.task_id
        topics = world.sink.topics()
        assert topics.index("/tasks/start") < topics.index("/tasks/oom")
        await finish(shim)
    assert_clean(world)


@pytest.mark.root
@needs_runc
async def test_shared_pid_namespace_kills_the_rest_on_exit():
    async with shim_world() as world:
        marker = str(3000 + uuid.uuid4().int % 1000)  # a sleep nobody else runs
        shim = await start_shim(world, args=["sh", "-c", f"sleep {marker} & sleep 0.3; exit 0"], host_pid=True)
        created = await shim.task.create(shim.create_request())
        await shim.task.start(StartRequest(id=shim.task_id))
        await shim.task.wait(WaitRequest(id=shim.task_id))
        await asyncio.sleep(0.5)
        left = [p for p in _processes_mentioning(f"sleep\0{marker}\0") if p != created.pid]
        assert left == [], "the container's background process survived its init"
        await finish(shim)
    assert_clean(world)


@pytest.mark.root
@needs_runc
async def test_file_and_binary_log_uris():
    async with shim_world() as world:
        log_file = world.root / "logs" / "c.log"
        shim = await start_shim(world, args=["sh", "-c", "echo to-out; echo to-err >&2"])
        await shim.task.create(shim.create_request(stdout=f"file://{log_file}", stderr=f"file://{log_file}"))
        await shim.task.start(StartRequest(id=shim.task_id))
        await shim.task.wait(WaitRequest(id=shim.task_id))
        await finish(shim)
        assert sorted(log_file.read_text().split()) == ["to-err", "to-out"]

        logger = world.root / "logger.sh"
        record = world.root / "binary.log"
        logger.write_text(f"#!/bin/sh\necho \"$CONTAINER_ID $CONTAINER_NAMESPACE $*\" > {record}\n"
                          f"exec 5>&-\ncat <&3 >> {record}.out &\ncat <&4 >> {record}.err\nwait\n")
        logger.chmod(0o755)
        shim2 = await start_shim(world, args=["sh", "-c", "echo bin-out; echo bin-err >&2"])
        uri = f"binary://{logger}?opt=val"
        await shim2.task.create(shim2.create_request(stdout=uri, stderr=uri))
        await shim2.task.start(StartRequest(id=shim2.task_id))
        await shim2.task.wait(WaitRequest(id=shim2.task_id))
        await _wait_for(lambda: Path(f"{record}.out").exists() and Path(f"{record}.out").read_text(), 10,
                        "the logger's copy")
        await finish(shim2)
        assert record.read_text().split() == [shim2.task_id, world.namespace, "opt", "val"]
        assert Path(f"{record}.out").read_text() == "bin-out\n"
        assert Path(f"{record}.err").read_text() == "bin-err\n"
        assert not _processes_mentioning(str(logger)), "the logging binary outlived the task"
    assert_clean(world)


@pytest.mark.root
@needs_runc
async def test_grouped_containers_share_one_shim():
    async with shim_world() as world:
        group = {"io.containerd.runc.v2.group": "pod-1"}
        a = await start_shim(world, args=["sleep", "300"], annotations=group)
        b = await start_shim(world, args=["sh", "-c", "exit 9"], annotations=group)
        assert a.address == b.address
        assert a.pid == (await b.task.connect(ConnectRequest(id=b.task_id))).shim_pid
        await a.task.create(a.create_request())
        await b.task.create(b.create_request())
        await a.task.start(StartRequest(id=a.task_id))
        await b.task.start(StartRequest(id=b.task_id))
        assert (await b.task.wait(WaitRequest(id=b.task_id))).exit_status == 9
        await b.task.delete(DeleteRequest(id=b.task_id))
        pid = a.pid
        await b.task.shutdown(ShutdownRequest(id=b.task_id))  # a's container still runs: no-op
        await asyncio.sleep(0.3)
        assert _alive(pid)
        await a.task.kill(KillRequest(id=a.task_id, signal=signal.SIGKILL))
        await a.task.wait(WaitRequest(id=a.task_id))
        await finish(a)
        assert [getattr(e, "container_id") for t, _n, e in world.sink.events if t == "/tasks/delete"] == \
            [b.task_id, a.task_id]
    assert_clean(world)


@pytest.mark.root
@needs_runc
async def test_namespace_wide_server_outlives_its_first_bundle():
    """PYRUNC_SHIM_GROUP=namespace: one server for every container of the namespace; it moves its
    log off the first bundle when that one goes, and only the last Shutdown ends it."""
    async with shim_world() as world:
        world.env["PYRUNC_SHIM_GROUP"] = "namespace"
        world.env["PYRUNC_SHIM_LINGER"] = "6"
        first = await start_shim(world, args=["sh", "-c", "exit 1"])
        second = await start_shim(world, args=["sleep", "300"])
        assert first.address == second.address == launch.socket_address(world.address, world.namespace,
                                                                         launch.shared_group(0))
        server_pid = first.pid
        await first.task.create(first.create_request())
        await second.task.create(second.create_request())
        await first.task.start(StartRequest(id=first.task_id))
        await second.task.start(StartRequest(id=second.task_id))
        await first.task.wait(WaitRequest(id=first.task_id))
        await first.task.delete(DeleteRequest(id=first.task_id))
        await first.task.shutdown(ShutdownRequest(id=first.task_id))
        await first.client.close()
        os.close(first.log_fd)  # containerd stops reading that log and removes the bundle
        first.log_fd = os.open(os.devnull, os.O_RDONLY)
        shutil.rmtree(first.bundle)
        assert _alive(server_pid)
        with open(f"/proc/{server_pid}/fd/2", "rb", buffering=0):
            assert os.readlink(f"/proc/{server_pid}/fd/2") == str(second.bundle / "log")
        # a third container comes and goes while the second still runs
        third = await start_shim(world, args=["sh", "-c", "exit 0"])
        assert third.address == second.address
        await third.task.create(third.create_request())
        await third.task.start(StartRequest(id=third.task_id))
        await third.task.wait(WaitRequest(id=third.task_id))
        await finish(third)
        assert _alive(server_pid)
        await second.task.kill(KillRequest(id=second.task_id, signal=signal.SIGKILL))
        await second.task.wait(WaitRequest(id=second.task_id))
        await finish(second)
        # the last Shutdown: the server lingers, and a container coming meanwhile gets it
        await asyncio.sleep(0.5)
        assert _alive(server_pid)
        fourth = await start_shim(world, args=["sh", "-c", "exit 0"])
        assert fourth.address == second.address
        await fourth.task.create(fourth.create_request())
        await fourth.task.start(StartRequest(id=fourth.task_id))
        await fourth.task.wait(WaitRequest(id=fourth.task_id))
        await finish(fourth)
        assert _alive(server_pid)
        await _wait_for(lambda: not _alive(server_pid), 10, "the server to exit once it lingered")
        assert not os.path.exists(launch.socket_path(second.address))
    assert_clean(world)


@pytest.mark.root
@needs_runc
async def test_grouped_servers_take_a_bounded_number_of_containers():
    """PYRUNC_SHIM_GROUP_SIZE=2: a third container gets the server of the next slot; a place
    promised by Connect counts (no over-commit), and a place freed is taken again."""
    async with shim_world() as world:
        world.env.update(PYRUNC_SHIM_GROUP="namespace", PYRUNC_SHIM_GROUP_SIZE="2", PYRUNC_SHIM_LINGER="0")

        def slot(n: int) -> str:
            return launch.socket_address(world.address, world.namespace, launch.shared_group(n))

        async def server_pid(shim: Shim) -> int:
            return (await shim.task.connect(ConnectRequest(id=shim.task_id))).shim_pid

        a, b, c = [await start_shim(world, args=["sleep", "300"]) for _ in range(3)]
        assert (a.address, b.address, c.address) == (slot(0), slot(0), slot(1))
        first, second = await server_pid(a), await server_pid(c)
        assert first == await server_pid(b) and first != second
        for shim in (a, b, c):
            await shim.task.create(shim.create_request())
            await shim.task.start(StartRequest(id=shim.task_id))
        # b goes: its place in the first server is free again
        await b.task.kill(KillRequest(id=b.task_id, signal=signal.SIGKILL))
        await b.task.wait(WaitRequest(id=b.task_id))
        await b.task.delete(DeleteRequest(id=b.task_id))
        await b.task.shutdown(ShutdownRequest(id=b.task_id))  # a is still served: no exit
        d = await start_shim(world, args=["sh", "-c", "exit 4"])  # promised the free place
        e = await start_shim(world, args=["sh", "-c", "exit 5"])  # so the second server gets it
        assert (d.address, e.address) == (slot(0), slot(1))
        assert (await server_pid(d), await server_pid(e)) == (first, second)
        for shim, code in ((d, 4), (e, 5)):
            await shim.task.create(shim.create_request())
            await shim.task.start(StartRequest(id=shim.task_id))
            assert (await shim.task.wait(WaitRequest(id=shim.task_id))).exit_status == code
        for shim in (a, c):
            await shim.task.kill(KillRequest(id=shim.task_id, signal=signal.SIGKILL))
            await shim.task.wait(WaitRequest(id=shim.task_id))
        for shim in (a, c, d, e):
            await shim.task.delete(DeleteRequest(id=shim.task_id))
            with contextlib.suppress(errdefs.Unavailable):
                await shim.task.shutdown(ShutdownRequest(id=shim.task_id))
        await _wait_for(lambda: not _alive(first) and not _alive(second), 10, "both servers to exit")
        assert not os.path.exists(launch.socket_path(slot(0))) and not os.path.exists(launch.socket_path(slot(1)))
    assert_clean(world)


@pytest.mark.root
@needs_runc
async def test_delete_action_cleans_up_after_a_killed_shim():
    async with shim_world() as world:
        shim = await start_shim(world, args=["sleep", "300"])
        created = await shim.task.create(shim.create_request())
        await shim.task.start(StartRequest(id=shim.task_id))
        rootfs = str(shim.bundle / "rootfs")
        assert _mounts_under(rootfs)
        os.kill(shim.pid, signal.SIGKILL)
        await asyncio.wait_for(shim.client.wait_closed(), 10)
        code, out, err = await _run([SHIM, "-namespace", world.namespace, "-address", world.address,
                                     "-publish-binary", "/bin/true", "-id", shim.task_id, "-bundle", str(shim.bundle),
                                     "delete"], cwd=str(shim.bundle), env=world.env)
        assert code == 0, err
        resp = DeleteResponse().parse(out)
        assert (resp.pid, resp.exit_status) == (created.pid, 137)
        assert abs(resp.exited_at.timestamp() - time.time()) < 60
        await _wait_for(lambda: not _alive(created.pid), 10, "the container to be killed")
        assert not _mounts_under(rootfs)
        assert not (world.runc_root / world.namespace / shim.task_id).exists()
        assert not os.path.exists(launch.socket_path(shim.address))
        shutil.rmtree(shim.bundle)  # containerd removes the bundle after the action
    assert_clean(world)


@pytest.mark.root
@needs_runc
async def test_events_wait_for_a_daemon_that_is_away():
    async with shim_world(events=False) as world:
        shim = await start_shim(world, args=["sh", "-c", "exit 0"])
        await shim.task.create(shim.create_request())
        await shim.task.start(StartRequest(id=shim.task_id))
        await shim.task.wait(WaitRequest(id=shim.task_id))
        await asyncio.sleep(0.5)
        await world.start_events()  # the daemon comes (back)
        await world.sink.wait_topic("/tasks/exit", timeout=15)
        await world.server.close(grace=1)  # and goes again (a restart): the shim reconnects
        await asyncio.sleep(0.3)
        await shim.task.delete(DeleteRequest(id=shim.task_id))
        await asyncio.sleep(0.5)
        await world.start_events()
        await world.sink.wait_topic("/tasks/delete", timeout=15)
        await finish(shim, delete=False)
        assert world.sink.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    assert_clean(world)


@pytest.mark.root
@needs_runc
async def test_errors_keep_containerds_wording():
    async with shim_world() as world:
        shim = await start_shim(world, args=["/no/such/binary"])
        with pytest.raises(errdefs.NotFound, match="container not created"):
            await shim.task.state(StateRequest(id=shim.task_id))
        with pytest.raises(errdefs.Unknown, match="OCI runtime create failed"):
            await shim.task.create(shim.create_request())
        assert not _mounts_under(str(shim.bundle)), "a failed create must unmount the rootfs"
        request = shim.create_request()
        request.options = ProtoAny(type_url="containerd.runc.v1.Options",
                                   value=bytes(Options(root=str(world.runc_root), binary_name="/no/such/runc")))
        with pytest.raises(errdefs.Unknown, match='OCI runtime create failed: exec: "/no/such/runc"'):
            await shim.task.create(request)
        with pytest.raises(errdefs.Unimplemented):
            await shim.client.call("containerd.task.v2.Task", "NoSuchMethod", b"", None)
        await finish(shim, delete=False)
        assert world.sink.events == []
    assert_clean(world)


@pytest.mark.root
@needs_runc
async def test_a_shim_nobody_calls_does_not_linger():
    async with shim_world() as world:
        world.env["PYRUNC_ORPHAN_TIMEOUT"] = "1.5"
        shim = await start_shim(world)
        pid = shim.pid
        await shim.client.close()
        await _wait_for(lambda: not _alive(pid), 10, "the uncalled shim to exit")
        assert not os.path.exists(launch.socket_path(shim.address))
        # the zygote names the daemon it serves
        zygotes = [p for p in _processes_mentioning("zygote") if p in _processes_mentioning(str(world.root))]
        assert len(zygotes) == 1
        with open(f"/proc/{zygotes[0]}/cmdline", "rb") as f:
            assert world.address.encode() in f.read().split(b"\0")
    assert_clean(world)


@pytest.mark.root
@needs_runc
async def test_shim_sigterm_exits_and_removes_socket():
    async with shim_world() as world:
        shim = await start_shim(world)
        pid = shim.pid
        assert pid > 0, "the shim's process was not found"  # os.kill(0) would signal our own group
        os.kill(pid, signal.SIGTERM)
        await _wait_for(lambda: not _alive(pid), 10, "the shim to exit on SIGTERM")
        assert not os.path.exists(launch.socket_path(shim.address))
    assert_clean(world)

