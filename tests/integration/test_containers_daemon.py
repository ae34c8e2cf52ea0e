"""The containers service of our daemon: CRUD through the stock ctr, pyctr and the client library,
its events, field masks and filters over the wire, nasty ids, namespace isolation, ListStream
with many records, and the shared ctr conformance scenarios that rest on it."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from betterproto.lib.google.protobuf import Any as AnyMessage

sys.path.insert(0, str(Path(__file__).parent))
from sharedtools import CONFORMANCE  # noqa: E402
from test_run_support import GO_SHIM, IMAGE, module_env, requirements  # noqa: E402

from pycontainerd.api.client import Client, errdefs  # noqa: E402
from pycontainerd.api.client.containers import Container, RuntimeInfo, spec_any  # noqa: E402
from pycontainerd.api.gen.containerd import events as ev  # noqa: E402

pytestmark = requirements


env = module_env("pycontainerd")


def record(cid: str, **kw) -> Container:
    return Container(id=cid, runtime=RuntimeInfo(GO_SHIM), spec=spec_any({"ociVersion": "1.0.2-dev"}), **kw)


# -- the stock ctr ---------------------------------------------------------------------------

def test_crud_with_stock_ctr(env):
    cid = "ctrcrud"
    env.ctr("containers", "create", "--label", "tier=conf", "--runtime", GO_SHIM, IMAGE, cid)
    try:
        rows = [line.split() for line in env.ctr("containers", "ls").stdout.splitlines()]
        assert rows[0] == ["CONTAINER", "IMAGE", "RUNTIME"] and [cid, IMAGE, GO_SHIM] in rows
        info = env.info(cid)
        assert info["Image"] == IMAGE and info["Runtime"]["Name"] == GO_SHIM
        assert info["Labels"] == {"tier": "conf", "io.containerd.image.config.stop-signal": "SIGTERM"}
        assert (info["Snapshotter"], info["SnapshotKey"]) == ("overlayfs", cid)
        assert info["Spec"]["linux"]["cgroupsPath"] == f"/{env.ns}/{cid}"
        assert cid in env.snapshot_keys()
        out = env.ctr("containers", "label", cid, "tier=changed", "extra=1").stdout.strip()
        assert sorted(out.split(",")) == ["extra=1", "io.containerd.image.config.stop-signal=SIGTERM",
                                          "tier=changed"]
        assert "extra" not in env.ctr("containers", "label", cid, "extra=").stdout  # empty clears
        # ctr prepares the snapshot first, so a duplicate fails there (as on containerd)
        dup = env.ctr("containers", "create", "--runtime", GO_SHIM, IMAGE, cid, check=False)
        assert dup.returncode == 1 and f'"{cid}": already exists' in dup.stderr
    finally:
        env.ctr("containers", "rm", cid, check=False)
    assert cid not in env.container_ids() and cid not in env.snapshot_keys()
    gone = env.ctr("containers", "info", cid, check=False)
    assert gone.returncode == 1 and f'container "{cid}" in namespace "{env.ns}": not found' in gone.stderr


def test_crud_with_pyctr(env):
    cid = "pycrud"
    env.pyctr("containers", "create", "--label", "a=b", "--runtime", GO_SHIM, IMAGE, cid, "echo", "x")
    try:
        assert env.pyctr("containers", "ls", "-q").stdout.split() == [cid]
        rows = json.loads(env.pyctr("containers", "ls", "--format", "json").stdout)
        assert [r["ID"] for r in rows] == [cid] and rows[0]["Spec"]["process"]["args"] == ["echo", "x"]
        assert env.pyctr("containers", "ls").stdout == env.ctr("containers", "ls").stdout  # byte for byte
        ours, theirs = json.loads(env.pyctr("containers", "info", cid).stdout), env.info(cid)
        assert ours == theirs
        assert json.loads(env.pyctr("containers", "info", "--spec", cid).stdout) == theirs["Spec"]
        assert env.pyctr("containers", "label", cid, "a=c").stdout.strip() == \
            "a=c,io.containerd.image.config.stop-signal=SIGTERM"
        assert env.pyctr("containers", "ls", "labels.a==c").stdout.splitlines()[1].split()[0] == cid
        assert env.pyctr("containers", "ls", "-q", "labels.a==b").stdout == ""
        dup = env.pyctr("containers", "create", "--runtime", GO_SHIM, IMAGE, cid, check=False)
        assert dup.returncode == 1 and "already exists" in dup.stderr
        env.pyctr("containers", "rm", "--keep-snapshot", cid)
        assert cid not in env.container_ids() and cid in env.snapshot_keys()
    finally:
        env.ctr("containers", "rm", cid, check=False)
        env.ctr("snapshots", "rm", cid, check=False)
    missing = env.pyctr("containers", "rm", cid, "other", check=False)
    assert missing.returncode == 1 and missing.stderr.count("not found") == 2


# -- the client library ----------------------------------------------------------------------

async def test_api_masks_filters_and_stream(env):
    async with Client(env.address, namespace=env.ns) as client:
        try:
            await api_masks(client)
        finally:
            for cid in ("apione", "apitwo"):
                try:
                    await client.containers.delete(cid)
                except errdefs.NotFound:
                    pass


async def api_masks(client):
    ext = AnyMessage(type_url="example.com/ext", value=b"\x01\x02")
    c = await client.containers.create(record("apione", labels={"tier": "web", "n": "1"}, image="img/one",
                                              extensions={"e1": ext}))
    assert c.created_at is not None and c.created_at == c.updated_at
    await client.containers.create(record("apitwo", labels={"tier": "db"}, image="img/two"))
    got = await client.containers.get("apione")
    assert got.extensions["e1"].value == b"\x01\x02" and got.spec_dict() == {"ociVersion": "1.0.2-dev"}

    assert [x.id for x in await client.containers.list()] == ["apione", "apitwo"]
    assert [x.id for x in await client.containers.list(["labels.tier==db"])] == ["apitwo"]
    assert [x.id for x in await client.containers.list(["image~=one$", "id==apitwo"])] == ["apione", "apitwo"]
    assert [x.id for x in await client.containers.list(["runtime.name==" + GO_SHIM])] == ["apione", "apitwo"]

    labels = await client.containers.set_labels("apione", {"n": "", "new": "x"})
    assert labels == {"tier": "web", "new": "x"}
    up = await client.containers.update(Container(id="apione", image="img/changed", snapshot_key=""),
                                        ["image"])
    assert up.image == "img/changed" and up.updated_at > up.created_at
    up = await client.containers.update(Container(id="apione", extensions={}), ["extensions.e1"])
    assert up.extensions == {}
    with pytest.raises(errdefs.InvalidArgument, match='cannot update "runtime" field on "apione"'):
        await client.containers.update(Container(id="apione"), ["runtime"])
    with pytest.raises(errdefs.InvalidArgument, match="container.Spec must be set"):
        await client.containers.update(Container(id="apione"), ["spec"])
    with pytest.raises(errdefs.NotFound, match='container "nope": not found'):
        await client.containers.update(Container(id="nope", labels={"a": "b"}), ["labels.a"])
    with pytest.raises(errdefs.AlreadyExists):
        await client.containers.create(record("apitwo"))
    for cid in ("apione", "apitwo"):
        await client.containers.delete(cid)
    with pytest.raises(errdefs.NotFound):
        await client.containers.delete("apione")
    assert await client.containers.list() == []


async def test_events(env):
    async with Client(env.address, namespace=env.ns) as client:
        seen: list = []

        async def collect():
            async for e in client.events.subscribe(['topic~="/containers/"']):
                seen.append(e)
                if e.topic == "/containers/delete":
                    return

        task = asyncio.ensure_future(collect())
        await asyncio.sleep(0.5)
        options = AnyMessage(type_url="containerd.runc.v1.Options", value=b"")
        await client.containers.create(Container(id="evone", runtime=RuntimeInfo(GO_SHIM, options),
                                                 spec=spec_any({}), image="img/ev", labels={"a": "1"}))
        await client.containers.set_labels("evone", {"b": "2"})
        await client.containers.delete("evone")
        await asyncio.wait_for(task, 10)
    assert [e.topic for e in seen] == ["/containers/create", "/containers/update", "/containers/delete"]
    assert all(e.namespace == env.ns for e in seen)
    create = ev.ContainerCreate().parse(seen[0].value)
    assert seen[0].type_url == "containerd.events.ContainerCreate"
    assert (create.id, create.image, create.runtime.name) == ("evone", "img/ev", GO_SHIM)
    assert create.runtime.options.type_url == "containerd.runc.v1.Options"
    update = ev.ContainerUpdate().parse(seen[1].value)
    assert (update.id, update.image, update.labels) == ("evone", "img/ev", {"a": "1", "b": "2"})
    assert ev.ContainerDelete().parse(seen[2].value).id == "evone"
    assert isinstance(seen[0].event, ev.ContainerCreate)


def test_events_seen_by_stock_ctr(env):
    proc = subprocess.Popen(["ctr", "-a", env.address, "events"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        time.sleep(1.0)
        env.pyctr("containers", "create", "--runtime", GO_SHIM, IMAGE, "evctr")
        env.pyctr("containers", "rm", "evctr")
        time.sleep(1.0)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0]
    lines = [line for line in out.splitlines() if "/containers/" in line]
    assert len(lines) == 2, out
    assert f" {env.ns} /containers/create " in lines[0] and '"id":"evctr"' in lines[0]
    assert f'"image":"{IMAGE}"' in lines[0] and f'"name":"{GO_SHIM}"' in lines[0]
    assert f" {env.ns} /containers/delete " in lines[1] and '{"id":"evctr"}' in lines[1]


# -- ids and namespaces ----------------------------------------------------------------------

NASTY = ["../escape", "a..b", "x" * 77, "-lead", "trail-", "with space", "ünïcode", "a/b", "semi;colon", ""]


@pytest.mark.parametrize("bad", NASTY, ids=[repr(b) for b in NASTY])
async def test_nasty_ids_are_refused(env, bad):
    async with Client(env.address, namespace=env.ns) as client:
        with pytest.raises(errdefs.InvalidArgument) as e:
            await client.containers.create(record(bad))
        assert "create container failed validation: container.ID: identifier" in str(e.value)
        assert all(c.id != bad for c in await client.containers.list())
    if bad and not bad.startswith("-"):  # (a leading "-" is a flag to both CLIs)
        p = env.pyctr("containers", "create", "--runtime", GO_SHIM, IMAGE, bad, check=False)
        assert p.returncode == 1 and "invalid argument" in p.stderr and len(p.stderr.splitlines()) == 1
        assert bad not in env.snapshot_keys()  # the snapshot made for it went away again
        p = env.ctr("containers", "create", "--runtime", GO_SHIM, IMAGE, bad, check=False)
        assert p.returncode != 0 and "invalid" in p.stderr.lower()
    assert bad not in env.container_ids()


async def test_legal_odd_ids(env):
    async with Client(env.address, namespace=env.ns) as client:
        for cid in ("a.b-c_d", "A" * 76, "9lives", "x"):
            await client.containers.create(record(cid))
            assert (await client.containers.get(cid)).id == cid
            await client.containers.delete(cid)


def test_namespace_isolation(env):
    other = env.ns + "-other"
    env.pyctr("containers", "create", "--runtime", GO_SHIM, IMAGE, "iso")
    try:
        assert "iso" not in env.container_ids(ns=other)
        assert env.ctr("containers", "info", "iso", ns=other, check=False).returncode == 1
        busy = env.ctr("namespaces", "remove", env.ns, check=False)
        assert busy.returncode != 0 and "containers" in busy.stderr
    finally:
        env.pyctr("containers", "rm", "iso")
        env.ctr("namespaces", "remove", other, check=False)


async def test_list_stream_many(env):
    n = 300
    async with Client(env.address, namespace=env.ns) as client:
        ids = [f"many{i:04d}" for i in range(n)]
        await asyncio.gather(*(client.containers.create(record(cid, labels={"mod": str(i % 7)}))
                               for i, cid in enumerate(ids)))
        try:
            streamed = await client.containers.list()
            assert [c.id for c in streamed] == ids
            assert len(await client.containers.list(["labels.mod==3"])) == len([i for i in range(n) if i % 7 == 3])
            assert env.ctr("containers", "ls", "-q").stdout.split() == ids
        finally:
            await asyncio.gather(*(client.containers.delete(cid) for cid in ids))


@pytest.mark.parametrize("scenario", ["containers_meta", "namespace_isolation", "events_stream", "bad_input"])
def test_conformance(env, scenario):
    p = subprocess.run([sys.executable, str(CONFORMANCE), "--address", env.address, "--runtime", GO_SHIM,
                        "-k", scenario], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and f"PASS {scenario}" in p.stdout, p.stdout + p.stderr
