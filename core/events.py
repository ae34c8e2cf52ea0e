"""The events exchange: publish, forward and subscribe to namespaced, topic-addressed events.

Owns the Envelope, the Exchange that fans envelopes out to subscribers, topic validation, and
the mapping between betterproto message classes and the type URLs events carry
(`type_url`, `resolve`, `decode`, `register_type`). It must not know any service or transport:
the events plugin turns gRPC/ttrpc requests into calls here, services call `publish`.

containerd semantics kept (events/exchange/exchange.go):
- topics start with "/" and every "/"-separated component is an identifier ("/tasks/exit");
- `publish` stamps the time (UTC) and packs the message into an Any whose type URL is the
  message's full protobuf name, without a "type.googleapis.com/" prefix
  ("containerd.events.TaskExit", "containerd.services.images.v1.ImageCreate"); an Any given to
  publish is sent verbatim;
- `forward` takes an envelope made elsewhere (a shim's event) after checking its namespace,
  topic and timestamp;
- subscription filters use core/filters over the envelope's fields `topic`, `namespace` and
  `event.<field path>` of the decoded payload (containerd's generated Field rules, see
  filters.adapt_message); the timestamp is not filterable. Several filters are OR-ed.

Where we differ, on purpose — the slow subscriber: containerd gives each subscriber an
unbounded queue. Here each subscriber has a *bounded* queue (`queue_size`, default 1024). A
publisher never waits and never sees a subscriber's trouble: when a subscriber's queue is full,
that subscriber is dropped from the exchange (logged once, as a warning) and, after it has read
the events already queued for it, its iterator raises `SubscriberOverflow` (an
errdefs.Unavailable, so a gRPC Subscribe stream ends with UNAVAILABLE). A subscriber therefore
sees a gap-free prefix of the stream or an error, never a silent hole, and the memory one stalled
subscriber can hold is `queue_size` envelopes.

Threads: `publish`/`forward` may be called from any thread (worker threads included); the
subscriber is woken on its own event loop. All subscribers see events in the same order.
"""
from __future__ import annotations

import asyncio
import collections
import importlib
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

import betterproto
import structlog
from betterproto.lib.google.protobuf import Any as ProtoAny

from . import errdefs, filters, identifiers

log = structlog.get_logger(__name__)

DEFAULT_QUEUE_SIZE = 1024

GEN_PACKAGE = "pycontainerd.api.gen"
"""Where the generated betterproto modules live: module GEN_PACKAGE + ".containerd.events" holds
the messages of proto package "containerd.events"."""

_WELL_KNOWN_MODULES = ("betterproto.lib.std.google.protobuf", "betterproto.lib.google.protobuf")

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


# --------------------------------------------------------------------------------------------
# type URLs


_lock = threading.Lock()
_url_by_class: dict[type, str] = {}
_class_by_url: dict[str, type] = {}
_generated_names: dict[tuple[str, str], str] | None = None


def register_type(cls: type, url: str) -> None:
    """Declare the type URL of a message class (for classes outside the generated modules, or to
    override). Registering the same class under another URL is a ValueError."""
    with _lock:
        known = _url_by_class.get(cls)
        if known is not None and known != url:
            raise ValueError(f"{cls.__qualname__} already registered as {known!r}, not {url!r}")
        _url_by_class[cls] = url
        _class_by_url[url] = cls


def _generated() -> dict[tuple[str, str], str]:
    """(module, class name) -> full protobuf name, from the generated registry (api/gen/registry.py),
    which knows the names betterproto changed (containerd.events.TaskOOM is class TaskOom)."""
    global _generated_names
    if _generated_names is None:
        try:
            registry = importlib.import_module(f"{GEN_PACKAGE}.registry")
            messages = getattr(registry, "MESSAGES", {})
        except ImportError:
            messages = {}
        _generated_names = {(module, cls): name for name, (module, cls) in messages.items()}
    return _generated_names


def type_url(message: betterproto.Message | type) -> str:
    """The type URL containerd uses for a message (class or instance): its full protobuf name,
    e.g. "containerd.events.TaskOOM" for the generated class TaskOom.

    Looked up in `register_type` registrations, then in the generated registry, then derived from
    the module (GEN_PACKAGE.<proto package>, or betterproto's google.protobuf) and class name.
    Raises errdefs.NotFound for a class none of these knows.
    """
    cls = message if isinstance(message, type) else type(message)
    url = _url_by_class.get(cls)
    if url is not None:
        return url
    module, name = cls.__module__, cls.__name__
    url = _generated().get((module, name))
    if url is not None:
        return url
    if module.startswith(GEN_PACKAGE + "."):
        return f"{module[len(GEN_PACKAGE) + 1:]}.{name}"
    if module in _WELL_KNOWN_MODULES:
        return f"google.protobuf.{name}"
    raise errdefs.NotFound(f"type URL of {module}.{cls.__qualname__}")


def resolve(url: str) -> type | None:
    """The message class for a type URL ("containerd.events.TaskExit", or with a
    "host/path/" prefix), or None when unknown."""
    name = url.rsplit("/", 1)[-1]
    cls = _class_by_url.get(url) or _class_by_url.get(name)
    if cls is not None:
        return cls
    try:
        registry = importlib.import_module(f"{GEN_PACKAGE}.registry")
        return registry.message_class(name)
    except (ImportError, AttributeError, KeyError, ValueError):
        pass
    if name.startswith("google.protobuf."):
        well_known = importlib.import_module("betterproto.lib.google.protobuf")
        found = getattr(well_known, name[len("google.protobuf."):], None)
        if isinstance(found, type) and issubclass(found, betterproto.Message):
            return found
    return None


def pack(message: betterproto.Message | ProtoAny) -> ProtoAny:
    """An Any holding `message` under its type URL (an Any is returned as is)."""
    if isinstance(message, ProtoAny):
        return message
    if not isinstance(message, betterproto.Message):
        raise errdefs.InvalidArgument(f"event must be a protobuf message, not {type(message).__name__}")
    return ProtoAny(type_url=type_url(message), value=bytes(message))


def decode(any_: ProtoAny | None) -> betterproto.Message | None:
    """The message inside an Any, or None when its type is unknown or its bytes do not parse."""
    if any_ is None or not any_.type_url:
        return None
    cls = resolve(any_.type_url)
    if cls is None:
        return None
    try:
        return cls().parse(any_.value)
    except Exception:
        return None


# --------------------------------------------------------------------------------------------
# envelopes and validation


def validate_topic(topic: str) -> str:
    """Return the topic when valid; errdefs.InvalidArgument with containerd's message otherwise:
    `must not be empty`, `must start with '/'`, `must have at least one component`, `failed
    validation on component "x": identifier ...`."""
    if not isinstance(topic, str) or topic == "":
        raise errdefs.InvalidArgument("must not be empty")
    if topic[0] != "/":
        raise errdefs.InvalidArgument("must start with '/'")
    if len(topic) == 1:
        raise errdefs.InvalidArgument("must have at least one component")
    for component in topic[1:].split("/"):
        try:
            identifiers.validate(component)
        except errdefs.InvalidArgument as err:
            raise errdefs.InvalidArgument(
                f"failed validation on component {identifiers.go_quote(component)}: {err.message}") from None
    return topic


def _topic_error(topic: Any, err: errdefs.InvalidArgument) -> errdefs.InvalidArgument:
    shown = identifiers.go_quote(topic) if isinstance(topic, str) else repr(topic)
    return errdefs.InvalidArgument(f"envelope topic {shown}: {err.message}")


_NOT_DECODED = object()


@dataclass(frozen=True, eq=True)
class Envelope:
    """One event as subscribers receive it. The same object goes to every subscriber: treat it
    (and its `event`) as read-only."""

    timestamp: datetime
    namespace: str
    topic: str
    event: ProtoAny
    _decoded: Any = field(default=_NOT_DECODED, init=False, repr=False, compare=False)

    def decode(self) -> betterproto.Message | None:
        """The payload as its message class (decoded once), or None when its type is unknown."""
        decoded = self._decoded
        if decoded is _NOT_DECODED:
            decoded = decode(self.event)
            object.__setattr__(self, "_decoded", decoded)
        return decoded

    def field(self, fieldpath: Sequence[str]) -> tuple[str, bool]:
        """containerd's Envelope.Field: the filter adaptor over namespace, topic and event.*."""
        if not fieldpath:
            return "", False
        head = fieldpath[0]
        if head == "namespace":
            return self.namespace, len(self.namespace) > 0
        if head == "topic":
            return self.topic, len(self.topic) > 0
        if head == "event":
            decoded = self.decode()
            if decoded is None:
                return "", False
            return filters.adapt_message(decoded, decode_any=decode)(list(fieldpath[1:]))
        return "", False


# --------------------------------------------------------------------------------------------
# subscriptions


class SubscriberOverflow(errdefs.Unavailable):
    """Raised to a subscriber that fell `queue_size` events behind and was dropped."""


class _Subscriber:
    """The exchange's side of a subscription: a bounded queue and a waiter to wake."""

    __slots__ = ("filter", "maxsize", "queue", "waiter", "loop", "closed", "error", "exchange",
                 "overflowed")

    def __init__(self, exchange: "Exchange", flt: filters.Filter, maxsize: int):
        self.exchange = exchange
        self.filter = flt
        self.maxsize = maxsize
        self.queue: collections.deque[Envelope] = collections.deque()
        self.waiter: asyncio.Future | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        self.error: BaseException | None = None
        self.overflowed = False

    def offer(self, envelope: Envelope) -> bool:
        """Queue the envelope if it passes the filter; False when the queue is full (overflow)."""
        if self.closed:
            return True
        try:
            wanted = self.filter is filters.ALWAYS or self.filter.match(envelope.field)
        except Exception as err:  # an adaptor bug must not reach the publisher
            log.error("event filter failed", topic=envelope.topic, error=str(err))
            return True
        if not wanted:
            return True
        if len(self.queue) >= self.maxsize:
            return False
        self.queue.append(envelope)
        self.wake()
        return True

    def wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is None or waiter.done():
            return
        loop = self.loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            waiter.set_result(None)
        elif loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(_resolve, waiter)

    def end(self, error: BaseException | None = None, discard: bool = False) -> None:
        self.closed = True
        if error is not None and self.error is None:
            self.error = error
        if discard:
            self.queue.clear()
        self.wake()


def _resolve(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Subscription:
    """An async iterator of Envelopes, from `Exchange.subscribe`.

    Ends (StopAsyncIteration) when closed — `close()`, leaving `async with`, the exchange closing,
    the object being dropped, or a read through `async for`/`__anext__` being cancelled — or
    raises SubscriberOverflow once it has read what was queued before it fell too far behind.
    To wait with a timeout and keep the subscription, use `get(timeout)`.
    """

    def __init__(self, sub: _Subscriber):
        self._sub = sub

    def __aiter__(self) -> "Subscription":
        return self

    async def __anext__(self) -> Envelope:
        try:
            return await self._next()
        except asyncio.CancelledError:
            # The reader went away mid-wait (a gRPC Subscribe stream whose client left): stop
            # collecting for it at once rather than when its frames are garbage-collected.
            self.close()
            raise

    async def _next(self) -> Envelope:
        sub = self._sub
        while True:
            if sub.queue:
                return sub.queue.popleft()
            if sub.error is not None:
                err, sub.error = sub.error, None
                raise err
            if sub.closed:
                raise StopAsyncIteration
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()
            sub.loop = loop
            sub.waiter = waiter
            if sub.queue or sub.closed:  # a publisher in another thread got in between
                sub.waiter = None
                continue
            try:
                await waiter
            finally:
                if sub.waiter is waiter:
                    sub.waiter = None

    async def get(self, timeout: float | None = None) -> Envelope:
        """The next envelope; asyncio.TimeoutError after `timeout` seconds; StopAsyncIteration when
        the subscription has ended. Unlike `__anext__`, a timeout or cancellation here leaves the
        subscription open."""
        return await asyncio.wait_for(self._next(), timeout)

    def close(self) -> None:
        """Stop receiving: unregister and drop what is queued. Idempotent."""
        self._sub.exchange._remove(self._sub)
        self._sub.end(discard=True)

    async def __aenter__(self) -> "Subscription":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._sub.exchange._remove(self._sub)
            self._sub.closed = True
        except Exception:
            pass

    @property
    def pending(self) -> int:
        """Envelopes queued and not read yet."""
        return len(self._sub.queue)

    @property
    def overflowed(self) -> bool:
        """True once the exchange dropped this subscriber for falling behind."""
        return self._sub.overflowed

    @property
    def closed(self) -> bool:
        return self._sub.closed


# --------------------------------------------------------------------------------------------
# the exchange


class Exchange:
    """Broadcasts envelopes to subscribers; see the module docstring for the rules."""

    def __init__(self, queue_size: int = DEFAULT_QUEUE_SIZE):
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, not {queue_size}")
        self.queue_size = queue_size
        self._lock = threading.RLock()
        self._subscribers: tuple[_Subscriber, ...] = ()
        self._closed = False

    # -- publishing

    def publish(self, namespace: str | None, topic: str, event: betterproto.Message | ProtoAny) -> Envelope:
        """Stamp, pack and broadcast an event; return the envelope sent.

        `namespace` None means the request's (core.context.namespace()). Raises
        errdefs.FailedPrecondition without a namespace, errdefs.InvalidArgument for an invalid
        namespace or topic, errdefs.NotFound for a message class with no known type URL — never
        anything because of a subscriber. Does not block.

        The message itself becomes the envelope's decoded payload (what `Envelope.decode()`
        returns to in-process subscribers): do not change it after publishing.
        """
        if namespace is None:
            from .context import namespace as request_namespace

            try:
                namespace = request_namespace()
            except errdefs.FailedPrecondition as err:
                raise errdefs.FailedPrecondition(f"failed publishing event: {err.message}") from None
        if not namespace:
            raise errdefs.FailedPrecondition("failed publishing event: namespace is required")
        try:
            identifiers.validate(namespace)
        except errdefs.InvalidArgument as err:
            raise errdefs.InvalidArgument(
                f"failed publishing event: namespace validation: {err.message}") from None
        try:
            validate_topic(topic)
        except errdefs.InvalidArgument as err:
            raise _topic_error(topic, err) from None
        envelope = Envelope(timestamp=datetime.now(timezone.utc), namespace=namespace, topic=topic,
                            event=pack(event))
        if not isinstance(event, ProtoAny):
            # The message is the decoded payload: filters on event.* and in-process readers
            # calling decode() skip a parse (betterproto parses slowly).
            object.__setattr__(envelope, "_decoded", event)
        self._broadcast(envelope)
        return envelope

    def publish_any(self, namespace: str | None, topic: str, event: ProtoAny) -> Envelope:
        """`publish` for an already packed event (the Events.Publish RPC)."""
        if not isinstance(event, ProtoAny):
            raise errdefs.InvalidArgument(f"event must be a google.protobuf.Any, not {type(event).__name__}")
        return self.publish(namespace, topic, event)

    def forward(self, envelope: Envelope) -> None:
        """Broadcast an envelope made elsewhere, as is. Its namespace must be an identifier, its
        topic valid and its timestamp set (None, year 1 and the Unix epoch — an unset protobuf
        Timestamp — count as unset); otherwise errdefs.InvalidArgument. A naive timestamp is taken
        as UTC."""
        try:
            identifiers.validate(envelope.namespace)
        except errdefs.InvalidArgument as err:
            raise errdefs.InvalidArgument(f"event envelope has invalid namespace: {err.message}") from None
        try:
            validate_topic(envelope.topic)
        except errdefs.InvalidArgument as err:
            raise _topic_error(envelope.topic, err) from None
        ts = envelope.timestamp
        if not isinstance(ts, datetime) or ts.year == 1 or (
                (ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)) == _EPOCH):
            raise errdefs.InvalidArgument("timestamp must be set on forwarded event")
        if ts.tzinfo is None:
            envelope = Envelope(ts.replace(tzinfo=timezone.utc), envelope.namespace, envelope.topic,
                                envelope.event)
        if envelope.event is None:
            envelope = Envelope(envelope.timestamp, envelope.namespace, envelope.topic, ProtoAny())
        self._broadcast(envelope)

    def _broadcast(self, envelope: Envelope) -> None:
        overflowed: list[_Subscriber] = []
        with self._lock:
            for sub in self._subscribers:
                try:
                    if not sub.offer(envelope):
                        overflowed.append(sub)
                except Exception as err:  # pragma: no cover - offer already guards itself
                    log.error("event delivery failed", topic=envelope.topic, error=str(err))
            for sub in overflowed:
                self._remove(sub)
                sub.overflowed = True
                sub.end(SubscriberOverflow(
                    f"event subscriber fell {sub.maxsize} events behind and was dropped"))
        for sub in overflowed:
            log.warning("dropped slow event subscriber", queue_size=sub.maxsize,
                        topic=envelope.topic, namespace=envelope.namespace)

    # -- subscribing

    def subscribe(self, *filter_strings: str, queue_size: int | None = None) -> Subscription:
        """A Subscription to envelopes matching any of the filters (all envelopes without any).

        Registration happens now: every event published after this call returns is seen. Raises
        errdefs.InvalidArgument for a filter that does not parse. After `close()` the
        subscription ends at once.
        """
        try:
            flt = filters.parse(*filter_strings)
        except errdefs.InvalidArgument as err:
            raise errdefs.InvalidArgument(f"failed parsing subscription filters: {err.message}") from None
        size = self.queue_size if queue_size is None else queue_size
        if size < 1:
            raise ValueError(f"queue_size must be at least 1, not {size}")
        sub = _Subscriber(self, flt, size)
        with self._lock:
            if self._closed:
                sub.closed = True
            else:
                self._subscribers = self._subscribers + (sub,)
        return Subscription(sub)

    def _remove(self, sub: _Subscriber) -> None:
        with self._lock:
            if sub in self._subscribers:
                self._subscribers = tuple(s for s in self._subscribers if s is not sub)

    @property
    def subscribers(self) -> int:
        """How many subscriptions are registered."""
        return len(self._subscribers)

    def close(self) -> None:
        """End every subscription (each ends after reading what is queued); later subscriptions
        end at once. Publishing still works and reaches nobody."""
        with self._lock:
            subs, self._subscribers = self._subscribers, ()
            self._closed = True
        for sub in subs:
            sub.end()

