"""Progress of a transfer: what the importers, pullers and pushers report (`Progress`), and a
terminal view of it (`TerminalProgress`: one line per blob with a bar, redrawn in place on
stderr ten times a second). `Progress()` itself records and shows nothing, so library callers
and piped commands stay quiet.
"""
from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, TextIO


@dataclass
class Job:
    key: str
    total: int = 0
    offset: int = 0
    status: str = "waiting"
    started: float = field(default_factory=time.monotonic)
    finished: Optional[float] = None


class Progress:
    """The reporting interface (a no-op). Keys are whatever names the caller shows (a ref key
    such as "layer-sha256:..." or a member name)."""

    def start(self, key: str, total: int = 0, status: str = "downloading") -> None:
        pass

    def advance(self, key: str, n: int) -> None:
        pass

    def set(self, key: str, offset: int) -> None:
        pass

    def finish(self, key: str, status: str = "done") -> None:
        pass

    def note(self, key: str, status: str) -> None:
        pass

    async def __aenter__(self) -> "Progress":
        return self

    async def __aexit__(self, *exc) -> None:
        pass


def human_size(n: float) -> str:
    """Sizes as ctr's progress prints them (base 1024, one decimal)."""
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.1f} {units[i]}"


def _short(key: str) -> str:
    """"layer-sha256:0123456789abcdef..." -> "layer-sha256:0123456789ab" (as docker shows ids)."""
    i = key.find("sha256:")
    if i >= 0 and len(key) >= i + 7 + 64:
        return key[:i + 7 + 12] + key[i + 7 + 64:]
    return key


class TerminalProgress(Progress):
    """Draws the jobs on a terminal; use as `async with` around the transfer."""

    def __init__(self, out: TextIO = sys.stderr, interval: float = 0.1, title: str = ""):
        self.out = out
        self.interval = interval
        self.title = title
        self.jobs: dict[str, Job] = {}
        self._lines = 0
        self._task: Optional[asyncio.Task] = None
        self._start = time.monotonic()

    @staticmethod
    def wanted(out: TextIO = sys.stderr, quiet: bool = False) -> bool:
        try:
            return not quiet and out.isatty()
        except (AttributeError, ValueError):
            return False

    def start(self, key: str, total: int = 0, status: str = "downloading") -> None:
        job = self.jobs.get(key)
        if job is None:
            self.jobs[key] = Job(key, total, 0, status)
        else:
            job.total, job.status, job.finished = total or job.total, status, None

    def advance(self, key: str, n: int) -> None:
        job = self.jobs.get(key)
        if job is not None:
            job.offset += n

    def set(self, key: str, offset: int) -> None:
        job = self.jobs.get(key)
        if job is not None:
            job.offset = offset

    def finish(self, key: str, status: str = "done") -> None:
        job = self.jobs.get(key)
        if job is None:
            job = self.jobs[key] = Job(key)
        job.status = status
        job.finished = time.monotonic()
        if job.total:
            job.offset = job.total

    def note(self, key: str, status: str) -> None:
        job = self.jobs.get(key)
        if job is None:
            self.jobs[key] = Job(key, status=status)
        else:
            job.status = status

    def render(self) -> list[str]:
        width = shutil.get_terminal_size((100, 20)).columns
        lines = []
        names = {k: _short(k) for k in self.jobs}
        keyw = min(max((len(n) for n in names.values()), default=10), max(width // 2, 20))
        for job in self.jobs.values():
            key = names[job.key]
            key = key if len(key) <= keyw else key[:keyw - 1] + "…"
            head = f"{key:<{keyw}} {job.status:<11}"
            if job.total and job.status not in ("done", "exists", "already exists"):
                frac = min(job.offset / job.total, 1.0)
                barw = max(width - len(head) - 30, 10)
                filled = int(barw * frac)
                bar = "|" + "+" * filled + "-" * (barw - filled) + "|"
                lines.append(f"{head} {bar} {human_size(job.offset)}/{human_size(job.total)}")
            else:
                lines.append(f"{head} {human_size(job.total) if job.total else ''}".rstrip())
        elapsed = time.monotonic() - self._start
        lines.append(f"elapsed: {elapsed:.1f} s" + (f"  {self.title}" if self.title else ""))
        return [line[:width - 1] for line in lines]

    def draw(self) -> None:
        lines = self.render()
        buf = []
        if self._lines:
            buf.append(f"\x1b[{self._lines}A")
        for line in lines:
            buf.append("\x1b[2K" + line + "\n")
        self._lines = len(lines)
        with contextlib.suppress(OSError, ValueError):
            self.out.write("".join(buf))
            self.out.flush()

    async def _loop(self) -> None:
        while True:
            self.draw()
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> "TerminalProgress":
        self._start = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self

    async def __aexit__(self, *exc) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.draw()
