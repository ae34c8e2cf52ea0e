"""Output and argument helpers for pyctr: a port of Go's text/tabwriter (so tables line up exactly
as the stock ctr's do), Go duration parsing ("24h", "1h30m", "500ms"), `k=v` label arguments and
JSON printing. No client calls here.
"""
from __future__ import annotations

import json
import re
import sys
from typing import Any, Iterable, Optional, TextIO


class TabWriter:
    """Go's tabwriter.Writer with flags 0 (left-aligned, padded with `padchar`).

    Cells are tab-terminated; the text after a line's last tab is not part of any column. Column
    widths are computed per column block (consecutive lines that have that cell), each cell
    padded to max(minwidth, widest cell + padding). Call `flush()` to write.
    """

    def __init__(self, out: Optional[TextIO] = None, minwidth: int = 0, tabwidth: int = 8,
                 padding: int = 1, padchar: str = " "):
        self.out = out if out is not None else sys.stdout
        self.minwidth, self.tabwidth, self.padding, self.padchar = minwidth, tabwidth, padding, padchar
        self._text: list[str] = []

    def write(self, text: str) -> None:
        self._text.append(text)

    def println(self, *parts: Any) -> None:
        """fmt.Fprintln: operands joined by a space, then a newline."""
        self.write(" ".join(str(p) for p in parts) + "\n")

    def row(self, *cells: Any) -> None:
        """One tab-terminated row, as ctr's `fmt.Fprintf(w, "%s\\t%s\\t\\n", ...)`."""
        self.write("".join(f"{c}\t" for c in cells) + "\n")

    def flush(self) -> None:
        self.out.write(self.render())
        self.out.flush()
        self._text = []

    def render(self) -> str:
        text = "".join(self._text)
        lines = [line.split("\t") for line in text.split("\n")]
        out: list[str] = []
        self._format(out, lines, [], 0, len(lines))
        return "".join(out)

    def _format(self, out: list[str], lines: list[list[str]], widths: list[int],
                line0: int, line1: int) -> None:
        column = len(widths)
        this = line0
        while this < line1:
            if column >= len(lines[this]) - 1:
                this += 1
                continue
            # A column block starts here: print the lines before it with the current widths.
            self._write_lines(out, lines, widths, line0, this)
            line0 = this
            width = self.minwidth
            while this < line1 and column < len(lines[this]) - 1:
                width = max(width, len(lines[this][column]) + self.padding)
                this += 1
            self._format(out, lines, widths + [width], line0, this)
            line0 = this
        self._write_lines(out, lines, widths, line0, line1)

    def _write_lines(self, out: list[str], lines: list[list[str]], widths: list[int],
                     line0: int, line1: int) -> None:
        for i in range(line0, line1):
            for j, cell in enumerate(lines[i]):
                out.append(cell)
                if j < len(widths) and j < len(lines[i]) - 1:
                    out.append(self.padchar * (widths[j] - len(cell)))
            if i + 1 < len(lines):
                out.append("\n")


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0,
                   "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds in a Go duration ("24h", "1h30m", "1.5s", "300ms", "0"); ValueError otherwise.
    A bare number is taken as seconds."""
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    sign = 1.0
    if s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    try:
        return sign * float(s)
    except ValueError:
        pass
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if not m:
            raise ValueError(f'invalid duration "{text}"')
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def go_duration(seconds: float) -> str:
    """Go's Duration.String() for whole seconds and up, e.g. 86400 -> "24h0m0s"."""
    if seconds == 0:
        return "0s"
    whole = int(seconds)
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    frac = seconds - whole
    sec = f"{s + frac:g}s"
    if h:
        return f"{h}h{m}m{sec}"
    if m:
        return f"{m}m{sec}"
    return sec


def label_args(args: Iterable[str], bare_value: str = "true") -> dict[str, str]:
    """`k=v` arguments as a dict; a bare `k` gets `bare_value` (ctr's LabelArgs uses "true",
    `ctr leases create` uses "")."""
    labels: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        labels[key] = value if sep else bare_value
    return labels


def print_json(value: Any, out: Optional[TextIO] = None) -> None:
    out = out if out is not None else sys.stdout
    out.write(json.dumps(value, indent=2, sort_keys=False, default=str) + "\n")
    out.flush()
