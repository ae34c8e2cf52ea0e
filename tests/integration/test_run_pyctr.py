"""pyctr run / tasks / containers running real containers: on our daemon with the Go shim and
with our Python shim, and on the stock containerd with the Go shim (pyctr as its client).

Output, exit codes, stdin, env, users, -d with tasks ls/exec/kill/pause/resume/ps/metrics/rm,
attach, a TTY, --log-uri, signal forwarding, --init reaping zombies and forwarding SIGTERM, and
--rm leaving no container, snapshot or FIFO behind."""
from __future__ import annotations

import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_run_support import (GO_SHIM, IMAGE, PY_SHIM, PYCTR, USER_IMAGE, make_images,  # noqa: E402
                              requirements, run_env)

pytestmark = requirements

SETUPS = [("pycontainerd", GO_SHIM), ("pycontainerd", PY_SHIM), ("containerd", GO_SHIM)]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module", params=SETUPS, ids=[f"{k}+{r.split('.')[2]}" for k, r in SETUPS])
def env(request, images):
    kind, runtime = request.param
    with run_env(kind, images) as e:
        e.runtime = runtime
        yield e


def uid(prefix: str) -> str:
    return f"{prefix}{os.getpid() % 1000}{int(time.monotonic() * 1000) % 100000}"


def assert_gone(env, cid: str) -> None:
    assert cid not in env.container_ids()
    assert cid not in env.snapshot_keys()
    assert env.fifos_left() == []


# -- foreground runs ---------------------------------------------------------------------------

def test_run_rm_prints_and_cleans_up(env):
    cid = uid("echo")
    p = env.run(cid, "echo", "hi", runtime=env.runtime)
    assert (p.stdout, p.stderr) == ("hi\n", "")
    assert_gone(env, cid)


def test_exit_codes_pass_through(env):
    assert env.run(uid("ex"), "sh", "-c", "exit 3", runtime=env.runtime, check=False).returncode == 3
    # a process killed by a signal: the shell reports 128 + 9
    assert env.run(uid("ex"), "sh", "-c", "sleep 30 & kill -KILL $!; wait $!", runtime=env.runtime,
                   check=False).returncode == 137
    p = env.run(uid("ex"), "sh", "-c", "echo out; echo err >&2; exit 0", runtime=env.runtime)
    assert (p.stdout, p.stderr) == ("out\n", "err\n")


def test_stdin_env_cwd_user(env):
    p = env.run(uid("in"), "sh", "-c", "read line; echo got:$line", runtime=env.runtime, input="from-stdin\n")
    assert p.stdout == "got:from-stdin\n"
    p = env.run(uid("in"), "sh", "-c", "cat | wc -c", runtime=env.runtime, input="x" * 100_000)
    assert p.stdout.strip() == "100000"  # stdin's EOF reaches the process (CloseIO)
    p = env.run(uid("env"), "sh", "-c", "echo $A $B; pwd; id -u; id -g", runtime=env.runtime,
                flags=("--env", "A=1", "--env", "B=two", "--cwd", "/tmp", "--user", "65534:65534"))
    assert p.stdout.split() == ["1", "two", "/tmp", "65534", "65534"]


def test_image_user(env):
    cid = uid("usr")
    p = env.pyctr("run", "--rm", "--runtime", env.runtime, "--fifo-dir", env.fifo_dir, USER_IMAGE, cid)
    assert p.stdout.strip() == "uid=1000(app) gid=1001(staff) groups=10(wheel),29(audio),1001(staff)"


def test_log_uri_file(env, tmp_path):
    log = tmp_path / "out.log"
    cid = uid("log")
    # stderr first, stdout a second later: containerd 1.6's Go shim closes the shared log file
    # when its stdout copier ends, and loses what its stderr copier had not written by then
    p = env.run(cid, "sh", "-c", "echo err-log >&2; sleep 1; echo to-log", runtime=env.runtime,
                flags=("--log-uri", f"file://{log}"))
    assert p.stdout == ""
    assert log.read_text().split() == ["err-log", "to-log"]
    assert_gone(env, cid)


def test_signals_are_forwarded(env):
    cid = uid("sig")
    cmd = [PYCTR, "-a", env.address, "-n", env.ns, "run", "--rm", "--runtime", env.runtime, "--fifo-dir",
           env.fifo_dir, IMAGE, cid, "sh", "-c", 'trap "echo usr1; exit 9" USR1; echo ready; '
           'while true; do sleep 0.1; done']
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (proc.returncode, out, err) == (9, "usr1\n", "")
    assert_gone(env, cid)


def test_tty(env):
    cid = uid("tty")
    master, slave = pty.openpty()
    cmd = [PYCTR, "-a", env.address, "-n", env.ns, "run", "--rm", "-t", "--runtime", env.runtime, "--fifo-dir",
           env.fifo_dir, IMAGE, cid, "sh", "-c", "tty; echo term=$TERM; sleep 0.2"]
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    output = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                output += chunk
            elif proc.poll() is not None:
                break
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text
    assert re.search(r"/dev/pts/\d+", text) and "term=xterm" in text, text
    assert_gone(env, cid)


# -- detached containers and tasks ---------------------------------------------------------------

def test_detached_lifecycle(env):
    cid = uid("life")
    # PID 1 without a handler ignores SIGTERM: the shell traps it
    env.run(cid, "sh", "-c", 'trap "exit 3" TERM; while true; do sleep 0.1; done', runtime=env.runtime,
            flags=("-d",))
    try:
        pid, status = env.tasks()[cid]
        assert status == "RUNNING"
        ls = env.pyctr("tasks", "ls").stdout.splitlines()
        assert ls[0].split() == ["TASK", "PID", "STATUS"]
        assert re.search(rf"^{cid}\s+{pid}\s+RUNNING$", "\n".join(ls), re.M)
        assert env.pyctr("tasks", "ls", "-q").stdout.split() == [cid]

        out = env.pyctr("tasks", "exec", "--exec-id", "e1", "--fifo-dir", env.fifo_dir, cid, "echo", "in-exec").stdout
        assert out == "in-exec\n"
        p = env.pyctr("tasks", "exec", "--exec-id", "e2", "--fifo-dir", env.fifo_dir, "--cwd", "/tmp",
                      "--env", "X=y", cid, "sh", "-c", "pwd; echo $X; exit 5", check=False)
        assert (p.returncode, p.stdout) == (5, "/tmp\ny\n")
        assert env.pyctr("tasks", "exec", "--exec-id", "e3", "--fifo-dir", env.fifo_dir, "--user", "nobody",
                         cid, "id", "-u").stdout.strip() == "65534"

        ps = env.pyctr("tasks", "ps", cid).stdout.splitlines()
        assert ps[0].split() == ["PID", "INFO"] and str(pid) in [line.split()[0] for line in ps[1:]]

        env.pyctr("tasks", "pause", cid)
        assert env.tasks()[cid][1] == "PAUSED"
        env.pyctr("tasks", "resume", cid)
        assert env.tasks()[cid][1] == "RUNNING"

        metrics = env.pyctr("tasks", "metrics", cid).stdout
        assert metrics.splitlines()[0].split() == ["ID", "TIMESTAMP"] and cid in metrics
        assert "pids.current" in metrics

        refused = env.pyctr("containers", "rm", cid, check=False)
        assert refused.returncode == 1 and "cannot delete a non stopped container" in refused.stderr

        env.pyctr("tasks", "kill", cid)  # the image's stop signal: SIGTERM
        env.wait_status(cid, "STOPPED")
        wait = env.pyctr("tasks", "wait", cid, check=False)
        assert (wait.returncode, wait.stdout.strip()) == (3, "3")
        env.pyctr("tasks", "rm", cid)
        assert cid not in env.tasks()
    finally:
        env.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
    env.pyctr("containers", "rm", cid)
    assert_gone(env, cid)


def test_kill_all_exec_id_and_force_delete(env):
    cid = uid("kill")
    env.run(cid, "sleep", "300", runtime=env.runtime, flags=("-d",))
    env.pyctr("tasks", "exec", "-d", "--exec-id", "bg", "--fifo-dir", env.fifo_dir, cid, "sleep", "300")
    ps = env.pyctr("tasks", "ps", cid).stdout
    assert "ExecID:bg" in ps or len(ps.splitlines()) == 3, ps
    env.pyctr("tasks", "kill", "--exec-id", "bg", "--signal", "KILL", cid)
    deadline = time.monotonic() + 15
    while len(env.pyctr("tasks", "ps", cid).stdout.splitlines()) > 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(env.pyctr("tasks", "ps", cid).stdout.splitlines()) == 2
    env.pyctr("tasks", "rm", "--exec-id", "bg", cid, check=False)
    refused = env.pyctr("tasks", "rm", cid, check=False)
    assert refused.returncode == 1 and "must be stopped" in refused.stderr
    env.pyctr("tasks", "rm", "-f", cid)  # SIGKILL to all, wait, delete
    assert cid not in env.tasks()
    env.pyctr("containers", "rm", cid)
    assert cid not in env.container_ids() and cid not in env.snapshot_keys()


def test_start_and_attach(env):
    cid = uid("att")
    # the output comes after `start -d` has returned (and its process, which reads too, exited)
    env.pyctr("containers", "create", "--runtime", env.runtime, IMAGE, cid, "sh", "-c",
              "sleep 12; echo late; exit 4")  # attach must be up before the echo, even under load
    env.pyctr("tasks", "start", "-d", "--fifo-dir", env.fifo_dir, cid)
    p = env.pyctr("tasks", "attach", cid, check=False)
    assert (p.returncode, p.stdout) == (4, "late\n")
    assert cid not in env.tasks()  # attach deletes the task once it exited, as ctr's
    p = env.pyctr("tasks", "start", "--fifo-dir", env.fifo_dir, cid, check=False)
    assert (p.returncode, p.stdout) == (4, "late\n")
    env.pyctr("containers", "rm", cid)
    assert_gone(env, cid)


def zombies_under(env, cid: str, flags: tuple) -> int:
    """Zombies in a container whose PID 1 (after `flags`) is `sleep`, which never reaps: a
    subshell leaves an orphan that exits 0.1s later."""
    env.run(cid, "sh", "-c", '(sh -c "sleep 0.1 &"); exec sleep 300', runtime=env.runtime, flags=("-d", *flags))
    try:
        time.sleep(3.0)  # the orphan exits after 0.1 s; generous for a loaded machine
        out = env.pyctr("tasks", "exec", "--exec-id", "ps", "--fifo-dir", env.fifo_dir, cid, "ps", "-o", "stat").stdout
        return sum(1 for line in out.splitlines() if line.strip().startswith("Z"))
    finally:
        env.pyctr("tasks", "kill", "-s", "KILL", "-a", cid, check=False)
        env.wait_status(cid, "STOPPED")
        env.pyctr("tasks", "rm", cid, check=False)
        env.pyctr("containers", "rm", cid, check=False)


def test_init_reaps_zombies_and_forwards_sigterm(env):
    assert zombies_under(env, uid("noi"), ()) == 1
    assert zombies_under(env, uid("ini"), ("--init",)) == 0
    # pyctr-init is PID 1 and passes SIGTERM to the shell, whose trap decides the exit status
    cid = uid("term")
    env.run(cid, "sh", "-c", 'trap "exit 7" TERM; while true; do sleep 0.1; done', runtime=env.runtime,
            flags=("-d", "--init"))
    try:
        info = env.info(cid)
        assert info["Spec"]["process"]["args"][:2] == ["/sbin/pyctr-init", "--"]
        assert {"destination": "/sbin/pyctr-init", "type": "bind", "source": info["Spec"]["mounts"][-1]["source"],
                "options": ["rbind", "ro"]} == info["Spec"]["mounts"][-1]
        time.sleep(2.0)  # the shell must have set its trap before the signal
        env.pyctr("tasks", "kill", cid)
        wait = env.pyctr("tasks", "wait", cid, check=False)
        assert wait.returncode == 7
        env.pyctr("tasks", "rm", cid)
    finally:
        env.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
    env.pyctr("containers", "rm", cid)


def test_errors_are_one_line(env):
    p = env.pyctr("run", "--rm", "-d", "--runtime", env.runtime, IMAGE, uid("x"), "true", check=False)
    assert p.returncode == 1 and p.stderr == "pyctr: flags --detach and --rm cannot be specified together\n"
    p = env.pyctr("run", "--runtime", env.runtime, "no/such:image", uid("x"), check=False)
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1 and "not found" in p.stderr
    p = env.pyctr("containers", "create", "--runtime", env.runtime, IMAGE, "../escape", check=False)
    assert p.returncode == 1 and "invalid argument" in p.stderr and len(p.stderr.splitlines()) == 1
    assert "../escape" not in env.snapshot_keys()
    p = env.pyctr("tasks", "kill", "nosuch", check=False)
    assert p.returncode == 1 and "not found" in p.stderr


def test_rootfs_and_unpack_on_demand(env, tmp_path):
    # a plain directory as the root filesystem (no image, no snapshot)
    root = tmp_path / "rootfs"
    for d in ("bin", "proc", "dev", "sys", "tmp", "etc"):
        (root / d).mkdir(parents=True)
    shutil.copy("/usr/bin/busybox", root / "bin" / "busybox")
    for applet in ("sh", "echo", "cat"):
        os.symlink("busybox", root / "bin" / applet)
    cid = uid("rfs")
    # no image config, so no PATH either (as with ctr): the command needs its full path
    p = env.pyctr("run", "--rm", "--runtime", env.runtime, "--fifo-dir", env.fifo_dir, "--rootfs", str(root), cid,
                  "/bin/sh", "-c", "echo from-rootfs")
    assert p.stdout == "from-rootfs\n"
    assert cid not in env.container_ids()
    # an image not yet unpacked for a snapshotter is unpacked first, as ctr does
    cid = uid("nat")
    p = env.pyctr("run", "--rm", "--runtime", env.runtime, "--fifo-dir", env.fifo_dir, "--snapshotter", "native",
                  IMAGE, cid, "echo", "native")
    assert p.stdout == "native\n"
    assert any(line.split()[-1] == "Committed" for line in
               env.ctr("snapshots", "--snapshotter", "native", "ls").stdout.splitlines()[1:])
    assert cid not in env.snapshot_keys("native")
