"""Tasks survive the daemon: after SIGTERM or kill -9 and a restart, running tasks are found
again through their bundles (the shim's `address` file), keep running, answer exec and kill, and
their later exits are reported. A shim that died while the daemon was down is cleaned up by its
`delete` action (container killed, rootfs unmounted, bundle, socket and runc state removed) and
its task reported stopped. Real daemon, Go shim, runc and the stock ctr; nothing may leak. The
same for our Python shim's default, containers sharing a server.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from daemons import Daemon, short_tmpdir  # noqa: E402
from test_tasks_support import (  # noqa: E402
    PY_RUNC_ROOT, PY_SHIM_SOCKETS, V2, _alive, _cmdline, requirements, shim_socket, task_env,
)

pytestmark = requirements


@pytest.fixture
def env():
    with task_env() as e:
        yield e


@pytest.fixture
def py_env():
    """A daemon whose tasks run on our Python shim (its sockets and runc state in our dirs)."""
    tmp = short_tmpdir("pcd-")
    with task_env({"PYRUNC_ZYGOTE_DIR": str(tmp / "zygote"), "PYRUNC_SHIM_LINGER": "0"},
                  daemon=Daemon("pycontainerd", tmp=tmp), runc_root=PY_RUNC_ROOT, shim_sockets=PY_SHIM_SOCKETS) as e:
        yield e


PYRUNC = "io.containerd.pyrunc.v2"


def _init_pid(env, id: str) -> int:
    return env.tasks()[id][0]


def test_tasks_survive_kill9(env):
    ids = ["keep1", "keep2", "keep3"]
    for id in ids:
        env.run(id, "/bin/sleep", "300", detach=True)
    before = env.tasks()
    shims = {id: env.shim_pids(id) for id in ids}
    assert all(status == "RUNNING" for _, status in before.values()) and len(before) == 3

    env.daemon.kill9()
    for id in ids:
        assert _alive(before[id][0]) and all(_alive(p) for p in shims[id])
    env.daemon.start()

    assert env.tasks() == before
    for id in ids:
        out = env.ctr("tasks", "exec", "--exec-id", "again", id, "/bin/echo", f"hello-{id}").stdout
        assert out == f"hello-{id}\n"
    ev = env.subscribe()
    for id in ids:
        env.ctr("tasks", "kill", "-s", "SIGKILL", id)
    ev.wait_for(lambda e: sum(t == "/tasks/exit" for t in e.topics(env.ns)) == 3, what="three exits")
    for id in ids:
        exits = [p for _, t, p in ev.events(env.ns) if t == "/tasks/exit" and p["id"] == id]
        assert len(exits) == 1 and exits[0]["exit_status"] == 137 and exits[0]["pid"] == before[id][0]
        env.ctr("tasks", "rm", id)
    env.ctr("containers", "rm", *ids)
    env.assert_no_leaks([(env.ns, id) for id in ids])


def test_tasks_survive_sigterm(env):
    env.run("calm", "/bin/sleep", "300", detach=True)
    before = env.tasks()
    assert env.daemon.stop(signal.SIGTERM) == 0
    assert _alive(before["calm"][0]) and env.shim_pids("calm")
    env.daemon.start()
    assert env.tasks() == before
    env.ctr("tasks", "pause", "calm")
    assert env.tasks()["calm"][1] == "PAUSED"
    env.ctr("tasks", "resume", "calm")
    env.ctr("tasks", "rm", "-f", "calm")
    env.ctr("containers", "rm", "calm")
    env.assert_no_leaks([(env.ns, "calm")])


def test_exit_while_daemon_down_is_delivered_after_restart(env):
    """The shim retries publishing an exit it could not deliver (after 1, 2, 3... seconds)."""
    env.run("brief", "/bin/sh", "-c", "sleep 2; exit 5", detach=True)
    env.daemon.kill9()
    time.sleep(3)  # the task exits while nobody listens
    env.daemon.start()
    ev = env.subscribe()
    assert env.tasks()["brief"][1] == "STOPPED"
    ev.wait_for(lambda e: "/tasks/exit" in e.topics(env.ns, "brief"), timeout=20, what="the retried exit")
    exit = [p for _, t, p in ev.events(env.ns) if t == "/tasks/exit"][0]
    assert exit["exit_status"] == 5
    env.ctr("tasks", "rm", "brief")
    env.ctr("containers", "rm", "brief")
    env.assert_no_leaks([(env.ns, "brief")])


def test_shim_killed_while_daemon_down_is_cleaned_up(env):
    env.run("victim", "/bin/sleep", "300", detach=True)
    env.run("survivor", "/bin/sleep", "300", detach=True)
    before = env.tasks()
    [victim_shim] = env.shim_pids("victim")
    victim_init = before["victim"][0]
    socket = shim_socket(env.address, env.ns, "victim")
    assert socket.exists()

    env.daemon.kill9()
    os.kill(victim_shim, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _alive(victim_shim) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _alive(victim_init), "the container outlives its shim until the shim's delete action runs"
    env.daemon.start()

    tasks = env.tasks()
    assert "victim" not in tasks and tasks["survivor"] == before["survivor"]
    deadline = time.monotonic() + 5
    while _alive(victim_init) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(victim_init), "the delete action did not kill the orphaned container"
    assert not (env.bundle_root / env.ns / "victim").exists()
    assert not (env.work_root / env.ns / "victim").exists()
    assert not socket.exists()
    assert "victim" in env.ctr("containers", "ls", "-q").stdout.split()  # the container record stays
    p = env.ctr("tasks", "kill", "victim", check=False)
    assert p.returncode == 1 and "not found" in p.stderr
    env.ctr("tasks", "rm", "-f", "survivor")
    env.ctr("containers", "rm", "victim", "survivor")
    env.assert_no_leaks([(env.ns, "victim"), (env.ns, "survivor")])


def test_load_reports_dead_shims_task_stopped(env):
    """Loading bundles whose shim is gone publishes /tasks/exit and /tasks/delete for the task
    (the manager in-process, subscribed before it loads)."""
    from pycontainerd.core.events import Exchange
    from pycontainerd.plugins.runtime.v2.manager import TaskManager

    env.run("gone", "/bin/sleep", "300", detach=True)
    env.run("here", "/bin/sleep", "300", detach=True)
    before = env.tasks()
    env.daemon.kill9()
    for pid in env.shim_pids("gone"):
        os.kill(pid, signal.SIGKILL)

    async def load():
        exchange = Exchange()
        sub = exchange.subscribe()
        manager = TaskManager(root=env.daemon.root / V2, state=env.daemon.state / V2, address=env.address,
                              ttrpc_address=env.address + ".ttrpc", events=exchange)
        try:
            await manager.load_existing()
            assert [t.id for t in manager.tasks(env.ns)] == ["here"]
            assert (await manager.get(env.ns, "here").pid()) == before["here"][0]
            got = []
            while sub.pending:
                got.append(await sub.get(1))
            return got
        finally:
            await manager.close()

    envelopes = asyncio.run(load())
    assert [(e.namespace, e.topic) for e in envelopes] == [(env.ns, "/tasks/exit"), (env.ns, "/tasks/delete")]
    exit, delete = (e.decode() for e in envelopes)
    assert (exit.container_id, exit.id, exit.pid, exit.exit_status) == ("gone", "gone", before["gone"][0], 137)
    assert (delete.container_id, delete.pid, delete.exit_status) == ("gone", before["gone"][0], 137)
    assert exit.exited_at.year > 2000 and delete.exited_at == exit.exited_at
    assert not (env.bundle_root / env.ns / "gone").exists()

    env.daemon.start()  # the surviving task is still there for the real daemon
    assert env.tasks() == {"here": before["here"]}
    env.ctr("tasks", "rm", "-f", "here")
    env.ctr("containers", "rm", "gone", "here")
    env.assert_no_leaks([(env.ns, "gone"), (env.ns, "here")])


def test_grouped_pyrunc_tasks_survive_kill9_and_their_server_dying(py_env):
    """pyrunc's default puts a namespace's containers in one server: after kill -9 of the daemon
    they are found again through it; when that server dies while the daemon is down, every
    container it served is cleaned up and gone from the task list."""
    env = py_env
    ids = ["p1", "p2", "p3"]
    for id in ids:
        env.run(id, "/bin/sleep", "300", detach=True, runtime=PYRUNC)
    assert len({(env.bundle_root / env.ns / id / "address").read_text() for id in ids}) == 1
    [server] = env.shim_pids()
    before = env.tasks()
    assert sorted(before) == ids and all(status == "RUNNING" for _, status in before.values())

    env.daemon.kill9()
    env.daemon.start()
    assert env.tasks() == before
    for id in ids:
        assert env.ctr("tasks", "exec", "--exec-id", "again", id, "/bin/echo", f"hi-{id}").stdout == f"hi-{id}\n"
    ev = env.subscribe()
    env.ctr("tasks", "kill", "-s", "SIGKILL", "p1")
    ev.wait_for(lambda e: "/tasks/exit" in e.topics(env.ns, "p1"), what="p1's exit")
    env.ctr("tasks", "rm", "p1")
    assert _alive(server), "the server still serves p2 and p3"

    env.daemon.kill9()
    os.kill(server, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    env.daemon.start()
    tasks = env.tasks()
    assert "p2" not in tasks and "p3" not in tasks
    deadline = time.monotonic() + 5
    while any(_alive(before[id][0]) for id in ("p2", "p3")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(before[id][0]) for id in ("p2", "p3")), "the delete action killed neither container"
    env.ctr("containers", "rm", *ids)
    env.assert_no_leaks([(env.ns, id) for id in ids])


def _zygotes(address: str) -> list[int]:
    return [int(pid) for pid in os.listdir("/proc") if pid.isdigit()
            and (argv := _cmdline(int(pid)))[1:2] == [b"zygote"] and address.encode() in argv]


def test_daemon_stop_ends_the_pyrunc_zygote_not_the_shims(py_env):
    env = py_env
    env.run("z", "/bin/sleep", "300", detach=True, runtime=PYRUNC)
    assert len(_zygotes(env.address)) == 1
    [server] = env.shim_pids()
    assert env.daemon.stop(signal.SIGTERM) == 0
    deadline = time.monotonic() + 10
    while _zygotes(env.address) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _zygotes(env.address), "the zygote outlived the daemon"
    assert _alive(server)
    env.daemon.start()
    assert env.tasks()["z"][1] == "RUNNING"
    env.ctr("tasks", "rm", "-f", "z")
    env.ctr("containers", "rm", "z")
    env.assert_no_leaks([(env.ns, "z")])
