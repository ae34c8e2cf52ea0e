"""Per-request context shared by the gRPC and ttrpc servers: the namespace a call runs in and
the lease it works under.

Servers bind both from the request metadata before a handler runs; services read `namespace()`
(which raises FailedPrecondition when none was given, as containerd's NamespaceRequired does),
`namespace_or_default()`, and `lease()` (the `containerd-lease` header, or None).
"""
from __future__ import annotations

import contextvars
from typing import Iterable, Mapping

from . import errdefs

NAMESPACE_HEADER = "containerd-namespace"
TTRPC_NAMESPACE_HEADER = "containerd-namespace-ttrpc"
LEASE_HEADER = "containerd-lease"
DEFAULT_NAMESPACE = "default"

_namespace: contextvars.ContextVar[str | None] = contextvars.ContextVar("containerd_namespace", default=None)
_lease: contextvars.ContextVar[str | None] = contextvars.ContextVar("containerd_lease", default=None)

Metadata = Mapping[str, str | Iterable[str]] | Iterable[tuple[str, str]]


def _first_values(metadata: Metadata) -> dict[str, str]:
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    found: dict[str, str] = {}
    for key, value in items:
        if not isinstance(value, str):
            value = next(iter(value), "")
        found.setdefault(key.lower(), value)
    return found


def bind_request(metadata: Metadata) -> tuple[contextvars.Token, contextvars.Token]:
    """Bind the namespace and lease a request's metadata names; undo with `unbind_request`."""
    found = _first_values(metadata)
    ns = found.get(NAMESPACE_HEADER) or found.get(TTRPC_NAMESPACE_HEADER) or None
    return _namespace.set(ns), _lease.set(found.get(LEASE_HEADER) or None)


def unbind_request(tokens: tuple[contextvars.Token, contextvars.Token]) -> None:
    _namespace.reset(tokens[0])
    _lease.reset(tokens[1])


def lease() -> str | None:
    """The lease the request works under (`containerd-lease` header), or None."""
    return _lease.get()


def namespace() -> str:
    """The request's namespace; FailedPrecondition when the client sent none."""
    ns = _namespace.get()
    if not ns:
        raise errdefs.FailedPrecondition("namespace is required")
    return ns


def namespace_or_default() -> str:
    return _namespace.get() or DEFAULT_NAMESPACE
