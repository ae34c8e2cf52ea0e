"""Each plugin's config: its [plugins."type.id"] table read into its Registration's config
dataclass, and `check`, which gathers every problem a loaded config has against the registered
plugins. Knows the plugin contract (core/plugin.py), not any particular plugin.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable

from .errors import ConfigError, ConfigWarning, child_path
from .load import LoadResult
from .model import Config, proxy_plugin_uri
from .typed import Sink, decode_table


def plugin_config(config: Config, registration: Any,
                  warnings_out: list[ConfigWarning] | None = None) -> Any:
    """An instance of `registration.config` built from its [plugins."type.id"] table (its defaults
    when there is none); None for a plugin that takes no config.

    Unknown keys and wrong types are appended to `warnings_out` (when given) and ignored. Raises
    ConfigError only when the plugin's config class cannot be built from its own defaults.
    """
    sink = Sink(config.plugin_files.get(registration.uri), warnings_out if warnings_out is not None else [])
    raw = config.plugins.get(registration.uri)
    if registration.config is None:
        if raw is not None:
            sink.warn("plugins", registration.uri, "this plugin takes no configuration; table ignored")
        return None
    try:
        base = registration.config()
    except TypeError as e:
        raise ConfigError(f"plugin {registration.uri}: its config class {registration.config.__name__} "
                          f"cannot be built from defaults: {e}") from None
    if raw is None:
        return base
    return decode_table(registration.config, raw, base, sink, child_path("plugins", registration.uri))


def check(result: LoadResult, registrations: Iterable[Any]) -> list[ConfigWarning]:
    """Every warning for a loaded config: those from loading, those of each plugin's table, tables
    and disabled/required entries naming no registered plugin (a warning, not an error: the
    package providing it may just be missing here)."""
    config = result.config
    regs = list(registrations)
    out = list(result.warnings)
    for reg in regs:
        plugin_config(config, reg, out)
    known = {r.uri for r in regs}
    known |= {uri for name, p in config.proxy_plugins.items() if (uri := proxy_plugin_uri(name, p))}

    def hint(name: str) -> str:
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
        return f'; did you mean "{close[0]}"?' if close else ""

    for uri in config.plugins:
        if uri not in known:
            out.append(ConfigWarning(config.plugin_files.get(uri), "plugins", uri,
                                     "no registered plugin has this name; table ignored (is the package "
                                     f"providing it installed, or listed in plugin_modules?){hint(uri)}"))
    for key, consequence in (("disabled_plugins", "nothing to disable"),
                             ("required_plugins", "the daemon will refuse to start")):
        for name in getattr(config, key):
            if name not in known:
                out.append(ConfigWarning(None, "", key,
                                         f'"{name}" names no registered plugin: {consequence}{hint(name)}'))
    return out
