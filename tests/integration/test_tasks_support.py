"""Helpers for the task and restart tests (no tests here): a real daemon with the Go shim and the
stock ctr, a busybox rootfs directory, an event recorder, leak checks, and a cleanup that leaves
nothing behind — containers killed through runc, shims killed, mounts unmounted, shim sockets,
bundles and runc state removed — whatever the test did.

Every environment works in namespaces of its own, so runc state and shim sockets of other tests
(or of other people's daemons on this machine) are never touched.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from daemons import Daemon, kill_processes_under, unmount_under
from pycontainerd.plugins.runtime.v2.runc import launch

CTR = shutil.which("ctr")
SHIM = shutil.which("containerd-shim-runc-v2")
RUNC = shutil.which("runc")
BUSYBOX = shutil.which("busybox") or "/usr/bin/busybox"
RUNTIME = "io.containerd.runc.v2"
# containerd's Go shims keep runc state and (v2) sockets under containerd's dirs; our Python shims
# (and the sockets our v1 runtime creates) under ours. A TaskEnv checks the pair of its shim.
GO_RUNC_ROOT = Path("/run/containerd/runc")
GO_SHIM_SOCKETS = Path("/run/containerd/s")
PY_RUNC_ROOT = Path(launch.RUNC_ROOT)
PY_SHIM_SOCKETS = Path(launch.SOCKET_ROOT)
V2 = "io.containerd.runtime.v2.task"

requirements = [
    pytest.mark.root,
    pytest.mark.compat,
    pytest.mark.skipif(CTR is None, reason="the stock ctr is not installed"),
    pytest.mark.skipif(SHIM is None, reason="containerd-shim-runc-v2 is not installed"),
    pytest.mark.skipif(RUNC is None, reason="runc is not installed"),
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="busybox-static is not installed"),
]


def make_rootfs(path: Path) -> Path:
    """A minimal root filesystem: a static busybox with its applets linked in /bin."""
    for d in ("bin", "proc", "dev", "sys", "tmp", "etc", "root"):
        (path / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, path / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for name in applets:
        if name != "busybox" and not (path / "bin" / name).exists():
            os.symlink("busybox", path / "bin" / name)
    (path / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (path / "etc" / "group").write_text("root:x:0:\n")
    return path


def shim_socket(address: str, namespace: str, id: str, root: Path = GO_SHIM_SOCKETS) -> Path:
    """Where a shim listens for task `id` (runtime/v2/shim SocketAddress): containerd-shim-runc-v2
    under /run/containerd/s, ours (root=PY_SHIM_SOCKETS) under /run/pycontainerd/s."""
    return root / hashlib.sha256(f"{address}/{namespace}/{id}".encode()).hexdigest()


def _cmdline(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


class Events:
    """`ctr events` in the background, its lines collected as (namespace, topic, payload dict)."""

    LINE = re.compile(r"^\S+ \S+ \S+ \S+ (\S+) (\S+)(?: (.*))?$")

    def __init__(self, address: str):
        self.proc = subprocess.Popen([CTR, "-a", address, "events"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._wait_subscribed(address)

    def _wait_subscribed(self, address: str, timeout: float = 60.0) -> None:
        """ctr prints nothing once it has subscribed (and takes a while to on a loaded machine):
        publish a probe event (a namespace made and removed) until it shows up."""
        probe = f"probe-{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + timeout
        while True:
            for action in ("create", "remove"):
                subprocess.run([CTR, "-a", address, "namespaces", action, probe], capture_output=True,
                               timeout=60)
            seen_by = min(deadline, time.monotonic() + 1.0)
            while time.monotonic() < seen_by:
                with self._lock:
                    if any(probe in line for line in self.lines):
                        return
                time.sleep(0.02)
            if time.monotonic() >= deadline or self.proc.poll() is not None:
                raise AssertionError("ctr events never saw its probe event:\n" + "\n".join(self.lines[-20:]))

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def events(self, namespace: str | None = None) -> list[tuple[str, str, dict]]:
        out = []
        with self._lock:
            lines = list(self.lines)
        for line in lines:
            m = self.LINE.match(line)
            if not m:
                continue
            try:
                payload = json.loads(m.group(3)) if m.group(3) else {}
            except ValueError:
                payload = {}
            if namespace is None or m.group(1) == namespace:
                out.append((m.group(1), m.group(2), payload))
        return out

    def topics(self, namespace: str | None = None, id: str | None = None) -> list[str]:
        return [t for _, t, p in self.events(namespace)
                if id is None or p.get("container_id", p.get("id")) == id]

    def wait_for(self, predicate, timeout: float = 60.0, what: str = "events") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; saw:\n" + "\n".join(self.lines[-40:]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class TaskEnv:
    """A real pycontainerd with everything a task test needs, and a cleanup that never leaks.
    `runc_root` and `shim_sockets` are where its shims keep runc state and sockets: the Go shim's
    by default, PY_RUNC_ROOT / PY_SHIM_SOCKETS for environments that run our Python shims."""

    def __init__(self, daemon: Daemon | None = None, *, runc_root: Path = GO_RUNC_ROOT,
                 shim_sockets: Path = GO_SHIM_SOCKETS):
        self.daemon = daemon or Daemon("pycontainerd")
        self.runc_root = runc_root
        self.shim_sockets = shim_sockets
        self.ns = f"tt{uuid.uuid4().hex[:10]}"
        self.namespaces = {self.ns}
        self.rootfs = make_rootfs(self.daemon.tmp / "rootfs")
        self.events: list[Events] = []

    @property
    def address(self) -> str:
        return self.daemon.address

    @property
    def bundle_root(self) -> Path:
        return self.daemon.state / V2

    @property
    def work_root(self) -> Path:
        return self.daemon.root / V2

    # ---------------------------------------------------------------- ctr
    def ctr(self, *args: str, ns: str | None = None, check: bool = True, input: str | bytes | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        ns = ns or self.ns
        self.namespaces.add(ns)
        text = not isinstance(input, bytes)
        p = subprocess.run([CTR, "-a", self.address, "-n", ns, *args], capture_output=True, text=text,
                           input=input, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} exited {p.returncode}: {p.stderr}\n--- daemon log\n"
                                 f"{self.daemon.log()}")
        return p

    def run(self, id: str, *cmd: str, detach: bool = False, rm: bool = True, env: dict | None = None,
            check: bool = True, input: str | None = None, ns: str | None = None,
            runtime: str = RUNTIME) -> subprocess.CompletedProcess:
        args = ["run", "--runtime", runtime]
        if detach:
            args.append("-d")
        elif rm:
            args.append("--rm")
        for k, v in (env or {}).items():
            args += ["--env", f"{k}={v}"]
        # --rootfs is a flag: the directory takes the image's place
        return self.ctr(*args, "--rootfs", str(self.rootfs), id, *cmd, check=check, input=input, ns=ns)

    def tasks(self, ns: str | None = None) -> dict[str, tuple[int, str]]:
        """`ctr tasks ls` as {id: (pid, status)}."""
        out = self.ctr("tasks", "ls", ns=ns).stdout.splitlines()[1:]
        rows = {}
        for line in out:
            parts = line.split()
            if len(parts) >= 3:
                rows[parts[0]] = (int(parts[1]), parts[2])
        return rows

    def wait_status(self, id: str, status: str, timeout: float = 60, ns: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.tasks(ns).get(id, (0, ""))[1] == status:
                return
            time.sleep(0.1)
        raise AssertionError(f"task {id} not {status}: {self.tasks(ns)}")

    def subscribe(self) -> Events:
        ev = Events(self.address)
        self.events.append(ev)
        return ev

    # ---------------------------------------------------------------- what is running
    def shim_pids(self, id: str | None = None) -> list[int]:
        """Live shims started by this daemon (their -address is ours), optionally for task `id` (a
        shared pyrunc server shows the id of the container it was started for)."""
        found = []
        needle = self.address.encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            argv = _cmdline(int(entry))
            if not argv or b"containerd-shim" not in argv[0] or needle not in argv or argv[1:2] == [b"zygote"]:
                continue  # not a shim of ours (pyrunc's zygote, which cleanup() ends, is none)
            if id is not None and (b"-id" not in argv or id.encode() not in argv):
                continue
            if _alive(int(entry)):
                found.append(int(entry))
        return found

    def bundles(self) -> list[Path]:
        if not self.bundle_root.is_dir():
            return []
        return sorted(p for ns in self.bundle_root.iterdir() if ns.is_dir() for p in ns.iterdir())

    def work_dirs(self) -> list[Path]:
        if not self.work_root.is_dir():
            return []
        return sorted(p for ns in self.work_root.iterdir() if ns.is_dir() for p in ns.iterdir())

    def mounts(self) -> list[str]:
        prefix = str(self.daemon.tmp)
        with open("/proc/self/mountinfo") as f:
            return [line.split()[4] for line in f
                    if line.split()[4] == prefix or line.split()[4].startswith(prefix + "/")]

    def runc_containers(self) -> list[tuple[str, str]]:
        found = []
        for ns in self.namespaces:
            root = self.runc_root / ns
            if root.is_dir():
                found += [(ns, d.name) for d in root.iterdir() if d.is_dir()]
        return found

    def sockets(self, ids: list[tuple[str, str]]) -> list[Path]:
        return [s for ns, id in ids if (s := shim_socket(self.address, ns, id, self.shim_sockets)).exists()]

    def assert_no_leaks(self, ids: list[tuple[str, str]] = (), timeout: float = 60) -> None:
        """No shim, bundle, work dir, mount under the daemon's dirs, runc container or shim
        socket is left (waits a little: shims exit just after answering Shutdown)."""
        deadline = time.monotonic() + timeout
        while True:
            leaks = {"shims": self.shim_pids(), "bundles": self.bundles(), "work dirs": self.work_dirs(),
                     "mounts": self.mounts(), "runc containers": self.runc_containers(),
                     "shim sockets": self.sockets(list(ids))}
            leaks = {k: v for k, v in leaks.items() if v}
            if not leaks or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert not leaks, f"leaked: {leaks}\n--- daemon log\n{self.daemon.log()}"

    # ---------------------------------------------------------------- cleanup
    def cleanup(self) -> None:
        for ev in self.events:
            ev.stop()
        ids = {(b.parent.name, b.name) for b in self.bundles()} | set(self.runc_containers())
        self.daemon.stop()
        for ns, id in sorted(ids):
            subprocess.run([RUNC or "runc", "--root", str(self.runc_root / ns), "delete", "--force", id],
                           capture_output=True, timeout=30)
        for pid in self.shim_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        kill_processes_under(self.daemon.tmp)
        unmount_under(self.daemon.tmp)
        for ns, id in ids:
            with contextlib.suppress(OSError):
                shim_socket(self.address, ns, id, self.shim_sockets).unlink()
        for ns in self.namespaces:
            with contextlib.suppress(OSError):
                (self.runc_root / ns).rmdir()
        self.daemon.cleanup()


@contextlib.contextmanager
def task_env(daemon_env: dict | None = None, **kwargs):
    """A started TaskEnv (`kwargs` for TaskEnv, `daemon_env` for the daemon's environment)."""
    env = TaskEnv(**kwargs)
    env.daemon.env = daemon_env
    try:
        env.daemon.start()
        yield env
    finally:
        env.cleanup()
