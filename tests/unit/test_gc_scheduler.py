"""The GC scheduler (plugins/gc) over a real MetadataDB and collector: containerd's triggers
(startup, deletions, mutation threshold, deletion threshold, schedule_and_wait), expiring leases
collected without any other trigger, failures, and its config."""
from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

import pycontainerd.plugins.gc as gcplugin
from pycontainerd.core import errdefs
from pycontainerd.plugins.gc import Scheduler, SchedulerConfig, go_duration
from pycontainerd.plugins.metadata.db import MetadataDB
from pycontainerd.plugins.metadata.gc import Collector
from pycontainerd.plugins.metadata.images import Descriptor, Image, ImageStore
from pycontainerd.plugins.metadata.leases import LeaseStore

TARGET = Descriptor("m", "sha256:" + "1" * 64, 1)


class CountingCollector(Collector):
    def __init__(self, db, fail: int = 0, delay: float = 0.0, meta: float | None = None):
        super().__init__(db)
        self.runs: list[bool] = []
        self.starts: list[float] = []      # loop time each collection started
        self.ends: list[float] = []        # ... and ended
        self.walls: list[datetime] = []    # wall clock each collection started
        self.fail = fail
        self.delay = delay
        self.meta = meta  # pretend each metadata phase took this long (paces the scheduler)

    async def collect(self, full: bool = False):
        self.runs.append(full)
        self.starts.append(asyncio.get_running_loop().time())
        self.walls.append(datetime.now(timezone.utc))
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.fail:
                self.fail -= 1
                raise RuntimeError("boom")
            stats = await super().collect(full)
        finally:
            self.ends.append(asyncio.get_running_loop().time())
        if self.meta is not None:
            stats.meta = self.meta
        return stats


@pytest.fixture
def db(tmp_path):
    d = MetadataDB(tmp_path / "meta.db")
    yield d
    d.close()


def config(**kw) -> SchedulerConfig:
    return SchedulerConfig(**{"startup_delay": "0ms", **kw})


async def wait_for(cond, timeout=30.0):
    """Poll until `cond()` holds; generous, so that a loaded machine only makes it slower."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def test_startup_collection(db):
    async def main():
        c = CountingCollector(db)
        start = asyncio.get_running_loop().time()
        s = Scheduler(c, config(startup_delay="50ms"))
        await wait_for(lambda: c.runs == [False])
        assert c.starts[0] - start >= 0.05  # not before the startup delay
        await s.close()
    asyncio.run(main())


def test_no_startup_collection_without_delay_and_nothing_happening(db):
    async def main():
        c = CountingCollector(db)
        s = Scheduler(c, config())
        LeaseStore(db).create("ns", "l")  # a mutation, not a deletion, under the threshold
        await asyncio.sleep(0.2)
        assert c.runs == []
        await s.close()
    asyncio.run(main())


def test_schedule_and_wait_runs_a_full_collection(db):
    async def main():
        c = CountingCollector(db)
        s = Scheduler(c, config())
        stats = await asyncio.wait_for(s.schedule_and_wait(), 30)
        assert c.runs == [True] and stats is s.last_stats
        await s.close()
    asyncio.run(main())


def test_waiter_arriving_during_a_collection_waits_for_the_next(db):
    async def main():
        c = CountingCollector(db, delay=0.2)
        s = Scheduler(c, config())
        first = asyncio.create_task(s.schedule_and_wait())
        await wait_for(lambda: len(c.runs) == 1)
        second = asyncio.create_task(s.schedule_and_wait())
        await first
        assert not second.done()
        await asyncio.wait_for(second, 30)
        assert len(c.runs) == 2
        await s.close()
    asyncio.run(main())


def test_first_deletion_schedules_a_collection(db):
    async def main():
        c = CountingCollector(db)
        s = Scheduler(c, config())
        images = ImageStore(db)
        images.create("ns", Image("x", TARGET))
        await asyncio.sleep(0.1)
        assert c.runs == []
        images.delete("ns", "x")
        await wait_for(lambda: len(c.runs) == 1)
        await s.close()
    asyncio.run(main())


def test_deletions_after_a_collection_are_paced(db):
    async def main():
        c = CountingCollector(db, meta=0.1)
        s = Scheduler(c, config(pause_threshold=0.25))
        await s.schedule_and_wait()
        assert s.interval == pytest.approx(0.3)  # 0.1 / 0.25 - 0.1
        images = ImageStore(db)
        images.create("ns", Image("x", TARGET))
        images.delete("ns", "x")
        await wait_for(lambda: len(c.runs) == 2)
        assert c.starts[1] - c.ends[0] >= 0.2  # paced: an interval after the last one ended
        await s.close()
    asyncio.run(main())


def test_mutation_threshold(db):
    async def main():
        c = CountingCollector(db)
        s = Scheduler(c, config(mutation_threshold=5))
        leases = LeaseStore(db)
        for i in range(4):
            leases.create("ns", f"l{i}")
        await asyncio.sleep(0.1)
        assert c.runs == []
        leases.create("ns", "l4")
        await wait_for(lambda: len(c.runs) == 1)
        await s.close()
    asyncio.run(main())


def test_mutation_threshold_zero_never_triggers(db):
    async def main():
        c = CountingCollector(db)
        s = Scheduler(c, config(mutation_threshold=0))
        leases = LeaseStore(db)
        for i in range(150):
            leases.create("ns", f"l{i}")
        await asyncio.sleep(0.1)
        assert c.runs == []
        await s.close()
    asyncio.run(main())


def test_deletion_threshold_collects_right_away(db):
    async def main():
        c = CountingCollector(db, meta=0.6)
        s = Scheduler(c, config(deletion_threshold=2, pause_threshold=0.01))
        await s.schedule_and_wait()
        assert s.interval > 50  # the pacing tick is far away
        images = ImageStore(db)
        for name in ("a", "b"):
            images.create("ns", Image(name, TARGET))
        images.delete("ns", "a")
        await asyncio.sleep(0.1)
        assert len(c.runs) == 1
        images.delete("ns", "b")  # one more mutation with deletions counted -> threshold
        await wait_for(lambda: len(c.runs) == 2)
        await s.close()
    asyncio.run(main())


def test_expired_lease_is_collected_without_other_triggers(db, monkeypatch):
    monkeypatch.setattr(gcplugin, "EXPIRY_RECHECK", 0.05)

    async def main():
        c = CountingCollector(db)
        s = Scheduler(c, config())
        leases = LeaseStore(db)
        when = datetime.now(timezone.utc) + timedelta(milliseconds=300)
        leases.create("ns", "short", {"containerd.io/gc.expire": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")})
        leases.create("ns", "long", {"containerd.io/gc.expire": "2999-01-01T00:00:00Z"})
        await asyncio.sleep(0.15)
        if datetime.now(timezone.utc) < when:
            assert [lease.id for lease in leases.list("ns")] == ["short", "long"]
        await wait_for(lambda: [lease.id for lease in leases.list("ns")] == ["long"])
        assert len(c.runs) == 1 and c.walls[0] >= when  # one collection, once it had expired
        await asyncio.sleep(0.2)
        assert len(c.runs) == 1  # the next expiry is far away: no more collections
        await s.close()
    asyncio.run(main())


def test_expiring_leases_from_before_a_restart_are_found(db):
    async def main():
        leases = LeaseStore(db)
        leases.create("ns", "old", {"containerd.io/gc.expire": "2000-01-01T00:00:00Z"})
        c = CountingCollector(db)
        s = Scheduler(c, config())
        await wait_for(lambda: leases.list("ns") == [])
        await s.close()
    asyncio.run(main())


def test_failed_collection_fails_waiters_then_recovers(db):
    async def main():
        c = CountingCollector(db, fail=1)
        s = Scheduler(c, config())
        with pytest.raises(errdefs.Unknown, match="gc failed"):
            await asyncio.wait_for(s.schedule_and_wait(), 30)
        await asyncio.wait_for(s.schedule_and_wait(), 30)
        assert len(c.runs) == 2
        await s.close()
    asyncio.run(main())


def test_failing_collections_back_off(db):
    async def main():
        LeaseStore(db).create("ns", "old", {"containerd.io/gc.expire": "2000-01-01T00:00:00Z"})
        c = CountingCollector(db, fail=100)
        s = Scheduler(c, config())
        await wait_for(lambda: len(c.runs) >= 1)  # an expired lease is due ...
        await asyncio.sleep(0.5)
        # ... but after a failure the next try waits (an interval and) a second
        assert all(b - a >= 1.0 for a, b in zip(c.starts, c.starts[1:]))
        await s.close()
    asyncio.run(main())


def test_close_fails_pending_waiters(db):
    async def main():
        c = CountingCollector(db)
        s = Scheduler(c, config(schedule_delay="10s"))
        waiter = asyncio.create_task(s.schedule_and_wait())
        await asyncio.sleep(0.05)
        await s.close()
        with pytest.raises(errdefs.Unavailable):
            await waiter
    asyncio.run(main())


def test_mutations_from_other_threads_are_counted(db):
    async def main():
        c = CountingCollector(db)
        s = Scheduler(c, config())
        images = ImageStore(db)
        images.create("ns", Image("x", TARGET))
        await asyncio.to_thread(images.delete, "ns", "x")
        await wait_for(lambda: len(c.runs) == 1)
        await s.close()
    asyncio.run(main())


def test_config_is_clamped_and_checked(db):
    async def main():
        s = Scheduler(Collector(db), SchedulerConfig(pause_threshold=3, mutation_threshold=-4,
                                                     schedule_delay="-1s", startup_delay="0s"))
        assert (s.pause_threshold, s.mutation_threshold, s.schedule_delay) == (0.5, 0, 0.0)
        await s.close()
        with pytest.raises(ValueError, match="invalid duration"):
            Scheduler(Collector(db), SchedulerConfig(schedule_delay="soon"))
    asyncio.run(main())


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (0.1, "100ms"), (1.5, "1.5s"), (60, "1m0s"),
                                           (3723, "1h2m3s"), (0.000002, "2µs")])
def test_go_duration(seconds, text):
    assert go_duration(seconds) == text
