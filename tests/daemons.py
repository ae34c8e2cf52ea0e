"""Real daemons for tests: ours (`pycontainerd`) and the stock containerd, each on private temp
root/state/socket paths, stopped and cleaned up without a trace (processes started under the temp
dir such as shims and containers, mounts under it, the dir itself) even when a test fails.

Fixtures in tests/conftest.py wrap these; tests may also use `Daemon` directly.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Callable

from pycontainerd.plugins.runtime.v2.runc import launch

VENV_BIN = Path(sys.executable).parent
PYCONTAINERD = str(VENV_BIN / "pycontainerd")
CONTAINERD = shutil.which("containerd") or "/usr/bin/containerd"


def short_tmpdir(prefix: str) -> Path:
    """A temp dir under /tmp with a short path: unix socket paths must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def containerd_config(tmp: Path, address: str) -> str:
    """containerd kept entirely inside tmp: no CRI, no /opt, no debug or metrics sockets."""
    return (f'version = 2\nroot = "{tmp}/root"\nstate = "{tmp}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{address}"\n[ttrpc]\n  address = "{address}.ttrpc"\n'
            '[debug]\n  address = ""\n[metrics]\n  address = ""\n'
            f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{tmp}/opt"\n')


class Daemon:
    """One daemon process. kind is "pycontainerd" (ours) or "containerd" (the reference)."""

    def __init__(self, kind: str = "pycontainerd", config: str = "", tmp: Path | None = None,
                 extra_args: tuple[str, ...] = (), env: dict | None = None):
        self.kind = kind
        self.tmp = tmp or short_tmpdir("pcd-" if kind == "pycontainerd" else "ctd-")
        self.address = str(self.tmp / "d.sock")
        self.log_path = self.tmp / "daemon.log"
        self.config_path = self.tmp / "config.toml"
        if kind == "containerd":
            config = config or containerd_config(self.tmp, self.address)
        self.config_path.write_text(config)
        self.extra_args, self.env = extra_args, env
        self.proc: subprocess.Popen | None = None

    @property
    def root(self) -> Path:
        return self.tmp / "root"

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    def argv(self) -> list[str]:
        if self.kind == "containerd":
            return [CONTAINERD, "--config", str(self.config_path), *self.extra_args]
        return [PYCONTAINERD, "--config", str(self.config_path), "--root", str(self.root),
                "--state", str(self.state), "--address", self.address, *self.extra_args]

    def start(self, timeout: float = 60.0, wait: bool = True) -> "Daemon":
        env = dict(os.environ, **(self.env or {}))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        if wait:
            self.wait_ready(timeout)
        return self

    @property
    def ttrpc_address(self) -> str | None:
        """Our daemon's ttrpc socket (`[ttrpc] address`, else `<address>.ttrpc`)."""
        if self.kind != "pycontainerd":
            return None
        try:
            configured = tomllib.loads(self.config_path.read_text()).get("ttrpc", {}).get("address")
        except (OSError, tomllib.TOMLDecodeError):
            configured = None
        return configured or self.address + ".ttrpc"

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until every socket answers: ours serves gRPC a moment before ttrpc."""
        sockets = [self.address] + ([self.ttrpc_address] if self.ttrpc_address else [])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited {self.proc.returncode}:\n{self.log()}")
            if all(os.path.exists(path) and _answers(path) for path in sockets):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.kind} not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Signal the daemon and wait; SIGKILL after `timeout`. Returns its exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def cleanup(self) -> None:
        """Stop the daemon, end every process started under tmp (containers too), unmount,
        remove tmp."""
        self.stop()
        kill_processes_under(self.tmp)
        delete_containers_under(self.tmp)
        unmount_under(self.tmp)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()


def _answers(path: str) -> bool:
    import socket
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


class EventWatcher:
    """`ctr events` (or any line printer) in the background, its lines collected as they come.

    Subscribing takes the child a while (a loaded machine: seconds), so never sleep and hope:
    `wait_subscribed(probe, seen)` repeats a probe action until its event shows up, and
    `wait_for(predicate)` waits for the events a test expects."""

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.lines):
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._thread.is_alive()):
                    return predicate(self.lines)
                self._cond.wait(min(left, 0.5))
            return True

    def wait_subscribed(self, probe: Callable[[], None], seen: Callable[[str], bool],
                        timeout: float = 60.0) -> None:
        """Run `probe` (which publishes an event) until a line for which `seen` holds arrives."""
        deadline = time.monotonic() + timeout
        while True:
            probe()
            if self.wait_for(lambda lines: any(seen(line) for line in lines), timeout=1.0):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"event subscriber never saw its probe: {self.lines}")

    def stop(self, sig: int = signal.SIGTERM) -> str:
        """End the child; everything it printed."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._thread.join(10)
        return "\n".join(self.lines) + "\n"


def kill_processes_under(path: Path) -> None:
    """SIGKILL every process whose command line mentions `path` (shims, containers' init)."""
    needle = str(path).encode()
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


# runc roots of containerd's Go shims and of ours (runc keeps its state there, per namespace)
RUNC_ROOTS = (Path("/run/containerd/runc"), Path(launch.RUNC_ROOT))


def delete_containers_under(path: Path) -> None:
    """`runc delete --force` every container whose bundle is under `path`: a container's
    processes do not mention the temp dir in their command lines, and a killed shim leaves them
    running (reparented to init)."""
    prefix = f"bundle={path}/".encode()
    for root in RUNC_ROOTS:
        for state in root.glob("*/*/state.json"):
            try:
                if prefix not in state.read_bytes():
                    continue
            except OSError:
                continue
            subprocess.run(["runc", "--root", str(state.parent.parent), "delete", "--force", state.parent.name],
                           capture_output=True, timeout=60)


def unmount_under(path: Path) -> None:
    """Lazily unmount everything mounted at or below `path`, deepest first."""
    prefix = str(path)
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4].replace("\\040", " ")
            if target == prefix or target.startswith(prefix + "/"):
                mounts.append(target)
    for target in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)
