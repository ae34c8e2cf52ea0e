"""Garbage collection in our real daemon, driven with the stock ctr and the client library:
images removed with --sync take their blobs and unpacked snapshots along, leases protect what
they hold, expired leases go by themselves (also across a restart), containers keep their
snapshots, `ctr content rm` is followed by a collection, and the scheduler's config and exports
read as containerd's."""
from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from daemons import Daemon
from sharedtools import CTR, MAKE_IMAGE, ctr, make_busybox_tar, sha256
from pycontainerd.api.client import Client
from pycontainerd.api.client.images import Descriptor

pytestmark = [pytest.mark.root, pytest.mark.compat]

OCTET = "application/octet-stream"


@pytest.fixture
def daemon():
    if CTR is None:
        pytest.skip("ctr is not installed")
    d = Daemon("pycontainerd")
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


@pytest.fixture(scope="module")
def busybox_tar(tmp_path_factory) -> Path:
    if not MAKE_IMAGE.exists():
        pytest.skip("no busybox image maker")
    return make_busybox_tar(tmp_path_factory.mktemp("bb") / "busybox.tar")


def out(p: subprocess.CompletedProcess) -> str:
    return p.stdout.decode()


def blob_file(d: Daemon, digest: str) -> Path:
    return d.root / "io.containerd.content.v1.content" / "blobs" / "sha256" / digest.split(":", 1)[1]


def ingest(d: Daemon, data: bytes, ns: str = "default") -> str:
    digest = sha256(data)
    ctr(d, "content", "ingest", f"ref-{digest[7:23]}", input=data, ns=ns)
    return digest


def run(coro):
    return asyncio.run(coro)


def ingest_rooted(d: Daemon, data: bytes, root: str = "1", ns: str = "default") -> str:
    """A blob written with its containerd.io/gc.root label, in one commit: ingested first and
    labelled after, it could be collected in between (the startup collection, say)."""
    async def main():
        async with Client(d.address, namespace=ns) as c:
            return await c.content.write_blob(f"rooted-{sha256(data)[7:23]}", data, expected=sha256(data),
                                              labels={"containerd.io/gc.root": root})
    return run(main())


def wait_until(cond, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout}s")
        time.sleep(0.05)


def test_unpacked_image_rm_sync_takes_blobs_and_snapshots(daemon, busybox_tar):
    ctr(daemon, "images", "import", "--base-name", "bb", str(busybox_tar))
    [name] = out(ctr(daemon, "images", "ls", "-q")).split()
    check = out(ctr(daemon, "images", "check")).splitlines()[1]
    assert "complete (2/2)" in check and check.endswith("true")
    pyctr = subprocess.run([str(Path(sys.executable).parent / "pyctr"), "-a", daemon.address, "images", "check"],
                           capture_output=True, timeout=60)
    assert pyctr.returncode == 0 and out(pyctr) == out(ctr(daemon, "images", "check"))
    digests = out(ctr(daemon, "content", "ls", "-q")).split()
    snapshots = out(ctr(daemon, "snapshots", "ls")).splitlines()[1:]
    assert len(digests) == 3 and len(snapshots) == 1
    overlay = daemon.root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"
    assert len(list(overlay.iterdir())) == 1
    ctr(daemon, "images", "rm", "--sync", name)
    assert out(ctr(daemon, "content", "ls", "-q")) == ""
    assert out(ctr(daemon, "snapshots", "ls")).splitlines()[1:] == []
    assert not any(blob_file(daemon, d).exists() for d in digests)
    assert list(overlay.iterdir()) == []


def test_container_keeps_its_snapshot_chain(daemon, busybox_tar):
    ctr(daemon, "images", "import", "--base-name", "bb", str(busybox_tar))
    [name] = out(ctr(daemon, "images", "ls", "-q")).split()
    ctr(daemon, "containers", "create", name, "keeper")
    ctr(daemon, "images", "rm", "--sync", name)
    keys = [line.split()[0] for line in out(ctr(daemon, "snapshots", "ls")).splitlines()[1:]]
    assert "keeper" in keys and len(keys) == 2  # the container's active snapshot and its parent
    assert out(ctr(daemon, "content", "ls", "-q")) == ""  # the image's blobs went
    ctr(daemon, "containers", "rm", "keeper")
    wait_until(lambda: out(ctr(daemon, "snapshots", "ls")).splitlines()[1:] == [], what="snapshots collected")


def test_lease_protects_blobs_until_deleted_with_sync(daemon):
    data = b"held by a lease\n"
    digest = sha256(data)
    ctr(daemon, "leases", "create", "--id", "holder", "-x", "0")

    async def main():
        async with Client(daemon.address, namespace="default") as c:
            # written under the lease: an unleased blob may be collected before it is referenced
            await c.content.write_blob("held", data, expected=digest, lease="holder")
            assert [r.id for r in await c.leases.list_resources("holder")] == [digest]
            await c.images.create("img", Descriptor(OCTET, digest, len(data)))
    run(main())
    ctr(daemon, "images", "rm", "--sync", "img")
    assert blob_file(daemon, digest).exists()
    assert out(ctr(daemon, "content", "ls", "-q")).split() == [digest]
    ctr(daemon, "leases", "rm", "--sync", "holder")
    assert out(ctr(daemon, "content", "ls", "-q")) == ""
    assert not blob_file(daemon, digest).exists()


def test_expired_lease_is_collected_with_what_it_held(daemon):
    data = b"held until the lease expires\n"
    digest = sha256(data)
    # ctr truncates the expiry to whole seconds: "short" expires 5 to 6s from now, time enough
    # for the next calls even on a loaded machine
    expires_after = datetime.now(timezone.utc) + timedelta(seconds=5)
    ctr(daemon, "leases", "create", "--id", "short", "-x", "6s")
    ctr(daemon, "leases", "create", "--id", "long", "-x", "1h")

    async def main():
        async with Client(daemon.address, namespace="default") as c:
            # written under the lease: an unleased blob may be collected before it is referenced
            await c.content.write_blob("short-held", data, expected=digest, lease="short")
    run(main())
    assert blob_file(daemon, digest).exists()
    listed = out(ctr(daemon, "leases", "ls", "-q")).split()
    if datetime.now(timezone.utc) < expires_after:
        assert listed == ["short", "long"]
    wait_until(lambda: out(ctr(daemon, "leases", "ls", "-q")).split() == ["long"],
               what="expired lease collected")
    wait_until(lambda: not blob_file(daemon, digest).exists(), what="blob collected")
    assert out(ctr(daemon, "content", "ls", "-q")) == ""


def test_lease_that_expired_while_the_daemon_was_down(daemon):
    data = b"across a restart\n"
    digest = sha256(data)
    expires = datetime.now(timezone.utc) + timedelta(seconds=5)  # after the daemon stopped

    async def main():
        async with Client(daemon.address, namespace="default") as c:
            lease = await c.leases.create("gone-by-then", {"containerd.io/gc.expire": expires.isoformat()})
            # written under the lease: an unleased blob may be collected before it is referenced
            await c.content.write_blob("gone-held", data, expected=digest, lease=lease.id)
    run(main())
    daemon.stop()
    assert blob_file(daemon, digest).exists()
    time.sleep(max(0.0, (expires - datetime.now(timezone.utc)).total_seconds()) + 0.2)
    daemon.start()
    wait_until(lambda: out(ctr(daemon, "leases", "ls", "-q")) == "", what="lease collected after restart")
    wait_until(lambda: not blob_file(daemon, digest).exists(), what="blob collected after restart")


def test_content_rm_is_followed_by_a_collection(daemon):
    digest = ingest_rooted(daemon, b"removed by hand\n")
    ctr(daemon, "content", "rm", digest)
    wait_until(lambda: not blob_file(daemon, digest).exists(), what="backend blob swept")


def test_unreferenced_ingested_blob_goes_at_the_next_collection(daemon):
    kept = ingest_rooted(daemon, b"rooted\n", root="yes")
    loose = ingest(daemon, b"nobody holds me\n")
    ctr(daemon, "leases", "create", "--id", "trigger")
    ctr(daemon, "leases", "rm", "--sync", "trigger")
    assert out(ctr(daemon, "content", "ls", "-q")).split() == [kept]
    assert blob_file(daemon, kept).exists() and not blob_file(daemon, loose).exists()


def test_scheduler_exports_and_config(daemon):
    detail = out(ctr(daemon, "plugins", "ls", "-d", "id==scheduler"))
    assert "io.containerd.gc.v1" in detail
    exports = dict(re.findall(r"^\s+(\w+Threshold|ScheduleDelay)\s+(\S+)$", detail, re.M))
    assert exports == {"PauseThreshold": "0.02", "DeletionThreshold": "0", "MutationThreshold": "100",
                       "ScheduleDelay": "0s"}
    d = Daemon("pycontainerd", config='version = 2\n[plugins."io.containerd.gc.v1.scheduler"]\n'
                                     '  deletion_threshold = 3\n  schedule_delay = "250ms"\n'
                                     '  pause_threshold = 0.9\n')
    try:
        d.start()
        detail = out(ctr(d, "plugins", "ls", "-d", "id==scheduler"))
        exports = dict(re.findall(r"^\s+(\w+Threshold|ScheduleDelay)\s+(\S+)$", detail, re.M))
        assert exports == {"PauseThreshold": "0.5", "DeletionThreshold": "3", "MutationThreshold": "100",
                           "ScheduleDelay": "250ms"}
    finally:
        d.cleanup()


def test_exports_match_containerd(daemon, containerd):
    def exports(d: Daemon) -> dict:
        detail = out(ctr(d, "plugins", "ls", "-d", "id==scheduler"))
        return dict(re.findall(r"^\s+(\w+Threshold|ScheduleDelay)\s+(\S+)$", detail, re.M))
    assert exports(daemon) == exports(containerd)


def test_without_the_scheduler_images_still_work_but_sync_cannot(daemon):
    d = Daemon("pycontainerd", config='version = 2\ndisabled_plugins = ["io.containerd.gc.v1.scheduler"]\n')
    try:
        d.start()
        listing = out(ctr(d, "plugins", "ls"))
        assert "scheduler" not in listing
        # containerd's images and leases services require the GC plugin; so do ours
        assert re.search(r"io\.containerd\.grpc\.v1\s+images\s+\S+\s+error", listing)
        p = ctr(d, "images", "ls", ok=False)
        assert p.returncode == 1
    finally:
        d.cleanup()
