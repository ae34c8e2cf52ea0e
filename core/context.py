"""Per-request context shared by the gRPC and ttrpc servers: the namespace a call runs in.

Servers call `bind_request(metadata)` before a handler runs; services read `namespace()` (which
raises FailedPrecondition when none was given, as containerd's namespaces.NamespaceRequired does)
or `namespace_or_default()`.
"""
from __future__ import annotations

import contextvars
from typing import Iterable, Mapping

from . import errdefs

NAMESPACE_HEADER = "containerd-namespace"
TTRPC_NAMESPACE_HEADER = "containerd-namespace-ttrpc"
DEFAULT_NAMESPACE = "default"

_namespace: contextvars.ContextVar[str | None] = contextvars.ContextVar("containerd_namespace", default=None)


def namespace_from_metadata(metadata: Mapping[str, str | Iterable[str]] | Iterable[tuple[str, str]]) -> str | None:
    """The namespace named by request metadata (gRPC header, then the ttrpc key), or None."""
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    found: dict[str, str] = {}
    for key, value in items:
        if not isinstance(value, str):
            value = next(iter(value), "")
        found.setdefault(key.lower(), value)
    return found.get(NAMESPACE_HEADER) or found.get(TTRPC_NAMESPACE_HEADER) or None


def bind_namespace(ns: str | None) -> contextvars.Token:
    return _namespace.set(ns)


def reset_namespace(token: contextvars.Token) -> None:
    _namespace.reset(token)


def namespace() -> str:
    """The request's namespace; FailedPrecondition when the client sent none."""
    ns = _namespace.get()
    if not ns:
        raise errdefs.FailedPrecondition("namespace is required")
    return ns


def namespace_or_default() -> str:
    return _namespace.get() or DEFAULT_NAMESPACE
