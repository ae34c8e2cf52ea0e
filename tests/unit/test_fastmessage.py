"""api/fastmessage.py: the cheaper betterproto accessors behave exactly as the library's own.

Each scenario runs twice, with betterproto's original __getattribute__/__setattr__ and with
ours, and everything observable must match: values, defaults, oneof selection and errors,
_serialized_on_wire, the wire bytes and what parses back."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import betterproto
import pytest
from betterproto.lib.google.protobuf import Struct, Value

from pycontainerd.api import fastmessage
from pycontainerd.api.gen.containerd.services.containers.v1 import Container, GetContainerResponse


@dataclass(eq=False, repr=False)
class Empty(betterproto.Message):
    pass


@dataclass(eq=False, repr=False)
class Sample(betterproto.Message):
    name: str = betterproto.string_field(1)
    count: int = betterproto.int32_field(2, group="choice")
    text: str = betterproto.string_field(3, group="choice")
    empty: Empty = betterproto.message_field(4, group="choice")
    inner: "Sample" = betterproto.message_field(5)
    items: list[str] = betterproto.string_field(6)
    maybe: Optional[int] = betterproto.int32_field(7, optional=True)


def attempt(fn):
    try:
        return ("ok", fn())
    except AttributeError as err:
        return ("AttributeError", str(err), err.name)


def observe() -> list:
    out = []
    s = Sample()
    out += [attempt(lambda: s.name), attempt(lambda: s.count), attempt(lambda: s.text),
            s._serialized_on_wire, bytes(s), betterproto.which_one_of(s, "choice")]
    s.count = 5
    out += [attempt(lambda: s.count), attempt(lambda: s.text), attempt(lambda: s.empty),
            betterproto.which_one_of(s, "choice"), s._serialized_on_wire, bytes(s)]
    s.text = "hello"
    out += [attempt(lambda: s.count), attempt(lambda: s.text), betterproto.which_one_of(s, "choice"), bytes(s)]
    e = Empty()
    out.append(e._serialized_on_wire)
    s.empty = e
    out += [e._serialized_on_wire, betterproto.which_one_of(s, "choice")[0], attempt(lambda: s.text), bytes(s)]
    s.inner = Sample(name="in", items=["a", "b"], maybe=0)
    out += [bytes(s), attempt(lambda: s.inner.maybe), attempt(lambda: s.inner.inner.name),
            attempt(lambda: s.missing)]
    parsed = Sample().parse(bytes(s))
    out += [betterproto.which_one_of(parsed, "choice")[0], parsed.inner.items, parsed.inner.maybe,
            parsed.to_dict(), parsed == s, repr(parsed)]
    t = Sample(count=3, text="both")  # the last one set in __init__ order wins at __post_init__
    out += [betterproto.which_one_of(t, "choice"), attempt(lambda: t.count), bytes(t)]
    v = Value(string_value="x")
    out += [betterproto.which_one_of(v, "kind"), attempt(lambda: v.number_value), bytes(v)]
    st = Struct(fields={"k": Value(bool_value=True)})
    out += [bytes(st), Struct().parse(bytes(st)).to_dict()]
    c = GetContainerResponse(container=Container(id="c1", labels={"a": "b"}))
    out += [bytes(c), GetContainerResponse().parse(bytes(c)).container.labels,
            attempt(lambda: c.container.runtime.name), c.container.runtime._serialized_on_wire]
    return out


@pytest.fixture
def accessors():
    fast = (betterproto.Message.__getattribute__, betterproto.Message.__setattr__)
    assert fast == (fastmessage._getattribute, fastmessage._setattr), "importing pycontainerd.api installs them"

    def use(original: bool) -> None:
        if original:
            betterproto.Message.__getattribute__ = fastmessage.ORIGINAL_GETATTRIBUTE
            betterproto.Message.__setattr__ = fastmessage.ORIGINAL_SETATTR
        else:
            betterproto.Message.__getattribute__, betterproto.Message.__setattr__ = fast
    yield use
    betterproto.Message.__getattribute__, betterproto.Message.__setattr__ = fast


def test_same_behaviour_as_betterproto(accessors):
    accessors(True)
    expected = observe()
    accessors(False)
    assert observe() == expected


def test_oneof_error_names_the_field():
    s = Sample(count=1)
    with pytest.raises(AttributeError) as info:
        s.text
    assert info.value.name == "text"
    assert "'choice' is set to 'count'" in str(info.value)
