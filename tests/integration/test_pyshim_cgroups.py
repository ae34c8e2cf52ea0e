"""The Python shim's cgroup side without a container: stats of fake cgroup v1 and v2 trees read
into containerd's metrics protobufs (decoded here field number by field number, against
github.com/containerd/cgroups' stats/v1 and v2/stats metrics.proto), the OOM watcher on a fake
memory.events, and the controllers a cgroup v2 init enables. No root needed."""
from __future__ import annotations

import asyncio
from pathlib import Path

from pycontainerd.plugins.runtime.v2.runc import cgroups, launch

MAX64 = (1 << 64) - 1


def decode(data: bytes) -> dict[int, list]:
    """Field number -> values (ints for varints, bytes for length-delimited)."""
    out: dict[int, list] = {}
    for num, _wire, value in launch.proto_fields(data):
        out.setdefault(num, []).append(value)
    return out


def sub(msg: dict[int, list], num: int) -> dict[int, list]:
    return decode(msg[num][0])


def packed(data: bytes) -> list[int]:
    values, pos = [], 0
    while pos < len(data):
        value, pos = launch._read_varint(data, pos)
        values.append(value)
    return values


def _write(root: Path, files: dict[str, str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(text)


def test_v1_stats_as_containerd_metrics(tmp_path):
    paths = {c: str(tmp_path / c) for c in ("pids", "cpu", "cpuacct", "memory", "blkio")}
    _write(tmp_path / "pids", {"pids.current": "3\n", "pids.max": "max\n"})
    _write(tmp_path / "cpuacct", {"cpuacct.stat": f"user {cgroups.CLOCK_TICKS * 2}\nsystem {cgroups.CLOCK_TICKS}\n",
                                  "cpuacct.usage": "123456\n", "cpuacct.usage_percpu": "100 200 \n"})
    _write(tmp_path / "cpu", {"cpu.stat": "nr_periods 7\nnr_throttled 2\nthrottled_time 99\n"})
    _write(tmp_path / "memory", {
        "memory.stat": "cache 4096\nrss 8192\ntotal_unevictable 5\nhierarchical_memsw_limit 77\n",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        "memory.usage_in_bytes": "1000\n", "memory.max_usage_in_bytes": "2000\n", "memory.failcnt": "0\n",
        "memory.limit_in_bytes": "9223372036854771712\n",
        "memory.kmem.usage_in_bytes": "10\n", "memory.kmem.max_usage_in_bytes": "20\n",
        "memory.kmem.failcnt": "0\n", "memory.kmem.limit_in_bytes": "30\n",
    })
    _write(tmp_path / "blkio", {"blkio.io_serviced_recursive": "8:0 Read 10\n8:0 Write 5\nTotal 15\n",
                                **{f"blkio.{n}": "" for n, _ in cgroups._BLKIO_RECURSIVE
                                   if n != "io_serviced_recursive"}})
    m = decode(cgroups.CgroupV1(paths).stat())
    assert sub(m, 2) == {1: [3]}                                   # pids: current, limit "max" -> 0
    cpu = sub(m, 3)
    usage = sub(cpu, 1)
    assert usage[1] == [123456] and usage[2] == [1_000_000_000] and usage[3] == [2_000_000_000]
    assert packed(usage[4][0]) == [100, 200]
    assert sub(cpu, 2) == {1: [7], 2: [2], 3: [99]}
    mem = sub(m, 4)
    assert mem[1] == [4096] and mem[2] == [8192] and mem[32] == [5] and mem[17] == [77]
    assert sub(mem, 33) == {1: [9223372036854771712], 2: [1000], 3: [2000]}
    assert 34 in mem and sub(mem, 34) == {}                        # no memsw files: an empty entry
    assert sub(mem, 35) == {1: [30], 2: [10], 3: [20]}
    assert sub(m, 9) == {3: [1]}                                   # memory_oom_control.oom_kill
    blkio = sub(m, 5)
    entries = [decode(e) for e in blkio[2]]                        # io_serviced_recursive
    assert [(e[1][0], e[3][0], e.get(4, [0])[0], e[5][0]) for e in entries] == [(b"Read", 8, 0, 10),
                                                                                 (b"Write", 8, 0, 5)]


def test_v1_missing_controller_files_are_skipped(tmp_path):
    paths = {"memory": str(tmp_path / "gone"), "pids": str(tmp_path / "gone")}
    m = decode(cgroups.CgroupV1(paths).stat())
    assert set(m) == {3}                                           # only the (empty) cpu stats


def test_v2_stats_as_containerd_metrics(tmp_path):
    _write(tmp_path, {
        "cgroup.controllers": "cpu memory pids io\n",
        "cpu.stat": "usage_usec 500\nuser_usec 300\nsystem_usec 200\nnr_periods 0\nnr_throttled 0\nthrottled_usec 0\n",
        "memory.stat": "anon 100\nfile 200\npgfault 9\nthp_collapse_alloc 4\n",
        "memory.current": "4096\n", "memory.max": "max\n", "memory.swap.current": "0\n", "memory.swap.max": "max\n",
        "pids.current": "2\n", "pids.max": "10\n",
        "memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        "io.stat": "8:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0\n",
        "hugetlb.2MB.current": "0\n", "hugetlb.2MB.max": "max\n",
    })
    m = decode(cgroups.CgroupV2(str(tmp_path)).stat())
    assert sub(m, 1) == {1: [2], 2: [10]}
    assert sub(m, 2) == {1: [500], 2: [300], 3: [200]}
    mem = sub(m, 4)
    assert mem[1] == [100] and mem[2] == [200] and mem[18] == [9] and mem[31] == [4]
    assert mem[32] == [4096] and mem[33] == [MAX64] and mem[35] == [MAX64] and 34 not in mem
    io = [decode(e) for e in sub(m, 6)[1]]
    assert io == [{1: [8], 3: [1], 4: [2], 5: [3], 6: [4]}]
    assert [decode(e) for e in m[7]] == [{2: [MAX64], 3: [b"2MB"]}]
    assert sub(m, 8) == {3: [3], 4: [1], 5: [1]}


def test_v2_init_enables_root_controllers_in_its_ancestors(tmp_path):
    _write(tmp_path, {"cgroup.controllers": "cpu memory pids\n"})
    leaf = tmp_path / "a" / "b" / "c"
    leaf.mkdir(parents=True)
    cgroups.CgroupV2(str(leaf)).enable_controllers(str(tmp_path))
    for directory in (tmp_path, tmp_path / "a", tmp_path / "a" / "b"):
        assert (directory / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert not (leaf / "cgroup.subtree_control").exists()


async def test_v2_oom_watcher_reports_new_oom_kills(tmp_path):
    _write(tmp_path, {"memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n"})
    seen: list[str] = []
    got = asyncio.Event()

    def on_oom(container_id: str) -> None:
        seen.append(container_id)
        got.set()

    watcher = cgroups.OOMWatcher(on_oom)
    watcher.add("c1", cgroups.CgroupV2(str(tmp_path)))
    try:
        (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 2\noom 1\noom_kill 0\n")
        await asyncio.sleep(0.2)
        assert seen == []                                          # oom without a kill: nothing
        (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n")
        await asyncio.wait_for(got.wait(), 5)
        assert seen == ["c1"]
    finally:
        watcher.close()
