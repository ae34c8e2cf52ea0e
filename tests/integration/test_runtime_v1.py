"""Runtime v1 end to end (`io.containerd.runtime.v1.linux`): our daemon with our Python v1 shim
(`containerd-shim-pyrunc-v1`, the default) and with containerd's Go v1 shim (`shim =
"containerd-shim"`), real runc, the stock ctr. Also containerd 1.6 itself driving our Python v1 shim.

Covers the shared ctr conformance scenarios (every one, a leak check after each), the events a
task produces (create/start from the daemon, exit from the shim, delete), the task lifecycle
(exec, ps, metrics, pause, resume, kill, rm), a failed create, a shim killed under a running
daemon, and tasks surviving a daemon restart (SIGTERM and kill -9) with a shim that died while
the daemon was down. After every test: no shim, bundle, work dir, mount, runc container or shim
socket is left.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_tasks_support import (  # noqa: E402
    GO_RUNC_ROOT, PY_RUNC_ROOT, PY_SHIM_SOCKETS, TaskEnv, _alive, _cmdline, requirements,
)

from daemons import Daemon, short_tmpdir  # noqa: E402
from sharedtools import CONFORMANCE

RUNTIME_V1 = "io.containerd.runtime.v1.linux"
GO_SHIM = shutil.which("containerd-shim")
SHIM_STARTED = re.compile(r'msg="shim started".*address=(unix://\S+)')

pytestmark = requirements


def _config(shim: str) -> str:
    lines = ["version = 2", f'[plugins."{RUNTIME_V1}"]', "  shim_debug = true"]
    if shim == "go":
        lines.append('  shim = "containerd-shim"')
    return "\n".join(lines) + "\n"


def _skip_without(shim: str) -> None:
    if shim == "go" and GO_SHIM is None:
        pytest.skip("containerd's Go v1 shim (containerd-shim) is not installed")


class V1Env(TaskEnv):
    """TaskEnv for v1 tasks: v1 bundle and work dirs, v1 shims, runs with the v1 runtime."""

    def __init__(self, shim: str):
        # our daemon creates every v1 shim's socket (under our dir); runc state is the shim's own
        # default: ours under /run/pycontainerd/runc, containerd-shim's under /run/containerd/runc
        super().__init__(Daemon("pycontainerd", config=_config(shim)),
                         runc_root=PY_RUNC_ROOT if shim == "python" else GO_RUNC_ROOT,
                         shim_sockets=PY_SHIM_SOCKETS)
        self.shim = shim

    @property
    def bundle_root(self) -> Path:
        return self.daemon.state / RUNTIME_V1

    @property
    def work_root(self) -> Path:
        return self.daemon.root / RUNTIME_V1

    def run(self, id: str, *cmd: str, detach: bool = False, rm: bool = True, env: dict | None = None,
            check: bool = True, input: str | None = None, ns: str | None = None) -> subprocess.CompletedProcess:
        args = ["run", "--runtime", RUNTIME_V1]
        if detach:
            args.append("-d")
        elif rm:
            args.append("--rm")
        for k, v in (env or {}).items():
            args += ["--env", f"{k}={v}"]
        return self.ctr(*args, "--rootfs", str(self.rootfs), id, *cmd, check=check, input=input, ns=ns)

    def shim_pids(self, id: str | None = None) -> list[int]:
        """Live v1 shims of this daemon (`-address <ours>`), optionally the one of task `id`
        (its -workdir ends in /<id>)."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            argv = _cmdline(int(entry))
            if not any(b"containerd-shim" in a for a in argv[:2]) or b"-workdir" not in argv:
                continue
            try:
                if argv[argv.index(b"-address") + 1] != self.address.encode():
                    continue
                workdir = argv[argv.index(b"-workdir") + 1]
            except (ValueError, IndexError):
                continue
            if id is not None and not workdir.endswith(b"/" + id.encode()):
                continue
            if _alive(int(entry)):
                found.append(int(entry))
        return found

    def known_namespaces(self) -> set[str]:
        found = set(self.namespaces)
        if self.bundle_root.is_dir():
            found |= {d.name for d in self.bundle_root.iterdir() if d.is_dir()}
        return found

    def runc_containers(self) -> list[tuple[str, str]]:
        found = []
        for ns in self.known_namespaces():
            root = self.runc_root / ns
            if root.is_dir():
                found += [(ns, d.name) for d in root.iterdir() if d.is_dir()]
        return found

    def started_sockets(self) -> list[Path]:
        """Socket files of every shim this daemon started that are still there."""
        paths = {m.group(1)[len("unix://"):] for m in SHIM_STARTED.finditer(self.daemon.log_path.read_text(errors="replace"))}
        return sorted(Path(p) for p in paths if os.path.exists(p))

    def assert_no_leaks(self, ids=(), timeout: float = 10) -> None:
        super().assert_no_leaks(ids, timeout)
        deadline = time.monotonic() + timeout
        while self.started_sockets() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not self.started_sockets(), f"leaked shim sockets: {self.started_sockets()}"

    def cleanup(self) -> None:
        self.namespaces |= self.known_namespaces()
        for sock in self.started_sockets():
            with contextlib.suppress(OSError):
                sock.unlink()
        super().cleanup()


@contextlib.contextmanager
def v1_env(shim: str):
    _skip_without(shim)
    env = V1Env(shim)
    try:
        env.daemon.start()
        yield env
    finally:
        env.cleanup()


@pytest.fixture(params=["python", "go"])
def env(request):
    with v1_env(request.param) as e:
        yield e


def _topics(ev, ns: str, id: str) -> list[str]:
    return [t for t in ev.topics(ns, id) if t.startswith("/tasks/")]


# ------------------------------------------------------------------------------------------ tests

def test_run_output_exit_code_and_events(env):
    ev = env.subscribe()
    assert env.run("echo1", "/bin/echo", "hello-v1").stdout == "hello-v1\n"
    p = env.run("exit4", "/bin/sh", "-c", "exit 4", check=False)
    assert p.returncode == 4, p.stderr
    p = env.run("stdin1", "/bin/sh", "-c", "read line; echo got:$line", input="from-stdin\n")
    assert p.stdout.strip() == "got:from-stdin"
    # /tasks/exit comes from the shim; the Go shim sends it through `pycontainerd publish`, later
    ev.wait_for(lambda e: "/tasks/exit" in _topics(e, env.ns, "exit4"), what="/tasks/exit of exit4")
    topics = _topics(ev, env.ns, "exit4")
    assert sorted(topics) == sorted(["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]), topics
    assert topics[:2] == ["/tasks/create", "/tasks/start"]
    if env.shim == "python":  # Delete answers once the shim's exit event was forwarded
        assert topics.index("/tasks/exit") < topics.index("/tasks/delete"), topics
    exits = [p for _, t, p in ev.events(env.ns) if t == "/tasks/exit" and p.get("container_id") == "exit4"]
    assert len(exits) == 1 and exits[0]["exit_status"] == 4 and exits[0]["id"] == "exit4"
    env.assert_no_leaks([(env.ns, i) for i in ("echo1", "exit4", "stdin1")])


def test_task_lifecycle(env):
    ev = env.subscribe()
    env.run("life", "/bin/sleep", "300", detach=True)
    pid, status = env.tasks()["life"]
    assert status == "RUNNING" and pid > 0
    assert len(env.shim_pids("life")) == 1
    bundle = env.bundle_root / env.ns / "life"
    assert (bundle / "address").read_text().startswith(f"unix://{PY_SHIM_SOCKETS}/")  # for both shims
    assert int((bundle / "shim.pid").read_text()) == env.shim_pids("life")[0]
    assert (env.work_root / env.ns / "life").is_dir()
    assert env.ctr("tasks", "exec", "--exec-id", "e1", "life", "/bin/echo", "in-exec").stdout == "in-exec\n"
    p = env.ctr("tasks", "exec", "--exec-id", "e2", "life", "/bin/sh", "-c", "exit 7", check=False)
    assert p.returncode == 7
    env.ctr("tasks", "exec", "-d", "--exec-id", "bg", "life", "/bin/sleep", "300")
    ps = env.ctr("tasks", "ps", "life").stdout.splitlines()
    assert ps[0].split() == ["PID", "INFO"] and any(str(pid) in line for line in ps[1:])
    assert any("bg" in line for line in ps[1:]), ps  # exec ids as containerd.linux.runc.ProcessDetails
    metrics = env.ctr("tasks", "metrics", "life").stdout
    assert "life" in metrics and "memory" in metrics
    env.ctr("tasks", "pause", "life")
    assert env.tasks()["life"][1] == "PAUSED"
    env.ctr("tasks", "resume", "life")
    assert env.tasks()["life"][1] == "RUNNING"
    p = env.ctr("tasks", "rm", "life", check=False)
    assert p.returncode != 0 and "running" in p.stderr
    env.ctr("tasks", "kill", "--signal", "SIGKILL", "life")
    env.wait_status("life", "STOPPED")
    env.ctr("tasks", "rm", "life")
    assert "life" not in env.tasks()
    env.ctr("containers", "rm", "life")
    topics = _topics(ev, env.ns, "life")
    for topic in ("/tasks/create", "/tasks/start", "/tasks/exec-started", "/tasks/paused", "/tasks/resumed",
                  "/tasks/delete"):
        assert topic in topics, (topic, topics)
    assert topics.count("/tasks/create") == topics.count("/tasks/start") == topics.count("/tasks/delete") == 1
    ev.wait_for(lambda e: _topics(e, env.ns, "life").count("/tasks/exit") >= 3, what="exits of e1, e2 and init")
    env.assert_no_leaks([(env.ns, "life")])


def test_failed_create_cleans_up(env):
    p = env.run("bad", "/no/such/binary", check=False)
    assert p.returncode != 0 and "OCI runtime create failed" in p.stderr, p.stderr
    assert "bad" not in env.tasks()
    env.ctr("containers", "rm", "bad", check=False)
    env.assert_no_leaks([(env.ns, "bad")])


def test_shim_killed_while_daemon_runs(env):
    ev = env.subscribe()
    env.run("victim", "/bin/sleep", "300", detach=True)
    init_pid = env.tasks()["victim"][0]
    [shim] = env.shim_pids("victim")
    os.kill(shim, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while "victim" in env.tasks() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "victim" not in env.tasks()
    ev.wait_for(lambda e: "/tasks/delete" in _topics(e, env.ns, "victim"), what="/tasks/delete of victim")
    exits = [p for _, t, p in ev.events(env.ns) if t == "/tasks/exit" and p.get("container_id") == "victim"]
    assert exits and exits[-1]["exit_status"] == 137 and exits[-1]["pid"] == init_pid
    assert not _alive(init_pid)
    env.ctr("containers", "rm", "victim")
    env.assert_no_leaks([(env.ns, "victim")])


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_tasks_survive_daemon_restart(env, how):
    env.run("keep", "/bin/sleep", "300", detach=True)
    env.run("gone", "/bin/sleep", "300", detach=True)
    keep_pid = env.tasks()["keep"][0]
    [keep_shim] = env.shim_pids("keep")
    [gone_shim] = env.shim_pids("gone")
    gone_pid = env.tasks()["gone"][0]
    if how == "kill9":
        env.daemon.kill9()
    else:
        env.daemon.stop()
    assert _alive(keep_shim) and _alive(gone_shim) and _alive(keep_pid), "daemon exit took shims or tasks along"
    os.kill(gone_shim, signal.SIGKILL)  # dies while the daemon is down
    time.sleep(0.2)
    env.daemon.start()
    tasks = env.tasks()
    assert tasks.get("keep") == (keep_pid, "RUNNING"), tasks
    assert "gone" not in tasks, tasks
    assert not (env.bundle_root / env.ns / "gone").exists()
    deadline = time.monotonic() + 10
    while _alive(gone_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(gone_pid), "the dead shim's container was not killed"
    ev = env.subscribe()
    assert env.ctr("tasks", "exec", "--exec-id", "again", "keep", "/bin/echo", "still-here").stdout == "still-here\n"
    env.ctr("tasks", "kill", "--signal", "SIGKILL", "keep")
    env.wait_status("keep", "STOPPED")
    ev.wait_for(lambda e: "/tasks/exit" in _topics(e, env.ns, "keep"), what="/tasks/exit of keep after restart")
    env.ctr("tasks", "rm", "keep")
    env.ctr("containers", "rm", "keep", "gone")
    env.assert_no_leaks([(env.ns, "keep"), (env.ns, "gone")])


# ------------------------------------------------------------------------------------------ conformance

def _scenarios() -> list[str]:
    if not CONFORMANCE.exists():
        return []
    import importlib.util

    spec = importlib.util.spec_from_file_location("ctr_conformance", CONFORMANCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [fn.__name__ for fn in module.SCENARIOS]


@pytest.fixture(scope="module", params=["python", "go"])
def shared_env(request):
    with v1_env(request.param) as e:
        yield e


@pytest.mark.skipif(not CONFORMANCE.exists(), reason="shared conformance script not present")
@pytest.mark.parametrize("scenario", _scenarios())
def test_conformance(shared_env, scenario):
    env = shared_env
    p = subprocess.run([sys.executable, str(CONFORMANCE), "--address", env.address, "--runtime", RUNTIME_V1,
                        "-k", scenario], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "PASS " + scenario in p.stdout, p.stdout + p.stderr + env.daemon.log()
    env.assert_no_leaks()


# ------------------------------------------------------------------------------------------ containerd

@pytest.mark.skipif(shutil.which("containerd") is None, reason="containerd is not installed")
def test_containerd_drives_our_v1_shim():
    """containerd 1.6's v1 runtime with `shim = <our containerd-shim-pyrunc-v1>`: tasks run, and
    their exits reach containerd through `containerd publish` (no TTRPC_ADDRESS there)."""
    shim = Path(sys.executable).parent / "containerd-shim-pyrunc-v1"
    tmp = short_tmpdir("ctd1-")
    from daemons import containerd_config

    config = containerd_config(tmp, str(tmp / "d.sock")) + f'[plugins."{RUNTIME_V1}"]\n  shim = "{shim}"\n'
    # containerd makes the socket (its /run/containerd/s); our shim keeps runc state under ours
    env = TaskEnv(Daemon("containerd", config=config, tmp=tmp), runc_root=PY_RUNC_ROOT)
    env.run = V1Env.run.__get__(env)  # type: ignore[method-assign]
    try:
        env.daemon.start()
        ev = env.subscribe()
        assert env.run("c1", "/bin/echo", "from-containerd").stdout == "from-containerd\n"
        p = env.run("c2", "/bin/sh", "-c", "exit 5", check=False)
        assert p.returncode == 5, p.stderr
        env.run("c3", "/bin/sleep", "300", detach=True)
        assert env.ctr("tasks", "exec", "--exec-id", "x", "c3", "/bin/echo", "exec-ok").stdout == "exec-ok\n"
        env.ctr("tasks", "kill", "--signal", "SIGKILL", "c3")
        env.wait_status("c3", "STOPPED")
        env.ctr("tasks", "rm", "c3")
        env.ctr("containers", "rm", "c3")
        ev.wait_for(lambda e: "/tasks/exit" in _topics(e, env.ns, "c2"), what="/tasks/exit of c2 from our shim")
        exits = [p for _, t, p in ev.events(env.ns) if t == "/tasks/exit" and p.get("container_id") == "c2"]
        assert len(exits) == 1 and exits[0]["exit_status"] == 5
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
                str(shim).encode() in b" ".join(_cmdline(int(d))) for d in os.listdir("/proc") if d.isdigit()
                and str(tmp).encode() in b" ".join(_cmdline(int(d)))):
            time.sleep(0.1)
        leftover = [d for d in os.listdir("/proc") if d.isdigit() and _alive(int(d))
                    and str(shim).encode() in b" ".join(_cmdline(int(d))) and str(tmp).encode() in b" ".join(_cmdline(int(d)))]
        assert not leftover, f"our shims left running under containerd: {leftover}"
        state = tmp / "state" / RUNTIME_V1 / env.ns
        assert not state.exists() or not any(state.iterdir()), list(state.iterdir())
    finally:
        env.cleanup()
