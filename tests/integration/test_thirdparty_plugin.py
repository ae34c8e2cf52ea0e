"""A third-party plugin package, installed the way users install one, loaded and served by the daemon.

examples/pycontainerd-greeter is pip-installed into the interpreter's venv for this module (and
uninstalled afterwards, so the venv is left as found). The real `pycontainerd` runs as a
subprocess with a config.toml that configures the plugin, then disables it, then brings it back;
the stock `ctr` (and `pyctr`, once it exists) must list it, and grpclib calls it through the
example's own generated stub. A second case loads an unpackaged module named by `plugin_modules`.

Needs no root: the greeter touches nothing but its own root directory.
"""
from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "pycontainerd-greeter"
DIST = "pycontainerd-greeter"
GREETER = ("io.containerd.grpc.v1", "greeter")
NS_HEADER = "containerd-namespace"
BIN = Path(sys.executable).parent  # the venv running the tests is the one the daemon runs from
PYCONTAINERD = BIN / "pycontainerd"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0

pytestmark = pytest.mark.skipif(not PYCONTAINERD.exists(), reason=f"{PYCONTAINERD} is not installed")


# ---------------------------------------------------------------------------------------- helpers

def pip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"pip {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


class DaemonProcess:
    """One `pycontainerd` subprocess over a short temp dir holding its root, state, socket and log.

    The directory survives `stop()`, so a restart with a new config finds the same root and state;
    `cleanup()` stops the daemon if it runs and removes the directory.
    """

    def __init__(self, env: dict[str, str] | None = None):
        # Short and under /tmp: a unix socket path must fit in 107 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="pcg", dir="/tmp"))
        self.address = str(self.dir / "d.sock")
        self.config = self.dir / "config.toml"
        self.log = self.dir / "daemon.log"
        self.env = dict(os.environ, **(env or {}))
        self.proc: subprocess.Popen | None = None

    def start(self, config_toml: str) -> None:
        assert self.proc is None, "daemon already running"
        self.config.write_text(textwrap.dedent(config_toml))
        Path(self.address).unlink(missing_ok=True)  # never mistake a stale socket for the new daemon
        with open(self.log, "ab") as log:
            log.write(f"--- start with config:\n{self.config.read_text()}---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [str(PYCONTAINERD), "--config", str(self.config), "--root", str(self.dir / "r"),
                 "--state", str(self.dir / "s"), "--address", self.address, "--log-level", "debug"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.proc = None
                raise AssertionError(f"pycontainerd exited with {rc} before serving\n{self.log_text()}")
            if self._connectable():
                return
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"pycontainerd did not serve {self.address} in {START_TIMEOUT}s\n{self.log_text()}")

    def _connectable(self) -> bool:
        if not os.path.exists(self.address):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(self.address)
            except OSError:
                return False
        return True

    def stop(self) -> int | None:
        """SIGTERM (a clean shutdown: plugins' close runs), SIGKILL after STOP_TIMEOUT. Returns rc."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what it started
                proc.wait()
        return proc.returncode

    def restart(self, config_toml: str) -> None:
        rc = self.stop()
        assert rc == 0, f"pycontainerd exited with {rc} on SIGTERM\n{self.log_text()}"
        self.start(config_toml)

    def cleanup(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self, tail: int = 80) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no daemon log)"
        return "--- daemon log (tail) ---\n" + "\n".join(lines[-tail:])


def plugin_table(daemon: DaemonProcess, *cmd: str) -> dict[tuple[str, str], str]:
    """`<cmd> -a ADDRESS plugins ls` as {(type, id): status}; status is the last column."""
    done = subprocess.run([*cmd, "-a", daemon.address, "plugins", "ls"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, (f"{' '.join(cmd)} plugins ls failed ({done.returncode}): {done.stderr}\n"
                                  f"{daemon.log_text()}")
    rows = {}
    for line in done.stdout.splitlines():
        cols = line.split()
        if len(cols) >= 3 and cols[0].startswith("io.containerd."):
            rows[(cols[0], cols[1])] = cols[-1]
    assert rows, f"{' '.join(cmd)} plugins ls listed nothing:\n{done.stdout}"
    return rows


def listers() -> list[tuple[str, ...]]:
    """The clients that must agree on `plugins ls`: the stock ctr, and pyctr once it is written."""
    found = []
    if shutil.which("ctr"):
        found.append(("ctr",))
    if (BIN / "pyctr").exists() and importlib.util.find_spec("pycontainerd.cmd.pyctr") is not None:
        found.append((str(BIN / "pyctr"),))
    if not found:
        pytest.skip("neither the stock ctr nor pyctr is available")
    return found


def plugin_tables(daemon: DaemonProcess) -> dict[str, dict[tuple[str, str], str]]:
    return {cmd[0]: plugin_table(daemon, *cmd) for cmd in listers()}


async def call(daemon: DaemonProcess, method: str, request, namespace: str | None = "default"):
    from pycontainerd_greeter.gen.greeter import v1 as api

    channel = Channel(path=daemon.address)
    try:
        stub = api.GreeterStub(channel, metadata={NS_HEADER: namespace} if namespace else None)
        return await asyncio.wait_for(getattr(stub, method)(request), 30)
    finally:
        channel.close()


async def grpc_error(daemon: DaemonProcess, method: str, request, namespace: str | None = "default") -> GRPCError:
    with pytest.raises(GRPCError) as info:
        await call(daemon, method, request, namespace)
    return info.value


# --------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def greeter_installed():
    """The example installed non-editable from a copy (so no build/ or egg-info lands in the tree)."""
    already = pip("show", "-q", DIST, check=False).returncode == 0
    work = Path(tempfile.mkdtemp(prefix="pcg-src", dir="/tmp"))
    try:
        if not already:
            src = work / "pycontainerd-greeter"
            shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
            # No build isolation: build with the venv's setuptools, without reaching for an index.
            pip("install", "-q", "--no-build-isolation", str(src))
        importlib.invalidate_caches()
        yield
    finally:
        try:
            if not already:
                pip("uninstall", "-y", "-q", DIST, check=False)
                for name in [m for m in sys.modules if m == "pycontainerd_greeter" or m.startswith("pycontainerd_greeter.")]:
                    del sys.modules[name]
        finally:
            shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def daemons():
    """Start daemons with `daemons(env=...)`; every one is stopped and its directory removed."""
    started: list[DaemonProcess] = []

    def make(env: dict[str, str] | None = None) -> DaemonProcess:
        d = DaemonProcess(env)
        started.append(d)
        return d

    try:
        yield make
    finally:
        for d in started:
            d.cleanup()


# ------------------------------------------------------------------------------------------ tests

def test_installed_distribution_declares_the_entry_point(greeter_installed):
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="pycontainerd.plugins") if ep.value == "pycontainerd_greeter.plugin"]
    assert eps, "pycontainerd-greeter does not declare a pycontainerd.plugins entry point"
    from pycontainerd.core.initgraph import collect

    reg = collect([], ()).get("io.containerd.grpc.v1.greeter")
    assert reg is not None, "the entry point's module did not register io.containerd.grpc.v1.greeter"
    assert reg.default_config().greeting == "hello" and reg.default_config().shout is False


def test_generated_module_is_fresh(tmp_path):
    """The committed betterproto module is what generate.py makes from the committed .proto."""
    pytest.importorskip("grpc_tools")
    done = subprocess.run([sys.executable, str(EXAMPLE / "generate.py"), str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    committed = EXAMPLE / "src" / "pycontainerd_greeter" / "gen"
    fresh = {p.relative_to(tmp_path): p.read_text() for p in tmp_path.rglob("*.py")}
    ours = {p.relative_to(committed): p.read_text() for p in committed.rglob("*.py")}
    assert fresh == ours, "src/pycontainerd_greeter/gen is stale: run `python generate.py` in the example"


async def test_configured_served_listed_disabled_and_back(greeter_installed, daemons):
    from pycontainerd_greeter.gen.greeter import v1 as api

    d = daemons()
    d.start("""
        version = 2

        [plugins."io.containerd.grpc.v1.greeter"]
          greeting = "ahoy"
    """)

    for client, table in plugin_tables(d).items():
        assert table.get(GREETER) == "ok", f"{client} plugins ls: greeter is {table.get(GREETER)!r}\n{table}"

    first = await call(d, "greet", api.GreetRequest(name="world"), namespace="ns1")
    assert (first.message, first.namespace, first.count) == ("ahoy, world!", "ns1", 1)
    second = await call(d, "greet", api.GreetRequest(name="  sailor "), namespace="ns1")
    assert (second.message, second.count) == ("ahoy, sailor!", 2)
    other = await call(d, "greet", api.GreetRequest(name="world"), namespace="ns2")
    assert (other.namespace, other.count) == ("ns2", 1)

    # Errors raised as errdefs in the plugin arrive as gRPC statuses, mapped by the daemon.
    err = await grpc_error(d, "greet", api.GreetRequest(name="world"), namespace=None)
    assert err.status == Status.FAILED_PRECONDITION and "namespace is required" in (err.message or "")
    err = await grpc_error(d, "greet", api.GreetRequest(name=" "), namespace="ns1")
    assert err.status == Status.INVALID_ARGUMENT and "name" in (err.message or "")

    stats = await call(d, "stats", api.StatsRequest())
    assert (stats.greeting, stats.calls, stats.total) == ("ahoy", {"ns1": 2, "ns2": 1}, 3)

    # Disabled: not initialised, not listed, not served (UNIMPLEMENTED, not a transport error).
    d.restart("""
        version = 2
        disabled_plugins = ["io.containerd.grpc.v1.greeter"]

        [plugins."io.containerd.grpc.v1.greeter"]
          greeting = "ahoy"
    """)
    for client, table in plugin_tables(d).items():
        assert GREETER not in table, f"{client} plugins ls still lists the disabled greeter: {table[GREETER]}"
        assert table.get(("io.containerd.grpc.v1", "version")) == "ok", f"{client}: built-ins must stay: {table}"
    err = await grpc_error(d, "greet", api.GreetRequest(name="world"), namespace="ns1")
    assert err.status == Status.UNIMPLEMENTED, err

    # Back, shouting: the counts the first run saved on its clean shutdown are still there.
    d.restart("""
        version = 2

        [plugins."io.containerd.grpc.v1.greeter"]
          greeting = "ahoy"
          shout = true
    """)
    again = await call(d, "greet", api.GreetRequest(name="world"), namespace="ns1")
    assert (again.message, again.count) == ("AHOY, WORLD!", 3)
    stats = await call(d, "stats", api.StatsRequest())
    assert (stats.calls, stats.total) == ({"ns1": 3, "ns2": 1}, 4)


PLUGIN_MODULE = '''
"""An unpackaged plugin module, loaded only because config's plugin_modules names it."""
from dataclasses import dataclass

from pycontainerd.core.plugin import PluginSkip, PluginType, Registration, hookimpl


@dataclass
class Config:
    word: str = "unset"


async def init_ok(ctx):
    ctx.meta.exports["word"] = ctx.config.word
    return object()


async def init_skip(ctx):
    raise PluginSkip("nothing to do on this machine")


@hookimpl
def pycontainerd_register(registry):
    registry.register(Registration(PluginType.INTERNAL, "tp-module", init_ok, config=Config))
    registry.register(Registration(PluginType.INTERNAL, "tp-skipper", init_skip))
'''


async def test_plugin_modules_and_a_failing_third_party_plugin(greeter_installed, daemons):
    """`plugin_modules` loads a module from PYTHONPATH; a plugin whose init fails is listed as
    `error` and not served, while the daemon and every other plugin carry on."""
    from pycontainerd_greeter.gen.greeter import v1 as api

    mods = Path(tempfile.mkdtemp(prefix="pcg-mod", dir="/tmp"))
    try:
        (mods / "pcg_thirdparty_module.py").write_text(PLUGIN_MODULE)
        pythonpath = os.pathsep.join(filter(None, [str(mods), os.environ.get("PYTHONPATH")]))
        d = daemons(env={"PYTHONPATH": pythonpath})
        d.start("""
            version = 2
            plugin_modules = ["pcg_thirdparty_module"]

            [plugins."io.containerd.internal.v1.tp-module"]
              word = "configured"

            [plugins."io.containerd.grpc.v1.greeter"]
              greeting = ""
        """)
        for client, table in plugin_tables(d).items():
            assert table.get(("io.containerd.internal.v1", "tp-module")) == "ok", f"{client}: {table}"
            assert table.get(("io.containerd.internal.v1", "tp-skipper")) == "skip", f"{client}: {table}"
            assert table.get(GREETER) == "error", f"{client}: an empty greeting must fail init: {table}"
        err = await grpc_error(d, "greet", api.GreetRequest(name="world"), namespace="ns1")
        assert err.status == Status.UNIMPLEMENTED, err
    finally:
        shutil.rmtree(mods, ignore_errors=True)
