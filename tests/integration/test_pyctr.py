"""pyctr (the installed console script, run as a subprocess) against a real daemon.

The server is swappable: `start_server(kind, tmp)` starts "containerd" (the stock 1.6 daemon,
the default) or "pycontainerd" (ours) in a private root/state under `tmp` and returns its socket
path; PYCTR_TEST_SERVER=pycontainerd runs the whole module against our daemon. Every test also
checks that pyctr never prints a traceback.
"""
from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Optional

import pytest

pytestmark = [pytest.mark.root, pytest.mark.compat]

SERVER_KIND = os.environ.get("PYCTR_TEST_SERVER", "containerd")
VENV_BIN = Path(sys.executable).parent
PYCTR = str(VENV_BIN / "pyctr") if (VENV_BIN / "pyctr").exists() else (shutil.which("pyctr") or "pyctr")
STOCK_CTR = shutil.which("ctr")


# -- the server --------------------------------------------------------------------------------

@dataclass
class _Running:
    kind: str
    proc: subprocess.Popen
    tmp: Path
    log_path: Path
    extra: dict = field(default_factory=dict)


_RUNNING: dict[str, _Running] = {}


def _containerd_config(tmp: Path, address: str) -> Path:
    """A config that keeps containerd entirely inside tmp: no CRI, no /opt, no debug/metrics."""
    cfg = tmp / "empty-config.toml"
    cfg.write_text(
        "version = 2\n"
        f'root = "{tmp / "root"}"\n'
        f'state = "{tmp / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        "[grpc]\n"
        f'  address = "{address}"\n'
        "[ttrpc]\n"
        f'  address = "{address}.ttrpc"\n'
        "[debug]\n"
        '  address = ""\n'
        "[metrics]\n"
        '  address = ""\n'
        '[plugins."io.containerd.internal.v1.opt"]\n'
        f'  path = "{tmp / "opt"}"\n'
    )
    return cfg


def _pycontainerd_config(tmp: Path, address: str) -> Path:
    cfg = tmp / "config.toml"
    cfg.write_text(
        "version = 2\n"
        f'root = "{tmp / "root"}"\n'
        f'state = "{tmp / "state"}"\n'
        "[grpc]\n"
        f'  address = "{address}"\n'
        "[ttrpc]\n"
        f'  address = "{address}.ttrpc"\n'
    )
    return cfg


def _server_command(kind: str, tmp: Path, address: str) -> list[str]:
    if kind == "containerd":
        binary = shutil.which("containerd")
        if binary is None:
            pytest.skip("containerd is not installed")
        cfg = _containerd_config(tmp, address)
    elif kind == "pycontainerd":
        binary = str(VENV_BIN / "pycontainerd")
        cfg = _pycontainerd_config(tmp, address)
    else:
        raise ValueError(f"unknown server kind {kind!r}")
    return [binary, "--root", str(tmp / "root"), "--state", str(tmp / "state"),
            "--address", address, "--config", str(cfg)]


def _answers(address: str) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(1)
        sock.connect(address)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def start_server(kind: str, tmp: Path) -> str:
    """Start a daemon of `kind` ("containerd" or "pycontainerd") with everything under `tmp`
    (keep it short: socket paths are limited to 107 bytes) and return its gRPC socket path once
    it accepts connections. `stop_server(address)` ends it."""
    tmp = Path(tmp)
    address = str(tmp / "c.sock")
    cmd = _server_command(kind, tmp, address)
    log_path = tmp / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    _RUNNING[address] = _Running(kind, proc, tmp, log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log_tail = log_path.read_text(errors="replace")[-3000:]
            stop_server(address)
            pytest.fail(f"{kind} exited with {proc.returncode} while starting:\n{log_tail}")
        if os.path.exists(address) and _answers(address):
            return address
        time.sleep(0.05)
    log_tail = log_path.read_text(errors="replace")[-3000:]
    stop_server(address)
    pytest.fail(f"{kind} did not open {address} within 30s:\n{log_tail}")
    raise AssertionError("unreachable")


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mountpoint = line.split()[4].encode().decode("unicode_escape")
            if mountpoint == str(path) or mountpoint.startswith(prefix):
                found.append(mountpoint)
    return found


def stop_server(address: str) -> None:
    """Stop the daemon started for `address`, unmount whatever it left mounted and remove its dir."""
    running = _RUNNING.pop(address, None)
    if running is None:
        return
    proc = running.proc
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
    finally:
        for mountpoint in sorted(_mounts_under(running.tmp), key=len, reverse=True):
            subprocess.run(["umount", "-l", mountpoint], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(running.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def server():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    tmp = Path(tempfile.mkdtemp(prefix="pyctr-", dir="/tmp"))
    address = None
    try:
        address = start_server(SERVER_KIND, tmp)
        yield address
    finally:
        if address is not None:
            stop_server(address)
        shutil.rmtree(tmp, ignore_errors=True)


# -- running pyctr -----------------------------------------------------------------------------

def _no_traceback(result) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout


def pyctr(address: Optional[str], *args: str, ok: bool = True, namespace: Optional[str] = None,
          env: Optional[dict] = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run pyctr; with ok=True it must succeed with an empty stderr."""
    cmd = [PYCTR]
    if address is not None:
        cmd += ["--address", address]
    if namespace is not None:
        cmd += ["--namespace", namespace]
    cmd += list(args)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
    full_env.update(env or {})
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    _no_traceback(result)
    if ok:
        assert result.returncode == 0, f"{cmd} -> {result.returncode}\n{result.stderr}"
        assert result.stderr == "", result.stderr
    return result


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pyctr: "), lines[0]
    return lines[0]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def column_starts(header: str, names: list[str]) -> list[int]:
    return [header.index(n) for n in names]


# -- version and plugins -----------------------------------------------------------------------

def test_version(server):
    out = pyctr(server, "version").stdout
    assert re.search(r"^Client:\n  Version:  \S+\n  Revision: \S+\n", out, re.M), out
    m = re.search(r"^Server:\n  Version:  (\S+)\n  Revision: (\S*)\n  UUID: (\S+)$", out, re.M)
    assert m, out
    data = json.loads(pyctr(server, "version", "--format", "json").stdout)
    assert data["server"]["version"] == m.group(1)
    assert data["server"]["uuid"] == m.group(3)
    assert data["client"]["version"]


GRPC_SERVICES = {"introspection", "namespaces", "leases", "events", "version"}


def test_plugins_ls(server):
    out = pyctr(server, "plugins", "ls").stdout
    lines = out.splitlines()
    header = lines[0]
    assert header.split() == ["TYPE", "ID", "PLATFORMS", "STATUS"]
    starts = column_starts(header, ["TYPE", "ID", "PLATFORMS", "STATUS"])
    rows = {}
    for line in lines[1:]:
        cells = line.split()
        assert len(cells) == 4, line
        assert [line.index(c, s) for c, s in zip(cells, starts)] == starts, line  # aligned
        assert cells[3] in ("ok", "skip", "error"), line
        rows[(cells[0], cells[1])] = cells[3]
    for service in GRPC_SERVICES:
        assert rows.get(("io.containerd.grpc.v1", service)) == "ok", rows

    quiet = pyctr(server, "plugin", "list", "-q").stdout.split()
    assert quiet == [plugin_id for (_, plugin_id) in rows]

    listed = json.loads(pyctr(server, "plugins", "ls", "--format", "json").stdout)
    assert [p["id"] for p in listed] == quiet
    for p in listed:
        assert set(p) >= {"type", "id", "requires", "platforms", "exports", "capabilities",
                          "status", "error"}
        assert (p["status"] == "ok") == (p["error"] is None)


def test_plugins_ls_filters_and_detailed(server):
    out = pyctr(server, "plugins", "ls", "--format", "json", "type==io.containerd.grpc.v1").stdout
    listed = json.loads(out)
    assert listed and {p["type"] for p in listed} == {"io.containerd.grpc.v1"}
    assert GRPC_SERVICES <= {p["id"] for p in listed}

    detailed = pyctr(server, "plugins", "ls", "-d", "id==namespaces").stdout
    assert re.search(r"^Type:\s+io\.containerd\.grpc\.v1$", detailed, re.M), detailed
    assert re.search(r"^ID:\s+namespaces$", detailed, re.M), detailed


@pytest.mark.skipif(STOCK_CTR is None, reason="the stock ctr is not installed")
@pytest.mark.parametrize("command", [["plugins", "ls"], ["plugins", "ls", "-q"],
                                     ["namespaces", "ls"], ["namespaces", "ls", "-q"],
                                     ["leases", "ls"], ["leases", "ls", "-q"]])
def test_tables_match_stock_ctr(server, command):
    """Same server, same question: pyctr's table is byte for byte the stock ctr's."""
    pyctr(server, "leases", "create", "--id", "table-lease", "team=a")
    try:
        ctr = subprocess.run([STOCK_CTR, "--address", server, *command], capture_output=True,
                             text=True, timeout=60)
        assert ctr.returncode == 0, ctr.stderr
        assert pyctr(server, *command).stdout == ctr.stdout
    finally:
        pyctr(server, "leases", "rm", "table-lease")


# -- namespaces --------------------------------------------------------------------------------

def test_namespaces_create_ls_label_rm(server):
    name = unique("ns")
    assert pyctr(server, "namespaces", "create", name, "a=b", "flag").stdout == ""

    table = pyctr(server, "ns", "ls").stdout.splitlines()
    assert table[0].split() == ["NAME", "LABELS"]
    row = next(line for line in table if line.split()[0] == name)
    assert row.split() == [name, "a=b,flag=true"]
    assert row.index("a=b") == table[0].index("LABELS")

    assert name in pyctr(server, "namespace", "list", "-q").stdout.split()
    listed = {ns["name"]: ns["labels"] for ns in json.loads(pyctr(server, "ns", "ls", "--format", "json").stdout)}
    assert listed[name] == {"a": "b", "flag": "true"}

    pyctr(server, "ns", "label", name, "a=", "c=d")  # empty value clears
    listed = {ns["name"]: ns["labels"] for ns in json.loads(pyctr(server, "ns", "ls", "--format", "json").stdout)}
    assert listed[name] == {"c": "d", "flag": "true"}

    assert pyctr(server, "ns", "rm", name).stdout.split() == [name]
    assert name not in pyctr(server, "ns", "ls", "-q").stdout.split()


def test_namespaces_create_existing_fails(server):
    name = unique("dup")
    pyctr(server, "ns", "c", name)
    try:
        line = one_error_line(pyctr(server, "ns", "create", name, ok=False))
        assert "already exists" in line
    finally:
        pyctr(server, "ns", "rm", name)


def test_namespaces_rm_missing_is_one_clean_error(server):
    name = unique("missing")
    result = pyctr(server, "namespaces", "remove", name, ok=False)
    line = one_error_line(result)
    assert "not found" in line and name in line
    assert result.stdout == ""


def test_invalid_namespace_name_is_invalid_argument(server):
    line = one_error_line(pyctr(server, "ns", "create", "bad name!", ok=False))
    assert "invalid argument" in line


# -- leases ------------------------------------------------------------------------------------

def test_leases_create_ls_rm(server):
    lease_id = unique("lease")
    before = datetime.now(timezone.utc)
    assert pyctr(server, "leases", "create", "--id", lease_id, "-x", "1h", "k=v", "bare").stdout.strip() == lease_id

    assert lease_id in pyctr(server, "leases", "ls", "-q").stdout.split()
    assert pyctr(server, "leases", "ls", "-q", f"id=={lease_id}").stdout.split() == [lease_id]

    table = pyctr(server, "leases", "ls").stdout.splitlines()
    assert table[0].split() == ["ID", "CREATED", "AT", "LABELS"]
    row = next(line for line in table if line.split()[0] == lease_id)
    assert row.index(row.split()[1]) == table[0].index("CREATED AT")
    labels_cell = row.split()[2]
    # (containerd drops the empty-valued "bare" label: an empty value means "no label")
    assert labels_cell.startswith("containerd.io/gc.expire=") and labels_cell.endswith(",k=v")

    leases = {lease["id"]: lease for lease in json.loads(pyctr(server, "leases", "ls", "--format", "json").stdout)}
    lease = leases[lease_id]
    expire = datetime.strptime(lease["labels"]["containerd.io/gc.expire"], "%Y-%m-%dT%H:%M:%SZ")
    expire = expire.replace(tzinfo=timezone.utc)
    assert timedelta(minutes=58) < expire - before < timedelta(minutes=62)
    assert lease["labels"]["k"] == "v"

    assert pyctr(server, "leases", "rm", "--sync", lease_id).stdout.split() == [lease_id]
    assert lease_id not in pyctr(server, "leases", "ls", "-q").stdout.split()


def test_leases_generated_id_and_no_expiry(server):
    generated = pyctr(server, "leases", "create", "-x", "0").stdout.strip()
    assert generated and " " not in generated
    try:
        leases = {lease["id"]: lease for lease in json.loads(pyctr(server, "leases", "ls", "--format", "json").stdout)}
        assert "containerd.io/gc.expire" not in leases[generated]["labels"]
        table = pyctr(server, "leases", "ls").stdout.splitlines()
        assert next(line for line in table if line.startswith(generated + " ")).split()[-1] == "-"
    finally:
        pyctr(server, "leases", "delete", generated)


def test_leases_are_namespaced(server):
    other = unique("other")
    lease_id = unique("nslease")
    pyctr(server, "leases", "create", "--id", lease_id, namespace=other)
    try:
        assert lease_id in pyctr(server, "leases", "ls", "-q", namespace=other).stdout.split()
        assert lease_id not in pyctr(server, "leases", "ls", "-q").stdout.split()
        # CONTAINERD_NAMESPACE and CONTAINERD_ADDRESS stand in for -n and -a.
        via_env = pyctr(None, "leases", "ls", "-q", env={"CONTAINERD_NAMESPACE": other,
                                                          "CONTAINERD_ADDRESS": server})
        assert lease_id in via_env.stdout.split()
    finally:
        pyctr(server, "leases", "rm", lease_id, namespace=other)
        pyctr(server, "ns", "rm", other)


def test_leases_rm_missing_fails(server):
    line = one_error_line(pyctr(server, "leases", "rm", unique("nolease"), ok=False))
    assert "not found" in line


def test_leases_bad_expiry_is_usage_error(server):
    line = one_error_line(pyctr(server, "leases", "create", "--expires", "soon", ok=False))
    assert "expires" in line


# -- events ------------------------------------------------------------------------------------

class _LineReader:
    """Lines of a subprocess's stdout, read in a thread so the test can wait with a timeout."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))

    def until(self, predicate, deadline: float, poke=None) -> Optional[str]:
        while time.monotonic() < deadline:
            if poke is not None:
                poke()
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if predicate(line):
                return line
        return None


EVENT_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \+0000 UTC) (\S+) (/\S+) (.*)$")


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_events_sees_namespace_create(server, fmt):
    cmd = [PYCTR, "--address", server, "events"] + (["--format", "json"] if fmt == "json" else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader = _LineReader(proc)
    created: list[str] = []

    def poke():
        # The subscription starts a moment after the process does: create namespaces until
        # one of them is seen.
        name = unique("ev")
        pyctr(server, "ns", "create", name, "seen=yes")
        created.append(name)

    try:
        if fmt == "text":
            line = reader.until(lambda l: "/namespaces/create" in l and any(n in l for n in created),
                                time.monotonic() + 30, poke)
            assert line, "no /namespaces/create event seen"
            m = EVENT_LINE.match(line)
            assert m, line
            assert m.group(2) == "default" and m.group(3) == "/namespaces/create"
            payload = json.loads(m.group(4))
            assert payload["name"] in created and payload["labels"] == {"seen": "yes"}
        else:
            line = reader.until(lambda l: '"/namespaces/create"' in l and any(n in l for n in created),
                                time.monotonic() + 30, poke)
            assert line, "no /namespaces/create event seen"
            event = json.loads(line)
            assert event["topic"] == "/namespaces/create" and event["namespace"] == "default"
            assert event["type_url"].endswith("containerd.events.NamespaceCreate")
            assert event["event"]["name"] in created
            datetime.fromisoformat(event["timestamp"])
    finally:
        err = _stop(proc)
        for name in created:
            pyctr(server, "ns", "rm", name)
    assert proc.returncode == 130, (proc.returncode, err)
    assert err == "", err


def test_events_filters(server):
    proc = subprocess.Popen([PYCTR, "-a", server, "events", 'topic=="/namespaces/delete"'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader = _LineReader(proc)
    removed: list[str] = []

    def poke():
        name = unique("evf")
        pyctr(server, "ns", "create", name)
        pyctr(server, "ns", "rm", name)
        removed.append(name)

    try:
        line = reader.until(lambda l: any(n in l for n in removed), time.monotonic() + 30, poke)
        assert line and " /namespaces/delete " in line, line
        while not reader.lines.empty():
            assert " /namespaces/delete " in reader.lines.get_nowait()
    finally:
        _stop(proc)


# -- the client library directly ---------------------------------------------------------------

async def test_client_library_publish_and_subscribe(server):
    import asyncio

    from pycontainerd.api.client import Client, errdefs
    from pycontainerd.api.gen.containerd.events import TaskOom

    topic = f"/pyctr-test/{uuid.uuid4().hex[:8]}"
    async with Client(server, namespace=unique("pub")) as client:
        got: asyncio.Queue = asyncio.Queue()

        async def listen():
            async for env in client.events.subscribe([f'topic=="{topic}"']):
                await got.put(env)

        listener = asyncio.create_task(listen())
        try:
            env = None
            for _ in range(60):
                await client.events.publish(topic, TaskOom(container_id="c1"))
                try:
                    env = await asyncio.wait_for(got.get(), 0.5)
                    break
                except asyncio.TimeoutError:
                    continue
            assert env is not None
            assert env.topic == topic and env.namespace == client.namespace
            assert env.type_url == "containerd.events.TaskOOM"
            assert isinstance(env.event, TaskOom) and env.event.container_id == "c1"
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

        with pytest.raises(errdefs.InvalidArgument):
            await client.events.publish("no-slash", TaskOom())


def test_sync_client_namespaces_and_leases(server):
    from pycontainerd.api.client import SyncClient, errdefs

    name = unique("sync")
    with SyncClient(server, namespace=name) as client:
        ns = client.namespaces.create(name, {"a": "1"})
        assert ns.name == name and ns.labels == {"a": "1"}
        assert client.namespaces.get(name).labels == {"a": "1"}
        assert client.namespaces.update(name, {"a": "", "b": "2"}).labels == {"b": "2"}
        assert client.namespaces.update(name, {"c": "3"}, replace=True).labels == {"c": "3"}
        lease = client.leases.create(labels={"x": "y"})
        resource = "sha256:" + "0" * 64
        client.leases.add_resource(lease.id, resource, "content")
        assert [(r.id, r.type) for r in client.leases.list_resources(lease.id)] == [(resource, "content")]
        client.leases.delete_resource(lease.id, resource, "content")
        assert client.leases.list_resources(lease.id) == []
        client.leases.delete(lease.id, sync=True)
        with pytest.raises(errdefs.NotFound):
            client.leases.delete(lease.id)
        client.namespaces.delete(name)
        assert name not in [ns.name for ns in client.namespaces.list()]
        with pytest.raises(errdefs.NotFound):
            client.namespaces.delete(name)
        assert client.server().uuid
        assert client.version().version


# -- connection errors -------------------------------------------------------------------------

def test_bad_address_is_one_clean_error(tmp_path):
    missing = str(tmp_path / "nothing-here.sock")
    line = one_error_line(pyctr(missing, "ns", "ls", ok=False))
    assert "failed to dial" in line and missing in line


def test_connect_timeout_gives_up(tmp_path):
    missing = str(tmp_path / "nothing-here.sock")
    started = time.monotonic()
    line = one_error_line(pyctr(missing, "--connect-timeout", "300ms", "version", ok=False))
    assert "deadline exceeded" in line
    assert time.monotonic() - started < 20


def test_not_a_socket_is_one_clean_error(tmp_path):
    path = tmp_path / "plain-file"
    path.write_text("not a socket")
    line = one_error_line(pyctr(str(path), "plugins", "ls", ok=False))
    assert "failed to dial" in line


def test_usage_error_is_one_line(server):
    line = one_error_line(pyctr(server, "namespaces", "frobnicate", ok=False))
    assert "frobnicate" in line
