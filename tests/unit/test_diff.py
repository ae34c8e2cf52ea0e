"""The walking differ and the diff service in-process, over the real namespaced content store
(sqlite metadata + local blobs): Apply onto bind and overlay mounts, Compare into content with
the uncompressed label, containerd's errors, and the service's differ order."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path

import pytest

from pycontainerd.core import archive, context, errdefs
from pycontainerd.core import mount as mountmod
from pycontainerd.core.events import Exchange
from pycontainerd.core.mount import Mount
from pycontainerd.plugins.content.local import LocalStore
from pycontainerd.plugins.content.service import ContentService
from pycontainerd.plugins.diff.service import DiffGRPC, DiffService
from pycontainerd.plugins.diff.walking import Descriptor, WalkingDiff, readonly_mounts
from pycontainerd.plugins.metadata.content import ContentStore
from pycontainerd.plugins.metadata.db import MetadataDB

from .test_archive import LOWER, make_tar, member, sha, tree

ROOT = os.geteuid() == 0


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="difftest-", dir="/tmp")
    try:
        yield d
    finally:
        if ROOT:
            mountmod.unmount_recursive(d, lazy=True)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def content(tmp):
    db = MetadataDB(Path(tmp) / "meta.db")
    svc = ContentService(ContentStore(db, LocalStore(os.path.join(tmp, "content"))), Exchange())
    tokens = context.bind_request({"containerd-namespace": "testing"})
    try:
        yield svc
    finally:
        context.unbind_request(tokens)
        db.close()


@pytest.fixture
def differ(content, tmp):
    return WalkingDiff(content, temp_root=os.path.join(tmp, "mnt"))


async def put(content, data: bytes) -> str:
    return await content.write_blob("ref-" + sha(data)[7:19], data, sha(data))


def bind(path, ro=False):
    return [Mount("bind", path, options=["ro" if ro else "rw", "rbind"])]


async def test_apply_into_bind_mount(content, differ, tmp):
    blob = gzip.compress(LOWER)
    dgst = await put(content, blob)
    target = os.path.join(tmp, "snap")
    os.makedirs(target)
    applied = await differ.apply(Descriptor(archive.MEDIA_TYPE_LAYER_GZIP, dgst, len(blob)), bind(target))
    assert applied == Descriptor(archive.MEDIA_TYPE_LAYER, sha(LOWER), len(LOWER))
    assert sorted(os.listdir(target)) == ["dir", "gone", "keep", "link", "opq", "opq2"]


async def test_apply_errors(content, differ, tmp):
    target = os.path.join(tmp, "snap")
    os.makedirs(target)
    with pytest.raises(errdefs.NotFound, match="failed to get reader from content store: content digest"):
        await differ.apply(Descriptor(archive.MEDIA_TYPE_LAYER, sha(b"nope"), 4), bind(target))
    dgst = await put(content, b"{}")
    with pytest.raises(errdefs.Unknown, match="failed to get stream processor for application/json"):
        await differ.apply(Descriptor("application/json", dgst, 2), bind(target))
    broken = gzip.compress(LOWER)[:-20]
    dgst = await put(content, broken)
    with pytest.raises(errdefs.InvalidArgument, match="gzip"):
        await differ.apply(Descriptor(archive.MEDIA_TYPE_LAYER_GZIP, dgst, len(broken)), bind(target))
    good = gzip.compress(make_tar(member("x", data=b"1")))
    dgst = await put(content, good)
    with pytest.raises(errdefs.InvalidArgument, match="size mismatch"):
        await differ.apply(Descriptor(archive.MEDIA_TYPE_LAYER_GZIP, dgst, len(good) + 1), bind(target))
    other_ns = context.bind_request({"containerd-namespace": "elsewhere"})
    try:
        with pytest.raises(errdefs.NotFound):
            await differ.apply(Descriptor(archive.MEDIA_TYPE_LAYER_GZIP, dgst, len(good)), bind(target))
    finally:
        context.unbind_request(other_ns)


async def test_compare_into_content(content, differ, tmp):
    lower, upper = os.path.join(tmp, "lower"), os.path.join(tmp, "upper")
    os.makedirs(lower)
    archive.apply_layer(lower, LOWER)
    shutil.copytree(lower, upper, symlinks=True)
    with open(f"{upper}/keep", "w") as f:
        f.write("changed")
    os.unlink(f"{upper}/gone")
    desc = await differ.compare(bind(lower, ro=True), bind(upper), labels={"test": "yes"})
    assert desc.media_type == archive.MEDIA_TYPE_LAYER_GZIP
    info = content.info(desc.digest)
    assert info.size == desc.size
    blob = await content.read(desc.digest)
    raw = gzip.decompress(blob)
    assert info.labels == {"test": "yes", archive.UNCOMPRESSED_LABEL: sha(raw)}
    names = tarfile.open(fileobj=io.BytesIO(raw)).getnames()
    assert names == [".wh.gone", "keep"]
    # applying the diff onto the lower gives the upper
    applied = await differ.apply(desc, bind(lower))
    assert applied.digest == sha(raw)
    assert sorted(os.listdir(lower)) == sorted(os.listdir(upper))
    # the same diff again under a given ref: already exists, same descriptor
    again = await differ.compare(bind(lower, ro=True), bind(upper), ref="my-ref")
    assert again.digest != desc.digest or again == desc
    # uncompressed media type: no uncompressed label
    plain = await differ.compare(bind(lower), bind(upper), media_type=archive.MEDIA_TYPE_LAYER)
    assert plain.media_type == archive.MEDIA_TYPE_LAYER
    assert archive.UNCOMPRESSED_LABEL not in content.info(plain.digest).labels
    assert await content.list_statuses() == []  # no ingest left behind


async def test_compare_errors_leave_nothing(content, differ, tmp):
    lower, upper = os.path.join(tmp, "lower"), os.path.join(tmp, "upper")
    os.makedirs(lower)
    os.makedirs(upper)
    with pytest.raises(errdefs.Unimplemented, match="unsupported diff media type: application/vnd.oci.image.layer.v1.tar\\+zstd"):
        await differ.compare(bind(lower), bind(upper), media_type=archive.MEDIA_TYPE_LAYER_ZSTD)
    with pytest.raises(errdefs.ContainerdError):
        await differ.compare(bind(lower), bind(os.path.join(tmp, "missing")))
    assert await content.list_statuses() == []


@pytest.mark.root
@pytest.mark.skipif(not ROOT, reason="needs root")
async def test_apply_and_compare_with_overlay_mounts(content, differ, tmp):
    """Layer 1 into a bind snapshot, layer 2 into an overlay upperdir (overlay form), the
    merged view checked, then Compare of the overlay against its lower gives layer 2 back."""
    l1, u2, w2, merged = (os.path.join(tmp, n) for n in ("l1", "u2", "w2", "merged"))
    for d in (l1, u2, w2, merged):
        os.makedirs(d)
    blob1 = gzip.compress(LOWER)
    d1 = await put(content, blob1)
    await differ.apply(Descriptor(archive.MEDIA_TYPE_LAYER_GZIP, d1, len(blob1)), bind(l1))
    layer2 = make_tar(member(".wh.gone"), member("opq/.wh..wh..opq"), member("opq/n", data=b"n"),
                      member("keep", data=b"kept"))
    blob2 = gzip.compress(layer2)
    d2 = await put(content, blob2)
    overlay = [Mount("overlay", "overlay", options=[f"workdir={w2}", f"upperdir={u2}", f"lowerdir={l1}"])]
    applied = await differ.apply(Descriptor(archive.MEDIA_TYPE_LAYER_GZIP, d2, len(blob2)), overlay)
    assert applied.digest == sha(layer2)
    assert stat.S_ISCHR(os.lstat(f"{u2}/gone").st_mode)
    assert os.getxattr(f"{u2}/opq", "trusted.overlay.opaque") == b"y"
    mountmod.mount_all(readonly_mounts(overlay), merged)
    try:
        assert sorted(os.listdir(merged)) == ["dir", "keep", "link", "opq", "opq2"]
        assert os.listdir(f"{merged}/opq") == ["n"]
    finally:
        mountmod.unmount(merged)
    desc = await differ.compare(bind(l1, ro=True), overlay)
    raw = gzip.decompress(await content.read(desc.digest))
    names = tarfile.open(fileobj=io.BytesIO(raw)).getnames()
    # the opaque directory comes back as whiteouts of what the lower had in it
    assert sorted(names) == [".wh.gone", "keep", "opq", "opq/.wh.lower1", "opq/.wh.sub", "opq/n"]
    assert mountmod.mounts_under(tmp) == []


def test_readonly_mounts():
    ov = [Mount("overlay", "overlay", options=["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l2:/l1"])]
    assert readonly_mounts(ov) == [Mount("overlay", "overlay", options=["index=off", "lowerdir=/u:/l2:/l1"])]
    assert readonly_mounts(bind("/s")) == [Mount("bind", "/s", options=["rbind", "ro"])]


class _NotMine:
    def __init__(self):
        self.calls = 0

    async def apply(self, *a):
        self.calls += 1
        raise errdefs.Unimplemented("not mine")

    async def compare(self, *a):
        self.calls += 1
        raise errdefs.Unimplemented("not mine")


async def test_service_tries_differs_in_order(content, differ, tmp):
    first = _NotMine()
    svc = DiffService([first, differ])
    blob = gzip.compress(make_tar(member("f", data=b"1")))
    dgst = await put(content, blob)
    target = os.path.join(tmp, "t")
    os.makedirs(target)
    got = await svc.apply(Descriptor(archive.MEDIA_TYPE_LAYER_GZIP, dgst, len(blob)),
                          [{"type": "bind", "source": target, "options": ["rbind", "rw"]}])
    assert got.digest.startswith("sha256:") and first.calls == 1
    with pytest.raises(errdefs.Unimplemented):
        await DiffService([first]).compare([], [])
    # the gRPC adapter
    from pycontainerd.api.gen.containerd import types
    from pycontainerd.api.gen.containerd.services.diff import v1 as api
    resp = await DiffGRPC(svc).apply(api.ApplyRequest(
        diff=types.Descriptor(media_type=archive.MEDIA_TYPE_LAYER_GZIP, digest=dgst, size=len(blob)),
        mounts=[types.Mount(type="bind", source=target, options=["rbind", "rw"])]))
    assert resp.applied.media_type == archive.MEDIA_TYPE_LAYER and resp.applied.digest == got.digest


async def test_compare_against_no_mounts_is_against_an_empty_tree(content, differ, tmp):
    upper = os.path.join(tmp, "upper")
    os.makedirs(f"{upper}/d")
    with open(f"{upper}/d/f", "w") as f:
        f.write("x")
    desc = await differ.compare([], bind(upper))
    raw = gzip.decompress(await content.read(desc.digest))
    assert tarfile.open(fileobj=io.BytesIO(raw)).getnames() == ["d", "d/f"]
    assert os.listdir(os.path.join(tmp, "mnt")) == []  # the empty temp dir is gone
