"""The metadata image store (plugins/metadata/images.py) on a real sqlite MetadataDB: containerd's
validation and messages, filters, field-path updates, namespaces, dirty marks for the GC, and
the images service's events."""
from __future__ import annotations

import asyncio

import pytest

from pycontainerd.api.gen.containerd.services.images import v1 as api
from pycontainerd.core import errdefs
from pycontainerd.core.context import bind_request, unbind_request
from pycontainerd.core.events import Exchange
from pycontainerd.plugins.images import ImagesService, image_from_pb, image_to_pb
from pycontainerd.plugins.metadata.db import MetadataDB
from pycontainerd.plugins.metadata.images import Descriptor, Image, ImageStore, digest_error
from pycontainerd.plugins.metadata.namespaces import NamespaceStore

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
MT = "application/vnd.oci.image.manifest.v1+json"


def target(digest=D1, size=10, mt=MT, annotations=None):
    return Descriptor(mt, digest, size, dict(annotations or {}))


@pytest.fixture
def db(tmp_path):
    d = MetadataDB(tmp_path / "meta.db")
    yield d
    d.close()


@pytest.fixture
def store(db):
    return ImageStore(db)


def test_create_get_list(store):
    created = store.create("ns", Image("b", target(annotations={"a": "1"}), {"k": "v"}))
    assert created.name == "b" and created.target == target(annotations={"a": "1"}) and created.labels == {"k": "v"}
    assert created.created_at is not None and created.created_at == created.updated_at
    store.create("ns", Image("a", target(D2)))
    assert [i.name for i in store.list("ns")] == ["a", "b"]
    assert store.get("ns", "b") == created
    assert store.list("other") == []


def test_create_drops_empty_labels_and_annotations(store):
    img = store.create("ns", Image("x", target(annotations={"keep": "1", "drop": ""}), {"a": "", "b": "c"}))
    assert img.labels == {"b": "c"} and img.target.annotations == {"keep": "1"}


def test_namespaces_are_separate_and_created_on_first_write(db, store):
    store.create("one", Image("x", target()))
    store.create("two", Image("x", target(D2)))
    assert store.get("one", "x").target.digest == D1
    assert store.get("two", "x").target.digest == D2
    assert {n.name for n in NamespaceStore(db).list()} == {"one", "two"}


def test_namespace_with_an_image_cannot_be_deleted(db, store):
    store.create("ns", Image("x", target()))
    with pytest.raises(errdefs.FailedPrecondition, match='namespace "ns" must be empty, but it still has images'):
        NamespaceStore(db).delete("ns")
    store.delete("ns", "x")
    NamespaceStore(db).delete("ns")


def test_already_exists_and_not_found_messages(store):
    store.create("ns", Image("x", target()))
    with pytest.raises(errdefs.AlreadyExists) as e:
        store.create("ns", Image("x", target(D2)))
    assert str(e.value) == 'image "x": already exists'
    with pytest.raises(errdefs.NotFound) as e:
        store.get("ns", "nope")
    assert str(e.value) == 'image "nope": not found'
    with pytest.raises(errdefs.NotFound) as e:
        store.delete("ns", "nope")
    assert str(e.value) == 'image "nope": not found'
    with pytest.raises(errdefs.NotFound):
        store.update("ns", Image("nope", target()), ["labels"])


@pytest.mark.parametrize("image, message", [
    (Image("", target()), "image name must not be empty"),
    (Image("x", target(digest="")), 'Target.Digest "" invalid: invalid checksum digest format'),
    (Image("x", target(digest="sha256:abc")), 'Target.Digest "sha256:abc" invalid: invalid checksum digest length'),
    (Image("x", target(digest="foo")), 'Target.Digest "foo" invalid: invalid checksum digest format'),
    (Image("x", target(digest="md5:abc")), 'Target.Digest "md5:abc" invalid: unsupported digest algorithm'),
    (Image("x", target(digest="sha256:" + "A" * 64)), "invalid checksum digest format"),
    (Image("x", target(digest="SHA256:" + "a" * 64)), "invalid checksum digest format"),
    (Image("x", target(digest="sha256:" + "a" * 64 + "\n")), "invalid checksum digest"),
    (Image("x", target(size=0)), "Target.Size must be greater than zero"),
    (Image("x", target(size=-1)), "Target.Size must be greater than zero"),
    (Image("x", target(mt="")), "Target.MediaType must be set"),
    (Image("x", target(), {"k": "v" * 5000}),
     "image.Labels: label key and value greater than maximum size (4096 bytes), key: k"),
])
def test_create_rejects_bad_images_with_containerds_messages(store, image, message):
    with pytest.raises(errdefs.InvalidArgument) as e:
        store.create("ns", image)
    assert message in str(e.value)
    assert str(e.value).endswith(": invalid argument")
    assert store.list("ns") == []


def test_digest_error_matches_go_digest():
    assert digest_error(D1) is None
    assert digest_error("sha512:" + "a" * 128) is None
    assert digest_error(":abc") == "invalid checksum digest format"
    assert digest_error("sha256:") == "invalid checksum digest format"
    assert digest_error("sha256:" + "g" * 64) == "invalid checksum digest format"
    assert digest_error("sha384:" + "a" * 64) == "invalid checksum digest length"
    assert digest_error("blake3:" + "a" * 64) == "unsupported digest algorithm"


@pytest.mark.parametrize("name", ["with space", "tab\there", "n" * 4096, "docker.io/library/busybox:latest",
                                  "é/ü:ß", "../../etc/passwd", "a\u0000b", "'; DROP TABLE images; --"])
def test_any_non_empty_name_round_trips(store, name):
    store.create("ns", Image(name, target()))
    assert store.get("ns", name).name == name
    assert [i.name for i in store.list("ns", [f"name=={_quote(name)}"])] == [name]
    store.delete("ns", name)
    assert store.list("ns") == []


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\t", "\\t").replace("\x00", "\\x00") + '"'


def test_list_filters(store):
    store.create("ns", Image("a", target(D1, annotations={"org.opencontainers.image.ref.name": "1"}), {"env": "prod"}))
    store.create("ns", Image("b", target(D2, mt="application/vnd.docker.distribution.manifest.v2+json"),
                             {"env": "dev", "a.b": "c"}))
    names = lambda *f: [i.name for i in store.list("ns", f)]  # noqa: E731
    assert names("name==a") == ["a"]
    assert names(f"target.digest=={D2}") == ["b"]
    assert names("target.mediatype~=docker") == ["b"]
    assert names("labels.env==prod") == ["a"]
    assert names("labels.env") == ["a", "b"]
    assert names("labels.a.b==c") == ["b"]
    assert names('labels."a.b"==c') == ["b"]
    assert names('annotations."org.opencontainers.image.ref.name"==1') == ["a"]
    assert names("labels.env==prod", "name==b") == ["a", "b"]  # OR between filters
    assert names("labels.env!=prod") == ["b"]
    assert names("name~=^[ab]$,labels.env==dev") == ["b"]
    assert names("size==10") == []  # not a field
    assert names("") == ["a", "b"]


@pytest.mark.parametrize("bad", ["labels.", "name==a,", "name==/x", "name~=(", "labels.\"x", ","])
def test_bad_filters_are_invalid_argument(store, bad):
    store.create("ns", Image("a", target()))
    with pytest.raises(errdefs.InvalidArgument) as e:
        store.list("ns", [bad])
    assert "filters: parse error" in str(e.value) or "invalid" in str(e.value)


def test_update_field_paths(store):
    store.create("ns", Image("x", target(annotations={"a": "1"}), {"keep": "1", "drop": "2"}))
    up = store.update("ns", Image("x", labels={"new": "3"}), ["labels.new", "labels.drop"])
    assert up.labels == {"keep": "1", "new": "3"}
    assert up.target == target(annotations={"a": "1"})
    up = store.update("ns", Image("x", target(annotations={"b": "2"})), ["annotations.b"])
    assert up.target.annotations == {"a": "1", "b": "2"}
    up = store.update("ns", Image("x", target(annotations={"c": "3"})), ["annotations"])
    assert up.target.annotations == {"c": "3"}
    up = store.update("ns", Image("x", target(D2, 20, "m2"), {"z": "9"}), ["target"])
    assert up.target == target(D2, 20, "m2") and up.labels == {"keep": "1", "new": "3"}
    up = store.update("ns", Image("x", labels={"only": "this"}), ["labels"])
    assert up.labels == {"only": "this"}
    assert up.updated_at >= up.created_at


def test_update_without_paths_replaces_labels_and_target(store):
    created = store.create("ns", Image("x", target(annotations={"a": "1"}), {"k": "v"}))
    up = store.update("ns", Image("x", target(D2, 5, "m"), {"n": "1"}))
    assert up.labels == {"n": "1"} and up.target == target(D2, 5, "m")
    assert up.created_at == created.created_at
    with pytest.raises(errdefs.InvalidArgument, match="Target.Digest"):
        store.update("ns", Image("x", labels={"a": "b"}))  # no target given: invalid, nothing written
    assert store.get("ns", "x") == up


@pytest.mark.parametrize("path", ["name", "target.size", "created_at", "labels_x", "", "Labels"])
def test_update_unknown_path_is_invalid_argument(store, path):
    store.create("ns", Image("x", target(), {"k": "v"}))
    with pytest.raises(errdefs.InvalidArgument) as e:
        store.update("ns", Image("x", labels={"k": "w"}), ["labels.k", path])
    assert str(e.value) == f'cannot update "{path}" field on image "x": invalid argument'
    assert store.get("ns", "x").labels == {"k": "v"}  # nothing written


def test_update_validates_the_result(store):
    store.create("ns", Image("x", target()))
    with pytest.raises(errdefs.InvalidArgument, match="Target.Size must be greater than zero"):
        store.update("ns", Image("x", target(size=0)), ["target"])
    with pytest.raises(errdefs.InvalidArgument, match="image.Labels"):
        store.update("ns", Image("x", labels={"k": "v" * 5000}), ["labels.k"])
    with pytest.raises(errdefs.InvalidArgument, match="image name is required for update"):
        store.update("ns", Image("", target()), ["labels"])


def test_delete_marks_the_database_dirty(db, store):
    calls = []
    db.register_mutation_callback(calls.append)
    store.create("ns", Image("x", target()))
    assert calls == [False] and db.dirty.deletions == 0
    store.delete("ns", "x")
    assert calls == [False, True] and db.dirty.deletions == 1
    with pytest.raises(errdefs.NotFound):
        store.delete("ns", "x")  # nothing deleted, nothing committed
    assert calls == [False, True] and db.dirty.deletions == 1


def test_proto_round_trip():
    img = Image("x", target(annotations={"a": "b"}), {"k": "v"})
    back = image_from_pb(api.Image().parse(bytes(image_to_pb(img))))
    assert back.name == "x" and back.target == img.target and back.labels == {"k": "v"}
    assert image_from_pb(api.Image(name="y")).target == Descriptor()


class _FakeGC:
    def __init__(self):
        self.waited = 0

    async def schedule_and_wait(self):
        self.waited += 1


def test_service_publishes_containerds_events(db):
    async def main():
        exchange = Exchange()
        gc = _FakeGC()
        svc = ImagesService(ImageStore(db), exchange, gc)
        sub = exchange.subscribe('topic~="/images/"')
        tokens = bind_request({"containerd-namespace": "evns"})
        try:
            svc.create(Image("x", target(), {"a": "1"}))
            svc.update(Image("x", labels={"b": "2"}), ["labels.b"])
            await svc.delete("x")
            svc.create(Image("y", target()))
            await svc.delete("y", sync=True)
        finally:
            unbind_request(tokens)
        got = [await sub.get(timeout=1) for _ in range(5)]
        sub.close()
        assert [(e.namespace, e.topic) for e in got] == [
            ("evns", "/images/create"), ("evns", "/images/update"), ("evns", "/images/delete"),
            ("evns", "/images/create"), ("evns", "/images/delete")]
        first = got[0].decode()
        assert isinstance(first, api.ImageCreate) and first.name == "x" and first.labels == {"a": "1"}
        assert got[0].event.type_url == "containerd.services.images.v1.ImageCreate"
        assert got[1].decode().labels == {"a": "1", "b": "2"}
        assert got[2].decode() == api.ImageDelete(name="x")
        assert gc.waited == 1

    asyncio.run(main())


def test_service_needs_a_namespace(db):
    svc = ImagesService(ImageStore(db), Exchange(), _FakeGC())
    with pytest.raises(errdefs.FailedPrecondition, match="namespace is required"):
        svc.list()
