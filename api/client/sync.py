"""`SyncClient`: the async Client driven from plain synchronous code.

    with SyncClient(namespace="default") as client:
        client.namespaces.create("dev")
        for event in client.events.subscribe():
            ...

It owns a private event loop (asyncio.Runner) and mirrors the Client's API: coroutine methods
return their result, async iterators become ordinary iterators, sub-APIs are mirrored the same
way. Do not use it from inside a running event loop (use `Client` there).
"""
from __future__ import annotations

import asyncio
import functools
import inspect
from typing import Any, Iterator

from ._base import ServiceAPI
from .client import Client


class _Mirror:
    def __init__(self, target: Any, runner: asyncio.Runner):
        self._target = target
        self._runner = runner

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if isinstance(value, ServiceAPI):
            return _Mirror(value, self._runner)
        if inspect.isasyncgenfunction(value):
            @functools.wraps(value)
            def iterate(*args: Any, **kwargs: Any) -> Iterator[Any]:
                return _iterate(self._runner, value(*args, **kwargs))
            return iterate
        if inspect.iscoroutinefunction(value):
            @functools.wraps(value)
            def call(*args: Any, **kwargs: Any) -> Any:
                return self._runner.run(value(*args, **kwargs))
            return call
        return value

    def __repr__(self) -> str:
        return f"Sync{self._target!r}"


def _iterate(runner: asyncio.Runner, agen: Any) -> Iterator[Any]:
    try:
        while True:
            try:
                yield runner.run(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        runner.run(agen.aclose())


class SyncClient(_Mirror):
    """Same arguments as `Client`; call `close()` or use it as a context manager."""

    def __init__(self, *args: Any, **kwargs: Any):
        runner = asyncio.Runner()
        super().__init__(Client(*args, **kwargs), runner)

    def with_namespace(self, namespace: str) -> "_Mirror":
        return _Mirror(self._target.with_namespace(namespace), self._runner)

    def close(self) -> None:
        try:
            self._runner.run(self._target.close())
        finally:
            self._runner.close()

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
