"""Logging for the daemon: structlog in front, the standard library's logging underneath.

Owns the one place where log level, format and output stream are set (`configure`), and the
level names containerd accepts. It must not decide *what* anything logs: modules keep writing
`log = structlog.get_logger(__name__)` and `log.info("serving", address=...)`, and libraries that
use `logging` (grpclib, asyncio) come out through the same handler, format and level.

Levels are logrus' (containerd's `--log-level` / `[debug] level`), case-insensitive:
trace and debug -> DEBUG (Python has no TRACE), info, warn/warning, error, fatal and panic ->
CRITICAL. "" means info. Anything else is a ValueError naming the accepted ones.

Formats (containerd's `[debug] format`): "text" (or "") is logfmt like logrus' text formatter,
`time="2024-05-01T10:00:00.123456Z" level=info msg="serving" logger=pycontainerd.core.daemon
address=/run/...`; "json" is one object per line with "time", "level", "msg", "logger" and the
event's own keys. Exceptions appear under "exception".
"""
from __future__ import annotations

import logging
import sys
from typing import IO, Any

import structlog

LEVELS: dict[str, int] = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
    "panic": logging.CRITICAL,
}
FORMATS = ("text", "json")

_KEY_ORDER = ["time", "level", "msg", "logger"]

_handler: logging.Handler | None = None  # the handler configure() installed on the root logger


def parse_level(level: str | int) -> int:
    """The stdlib level number for a containerd level name (or a stdlib level number)."""
    if isinstance(level, int) and not isinstance(level, bool):
        return level
    if not isinstance(level, str):
        raise ValueError(f"invalid log level {level!r}: must be a string")
    name = level.strip().lower()
    if name == "":
        return logging.INFO
    try:
        return LEVELS[name]
    except KeyError:
        raise ValueError(
            f"invalid log level {level!r}: must be one of trace, debug, info, warn, error, fatal, panic"
        ) from None


def _shared_processors() -> list[Any]:
    """What every record goes through, from structlog or from stdlib logging, before rendering."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
        structlog.processors.StackInfoRenderer(),
    ]


def _renderer(fmt: str) -> list[Any]:
    tail: list[Any] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        structlog.processors.format_exc_info,
        structlog.processors.EventRenamer("msg"),
    ]
    if fmt == "json":
        tail.append(_order_keys)
        tail.append(structlog.processors.JSONRenderer(default=str))
    else:
        tail.append(structlog.processors.LogfmtRenderer(key_order=_KEY_ORDER, drop_missing=True,
                                                        bool_as_flag=False))
    return tail


def _order_keys(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    ordered = {k: event.pop(k) for k in _KEY_ORDER if k in event}
    ordered.update(event)
    return ordered


def configure(level: str | int = "info", fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Set the level, format ("text" or "json") and stream (default: sys.stderr) of all logging.

    May be called again (tests, reloads): the previous handler is replaced, handlers installed by
    others (pytest's capture, for instance) are left alone. Raises ValueError for an unknown level
    or format before changing anything.
    """
    global _handler
    number = parse_level(level)
    fmt_name = (fmt or "text").strip().lower()
    if fmt_name not in FORMATS:
        raise ValueError(f"invalid log format {fmt!r}: must be one of text, json")
    out = stream if stream is not None else sys.stderr

    shared = _shared_processors()
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        context_class=dict,
        cache_logger_on_first_use=False,
    )

    handler = logging.StreamHandler(out)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=_renderer(fmt_name),
    ))
    handler.set_name("pycontainerd")

    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(number)
    _handler = handler


def get_logger(name: str | None = None, **initial: Any) -> Any:
    """A structlog logger named `name` (shown as "logger"), with `initial` key-values bound."""
    logger = structlog.get_logger(name)
    return logger.bind(**initial) if initial else logger
