"""core/events: the exchange, envelopes, topic rules, type URLs and slow-subscriber handling."""
import asyncio
import gc
import threading
import time
import tracemalloc
from dataclasses import dataclass
from datetime import datetime, timezone

import betterproto
import pytest
from betterproto.lib.google.protobuf import Any as ProtoAny
from betterproto.lib.google.protobuf import Empty
from structlog.testing import capture_logs

from pycontainerd.core import context, errdefs, events
from pycontainerd.core.events import Envelope, Exchange, SubscriberOverflow, validate_topic


@dataclass(eq=False, repr=False)
class Ping(betterproto.Message):
    container_id: str = betterproto.string_field(1)
    seq: int = betterproto.uint32_field(2)
    note: str = betterproto.string_field(3)


events.register_type(Ping, "pycontainerd.test.Ping")


@dataclass(eq=False, repr=False)
class Unregistered(betterproto.Message):
    x: str = betterproto.string_field(1)


def seqs(envelopes):
    return [env.decode().seq for env in envelopes]


# ------------------------------------------------------------------ topics


@pytest.mark.parametrize("topic", ["/tasks/exit", "/a", "/containers/create", "/snapshot.prepare/x-y_z",
                                   "/" + "a" * 76, "/a" * 20 + "/b"])
def test_valid_topics(topic):
    assert validate_topic(topic) == topic


@pytest.mark.parametrize("topic,message", [
    ("", "must not be empty"),
    ("tasks/exit", "must start with '/'"),
    ("/", "must have at least one component"),
    ("/tasks/", 'failed validation on component "": identifier must not be empty'),
    ("//tasks", 'failed validation on component "": identifier must not be empty'),
    ("/a..b", 'failed validation on component "a..b": identifier "a..b" must match '
              "^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$"),
    ("/tasks/ex it", 'failed validation on component "ex it": identifier "ex it" must match '
                     "^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$"),
    ("/" + "a" * 77, f'failed validation on component "{"a" * 77}": identifier "{"a" * 77}" '
                     "greater than maximum length (76 characters)"),
    ("/tâsks", 'failed validation on component "tâsks": identifier "tâsks" must match '
               "^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$"),
])
def test_invalid_topics(topic, message):
    with pytest.raises(errdefs.InvalidArgument) as info:
        validate_topic(topic)
    assert str(info.value) == f"{message}: invalid argument"


# ------------------------------------------------------------------ type URLs


def test_type_url_of_registered_class():
    assert events.type_url(Ping) == "pycontainerd.test.Ping"
    assert events.type_url(Ping(seq=1)) == "pycontainerd.test.Ping"
    assert events.resolve("pycontainerd.test.Ping") is Ping
    assert events.resolve("types.example.com/pycontainerd.test.Ping") is Ping


def test_type_url_of_well_known_types():
    assert events.type_url(Empty) == "google.protobuf.Empty"
    assert events.resolve("google.protobuf.Empty") is Empty


def test_unknown_class_has_no_type_url():
    with pytest.raises(errdefs.NotFound):
        events.type_url(Unregistered)
    assert events.resolve("no.such.Type") is None


def test_register_conflict():
    with pytest.raises(ValueError):
        events.register_type(Ping, "other.Name")


def test_generated_event_type_urls_keep_protobuf_names():
    gen = pytest.importorskip("pycontainerd.api.gen.containerd.events")
    pytest.importorskip("pycontainerd.api.gen.registry")
    # betterproto renames TaskOOM to TaskOom; the wire name must stay containerd's.
    assert events.type_url(gen.TaskOom) == "containerd.events.TaskOOM"
    assert events.type_url(gen.TaskExit) == "containerd.events.TaskExit"
    assert events.resolve("containerd.events.TaskOOM") is gen.TaskOom


def test_pack_and_decode():
    any_ = events.pack(Ping(container_id="c", seq=3))
    assert any_.type_url == "pycontainerd.test.Ping"
    assert events.decode(any_).seq == 3
    assert events.pack(any_) is any_
    assert events.decode(ProtoAny(type_url="no.such.Type", value=b"\x01")) is None
    assert events.decode(ProtoAny(type_url="pycontainerd.test.Ping", value=b"\x08")) is None
    assert events.decode(None) is None
    with pytest.raises(errdefs.InvalidArgument):
        events.pack("not a message")  # type: ignore[arg-type]


# ------------------------------------------------------------------ publish / forward validation


def test_publish_returns_stamped_envelope():
    ex = Exchange()
    before = datetime.now(timezone.utc)
    env = ex.publish("default", "/tasks/exit", Ping(seq=1))
    assert env.namespace == "default" and env.topic == "/tasks/exit"
    assert env.timestamp.tzinfo is not None and before <= env.timestamp <= datetime.now(timezone.utc)
    assert env.event.type_url == "pycontainerd.test.Ping"
    assert env.decode().seq == 1


def test_published_message_is_the_decoded_payload():
    msg = Ping(seq=2)
    env = Exchange().publish("default", "/t", msg)
    assert env.decode() is msg
    assert Ping().parse(env.event.value).seq == 2


@pytest.mark.parametrize("namespace,cls,message", [
    ("", errdefs.FailedPrecondition, "failed publishing event: namespace is required: failed precondition"),
    ("a..b", errdefs.InvalidArgument,
     'failed publishing event: namespace validation: identifier "a..b" must match '
     "^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$: invalid argument"),
    ("-x", errdefs.InvalidArgument, None),
    ("n" * 77, errdefs.InvalidArgument, None),
])
def test_publish_bad_namespace(namespace, cls, message):
    with pytest.raises(cls) as info:
        Exchange().publish(namespace, "/t", Ping())
    if message:
        assert str(info.value) == message


def test_publish_bad_topic():
    with pytest.raises(errdefs.InvalidArgument) as info:
        Exchange().publish("default", "tasks/exit", Ping())
    assert str(info.value) == "envelope topic \"tasks/exit\": must start with '/': invalid argument"


def test_publish_namespace_from_request_context():
    ex = Exchange()
    with pytest.raises(errdefs.FailedPrecondition):
        ex.publish(None, "/t", Ping())
    tokens = context.bind_request({"containerd-namespace": "k8s.io"})
    try:
        assert ex.publish(None, "/t", Ping()).namespace == "k8s.io"
    finally:
        context.unbind_request(tokens)


def test_publish_unknown_message_type_is_publishers_error():
    with pytest.raises(errdefs.NotFound):
        Exchange().publish("default", "/t", Unregistered())


def test_publish_any_verbatim():
    ex = Exchange()
    any_ = ProtoAny(type_url="some.Type", value=b"raw")
    assert ex.publish_any("default", "/t", any_).event is any_
    with pytest.raises(errdefs.InvalidArgument):
        ex.publish_any("default", "/t", Ping())  # type: ignore[arg-type]


def envelope(**kw):
    base = dict(timestamp=datetime(2024, 1, 2, tzinfo=timezone.utc), namespace="default",
                topic="/tasks/exit", event=events.pack(Ping(seq=9)))
    base.update(kw)
    return Envelope(**base)


@pytest.mark.parametrize("bad,message", [
    (dict(namespace=""), "event envelope has invalid namespace: identifier must not be empty"),
    (dict(namespace="a/b"), 'event envelope has invalid namespace: identifier "a/b" must match'),
    (dict(topic="/"), 'envelope topic "/": must have at least one component'),
    (dict(timestamp=None), "timestamp must be set on forwarded event"),
    (dict(timestamp=datetime(1970, 1, 1, tzinfo=timezone.utc)), "timestamp must be set on forwarded event"),
    (dict(timestamp=datetime(1, 1, 1)), "timestamp must be set on forwarded event"),
])
def test_forward_validation(bad, message):
    with pytest.raises(errdefs.InvalidArgument) as info:
        Exchange().forward(envelope(**bad))
    assert str(info.value).startswith(message)


async def test_forward_delivers_as_is():
    ex = Exchange()
    sub = ex.subscribe()
    env = envelope()
    ex.forward(env)
    got = await sub.get(timeout=1)
    assert got is env
    ex.forward(envelope(timestamp=datetime(2024, 1, 2)))  # naive: taken as UTC
    assert (await sub.get(timeout=1)).timestamp == datetime(2024, 1, 2, tzinfo=timezone.utc)


# ------------------------------------------------------------------ subscriptions and filters


async def test_subscribe_bad_filter():
    with pytest.raises(errdefs.InvalidArgument) as info:
        Exchange().subscribe("topic==/tasks/exit")
    assert str(info.value) == ("failed parsing subscription filters: filters: parse error: "
                               "[topic== >|/|< tasks/exit]: invalid quote encountered: invalid argument")
    with pytest.raises(errdefs.InvalidArgument, match="invalid regular expression"):
        Exchange().subscribe('topic~="("')


async def test_filter_by_topic_regex_and_namespace():
    ex = Exchange()
    tasks = ex.subscribe('topic~="^/tasks/"')
    either = ex.subscribe('topic~="^/tasks/"', "namespace==k8s.io")          # OR
    both = ex.subscribe('topic~="^/tasks/",namespace==k8s.io')               # AND
    exits = ex.subscribe('topic=="/tasks/exit"')
    not_default = ex.subscribe("namespace!=default")
    everything = ex.subscribe()
    sent = [
        ex.publish("default", "/tasks/exit", Ping(seq=0)),
        ex.publish("k8s.io", "/tasks/start", Ping(seq=1)),
        ex.publish("k8s.io", "/images/create", Ping(seq=2)),
        ex.publish("default", "/containers/create", Ping(seq=3)),
        ex.publish("moby", "/tasks/oom", Ping(seq=4)),
    ]

    def drain(sub):
        out = []
        while sub.pending:
            out.append(sub._sub.queue.popleft())
        return seqs(out)

    assert drain(tasks) == [0, 1, 4]
    assert drain(either) == [0, 1, 2, 4]
    assert drain(both) == [1]
    assert drain(exits) == [0]
    assert drain(not_default) == [1, 2, 4]
    assert drain(everything) == [0, 1, 2, 3, 4]
    assert [e.topic for e in sent] == ["/tasks/exit", "/tasks/start", "/images/create",
                                        "/containers/create", "/tasks/oom"]


async def test_filter_on_event_fields():
    ex = Exchange()
    c1 = ex.subscribe("event.container_id==c1")
    noted = ex.subscribe("event.note")
    unhandled = ex.subscribe("event.seq==5")  # numbers are not filterable, as in containerd
    ex.publish("default", "/t", Ping(container_id="c1", seq=5))
    ex.publish("default", "/t", Ping(container_id="c2", note="n"))
    ex.publish_any("default", "/t", ProtoAny(type_url="no.such.Type", value=b""))
    assert c1.pending == 1 and (await c1.get(timeout=1)).decode().container_id == "c1"
    assert noted.pending == 1
    assert unhandled.pending == 0


async def test_filter_on_generated_event_fields():
    gen = pytest.importorskip("pycontainerd.api.gen.containerd.events")
    pytest.importorskip("pycontainerd.api.gen.registry")
    ex = Exchange()
    runc = ex.subscribe('event.runtime.name=="io.containerd.runc.v2"')
    labelled = ex.subscribe('event.labels."a.b"==c')
    ex.publish("default", "/containers/create", gen.ContainerCreate(
        id="c1", image="img", runtime=gen.ContainerCreateRuntime(name="io.containerd.runc.v2")))
    ex.publish("default", "/containers/update", gen.ContainerUpdate(id="c1", labels={"a.b": "c"}))
    ex.publish("default", "/tasks/oom", gen.TaskOom(container_id="c1"))
    assert runc.pending == 1 and labelled.pending == 1
    got = await runc.get(timeout=1)
    assert got.event.type_url == "containerd.events.ContainerCreate"
    assert got.field(["event", "image"]) == ("img", True)


def test_envelope_field_adaptor():
    env = envelope()
    assert env.field(["namespace"]) == ("default", True)
    assert env.field(["topic"]) == ("/tasks/exit", True)
    assert env.field(["timestamp"]) == ("", False)
    assert env.field([]) == ("", False)
    assert env.field(["event", "container_id"]) == ("", False)
    assert env.field(["event", "nope"]) == ("", False)
    assert env.decode() is env.decode()  # decoded once


async def test_fast_subscriber_gets_all_1000_in_order_while_stalled_one_is_dropped():
    ex = Exchange(queue_size=64)
    fast = ex.subscribe()
    stalled = ex.subscribe()
    received = []

    async def consume():
        async for env in fast:
            received.append(env.decode().seq)
            if len(received) == 1000:
                return

    consumer = asyncio.create_task(consume())
    with capture_logs() as logs:
        longest = 0.0
        for seq in range(1000):
            start = time.perf_counter()
            ex.publish("default", "/tasks/exit", Ping(seq=seq))  # synchronous: cannot block
            longest = max(longest, time.perf_counter() - start)
            if seq % 16 == 15:
                await asyncio.sleep(0)  # let the fast subscriber run, as a real loop would
    await asyncio.wait_for(consumer, 5)

    assert received == list(range(1000))
    assert longest < 1.0  # never waits for a subscriber (a blocked publish would hang here)
    # the stalled subscriber held at most its queue, then was dropped, logged once
    assert stalled.overflowed and stalled.pending == 64
    assert ex.subscribers == 1
    drops = [entry for entry in logs if entry["event"] == "dropped slow event subscriber"]
    assert len(drops) == 1 and drops[0]["log_level"] == "warning"
    # it reads a gap-free prefix, then the error, then the end
    got = [(await stalled.get(timeout=1)).decode().seq for _ in range(64)]
    assert got == list(range(64))
    with pytest.raises(SubscriberOverflow) as info:
        await stalled.get(timeout=1)
    assert isinstance(info.value, errdefs.Unavailable)
    assert "fell 64 events behind" in str(info.value)
    with pytest.raises(StopAsyncIteration):
        await stalled.get(timeout=1)


async def test_memory_bounded_with_stalled_subscriber():
    ex = Exchange(queue_size=32)
    stalled = ex.subscribe()
    payload = "x" * 10240
    ex.publish("default", "/t", Ping(note=payload))  # warm up caches and lazy imports
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        for seq in range(1500):  # ~15 MB if anything kept them
            ex.publish("default", "/t", Ping(seq=seq, note=payload))
            assert stalled.pending <= 32
        gc.collect()
        now, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert now - base < 1_000_000
    assert stalled.overflowed and ex.subscribers == 0


async def test_subscriber_sees_only_events_after_subscribe_and_waits():
    ex = Exchange()
    ex.publish("default", "/t", Ping(seq=0))
    sub = ex.subscribe()
    waiter = asyncio.create_task(sub.get(timeout=2))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    ex.publish("default", "/t", Ping(seq=1))
    assert (await waiter).decode().seq == 1


async def test_get_timeout_keeps_subscription():
    ex = Exchange()
    sub = ex.subscribe()
    with pytest.raises(asyncio.TimeoutError):
        await sub.get(timeout=0.01)
    assert ex.subscribers == 1 and not sub.closed
    ex.publish("default", "/t", Ping(seq=7))
    assert (await sub.get(timeout=1)).decode().seq == 7


async def test_publish_from_worker_threads():
    ex = Exchange()
    sub = ex.subscribe()
    n_threads, per_thread = 4, 250

    def work(tid):
        for i in range(per_thread):
            ex.publish("default", "/t", Ping(container_id=str(tid), seq=i))

    async def read_all():
        return [await sub.get(timeout=5) for _ in range(n_threads * per_thread)]

    reader = asyncio.create_task(read_all())
    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        await asyncio.to_thread(t.join)
    got = await reader
    by_thread = {}
    for env in got:
        msg = env.decode()
        by_thread.setdefault(msg.container_id, []).append(msg.seq)
    assert all(v == list(range(per_thread)) for v in by_thread.values()) and len(by_thread) == n_threads


async def test_close_and_context_manager_and_drop_unregister():
    ex = Exchange()
    async with ex.subscribe() as sub:
        assert ex.subscribers == 1
    assert ex.subscribers == 0 and sub.closed
    with pytest.raises(StopAsyncIteration):
        await sub.get(timeout=1)

    sub = ex.subscribe()
    sub.close()
    sub.close()
    assert ex.subscribers == 0

    ex.subscribe()  # dropped at once
    gc.collect()
    assert ex.subscribers == 0


async def test_closing_wakes_a_waiting_reader():
    ex = Exchange()
    sub = ex.subscribe()

    async def read():
        return [env async for env in sub]

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.01)
    ex.publish("default", "/t", Ping(seq=1))
    await asyncio.sleep(0.01)
    sub.close()
    assert seqs(await asyncio.wait_for(reader, 1)) == [1]


async def test_exchange_close_ends_subscriptions_after_draining():
    ex = Exchange()
    sub = ex.subscribe()
    ex.publish("default", "/t", Ping(seq=1))
    ex.close()
    assert seqs([env async for env in sub]) == [1]
    late = ex.subscribe()
    assert [env async for env in late] == []
    ex.publish("default", "/t", Ping(seq=2))  # still fine, reaches nobody


async def test_cancelled_anext_closes_subscription():
    ex = Exchange()
    sub = ex.subscribe()
    task = asyncio.create_task(sub.__anext__())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sub.closed and ex.subscribers == 0


async def test_cancelled_get_leaves_subscription_usable():
    ex = Exchange()
    sub = ex.subscribe()
    task = asyncio.create_task(sub.get())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    ex.publish("default", "/t", Ping(seq=3))
    assert (await sub.get(timeout=1)).decode().seq == 3


async def test_grpc_style_generator_unregisters_when_cancelled():
    ex = Exchange()

    async def handler():  # what the events service's Subscribe does
        async for env in ex.subscribe():
            yield env

    async def stream():
        async for _ in handler():
            pass

    task = asyncio.create_task(stream())
    await asyncio.sleep(0.01)
    assert ex.subscribers == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gc.collect()
    assert ex.subscribers == 0


def test_failing_filter_never_reaches_publisher(monkeypatch):
    ex = Exchange()
    sub = ex.subscribe("event.container_id==x")
    ok = ex.subscribe()

    def broken(*a, **kw):
        raise RuntimeError("adaptor bug")

    monkeypatch.setattr(events.filters, "adapt_message", broken)
    with capture_logs() as logs:
        ex.publish("default", "/t", Ping(container_id="x"))
    assert sub.pending == 0 and ok.pending == 1
    assert any(entry["event"] == "event filter failed" for entry in logs)


def test_queue_size_validation():
    with pytest.raises(ValueError):
        Exchange(queue_size=0)
    with pytest.raises(ValueError):
        Exchange().subscribe(queue_size=0)
    assert Exchange().queue_size == events.DEFAULT_QUEUE_SIZE == 1024
