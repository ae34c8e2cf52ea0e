"""Every generated message survives protobuf -> betterproto -> protobuf without losing a field.

The reference encoder is the `protobuf` runtime (a grpcio-tools dependency) loaded with the
descriptors of our own .proto files; each message is filled with a value in every field.
"""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

descriptor_pool = pytest.importorskip("google.protobuf.descriptor_pool")
from google.protobuf import descriptor_pb2, message_factory  # noqa: E402
from google.protobuf.descriptor import FieldDescriptor as FD  # noqa: E402

from pycontainerd.api.gen.registry import MESSAGES, message_class  # noqa: E402


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from pycontainerd.api.generate import descriptor_set

    out = tmp_path_factory.mktemp("desc") / "ours.pb"
    descriptor_set(out)
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out.read_bytes())
    p = descriptor_pool.DescriptorPool()
    for f in fds.file:
        p.Add(f)
    return p


SCALARS = {
    FD.TYPE_STRING: "s\u00e9", FD.TYPE_BYTES: b"\x00\xff", FD.TYPE_BOOL: True,
    FD.TYPE_INT64: -(2**40), FD.TYPE_UINT64: 2**40, FD.TYPE_INT32: -7, FD.TYPE_UINT32: 7,
    FD.TYPE_SINT32: -9, FD.TYPE_SINT64: -9, FD.TYPE_FIXED32: 11, FD.TYPE_FIXED64: 11,
    FD.TYPE_SFIXED32: -11, FD.TYPE_SFIXED64: -11, FD.TYPE_DOUBLE: 1.5, FD.TYPE_FLOAT: 2.5,
}


def fill(msg, depth: int = 0) -> None:
    """Set every field of a protobuf message to a non-default value."""
    name = msg.DESCRIPTOR.full_name
    if name == "google.protobuf.Timestamp":
        # betterproto holds a datetime: whole microseconds survive, nanoseconds below that do not.
        msg.seconds, msg.nanos = 1_700_000_000, 123_456_000
        return
    if name == "google.protobuf.Any":
        msg.type_url, msg.value = "types.containerd.io/example", b"\x08\x01"
        return
    if depth > 3:
        return
    for field in msg.DESCRIPTOR.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_f, value_f = field.message_type.fields
            key = SCALARS[key_f.type]
            if value_f.message_type is not None:
                fill(getattr(msg, field.name)[key], depth + 1)
            else:
                getattr(msg, field.name)[key] = _value(value_f)
        elif _repeated(field):
            container = getattr(msg, field.name)
            for _ in range(2):
                if field.message_type is not None:
                    fill(container.add(), depth + 1)
                else:
                    container.append(_value(field))
        elif field.message_type is not None:
            fill(getattr(msg, field.name), depth + 1)
            getattr(msg, field.name).SetInParent()
        else:
            setattr(msg, field.name, _value(field))


def _repeated(field) -> bool:
    # protobuf 7 dropped FieldDescriptor.label in favour of is_repeated.
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == FD.LABEL_REPEATED


def _value(field):
    if field.type == FD.TYPE_ENUM:
        return field.enum_type.values[-1].number
    return SCALARS[field.type]


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_roundtrip(pool, name):
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
    original = cls()
    fill(original)
    wire = original.SerializeToString()

    ours = message_class(name)().parse(wire)
    assert not ours._unknown_fields, f"{name}: betterproto did not know some fields"
    back = cls.FromString(bytes(ours))
    assert back == original, f"{name}: lost in betterproto\nsent {original}\ngot  {back}"


def test_descriptor_by_hand(pool):
    from pycontainerd.api.gen.containerd.types import Descriptor

    d = Descriptor(media_type="application/vnd.oci.image.manifest.v1+json", digest="sha256:" + "a" * 64,
                   size=1234, annotations={"org.opencontainers.image.ref.name": "latest"})
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("containerd.types.Descriptor"))
    decoded = cls.FromString(bytes(d))
    assert (decoded.media_type, decoded.digest, decoded.size) == (d.media_type, d.digest, 1234)
    assert dict(decoded.annotations) == d.annotations


def test_envelope_with_any_and_timestamp(pool):
    from pycontainerd.api.gen.containerd.events import TaskExit
    from pycontainerd.api.gen.containerd.services.events.v1 import Envelope
    import betterproto.lib.google.protobuf as wkt

    when = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)
    exit_ = TaskExit(container_id="c1", id="c1", pid=42, exit_status=137, exited_at=when)
    env = Envelope(timestamp=when, namespace="default", topic="/tasks/exit",
                   event=wkt.Any(type_url="containerd.events.TaskExit", value=bytes(exit_)))
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("containerd.services.events.v1.Envelope"))
    decoded = cls.FromString(bytes(env))
    assert decoded.timestamp.ToDatetime(tzinfo=timezone.utc) == when
    assert decoded.event.type_url == "containerd.events.TaskExit"
    assert Envelope().parse(decoded.SerializeToString()) == env
    assert TaskExit().parse(decoded.event.value) == exit_
