"""The two ways config reading reports trouble: ConfigError (cannot go on) and ConfigWarning
(a key was ignored; the daemon logs it and goes on). Also how TOML key paths are spelled in them.

Owns no I/O and knows no config keys.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_key(key: str) -> str:
    """A key as TOML writes it: bare when it may be, else quoted ("io.containerd.grpc.v1.cri")."""
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def child_path(table: str, key: str) -> str:
    """The dotted TOML path of `key` inside `table` ("" is the top level)."""
    return f"{table}.{toml_key(key)}" if table else toml_key(key)


class ConfigError(ValueError):
    """The config cannot be used: unreadable file, bad TOML, unsupported version, bad plugin URI.

    str() is "FILE:LINE:COL: message", "FILE: message" when no position is known, or just the
    message when no file is involved.
    """

    def __init__(self, message: str, file: str | Path | None = None,
                 line: int | None = None, column: int | None = None):
        self.message = message
        self.file = Path(file) if file is not None else None
        self.line = line
        self.column = column
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.file is None:
            return self.message
        where = str(self.file)
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class ConfigWarning:
    """One ignored or doubtful setting.

    file: the file it came from, when known. table: the TOML path of the table holding it
    ("" for the top level, 'plugins."io.containerd.gc.v1.scheduler".sub' for a plugin's
    sub-table). key: the key inside that table ("" when the warning is about the table itself).
    """

    file: Path | None
    table: str
    key: str
    message: str

    @property
    def where(self) -> str:
        """The setting's full dotted path, e.g. grpc.adress."""
        return child_path(self.table, self.key) if self.key else self.table

    def __str__(self) -> str:
        parts = [str(self.file)] if self.file is not None else []
        if self.where:
            parts.append(self.where)
        parts.append(self.message)
        return ": ".join(parts)
