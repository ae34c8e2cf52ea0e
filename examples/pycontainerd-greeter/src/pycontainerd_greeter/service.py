"""The greeter's business logic in plain Python: it makes greetings, counts them per containerd
namespace and keeps those counts in one JSON file under the plugin's root. It knows nothing of
gRPC (server.py adapts it) nor of the daemon (plugin.py builds it from the plugin's config).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from pycontainerd.core import errdefs

MAX_NAME = 256


class Greeter:
    """Greets with a fixed greeting and counts greetings per namespace.

    `greet` and `stats` run on the event loop and do no I/O; `load` and `save` touch the disk and
    are meant for a worker thread (plugin.py runs them with asyncio.to_thread).
    """

    def __init__(self, greeting: str, shout: bool = False, path: Path | None = None):
        if not greeting.strip():
            raise errdefs.InvalidArgument("greeting must not be empty")
        self.greeting = greeting
        self.shout = shout
        self.path = path
        self.calls: dict[str, int] = {}

    def greet(self, namespace: str, name: str) -> tuple[str, int]:
        """The greeting for `name`, and `namespace`'s call count including this call."""
        name = name.strip()
        if not name:
            raise errdefs.InvalidArgument("name must not be empty")
        if len(name) > MAX_NAME:
            raise errdefs.InvalidArgument(f"name is longer than {MAX_NAME} characters")
        if not name.isprintable():
            raise errdefs.InvalidArgument("name must not contain control characters")
        message = f"{self.greeting}, {name}!"
        if self.shout:
            message = message.upper()
        count = self.calls.get(namespace, 0) + 1
        self.calls[namespace] = count
        return message, count

    def stats(self) -> tuple[dict[str, int], int]:
        """A copy of the counts per namespace, and their total."""
        return dict(self.calls), sum(self.calls.values())

    def load(self) -> None:
        """Read the counts a previous run saved; a missing file means none yet."""
        if self.path is None:
            return
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read greeter counts {self.path}: {e}") from e
        calls = data.get("calls") if isinstance(data, dict) else None
        if not isinstance(calls, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in calls.items()):
            raise ValueError(f"greeter counts {self.path} are malformed")
        self.calls = dict(calls)

    def save(self) -> None:
        """Write the counts atomically: a temp file in the same directory, fsync, rename."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".calls-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"calls": self.calls}, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
