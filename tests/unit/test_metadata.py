"""The metadata database: schema, namespaces and leases stores (no daemon needed)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from pycontainerd.core import errdefs
from pycontainerd.plugins.metadata.db import SCHEMA_VERSION, MetadataDB, now, ts
from pycontainerd.plugins.metadata.leases import EXPIRE_LABEL, LeaseStore, Resource
from pycontainerd.plugins.metadata.namespaces import NamespaceStore


@pytest.fixture
def db(tmp_path):
    d = MetadataDB(tmp_path / "meta.db")
    yield d
    d.close()


def test_schema_version_and_reopen(tmp_path):
    d = MetadataDB(tmp_path / "m.db")
    assert d.schema_version == SCHEMA_VERSION
    NamespaceStore(d).create("kept")
    d.close()
    d2 = MetadataDB(tmp_path / "m.db")
    assert [n.name for n in NamespaceStore(d2).list()] == ["kept"]
    d2.close()


def test_newer_schema_is_refused(tmp_path):
    d = MetadataDB(tmp_path / "m.db")
    d.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    d.close()
    with pytest.raises(RuntimeError, match="newer"):
        MetadataDB(tmp_path / "m.db")


def test_namespace_lifecycle(db):
    ns = NamespaceStore(db)
    created = ns.create("team", {"a": "1"})
    assert created.labels == {"a": "1"}
    with pytest.raises(errdefs.AlreadyExists, match="namespace \"team\": already exists"):
        ns.create("team")
    assert ns.update("team", {"b": "2"}, ["labels.b"]).labels == {"a": "1", "b": "2"}
    assert ns.update("team", {}, ["labels.a"]).labels == {"b": "2"}
    assert ns.update("team", {"c": "3"}, []).labels == {"c": "3"}
    with pytest.raises(errdefs.InvalidArgument, match="cannot update"):
        ns.update("team", {}, ["name"])
    ns.delete("team")
    with pytest.raises(errdefs.NotFound):
        ns.get("team")
    with pytest.raises(errdefs.NotFound):
        ns.delete("team")


@pytest.mark.parametrize("bad", ["", "../x", "a" * 77, "-a", "a..b"])
def test_namespace_bad_names_write_nothing(db, bad):
    ns = NamespaceStore(db)
    with pytest.raises(errdefs.InvalidArgument):
        ns.create(bad)
    assert ns.list() == []


def test_namespace_with_images_is_not_empty_but_leases_go_with_it(db):
    ns, leases = NamespaceStore(db), LeaseStore(db)
    leases.create("busy", "l1")
    stamp = ts(now())
    with db.write() as cur:
        cur.execute("INSERT INTO images VALUES ('busy', 'img', 'mt', 'sha256:00', 1, '{}', '{}', ?, ?)", (stamp, stamp))
        cur.execute("INSERT INTO snapshots VALUES ('busy', 'overlayfs', 'k', '1', '', 1, '{}', ?, ?)", (stamp, stamp))
    with pytest.raises(errdefs.FailedPrecondition, match='still has images, snapshots on "overlayfs" snapshotter'):
        ns.delete("busy")
    with db.write() as cur:
        cur.execute("DELETE FROM images")
        cur.execute("DELETE FROM snapshots")
    ns.delete("busy")
    assert leases.list("busy") == [] and db.read("SELECT * FROM leases") == []


def test_leases_and_resources(db):
    leases = LeaseStore(db)
    leases.create("ns", "l1", {"why": "test"})
    assert NamespaceStore(db).get("ns").name == "ns"
    with pytest.raises(errdefs.AlreadyExists):
        leases.create("ns", "l1")
    leases.add_resource("ns", "l1", Resource("sha256:" + "a" * 64, "content"))
    leases.add_resource("ns", "l1", Resource("key", "snapshots/overlayfs"))
    assert leases.list_resources("ns", "l1") == [Resource("sha256:" + "a" * 64, "content"),
                                                 Resource("key", "snapshots/overlayfs")]
    leases.delete_resource("ns", "l1", Resource("key", "snapshots/overlayfs"))
    assert len(leases.list_resources("ns", "l1")) == 1
    assert [lease.id for lease in leases.list("ns", ["labels.why==test"])] == ["l1"]
    assert leases.list("ns", ["id==other"]) == []
    assert leases.list("other-ns") == []
    leases.delete("ns", "l1")
    assert db.read("SELECT * FROM lease_resources") == []


@pytest.mark.parametrize("resource,error", [
    (Resource("nothex", "content"), errdefs.InvalidArgument),
    (Resource("sha256:" + "a" * 64, "content/x"), errdefs.InvalidArgument),
    (Resource("k", "snapshots"), errdefs.InvalidArgument),
    (Resource("k", "snapshots/a/b"), errdefs.InvalidArgument),
    (Resource("k", "volumes"), errdefs.Unimplemented),
])
def test_bad_resources(db, resource, error):
    leases = LeaseStore(db)
    leases.create("ns", "l1")
    with pytest.raises(error):
        leases.add_resource("ns", "l1", resource)
    assert leases.list_resources("ns", "l1") == []


@pytest.mark.parametrize("lease_id", ["427717452-9bi_", "580839159-RX_-", "with space", "a" * 200])
def test_lease_ids_as_ctr_makes_them(db, lease_id):
    assert LeaseStore(db).create("ns", lease_id).id == lease_id


@pytest.mark.parametrize("lease_id", ["bad\nline", "nul\x00", "x" * 1025])
def test_bad_lease_ids_write_nothing(db, lease_id):
    with pytest.raises(errdefs.InvalidArgument):
        LeaseStore(db).create("ns", lease_id)
    assert db.read("SELECT * FROM leases") == []


def test_resource_on_missing_lease(db):
    with pytest.raises(errdefs.NotFound):
        LeaseStore(db).add_resource("ns", "nope", Resource("k", "ingests"))


def test_expired_leases_are_deleted(db):
    leases = LeaseStore(db)
    past = (datetime.now(timezone.utc) - timedelta(seconds=5)).isoformat().replace("+00:00", "Z")
    future = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    leases.create("ns", "old", {EXPIRE_LABEL: past})
    leases.create("ns", "new", {EXPIRE_LABEL: future})
    leases.create("ns", "forever")
    assert leases.delete_expired() == [("ns", "old")]
    assert sorted(lease.id for lease in leases.list("ns")) == ["forever", "new"]


def test_failed_write_rolls_back(db):
    with pytest.raises(RuntimeError):
        with db.write() as cur:
            db.ensure_namespace(cur, "half")
            raise RuntimeError("crash mid-transaction")
    assert NamespaceStore(db).list() == []
