"""Plain result types the client library returns: small frozen dataclasses, not generated messages.

They decouple users from the generated betterproto modules (which may be regenerated or grow
fields) and carry the few helpers the CLI needs (`Plugin.status`, `to_dict()` for JSON output).
Each has a `from_proto()` that reads a generated message; nothing here talks to a server.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

# grpc-go's codes.Code names, which `ctr plugins ls -d` prints for a plugin's init error.
GRPC_CODE_NAMES = {
    0: "OK", 1: "Canceled", 2: "Unknown", 3: "InvalidArgument", 4: "DeadlineExceeded",
    5: "NotFound", 6: "AlreadyExists", 7: "PermissionDenied", 8: "ResourceExhausted",
    9: "FailedPrecondition", 10: "Aborted", 11: "OutOfRange", 12: "Unimplemented",
    13: "Internal", 14: "Unavailable", 15: "DataLoss", 16: "Unauthenticated",
}

# The text containerd's plugin.ErrSkipPlugin carries; a plugin whose init error contains it was
# skipped (not applicable here) rather than broken.
SKIP_PLUGIN_TEXT = "skip plugin"


def rfc3339(ts: Optional[datetime]) -> str:
    """`ts` in local time as Go's time.RFC3339 formats it ("2006-01-02T15:04:05Z07:00")."""
    if ts is None:
        return ""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    local = ts.astimezone()
    offset = local.utcoffset()
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    if not offset:
        return text + "Z"
    minutes = int(offset.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    minutes = abs(minutes)
    return f"{text}{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def _labels(labels: Any) -> dict[str, str]:
    return dict(sorted((labels or {}).items()))


@dataclass(frozen=True)
class Version:
    version: str
    revision: str

    @classmethod
    def from_proto(cls, msg: Any) -> "Version":
        return cls(version=msg.version, revision=msg.revision)

    def to_dict(self) -> dict:
        return {"version": self.version, "revision": self.revision}


@dataclass(frozen=True)
class ServerInfo:
    """Introspection.Server: the daemon's UUID, plus pid/pidns/deprecations when the server
    speaks containerd 1.7's richer response (0 / empty otherwise)."""

    uuid: str
    pid: int = 0
    pidns: int = 0
    deprecations: tuple = ()

    @classmethod
    def from_proto(cls, msg: Any) -> "ServerInfo":
        deprecations = tuple(
            {"id": getattr(d, "id", ""), "message": getattr(d, "message", "")}
            for d in getattr(msg, "deprecations", None) or ()
        )
        return cls(uuid=msg.uuid, pid=int(getattr(msg, "pid", 0) or 0),
                   pidns=int(getattr(msg, "pidns", 0) or 0), deprecations=deprecations)

    def to_dict(self) -> dict:
        return {"uuid": self.uuid, "pid": self.pid, "pidns": self.pidns,
                "deprecations": list(self.deprecations)}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        """containerd's platforms.Format: "os/arch[/variant]", "unknown" without an OS."""
        if not self.os:
            return "unknown"
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class PluginError:
    code: int
    message: str

    @property
    def code_name(self) -> str:
        return GRPC_CODE_NAMES.get(self.code, f"Code({self.code})")


@dataclass(frozen=True)
class Plugin:
    type: str
    id: str
    requires: tuple[str, ...] = ()
    platforms: tuple[Platform, ...] = ()
    exports: dict[str, str] = field(default_factory=dict)
    capabilities: tuple[str, ...] = ()
    init_err: Optional[PluginError] = None

    @classmethod
    def from_proto(cls, msg: Any) -> "Plugin":
        err = None
        # An unset init_err decodes as a default Status; containerd only sets it on failure.
        if msg.init_err is not None and (msg.init_err.code or msg.init_err.message):
            err = PluginError(code=msg.init_err.code, message=msg.init_err.message)
        return cls(
            type=msg.type,
            id=msg.id,
            requires=tuple(msg.requires),
            platforms=tuple(Platform(p.os, p.architecture, p.variant) for p in msg.platforms),
            exports=dict(sorted(msg.exports.items())),
            capabilities=tuple(msg.capabilities),
            init_err=err,
        )

    @property
    def status(self) -> str:
        """"ok", "skip" (the plugin declined: ErrSkipPlugin) or "error", as `ctr plugins ls`."""
        if self.init_err is None:
            return "ok"
        return "skip" if SKIP_PLUGIN_TEXT in self.init_err.message else "error"

    @property
    def platform_names(self) -> list[str]:
        return sorted({str(p) for p in self.platforms})

    def to_dict(self) -> dict:
        return {
            "type": self.type,
            "id": self.id,
            "requires": list(self.requires),
            "platforms": self.platform_names,
            "exports": dict(self.exports),
            "capabilities": list(self.capabilities),
            "status": self.status,
            "error": None if self.init_err is None else {
                "code": self.init_err.code_name, "message": self.init_err.message},
        }


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, msg: Any) -> "Namespace":
        return cls(name=msg.name, labels=_labels(msg.labels))

    def to_dict(self) -> dict:
        return {"name": self.name, "labels": dict(self.labels)}


@dataclass(frozen=True)
class Lease:
    id: str
    created_at: Optional[datetime] = None
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, msg: Any) -> "Lease":
        return cls(id=msg.id, created_at=msg.created_at, labels=_labels(msg.labels))

    def to_dict(self) -> dict:
        return {"id": self.id, "created_at": rfc3339(self.created_at), "labels": dict(self.labels)}


@dataclass(frozen=True)
class LeaseResource:
    """A resource a lease holds: `type` is e.g. "content", "snapshots/overlayfs", "ingests"."""

    id: str
    type: str

    @classmethod
    def from_proto(cls, msg: Any) -> "LeaseResource":
        return cls(id=msg.id, type=msg.type)

    def to_dict(self) -> dict:
        return {"id": self.id, "type": self.type}


@dataclass(frozen=True)
class Envelope:
    """One event as the events service streams it.

    `event` is the decoded payload (a generated message such as containerd.events.NamespaceCreate)
    or None when its type is not known here; `type_url` and `value` always hold the raw Any.
    """

    timestamp: Optional[datetime]
    namespace: str
    topic: str
    type_url: str = ""
    value: bytes = b""
    event: Any = None

    def payload_dict(self) -> Optional[dict]:
        """The payload as a dict with proto field names (what `ctr events` prints as JSON)."""
        if self.event is None:
            return None
        import betterproto

        return self.event.to_dict(casing=betterproto.Casing.SNAKE)

    def to_dict(self) -> dict:
        ts = self.timestamp
        return {
            "timestamp": ts.isoformat() if ts is not None else None,
            "namespace": self.namespace,
            "topic": self.topic,
            "type_url": self.type_url,
            "event": self.payload_dict(),
        }
