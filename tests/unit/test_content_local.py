"""The local content store (plugins/content/local.py) on a temp dir: blobs, ingests, resume, locks,
commit checks and the never-partial rule. No daemon."""
from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from pycontainerd.core import errdefs
from pycontainerd.plugins.content.local import INLINE_LIMIT, LocalStore, MemoryLabelStore, Writer


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha512(data: bytes) -> str:
    return "sha512:" + hashlib.sha512(data).hexdigest()


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "content")


async def ingest(store: LocalStore, ref: str, data: bytes, expected: str = "", chunk: int = 1 << 20) -> str:
    w = await store.writer(ref, len(data), expected)
    for i in range(0, len(data), chunk):
        await w.write(data[i:i + chunk])
    return await w.commit(len(data), expected)


def visible_blobs(store: LocalStore) -> list[str]:
    found = []
    for alg in os.listdir(store.root / "blobs"):
        found += [f"{alg}:{name}" for name in os.listdir(store.root / "blobs" / alg)]
    return sorted(found)


async def test_write_commit_info_read(store):
    data = os.urandom(3 << 20) + b"tail"
    dgst = await ingest(store, "r1", data, sha256(data))
    assert dgst == sha256(data)
    info = await store.info(dgst)
    assert (info.digest, info.size) == (dgst, len(data))
    assert await store.read(dgst) == data
    assert await store.read(dgst, 5, 10) == data[5:15]
    assert await store.read(dgst, len(data) - 2, 100) == data[-2:]
    ra = await store.reader(dgst)
    try:
        assert ra.size == len(data)
        assert await ra.read_at(1 << 20, 3) == data[1 << 20:(1 << 20) + 3]
        chunks = [c async for c in ra.chunks(7, 2 << 20, chunk=1 << 20)]
        assert b"".join(chunks) == data[7:7 + (2 << 20)]
    finally:
        ra.close()
    # the blob is read-only and the ingest dir is gone
    assert not os.stat(store.blob_path(dgst)).st_mode & 0o222
    assert os.listdir(store.root / "ingest") == []
    assert await store.list_statuses() == []


async def test_unknown_and_invalid_digests(store):
    missing = "sha256:" + "0" * 64
    with pytest.raises(errdefs.NotFound, match=f"content {missing}: not found"):
        await store.info(missing)
    with pytest.raises(errdefs.NotFound):
        await store.reader(missing)
    with pytest.raises(errdefs.NotFound):
        await store.delete(missing)
    with pytest.raises(errdefs.InvalidArgument):
        await store.info("sha256:xyz")
    with pytest.raises(errdefs.InvalidArgument):
        await store.info("md5:" + "0" * 32)


async def test_sha512(store):
    data = b"x" * (INLINE_LIMIT * 3 + 1)
    dgst = await ingest(store, "r512", data, sha512(data), chunk=50000)
    assert dgst == sha512(data)
    assert store.blob_path(dgst).parent.name == "sha512"
    assert (await store.info(dgst)).size == len(data)
    assert [i.digest for i in await store.walk()] == [dgst]


async def test_sha512_expected_only_at_commit_rehashes(store):
    data = b"late expectation" * 1000
    w = await store.writer("late")
    await w.write(data)
    assert w.digest() == sha256(data)
    assert await w.commit(len(data), sha512(data)) == sha512(data)


async def test_size_mismatch_commits_nothing(store):
    data = os.urandom(200_000)
    w = await store.writer("sz")
    await w.write(data)
    with pytest.raises(errdefs.FailedPrecondition, match=f"unexpected commit size {len(data)}, expected 5"):
        await w.commit(5, "")
    assert visible_blobs(store) == []
    # the ingest stays and can be resumed and committed correctly
    st = await store.status("sz")
    assert st.offset == len(data)
    w = await store.writer("sz")
    assert w.offset == len(data) and w.digest() == sha256(data)
    assert await w.commit(len(data), sha256(data)) == sha256(data)


async def test_digest_mismatch_commits_nothing(store):
    data = b"some bytes"
    wrong = sha256(b"other bytes")
    w = await store.writer("dg")
    await w.write(data)
    with pytest.raises(errdefs.FailedPrecondition, match=f"unexpected commit digest {sha256(data)}, expected {wrong}"):
        await w.commit(0, wrong)
    assert visible_blobs(store) == []
    with pytest.raises(errdefs.NotFound):
        await store.info(sha256(data))
    await store.abort("dg")
    assert await store.list_statuses() == []


async def test_commit_existing_digest_is_already_exists_and_removes_ingest(store):
    data = b"twice"
    await ingest(store, "one", data)
    w = await store.writer("two")
    await w.write(data)
    with pytest.raises(errdefs.AlreadyExists, match=f"content {sha256(data)}: already exists"):
        await w.commit(len(data), "")
    assert os.listdir(store.root / "ingest") == []
    # a writer expecting a digest that exists is refused at once
    with pytest.raises(errdefs.AlreadyExists):
        await store.writer("three", expected=sha256(data))


async def test_locked_ref(store):
    w = await store.writer("busy")
    with pytest.raises(errdefs.Unavailable, match=r"ref busy locked for .* \(since .*\): unavailable"):
        await store.writer("busy")
    await w.close()
    w2 = await store.writer("busy")  # released by close
    await w2.close()


async def test_lock_released_after_commit_failure(store):
    w = await store.writer("relock")
    await w.write(b"abc")
    with pytest.raises(errdefs.FailedPrecondition):
        await w.commit(99)
    w2 = await store.writer("relock")
    assert w2.offset == 3
    await w2.close()


async def test_resume_after_reopen(tmp_path):
    root = tmp_path / "content"
    data = os.urandom(5 << 20)
    store = LocalStore(root)
    w = await store.writer("resumable", total=len(data))
    await w.write(data[:3 << 20])
    await w.close()
    # a new store on the same root, as after a daemon restart
    store2 = LocalStore(root)
    st = await store2.status("resumable")
    assert (st.ref, st.offset, st.total) == ("resumable", 3 << 20, len(data))
    assert st.started_at is not None and st.updated_at >= st.started_at
    w = await store2.writer("resumable", total=len(data))
    assert w.offset == 3 << 20
    assert w.status().started_at == st.started_at
    await w.write(data[3 << 20:])
    assert await w.commit(len(data), sha256(data)) == sha256(data)


async def test_resume_after_crash_without_close(tmp_path):
    """A writer that never closed (the daemon was killed): the data file alone tells the offset."""
    root = tmp_path / "content"
    data = os.urandom(2 << 20)
    store = LocalStore(root)
    w = await store.writer("crashed")
    await w.write(data[:1 << 20])
    await w._drain()
    # simulate the crash: the fd goes away without close(); locks are per process
    os.close(w._fd)
    from pycontainerd.plugins.content import local
    local._unlock(store._lock_root, "crashed")
    store2 = LocalStore(root)
    w2 = await store2.writer("crashed")
    assert w2.offset == 1 << 20
    await w2.write(data[1 << 20:])
    assert await w2.commit(len(data), sha256(data)) == sha256(data)


async def test_truncate_and_write_offsets(store):
    w = await store.writer("tr")
    await w.write(b"garbage")
    await w.truncate(0)
    assert w.offset == 0
    await w.write(b"good")
    assert await w.commit(4, sha256(b"good")) == sha256(b"good")


async def test_partial_is_never_visible(store):
    data = os.urandom(4 << 20)
    w = await store.writer("partial", total=len(data))
    await w.write(data[:2 << 20])
    assert visible_blobs(store) == []
    assert await store.walk() == []
    with pytest.raises(errdefs.NotFound):
        await store.info(sha256(data))
    st = (await store.list_statuses())[0]
    assert (st.ref, st.offset, st.total) == ("partial", 2 << 20, len(data))
    await w.close()
    assert visible_blobs(store) == []
    await store.abort("partial")
    assert os.listdir(store.root / "ingest") == []
    with pytest.raises(errdefs.NotFound, match='ingest ref "partial": not found'):
        await store.abort("partial")


async def test_walk_filters_and_delete(tmp_path):
    store = LocalStore(tmp_path / "c", labels=MemoryLabelStore())
    a = await ingest(store, "a", b"aaa")
    b = await ingest(store, "b", b"bbb")
    c = await ingest(store, "c", b"ccc" * 10, sha512(b"ccc" * 10))
    assert sorted(i.digest for i in await store.walk()) == sorted([a, b, c])
    assert [i.digest for i in await store.walk(f"digest=={a}")] == [a]
    assert sorted(i.digest for i in await store.walk(f"digest=={a}", f"digest=={c}")) == sorted([a, c])
    await store.update(type((await store.info(b)))(b, 0, labels={"team": "x", "k": "v"}), ["labels.team", "labels.k"])
    assert [i.digest for i in await store.walk("labels.team==x")] == [b]
    info = await store.update(type((await store.info(b)))(b, 0, labels={}), ["labels.k"])
    assert info.labels == {"team": "x"}
    with pytest.raises(errdefs.InvalidArgument, match="cannot update"):
        await store.update(info, ["size"])
    await store.delete(a)
    assert sorted(i.digest for i in await store.walk()) == sorted([b, c])
    # junk in blobs/ is ignored
    (store.root / "blobs" / "md5").mkdir()
    (store.root / "blobs" / "md5" / "x").write_text("x")
    assert len(await store.walk()) == 2


async def test_update_without_label_store_is_refused(store):
    dgst = await ingest(store, "u", b"u")
    info = await store.info(dgst)
    with pytest.raises(errdefs.FailedPrecondition, match="immutable"):
        await store.update(info, ["labels.a"])


async def test_status_filters_and_walk_status_refs(store):
    w1 = await store.writer("pull-a")
    w2 = await store.writer("push-b")
    await w1.write(b"1")
    assert sorted(s.ref for s in await store.list_statuses()) == ["pull-a", "push-b"]
    assert [s.ref for s in await store.list_statuses("ref==pull-a")] == ["pull-a"]
    assert [s.ref for s in await store.list_statuses('ref~="^push"')] == ["push-b"]
    assert sorted(store.walk_status_refs()) == ["pull-a", "push-b"]
    with pytest.raises(errdefs.NotFound):
        await store.status("nope")
    await w1.close()
    await w2.close()


async def test_empty_ref_refused(store):
    with pytest.raises(errdefs.InvalidArgument, match="ref must not be empty"):
        await store.writer("")


async def test_empty_blob(store):
    dgst = await ingest(store, "empty", b"")
    assert dgst == sha256(b"")
    assert await store.read(dgst) == b""


async def test_many_small_writes_in_order(store):
    parts = [os.urandom(n) for n in (10, INLINE_LIMIT + 5, 3, INLINE_LIMIT * 4, 1, 7)]
    w = await store.writer("mixed")
    for p in parts:
        await w.write(p)
    data = b"".join(parts)
    assert w.digest() == sha256(data)
    assert await w.commit(len(data), sha256(data)) == sha256(data)
    assert await store.read(sha256(data)) == data


async def test_concurrent_writers_on_different_refs(store):
    blobs = [os.urandom(300_000 + i) for i in range(8)]
    digests = await asyncio.gather(*(ingest(store, f"c{i}", b, chunk=65_537) for i, b in enumerate(blobs)))
    assert list(digests) == [sha256(b) for b in blobs]


def test_writer_type_exported():
    assert Writer.__doc__


async def test_close_right_after_a_pipelined_write_keeps_the_bytes(store):
    """close() must not take the fd away from a file write still in flight."""
    data = os.urandom(INLINE_LIMIT * 8)
    for i in range(20):
        w = await store.writer(f"quick{i}")
        await w.write(data)
        await w.close()
        assert (await store.status(f"quick{i}")).offset == len(data)
        w = await store.writer(f"quick{i}")
        assert w.digest() == sha256(data)
        await w.close()


async def test_close_reports_a_failed_queued_write_and_releases_the_ref(store, monkeypatch):
    """A pipelined write that fails after write() returned is raised by close(), never lost
    silently; the ref is released and a resume starts from what the file holds."""
    real = Writer._write_all

    def failing(fd, view, offset):
        if len(view) > INLINE_LIMIT:
            raise OSError(28, "No space left on device")
        real(fd, view, offset)

    monkeypatch.setattr(Writer, "_write_all", staticmethod(failing))
    w = await store.writer("enospc")
    await w.write(b"a" * 10)
    assert await w.write(b"b" * (INLINE_LIMIT * 4)) == INLINE_LIMIT * 4  # accepted, queued
    with pytest.raises(errdefs.Unknown, match="write to ingest enospc failed: .*No space left"):
        await w.close()
    monkeypatch.undo()
    assert (await store.status("enospc")).offset == 10
    w = await store.writer("enospc")  # the lock was released
    assert w.offset == 10 and w.digest() == sha256(b"a" * 10)
    await w.close()


async def test_status_during_close_reports_the_writers_offset(store, monkeypatch):
    """Until close() has the queued bytes in the file, the store reports the writer's offset."""
    import threading
    release = threading.Event()
    real = Writer._write_all

    def slow(fd, view, offset):
        if len(view) > INLINE_LIMIT:
            assert release.wait(30)
        real(fd, view, offset)

    monkeypatch.setattr(Writer, "_write_all", staticmethod(slow))
    data = os.urandom(INLINE_LIMIT * 4)
    w = await store.writer("slowclose")
    await w.write(data)
    closing = asyncio.create_task(w.close())
    for _ in range(3):
        await asyncio.sleep(0)
        assert (await store.status("slowclose")).offset == len(data)
    assert not closing.done()
    release.set()
    await asyncio.wait_for(closing, 30)
    assert (await LocalStore(store.root).status("slowclose")).offset == len(data)


async def test_close_never_closes_a_file_descriptor_it_lost(store):
    """Someone else closed the writer's fd and the number was reused: close() says so and
    leaves the new owner's file open."""
    w = await store.writer("stolen")
    await w.write(b"x" * 10)
    os.close(w._fd)
    other = os.open(store.root / "other", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        with pytest.raises(errdefs.Unknown, match="closed behind the writer's back"):
            await w.close()
        os.fstat(other)  # still open
    finally:
        os.close(other)
    w = await store.writer("stolen")  # the ref was released all the same
    await w.close()


async def test_a_reused_buffer_does_not_change_what_was_written(store):
    """write() returns before a pipelined write reaches the file: the caller may refill its
    buffer at once, and the blob still holds (and is named by) what was written."""
    buf = bytearray(os.urandom(INLINE_LIMIT * 4))
    first = bytes(buf)
    w = await store.writer("reuse")
    await w.write(memoryview(buf))
    buf[:] = b"\0" * len(buf)  # refilled while the file write may still be queued
    assert await w.commit(len(first), sha256(first)) == sha256(first)
    assert await store.read(sha256(first)) == first
