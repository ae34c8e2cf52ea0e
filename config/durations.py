"""Go duration strings ("5s", "1m30s", "500ms", "-1.5h") as containerd's [timeouts] uses them,
and the `timeout(config, key)` lookup with containerd's fallbacks.
"""
from __future__ import annotations

import re
from typing import Any

from .errors import ConfigError, child_path

# Seconds per unit, as Go's time.ParseDuration accepts them (both micro signs included).
_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")

# What containerd's timeout.Get answers for a key nobody set.
FALLBACK_TIMEOUT = "1s"


def parse_duration(text: str) -> float:
    """Seconds in a Go duration string; ValueError when it is not one.

    Like Go: an optional sign, then one or more number+unit parts; "0" alone needs no unit.
    """
    if not isinstance(text, str):
        raise ValueError(f"invalid duration {text!r}: not a string")
    s = text
    sign = 1.0
    if s[:1] in ("+", "-"):
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f'invalid duration "{text}"')
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            if re.match(r"(\d+(?:\.\d*)?|\.\d+)", s[pos:]):
                raise ValueError(f'invalid duration "{text}": missing or unknown unit '
                                 f'(use ns, us, ms, s, m or h)')
            raise ValueError(f'invalid duration "{text}"')
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def timeout(config: Any, key: str) -> float:
    """The [timeouts] entry `key` in seconds.

    A key absent from the config falls back to containerd 1.6's default for it, then to 1s
    (containerd's timeout.DefaultTimeout). A value that is not a Go duration is a ConfigError.
    """
    from .model import DEFAULT_TIMEOUTS

    value = config.timeouts.get(key)
    if value is None:
        value = DEFAULT_TIMEOUTS.get(key, FALLBACK_TIMEOUT)
    try:
        return parse_duration(value)
    except ValueError as e:
        raise ConfigError(f"{child_path('timeouts', key)}: {e}") from None
