"""`client.containers`: container records (create, get, list, update, labels, delete) in the
client's namespace, and `Container`, the plain record they return.

    c = await client.containers.create(Container(
        id="web", image="docker.io/library/busybox:latest",
        runtime=RuntimeInfo("io.containerd.runc.v2"), spec=oci.spec_any(spec)))
    await client.containers.set_labels("web", {"tier": "front"})

A record is metadata only: running it is `client.tasks` (see tasks.py); building a container
from an image (snapshot, spec, labels as ctr does) is `new_container` in run.py's terms,
exposed here as `ContainersAPI.new`. Owns nothing on the server side.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Optional

from betterproto.lib.google.protobuf import Any as AnyMessage
from betterproto.lib.google.protobuf import FieldMask

import betterproto

from pycontainerd.api.gen.containerd.services.containers import v1 as api
from pycontainerd.core import errdefs

from ._base import DEFAULT, ServiceAPI

SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
"""The type URL containerd's typeurl gives an OCI runtime spec (its value is the spec's JSON)."""


@dataclass
class RuntimeInfo:
    name: str
    options: Optional[AnyMessage] = None


@dataclass
class Container:
    """A container record as containerd keeps it. `spec` is the OCI spec packed in an Any
    (`spec_dict()` decodes it); `extensions` are client data, name -> Any."""

    id: str
    runtime: RuntimeInfo = field(default_factory=lambda: RuntimeInfo(""))
    spec: Optional[AnyMessage] = None
    labels: dict[str, str] = field(default_factory=dict)
    image: str = ""
    snapshotter: str = ""
    snapshot_key: str = ""
    extensions: dict[str, AnyMessage] = field(default_factory=dict)
    created_at: Optional[datetime] = None
    updated_at: Optional[datetime] = None

    @classmethod
    def from_proto(cls, pb: api.Container) -> "Container":
        runtime = pb.runtime
        options = runtime.options if runtime is not None and betterproto.serialized_on_wire(runtime.options) else None
        spec = pb.spec if pb.spec is not None and betterproto.serialized_on_wire(pb.spec) else None
        return cls(
            id=pb.id, labels=dict(pb.labels), image=pb.image,
            runtime=RuntimeInfo(runtime.name if runtime is not None else "", options),
            spec=spec, snapshotter=pb.snapshotter, snapshot_key=pb.snapshot_key,
            extensions=dict(pb.extensions),
            created_at=_ts(pb.created_at), updated_at=_ts(pb.updated_at))

    def to_proto(self) -> api.Container:
        pb = api.Container(id=self.id, labels=dict(self.labels), image=self.image,
                           runtime=api.ContainerRuntime(name=self.runtime.name),
                           snapshotter=self.snapshotter, snapshot_key=self.snapshot_key,
                           extensions=dict(self.extensions))
        if self.runtime.options is not None:
            pb.runtime.options = _on_wire(self.runtime.options)
        if self.spec is not None:
            pb.spec = _on_wire(self.spec)
        return pb

    def spec_dict(self) -> Optional[dict]:
        """The OCI runtime spec as a dict, or None when the record has none."""
        if self.spec is None or not self.spec.value:
            return None
        return json.loads(self.spec.value)

    def to_dict(self) -> dict:
        """The record as `ctr containers info` prints it (Go field names; the spec decoded)."""
        out: dict[str, Any] = {
            "ID": self.id,
            "Labels": dict(sorted(self.labels.items())) or None,
            "Image": self.image,
            "Runtime": {"Name": self.runtime.name,
                        "Options": _any_json(self.runtime.options)},
            "SnapshotKey": self.snapshot_key,
            "Snapshotter": self.snapshotter,
            "CreatedAt": _go_rfc3339nano(self.created_at),
            "UpdatedAt": _go_rfc3339nano(self.updated_at),
            "Extensions": {k: _any_json(v) for k, v in sorted(self.extensions.items())} or None,
        }
        spec = self.spec_dict() if self.spec is not None and self.spec.type_url.endswith("/Spec") else None
        if spec is not None:
            out["Spec"] = spec
        elif self.spec is not None:
            out["Spec"] = _any_json(self.spec)
        return out


def _on_wire(msg: AnyMessage) -> AnyMessage:
    """A copy that is serialized even when empty (Go clients send a set-but-empty Any too)."""
    copy = AnyMessage(type_url=msg.type_url, value=bytes(msg.value))
    copy._serialized_on_wire = True
    return copy


def _any_json(msg: Optional[AnyMessage]) -> Optional[dict]:
    if msg is None:
        return None
    out: dict[str, str] = {}
    if msg.type_url:
        out["type_url"] = msg.type_url
    if msg.value:
        out["value"] = base64.b64encode(bytes(msg.value)).decode()
    return out


def _ts(value: Optional[datetime]) -> Optional[datetime]:
    if value is None or value == datetime(1970, 1, 1, tzinfo=timezone.utc):
        return None
    return value


def _go_rfc3339nano(ts: Optional[datetime]) -> str:
    if ts is None:
        return "0001-01-01T00:00:00Z"
    ts = ts.astimezone(timezone.utc)
    frac = f"{ts.microsecond:06d}".rstrip("0")
    return ts.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


class ContainersAPI(ServiceAPI):
    stub_class = api.ContainersStub

    async def create(self, container: Container, *, timeout: Any = DEFAULT) -> Container:
        """Store a new record (AlreadyExists when the id is taken)."""
        req = api.CreateContainerRequest(container=container.to_proto())
        return Container.from_proto((await self._unary("create", req, timeout=timeout)).container)

    async def get(self, id: str, *, timeout: Any = DEFAULT) -> Container:
        resp = await self._unary("get", api.GetContainerRequest(id=id), timeout=timeout)
        return Container.from_proto(resp.container)

    async def list(self, filters: Iterable[str] = (), *, timeout: Any = DEFAULT) -> list[Container]:
        """Records matching any of `filters` (e.g. "labels.tier==web", "image==x"), in id order.
        Uses ListStream, falling back to List on daemons without it (as containerd's client)."""
        req = api.ListContainersRequest(filters=list(filters))
        try:
            return [Container.from_proto(m.container)
                    async for m in self._stream("list_stream", req, timeout=None if timeout is DEFAULT else timeout)]
        except errdefs.Unimplemented:
            resp = await self._unary("list", req, timeout=timeout)
            return [Container.from_proto(c) for c in resp.containers]

    async def update(self, container: Container, paths: Iterable[str] = (), *,
                     timeout: Any = DEFAULT) -> Container:
        """Apply the field paths of `container` (labels, labels.KEY, spec, extensions,
        extensions.KEY, image, snapshotkey); no paths replaces those fields."""
        paths = list(paths)
        req = api.UpdateContainerRequest(container=container.to_proto(),
                                         update_mask=FieldMask(paths=paths) if paths else None)
        return Container.from_proto((await self._unary("update", req, timeout=timeout)).container)

    async def set_labels(self, id: str, labels: Mapping[str, str], *, timeout: Any = DEFAULT) -> dict[str, str]:
        """Set the given labels (an empty value removes one); returns all labels afterwards."""
        labels = dict(labels)
        if not labels:
            return (await self.get(id, timeout=timeout)).labels
        updated = await self.update(Container(id=id, labels=labels), [f"labels.{k}" for k in labels],
                                    timeout=timeout)
        return updated.labels

    async def labels(self, id: str, *, timeout: Any = DEFAULT) -> dict[str, str]:
        return (await self.get(id, timeout=timeout)).labels

    async def delete(self, id: str, *, timeout: Any = DEFAULT) -> None:
        """Remove the record only (its task and snapshot are the caller's, see `remove`)."""
        await self._unary("delete", api.DeleteContainerRequest(id=id), timeout=timeout)

    async def set_spec(self, id: str, spec: Mapping[str, Any], *, timeout: Any = DEFAULT) -> Container:
        """Replace the record's OCI spec with `spec` (a dict)."""
        return await self.update(Container(id=id, spec=spec_any(spec)), ["spec"], timeout=timeout)


def spec_any(spec: Mapping[str, Any]) -> AnyMessage:
    """An OCI runtime spec (dict) packed as containerd packs it: JSON under SPEC_TYPE_URL."""
    return AnyMessage(type_url=SPEC_TYPE_URL,
                      value=json.dumps(spec, separators=(",", ":"), ensure_ascii=False).encode())


def with_runtime(container: Container, name: str, options: Optional[AnyMessage] = None) -> Container:
    return replace(container, runtime=RuntimeInfo(name, options))
