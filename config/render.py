"""Writing config.toml: `default_toml` (what `pycontainerd config default` prints) and
`dump_toml` (`config dump`: the effective merged config). Returns text; printing is the caller's.
"""
from __future__ import annotations

from typing import Any, Iterable

import tomli_w

from .errors import ConfigError
from .model import CONFIG_VERSION, Config
from .plugins import plugin_config
from .typed import encode


def dump_toml(config: Config, registrations: Iterable[Any]) -> str:
    """`config` as a complete version 2 config.toml: every top-level key, and under
    [plugins."type.id"] each registered plugin's effective config (its table over its defaults;
    unknown keys dropped). Tables naming no registered plugin are kept as written.

    The text is self-contained: what the imported files set is merged in, so it says
    `imports = []` (config.imports, and LoadResult.files, still tell which files were read).
    """
    doc = encode(config)
    doc["version"] = CONFIG_VERSION
    doc["imports"] = []
    plugins: dict[str, Any] = {}
    regs = {r.uri: r for r in registrations}
    for uri, table in config.plugins.items():
        if uri not in regs:
            plugins[uri] = table
    for uri, reg in regs.items():
        if reg.config is None:
            continue
        try:
            plugins[uri] = encode(plugin_config(config, reg), f'plugins."{uri}"')
        except TypeError as e:
            raise ConfigError(f"plugin {uri}: config cannot be written as TOML: {e}") from None
    doc["plugins"] = dict(sorted(plugins.items()))
    doc["timeouts"] = dict(sorted(doc["timeouts"].items()))
    return tomli_w.dumps(doc)


def default_toml(registrations: Iterable[Any]) -> str:
    """The complete default config.toml: every top-level key and every plugin's defaults."""
    return dump_toml(Config(), registrations)
