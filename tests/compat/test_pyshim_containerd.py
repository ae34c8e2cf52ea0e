"""The real containerd (and our daemon) driving our Python shim, runtime io.containerd.pyrunc.v2,
through the stock `ctr`.

The daemons run on private temp paths with the venv's bin/ first on PATH (where
containerd-shim-pyrunc-v2 is installed) and PYRUNC_ZYGOTE_DIR inside their temp dir, so the
shim's zygote is theirs and goes with them. After every scenario: no shim process of the daemon
left (the zygote aside), no bundle, no shim socket, no runc state, no mount under the temp dir.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from daemons import Daemon
from pycontainerd.plugins.runtime.v2.runc import launch

CTR = shutil.which("ctr")
VENV_BIN = Path(sys.executable).parent
CONFORMANCE = Path("/work/shared/conformance")
PYRUNC = "io.containerd.pyrunc.v2"
GORUNC = "io.containerd.runc.v2"
# where each shim keeps its sockets and runc state: ours under /run/pycontainerd, whoever drives it;
# containerd's Go shim under containerd's own dirs (hard-coded there)
STATE_DIRS = {PYRUNC: (launch.SOCKET_ROOT, launch.RUNC_ROOT), GORUNC: ("/run/containerd/s", "/run/containerd/runc")}

pytestmark = [
    pytest.mark.compat,
    pytest.mark.root,
    pytest.mark.skipif(CTR is None or shutil.which("runc") is None, reason="needs ctr and runc"),
    pytest.mark.skipif(not (VENV_BIN / "containerd-shim-pyrunc-v2").exists(),
                       reason="containerd-shim-pyrunc-v2 not installed (pip install -e .)"),
    pytest.mark.skipif(not (CONFORMANCE / "make-busybox-image.py").exists(), reason="no conformance kit"),
]


def _env(tmp: Path) -> dict[str, str]:
    """Grouped pyrunc servers (the default) exit with their last container instead of lingering
    (PYRUNC_SHIM_LINGER=0), so that a leak check finds every shim gone."""
    return {"PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
            "PYRUNC_ZYGOTE_DIR": str(tmp / "zygote"), "PYRUNC_ZYGOTE_IDLE": "300", "PYRUNC_SHIM_LINGER": "0"}


@pytest.fixture(scope="module")
def image_tar(tmp_path_factory):
    out = tmp_path_factory.mktemp("img") / "busybox.tar"
    subprocess.run([sys.executable, str(CONFORMANCE / "make-busybox-image.py"), str(out)], check=True,
                   capture_output=True)
    return out


def _start(kind: str) -> Daemon:
    d = Daemon(kind)
    d.env = _env(d.tmp)
    d.start()
    return d


@pytest.fixture(params=["containerd", "pycontainerd"])
def any_daemon(request, image_tar):
    d = None
    try:
        d = _start(request.param)
        ctr = Ctr(d)
        ctr("images", "import", "--base-name", "bb", str(image_tar), timeout=120)
        yield ctr
        ctr.assert_no_leaks()
    finally:
        if d is not None:
            d.cleanup()


@pytest.fixture
def containerd_ctr(image_tar):
    d = None
    try:
        d = _start("containerd")
        ctr = Ctr(d)
        ctr("images", "import", "--base-name", "bb", str(image_tar), timeout=120)
        yield ctr
        ctr.assert_no_leaks()
    finally:
        if d is not None:
            d.cleanup()


class Ctr:
    def __init__(self, daemon: Daemon, namespace: str = "default") -> None:
        self.daemon = daemon
        self.namespace = namespace
        self.ids: list[str] = []

    def __call__(self, *args: str, ok: bool = True, stdin: bytes | None = None, timeout: float = 60):
        cmd = [CTR, "--address", self.daemon.address, "--namespace", self.namespace, *args]
        p = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout)
        if ok and p.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {p.returncode}: {p.stderr.decode(errors='replace')}"
                                 f"\n--- daemon log ---\n{self.daemon.log()[-3000:]}")
        return p

    def id(self, prefix: str) -> str:
        cid = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.ids.append(cid)
        return cid

    def shim_processes(self) -> list[int]:
        needle = self.daemon.address.encode()
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"containerd-shim" in cmdline and needle in cmdline and b"zygote" not in cmdline:
                out.append(int(entry))
        return out

    def assert_no_leaks(self) -> None:
        deadline = time.monotonic() + 10
        while self.shim_processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        problems = []
        if self.shim_processes():
            problems.append(f"shim processes left: {self.shim_processes()}")
        tasks_dir = self.daemon.state / "io.containerd.runtime.v2.task"
        bundles = [str(p) for p in tasks_dir.glob("*/*")] if tasks_dir.exists() else []
        if bundles:
            problems.append(f"bundles left: {bundles}")
        for cid in self.ids:
            # an id does not record which shim ran it: each shim's dirs are checked for it
            name = os.path.basename(launch.socket_path(launch.socket_address(self.daemon.address, self.namespace, cid)))
            for sockets, runc_root in STATE_DIRS.values():
                if os.path.exists(f"{sockets}/{name}"):
                    problems.append(f"shim socket left: {sockets}/{name}")
                if Path(f"{runc_root}/{self.namespace}/{cid}").exists():
                    problems.append(f"runc state left for {cid} in {runc_root}")
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split()[4] for line in f if str(self.daemon.tmp) in line.split()[4]]
        if mounts:
            problems.append(f"mounts left: {mounts}")
        assert problems == [], problems


# ---------------------------------------------------------------------------- scenarios

def test_ctr_run_output_exit_code_and_stdin(any_daemon):
    ctr = any_daemon
    p = ctr("run", "--rm", "--runtime", PYRUNC, "bb:latest", ctr.id("out"), "echo", "hello-pyrunc")
    assert p.stdout.decode().strip() == "hello-pyrunc"
    p = ctr("run", "--rm", "--runtime", PYRUNC, "bb:latest", ctr.id("exit"), "sh", "-c", "exit 3", ok=False)
    assert p.returncode == 3, p.stderr
    p = ctr("run", "--rm", "--runtime", PYRUNC, "bb:latest", ctr.id("in"), "sh", "-c", "read l; echo got:$l",
            stdin=b"line\n")
    assert p.stdout.decode().strip() == "got:line"


def test_conformance_suite_in_full(any_daemon):
    ctr = any_daemon
    p = subprocess.run([sys.executable, str(CONFORMANCE / "ctr-conformance.py"), "--address", ctr.daemon.address,
                        "--runtime", PYRUNC], capture_output=True, timeout=900)
    out = p.stdout.decode(errors="replace")
    assert p.returncode == 0, out + p.stderr.decode(errors="replace")
    assert re.search(r"^(\d+) passed, 0 failed$", out, re.M), out


def test_exec_pause_metrics_and_kill(containerd_ctr):
    ctr = containerd_ctr
    cid = ctr.id("life")
    ctr("run", "-d", "--runtime", PYRUNC, "bb:latest", cid, "sleep", "300")
    try:
        assert ctr("tasks", "exec", "--exec-id", "e1", cid, "echo", "in-exec").stdout.decode().strip() == "in-exec"
        p = ctr("tasks", "exec", "--exec-id", "e2", cid, "sh", "-c", "exit 7", ok=False)
        assert p.returncode == 7
        metrics = ctr("tasks", "metrics", cid).stdout.decode()
        assert re.search(r"pids\.current\s+1", metrics) or "\"pids\"" in metrics, metrics
        ctr("tasks", "pause", cid)
        assert re.search(rf"^{cid}\s+\d+\s+PAUSED", ctr("tasks", "ls").stdout.decode(), re.M)
        ctr("tasks", "resume", cid)
        pid = int(re.search(rf"^{cid}\s+(\d+)", ctr("tasks", "ls").stdout.decode(), re.M).group(1))
        os.kill(pid, signal.SIGKILL)  # the container, behind everyone's back
        deadline = time.monotonic() + 10
        while not re.search(rf"^{cid}\s+\d+\s+STOPPED", ctr("tasks", "ls").stdout.decode(), re.M):
            assert time.monotonic() < deadline, "the kill was not reported"
            time.sleep(0.1)
        ctr("tasks", "rm", cid)
    finally:
        ctr("tasks", "rm", "-f", cid, ok=False)
        ctr("containers", "rm", cid, ok=False)


def _events_of(ctr: Ctr, runtime: str) -> list[str]:
    """The /tasks/* topics (with exec ids) one fixed scenario produces."""
    ev = subprocess.Popen([CTR, "--address", ctr.daemon.address, "events"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    cid = ctr.id("ev")
    try:
        time.sleep(0.5)
        ctr("run", "-d", "--runtime", runtime, "bb:latest", cid, "sleep", "300")
        ctr("tasks", "exec", "--exec-id", "x1", cid, "true")
        ctr("tasks", "pause", cid)
        ctr("tasks", "resume", cid)
        ctr("tasks", "kill", "--signal", "SIGKILL", cid)
        time.sleep(0.5)
        ctr("tasks", "rm", cid)
        ctr("containers", "rm", cid)
        time.sleep(0.5)
    finally:
        ev.terminate()
        out = ev.communicate(timeout=10)[0].decode(errors="replace")
    topics = []
    for line in out.splitlines():
        m = re.search(r" (/tasks/\S+) (\{.*\})$", line)
        if m:
            body = json.loads(m.group(2))
            topics.append(f"{m.group(1)}:{body.get('exec_id') or body.get('id') or ''}:{body.get('exit_status', '')}"
                          .replace(cid, "C"))
    return topics


def test_events_match_the_go_shim(containerd_ctr):
    go = _events_of(containerd_ctr, GORUNC)
    py = _events_of(containerd_ctr, PYRUNC)
    assert go == ["/tasks/create::", "/tasks/start::", "/tasks/exec-added:x1:", "/tasks/exec-started:x1:",
                  "/tasks/exit:x1:", "/tasks/paused::", "/tasks/resumed::", "/tasks/exit:C:137",
                  "/tasks/delete::137"], go
    assert py == go


def test_socket_address_as_the_go_shim_computes_it(containerd_ctr):
    ctr = containerd_ctr
    ids = {GORUNC: ctr.id("addr-go"), PYRUNC: ctr.id("addr-py")}
    try:
        for runtime, cid in ids.items():
            ctr("run", "-d", "--runtime", runtime, "bb:latest", cid, "sleep", "300")
        for runtime, cid in ids.items():
            bundle = ctr.daemon.state / "io.containerd.runtime.v2.task" / "default" / cid
            # containerd's hashing for both, of the task id for the Go shim and of the first slot's
            # group for ours (grouped servers); the Go shim's dir is containerd's, ours is ours
            group = cid if runtime == GORUNC else launch.shared_group(0)
            name = os.path.basename(launch.socket_path(launch.socket_address(ctr.daemon.address, "default", group)))
            assert (bundle / "address").read_text() == f"unix://{STATE_DIRS[runtime][0]}/{name}"
    finally:
        for cid in ids.values():
            ctr("tasks", "kill", "--signal", "SIGKILL", cid, ok=False)
        time.sleep(0.5)
        for cid in ids.values():
            ctr("tasks", "rm", "-f", cid, ok=False)
            ctr("containers", "rm", cid, ok=False)


def test_killed_shim_is_cleaned_up_and_reported(containerd_ctr):
    ctr = containerd_ctr
    cid = ctr.id("dead")
    ev = subprocess.Popen([CTR, "--address", ctr.daemon.address, "events"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    try:
        time.sleep(0.5)
        ctr("run", "-d", "--runtime", PYRUNC, "bb:latest", cid, "sleep", "300")
        pid = int(re.search(rf"^{cid}\s+(\d+)", ctr("tasks", "ls").stdout.decode(), re.M).group(1))
        shims = ctr.shim_processes()
        assert len(shims) == 1
        os.kill(shims[0], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while cid in ctr("tasks", "ls", "-q").stdout.decode().split():
            assert time.monotonic() < deadline, "containerd still lists the task"
            time.sleep(0.1)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists():
            assert time.monotonic() < deadline, "the container outlived its shim's cleanup"
            time.sleep(0.1)
    finally:
        time.sleep(0.5)
        ev.terminate()
        out = ev.communicate(timeout=10)[0].decode(errors="replace")
        ctr("containers", "rm", cid, ok=False)
    assert re.search(rf'/tasks/exit \{{"container_id":"{cid}".*"exit_status":137', out), out


def test_containerd_restart_reconnects_to_running_shims(containerd_ctr):
    """containerd restarts: it reloads the task from the bundle's `address` and keeps driving our
    shim (exec, kill, delete), and the shim's events reach the new containerd."""
    ctr = containerd_ctr
    cid = ctr.id("restart")
    ctr("run", "-d", "--runtime", PYRUNC, "bb:latest", cid, "sleep", "300")
    try:
        shims = ctr.shim_processes()
        ctr.daemon.stop()
        ctr.daemon.start()
        assert ctr.shim_processes() == shims, "the shim must survive containerd's restart"
        assert re.search(rf"^{cid}\s+\d+\s+RUNNING", ctr("tasks", "ls").stdout.decode(), re.M)
        assert ctr("tasks", "exec", "--exec-id", "x", cid, "echo", "after").stdout.decode().strip() == "after"
        ev = subprocess.Popen([CTR, "--address", ctr.daemon.address, "events"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
        try:
            time.sleep(0.5)
            ctr("tasks", "kill", "--signal", "SIGKILL", cid)
            deadline = time.monotonic() + 10
            while not re.search(rf"^{cid}\s+\d+\s+STOPPED", ctr("tasks", "ls").stdout.decode(), re.M):
                assert time.monotonic() < deadline, "the kill was not reported after the restart"
                time.sleep(0.1)
            ctr("tasks", "rm", cid)
            time.sleep(0.5)
        finally:
            ev.terminate()
            out = ev.communicate(timeout=10)[0].decode(errors="replace")
        assert re.search(rf'/tasks/exit \{{"container_id":"{cid}"', out), out
    finally:
        ctr("tasks", "rm", "-f", cid, ok=False)
        ctr("containers", "rm", cid, ok=False)
