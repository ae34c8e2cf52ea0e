"""What a plugin gives the core: its Registration, the pluggy hookspec that carries it, and the
InitContext its init receives. The init graph that orders and runs registrations is in
core/initgraph.py; this module holds only the contract, so plugins and config can import it
without pulling in the servers.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import pluggy

HOOK_NAMESPACE = "pycontainerd"
ENTRY_POINT_GROUP = "pycontainerd.plugins"

hookspec = pluggy.HookspecMarker(HOOK_NAMESPACE)
hookimpl = pluggy.HookimplMarker(HOOK_NAMESPACE)


class PluginType(str, enum.Enum):
    """containerd's plugin type names, so `ctr plugins ls` reads as it does against containerd."""

    INTERNAL = "io.containerd.internal.v1"
    RUNTIME = "io.containerd.runtime.v1"
    RUNTIME_V2 = "io.containerd.runtime.v2"
    SERVICE = "io.containerd.service.v1"
    GRPC = "io.containerd.grpc.v1"
    TTRPC = "io.containerd.ttrpc.v1"
    SNAPSHOT = "io.containerd.snapshotter.v1"
    TASK_MONITOR = "io.containerd.monitor.v1"
    DIFF = "io.containerd.differ.v1"
    METADATA = "io.containerd.metadata.v1"
    CONTENT = "io.containerd.content.v1"
    GC = "io.containerd.gc.v1"
    LEASE = "io.containerd.lease.v1"
    EVENT = "io.containerd.event.v1"

    def __str__(self) -> str:
        return self.value


class PluginSkip(Exception):
    """Raised by an init to say the plugin does not apply here (e.g. overlay not supported)."""


@dataclass
class Registration:
    """One plugin: its type and id, what it requires, its config dataclass and its lifecycle.

    requires: plugin types, "type.id" names, or "*" (everything else initialises first).
    config: a dataclass type whose fields (with defaults) are the plugin's `[plugins."type.id"]`
    table; None when it takes no configuration.
    init: coroutine taking an InitContext and returning the plugin's instance.
    close: optional coroutine taking that instance, run in reverse init order at shutdown.
    """

    type: str
    id: str
    init: Callable[["InitContext"], Awaitable[Any]]
    requires: tuple[str, ...] = ()
    config: type | None = None
    close: Callable[[Any], Awaitable[None]] | None = None

    def __post_init__(self) -> None:
        self.type = str(self.type)
        self.requires = tuple(str(r) for r in self.requires)
        if self.config is not None and not dataclasses.is_dataclass(self.config):
            raise TypeError(f"plugin {self.uri}: config must be a dataclass type")

    @property
    def uri(self) -> str:
        return f"{self.type}.{self.id}"

    def default_config(self) -> Any:
        return self.config() if self.config is not None else None


@dataclass
class PluginMeta:
    """What a plugin tells introspection about itself beyond its status."""

    exports: dict[str, str] = field(default_factory=dict)
    capabilities: list[str] = field(default_factory=list)
    platforms: list[dict[str, str]] = field(default_factory=list)


@dataclass
class InitContext:
    """Everything a plugin's init may use. `get`/`get_all` return instances already initialised."""

    registration: Registration
    root: Path
    state: Path
    config: Any
    events: Any
    grpc_address: str
    ttrpc_address: str
    daemon_config: Any
    timeouts: dict[str, str]
    meta: PluginMeta
    _lookup: Callable[[str, str | None], Any]
    _lookup_all: Callable[[str], dict[str, Any]]
    _records: Callable[[], list[Any]]

    def get(self, type: str, id: str | None = None) -> Any:
        """The instance of plugin `type.id` (or the only/first one of `type`); NotFound if absent."""
        return self._lookup(str(type), id)

    def get_all(self, type: str) -> dict[str, Any]:
        """Every initialised instance of `type`, by id."""
        return self._lookup_all(str(type))

    def plugins(self) -> list[Any]:
        """The init graph's records (registration, status, error, meta) so far, in init order."""
        return self._records()


class Registry:
    """Collects registrations from every hook implementation; ids are unique per type."""

    def __init__(self) -> None:
        self._regs: dict[str, Registration] = {}

    def register(self, reg: Registration) -> Registration:
        if reg.uri in self._regs:
            raise ValueError(f"plugin {reg.uri} registered twice")
        self._regs[reg.uri] = reg
        return reg

    def all(self) -> list[Registration]:
        return list(self._regs.values())

    def get(self, uri: str) -> Registration | None:
        return self._regs.get(uri)


class PluginSpec:
    """The one hook every plugin module and third-party package implements."""

    @hookspec
    def pycontainerd_register(self, registry: Registry) -> None:
        """Add this module's Registration(s) to `registry` with `registry.register(...)`.

        Called once at daemon start, before config is applied; must not do I/O or start anything.
        """
