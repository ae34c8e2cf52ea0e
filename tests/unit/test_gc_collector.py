"""The metadata garbage collector (plugins/metadata/gc.py) on a real sqlite MetadataDB with the
real content backend (plugins/content/local.py) under the namespaced content store, and the real
native snapshotter under the namespaced snapshots layer: roots, references through labels,
leases (flat, expired), ingests, namespaces sharing blobs, backend sweeps and their locks."""
from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from pycontainerd.core import errdefs
from pycontainerd.core.context import bind_request, unbind_request
from pycontainerd.plugins.content.local import LocalStore
from pycontainerd.plugins.metadata.content import ContentStore, backend_ref
from pycontainerd.plugins.metadata.db import MetadataDB, ts, now
from pycontainerd.plugins.metadata.gc import (Backend, Collector, Kind, Node, drop_unleased_ingests, ingests_only_in,
                                              label_refs)
from pycontainerd.plugins.metadata.images import Descriptor, Image, ImageStore
from pycontainerd.plugins.metadata.leases import LeaseStore, Resource
from pycontainerd.plugins.metadata.snapshots import NamespacedSnapshotter
from pycontainerd.plugins.snapshots.native import NativeSnapshotter

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def rfc3339(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class World:
    """A metadata db, the content store over a real backend, a native snapshotter; all real."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.db = MetadataDB(tmp / "meta" / "meta.db")
        self.backend = LocalStore(tmp / "content")
        self.content = ContentStore(self.db, self.backend)
        self.images = ImageStore(self.db)
        self.leases = LeaseStore(self.db)
        self.native = NativeSnapshotter(tmp / "native")
        self.snapshots = NamespacedSnapshotter(self.db, "native", self.native)
        self.snapshotters = {"native": Backend(self.native, self.snapshots.lock)}
        self.collector = Collector(self.db, lambda: Backend(self.backend, self.content.lock),
                                   lambda: self.snapshotters)

    async def put(self, ns: str, data: bytes, labels: dict | None = None, lease: str | None = None) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        w = await self.content.writer(ns, f"ref-{digest}-{ns}", len(data), lease=lease)
        await w.write(data)
        await w.commit(len(data), digest, labels)
        return digest

    def blob_file(self, digest: str) -> Path:
        return Path(self.backend.blob_path(digest))

    def has_row(self, ns: str, digest: str) -> bool:
        return self.content.has(ns, digest)

    def lease(self, ns: str, lease_id: str, labels: dict | None = None, *resources: Resource) -> None:
        self.leases.create(ns, lease_id, labels or {})
        for r in resources:
            self.leases.add_resource(ns, lease_id, r)

    async def snap(self, ns: str, op: str, *args, lease: str | None = None, **kw):
        md = {"containerd-namespace": ns}
        if lease:
            md["containerd-lease"] = lease
        tokens = bind_request(md)
        try:
            return await getattr(self.snapshots, op)(*args, **kw)
        finally:
            unbind_request(tokens)

    def container(self, ns: str, cid: str, snapshotter: str = "", key: str = "", labels: dict | None = None) -> None:
        stamp = ts(now())
        with self.db.write() as cur:
            self.db.ensure_namespace(cur, ns)
            cur.execute("INSERT INTO containers(namespace, id, labels, runtime_name, snapshotter, snapshot_key, "
                        "created_at, updated_at) VALUES (?, ?, ?, 'io.containerd.runc.v2', ?, ?, ?, ?)",
                        (ns, cid, json.dumps(labels or {}), snapshotter, key, stamp, stamp))

    def close(self) -> None:
        self.db.close()


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.close()


def run(coro):
    return asyncio.run(coro)


# -- references ----------------------------------------------------------------------------------

def test_label_refs_follow_containerds_prefix_rules():
    labels = {
        "containerd.io/gc.ref.content": "sha256:a",
        "containerd.io/gc.ref.content.config": "sha256:b",
        "containerd.io/gc.ref.content/x": "sha256:c",
        "containerd.io/gc.ref.contentx": "sha256:not",
        "containerd.io/gc.ref.snapshot.overlayfs": "key1",
        "containerd.io/gc.ref.snapshot.native/extra": "key2",
        "containerd.io/gc.root": "x",
        "other": "sha256:no",
    }
    assert set(label_refs("ns", labels)) == {
        Node(Kind.CONTENT, "ns", "sha256:a"), Node(Kind.CONTENT, "ns", "sha256:b"),
        Node(Kind.CONTENT, "ns", "sha256:c"), Node(Kind.SNAPSHOT, "ns", "overlayfs/key1"),
        Node(Kind.SNAPSHOT, "ns", "native/key2")}


# -- content -------------------------------------------------------------------------------------

def test_unreferenced_blob_goes_row_and_file(world):
    async def main():
        d = await world.put("ns", b"loose")
        assert world.blob_file(d).exists()
        stats = await world.collector.collect()
        assert not world.has_row("ns", d) and not world.blob_file(d).exists()
        assert stats.removed["blobs"] == 1 and stats.removed["backend blobs"] == 1
    run(main())


def test_image_holds_its_content_through_gc_ref_labels(world):
    async def main():
        layer = await world.put("ns", b"layer")
        config = await world.put("ns", b"{}")
        manifest = await world.put("ns", b"manifest", {"containerd.io/gc.ref.content.config": config,
                                                       "containerd.io/gc.ref.content.l.0": layer})
        loose = await world.put("ns", b"loose")
        world.images.create("ns", Image("img", Descriptor(MANIFEST, manifest, 8)))
        await world.collector.collect()
        for d in (layer, config, manifest):
            assert world.has_row("ns", d) and world.blob_file(d).exists()
        assert not world.blob_file(loose).exists()
        world.images.delete("ns", "img")
        await world.collector.collect()
        for d in (layer, config, manifest):
            assert not world.has_row("ns", d) and not world.blob_file(d).exists()
    run(main())


def test_image_labels_reference_content_too(world):
    async def main():
        extra = await world.put("ns", b"extra")
        target = await world.put("ns", b"target")
        world.images.create("ns", Image("img", Descriptor(MANIFEST, target, 6),
                                        {"containerd.io/gc.ref.content.extra": extra}))
        await world.collector.collect()
        assert world.blob_file(extra).exists()
    run(main())


def test_gc_root_label_keeps_a_blob(world):
    async def main():
        d = await world.put("ns", b"rooted", {"containerd.io/gc.root": "2030-01-01T00:00:00Z"})
        await world.collector.collect(full=True)
        assert world.has_row("ns", d) and world.blob_file(d).exists()
    run(main())


def test_blob_shared_by_namespaces_stays_while_one_references_it(world):
    async def main():
        d = await world.put("a", b"shared")
        await world.put("b", b"shared")
        world.images.create("b", Image("img", Descriptor(MANIFEST, d, 6)))
        await world.collector.collect()
        assert not world.has_row("a", d)            # a's row was unreferenced
        assert world.has_row("b", d) and world.blob_file(d).exists()
        world.images.delete("b", "img")
        await world.collector.collect()
        assert not world.blob_file(d).exists()
    run(main())


def test_reference_cycle_and_dangling_references_are_fine(world):
    async def main():
        a = "sha256:" + hashlib.sha256(b"a").hexdigest()
        b = await world.put("ns", b"b", {"containerd.io/gc.ref.content.x": a,
                                          "containerd.io/gc.ref.content.y": "not-a-digest"})
        a2 = await world.put("ns", b"a", {"containerd.io/gc.ref.content.back": b})
        assert a == a2
        world.images.create("ns", Image("img", Descriptor(MANIFEST, b, 1)))
        await world.collector.collect()
        assert world.has_row("ns", a) and world.has_row("ns", b)
        world.images.delete("ns", "img")
        await world.collector.collect()
        assert not world.has_row("ns", a) and not world.has_row("ns", b)
    run(main())


def test_content_row_deleted_by_the_store_is_swept_from_the_backend(world):
    async def main():
        d = await world.put("ns", b"x", {"containerd.io/gc.root": "1"})
        await world.content.delete("ns", d)
        assert world.blob_file(d).exists()  # the store only drops the row
        await world.collector.collect(full=True)
        assert not world.blob_file(d).exists()
    run(main())


def test_backend_sweep_waits_for_the_content_stores_shared_lock(world):
    async def main():
        orphan = await world.backend.writer("raw", 5)
        await orphan.write(b"stray")
        d = await orphan.commit(5, "")  # a blob in the backend whose row is "on its way"
        async with world.content.lock.shared():
            task = asyncio.create_task(world.collector.collect(full=True))
            await asyncio.sleep(0.1)
            assert not task.done() and world.blob_file(d).exists()
        await task
        assert not world.blob_file(d).exists()
    run(main())


# -- leases --------------------------------------------------------------------------------------

def test_lease_holds_content_until_deleted(world):
    async def main():
        world.lease("ns", "l1")
        d = await world.put("ns", b"leased", lease="l1")
        assert world.leases.list_resources("ns", "l1") == [Resource(d, "content")]
        await world.collector.collect()
        assert world.blob_file(d).exists()
        world.leases.delete("ns", "l1")
        await world.collector.collect()
        assert not world.blob_file(d).exists()
    run(main())


def test_lease_follows_labels_unless_flat(world):
    async def main():
        child = await world.put("ns", b"child")
        parent = await world.put("ns", b"parent", {"containerd.io/gc.ref.content.c": child})
        world.lease("ns", "normal", {}, Resource(parent, "content"))
        await world.collector.collect()
        assert world.blob_file(child).exists()
        world.leases.delete("ns", "normal")
        world.lease("ns", "flat", {"containerd.io/gc.flat": "true"}, Resource(parent, "content"))
        await world.collector.collect()
        assert world.blob_file(parent).exists() and not world.blob_file(child).exists()
    run(main())


def test_expired_lease_is_collected_with_what_only_it_held(world):
    async def main():
        past = rfc3339(datetime.now(timezone.utc) - timedelta(seconds=1))
        future = datetime.now(timezone.utc) + timedelta(hours=1)
        world.lease("ns", "old", {"containerd.io/gc.expire": past})
        world.lease("ns", "new", {"containerd.io/gc.expire": rfc3339(future)})
        world.lease("ns", "bad", {"containerd.io/gc.expire": "not a time"})
        world.lease("ns", "forever")
        d_old = await world.put("ns", b"old", lease="old")
        d_new = await world.put("ns", b"new", lease="new")
        stats = await world.collector.collect()
        assert [lease.id for lease in world.leases.list("ns")] == ["new", "bad", "forever"]
        assert not world.blob_file(d_old).exists() and world.blob_file(d_new).exists()
        assert stats.removed["leases"] == 1
        assert abs((stats.next_expiry - future).total_seconds()) < 0.001
    run(main())


def test_lease_expiring_later_is_not_collected_now(world):
    async def main():
        soon = datetime.now(timezone.utc) + timedelta(milliseconds=300)
        world.lease("ns", "soon", {"containerd.io/gc.expire": rfc3339(soon)})
        await world.collector.collect()
        if datetime.now(timezone.utc) < soon:  # the collection marked before the expiry
            assert [lease.id for lease in world.leases.list("ns")] == ["soon"]
        # (a stalled machine may be past it already: then only the second half is checked)
        await asyncio.sleep(max(0.0, (soon - datetime.now(timezone.utc)).total_seconds()) + 0.05)
        await world.collector.collect()
        assert world.leases.list("ns") == []
    run(main())


# -- ingests -------------------------------------------------------------------------------------

def test_unleased_ingest_is_kept_leased_one_goes_with_its_lease(world):
    async def main():
        w1 = await world.content.writer("ns", "free", 10)
        await w1.write(b"part")
        await w1.close()
        world.lease("ns", "l")
        w2 = await world.content.writer("ns", "held", 10, lease="l")
        await w2.write(b"part")
        await w2.close()
        await world.collector.collect(full=True)
        assert {s.ref for s in await world.content.list_statuses("ns")} == {"free", "held"}
        past = rfc3339(datetime.now(timezone.utc) - timedelta(seconds=1))
        with world.db.write() as cur:  # let the lease expire
            cur.execute("UPDATE leases SET labels = ? WHERE id = 'l'", (json.dumps({"containerd.io/gc.expire": past}),))
        stats = await world.collector.collect()
        assert {s.ref for s in await world.content.list_statuses("ns")} == {"free"}
        assert stats.removed["ingests"] == 1 and stats.removed["backend ingests"] == 1
        assert backend_ref("ns", "held") not in world.backend.walk_status_refs()
        assert backend_ref("ns", "free") in world.backend.walk_status_refs()
    run(main())


def test_deleted_lease_drops_the_ingests_only_it_held(world):
    async def main():
        world.lease("ns", "a")
        world.lease("ns", "b")
        for ref, lease in (("only-a", "a"), ("both", "a")):
            w = await world.content.writer("ns", ref, 4, lease=lease)
            await w.close()
        world.leases.add_resource("ns", "b", Resource("both", "ingests"))
        assert ingests_only_in(world.db, "ns", "a") == ["only-a"]
        world.leases.delete("ns", "a")
        assert drop_unleased_ingests(world.db, "ns", ["only-a", "both"]) == 1
        assert world.db.dirty.content
        await world.collector.collect()
        assert {s.ref for s in await world.content.list_statuses("ns")} == {"both"}
        assert backend_ref("ns", "only-a") not in world.backend.walk_status_refs()
    run(main())


def test_ingest_expected_digest_keeps_a_shared_blob(world):
    async def main():
        d = await world.put("a", b"shared", {"containerd.io/gc.root": "1"})
        world.lease("b", "l")
        w = await world.content.writer("b", "borrow", 6, d, lease="l")  # borrows a's blob
        assert w.status().offset == 6
        await world.content.delete("a", d)
        await world.collector.collect(full=True)
        assert world.blob_file(d).exists()  # the ingest expects it
        await world.content.abort("b", "borrow")
        await world.collector.collect(full=True)
        assert not world.blob_file(d).exists()
    run(main())


# -- snapshots and containers --------------------------------------------------------------------

def test_snapshots_unreferenced_go_rows_and_backend(world):
    async def main():
        await world.snap("ns", "prepare", "base-active")
        await world.snap("ns", "commit", "base", "base-active")
        await world.snap("ns", "prepare", "child-active", "base")
        await world.snap("ns", "commit", "child", "child-active")
        await world.snap("ns", "prepare", "work", "child")
        assert len(await world.native.walk()) == 3
        world.container("ns", "c1", "native", "work")
        await world.collector.collect(full=True)
        assert len(await world.native.walk()) == 3  # the container holds work -> child -> base
        with world.db.write() as cur:
            cur.execute("DELETE FROM containers")
        world.db.mark_dirty()
        stats = await world.collector.collect()
        assert stats.removed["snapshots"] == 3 and stats.removed["snapshots/native"] == 3
        assert await world.native.walk() == []
        assert world.db.read("SELECT * FROM snapshots") == []
    run(main())


def test_snapshot_roots_and_refs(world):
    async def main():
        await world.snap("ns", "prepare", "rooted", labels={"containerd.io/gc.root": "x"})
        await world.snap("ns", "prepare", "by-label")
        await world.snap("ns", "prepare", "by-lease", lease=None)
        blob = await world.put("ns", b"from-snapshot")
        await world.snap("ns", "prepare", "refs-content", labels={"containerd.io/gc.ref.content.x": blob,
                                                                    "containerd.io/gc.root": "y"})
        await world.put("ns", b"img", {"containerd.io/gc.ref.snapshot.native": "by-label"})
        img = "sha256:" + hashlib.sha256(b"img").hexdigest()
        world.images.create("ns", Image("i", Descriptor(MANIFEST, img, 3)))
        world.lease("ns", "l", {}, Resource("by-lease", "snapshots/native"))
        await world.snap("ns", "prepare", "loose")
        await world.collector.collect(full=True)
        keys = {r["key"] for r in world.db.read("SELECT key FROM snapshots")}
        assert keys == {"rooted", "by-label", "by-lease", "refs-content"}
        assert world.blob_file(blob).exists()
        assert len(await world.native.walk()) == 4
    run(main())


def test_container_labels_reference_content(world):
    async def main():
        d = await world.put("ns", b"spec-ish")
        world.container("ns", "c", labels={"containerd.io/gc.ref.content.x": d})
        await world.collector.collect()
        assert world.blob_file(d).exists()
    run(main())


def test_backend_snapshot_without_a_row_is_removed_children_first(world):
    async def main():
        await world.native.prepare("p-active")
        await world.native.commit("p", "p-active")
        await world.native.prepare("c-active", "p")
        await world.native.commit("c", "c-active")
        await world.native.prepare("leaf", "c")
        removed = await world.collector.sweep_snapshotter("native", world.native)
        assert removed == 3 and await world.native.walk() == []
    run(main())


def test_backend_parent_held_by_a_row_stays(world):
    async def main():
        await world.snap("ns", "prepare", "p-active")
        await world.snap("ns", "commit", "p", "p-active", labels={"containerd.io/gc.root": "1"})
        bkey = world.db.read("SELECT backend_key FROM snapshots WHERE key = 'p'")[0]["backend_key"]
        await world.native.prepare("orphan-child", bkey)
        await world.collector.collect(full=True)
        assert {i.name for i in await world.native.walk()} == {bkey}
    run(main())


def test_snapshotter_without_backend_rows_are_swept_without_error(world):
    async def main():
        stamp = ts(now())
        with world.db.write() as cur:
            world.db.ensure_namespace(cur, "ns")
            cur.execute("INSERT INTO snapshots(namespace, snapshotter, key, backend_key, parent, kind, labels, "
                        "created_at, updated_at) VALUES ('ns', 'ghost', 'k', 'ns/1/k', '', 3, '{}', ?, ?)",
                        (stamp, stamp))
        stats = await world.collector.collect(full=True)
        assert stats.removed["snapshots"] == 1 and "snapshots/ghost" not in stats.removed
    run(main())


def test_a_failing_backend_does_not_fail_the_collection(world):
    class Broken:
        async def walk(self, *a):
            raise RuntimeError("disk on fire")

        async def remove(self, key):
            raise AssertionError("never")

    async def main():
        world.snapshotters = {"native": Backend(world.native), "broken": Backend(Broken())}
        d = await world.put("ns", b"x")
        stats = await world.collector.collect(full=True)
        assert not world.blob_file(d).exists()
        assert "snapshots/broken" not in stats.removed and "broken" in stats.snapshots
    run(main())


# -- the sweep itself ----------------------------------------------------------------------------

def test_sweep_is_one_transaction_and_resets_dirty(world):
    async def main():
        calls = []
        world.db.register_mutation_callback(lambda dirty: calls.append((dirty, world.collector.sweeping)))
        world.images.create("ns", Image("i", Descriptor(MANIFEST, "sha256:" + "1" * 64, 1)))
        world.images.delete("ns", "i")
        assert world.db.dirty.deletions == 1
        calls.clear()
        stats, dirty = world.collector.sweep_rows()
        assert calls == [(False, True)]  # one commit, made while sweeping
        assert dirty.deletions == 1 and world.db.dirty.deletions == 0
        assert stats.meta > 0
    run(main())


def test_collections_do_not_overlap(world):
    async def main():
        for i in range(5):
            await world.put("ns", f"blob{i}".encode())
        results = await asyncio.gather(*(world.collector.collect(full=True) for _ in range(3)))
        assert sum(r.removed["blobs"] for r in results) == 5
        assert sum(r.removed.get("backend blobs", 0) for r in results) == 5
    run(main())
