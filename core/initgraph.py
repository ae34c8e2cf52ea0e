"""The init graph: collect registrations through pluggy, order them by `requires`, initialise each
with its InitContext, and record what happened (ok / skip / error) for introspection.

It knows no plugin. Built-in modules, entry points (group `pycontainerd.plugins`) and config's
`plugin_modules` all reach it the same way: a module implementing `pycontainerd_register`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pluggy
import structlog

from . import errdefs
from .plugin import (ENTRY_POINT_GROUP, HOOK_NAMESPACE, InitContext, PluginMeta, PluginSkip, PluginSpec,
                     Registration, Registry)

log = structlog.get_logger(__name__)

OK, SKIP, ERROR = "ok", "skip", "error"


class RequiredPluginError(Exception):
    """A `required_plugins` entry is missing, skipped or failed: the daemon must not start."""


@dataclass
class PluginRecord:
    registration: Registration
    status: str = ""
    error: str = ""
    instance: Any = None
    meta: PluginMeta = field(default_factory=PluginMeta)

    @property
    def uri(self) -> str:
        return self.registration.uri


def collect(builtin_modules: Iterable[str], extra_modules: Iterable[str] = (),
            entry_points: bool = True) -> Registry:
    """Every registration from the built-in modules, the entry-point group and `extra_modules`."""
    pm = pluggy.PluginManager(HOOK_NAMESPACE)
    pm.add_hookspecs(PluginSpec)
    for name in [*builtin_modules, *extra_modules]:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            raise errdefs.InvalidArgument(f"plugin module {name!r} cannot be imported: {e}") from e
        if pm.is_registered(module):
            continue
        pm.register(module, name=name)
    if entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    registry = Registry()
    # pluggy calls hooks last-registered first; plugins register in the order they were loaded
    for impl in pm.hook.pycontainerd_register.get_hookimpls():
        impl.function(registry=registry)
    return registry


def _matches(requirement: str, reg: Registration) -> bool:
    return requirement == reg.type or requirement == reg.uri


def order(registrations: list[Registration]) -> list[Registration]:
    """Registration order, moved only as far as `requires` demands; "*" goes after everything else.

    A cycle is a programming error in some plugin and raises ValueError naming the plugins.
    """
    ordered: list[Registration] = []
    placed: set[str] = set()
    visiting: list[str] = []
    by_uri = {r.uri: r for r in registrations}
    wildcard = [r for r in registrations if "*" in r.requires]
    normal = [r for r in registrations if "*" not in r.requires]

    def visit(reg: Registration, pool: list[Registration]) -> None:
        if reg.uri in placed:
            return
        if reg.uri in visiting:
            raise ValueError("plugin dependency cycle: " + " -> ".join([*visiting, reg.uri]))
        visiting.append(reg.uri)
        for req in reg.requires:
            if req == "*":
                continue
            for dep in pool:
                if dep is not reg and _matches(req, dep):
                    visit(dep, pool)
        visiting.pop()
        placed.add(reg.uri)
        ordered.append(reg)

    for reg in normal:
        visit(reg, normal)
    for reg in wildcard:
        visit(reg, list(by_uri.values()))
    return ordered


class InitGraph:
    """Initialises ordered registrations and keeps their records in init order."""

    def __init__(self, *, root: Path, state: Path, events: Any, grpc_address: str, ttrpc_address: str,
                 daemon_config: Any, plugin_config: Any, disabled: Iterable[str] = (),
                 required: Iterable[str] = (), timeouts: dict[str, str] | None = None):
        """plugin_config(registration) returns that plugin's config instance (config/ builds it)."""
        self.root, self.state, self.events = Path(root), Path(state), events
        self.grpc_address, self.ttrpc_address = grpc_address, ttrpc_address
        self.daemon_config, self._plugin_config = daemon_config, plugin_config
        self.disabled, self.required = set(disabled), list(required)
        self.timeouts = dict(timeouts or {})
        self.records: list[PluginRecord] = []

    def _lookup(self, type: str, id: str | None) -> Any:
        for rec in self.records:
            reg = rec.registration
            if reg.type == type and (id is None or reg.id == id):
                if rec.status == OK:
                    return rec.instance
                if id is not None:
                    raise errdefs.NotFound(f"plugin {reg.uri} is not available ({rec.status}: {rec.error})")
        raise errdefs.NotFound(f"no plugin {type}{'.' + id if id else ''}")

    def _lookup_all(self, type: str) -> dict[str, Any]:
        return {r.registration.id: r.instance for r in self.records
                if r.registration.type == type and r.status == OK}

    async def run(self, registrations: list[Registration]) -> list[PluginRecord]:
        present = {r.uri for r in registrations if r.uri not in self.disabled}
        for uri in self.required:
            if uri not in present:
                why = "disabled" if uri in self.disabled else "not registered"
                raise RequiredPluginError(f"required plugin {uri} is {why}")
        for reg in order([r for r in registrations if r.uri not in self.disabled]):
            rec = PluginRecord(reg)
            self.records.append(rec)
            await self._init_one(rec)
            if reg.uri in self.required and rec.status != OK:
                raise RequiredPluginError(f"required plugin {reg.uri} did not load ({rec.status}: {rec.error})")
        return self.records

    async def _init_one(self, rec: PluginRecord) -> None:
        reg = rec.registration
        ctx = InitContext(
            registration=reg, root=self.root / reg.uri, state=self.state / reg.uri,
            config=self._plugin_config(reg), events=self.events, grpc_address=self.grpc_address,
            ttrpc_address=self.ttrpc_address, daemon_config=self.daemon_config, timeouts=self.timeouts,
            meta=rec.meta, _lookup=self._lookup, _lookup_all=self._lookup_all,
            _records=lambda: list(self.records))
        try:
            rec.instance = await reg.init(ctx)
            rec.status = OK
            log.debug("plugin loaded", plugin=reg.uri)
        except PluginSkip as e:
            rec.status, rec.error = SKIP, str(e)
            log.info("skip loading plugin", plugin=reg.uri, reason=str(e))
        except Exception as e:  # a failing plugin is recorded, never fatal unless required
            rec.status, rec.error = ERROR, str(e) or type(e).__name__
            log.warning("failed to load plugin", plugin=reg.uri, error=rec.error, exc_info=True)

    async def close(self) -> None:
        """Close initialised plugins in reverse init order; one failing close does not stop the rest."""
        for rec in reversed(self.records):
            close = rec.registration.close
            if rec.status != OK or close is None:
                continue
            try:
                await close(rec.instance)
            except Exception:
                log.warning("failed to close plugin", plugin=rec.uri, exc_info=True)
