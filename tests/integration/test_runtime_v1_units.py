"""Runtime v1 pieces without root: the shim's flags, options conversions, the fast `publish`
(checked against our own ttrpc server), the v1 Shim service's errors over a fake TaskService, the
plugin's config and its refusal of `no_shim`."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pytest
from betterproto.lib.google.protobuf import Any as ProtoAny
from betterproto.lib.google.protobuf import Empty

from pycontainerd.api.gen.containerd.events import TaskExit
from pycontainerd.api.gen.containerd.linux.runc import CreateOptions, RuncOptions
from pycontainerd.api.gen.containerd.runc import v1 as runcopts
from pycontainerd.api.gen.containerd.runtime.linux.shim import v1 as shimapi
from pycontainerd.api.gen.containerd.services.events.ttrpc.v1 import ForwardRequest
from pycontainerd.core import errdefs
from pycontainerd.core.events import type_url
from pycontainerd.core.ttrpc import Method, TtrpcServer, request_metadata
from pycontainerd.plugins.runtime import v1 as plugin
from pycontainerd.plugins.runtime.v1 import runtime as v1runtime
from pycontainerd.plugins.runtime.v1.shim import main as shim_main
from pycontainerd.plugins.runtime.v1.shim import publish
from pycontainerd.plugins.runtime.v1.shim import service as shim_service

SHIM = Path(sys.executable).parent / "containerd-shim-pyrunc-v1"


def test_flags_as_go_parses_them():
    f = shim_main.parse_flags(["-namespace", "ns", "-workdir=/w", "--address", "/a.sock", "-containerd-binary",
                               "/bin/x", "-criu-path", "/c", "-systemd-cgroup", "-debug"])
    assert (f.namespace, f.workdir, f.address, f.containerd_binary, f.criu) == ("ns", "/w", "/a.sock", "/bin/x", "/c")
    assert f.systemd_cgroup and f.debug and f.runtime_root == "/run/pycontainerd/runc" and f.args == []
    f = shim_main.parse_flags(["--address", "/a", "publish", "--topic", "/t"])
    assert f.args == ["publish", "--topic", "/t"]
    with pytest.raises(shim_main.FlagError, match="not defined: -bogus"):
        shim_main.parse_flags(["-bogus"])
    with pytest.raises(shim_main.FlagError, match="needs an argument"):
        shim_main.parse_flags(["-namespace"])


def test_shim_without_namespace_refuses():
    p = subprocess.run([str(SHIM)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and "shim namespace cannot be empty" in p.stderr


def test_create_options_become_runc_options():
    config = shim_service.ShimConfig("ns", workdir="/work", runtime_root="/rr", criu="/criu", systemd_cgroup=True)
    create = CreateOptions(no_pivot_root=True, no_new_keyring=True, shim_cgroup="/sc", io_uid=5, io_gid=6)
    req = shimapi.CreateTaskRequest(id="c", runtime="crun",
                                    options=ProtoAny(type_url="containerd.linux.runc.CreateOptions", value=bytes(create)))
    o = shim_service.runc_options(req, config)
    assert (o.no_pivot_root, o.no_new_keyring, o.shim_cgroup, o.io_uid, o.io_gid) == (True, True, "/sc", 5, 6)
    assert (o.binary_name, o.root, o.criu_path, o.systemd_cgroup, o.criu_work_path) == ("crun", "/rr", "/criu", True, "/work")
    assert shim_service.runc_options(shimapi.CreateTaskRequest(id="c"), shim_service.ShimConfig("ns")).binary_name == "runc"
    with pytest.raises(errdefs.InvalidArgument):
        shim_service.runc_options(shimapi.CreateTaskRequest(id="c", options=ProtoAny(type_url="x.Y", value=b"")),
                                  config)


def test_container_runtime_options():
    ro = RuncOptions(runtime="crun", runtime_root="/r", criu_path="/c", systemd_cgroup=True)
    assert v1runtime.runc_options(ProtoAny(type_url="containerd.linux.runc.RuncOptions", value=bytes(ro))) == ro
    v2 = runcopts.Options(binary_name="runc2", root="/root2")
    got = v1runtime.runc_options(ProtoAny(type_url="containerd.runc.v1.Options", value=bytes(v2)))
    assert (got.runtime, got.runtime_root) == ("runc2", "/root2")
    assert v1runtime.runc_options(None) == RuncOptions()
    with pytest.raises(errdefs.Unknown, match="invalid runtime options format"):
        v1runtime.runc_options(ProtoAny(type_url="other.Thing", value=b""))
    assert v1runtime.shim_cgroup(ProtoAny(type_url="containerd.linux.runc.CreateOptions",
                                          value=bytes(CreateOptions(shim_cgroup="/x")))) == "/x"


def test_default_runc_root_is_the_shims_own():
    """Ours keeps runc state under /run/pycontainerd/runc, containerd's Go shim under its own dir."""
    from types import SimpleNamespace

    def root(shim: str) -> str:
        return v1runtime.LinuxRuntime.default_runc_root(SimpleNamespace(config=SimpleNamespace(shim=shim)))

    assert root("containerd-shim-pyrunc-v1") == root("/venv/bin/containerd-shim-pyrunc-v1") == "/run/pycontainerd/runc"
    assert root("containerd-shim") == root("/usr/bin/containerd-shim") == "/run/containerd/runc"
    assert v1runtime.DEFAULT_RUNC_ROOT == shim_main.DEFAULT_RUNTIME_ROOT == "/run/pycontainerd/runc"


def test_resolve_shim():
    assert v1runtime.resolve_shim("containerd-shim-pyrunc-v1").endswith("/containerd-shim-pyrunc-v1")
    with pytest.raises(errdefs.Unknown, match="executable file not found"):
        v1runtime.resolve_shim("no-such-shim-binary")
    with pytest.raises(errdefs.Unknown, match="no such file"):
        v1runtime.resolve_shim("/no/such/shim")


def test_config_defaults():
    c = plugin.Config()
    assert (c.shim, c.runtime, c.runtime_root, c.no_shim, c.shim_debug) == (
        "containerd-shim-pyrunc-v1", "runc", "", False, False)
    out = subprocess.run([str(Path(sys.executable).parent / "pycontainerd"), "config", "default"],
                         capture_output=True, text=True, timeout=60).stdout
    assert '[plugins."io.containerd.runtime.v1.linux"]\nshim = "containerd-shim-pyrunc-v1"' in out


def test_no_shim_is_refused():
    class Ctx:
        config = plugin.Config(no_shim=True)

    with pytest.raises(ValueError, match="no_shim"):
        asyncio.run(plugin.init(Ctx()))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- publish


def test_forward_request_encoding():
    event = ProtoAny(type_url=type_url(TaskExit), value=bytes(TaskExit(container_id="c", exit_status=3)))
    data = publish.forward_request("ns1", "/tasks/exit", bytes(event), 1_700_000_000_123_456_789)
    env = ForwardRequest().parse(data).envelope
    assert (env.namespace, env.topic, env.event.type_url) == ("ns1", "/tasks/exit", "containerd.events.TaskExit")
    assert TaskExit().parse(env.event.value).exit_status == 3
    assert env.timestamp == datetime.fromtimestamp(1_700_000_000.123456, timezone.utc)


async def test_publish_binary_forwards_over_ttrpc():
    got = []
    refuse = []

    async def forward(payload: bytes) -> bytes:
        if refuse:
            raise errdefs.InvalidArgument("bad event")
        got.append((ForwardRequest().parse(payload).envelope, request_metadata()))
        return b""

    async def run_publish(address: str) -> tuple[int, bytes]:
        proc = await asyncio.create_subprocess_exec(
            str(SHIM), "--address", address, "publish", "--topic", "/tasks/exit", "--namespace", "nsx",
            stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
        _, err = await proc.communicate(bytes(event))
        return proc.returncode, err

    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        server = TtrpcServer()
        server.register(publish.SERVICE, {"Forward": Method(None, None, forward)})
        await server.start_unix(os.path.join(tmp, "d.sock.ttrpc"))
        event = ProtoAny(type_url="containerd.events.TaskExit", value=bytes(TaskExit(container_id="c1")))
        env = {k: v for k, v in os.environ.items() if k != "TTRPC_ADDRESS"}
        code, err = await run_publish(os.path.join(tmp, "d.sock"))  # -> <address>.ttrpc
        assert code == 0, err
        [(envelope, md)] = got
        assert (envelope.namespace, envelope.topic) == ("nsx", "/tasks/exit")
        assert TaskExit().parse(envelope.event.value).container_id == "c1"
        assert md.get("containerd-namespace") == ["nsx"]
        refuse.append(True)
        code, err = await run_publish(os.path.join(tmp, "d.sock"))
        assert code == 1 and b"bad event: invalid argument" in err, err
        await server.close()
    code, err = await run_publish("/tmp/no-such-daemon.sock")
    assert code == 1 and b"publish:" in err


# ---------------------------------------------------------------------------- the Shim service's errors


class _FakeProcess:
    def __init__(self, id):
        self.id = id


class _FakeContainer:
    def __init__(self, id):
        self.id = id
        self.init = _FakeProcess(id)
        self.processes = {}


class _FakeTasks:
    """Just enough of the runc TaskService for the adapter's lookups."""

    def __init__(self):
        self.containers = {}
        self.calls = []

    async def create(self, request):
        self.calls.append(("create", request))
        self.containers[request.id] = _FakeContainer(request.id)
        from pycontainerd.api.gen.containerd.task.v2 import CreateTaskResponse
        return CreateTaskResponse(pid=42)

    async def exec(self, request):
        self.calls.append(("exec", request))
        self.containers[request.id].processes[request.exec_id] = _FakeProcess(request.exec_id)

    async def kill(self, request):
        self.calls.append(("kill", request))


class _Events:
    async def flush(self, timeout):
        return True


async def test_shim_service_errors_and_routing():
    tasks = _FakeTasks()
    svc = shim_service.ShimService(tasks, shim_service.ShimConfig("ns", workdir="/w"), _Events())
    with pytest.raises(errdefs.FailedPrecondition, match="container must be created"):
        await svc.delete(Empty())
    with pytest.raises(errdefs.NotFound, match="process c1 does not exist"):
        await svc.state(shimapi.StateRequest(id="c1"))
    assert (await svc.shim_info(Empty())).shim_pid == os.getpid()
    resp = await svc.create(shimapi.CreateTaskRequest(id="c1", bundle="/b", runtime="runc"))
    assert resp.pid == 42
    created = tasks.calls[0][1]
    assert created.options.type_url == "containerd.runc.v1.Options"
    assert runcopts.Options().parse(created.options.value).criu_work_path == "/w"
    with pytest.raises(errdefs.AlreadyExists):
        await svc.create(shimapi.CreateTaskRequest(id="c2", bundle="/b2"))
    await svc.exec(shimapi.ExecProcessRequest(id="e1"))
    assert (tasks.calls[-1][1].id, tasks.calls[-1][1].exec_id) == ("c1", "e1")
    for dup in ("e1", "c1"):
        with pytest.raises(errdefs.AlreadyExists, match=f"id {dup}: already exists"):
            await svc.exec(shimapi.ExecProcessRequest(id=dup))
    with pytest.raises(errdefs.InvalidArgument) as info:
        await svc.delete_process(shimapi.DeleteProcessRequest(id="c1"))
    assert str(info.value) == "cannot delete init process with DeleteProcess"
    with pytest.raises(errdefs.InvalidArgument, match="id not provided"):
        await svc.resize_pty(shimapi.ResizePtyRequest())
    with pytest.raises(errdefs.Unknown, match="process does not exist nope"):
        await svc.resize_pty(shimapi.ResizePtyRequest(id="nope"))
    await svc.kill(shimapi.KillRequest(signal=9, all=True))
    assert (tasks.calls[-1][1].exec_id, tasks.calls[-1][1].all) == ("", True)
    await svc.kill(shimapi.KillRequest(id="e1", signal=15))
    assert tasks.calls[-1][1].exec_id == "e1"
    with pytest.raises(errdefs.NotFound, match="process e9 does not exist"):
        await svc.kill(shimapi.KillRequest(id="e9", signal=15))
