"""Images against our real daemon: the stock `ctr images ...` (ls, tag, label, rm, check, import
--no-unpack), pyctr and the client library, events, namespaces, nasty names, and the same ctr
session against the stock containerd giving the same output."""
from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from daemons import Daemon
from sharedtools import CTR, MAKE_IMAGE, ctr, make_busybox_tar, sha256
from pycontainerd.api.gen.containerd.services.images import v1 as images_api
from pycontainerd.api.client import Client, errdefs
from pycontainerd.api.client.images import Descriptor

pytestmark = [pytest.mark.root, pytest.mark.compat]

PYCTR = str(Path(sys.executable).parent / "pyctr")
OCTET = "application/octet-stream"


@pytest.fixture(scope="module")
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


def pyctr(d: Daemon, *args: str, ns: str = "default", ok: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([PYCTR, "-a", d.address, "-n", ns, *args], capture_output=True, timeout=120)
    assert b"Traceback" not in p.stderr, p.stderr.decode()
    if ok:
        assert p.returncode == 0, (args, p.stderr.decode())
    return p


def out(p: subprocess.CompletedProcess) -> str:
    return p.stdout.decode()


def run(coro):
    return asyncio.run(coro)


def create_image(d: Daemon, name: str, data: bytes, ns: str = "default", media_type: str = OCTET,
                 labels: dict | None = None) -> str:
    """Ingest `data` with the stock ctr, then create image `name` on it with the client."""
    digest = sha256(data)
    ctr(d, "content", "ingest", f"ingest-{name[:40]}-{digest[7:19]}", input=data, ns=ns)

    async def main():
        async with Client(d.address, namespace=ns) as c:
            await c.images.create(name, Descriptor(media_type, digest, len(data)), labels)
    run(main())
    return digest


def names(d: Daemon, ns: str = "default", *filters: str) -> list[str]:
    return out(ctr(d, "images", "ls", "-q", *filters, ns=ns)).split("\n")[:-1]


def held_elsewhere(d: Daemon, ns: str) -> set[str]:
    """The digests the other namespaces hold."""
    held = set()
    for other in out(ctr(d, "namespaces", "ls", "-q")).split():
        if other != ns:
            held |= set(out(ctr(d, "content", "ls", "-q", ns=other)).split())
    return held


def test_ctr_ls_tag_label_rm(daemon):
    ns = "basic"
    digest = create_image(daemon, "docker.io/library/a:1", b"image a\n", ns=ns, labels={"team": "x"})
    table = out(ctr(daemon, "images", "ls", ns=ns)).splitlines()
    assert table[0].split() == ["REF", "TYPE", "DIGEST", "SIZE", "PLATFORMS", "LABELS"]
    assert table[1].split() == ["docker.io/library/a:1", OCTET, digest, "8.0", "B", "-", "team=x"]

    assert out(ctr(daemon, "images", "tag", "docker.io/library/a:1", "b:1", "c:1", ns=ns)) == "b:1\nc:1\n"
    p = ctr(daemon, "images", "tag", "docker.io/library/a:1", "b:1", ns=ns, ok=False)
    assert p.returncode == 1 and 'image "b:1": already exists' in p.stderr.decode()
    assert out(ctr(daemon, "images", "tag", "--force", "docker.io/library/a:1", "b:1", ns=ns)) == "b:1\n"
    assert names(daemon, ns) == ["b:1", "c:1", "docker.io/library/a:1"]

    assert out(ctr(daemon, "images", "label", "c:1", "env=prod", "team=", ns=ns)) == "env=prod\n"
    assert names(daemon, ns, "labels.env==prod") == ["c:1"]
    assert names(daemon, ns, "labels.team==x", "name==c:1") == ["b:1", "c:1", "docker.io/library/a:1"]
    assert names(daemon, ns, f"target.digest=={digest},name~=^b") == ["b:1"]
    p = ctr(daemon, "images", "ls", "labels.", ns=ns, ok=False)
    assert p.returncode == 1 and "parse error" in p.stderr.decode()

    p = ctr(daemon, "images", "rm", "b:1", "nope", "c:1", ns=ns)
    assert out(p) == "b:1\nc:1\n" and "nope: image not found" in p.stderr.decode()
    assert names(daemon, ns) == ["docker.io/library/a:1"]
    ctr(daemon, "images", "rm", "--sync", "docker.io/library/a:1", ns=ns)
    assert names(daemon, ns) == []


def test_pyctr_prints_what_ctr_prints(daemon, busybox_tar):
    ns = "same-output"
    for args in (["images", "ls"], ["images", "check"], ["images", "ls", "-q"]):  # nothing there yet
        assert out(pyctr(daemon, *args, ns=ns)) == out(ctr(daemon, *args, ns=ns)), args
    ctr(daemon, "images", "import", "--no-unpack", str(busybox_tar), ns=ns)
    create_image(daemon, "raw:blob", b"raw bytes", ns=ns, labels={"b": "2", "a": "1"})
    create_image(daemon, "raw:missing", b"never ingested", ns=ns)
    ctr(daemon, "content", "rm", sha256(b"never ingested"), ns=ns)
    for args in (["images", "ls"], ["images", "ls", "-q"], ["images", "ls", "name~=raw"], ["images", "check"],
                 ["images", "check", "-q"]):
        want, got = ctr(daemon, *args, ns=ns, ok=False), pyctr(daemon, *args, ns=ns, ok=False)
        assert (got.returncode, out(got)) == (want.returncode, out(want)), args
    # ctr prints the labels in Go's random map order; pyctr sorts them
    assert out(pyctr(daemon, "images", "label", "raw:blob", "c=3", ns=ns)) == "a=1,b=2,c=3\n"
    assert sorted(out(ctr(daemon, "images", "label", "raw:blob", "c=3", ns=ns)).strip().split(",")) == \
        ["a=1", "b=2", "c=3"]
    check = out(pyctr(daemon, "images", "check", ns=ns, ok=False)).splitlines()
    busybox = [line for line in check if line.startswith("import-")]
    assert busybox and "complete (2/2)" in busybox[0] and busybox[0].endswith("false")
    assert "unavailable (0/?)" in [line for line in check if line.startswith("raw:blob")][0]
    listing = json.loads(out(pyctr(daemon, "images", "ls", "--format", "json", ns=ns)))
    by_name = {i["name"]: i for i in listing}
    bb = next(v for k, v in by_name.items() if k.startswith("import-"))
    assert bb["platforms"] == ["linux/amd64"] and bb["size"] > 1000
    assert by_name["raw:blob"]["labels"] == {"a": "1", "b": "2", "c": "3"}
    pyctr(daemon, "images", "rm", "--sync", *by_name, ns=ns)
    assert names(daemon, ns) == [] and out(ctr(daemon, "content", "ls", "-q", ns=ns)) == ""


def test_import_no_unpack_then_rm_sync_collects_blob_files(daemon, busybox_tar):
    ns = "import-gc"
    ctr(daemon, "images", "import", "--no-unpack", "--base-name", "bb", str(busybox_tar), ns=ns)
    [name] = names(daemon, ns)
    digests = out(ctr(daemon, "content", "ls", "-q", ns=ns)).split()
    assert len(digests) == 3  # manifest, config, layer
    blobs = daemon.root / "io.containerd.content.v1.content" / "blobs" / "sha256"
    files = [blobs / d.split(":")[1] for d in digests]
    assert all(f.exists() for f in files)
    assert out(ctr(daemon, "leases", "ls", "-q", ns=ns)) == ""  # the import's lease went away
    ctr(daemon, "images", "rm", "--sync", name, ns=ns)
    assert out(ctr(daemon, "content", "ls", "-q", ns=ns)) == ""
    elsewhere = held_elsewhere(daemon, ns)
    assert not set(digests) & elsewhere, "another test left these blobs behind"
    assert not any(f.exists() for f in files)


def test_blob_stays_while_another_namespace_has_an_image_on_it(daemon):
    data = b"shared between namespaces\n"
    digest = create_image(daemon, "one", data, ns="share-a")
    create_image(daemon, "two", data, ns="share-b")
    blob = daemon.root / "io.containerd.content.v1.content" / "blobs" / "sha256" / digest[7:]
    ctr(daemon, "images", "rm", "--sync", "one", ns="share-a")
    assert blob.exists() and out(ctr(daemon, "content", "ls", "-q", ns="share-a")) == ""
    ctr(daemon, "images", "rm", "--sync", "two", ns="share-b")
    assert not blob.exists()


def test_namespace_with_an_image_cannot_be_removed(daemon):
    create_image(daemon, "keeper", b"keep my namespace\n", ns="busy")
    p = ctr(daemon, "namespaces", "rm", "busy", ok=False)
    assert p.returncode == 1
    assert 'namespace "busy" must be empty, but it still has images, blobs' in p.stderr.decode()
    ctr(daemon, "images", "rm", "--sync", "keeper", ns="busy")
    assert out(ctr(daemon, "namespaces", "rm", "busy")) == "busy\n"


@pytest.mark.parametrize("name", ["with space:latest", "x" * 4096, "ünï/cødé:ok", "a\tb"])
def test_nasty_names_through_ctr(daemon, name):
    ns = "nasty"
    create_image(daemon, name, b"nasty " + name.encode()[:10], ns=ns)
    assert name in names(daemon, ns)
    table = out(ctr(daemon, "images", "ls", ns=ns))
    if "\t" not in name:  # a tab is a column break for ctr's tabwriter (and pyctr's)
        assert name in table
    assert out(pyctr(daemon, "images", "ls", ns=ns)) == table
    ctr(daemon, "images", "rm", "--sync", name, ns=ns)
    assert name not in names(daemon, ns)


def test_client_errors(daemon):
    async def main():
        async with Client(daemon.address, namespace="client-errors") as c:
            good = Descriptor(OCTET, sha256(b"x"), 1)
            with pytest.raises(errdefs.InvalidArgument, match="Image.Name required"):
                await c.images.create("", good)
            with pytest.raises(errdefs.InvalidArgument, match='Target.Digest "sha256:12" invalid'):
                await c.images.create("x", Descriptor(OCTET, "sha256:12", 1))
            with pytest.raises(errdefs.InvalidArgument, match="Target.Size must be greater than zero"):
                await c.images.create("x", Descriptor(OCTET, good.digest, 0))
            with pytest.raises(errdefs.InvalidArgument, match="Target.MediaType must be set"):
                await c.images.create("x", Descriptor("", good.digest, 1))
            await c.images.create("x", good)
            with pytest.raises(errdefs.AlreadyExists, match='image "x": already exists'):
                await c.images.create("x", good)
            with pytest.raises(errdefs.InvalidArgument, match='cannot update "name" field on image "x"'):
                await c.images.update("x", paths=["name"])
            with pytest.raises(errdefs.InvalidArgument, match="filters: parse error"):
                await c.images.list(["name=="])
            with pytest.raises(errdefs.NotFound, match='image "nope": not found'):
                await c.images.get("nope")
            with pytest.raises(errdefs.NotFound):
                await c.images.delete("nope")
            img = await c.images.set_labels("x", {"a": "1", "b": "2"})
            img = await c.images.set_labels("x", {"b": ""})
            assert img.labels == {"a": "1"}
            img = await c.images.set_labels("x", {"only": "me"}, replace=True)
            assert img.labels == {"only": "me"}
            tagged = await c.images.tag("x", "y")
            assert tagged.target == img.target and tagged.labels == img.labels
            with pytest.raises(errdefs.AlreadyExists):
                await c.images.tag("x", "y")
            await c.images.tag("x", "y", force=True)
            for n in ("x", "y"):
                await c.images.delete(n)
        channel = Channel(path=daemon.address)  # no namespace header at all
        try:
            with pytest.raises(GRPCError) as e:
                await images_api.ImagesStub(channel).list(images_api.ListImagesRequest())
            assert e.value.status == Status.FAILED_PRECONDITION and e.value.message == \
                "namespace is required: failed precondition"
        finally:
            channel.close()
    run(main())


def test_events(daemon):
    async def main():
        async with Client(daemon.address, namespace="ev") as c:
            events = []
            subscribed = asyncio.Event()

            async def listen():
                async for env in c.events.subscribe(['topic~="^/images/"']):
                    if env.namespace == "evprobe":
                        subscribed.set()
                        continue
                    events.append(env)
                    if len(events) == 3:
                        return

            task = asyncio.create_task(listen())
            target = Descriptor(OCTET, sha256(b"e"), 1)
            # the subscription is live once it sees a probe's event (a sleep is only a guess)
            async with Client(daemon.address, namespace="evprobe") as probe, asyncio.timeout(60):
                n = 0
                while not subscribed.is_set():
                    await probe.images.create(f"probe{n}", target)
                    await probe.images.delete(f"probe{n}")
                    n += 1
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(subscribed.wait(), 1)
            await c.images.create("evimg", target, {"k": "v"})
            await c.images.set_labels("evimg", {"k2": "v2"})
            await c.images.delete("evimg")
            await asyncio.wait_for(task, 60)
            assert [(e.namespace, e.topic) for e in events] == [
                ("ev", "/images/create"), ("ev", "/images/update"), ("ev", "/images/delete")]
            assert events[0].type_url == "containerd.services.images.v1.ImageCreate"
            assert events[0].payload_dict() == {"name": "evimg", "labels": {"k": "v"}}
            assert events[1].payload_dict()["labels"] == {"k": "v", "k2": "v2"}
            assert events[2].payload_dict() == {"name": "evimg"}
    run(main())


# -- the same session against the stock containerd -----------------------------------------------

SESSION = [
    ["images", "import", "--no-unpack", "{tar}"],
    ["images", "ls"],
    ["images", "check"],
    ["images", "tag", "{name}", "copy:1", "copy:2"],
    ["images", "tag", "{name}", "copy:1"],
    ["images", "tag", "--force", "{name}", "copy:1"],
    ["images", "label", "copy:2", "x=y"],
    ["images", "ls", "labels.x==y"],
    ["images", "ls", "name~=copy", "-q"],
    ["images", "label", "copy:2", "x="],
    ["images", "rm", "copy:1", "missing"],
    ["images", "ls"],
    ["namespaces", "rm", "session"],
    ["images", "rm", "--sync", "copy:2", "{name}"],
    ["images", "ls"],
    ["images", "check"],
    ["content", "ls", "-q"],
    ["namespaces", "rm", "session"],
]


def _session(d: Daemon, tar: Path) -> list[tuple[int, str, str]]:
    results = []
    name = ""
    for step in SESSION:
        args = [a.format(tar=tar, name=name) for a in step]
        p = ctr(d, *args, ns="session", ok=False)
        stderr = p.stderr.decode()
        # ctr's log lines carry a timestamp; keep only the message
        stderr = "\n".join(line.split("msg=", 1)[-1] if line.startswith("time=") else line
                           for line in stderr.splitlines())
        results.append((p.returncode, out(p), stderr))
        if step[:2] == ["images", "import"]:
            name = names(d, "session")[0]
    return results


def test_same_ctr_session_as_containerd(daemon, containerd, busybox_tar):
    ours, theirs = _session(daemon, busybox_tar), _session(containerd, busybox_tar)
    for step, got, want in zip(SESSION, ours, theirs):
        assert got == want, step
