"""The daemon process: readiness, sockets, signals, config errors, required plugins, the stock
ctr for version/namespaces/leases/plugins, and unknown methods over grpc-go."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from daemons import PYCONTAINERD, Daemon, EventWatcher, short_tmpdir
from sharedtools import CONFORMANCE

CTR = "ctr"


def ctr(d: Daemon, *args: str, ns: str = "default", check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([CTR, "-a", d.address, "-n", ns, *args], capture_output=True, text=True, timeout=60)
    if check and p.returncode != 0:
        raise AssertionError(f"ctr {' '.join(args)} exited {p.returncode}: {p.stderr}\n{d.log()}")
    return p


def test_sockets_uuid_and_clean_shutdown():
    d = Daemon()
    try:
        d.start()
        mode = os.stat(d.address).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
        assert stat.S_ISSOCK(os.stat(d.address + ".ttrpc").st_mode)
        first = ctr(d, "version").stdout
        assert d.stop(signal.SIGTERM) == 0
        assert not os.path.exists(d.address) and not os.path.exists(d.address + ".ttrpc")
        assert "stopped" in d.log()
        d.start()
        assert first.split("UUID:")[1].strip() == ctr(d, "version").stdout.split("UUID:")[1].strip()
        assert d.stop(signal.SIGINT) == 0
    finally:
        d.cleanup()


def test_stale_socket_is_replaced_and_parent_created():
    tmp = short_tmpdir("pcd-")
    d = Daemon(tmp=tmp)
    d.address = str(tmp / "run" / "sub" / "d.sock")
    try:
        Path(d.address).parent.mkdir(parents=True)
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(d.address)
        stale.close()
        d.start()
        assert "Server:" in ctr(d, "version").stdout
    finally:
        d.cleanup()
    d2 = Daemon()
    d2.address = str(d2.tmp / "new" / "d.sock")
    try:
        d2.start()
        assert stat.S_IMODE(os.stat(Path(d2.address).parent).st_mode) == 0o711
    finally:
        d2.cleanup()


def test_notify_socket_gets_ready():
    tmp = short_tmpdir("pcd-")
    notify = str(tmp / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify)
    listener.settimeout(30)
    d = Daemon(tmp=tmp, env={"NOTIFY_SOCKET": notify})
    try:
        d.start(wait=False)
        assert listener.recv(64) == b"READY=1"
        d.wait_ready()
    finally:
        listener.close()
        d.cleanup()


def test_bad_toml_stops_with_line_and_column():
    d = Daemon(config='version = 2\n[grpc]\naddress = "unterminated\n')
    try:
        d.start(wait=False)
        assert d.proc.wait(30) != 0
        assert "config.toml:3:" in d.log()
        assert not os.path.exists(d.address)
    finally:
        d.cleanup()


def test_unknown_keys_are_warned_about_and_checked():
    d = Daemon(config='version = 2\nroott = "/x"\n[grpc]\nadress = "/y"\n')
    try:
        d.start()
        log = d.log()
        assert "roott" in log and "adress" in log
        check = subprocess.run([PYCONTAINERD, "--config", str(d.config_path), "config", "check"],
                               capture_output=True, text=True)
        assert check.returncode == 1 and "adress" in check.stderr and "roott" in check.stderr
    finally:
        d.cleanup()


def test_config_default_round_trips(tmp_path):
    out = subprocess.run([PYCONTAINERD, "config", "default"], capture_output=True, text=True, check=True).stdout
    assert '[plugins."io.containerd.gc.v1.scheduler"]' in out
    (tmp_path / "c.toml").write_text(out)
    check = subprocess.run([PYCONTAINERD, "--config", str(tmp_path / "c.toml"), "config", "check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("required,why", [
    ("io.containerd.grpc.v1.nothing", "not registered"),
    ("io.containerd.grpc.v1.leases", "disabled"),
])
def test_required_plugin_problem_stops_daemon(required, why):
    d = Daemon(config=f'version = 2\nrequired_plugins = ["{required}"]\n'
                      'disabled_plugins = ["io.containerd.grpc.v1.leases"]\n')
    try:
        d.start(wait=False)
        assert d.proc.wait(30) == 1
        assert required in d.log() and why in d.log()
        assert not os.path.exists(d.address)
    finally:
        d.cleanup()


def test_disabled_plugin_is_gone(daemon):
    d = Daemon(config='version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.leases"]\n')
    try:
        d.start()
        listing = ctr(d, "plugins", "ls").stdout
        assert "leases" in ctr(daemon, "plugins", "ls").stdout
        assert "io.containerd.grpc.v1        leases" not in listing
        p = ctr(d, "leases", "ls", check=False)
        assert p.returncode != 0 and "not implemented" in p.stderr.lower()
    finally:
        d.cleanup()


def test_unknown_method_answers_unimplemented_to_grpc_go(daemon):
    import grpc

    with grpc.insecure_channel(f"unix://{daemon.address}") as channel:
        call = channel.unary_unary("/no.such.Service/Method", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            call(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "/no.such.Service/Method" in err.value.details()


def test_health_check(daemon):
    import grpc

    with grpc.insecure_channel(f"unix://{daemon.address}") as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None,
                                    response_deserializer=None)
        assert check(b"", timeout=10) == b"\x08\x01"


def test_plugins_report_ok_and_json(daemon):
    rows = [line.split() for line in ctr(daemon, "plugins", "ls").stdout.splitlines()[1:]]
    assert rows and all(r[-1] == "ok" for r in rows), rows
    detailed = ctr(daemon, "plugins", "ls", "-d").stdout
    assert "io.containerd.metadata.v1" in detailed


def test_namespace_errors_have_containerd_codes(daemon):
    ctr(daemon, "namespaces", "create", "dup")
    p = ctr(daemon, "namespaces", "create", "dup", check=False)
    assert p.returncode != 0 and "already exists" in p.stderr
    p = ctr(daemon, "namespaces", "create", "../bad", check=False)
    assert p.returncode != 0 and "invalid argument" in p.stderr
    ctr(daemon, "leases", "create", "--id", "keep", ns="dup")
    ctr(daemon, "namespaces", "remove", "dup")
    assert "dup" not in ctr(daemon, "namespaces", "ls", "-q").stdout



def test_namespace_list_follows_every_write(daemon):
    """Namespaces.List answers from what it last read until a write: creates, label updates,
    removals and a namespace created implicitly by another store's write all show at once."""
    def listed():
        return {line.split()[0]: line.split()[1:] for line in
                ctr(daemon, "namespaces", "ls").stdout.splitlines()[1:]}

    before = listed()
    ctr(daemon, "namespaces", "create", "cached", "a=1")
    assert listed()["cached"] == ["a=1"]
    ctr(daemon, "namespaces", "label", "cached", "a=2")
    assert listed()["cached"] == ["a=2"]
    ctr(daemon, "leases", "create", "--id", "l1", ns="implicit")
    assert "implicit" in listed() and "implicit" not in before
    ctr(daemon, "leases", "rm", "l1", ns="implicit")
    ctr(daemon, "namespaces", "remove", "implicit")
    ctr(daemon, "namespaces", "remove", "cached")
    assert "cached" not in listed() and "implicit" not in listed()

def test_events_reach_ctr_subscribers(daemon):
    sub = EventWatcher([CTR, "-a", daemon.address, "events"])

    def probe():
        ctr(daemon, "namespaces", "create", "probe")
        ctr(daemon, "namespaces", "remove", "probe")

    def evns(topic):
        return lambda lines: any(topic in line and '"evns"' in line for line in lines)

    try:
        sub.wait_subscribed(probe, lambda line: '"probe"' in line)
        ctr(daemon, "namespaces", "create", "evns")
        ctr(daemon, "namespaces", "remove", "evns")
        sub.wait_for(evns("/namespaces/delete"))
    finally:
        out = sub.stop()
    assert evns("/namespaces/create")(out.splitlines()) and evns("/namespaces/delete")(out.splitlines()), out


@pytest.mark.compat
@pytest.mark.skipif(not CONFORMANCE.exists(), reason="shared conformance script not present")
@pytest.mark.parametrize("scenario", ["version", "namespaces", "leases"])
def test_ctr_conformance(daemon, scenario):
    p = subprocess.run([sys.executable, str(CONFORMANCE), "--address", daemon.address, "-k", scenario],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "PASS " + scenario in p.stdout, p.stdout + p.stderr


async def test_concurrent_calls_on_one_connection_are_answered_in_order(daemon):
    """Many calls in flight on one HTTP/2 connection (answers are batched into few writes),
    errors among them keep their codes, and a reply larger than the write batch and the flow
    control window arrives whole."""
    import asyncio

    import grpc

    from pycontainerd.api.gen.containerd.services.namespaces import v1 as nsapi
    from pycontainerd.api.gen.containerd.services.version import v1 as verapi

    svc = "/containerd.services.namespaces.v1.Namespaces/"
    md = (("containerd-namespace", "default"),)
    big = "x" * 4000
    async with grpc.aio.insecure_channel(f"unix://{daemon.address}") as channel:
        def call(path):
            return channel.unary_unary(path, request_serializer=bytes, response_deserializer=None)

        version = call("/containerd.services.version.v1.Version/Version")
        create, get, listing = call(svc + "Create"), call(svc + "Get"), call(svc + "List")
        await asyncio.gather(*[create(nsapi.CreateNamespaceRequest(namespace=nsapi.Namespace(
            name=f"big{i}", labels={"l": big})), metadata=md, timeout=30) for i in range(40)])

        async def missing(i):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await get(nsapi.GetNamespaceRequest(name=f"missing{i}"), metadata=md, timeout=30)
            return err.value.code()

        answers = await asyncio.gather(
            *[version(b"", timeout=30) for _ in range(64)],
            *[missing(i) for i in range(16)],
            *[listing(b"", metadata=md, timeout=30) for _ in range(8)])
    versions, codes, lists = answers[:64], answers[64:80], answers[80:]
    assert {verapi.VersionResponse().parse(v).version for v in versions} != {""}
    assert len(set(versions)) == 1
    assert codes == [grpc.StatusCode.NOT_FOUND] * 16
    for raw in lists:
        assert len(raw) > 160_000
        names = [n.name for n in nsapi.ListNamespacesResponse().parse(raw).namespaces]
        assert {f"big{i}" for i in range(40)} <= set(names)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_tcp_listener_serves_grpc(tls):
    """`[grpc] tcp_address` (with `tcp_tls_cert`/`tcp_tls_key`: TLS with ALPN h2) serves the same
    services as the unix socket to grpc's C-core client, large replies included."""
    import grpc

    from pycontainerd.api.gen.containerd.services.namespaces import v1 as nsapi
    from pycontainerd.api.gen.containerd.services.version import v1 as verapi

    tmp = short_tmpdir("pcd-")
    port = _free_port()
    config = f'version = 2\n[grpc]\n  tcp_address = "127.0.0.1:{port}"\n'
    if tls:
        cert, key = tmp / "cert.pem", tmp / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
        config += f'  tcp_tls_cert = "{cert}"\n  tcp_tls_key = "{key}"\n'
    d = Daemon(config=config, tmp=tmp)
    try:
        d.start()
        target = f"127.0.0.1:{port}"
        channel = (grpc.secure_channel(target, grpc.ssl_channel_credentials(cert.read_bytes())) if tls
                   else grpc.insecure_channel(target))
        with channel:
            def call(path):
                return channel.unary_unary(path, request_serializer=bytes, response_deserializer=None)
            version = verapi.VersionResponse().parse(call("/containerd.services.version.v1.Version/Version")(
                b"", timeout=30))
            assert version.version
            md = (("containerd-namespace", "default"),)
            labels = {f"k{i}": "v" * 1000 for i in range(300)}
            call("/containerd.services.namespaces.v1.Namespaces/Create")(
                nsapi.CreateNamespaceRequest(namespace=nsapi.Namespace(name="tcp", labels=labels)),
                metadata=md, timeout=30)
            got = nsapi.GetNamespaceResponse().parse(call("/containerd.services.namespaces.v1.Namespaces/Get")(
                nsapi.GetNamespaceRequest(name="tcp"), metadata=md, timeout=30))
            assert got.namespace.labels == labels
    finally:
        d.cleanup()
