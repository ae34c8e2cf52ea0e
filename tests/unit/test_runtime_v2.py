"""runtime/v2 without root: runtime name -> shim binary, the start output, bundles on disk, error
wrapping, and the task manager driving a fake shim (a Python script speaking the shim protocol:
`start` forks a ttrpc Task server and prints its address, `delete` prints a DeleteResponse) —
create, failed create, delete, a shim dying, reconnecting after a restart, and shutdown leaving
shims running.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from pycontainerd.api.gen.containerd.types import Mount
from pycontainerd.api.gen.containerd.v1.types import Status
from pycontainerd.core import errdefs
from pycontainerd.core.events import Exchange
from pycontainerd.plugins.runtime import IO, CreateOpts
from pycontainerd.plugins.runtime.v2 import binary as binmod
from pycontainerd.plugins.runtime.v2 import manager as managermod
from pycontainerd.plugins.runtime.v2.binary import RuntimeResolver, binary_name, parse_start_output
from pycontainerd.plugins.runtime.v2.bundle import load_bundle, new_bundle
from pycontainerd.plugins.runtime.v2.manager import TaskManager
from pycontainerd.plugins.runtime.v2.shim import wrap


# ----------------------------------------------------------------------------- names and paths

@pytest.mark.parametrize("runtime,name", [
    ("io.containerd.runc.v2", "containerd-shim-runc-v2"),
    ("io.containerd.pyrunc.v2", "containerd-shim-pyrunc-v2"),
    ("io.containerd.runc.v1", "containerd-shim-runc-v1"),
    ("runc.v2", "containerd-shim-runc-v2"),
    ("nodots", ""),
    ("", ""),
])
def test_binary_name(runtime, name):
    assert binary_name(runtime) == name


def _executable(path: Path, text: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_resolver(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = _executable(bindir / "containerd-shim-fake-v9")
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    resolver = RuntimeResolver({"io.example.mine.v1": str(shim)})
    assert resolver.resolve("io.containerd.fake.v9") == str(shim)           # on PATH
    assert resolver.resolve(str(shim)) == str(shim)                         # an absolute path
    assert resolver.resolve("io.example.mine.v1") == str(shim)              # configured
    with pytest.raises(errdefs.Unknown) as info:
        resolver.resolve("io.containerd.absent.v1")
    assert str(info.value) == ('runtime "io.containerd.absent.v1" binary not installed '
                               '"containerd-shim-absent-v1": file does not exist: unknown')
    with pytest.raises(errdefs.Unknown) as info:
        resolver.resolve("nodots")
    assert str(info.value).startswith("invalid runtime name nodots, correct runtime name should be")
    with pytest.raises(errdefs.Unknown, match="invalid custom binary path"):
        resolver.resolve(str(tmp_path / "missing"))
    with pytest.raises(errdefs.Unknown, match="no runtime name"):
        resolver.resolve("")


def test_resolver_finds_shims_next_to_the_daemon(tmp_path, monkeypatch):
    """The venv's bin/ (where pycontainerd and containerd-shim-pyrunc-v2 are installed) counts."""
    shim = _executable(tmp_path / "containerd-shim-sidebyside-v2")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "pycontainerd")])
    assert RuntimeResolver().resolve("io.containerd.sidebyside.v2") == str(shim)


def test_parse_start_output():
    assert parse_start_output("unix:///run/containerd/s/abc") == "unix:///run/containerd/s/abc"
    boot = json.dumps({"version": 2, "address": "unix:///run/x", "protocol": "ttrpc"})
    assert parse_start_output(boot) == "unix:///run/x"
    with pytest.raises(errdefs.Unimplemented):
        parse_start_output(json.dumps({"version": 3, "address": "x", "protocol": "grpc"}))
    with pytest.raises(errdefs.Unknown):
        parse_start_output("")


def test_wrap_keeps_the_class_and_moves_the_suffix():
    err = wrap(errdefs.NotFound("process already finished: not found"), "failed to delete task")
    assert type(err) is errdefs.NotFound
    assert str(err) == "failed to delete task: process already finished: not found"
    err = wrap(errdefs.Unknown("OCI runtime create failed: boom: unknown"), "failed to create shim task")
    assert str(err) == "failed to create shim task: OCI runtime create failed: boom: unknown"
    assert str(wrap(ValueError("x"), "p")) == "p: x: unknown"


# ----------------------------------------------------------------------------- bundles

def test_bundle_layout_and_delete(tmp_path):
    root, state = tmp_path / "root", tmp_path / "state"
    spec = json.dumps({"ociVersion": "1.0.2", "root": {"path": "rootfs"}}).encode()
    b = new_bundle(root, state, "ns1", "task1", spec)
    assert b.path == state / "ns1" / "task1"
    assert stat.S_IMODE(b.path.stat().st_mode) == 0o700
    assert (b.path / "config.json").read_bytes() == spec
    assert (b.path / "rootfs").is_dir()
    assert os.readlink(b.path / "work") == str(root / "ns1" / "task1")
    assert (root / "ns1" / "task1").is_dir()
    with pytest.raises(errdefs.AlreadyExists):
        new_bundle(root, state, "ns1", "task1", spec)
    with pytest.raises(errdefs.InvalidArgument, match="invalid task id ../x"):
        new_bundle(root, state, "ns1", "../x", spec)
    (b.path / "address").write_text("unix:///nowhere")
    load_bundle(state, "ns1", "task1").delete()
    assert not b.path.exists() and not (root / "ns1" / "task1").exists()
    assert os.listdir(state / "ns1") == [] and os.listdir(root / "ns1") == []
    load_bundle(state, "ns1", "task1").delete()  # twice is fine


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another group needs root")
def test_bundle_userns_group(tmp_path):
    spec = json.dumps({"linux": {"gidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}]}})
    b = new_bundle(tmp_path / "r", tmp_path / "s", "ns", "t", spec.encode())
    st = b.path.stat()
    assert st.st_gid == 100000 and stat.S_IMODE(st.st_mode) == 0o710


# ----------------------------------------------------------------------------- a fake shim

FAKE_SHIM = textwrap.dedent('''\
    #!{python}
    """A stand-in for containerd-shim-*-v2: enough of the protocol for the manager's tests."""
    import asyncio, datetime, json, os, subprocess, sys, time
    from pathlib import Path

    args = sys.argv[1:]
    flags = {{}}
    while args and args[0].startswith("-"):
        key = args.pop(0).lstrip("-")
        flags[key] = "" if key == "debug" else args.pop(0)
    action = args[0] if args else ""
    record = Path(os.environ["FAKE_SHIM_RECORD"])

    def note(**what):
        with open(record, "a") as f:
            f.write(json.dumps(what) + "\\n")

    if action == "start":
        opts = sys.stdin.buffer.read()
        sock = str(Path(os.environ["FAKE_SHIM_SOCKETS"]) / flags["id"])
        note(action="start", flags=flags, cwd=os.getcwd(), stdin=opts.hex(), ttrpc=os.environ.get("TTRPC_ADDRESS"),
             ns_env=os.environ.get("NAMESPACE"), grpc=os.environ.get("GRPC_ADDRESS"))
        subprocess.Popen([sys.executable, __file__, "-id", flags["id"], "serve", sock], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            if os.path.exists(sock) or os.environ.get("FAKE_SHIM_PRINTS_EARLY"):
                break
            time.sleep(0.05)
        Path("address").write_text("unix://" + sock)
        sys.stdout.write("unix://" + sock)
        sys.exit(0)

    if action == "delete":
        from pycontainerd.api.gen.containerd.task.v2 import DeleteResponse
        note(action="delete", flags=flags, cwd=os.getcwd())
        if os.environ.get("FAKE_SHIM_DELETE_FAILS"):
            sys.stderr.write("delete went wrong")
            sys.exit(1)
        sys.stdout.buffer.write(bytes(DeleteResponse(pid=4242, exit_status=137,
                                                     exited_at=datetime.datetime.now(datetime.timezone.utc))))
        sys.exit(0)

    if action == "serve":
        from betterproto.lib.google.protobuf import Empty
        from pycontainerd.api.gen.containerd.task import v2 as api
        from pycontainerd.core import errdefs
        from pycontainerd.core.ttrpc import TtrpcServer
        sock = args[1]

        class Task(api.TaskBase):
            def __init__(self):
                self.tasks, self.done = {{}}, asyncio.Event()

            async def connect(self, r):
                return api.ConnectResponse(shim_pid=os.getpid(), task_pid=self.tasks.get(r.id, {{}}).get("pid", 0))

            async def create(self, r):
                note(action="create", id=r.id, bundle=r.bundle, rootfs=[m.to_dict() for m in r.rootfs],
                     stdout=r.stdout, options=r.options.type_url)
                if os.environ.get("FAKE_SHIM_CREATE_FAILS"):
                    raise errdefs.Unknown("OCI runtime create failed: no such thing")
                self.tasks[r.id] = {{"pid": 4242, "status": 1}}
                return api.CreateTaskResponse(pid=4242)

            async def state(self, r):
                t = self.tasks.get(r.id)
                if t is None or r.exec_id:
                    raise errdefs.NotFound("process does not exist " + (r.exec_id or r.id))
                return api.StateResponse(id=r.id, pid=t["pid"], status=t["status"], exit_status=t.get("exit", 0))

            async def start(self, r):
                self.tasks[r.id]["status"] = 2
                return api.StartResponse(pid=4242)

            async def kill(self, r):
                t = self.tasks[r.id]
                if t["status"] == 3:
                    raise errdefs.NotFound("process already finished")
                t["status"], t["exit"] = 3, 128 + r.signal
                return Empty()

            async def delete(self, r):
                t = self.tasks.pop(r.id, None)
                if t is None:
                    raise errdefs.NotFound("container not created")
                note(action="task-delete", id=r.id)
                return api.DeleteResponse(pid=t["pid"], exit_status=t.get("exit", 0),
                                          exited_at=datetime.datetime(2020, 1, 2, tzinfo=datetime.timezone.utc))

            async def shutdown(self, r):
                note(action="shutdown", id=r.id, refused=bool(self.tasks))
                if not self.tasks:
                    asyncio.get_running_loop().call_later(0.05, self.done.set)
                return Empty()

        async def main():
            svc = Task()
            server = TtrpcServer()
            server.register_betterproto(svc)
            await server.start_unix(sock, mode=0o600)
            await svc.done.wait()
            await server.close(grace=0.2)
        asyncio.run(main())
''')


class Fake:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.binary = tmp / "containerd-shim-fake-v2"
        self.binary.write_text(FAKE_SHIM.format(python=sys.executable))
        self.binary.chmod(0o755)
        self.sockets = tmp / "socks"
        self.sockets.mkdir()
        self.record = tmp / "record.jsonl"
        self.record.touch()
        self.env = {"FAKE_SHIM_RECORD": str(self.record), "FAKE_SHIM_SOCKETS": str(self.sockets)}

    def notes(self, action: str | None = None) -> list[dict]:
        lines = [json.loads(line) for line in self.record.read_text().splitlines() if line]
        return [n for n in lines if action is None or n["action"] == action]

    def serving_pids(self) -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    argv = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
                except OSError:
                    continue
                if str(self.binary).encode() in argv and b"serve" in argv:
                    found.append(int(entry))
        return found

    def kill_all(self) -> None:
        for pid in self.serving_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def fake(tmp_path, monkeypatch):
    f = Fake(tmp_path)
    for k, v in f.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
    try:
        yield f
    finally:
        f.kill_all()


def _manager(tmp: Path, events: Exchange, **kw) -> TaskManager:
    # Generous shim timeouts: the fake shim is a Python process whose start-up on a loaded
    # machine takes seconds; no test here waits for a timeout to expire.
    return TaskManager(root=tmp / "root", state=tmp / "state", address=str(tmp / "d.sock"),
                       ttrpc_address=str(tmp / "d.sock.ttrpc"), events=events,
                       timeout=lambda key: 30.0, publish_binary_path="/bin/true", **kw)


async def wait_until(condition, timeout: float = 30.0) -> None:
    """Poll `condition` until it holds or `timeout` passed (the caller asserts it after)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)


def _process_gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _opts(fake: Fake, **kw) -> CreateOpts:
    from betterproto.lib.google.protobuf import Any as ProtoAny

    spec = ProtoAny(type_url="types.containerd.io/opencontainers/runtime-spec/1/Spec", value=b'{"ociVersion":"1.0.2"}')
    return CreateOpts(spec=spec, runtime=str(fake.binary), io=IO(stdout="/dev/null"), **kw)


async def _drain(sub) -> list:
    got = []
    while sub.pending:
        got.append(await sub.get(1))
    return got


async def test_create_and_delete(fake, tmp_path):
    from betterproto.lib.google.protobuf import Any as ProtoAny

    events = Exchange()
    sub = events.subscribe()
    m = _manager(tmp_path, events)
    options = ProtoAny(type_url="containerd.runc.v1.Options", value=b"")
    t = await m.create("ns1", "t1", _opts(fake, task_options=options,
                                         rootfs=[Mount(type="bind", source="/x", target="", options=["rbind"])]))
    start = fake.notes("start")[0]
    bundle = tmp_path / "state" / "ns1" / "t1"
    assert start["flags"] == {"namespace": "ns1", "address": str(tmp_path / "d.sock"), "publish-binary": "/bin/true",
                              "id": "t1"}
    assert start["cwd"] == str(bundle)
    assert start["ttrpc"] == str(tmp_path / "d.sock.ttrpc") and start["ns_env"] == "ns1"
    assert bytes.fromhex(start["stdin"]) == bytes(options)
    create = fake.notes("create")[0]
    assert create["bundle"] == str(bundle) and create["options"] == "containerd.runc.v1.Options"
    assert create["rootfs"] == [{"type": "bind", "source": "/x", "options": ["rbind"]}]
    assert (bundle / "shim-binary-path").read_text() == str(fake.binary)
    assert stat.S_ISFIFO((bundle / "log").stat().st_mode)
    assert await t.pid() == 4242
    assert [x.id for x in m.tasks("ns1")] == ["t1"] and m.tasks("other") == []
    with pytest.raises(errdefs.AlreadyExists):
        await m.create("ns1", "t1", _opts(fake))
    await t.start()
    assert (await t.state()).status == Status.RUNNING
    await t.kill(9)
    with pytest.raises(errdefs.NotFound, match="process already finished"):
        await t.kill(9)
    with pytest.raises(errdefs.NotFound):
        await t.process("nope")
    exit = await m.delete("ns1", "t1")
    assert (exit.pid, exit.status, exit.timestamp.year) == (4242, 137, 2020)
    assert not bundle.exists() and not (tmp_path / "root" / "ns1" / "t1").exists()
    assert fake.notes("shutdown") == [{"action": "shutdown", "id": "t1", "refused": False}]
    assert fake.notes("delete") == []  # a clean delete needs no delete action
    with pytest.raises(errdefs.NotFound):
        m.get("ns1", "t1")
    await wait_until(lambda: not fake.serving_pids())
    assert fake.serving_pids() == []
    assert await _drain(sub) == []  # the shim publishes task events, the manager none
    await m.close()


async def test_a_shim_printing_its_address_early_is_waited_for(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_SHIM_PRINTS_EARLY", "1")
    # the fake's serving process is a fresh Python: on a loaded machine it may take longer to
    # listen than the real grace period, which is not what this test is about
    monkeypatch.setattr(managermod, "NEW_SHIM_GRACE", 60.0)
    m = _manager(tmp_path, Exchange())
    t = await m.create("ns1", "early", _opts(fake))
    assert await t.pid() == 4242
    await m.delete("ns1", "early")
    await m.close()


async def test_failed_create_cleans_up(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_SHIM_CREATE_FAILS", "1")
    m = _manager(tmp_path, Exchange())
    with pytest.raises(errdefs.Unknown) as info:
        await m.create("ns1", "bad", _opts(fake))
    assert str(info.value) == "failed to create shim task: OCI runtime create failed: no such thing: unknown"
    assert m.tasks(None) == []
    assert os.listdir(tmp_path / "state" / "ns1") == []
    assert fake.notes("shutdown")
    await wait_until(lambda: not fake.serving_pids())
    assert fake.serving_pids() == []
    with pytest.raises(errdefs.Unknown, match="failed to start shim: failed to resolve runtime path"):
        await m.create("ns1", "bad2", CreateOpts(spec=_opts(fake).spec, runtime="io.containerd.absent.v7"))
    assert os.listdir(tmp_path / "state" / "ns1") == []
    await m.close()


async def test_dead_shim_is_cleaned_up_and_reported(fake, tmp_path):
    events = Exchange()
    sub = events.subscribe()
    m = _manager(tmp_path, events)
    await m.create("ns1", "doomed", _opts(fake))
    fake.kill_all()
    await wait_until(lambda: not m.tasks(None))
    assert m.tasks(None) == []
    assert fake.notes("delete")[0]["flags"]["bundle"] == str(tmp_path / "state" / "ns1" / "doomed")
    envs = await _drain(sub)
    assert [(e.namespace, e.topic) for e in envs] == [("ns1", "/tasks/exit"), ("ns1", "/tasks/delete")]
    exit = envs[0].decode()
    assert (exit.container_id, exit.id, exit.pid, exit.exit_status) == ("doomed", "doomed", 4242, 137)
    assert not (tmp_path / "state" / "ns1" / "doomed").exists()
    await m.close()


async def test_restart_reconnects_and_cleans_up_the_dead(fake, tmp_path):
    m = _manager(tmp_path, Exchange())
    await m.create("ns1", "alive", _opts(fake))
    await m.create("ns2", "dead", _opts(fake))
    await m.close()  # daemon shutdown: shims keep running
    assert len(fake.serving_pids()) == 2
    (tmp_path / "root" / "ns1" / "orphan-work").mkdir()
    (tmp_path / "state" / "ns1" / ".half-deleted" / "rootfs").mkdir(parents=True)
    dead_pid = int((await _pid_of(tmp_path / "state" / "ns2" / "dead")))
    os.kill(dead_pid, signal.SIGKILL)
    await wait_until(lambda: _process_gone(dead_pid))
    assert _process_gone(dead_pid)

    events = Exchange()
    sub = events.subscribe()
    m2 = _manager(tmp_path, events)
    await m2.load_existing()
    assert [(t.namespace, t.id) for t in m2.tasks(None)] == [("ns1", "alive")]
    assert await m2.get("ns1", "alive").pid() == 4242
    assert not (tmp_path / "state" / "ns2" / "dead").exists()
    assert not (tmp_path / "root" / "ns1" / "orphan-work").exists()
    assert not (tmp_path / "state" / "ns1" / ".half-deleted").exists()
    envs = await _drain(sub)
    assert [(e.namespace, e.topic) for e in envs] == [("ns2", "/tasks/exit"), ("ns2", "/tasks/delete")]
    exit = await m2.delete("ns1", "alive")
    assert exit.pid == 4242
    await m2.close()


async def _pid_of(bundle: Path) -> int:
    from pycontainerd.api.gen.containerd.task.v2 import ConnectRequest, TaskStub
    from pycontainerd.core.ttrpc import TtrpcClient

    client = await TtrpcClient.connect((bundle / "address").read_text(), timeout=5)
    try:
        return (await client.stub(TaskStub, namespace=bundle.parent.name).connect(ConnectRequest(id=bundle.name))).shim_pid
    finally:
        await client.close()


async def test_failed_delete_action_still_removes_the_bundle(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_SHIM_DELETE_FAILS", "1")
    events = Exchange()
    sub = events.subscribe()
    m = _manager(tmp_path, events)
    await m.create("ns1", "t", _opts(fake))
    fake.kill_all()
    await wait_until(lambda: not m.tasks(None))
    envs = await _drain(sub)
    assert [e.topic for e in envs] == ["/tasks/exit", "/tasks/delete"]
    assert envs[0].decode().exit_status == 255
    assert not (tmp_path / "state" / "ns1" / "t").exists()
    await m.close()


def test_publish_binary_is_our_script(monkeypatch, tmp_path):
    script = _executable(tmp_path / "pycontainerd")
    monkeypatch.setattr(sys, "argv", [str(script), "--root", "/x"])
    assert binmod.publish_binary() == str(script)


def test_shim_log_copies_to_stderr(tmp_path, capfd):
    async def go():
        log = binmod.ShimLog(tmp_path / "log")
        fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, b'time="x" level=info msg="hello from the shim"\n')
        os.close(fd)
        for _ in range(50):
            await asyncio.sleep(0.01)
        log.close()

    asyncio.run(go())
    assert "hello from the shim" in capfd.readouterr().err


async def test_stale_socket_removed_only_when_nobody_listens():
    import socket
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="stale-", dir="/tmp"))
    try:
        dead, live = d / "dead", d / "live"
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(dead))
        s.close()  # the file stays, nobody listens: connection refused
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(live))
        server.listen(1)
        await managermod._remove_stale_socket(f"unix://{dead}")
        await managermod._remove_stale_socket(f"unix://{live}")
        assert not dead.exists()
        assert live.exists()
        server.close()
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()
