"""The init graph: ordering by requires, disabled, skipped, failing and required plugins."""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import pytest

from pycontainerd.core import errdefs
from pycontainerd.core.initgraph import ERROR, OK, SKIP, InitGraph, RequiredPluginError, collect, order
from pycontainerd.core.plugin import PluginSkip, Registration, hookimpl


def reg(type_, id_, requires=(), init=None, close=None, config=None):
    async def default_init(ctx):
        return f"{type_}.{id_}"
    return Registration(type_, id_, init or default_init, requires=requires, close=close, config=config)


def graph(tmp_path, **kw):
    return InitGraph(root=tmp_path / "root", state=tmp_path / "state", events=None, grpc_address="g",
                     ttrpc_address="t", daemon_config=None, plugin_config=lambda r: r.default_config(), **kw)


def test_order_keeps_registration_order_when_free():
    regs = [reg("a", "1"), reg("b", "1"), reg("c", "1")]
    assert [r.uri for r in order(regs)] == ["a.1", "b.1", "c.1"]


def test_order_moves_dependencies_first_by_type_and_uri():
    regs = [reg("grpc", "svc", requires=("meta",)), reg("x", "y", requires=("meta.db",)), reg("meta", "db")]
    assert [r.uri for r in order(regs)] == ["meta.db", "grpc.svc", "x.y"]


def test_order_wildcard_goes_last():
    regs = [reg("intro", "spection", requires=("*",)), reg("a", "1"), reg("b", "1", requires=("a",))]
    assert [r.uri for r in order(regs)][-1] == "intro.spection"


def test_order_cycle_is_an_error():
    with pytest.raises(ValueError, match="cycle"):
        order([reg("a", "1", requires=("b",)), reg("b", "1", requires=("a",))])


async def test_skip_error_and_lookup(tmp_path):
    async def skipper(ctx):
        raise PluginSkip("overlay is not supported here")

    async def failer(ctx):
        raise RuntimeError("boom")

    async def user(ctx):
        return ("uses", ctx.get("base"), sorted(ctx.get_all("base")))

    g = graph(tmp_path)
    records = await g.run([reg("base", "one"), reg("snap", "overlay", init=skipper), reg("bad", "x", init=failer),
                           reg("top", "u", requires=("base",), init=user)])
    status = {r.uri: (r.status, r.error) for r in records}
    assert status["base.one"] == (OK, "")
    assert status["snap.overlay"] == (SKIP, "overlay is not supported here")
    assert status["bad.x"] == (ERROR, "boom")
    assert records[-1].instance == ("uses", "base.one", ["one"])


async def test_get_of_failed_plugin_is_not_found(tmp_path):
    async def failer(ctx):
        raise RuntimeError("boom")

    async def user(ctx):
        return ctx.get("bad", "x")

    records = await graph(tmp_path).run([reg("bad", "x", init=failer), reg("top", "u", requires=("bad",), init=user)])
    assert records[1].status == ERROR and "not available" in records[1].error


async def test_disabled_plugins_are_not_initialised(tmp_path):
    called = []

    async def init(ctx):
        called.append(1)

    records = await graph(tmp_path, disabled=["a.1"]).run([reg("a", "1", init=init), reg("b", "1")])
    assert [r.uri for r in records] == ["b.1"] and not called


async def test_required_missing_fails_before_any_init(tmp_path):
    called = []

    async def init(ctx):
        called.append(1)

    with pytest.raises(RequiredPluginError, match="required plugin z.9 is not registered"):
        await graph(tmp_path, required=["z.9"]).run([reg("a", "1", init=init)])
    assert not called


async def test_required_disabled_fails(tmp_path):
    with pytest.raises(RequiredPluginError, match="disabled"):
        await graph(tmp_path, required=["a.1"], disabled=["a.1"]).run([reg("a", "1")])


async def test_required_failing_stops_with_reason(tmp_path):
    async def failer(ctx):
        raise RuntimeError("no disk")

    with pytest.raises(RequiredPluginError, match=r"a\.1 did not load \(error: no disk\)"):
        await graph(tmp_path, required=["a.1"]).run([reg("a", "1", init=failer), reg("b", "1")])


async def test_context_dirs_and_config(tmp_path):
    @dataclass
    class Cfg:
        size: int = 3

    async def init(ctx):
        return ctx.root, ctx.state, ctx.config

    rec = (await graph(tmp_path).run([reg("t.v1", "x", init=init, config=Cfg)]))[0]
    assert rec.instance == (tmp_path / "root" / "t.v1.x", tmp_path / "state" / "t.v1.x", Cfg(3))


async def test_close_runs_in_reverse_and_survives_failures(tmp_path):
    closed = []

    async def close_ok(inst):
        closed.append(inst)

    async def close_bad(inst):
        raise RuntimeError("close failed")

    g = graph(tmp_path)
    await g.run([reg("a", "1", close=close_ok), reg("b", "1", close=close_bad), reg("c", "1", close=close_ok)])
    await g.close()
    assert closed == ["c.1", "a.1"]


def test_collect_from_modules_and_duplicates():
    mod = types.ModuleType("pyctd_test_plugins_mod")

    @hookimpl
    def pycontainerd_register(registry):
        registry.register(reg("ext.v1", "thing"))

    mod.pycontainerd_register = pycontainerd_register
    sys.modules[mod.__name__] = mod
    try:
        registry = collect([], [mod.__name__], entry_points=False)
        assert [r.uri for r in registry.all()] == ["ext.v1.thing"]
        with pytest.raises(ValueError, match="registered twice"):
            registry.register(reg("ext.v1", "thing"))
    finally:
        del sys.modules[mod.__name__]


def test_collect_unknown_module_is_invalid_argument():
    with pytest.raises(errdefs.InvalidArgument, match="no_such_plugin_module"):
        collect([], ["no_such_plugin_module"], entry_points=False)


def test_registration_config_must_be_dataclass():
    with pytest.raises(TypeError):
        reg("a", "1", config=dict)
