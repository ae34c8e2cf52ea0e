"""Containers: the metadata store, the service's events and the gRPC adapter (no daemon needed)."""
from __future__ import annotations

import pytest
from betterproto.lib.google.protobuf import Any as ProtoAny
from betterproto.lib.google.protobuf import FieldMask

from pycontainerd.api.gen.containerd import events as ev
from pycontainerd.api.gen.containerd.services.containers import v1 as api
from pycontainerd.core import context, errdefs
from pycontainerd.core.events import Exchange
from pycontainerd.plugins.containers import ContainersGRPC, ContainersService, from_pb, to_pb
from pycontainerd.plugins.metadata.containers import Container, ContainerStore, TypedValue
from pycontainerd.plugins.metadata.db import MetadataDB
from pycontainerd.plugins.metadata.namespaces import NamespaceStore

SPEC = TypedValue("types.containerd.io/opencontainers/runtime-spec/1/Spec", b'{"ociVersion":"1.0.2-dev"}')


@pytest.fixture
def db(tmp_path):
    d = MetadataDB(tmp_path / "meta.db")
    yield d
    d.close()


@pytest.fixture
def store(db):
    return ContainerStore(db)


def mk(cid: str = "c1", **kw) -> Container:
    kw.setdefault("runtime_name", "io.containerd.runc.v2")
    kw.setdefault("spec", SPEC)
    return Container(id=cid, **kw)


def count_rows(db) -> int:
    return db.read("SELECT COUNT(*) AS n FROM containers")[0]["n"]


# -- store -------------------------------------------------------------------------------------

def test_create_get_roundtrip(store):
    opts = TypedValue("containerd.runc.v1.Options", b"")
    c = store.create("ns", mk(labels={"a": "1", "empty": ""}, image="docker.io/library/bb:latest",
                              runtime_options=opts, snapshotter="overlayfs", snapshot_key="c1",
                              sandbox_id="sb", extensions={"ext": TypedValue("x/y", b"\x01")}))
    assert c.created_at is not None and c.created_at == c.updated_at
    got = store.get("ns", "c1")
    assert got.labels == {"a": "1"}  # empty values are dropped
    assert got.image == "docker.io/library/bb:latest"
    assert got.runtime_options == opts and got.spec == SPEC
    assert (got.snapshotter, got.snapshot_key, got.sandbox_id) == ("overlayfs", "c1", "sb")
    assert got.extensions == {"ext": TypedValue("x/y", b"\x01")}
    assert got.created_at == c.created_at


def test_create_duplicate(store):
    store.create("ns", mk())
    with pytest.raises(errdefs.AlreadyExists) as e:
        store.create("ns", mk())
    assert str(e.value) == 'container "c1": already exists'
    store.create("other", mk())  # same id in another namespace is fine


@pytest.mark.parametrize("bad", ["", "../escape", "a" * 77, "-a", "a..b", "a b", "a/b", "é"])
def test_create_bad_ids_write_nothing(store, db, bad):
    with pytest.raises(errdefs.InvalidArgument) as e:
        store.create("ns", mk(bad))
    assert str(e.value).startswith("create container failed validation: container.ID: identifier")
    assert count_rows(db) == 0


@pytest.mark.parametrize("kw, msg", [
    ({"runtime_name": ""}, "container.Runtime.Name must be set"),
    ({"spec": None}, "container.Spec must be set"),
    ({"snapshot_key": "k"}, "container.Snapshotter must be set if container.SnapshotKey is set"),
    ({"extensions": {"": TypedValue()}}, "container.Extension keys must not be zero-length"),
    ({"labels": {"k": "v" * 5000}}, "containers.Labels: label key and value greater than maximum size"),
])
def test_create_validation(store, db, kw, msg):
    with pytest.raises(errdefs.InvalidArgument, match=msg):
        store.create("ns", mk(**kw))
    assert count_rows(db) == 0


def test_get_and_delete_not_found(store):
    with pytest.raises(errdefs.NotFound) as e:
        store.get("ns", "nope")
    assert str(e.value) == 'container "nope" in namespace "ns": not found'
    with pytest.raises(errdefs.NotFound, match='cannot delete container "nope" in namespace "ns"'):
        store.delete("ns", "nope")
    store.create("ns", mk())
    with pytest.raises(errdefs.NotFound) as e:
        store.delete("ns", "nope")
    assert str(e.value) == "container nope: not found"
    store.delete("ns", "c1")
    with pytest.raises(errdefs.NotFound):
        store.get("ns", "c1")


def test_list_order_and_filters(store):
    store.create("ns", mk("b", image="img/one", labels={"tier": "web", "x.y": "1"}))
    store.create("ns", mk("a", image="img/two", runtime_name="io.containerd.pyrunc.v2"))
    store.create("ns", mk("c", labels={"tier": "db"}, snapshotter="native"))
    store.create("other", mk("zz"))
    ids = lambda *f: [c.id for c in store.list("ns", f)]  # noqa: E731
    assert ids() == ["a", "b", "c"]
    assert ids("id==b") == ["b"]
    assert ids("image==img/two") == ["a"]
    assert ids("image") == ["a", "b"]
    assert ids("runtime.name==io.containerd.pyrunc.v2") == ["a"]
    assert ids("labels.tier==web") == ["b"]
    assert ids("labels.tier") == ["b", "c"]
    assert ids('labels."x.y"==1') == ["b"]
    assert ids("labels.tier==web", "id==a") == ["a", "b"]  # OR between strings
    assert ids("labels.tier~=^d") == ["c"]
    assert ids("snapshotter==native") == []  # not a filterable field in containerd 1.6
    with pytest.raises(errdefs.InvalidArgument):
        store.list("ns", ["labels.=="])


def test_update_paths(store):
    store.create("ns", mk(labels={"a": "1", "b": "2"}, image="i1", snapshotter="overlayfs", snapshot_key="k1",
                          extensions={"e1": TypedValue("t", b"1"), "e2": TypedValue("t", b"2")}))
    before = store.get("ns", "c1")
    u = store.update("ns", Container(id="c1", labels={"b": "3", "c": "4"}), ["labels.b", "labels.c"])
    assert u.labels == {"a": "1", "b": "3", "c": "4"}
    assert u.updated_at > before.updated_at and u.created_at == before.created_at
    u = store.update("ns", Container(id="c1", labels={}), ["labels.a"])  # absent/empty removes
    assert u.labels == {"b": "3", "c": "4"}
    u = store.update("ns", Container(id="c1", labels={"only": "x"}), ["labels"])
    assert u.labels == {"only": "x"}
    new_spec = TypedValue(SPEC.type_url, b"{}")
    u = store.update("ns", Container(id="c1", spec=new_spec, image="i2", snapshot_key="k2"),
                     ["spec", "image", "snapshotkey"])
    assert (u.spec, u.image, u.snapshot_key) == (new_spec, "i2", "k2")
    u = store.update("ns", Container(id="c1", extensions={"e3": TypedValue("t", b"3")}), ["extensions.e3", "extensions.e1"])
    assert u.extensions == {"e2": TypedValue("t", b"2"), "e3": TypedValue("t", b"3")}
    u = store.update("ns", Container(id="c1", extensions={}), ["extensions"])
    assert u.extensions == {}
    assert store.get("ns", "c1").labels == {"only": "x"}


def test_update_refusals(store, db):
    store.create("ns", mk(snapshotter="overlayfs", snapshot_key="k"))
    for path in ("runtime", "snapshotter", "id", "created_at", "runtime.name"):
        with pytest.raises(errdefs.InvalidArgument) as e:
            store.update("ns", Container(id="c1"), [path])
        assert str(e.value) == f'cannot update "{path}" field on "c1": invalid argument'
    with pytest.raises(errdefs.InvalidArgument, match="must specify a container id"):
        store.update("ns", Container(id=""), ["labels"])
    with pytest.raises(errdefs.InvalidArgument, match="update failed validation: container.Spec must be set"):
        store.update("ns", Container(id="c1"), ["spec"])
    with pytest.raises(errdefs.NotFound) as e:
        store.update("ns", Container(id="nope"), ["labels"])
    assert str(e.value) == 'container "nope": not found'
    with pytest.raises(errdefs.NotFound, match='cannot update container "x" in namespace "empty"'):
        store.update("empty", Container(id="x"), ["labels"])
    # the failed updates wrote nothing
    c = store.get("ns", "c1")
    assert c.spec == SPEC and c.created_at == c.updated_at


def test_update_without_mask_replaces_and_guards_immutables(store):
    store.create("ns", mk(labels={"a": "1"}, snapshotter="overlayfs", snapshot_key="k", image="i"))
    full = store.get("ns", "c1")
    full.labels = {"z": "9"}
    full.image = "j"
    u = store.update("ns", full)
    assert u.labels == {"z": "9"} and u.image == "j"
    with pytest.raises(errdefs.InvalidArgument, match="container.Snapshotter field is immutable"):
        store.update("ns", mk(snapshotter="native", snapshot_key="k"))
    with pytest.raises(errdefs.InvalidArgument, match="container.Runtime.Name field is immutable"):
        store.update("ns", mk(runtime_name="other", snapshotter="overlayfs", snapshot_key="k"))


def test_namespace_with_a_container_cannot_be_deleted(db, store):
    store.create("busy", mk())
    with pytest.raises(errdefs.FailedPrecondition, match="containers"):
        NamespaceStore(db).delete("busy")
    store.delete("busy", "c1")
    NamespaceStore(db).delete("busy")


def test_records_survive_reopen(tmp_path):
    d = MetadataDB(tmp_path / "m.db")
    ContainerStore(d).create("ns", mk(extensions={"k": TypedValue("t", bytes(range(256)))}))
    d.close()
    d2 = MetadataDB(tmp_path / "m.db")
    assert ContainerStore(d2).get("ns", "c1").extensions["k"].value == bytes(range(256))
    d2.close()


# -- service and gRPC adapter ------------------------------------------------------------------

@pytest.fixture
def bound():
    tokens = context.bind_request({context.NAMESPACE_HEADER: "testns"})
    yield
    context.unbind_request(tokens)


@pytest.fixture
def grpc(store):
    exchange = Exchange()
    return ContainersGRPC(ContainersService(store, exchange)), exchange


def pb_container(cid="c1", **kw) -> api.Container:
    return api.Container(id=cid, runtime=api.ContainerRuntime(name="io.containerd.runc.v2",
                                                              options=ProtoAny("containerd.runc.v1.Options", b"")),
                         spec=ProtoAny(SPEC.type_url, SPEC.value), **kw)


async def test_grpc_crud_and_events(grpc, bound):
    svc, exchange = grpc
    sub = exchange.subscribe()
    resp = await svc.create(api.CreateContainerRequest(container=pb_container(labels={"a": "1"}, image="img")))
    assert resp.container.id == "c1" and resp.container.labels == {"a": "1"}
    env = await sub.get(timeout=1)
    assert (env.namespace, env.topic) == ("testns", "/containers/create")
    assert env.event.type_url == "containerd.events.ContainerCreate"
    created = ev.ContainerCreate().parse(env.event.value)
    assert (created.id, created.image, created.runtime.name) == ("c1", "img", "io.containerd.runc.v2")
    assert created.runtime.options.type_url == "containerd.runc.v1.Options"

    got = (await svc.get(api.GetContainerRequest(id="c1"))).container
    assert got.spec.type_url == SPEC.type_url and got.spec.value == SPEC.value
    assert got.runtime.options.type_url == "containerd.runc.v1.Options"

    up = await svc.update(api.UpdateContainerRequest(container=api.Container(id="c1", labels={"b": "2"}),
                                                     update_mask=FieldMask(paths=["labels.b"])))
    assert up.container.labels == {"a": "1", "b": "2"}
    env = await sub.get(timeout=1)
    assert env.topic == "/containers/update"
    updated = ev.ContainerUpdate().parse(env.event.value)
    assert updated.labels == {"a": "1", "b": "2"} and updated.image == "img"

    listed = [m.container.id async for m in svc.list_stream(api.ListContainersRequest(filters=["labels.b==2"]))]
    assert listed == ["c1"]
    assert [c.id for c in (await svc.list(api.ListContainersRequest())).containers] == ["c1"]

    await svc.delete(api.DeleteContainerRequest(id="c1"))
    env = await sub.get(timeout=1)
    assert env.topic == "/containers/delete"
    assert ev.ContainerDelete().parse(env.event.value).id == "c1"
    sub.close()


async def test_grpc_errors(grpc, bound):
    svc, exchange = grpc
    with pytest.raises(errdefs.InvalidArgument, match="Container.ID required"):
        await svc.update(api.UpdateContainerRequest(container=api.Container()))
    with pytest.raises(errdefs.InvalidArgument, match="container.Spec must be set"):
        await svc.create(api.CreateContainerRequest(container=api.Container(
            id="x", runtime=api.ContainerRuntime(name="r"))))
    with pytest.raises(errdefs.InvalidArgument, match="container.Runtime.Name must be set"):
        await svc.create(api.CreateContainerRequest(container=api.Container(id="x", spec=ProtoAny("t", b"{}"))))
    with pytest.raises(errdefs.NotFound):
        await svc.delete(api.DeleteContainerRequest(id="x"))


async def test_grpc_needs_a_namespace(grpc):
    svc, _ = grpc
    with pytest.raises(errdefs.FailedPrecondition, match="namespace is required"):
        await svc.get(api.GetContainerRequest(id="c1"))


def test_pb_conversion_roundtrip():
    c = Container(id="c", runtime_name="r", spec=SPEC, labels={"l": "v"}, image="i",
                  runtime_options=None, snapshotter="s", snapshot_key="k",
                  extensions={"e": TypedValue("t", b"v")})
    pb = api.Container().parse(bytes(to_pb(c)))
    back = from_pb(pb)
    assert (back.id, back.runtime_name, back.spec, back.labels, back.image) == ("c", "r", SPEC, {"l": "v"}, "i")
    assert back.runtime_options is None
    assert (back.snapshotter, back.snapshot_key, back.extensions) == ("s", "k", {"e": TypedValue("t", b"v")})
    # an empty spec Any sent by a client counts as set (Go's non-nil pointer)
    empty_spec = bytes(api.Container(id="c")) + b"\x2a\x00"
    assert from_pb(api.Container().parse(empty_spec)).spec == TypedValue("", b"")
