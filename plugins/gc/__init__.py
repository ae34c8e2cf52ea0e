"""The garbage collection scheduler (`io.containerd.gc.v1.scheduler`): decides when the metadata
collector (plugins/metadata/gc.py) runs, with containerd's policy and config keys, and lets
callers wait for a collection (`schedule_and_wait`, used by images and leases Delete with sync).

Policy (containerd's gc/scheduler):
- a first collection `startup_delay` after start (none when it is 0: then the first deletion or
  `mutation_threshold` mutations schedule one right away);
- every committed metadata write is a mutation, and a write after `MetadataDB.mark_dirty()` a
  deletion (see plugins/metadata/gc.py for who marks what);
- `schedule_and_wait()` and, when `deletion_threshold` > 0, that many deletions schedule a
  collection `schedule_delay` from now;
- otherwise a deletion, or `mutation_threshold` mutations (0: never), make a collection due at
  the next pacing tick: `interval` after the last collection, where interval is the average
  collection time (its metadata phase) divided by `pause_threshold`, minus that average, so
  collections take at most that share of the time (containerd checks each tick; we schedule the
  due time directly and stay asleep otherwise);
- expired leases: each collection reports the earliest `containerd.io/gc.expire` among the
  leases left; after mutations (a new lease may carry one) the scheduler re-reads the leases'
  expiries, at most once per `EXPIRY_RECHECK` seconds. A collection is due once the earliest
  expiry has passed (no earlier than the pacing tick), so an expired lease goes within about a
  second of its expiry, or one pacing interval, even when nothing else happens. This replaces
  the lease manager's old periodic sweeper.

A failed collection fails its waiters ("gc failed") and retries one interval and a second later.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import structlog

from pycontainerd.config.durations import parse_duration
from pycontainerd.core import errdefs
from pycontainerd.core.plugin import InitContext, PluginType, Registration, hookimpl
from pycontainerd.plugins.metadata.db import load_labels
from pycontainerd.plugins.metadata.gc import Backend, Collector, Stats, lease_expired

log = structlog.get_logger(__name__)

EXPIRY_RECHECK = 1.0
"""Seconds between two re-reads of the leases' expiries while metadata keeps changing."""


@dataclass
class SchedulerConfig:
    pause_threshold: float = 0.02
    """Share of real time collections may take (at most 0.5)."""
    deletion_threshold: int = 0
    """Collect right away after this many deletions (0: at the next pacing tick)."""
    mutation_threshold: int = 100
    """Collect at the next pacing tick after this many mutations (0: mutations never do)."""
    schedule_delay: str = "0ms"
    """How long after a trigger (or the deletion threshold) the collection runs."""
    startup_delay: str = "100ms"
    """When the first collection runs after start."""


def go_duration(seconds: float) -> str:
    """Go's time.Duration String() for the exports ("0s", "100ms", "1.5s", "1m0s")."""
    ns = int(round(seconds * 1e9))
    if ns == 0:
        return "0s"
    sign, ns = ("-" if ns < 0 else ""), abs(ns)

    def trim(v: float) -> str:
        return f"{v:.9f}".rstrip("0").rstrip(".")

    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{trim(ns / 1e3)}µs"
    if ns < 1_000_000_000:
        return f"{sign}{trim(ns / 1e6)}ms"
    h, rest = divmod(ns, 3600 * 10**9)
    m, rest = divmod(rest, 60 * 10**9)
    s = trim(rest / 1e9)
    return f"{sign}{h}h{m}m{s}s" if h else (f"{sign}{m}m{s}s" if m else f"{sign}{s}s")


class Scheduler:
    """Runs `collector.collect()` when containerd's policy says so (see the module docstring)."""

    def __init__(self, collector: Collector, config: SchedulerConfig):
        self.collector = collector
        self.pause_threshold = min(max(float(config.pause_threshold), 0.0), 0.5)
        self.deletion_threshold = int(config.deletion_threshold)
        self.mutation_threshold = max(int(config.mutation_threshold), 0)
        self.schedule_delay = max(parse_duration(config.schedule_delay), 0.0)
        self.startup_delay = max(parse_duration(config.startup_delay), 0.0)
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._wake = asyncio.Event()
        self.triggered = False
        self.deletions = 0
        self.mutations = 0
        self.interval = 1.0
        self.collections = 0
        self._gc_time = 0.0
        self._last: float | None = None            # loop time the last collection ended
        self._not_before = 0.0                     # paced collections wait until then
        self._next_at: float | None = None         # loop time a collection is scheduled for
        self._waiters: list[asyncio.Future] = []
        self._next_expiry: datetime | None = None  # earliest lease expiry not yet collected
        self._expiry_check_at: float | None = self._loop.time()  # re-read the expiries then
        self._last_mark: datetime | None = None    # when the last collection marked
        self.last_stats: Stats | None = None
        if self.startup_delay > 0:
            self._next_at = self._loop.time() + self.startup_delay
        collector.db.register_mutation_callback(self._on_mutation)
        self._task = self._loop.create_task(self._run(), name="gc-scheduler")
        self._task.add_done_callback(self._stopped)

    @staticmethod
    def _stopped(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("garbage collection scheduler stopped", error=str(task.exception()),
                      exc_info=task.exception())

    # -- events --------------------------------------------------------------------------------

    def _on_mutation(self, dirty: bool) -> None:
        """The metadata database's mutation callback (any thread)."""
        if threading.get_ident() != self._thread:
            self._loop.call_soon_threadsafe(self._event, True, dirty)
        else:
            self._event(True, dirty)

    def _event(self, mutation: bool, dirty: bool) -> None:
        if mutation and self.collector.sweeping:
            return  # the collector's own write
        if dirty:
            self.deletions += 1
        now = self._loop.time()
        if mutation:
            self.mutations += 1
            if self._expiry_check_at is None:
                self._expiry_check_at = now + EXPIRY_RECHECK
                self._wake.set()
        else:
            self.triggered = True
        if (self.triggered or (self.deletion_threshold > 0 and self.deletions >= self.deletion_threshold)
                or (self._last is None and self._next_at is None and self._paced_due())):
            self._schedule(now + self.schedule_delay)
        elif self._paced_due() and self._last is not None:
            self._schedule(max(now, self._not_before))

    def _paced_due(self) -> bool:
        return self.deletions > 0 or (self.mutation_threshold > 0 and self.mutations >= self.mutation_threshold)

    def _schedule(self, at: float) -> None:
        if self._next_at is None or at < self._next_at:
            self._next_at = at
            self._wake.set()

    # -- expiring leases -------------------------------------------------------------------------

    def _refresh_expiry(self) -> None:
        """Re-read the earliest lease expiry not collected yet."""
        self._expiry_check_at = None
        earliest = None
        rows = self.collector.db.read("SELECT labels FROM leases WHERE labels LIKE ?",
                                      ('%"containerd.io/gc.expire"%',))
        for row in rows:
            _, when = lease_expired(load_labels(row["labels"]), datetime.now(timezone.utc))
            if when is None or (self._last_mark is not None and when < self._last_mark):
                continue  # the last collection saw it expired: it is gone (or going)
            if earliest is None or when < earliest:
                earliest = when
        self._next_expiry = earliest

    def _expiry_at(self) -> float | None:
        """The loop time a collection is due for the next lease expiry (paced), or None."""
        if self._next_expiry is None:
            return None
        delta = (self._next_expiry - datetime.now(timezone.utc)).total_seconds()
        at = self._loop.time() + delta + 0.001  # containerd: expired once now is after it
        return max(at, self._not_before)

    # -- the loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            now = self._loop.time()
            if self._expiry_check_at is not None and self._expiry_check_at <= now:
                self._refresh_expiry()
            if self._next_at is not None and self._next_at <= now:
                await self._collect()
                continue
            expiry_at = self._expiry_at()
            if expiry_at is not None and expiry_at <= now:
                await self._collect()
                continue
            deadlines = [t for t in (self._next_at, expiry_at, self._expiry_check_at) if t is not None]
            timeout = min(deadlines) - now if deadlines else None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _collect(self) -> None:
        waiters, self._waiters = self._waiters, []
        full = self.triggered
        self.triggered, self.deletions, self.mutations = False, 0, 0
        self._next_at = None
        mark_time = datetime.now(timezone.utc)
        try:
            stats = await self.collector.collect(full=full)
        except Exception as err:
            log.error("garbage collection failed", error=str(err), exc_info=True)
            now = self._loop.time()
            self._last = now
            self._not_before = now + self.interval + 1.0
            self._schedule(self._not_before)
            for w in waiters:
                if not w.done():
                    w.set_exception(errdefs.Unknown("gc failed"))
            return
        now = self._loop.time()
        log.debug("garbage collected", d=stats.elapsed(), removed=stats.removed)
        self._gc_time += stats.elapsed()
        self.collections += 1
        if self.pause_threshold > 0:
            avg = self._gc_time / self.collections
            self.interval = avg / self.pause_threshold - avg
        self._last = now
        self._not_before = now + self.interval
        self._last_mark = mark_time
        self._next_expiry = stats.next_expiry
        self.last_stats = stats
        if self._paced_due() or self.triggered:
            # events that came in during the collection count for the next one
            self._schedule(now + self.schedule_delay if self.triggered else self._not_before)
        for w in waiters:
            if not w.done():
                w.set_result(stats)

    # -- API -------------------------------------------------------------------------------------

    async def schedule_and_wait(self) -> Stats:
        """Schedule a collection (`schedule_delay` from now, including every backend sweep) and
        wait for it; a collection already running does not count. Unknown("gc failed") when it
        fails."""
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        self._event(False, False)
        return await asyncio.shield(waiter)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for w in self._waiters:
            if not w.done():
                w.set_exception(errdefs.Unavailable("garbage collector stopped"))
        self._waiters = []


CONTENT_SERVICE = f"{PluginType.SERVICE}.content-service"


async def init(ctx: InitContext) -> Scheduler:
    """The collector finds its backends at each collection: the content backend with the
    namespaced content store's lock, and every snapshotter backend with the namespaced
    snapshots layer's lock. The content store keeps
    its own list of deletion callbacks; it is hooked to `mark_dirty(content=True)` here."""
    db = ctx.get(PluginType.METADATA).db

    def content_store() -> Any:
        return getattr(ctx.get_all(PluginType.SERVICE).get("content-service"), "store", None)

    def content() -> Backend | None:
        backend = ctx.get_all(PluginType.CONTENT).get("content")
        if backend is None:
            return None
        return Backend(backend, getattr(content_store(), "lock", None))

    def snapshotters() -> dict[str, Backend]:
        # `gc_lock`: the namespaced snapshots layer's lock, which the snapshots service sets on
        # each backend (plugins/snapshots)
        return {name: Backend(backend, getattr(backend, "gc_lock", None))
                for name, backend in ctx.get_all(PluginType.SNAPSHOT).items()
                if hasattr(backend, "walk") and hasattr(backend, "remove")}

    store = content_store()
    if store is not None and hasattr(store, "on_dirty"):
        store.on_dirty(lambda: db.mark_dirty(content=True))
    scheduler = Scheduler(Collector(db, content, snapshotters), ctx.config)
    ctx.meta.exports.update({
        "PauseThreshold": f"{scheduler.pause_threshold:g}",
        "DeletionThreshold": str(scheduler.deletion_threshold),
        "MutationThreshold": str(scheduler.mutation_threshold),
        "ScheduleDelay": go_duration(scheduler.schedule_delay),
    })
    return scheduler


async def close(scheduler: Scheduler) -> None:
    await scheduler.close()


@hookimpl
def pycontainerd_register(registry):
    # containerd's scheduler requires only the metadata plugin, which requires the content and
    # snapshot plugins there; ours does not, so the scheduler names them itself.
    registry.register(Registration(PluginType.GC, "scheduler", init,
                                   requires=(PluginType.METADATA, PluginType.CONTENT, PluginType.SNAPSHOT,
                                             CONTENT_SERVICE),
                                   config=SchedulerConfig, close=close))
