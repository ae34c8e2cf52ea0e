"""Loading config.toml as containerd does: read the file, check its version, migrate version 1,
follow `imports` (and theirs), merge everything into one Config.

Merge rules, file after file in load order (the main file, then its imports in order, then their
imports, each file once):
- a scalar (root, oom_score, ...) or a key of [grpc]/[ttrpc]/[debug]/[metrics]/[cgroup] that a
  later file sets replaces the earlier value. (containerd's mergo ignores a later *zero* value,
  e.g. `oom_score = 0`; here every key a file sets counts.)
- disabled_plugins, required_plugins, plugin_modules: later lists are appended, duplicates dropped.
- timeouts, proxy_plugins, stream_processors, plugins: merged by key, and the value under a key is
  replaced whole: a later [plugins."io.containerd.grpc.v1.cri"] replaces the earlier table for
  that plugin entirely, as in containerd 1.6.
After loading, `imports` holds the absolute paths of the imported files in load order.

Reads files; never writes, never logs: problems are returned as ConfigWarning or raised as
ConfigError.
"""
from __future__ import annotations

import glob
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import tomli

from .errors import ConfigError, ConfigWarning, child_path
from .durations import parse_duration
from .migrate import v1_plugin_uri
from .model import (CONFIG_VERSION, DEFAULT_CONFIG_PATH, LOG_FORMATS, LOG_LEVELS, PROXY_PLUGIN_TYPES,
                    Config)
from .typed import (Reject, Sink, convert, decode_present, describe_value, field_types,
                    is_dataclass_type, rejected_message, toml_fields, unknown_key_message)


@dataclass
class LoadResult:
    """The merged config, every warning met while loading, and the files read, in load order."""

    config: Config
    warnings: list[ConfigWarning] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def load(path: str | os.PathLike | None = None, *, explicit: bool | None = None,
         registrations: Iterable[Any] = ()) -> LoadResult:
    """Load `path` (default /etc/pycontainerd/config.toml) with its imports.

    A missing file is an error when the path was given explicitly (`explicit` defaults to "a path
    was passed"), and means "all defaults" otherwise, as containerd does. `registrations`, when
    known, help name version 1 plugins exactly; without them containerd's rename table is used.
    Raises ConfigError for an unreadable file, bad TOML ("FILE:LINE:COL: message"), a version
    other than 1 or 2, or a version 2 plugin name that is not a "type.id" URI.
    """
    if explicit is None:
        explicit = path is not None
    main = Path(os.path.abspath(path if path is not None else DEFAULT_CONFIG_PATH))
    if not explicit and not main.exists():
        return LoadResult(Config())
    regs = list(registrations)
    config = Config()
    warnings: list[ConfigWarning] = []
    files: list[Path] = []
    pending: list[tuple[Path, Path | None]] = [(main, None)]
    while pending:
        file, parent = pending.pop(0)
        if file in files:  # imported twice, or an import cycle
            continue
        raw = read_toml(file, parent)
        files.append(file)
        sink = Sink(file, warnings)
        raw = _versioned(raw, file, sink, regs)
        present = _decode_file(raw, config, sink)
        _merge(config, present, file)
        pending += [(p, file) for p in resolve_imports(file, present.get("imports", []))]
    config.version = CONFIG_VERSION
    config.imports = [str(f) for f in files[1:]]
    return LoadResult(config, warnings, files)


def read_toml(file: Path, imported_by: Path | None = None) -> dict[str, Any]:
    """The parsed TOML document in `file`; ConfigError naming the file (and line/column) if not."""
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        by = f" (imported by {imported_by})" if imported_by else ""
        raise ConfigError(f"no such file{by}", file) from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror or e}", file) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError("not valid UTF-8", file, line, column) from None
    try:
        return tomli.loads(text)
    except tomli.TOMLDecodeError as e:
        msg = getattr(e, "msg", None) or str(e)
        raise ConfigError(msg, file, getattr(e, "lineno", None), getattr(e, "colno", None)) from None


def resolve_imports(file: Path, imports: list[str]) -> list[Path]:
    """`imports` of `file` as absolute paths: relative ones are relative to the file's directory;
    one holding "*" is a glob (sorted matches, files only; none is fine)."""
    out = []
    for entry in imports:
        target = os.path.normpath(os.path.join(file.parent, entry))
        if "*" in target:
            out += [Path(m) for m in sorted(glob.glob(target, include_hidden=True)) if os.path.isfile(m)]
        else:
            out.append(Path(target))
    return out


# ---- version ------------------------------------------------------------------------------------

_VERSIONED_KEYS = ("plugins", "disabled_plugins", "required_plugins")


def _versioned(raw: dict, file: Path, sink: Sink, regs: list[Any]) -> dict:
    """`raw` as a version 2 document: version checked, version 1 plugin names migrated."""
    if "version" in raw:
        version = raw["version"]
        if isinstance(version, bool) or not isinstance(version, int):
            raise ConfigError(f"version must be an integer, got {describe_value(version)}", file)
        if not 1 <= version <= CONFIG_VERSION:
            raise ConfigError(f"unsupported config version {version}: pycontainerd reads containerd 1.6 "
                              f"config versions 1 and 2", file)
    else:
        version = 1
    if version == CONFIG_VERSION:
        _check_v2_names(raw, file)
        return raw
    raw, renames = _migrate_v1(raw, sink, regs)
    if "version" in raw or any(k in raw for k in _VERSIONED_KEYS):
        said = "version 1" if "version" in raw else "no version key: read as version 1 (containerd's rule), which"
        msg = f"{said} is deprecated (containerd 2.0 no longer reads it); write version = 2"
        if renames:
            msg += " and name plugins by URI: " + ", ".join(f"{a} -> {b}" for a, b in renames.items())
        sink.warn("", "version", msg)
    return raw


def _migrate_v1(raw: dict, sink: Sink, regs: list[Any]) -> tuple[dict, dict[str, str]]:
    raw = dict(raw)
    renames: dict[str, str] = {}

    def rename(name: str, table: str, key: str) -> str:
        uri, guessed = v1_plugin_uri(name, regs)
        if uri != name:
            renames[name] = uri
            if guessed:
                sink.warn(table, key, f'"{name}" is not a known containerd plugin id; taken as "{uri}", '
                                      f'as containerd does')
        return uri

    plugins = raw.get("plugins")
    if isinstance(plugins, dict):
        migrated: dict[str, Any] = {}
        for name, table in plugins.items():
            uri = rename(name, "plugins", name)
            if uri != name and uri in plugins:
                sink.warn("plugins", name, f'also configured as "{uri}"; this table is ignored')
                continue
            migrated[uri] = table
        raw["plugins"] = migrated
    for key in ("disabled_plugins", "required_plugins"):
        names = raw.get(key)
        if isinstance(names, list):
            raw[key] = [rename(n, "", key) if isinstance(n, str) else n for n in names]
    return raw, renames


def _check_v2_names(raw: dict, file: Path) -> None:
    """containerd refuses a version 2 file that names a plugin by bare id; so do we."""
    plugins = raw.get("plugins")
    bad: list[tuple[str, str]] = []
    if isinstance(plugins, dict):
        bad += [("[plugins]", name) for name in plugins if "." not in name]
    for key in ("disabled_plugins", "required_plugins"):
        names = raw.get(key)
        if isinstance(names, list):
            bad += [(key, n) for n in names if isinstance(n, str) and "." not in n]
    if not bad:
        return
    where, name = bad[0]
    if name == "io":
        hint = 'quote names that hold dots: [plugins."io.containerd.grpc.v1.cri"]'
    else:
        hint = f'e.g. "{v1_plugin_uri(name)[0]}", or declare version = 1'
    raise ConfigError(f'invalid plugin URI "{name}" in {where}: version 2 names plugins by '
                      f'"type.id" ({hint})', file)


# ---- decoding and merging -----------------------------------------------------------------------

def _kind(tp: Any) -> str:
    if is_dataclass_type(tp):
        return "section"
    origin = typing.get_origin(tp) or tp
    if origin is list:
        return "list"
    if origin is dict:
        return "map"
    return "scalar"


_KINDS = {name: _kind(tp) for name, tp in field_types(Config).items()}


def _decode_file(raw: dict, config: Config, sink: Sink) -> dict[str, Any]:
    """The valid top-level keys of one file as {field: value}; a section as {field: value} too."""
    fields = toml_fields(Config)
    hints = field_types(Config)
    present: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "version":
            continue
        f = fields.get(key)
        if f is None:
            sink.warn("", key, unknown_key_message(key, fields))
            continue
        kind = _KINDS[f.name]
        current = getattr(config, f.name)
        if kind == "section":
            if not isinstance(value, dict):
                sink.warn("", key, rejected_message(Reject(f"expected a table, got {describe_value(value)}")))
                continue
            present[f.name] = decode_present(hints[f.name], value, current, sink, key)
            continue
        try:
            present[f.name] = convert(hints[f.name], value, None, sink, key)
        except Reject as e:
            sink.warn("", key, rejected_message(e, current) if kind == "scalar" else rejected_message(e))
    _validate(present, config, sink)
    return present


def _validate(present: dict[str, Any], config: Config, sink: Sink) -> None:
    """Values of the right type that containerd would still refuse: warn and drop them."""
    debug = present.get("debug", {})
    if "level" in debug and debug["level"].lower() not in LOG_LEVELS:
        sink.warn("debug", "level", f'unknown log level "{debug.pop("level")}" (use one of '
                                    f'{", ".join(LOG_LEVELS)}); ignored, keeping "{config.debug.level}"')
    if "format" in debug and debug["format"] not in LOG_FORMATS:
        sink.warn("debug", "format", f'unknown log format "{debug.pop("format")}" (use text or json); '
                                     f'ignored, keeping "{config.debug.format}"')
    for key, value in list(present.get("timeouts", {}).items()):
        try:
            parse_duration(value)
        except ValueError as e:
            del present["timeouts"][key]
            sink.warn("timeouts", key, f"{e}; ignored")
    for name, proxy in present.get("proxy_plugins", {}).items():
        if proxy.type not in PROXY_PLUGIN_TYPES:
            sink.warn(child_path("proxy_plugins", name), "type",
                      f'unknown proxy plugin type "{proxy.type}" (use "snapshot" or "content"); '
                      f"the plugin will not be registered")


def _merge(config: Config, present: dict[str, Any], file: Path) -> None:
    for name, value in present.items():
        kind = _KINDS[name]
        if name == "imports":
            continue  # followed by load(); config.imports is set once all files are read
        if kind == "scalar":
            setattr(config, name, value)
        elif kind == "list":
            merged = getattr(config, name)
            for v in value:
                if v not in merged:
                    merged.append(v)
        elif kind == "section":
            section = getattr(config, name)
            for k, v in value.items():
                setattr(section, k, v)
        else:
            getattr(config, name).update(value)
            if name == "plugins":
                config.plugin_files.update({uri: file for uri in value})
