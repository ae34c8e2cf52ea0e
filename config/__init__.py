"""pycontainerd's config.toml: containerd 1.6's format (versions 1 and 2) with our own defaults.

Owns the model (Config and its tables), loading with imports, merging and version 1 -> 2
migration, each plugin's typed config, and the text of `config default` / `config dump`.
It never logs nor prints: problems come back as ConfigWarning data (the daemon logs them, the CLI
prints them) or are raised as ConfigError. It knows the plugin contract, not any plugin.

    result = load(path, explicit=True)         # LoadResult(config, warnings, files)
    apply_overrides(result.config, root=..., address=..., log_level=...)
    for w in check(result, registrations): ...  # every warning, plugin tables included
    cfg = plugin_config(result.config, registration, warnings)
"""
from .durations import parse_duration, timeout
from .errors import ConfigError, ConfigWarning
from .load import LoadResult, load
from .migrate import V1_PLUGIN_URIS, v1_plugin_uri
from .model import (CONFIG_VERSION, DEFAULT_ADDRESS, DEFAULT_CONFIG_PATH, DEFAULT_ROOT, DEFAULT_STATE,
                    DEFAULT_TIMEOUTS, LOG_FORMATS, LOG_LEVELS, CgroupConfig, Config, DebugConfig,
                    GRPCConfig, MetricsConfig, ProxyPlugin, TTRPCConfig, apply_overrides,
                    proxy_plugin_uri, ttrpc_endpoint)
from .plugins import check, plugin_config
from .render import default_toml, dump_toml

__all__ = [
    "CONFIG_VERSION", "DEFAULT_ADDRESS", "DEFAULT_CONFIG_PATH", "DEFAULT_ROOT", "DEFAULT_STATE",
    "DEFAULT_TIMEOUTS", "LOG_FORMATS", "LOG_LEVELS", "V1_PLUGIN_URIS",
    "CgroupConfig", "Config", "ConfigError", "ConfigWarning", "DebugConfig", "GRPCConfig",
    "LoadResult", "MetricsConfig", "ProxyPlugin", "TTRPCConfig",
    "apply_overrides", "check", "default_toml", "dump_toml", "load", "parse_duration",
    "plugin_config", "proxy_plugin_uri", "timeout", "ttrpc_endpoint", "v1_plugin_uri",
]
