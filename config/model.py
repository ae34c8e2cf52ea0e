"""The config.toml model: containerd 1.6's top-level keys and tables as dataclasses, with
pycontainerd's defaults (its own paths, never containerd's), plus the daemon-flag overrides.

Field names are the TOML keys. Plugin tables stay raw here (`plugins`, keyed "type.id");
pycontainerd.config.plugins turns them into each plugin's own config dataclass.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/pycontainerd/config.toml")
DEFAULT_ROOT = "/var/lib/pycontainerd"
DEFAULT_STATE = "/run/pycontainerd"
DEFAULT_ADDRESS = "/run/pycontainerd/pycontainerd.sock"
DEFAULT_MAX_MESSAGE_SIZE = 16 << 20  # containerd's DefaultMaxRecvMsgSize / DefaultMaxSendMsgSize

CONFIG_VERSION = 2  # the version we write; 1 is read and migrated, anything else refused

# The timeouts containerd 1.6 registers (timeout.Set) and `containerd config default` prints.
DEFAULT_TIMEOUTS: dict[str, str] = {
    "io.containerd.timeout.bolt.open": "0s",
    "io.containerd.timeout.shim.cleanup": "5s",
    "io.containerd.timeout.shim.load": "5s",
    "io.containerd.timeout.shim.shutdown": "3s",
    "io.containerd.timeout.task.state": "2s",
}

# logrus.ParseLevel's names (it lower-cases first), and containerd's two log formats.
LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "fatal", "panic")
LOG_FORMATS = ("text", "json")


@dataclass
class GRPCConfig:
    address: str = DEFAULT_ADDRESS
    tcp_address: str = ""
    tcp_tls_ca: str = ""
    tcp_tls_cert: str = ""
    tcp_tls_key: str = ""
    uid: int = 0
    gid: int = 0
    max_recv_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_send_message_size: int = DEFAULT_MAX_MESSAGE_SIZE


@dataclass
class TTRPCConfig:
    """address "" means "<grpc address>.ttrpc" with the gRPC socket's uid/gid (see ttrpc_endpoint)."""

    address: str = ""
    uid: int = 0
    gid: int = 0


@dataclass
class DebugConfig:
    address: str = ""
    uid: int = 0
    gid: int = 0
    level: str = "info"
    format: str = "text"


@dataclass
class MetricsConfig:
    address: str = ""
    grpc_histogram: bool = False


@dataclass
class CgroupConfig:
    path: str = ""


@dataclass
class ProxyPlugin:
    """A plugin served by another process over gRPC. type: "snapshot" or "content" (or the full
    type names io.containerd.snapshotter.v1 / io.containerd.content.v1)."""

    type: str = ""
    address: str = ""


@dataclass
class Config:
    version: int = CONFIG_VERSION
    root: str = DEFAULT_ROOT
    state: str = DEFAULT_STATE
    temp: str = ""
    plugin_dir: str = ""
    disabled_plugins: list[str] = field(default_factory=list)
    required_plugins: list[str] = field(default_factory=list)
    oom_score: int = 0
    imports: list[str] = field(default_factory=list)
    # pycontainerd's own key: Python modules to load plugins from besides the entry points.
    plugin_modules: list[str] = field(default_factory=list)
    grpc: GRPCConfig = field(default_factory=GRPCConfig)
    ttrpc: TTRPCConfig = field(default_factory=TTRPCConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    cgroup: CgroupConfig = field(default_factory=CgroupConfig)
    timeouts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TIMEOUTS))
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)
    proxy_plugins: dict[str, ProxyPlugin] = field(default_factory=dict)
    stream_processors: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Which file each [plugins."type.id"] table came from, for warnings. Not a TOML key.
    plugin_files: dict[str, Path] = field(default_factory=dict, compare=False, repr=False,
                                          metadata={"toml_skip": True})


PROXY_PLUGIN_TYPES = {
    "snapshot": "io.containerd.snapshotter.v1",
    "io.containerd.snapshotter.v1": "io.containerd.snapshotter.v1",
    "content": "io.containerd.content.v1",
    "io.containerd.content.v1": "io.containerd.content.v1",
}


def proxy_plugin_uri(name: str, proxy: ProxyPlugin) -> str | None:
    """The "type.id" a proxy plugin registers as (containerd's rule), None for an unknown type."""
    t = PROXY_PLUGIN_TYPES.get(proxy.type)
    return f"{t}.{name}" if t else None


def ttrpc_endpoint(config: Config) -> TTRPCConfig:
    """The ttrpc socket to serve: [ttrpc] as given, or, when its address is empty, containerd's
    default of "<grpc address>.ttrpc" owned by the gRPC socket's uid/gid."""
    if config.ttrpc.address:
        return copy.copy(config.ttrpc)
    return TTRPCConfig(address=f"{config.grpc.address}.ttrpc", uid=config.grpc.uid, gid=config.grpc.gid)


def apply_overrides(config: Config, root: str | None = None, state: str | None = None,
                    address: str | None = None, log_level: str | None = None) -> Config:
    """Apply the daemon's --root, --state, --address and --log-level flags over `config`, in place
    (containerd's rule: a flag that is set wins over the file). Returns `config`.

    An empty or None flag changes nothing. An unknown log level is a ConfigError.
    """
    if log_level:
        if log_level.lower() not in LOG_LEVELS:
            raise ConfigError(f'unknown log level "{log_level}" (use one of {", ".join(LOG_LEVELS)})')
        config.debug.level = log_level.lower()
    if root:
        config.root = root
    if state:
        config.state = state
    if address:
        config.grpc.address = address
    return config
