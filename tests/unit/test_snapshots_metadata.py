"""The namespaced snapshots layer (plugins/metadata/snapshots.py) and the snapshots service over
a real metadata database and a real native backend: per-namespace keys, backend key mapping,
parents by namespaced name, leases, the snapshot.ref target rule, label rules, events, namespace
deletion, GC's prune. No mounts needed.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from pycontainerd.core import errdefs
from pycontainerd.core.context import bind_request, unbind_request
from pycontainerd.core.events import Exchange
from pycontainerd.plugins.metadata.db import MetadataDB
from pycontainerd.plugins.metadata.leases import LeaseStore
from pycontainerd.plugins.metadata.namespaces import NamespaceStore
from pycontainerd.plugins.metadata.snapshots import NamespacedSnapshotter
from pycontainerd.plugins.snapshots.base import LABEL_SNAPSHOT_REF, Info, Kind, Snapshotter
from pycontainerd.plugins.snapshots.native import NativeSnapshotter
from pycontainerd.plugins.snapshots.service import SnapshotsService


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="snapmd-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def db(tmp):
    d = MetadataDB(Path(tmp) / "meta.db")
    yield d
    d.close()


@pytest.fixture
async def backend(tmp):
    b = NativeSnapshotter(os.path.join(tmp, "native"))
    yield b
    await b.close()


@pytest.fixture
def sn(db, backend):
    return NamespacedSnapshotter(db, "native", backend)


class ns:
    """Run a block in a namespace (and optionally under a lease)."""

    def __init__(self, name: str | None, lease: str | None = None):
        md = {}
        if name:
            md["containerd-namespace"] = name
        if lease:
            md["containerd-lease"] = lease
        self.md = md

    def __enter__(self):
        self.tokens = bind_request(self.md)

    def __exit__(self, *exc):
        unbind_request(self.tokens)


def rows(db, **where):
    sql = "SELECT * FROM snapshots"
    if where:
        sql += " WHERE " + " AND ".join(f"{k} = ?" for k in where)
    return [dict(r) for r in db.read(sql + " ORDER BY namespace, key", tuple(where.values()))]


async def test_namespaces_have_their_own_keys(sn, db, backend):
    with ns("a"):
        await sn.prepare("k", "")
        await sn.commit("base", "k")
        await sn.prepare("k", "base")
    with ns("b"):
        await sn.prepare("k", "")
        with pytest.raises(errdefs.NotFound):
            await sn.stat("base")
        with pytest.raises(errdefs.NotFound):
            await sn.prepare("x", "base")
        assert [(i.name, i.parent, i.kind) for i in await sn.walk()] == [("k", "", Kind.ACTIVE)]
    with ns("a"):
        infos = await sn.walk()
        assert [(i.name, i.parent, i.kind) for i in infos] == [("base", "", Kind.COMMITTED), ("k", "base", Kind.ACTIVE)]
        assert (await sn.stat("k")).parent == "base"  # the namespaced name, not the backend's
    all_rows = rows(db)
    assert len({r["backend_key"] for r in all_rows}) == 3
    for r in all_rows:
        assert r["backend_key"].startswith(f"{r['namespace']}/") and r["backend_key"].endswith("/" + r["key"])
    binfos = {i.name: i for i in await backend.walk()}
    assert set(binfos) == {r["backend_key"] for r in all_rows}
    a_k = next(r for r in all_rows if r["namespace"] == "a" and r["key"] == "k")
    a_base = next(r for r in all_rows if r["namespace"] == "a" and r["key"] == "base")
    assert binfos[a_k["backend_key"]].parent == a_base["backend_key"]


async def test_namespace_required_and_created(sn, db):
    with ns(None):
        with pytest.raises(errdefs.FailedPrecondition):
            await sn.prepare("k", "")
        with pytest.raises(errdefs.FailedPrecondition):
            await sn.walk()
    assert db.read("SELECT name FROM namespaces") == []
    with ns("fresh"):
        await sn.prepare("k", "")
    assert [r["name"] for r in db.read("SELECT name FROM namespaces")] == ["fresh"]
    store = NamespaceStore(db)
    with pytest.raises(errdefs.FailedPrecondition) as e:
        store.delete("fresh")
    assert 'snapshots on "native" snapshotter' in str(e.value)
    with ns("fresh"):
        await sn.remove("k")
    store.delete("fresh")


async def test_errors_leave_nothing_behind(sn, db, backend):
    with ns("e"):
        with pytest.raises(errdefs.InvalidArgument):
            await sn.prepare("", "")
        with pytest.raises(errdefs.InvalidArgument):
            await sn.prepare("k", "", {"big": "x" * 5000})
        await sn.prepare("k", "")
        with pytest.raises(errdefs.AlreadyExists):
            await sn.prepare("k", "")
        with pytest.raises(errdefs.AlreadyExists):
            await sn.view("k", "")
        with pytest.raises(errdefs.InvalidArgument):  # parent not committed (from the backend)
            await sn.prepare("child", "k")
        with pytest.raises(errdefs.NotFound):
            await sn.commit("c", "missing")
        with pytest.raises(errdefs.InvalidArgument):
            await sn.commit("c", "k", {"big": "x" * 5000})
        await sn.view("v", "")
        with pytest.raises(errdefs.FailedPrecondition):
            await sn.commit("vc", "v")
        assert [i.name for i in await sn.walk()] == ["k", "v"]
    assert len(await backend.walk()) == 2  # no backend snapshot without its row


async def test_remove_rules(sn, db, backend):
    with ns("r"):
        await sn.prepare("a", "")
        await sn.commit("A", "a")
        await sn.view("v", "A")
        with pytest.raises(errdefs.FailedPrecondition) as e:
            await sn.remove("A")
        assert "cannot remove snapshot with child" in str(e.value)
        with pytest.raises(errdefs.NotFound):
            await sn.remove("nope")
        await sn.remove("v")
        await sn.remove("A")
        assert await sn.walk() == []
    assert await backend.walk() == []  # removed from the backend at once
    assert os.listdir(os.path.join(backend.root, "snapshots")) == []


async def test_labels_split_between_layers(sn, db, backend):
    labels = {"containerd.io/gc.root": "x", "containerd.io/snapshot/foo": "bar", LABEL_SNAPSHOT_REF: "target"}
    with ns("l"):
        await sn.prepare("k", "", labels)
        (binfo,) = await backend.walk()
        assert binfo.labels == {"containerd.io/snapshot/foo": "bar", LABEL_SNAPSHOT_REF: "target"}
        assert (await sn.stat("k")).labels == labels
        info = await sn.update(Info(name="k", labels={"new": "1", "containerd.io/snapshot/foo": "baz"}),
                               ["labels.new", "labels.containerd.io/snapshot/foo"])
        assert info.labels == {**labels, "new": "1", "containerd.io/snapshot/foo": "baz"}
        assert (await backend.stat(binfo.name)).labels["containerd.io/snapshot/foo"] == "baz"
        assert "new" not in (await backend.stat(binfo.name)).labels
        info = await sn.update(Info(name="k", labels={}), ["labels.new"])
        assert "new" not in info.labels
        with pytest.raises(errdefs.InvalidArgument):
            await sn.update(Info(name="k", parent="x"), ["parent"])
        with pytest.raises(errdefs.InvalidArgument):
            await sn.update(Info(name="", labels={"a": "b"}))
        with pytest.raises(errdefs.NotFound):
            await sn.update(Info(name="nope", labels={"a": "b"}))
        info = await sn.update(Info(name="k", labels={"only": "this"}))
        assert info.labels == {"only": "this"}
        assert info.updated > info.created


async def test_target_ref_already_exists(sn, db, backend):
    with ns("t"):
        await sn.prepare("extract-1", "")
        await sn.commit("sha256:chain1", "extract-1")
        with pytest.raises(errdefs.AlreadyExists) as e:
            await sn.prepare("extract-2", "", {LABEL_SNAPSHOT_REF: "sha256:chain1"})
        assert "target snapshot" in str(e.value)
        assert [i.name for i in await sn.walk()] == ["sha256:chain1"]
    with ns("other"):  # another namespace unpacks its own copy
        await sn.prepare("extract-2", "", {LABEL_SNAPSHOT_REF: "sha256:chain1"})
    assert len(await backend.walk()) == 2


class RemoteLike(Snapshotter):
    """A backend that already has the target (like a remote snapshotter): Prepare with the ref
    label answers AlreadyExists and Walk shows the committed snapshot carrying the label."""

    def __init__(self):
        self.infos = {"shared/1/sha256:c": Info("shared/1/sha256:c", Kind.COMMITTED, "",
                                                 {LABEL_SNAPSHOT_REF: "sha256:c"})}
        self.removed = []

    async def prepare(self, key, parent="", labels=None):
        if (labels or {}).get(LABEL_SNAPSHOT_REF) == "sha256:c":
            raise errdefs.AlreadyExists("target snapshot")
        self.infos[key] = Info(key, Kind.ACTIVE, parent, dict(labels or {}))
        return []

    async def walk(self, filter_strings=()):
        from pycontainerd.plugins.snapshots.base import adaptor, match
        f = match(filter_strings)
        return [i for i in self.infos.values() if f.match(adaptor(i))]

    async def stat(self, key):
        if key not in self.infos:
            raise errdefs.NotFound(key)
        return self.infos[key]

    async def remove(self, key):
        self.removed.append(key)
        self.infos.pop(key, None)


async def test_target_adopted_from_backend(db):
    sn = NamespacedSnapshotter(db, "remote", RemoteLike())
    with ns("x"):
        with pytest.raises(errdefs.AlreadyExists):
            await sn.prepare("extract-1", "", {LABEL_SNAPSHOT_REF: "sha256:c", "containerd.io/gc.root": "r"})
        info = await sn.stat("sha256:c")
        assert info.kind == Kind.COMMITTED and info.labels["containerd.io/gc.root"] == "r"
        with pytest.raises(errdefs.NotFound):
            await sn.stat("extract-1")
    (row,) = rows(db)
    assert (row["key"], row["backend_key"], row["kind"]) == ("sha256:c", "shared/1/sha256:c", int(Kind.COMMITTED))


async def test_leases(sn, db):
    leases = LeaseStore(db)
    leases.create("ls", "l1")

    def held():
        return [(r.type, r.id) for r in leases.list_resources("ls", "l1")]

    with ns("ls", lease="l1"):
        await sn.prepare("k", "")
        assert held() == [("snapshots/native", "k")]
        await sn.commit("K", "k")
        assert held() == [("snapshots/native", "K")]
        await sn.view("v", "K")
        await sn.remove("v")
        assert held() == [("snapshots/native", "K")]
    with ns("ls", lease="missing"):
        with pytest.raises(errdefs.NotFound):
            await sn.prepare("z", "")
    with ns("ls"):
        assert [i.name for i in await sn.walk()] == ["K"]


async def test_service_events_and_lookup(db, backend):
    ex = Exchange()
    svc = SnapshotsService(db, {"native": backend}, ex)
    assert backend.gc_lock is svc.namespaced["native"].lock
    with pytest.raises(errdefs.InvalidArgument):
        svc.get("")
    with pytest.raises(errdefs.InvalidArgument) as e:
        svc.get("bogus")
    assert "snapshotter not loaded: bogus" in str(e.value)
    s = svc.get("native")
    sub = ex.subscribe('topic~="/snapshot/"')
    with ns("ev"):
        await s.prepare("k", "p" * 0)
        await s.view("v", "")
        await s.commit("K", "k")
        await s.remove("K")
        with pytest.raises(errdefs.NotFound):
            await s.remove("K")  # failures publish nothing
    got = []
    while sub.pending:
        env = await sub.get(timeout=1)
        got.append((env.namespace, env.topic, env.decode().to_dict()))
    sub.close()
    assert got == [("ev", "/snapshot/prepare", {"key": "k"}),
                   ("ev", "/snapshot/commit", {"key": "k", "name": "K"}),
                   ("ev", "/snapshot/remove", {"key": "K"})]


async def test_prune_removes_unreferenced_backend_snapshots(sn, db, backend):
    with ns("p"):
        await sn.prepare("a", "")
        await sn.commit("A", "a")
    await backend.prepare("orphan-parent-a", "")
    await backend.commit("orphan-parent", "orphan-parent-a")
    await backend.prepare("orphan-child", "orphan-parent")
    assert sn.backend_keys() == {r["backend_key"] for r in rows(db)}
    removed = await sn.prune()
    assert removed == ["orphan-child", "orphan-parent"]
    assert [i.name for i in await backend.walk()] == list(sn.backend_keys())


async def test_nasty_keys_namespaced(sn, db, backend):
    with ns("nasty"):
        with pytest.raises(errdefs.InvalidArgument):
            await sn.prepare("", "")
        with pytest.raises(errdefs.InvalidArgument):
            await sn.commit("", "x")
        keys = ["../x", "../../etc/passwd", "a/b/c", "k" * 4096, "sp ace\ttab", "ns/1/key"]
        for key in keys:
            await sn.prepare(key, "")
            await sn.commit(key + "-c", key)
        assert sorted(i.name for i in await sn.walk()) == sorted(k + "-c" for k in keys)
        for m in [await sn.prepare("child", "../x-c")]:
            assert all(x.source.startswith(backend.root) for x in m)
        await sn.remove("child")
        for key in keys:
            await sn.remove(key + "-c")
    assert os.listdir(os.path.join(backend.root, "snapshots")) == []
