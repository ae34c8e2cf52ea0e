"""Content against our real daemon: the stock `ctr content ...`, pyctr and the client library,
namespaces, errors, and a daemon killed with SIGKILL in the middle of a large ingest."""
from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemons import Daemon
from sharedtools import CONFORMANCE
from pycontainerd.api.client import Client, errdefs

pytestmark = [pytest.mark.root, pytest.mark.compat]

CTR = shutil.which("ctr")
PYCTR = str(Path(sys.executable).parent / "pyctr")

# As with containerd, content that nothing references (no image, lease or gc.root label) is
# collected by the garbage collector; these tests look at the store itself, so it stays off.
NO_GC = 'version = 2\ndisabled_plugins = ["io.containerd.gc.v1.scheduler"]\n'


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def daemon():
    if CTR is None:
        pytest.skip("ctr is not installed")
    d = Daemon("pycontainerd", config=NO_GC)
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


def ctr(d: Daemon, *args: str, ns: str = "default", input: bytes | None = None, ok: bool = True,
        stdin=None) -> subprocess.CompletedProcess:
    p = subprocess.run([CTR, "-a", d.address, "-n", ns, *args], input=input, stdin=stdin,
                       capture_output=True, timeout=120)
    if ok:
        assert p.returncode == 0, (args, p.stderr.decode(), d.log())
    return p


def pyctr(d: Daemon, *args: str, ns: str = "default", input: bytes | None = None,
          ok: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([PYCTR, "-a", d.address, "-n", ns, *args], input=input, capture_output=True, timeout=120)
    assert b"Traceback" not in p.stderr, p.stderr.decode()
    if ok:
        assert p.returncode == 0, (args, p.stderr.decode())
    return p


def listed(d: Daemon, ns: str = "default") -> list[str]:
    return ctr(d, "content", "ls", "-q", ns=ns).stdout.decode().split()


def run(coro):
    return asyncio.run(coro)


def test_ctr_ingest_ls_get_label_rm(daemon):
    ns = "ctr-basic"
    data = os.urandom(3 * 1024 * 1024 + 17)
    dgst = sha256(data)
    ctr(daemon, "content", "ingest", "ref-basic", input=data, ns=ns)
    assert listed(daemon, ns) == [dgst]
    table = ctr(daemon, "content", "ls", ns=ns).stdout.decode().splitlines()
    assert table[0].split() == ["DIGEST", "SIZE", "AGE", "LABELS"]
    assert table[1].split("\t")[0] == dgst and "3.146MB" in table[1] and table[1].endswith("\t-")
    assert ctr(daemon, "content", "get", dgst, ns=ns).stdout == data
    out = ctr(daemon, "content", "label", dgst, "team=blue", "x=y", ns=ns).stdout.decode().strip()
    assert sorted(out.split(",")) == ["team=blue", "x=y"]
    assert "team=blue" in ctr(daemon, "content", "ls", ns=ns).stdout.decode()
    out = ctr(daemon, "content", "label", dgst, "x=", ns=ns).stdout.decode().strip()
    assert out == "team=blue"
    assert listed(daemon, ns) == [dgst]
    # filters
    assert ctr(daemon, "content", "ls", "-q", "labels.team==blue", ns=ns).stdout.decode().split() == [dgst]
    assert ctr(daemon, "content", "ls", "-q", "labels.team==red", ns=ns).stdout.decode().split() == []
    # rm prints what it removed, ignores what is not there
    assert ctr(daemon, "content", "rm", dgst, ns=ns).stdout.decode().split() == [dgst]
    assert listed(daemon, ns) == []
    assert ctr(daemon, "content", "rm", dgst, ns=ns).stdout.decode() == ""


def test_ctr_ingest_checks_expected_size_and_digest(daemon):
    ns = "ctr-expect"
    data = b"expected content\n" * 1000
    wrong = sha256(b"something else")
    p = ctr(daemon, "content", "ingest", "--expected-digest", wrong, "ref-wrong", input=data, ns=ns, ok=False)
    assert p.returncode != 0 and b"unexpected commit digest" in p.stderr, p.stderr
    assert listed(daemon, ns) == []
    p = ctr(daemon, "content", "ingest", "--expected-size", "5", "ref-size", input=data, ns=ns, ok=False)
    assert p.returncode != 0 and b"failed precondition" in p.stderr.lower(), p.stderr
    assert listed(daemon, ns) == []
    # the failed ingests are still there, and visible to `ctr content active`
    active = ctr(daemon, "content", "active", ns=ns).stdout.decode().splitlines()
    assert active[0].split() == ["REF", "SIZE", "AGE"]
    assert sorted(line.split("\t")[0] for line in active[1:]) == ["ref-size", "ref-wrong"]
    run(_abort(daemon, ns, "ref-size", "ref-wrong"))
    assert ctr(daemon, "content", "active", ns=ns).stdout.decode().splitlines()[1:] == []
    ctr(daemon, "content", "ingest", "--expected-digest", sha256(data), "--expected-size", str(len(data)),
        "ref-ok", input=data, ns=ns)
    assert listed(daemon, ns) == [sha256(data)]
    # ingesting a digest the namespace already has succeeds without sending anything
    ctr(daemon, "content", "ingest", "--expected-digest", sha256(data), "ref-again", input=data, ns=ns)
    ctr(daemon, "content", "rm", sha256(data), ns=ns)


async def _abort(d: Daemon, ns: str, *refs: str) -> None:
    async with Client(d.address, namespace=ns) as client:
        for ref in refs:
            await client.content.abort(ref)


def test_errors_match_containerd(daemon):
    zero = "sha256:" + "0" * 64
    p = ctr(daemon, "content", "get", zero, ok=False)
    assert p.returncode != 0
    assert p.stderr.decode().strip() == f"ctr: content digest {zero}: not found"
    p = ctr(daemon, "content", "label", zero, "a=b", ok=False)
    assert f"content digest {zero}: not found" in p.stderr.decode()

    async def check():
        async with Client(daemon.address, namespace="errs") as client:
            with pytest.raises(errdefs.InvalidArgument, match='"sha256:abc" failed validation'):
                await client.content.info("sha256:abc")
            with pytest.raises(errdefs.InvalidArgument, match="invalid checksum digest length"):
                await client.content.delete("sha256:abc")
            with pytest.raises(errdefs.NotFound, match="could not get status for ref \"nope\": reference nope"):
                await client.content.status("nope")
            with pytest.raises(errdefs.NotFound, match="reference nope: not found"):
                await client.content.abort("nope")
            dgst = await client.content.write_blob("small", b"0123456789")
            with pytest.raises(errdefs.ContainerdError, match="read past object length 10 bytes"):
                await client.content.read_all(dgst, offset=11)
            assert await client.content.read_all(dgst, offset=3, size=4) == b"3456"
            assert await client.content.read_all(dgst, offset=8, size=100) == b"89"
            w = await client.content.open_writer("locked")
            try:
                with pytest.raises(errdefs.Unavailable, match="ref errs/1/locked locked for"):
                    await client.content.open_writer("locked")
            finally:
                await w.close()
            await client.content.abort("locked")
            with pytest.raises(errdefs.InvalidArgument, match="cannot update \"size\" field"):
                from betterproto.lib.google.protobuf import FieldMask
                from pycontainerd.api.gen.containerd.services.content import v1 as api
                await client.content._unary("update", api.UpdateRequest(
                    info=api.Info(digest=dgst), update_mask=FieldMask(paths=["size"])))
            await client.content.delete(dgst)
    run(check())
    assert b"version" in ctr(daemon, "version").stdout.lower()


def test_namespaces_are_isolated(daemon):
    data = b"per-namespace\n"
    dgst = sha256(data)
    ctr(daemon, "content", "ingest", "r", input=data, ns="ns-a")
    assert listed(daemon, "ns-a") == [dgst]
    assert listed(daemon, "ns-b") == []
    p = ctr(daemon, "content", "get", dgst, ns="ns-b", ok=False)
    assert b"not found" in p.stderr
    # ns-b gets it by sending the same bytes
    ctr(daemon, "content", "ingest", "r", input=data, ns="ns-b")
    assert listed(daemon, "ns-b") == [dgst]
    ctr(daemon, "content", "rm", dgst, ns="ns-a")
    assert listed(daemon, "ns-a") == []
    assert ctr(daemon, "content", "get", dgst, ns="ns-b").stdout == data
    ctr(daemon, "content", "rm", dgst, ns="ns-b")


def test_pyctr_content_commands(daemon):
    ns = "pyctr-content"
    data = os.urandom(2 * 1024 * 1024)
    dgst = sha256(data)
    pyctr(daemon, "content", "ingest", "--expected-digest", dgst, "pref", input=data, ns=ns)
    assert pyctr(daemon, "content", "ls", "-q", ns=ns).stdout.decode().split() == [dgst]
    # same table as ctr's: tabs for padding, same cells (AGE may tick between the two calls)
    ours = pyctr(daemon, "content", "ls", ns=ns).stdout.decode().splitlines()
    theirs = ctr(daemon, "content", "ls", ns=ns).stdout.decode().splitlines()
    assert ours[0] == theirs[0] and len(ours) == len(theirs) == 2
    cells = [[c for c in line.split("\t") if c] for line in (ours[1], theirs[1])]
    assert cells[0][:2] + cells[0][3:] == cells[1][:2] + cells[1][3:]
    assert ours[1].startswith(dgst + "\t")
    assert pyctr(daemon, "content", "get", dgst, ns=ns).stdout == data
    assert pyctr(daemon, "content", "label", dgst, "a=1", "b=2", ns=ns).stdout.decode().strip() == "a=1,b=2"
    import json
    listing = json.loads(pyctr(daemon, "content", "ls", "--format", "json", ns=ns).stdout)
    assert listing[0]["digest"] == dgst and listing[0]["labels"] == {"a": "1", "b": "2"}
    p = pyctr(daemon, "content", "get", "sha256:" + "1" * 64, ns=ns, ok=False)
    assert p.returncode == 1 and b"not found" in p.stderr
    p = pyctr(daemon, "content", "get", "nonsense", ns=ns, ok=False)
    assert p.returncode == 1 and b"invalid checksum digest format" in p.stderr
    assert pyctr(daemon, "content", "active", ns=ns).stdout == ctr(daemon, "content", "active", ns=ns).stdout
    assert pyctr(daemon, "content", "rm", dgst, ns=ns).stdout.decode().split() == [dgst]
    assert pyctr(daemon, "content", "ls", "-q", ns=ns).stdout.decode().split() == []


@pytest.fixture
def gc_daemon():
    """Our daemon with its default config: the garbage collector and the leases service on."""
    d = Daemon("pycontainerd")
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


def test_client_library_roundtrip_and_leases(gc_daemon):
    async def check():
        async with Client(gc_daemon.address, namespace="lib") as client:
            lease = await client.leases.create("content-lease")
            data = os.urandom(5 * 1024 * 1024 + 3)
            dgst = await client.content.write_blob("lib-ref", data, expected=sha256(data),
                                                   labels={"origin": "test"}, lease=lease.id)
            assert dgst == sha256(data)
            info = await client.content.info(dgst)
            assert (info.size, info.labels) == (len(data), {"origin": "test"})
            assert await client.content.read_all(dgst) == data
            resources = await client.leases.list_resources(lease.id)
            assert [(r.id, r.type) for r in resources] == [(dgst, "content")]
            # an open ingest under a lease is held by it
            w = await client.content.open_writer("held", lease=lease.id)
            await w.write(b"partial")
            assert ("held", "ingests") in [(r.id, r.type) for r in await client.leases.list_resources(lease.id)]
            st = await client.content.status("held")
            assert (st.ref, st.offset) == ("held", 7)
            await w.close()
            await client.content.abort("held")
            infos = await client.content.list(["labels.origin==test"])
            assert [i.digest for i in infos] == [dgst]
            info = await client.content.update(dgst, {"origin": "", "k": "v"})
            assert info.labels == {"k": "v"}
            await client.content.delete(dgst)
            await client.leases.delete(lease.id)
    run(check())


def test_list_batches_many_blobs(daemon):
    async def check():
        async with Client(daemon.address, namespace="many") as client:
            digests = [await client.content.write_blob(f"m{i}", f"blob {i}".encode()) for i in range(230)]
            assert sorted(i.digest for i in await client.content.list()) == sorted(digests)
            # containerd sends 100 infos per List message
            sizes = [len(m.info) async for m in client.content._stream(
                "list", __import__("pycontainerd.api.gen.containerd.services.content.v1",
                                   fromlist=["x"]).ListContentRequest())]
            assert sizes == [100, 100, 30]
            for d in digests:
                await client.content.delete(d)
    run(check())


def _wait_offset(d: Daemon, ns: str, ref: str, at_least: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async def status():
            async with Client(d.address, namespace=ns) as client:
                try:
                    return (await client.content.status(ref)).offset
                except errdefs.NotFound:
                    return 0
        offset = run(status())
        if offset >= at_least:
            return offset
        time.sleep(0.1)
    raise AssertionError(f"ingest {ref} never reached {at_least} bytes")


def test_kill9_mid_ingest_resumes_or_aborts():
    """SIGKILL the daemon while `ctr content ingest` streams a large blob; after a restart the
    ingest is listed with its offset, nothing partial is visible, and it can be resumed from
    that offset (client library) or aborted."""
    if CTR is None:
        pytest.skip("ctr is not installed")
    ns = "crash"
    data = os.urandom(48 * 1024 * 1024)
    dgst = sha256(data)
    d = Daemon("pycontainerd", config=NO_GC)
    try:
        d.start()
        for ref in ("crash-resume", "crash-abort"):
            feeder = subprocess.Popen([CTR, "-a", d.address, "-n", ns, "content", "ingest", ref],
                                      stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                feeder.stdin.write(data[:20 * 1024 * 1024])
                feeder.stdin.flush()
                _wait_offset(d, ns, ref, 16 * 1024 * 1024)
                d.kill9()
            finally:
                feeder.kill()
                feeder.wait()
            d.start()

        blobs = d.root / "io.containerd.content.v1.content" / "blobs"
        assert not any(p.is_file() for p in blobs.rglob("*")), "a partial blob became visible"
        assert listed(d, ns) == []
        active = ctr(d, "content", "active", ns=ns).stdout.decode().splitlines()[1:]
        assert sorted(line.split("\t")[0] for line in active) == ["crash-abort", "crash-resume"]

        async def finish():
            async with Client(d.address, namespace=ns) as client:
                st = await client.content.status("crash-resume")
                assert 0 < st.offset <= 20 * 1024 * 1024
                w = await client.content.open_writer("crash-resume", len(data), dgst)
                try:
                    assert w.offset == st.offset  # resumed, not started over
                    for i in range(w.offset, len(data), 1 << 20):
                        await w.write(data[i:i + (1 << 20)])
                    assert await w.commit(len(data), dgst) == dgst
                finally:
                    await w.close()
                await client.content.abort("crash-abort")
                assert await client.content.list_statuses() == []
                return await client.content.read_all(dgst)
        assert run(finish()) == data
        assert listed(d, ns) == [dgst]
        ingest = d.root / "io.containerd.content.v1.content" / "ingest"
        assert list(ingest.iterdir()) == []
    finally:
        d.cleanup()


def test_ctr_resumes_from_a_file_after_kill9():
    """The stock ctr resumes an ingest itself when stdin is a file it can seek."""
    if CTR is None:
        pytest.skip("ctr is not installed")
    ns = "crash2"
    data = os.urandom(24 * 1024 * 1024)
    d = Daemon("pycontainerd", config=NO_GC)
    try:
        d.start()
        src = d.tmp / "blob"
        src.write_bytes(data)
        feeder = subprocess.Popen([CTR, "-a", d.address, "-n", ns, "content", "ingest", "r"],
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            feeder.stdin.write(data[:10 * 1024 * 1024])
            feeder.stdin.flush()
            _wait_offset(d, ns, "r", 8 * 1024 * 1024)
            d.kill9()
        finally:
            feeder.kill()
            feeder.wait()
        d.start()
        with open(src, "rb") as f:
            ctr(d, "content", "ingest", "--expected-digest", sha256(data), "r", ns=ns, stdin=f)
        assert listed(d, ns) == [sha256(data)]
        assert ctr(d, "content", "get", sha256(data), ns=ns).stdout == data
    finally:
        d.cleanup()


def test_ctr_conformance_content_scenario(daemon):
    if not CONFORMANCE.exists():
        pytest.skip("conformance script not available")
    p = subprocess.run([sys.executable, str(CONFORMANCE), "--address", daemon.address, "-k", "content"],
                       capture_output=True, text=True, timeout=300)
    assert "PASS content_roundtrip" in p.stdout, p.stdout + p.stderr
