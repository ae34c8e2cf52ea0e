"""The namespaced content store (plugins/metadata/content.py) and the content service over it:
visibility across namespaces, the shared-content shortcut, labels, leases, ingests, events."""
from __future__ import annotations

import hashlib
import os

import pytest

from pycontainerd.core import context, errdefs
from pycontainerd.core.events import Exchange
from pycontainerd.plugins.content.local import Info, LocalStore
from pycontainerd.plugins.content.service import ContentService
from pycontainerd.plugins.metadata.content import ISOLATED, ContentStore, backend_ref
from pycontainerd.plugins.metadata.db import MetadataDB
from pycontainerd.plugins.metadata.leases import LeaseStore, Resource
from pycontainerd.plugins.metadata.namespaces import NamespaceStore


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def db(tmp_path):
    d = MetadataDB(tmp_path / "meta.db")
    yield d
    d.close()


@pytest.fixture
def backend(tmp_path):
    return LocalStore(tmp_path / "content")


@pytest.fixture
def store(db, backend):
    return ContentStore(db, backend)


async def put(store: ContentStore, ns: str, ref: str, data: bytes, expected: str = "", lease=None,
              labels=None) -> str:
    w = await store.writer(ns, ref, len(data), expected, lease)
    try:
        if w.status().offset == 0:
            await w.write(data)
        return await w.commit(len(data), expected, labels)
    finally:
        await w.close()


async def test_visibility_across_namespaces(store, backend):
    data = os.urandom(100_000)
    dgst = await put(store, "a", "r", data, labels={"x": "1"})
    assert store.info("a", dgst).size == len(data)
    assert store.info("a", dgst).labels == {"x": "1"}
    with pytest.raises(errdefs.NotFound, match=f"content digest {dgst}: not found"):
        store.info("b", dgst)
    with pytest.raises(errdefs.NotFound):
        await store.reader("b", dgst)
    assert store.walk("b") == []
    # B proves it has the bytes: isolated-style full write, backend already has them
    assert await put(store, "b", "r", data) == dgst
    assert store.info("b", dgst).labels == {}
    assert await store.read("b", dgst, 10, 5) == data[10:15]
    # deleting in A leaves B and the backend blob alone
    await store.delete("a", dgst)
    with pytest.raises(errdefs.NotFound):
        store.info("a", dgst)
    assert store.info("b", dgst).digest == dgst
    assert backend.exists(dgst)
    with pytest.raises(errdefs.NotFound):
        await store.delete("a", dgst)


async def test_shared_shortcut_commits_without_bytes(store, backend, db):
    data = b"shared blob" * 1000
    dgst = await put(store, "a", "r1", data)
    w = await store.writer("b", "r2", 0, dgst)
    st = w.status()
    assert (st.offset, st.total, st.expected) == (len(data), len(data), dgst)
    assert w.digest() == dgst
    # wrong size or digest on commit are refused and nothing is added
    with pytest.raises(errdefs.FailedPrecondition, match='"r2" failed size validation'):
        await w.commit(5, dgst)
    with pytest.raises(errdefs.FailedPrecondition, match='"r2" unexpected digest'):
        await w.commit(len(data), sha256(b"nope"))
    assert await w.commit(len(data), dgst) == dgst
    assert store.info("b", dgst).size == len(data)
    assert db.read("SELECT * FROM ingests") == []
    # no backend ingest was ever opened for the borrowed blob
    assert os.listdir(backend.root / "ingest") == []


async def test_shared_writer_with_bytes_copies_and_verifies(store):
    data = os.urandom(3 << 20)
    dgst = await put(store, "a", "r1", data)
    w = await store.writer("b", "r2", 0, dgst)
    await w.truncate(0)  # a client starting over at offset 0 sends every byte
    assert w.status().offset == 0
    await w.write(data)
    assert await w.commit(len(data), dgst) == dgst
    assert store.info("b", dgst).digest == dgst


async def test_isolated_policy_needs_the_bytes(db, backend):
    store = ContentStore(db, backend, ISOLATED)
    data = b"isolated"
    dgst = await put(store, "a", "r", data)
    w = await store.writer("b", "r", 0, dgst)
    assert w.status().offset == 0
    with pytest.raises(errdefs.FailedPrecondition):
        await w.commit(len(data), dgst)  # nothing written: size 0 != 8
    w = await store.writer("b", "r", 0, dgst)
    await w.write(data)
    assert await w.commit(len(data), dgst) == dgst


async def test_writer_expected_present_in_namespace(store):
    dgst = await put(store, "a", "r", b"here")
    with pytest.raises(errdefs.AlreadyExists, match=f"content {dgst}: already exists"):
        await store.writer("a", "again", 0, dgst)
    # committing the same bytes again without announcing them: AlreadyExists, ingest gone
    w = await store.writer("a", "again")
    await w.write(b"here")
    with pytest.raises(errdefs.AlreadyExists):
        await w.commit(4)
    assert await store.list_statuses("a") == []


async def test_update_labels(store):
    dgst = await put(store, "a", "r", b"labels", labels={"keep": "1", "drop": "2"})
    info = await store.update("a", Info(dgst, 0, labels={"new": "3", "drop": ""}), ["labels.new", "labels.drop"])
    assert info.labels == {"keep": "1", "new": "3"}
    assert store.info("a", dgst).labels == {"keep": "1", "new": "3"}
    info = await store.update("a", Info(dgst, 0, labels={"only": "x"}))
    assert info.labels == {"only": "x"}
    assert info.updated_at >= info.created_at
    with pytest.raises(errdefs.InvalidArgument, match='cannot update "size" field on content info'):
        await store.update("a", Info(dgst, 0), ["size"])
    with pytest.raises(errdefs.InvalidArgument, match="info.Labels: label key and value greater than maximum size"):
        await store.update("a", Info(dgst, 0, labels={"big": "v" * 5000}), ["labels.big"])
    assert store.info("a", dgst).labels == {"only": "x"}
    with pytest.raises(errdefs.NotFound):
        await store.update("b", Info(dgst, 0, labels={}), [])


async def test_bad_labels_on_commit_commit_nothing(store, backend):
    w = await store.writer("a", "bad")
    await w.write(b"x")
    with pytest.raises(errdefs.InvalidArgument, match="info.Labels"):
        await w.commit(1, "", {"k": "v" * 5000})
    assert store.walk("a") == []
    assert (await store.status("a", "bad")).offset == 1


async def test_walk_filters(store):
    a = await put(store, "n", "a", b"a", labels={"team": "red"})
    b = await put(store, "n", "b", b"b", labels={"team": "blue"})
    assert sorted(i.digest for i in store.walk("n")) == sorted([a, b])
    assert [i.digest for i in store.walk("n", "labels.team==red")] == [a]
    assert [i.digest for i in store.walk("n", f"digest=={b}")] == [b]
    assert sorted(i.digest for i in store.walk("n", "labels.team==red", "labels.team==blue")) == sorted([a, b])
    with pytest.raises(errdefs.InvalidArgument):
        store.walk("n", "labels.")


async def test_ingests_per_namespace(store, backend, db):
    w = await store.writer("a", "ref1", 10)
    await w.write(b"12345")
    await w.close()
    st = await store.status("a", "ref1")
    assert (st.ref, st.offset, st.total) == ("ref1", 5, 10)
    assert [s.ref for s in await store.list_statuses("a")] == ["ref1"]
    assert await store.list_statuses("b") == []
    with pytest.raises(errdefs.NotFound, match="reference ref1: not found"):
        await store.status("b", "ref1")
    assert backend.walk_status_refs() == [backend_ref("a", "ref1")]
    # resume from the stored offset in the same namespace
    w = await store.writer("a", "ref1", 10)
    assert w.status().offset == 5
    await w.write(b"67890")
    assert await w.commit(10) == sha256(b"1234567890")
    # abort
    w = await store.writer("a", "ref2")
    await w.close()
    await store.abort("a", "ref2")
    assert await store.list_statuses("a") == []
    assert backend.walk_status_refs() == []
    with pytest.raises(errdefs.NotFound, match="reference ref2"):
        await store.abort("a", "ref2")


async def test_namespace_created_on_first_write(store, db):
    await put(store, "fresh", "r", b"x")
    assert [n.name for n in NamespaceStore(db).list()] == ["fresh"]
    with pytest.raises(errdefs.FailedPrecondition, match="must be empty, but it still has blobs"):
        NamespaceStore(db).delete("fresh")


async def test_leases_record_content_and_ingests(store, db):
    leases = LeaseStore(db)
    leases.create("a", "L")
    w = await store.writer("a", "leased", lease="L")
    await w.write(b"leased bytes")
    assert leases.list_resources("a", "L") == [Resource("leased", "ingests")]
    dgst = await w.commit(0)
    assert leases.list_resources("a", "L") == [Resource(dgst, "content")]
    # an existing digest announced under a lease joins the lease
    other = await put(store, "a", "o", b"other")
    with pytest.raises(errdefs.AlreadyExists):
        await store.writer("a", "x", 0, other, lease="L")
    assert Resource(other, "content") in leases.list_resources("a", "L")
    # delete under the lease drops the resource
    await store.delete("a", dgst, lease="L")
    assert Resource(dgst, "content") not in leases.list_resources("a", "L")
    # abort under the lease drops the ingest resource
    w = await store.writer("a", "ab", lease="L")
    await w.close()
    await store.abort("a", "ab", lease="L")
    assert Resource("ab", "ingests") not in leases.list_resources("a", "L")
    # an unknown lease is refused before anything is recorded
    with pytest.raises(errdefs.NotFound, match="lease does not exist"):
        await store.writer("a", "nolease", lease="missing")
    assert await store.list_statuses("a") == []


async def test_gc_lock_excludes_commits(store):
    import asyncio
    w = await store.writer("a", "locked")
    await w.write(b"data")
    async with store.lock.exclusive():
        task = asyncio.create_task(w.commit(4))
        await asyncio.sleep(0.05)
        assert not task.done()
    assert await task == sha256(b"data")


async def test_dirty_callback_on_delete(store):
    calls = []
    store.on_dirty(lambda: calls.append(1))
    dgst = await put(store, "a", "r", b"d")
    await store.delete("a", dgst)
    assert calls == [1] and store.dirty == 1


# -- the service: namespace and lease from the request context, events -----------------------

async def test_service_uses_context_and_publishes_delete(store):
    exchange = Exchange()
    service = ContentService(store, exchange)
    sub = exchange.subscribe('topic=="/content/delete"')
    with pytest.raises(errdefs.FailedPrecondition, match="namespace is required"):
        service.list()
    tokens = context.bind_request({"containerd-namespace": "svc"})
    try:
        dgst = await service.write_blob("r", b"service bytes")
        assert [i.digest for i in service.list()] == [dgst]
        assert await service.read(dgst) == b"service bytes"
        assert await service.write_blob("r2", b"service bytes", dgst) == dgst
        await service.delete(dgst)
        env = await sub.get(timeout=2)
        assert (env.namespace, env.topic, env.decode().digest) == ("svc", "/content/delete", dgst)
    finally:
        context.unbind_request(tokens)
        sub.close()
    tokens = context.bind_request({"containerd-namespace": "bad/ns"})
    try:
        with pytest.raises(errdefs.InvalidArgument, match="namespace validation"):
            service.list()
    finally:
        context.unbind_request(tokens)
