"""`client.containers`: container records (create, get, list, update, labels, delete) in the
client's namespace, and `Container`, the plain record they return.

    c = await client.containers.create(Container(
        id="web", image="docker.io/library/busybox:latest",
        runtime=RuntimeInfo("io.containerd.runc.v2"), spec=oci.spec_any(spec)))
    await client.containers.set_labels("web", {"tier": "front"})

A record is metadata only: running it is `client.tasks` (see tasks.py). `new_container(...)`
builds one from an image as ctr does (unpack if needed, snapshot prepared under a lease,
labels, spec from oci.py); `remove_container(...)` deletes one with its snapshot, refusing while
it has a task. Owns nothing on the server side.
"""
from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass, field
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


# -- containers from images, as ctr makes them -------------------------------------------------

DEFAULT_RUNTIME = "io.containerd.runc.v2"
RUNC_V2 = "io.containerd.runc.v2"
RUNC_OPTIONS_TYPE_URL = "containerd.runc.v1.Options"


def runc_options(binary_name: str = "", root: str = "", systemd_cgroup: bool = False) -> AnyMessage:
    """runc's runtime options (containerd.runc.v1.Options) packed as ctr packs them for
    io.containerd.runc.v2 (an empty message unless something is set)."""
    from pycontainerd.api.gen.containerd.runc import v1 as runc_api

    opts = runc_api.Options(binary_name=binary_name, root=root, systemd_cgroup=systemd_cgroup)
    return _on_wire(AnyMessage(type_url=RUNC_OPTIONS_TYPE_URL, value=bytes(opts)))


def _valid_label(key: str, value: str) -> bool:
    from pycontainerd.core import identifiers

    try:
        identifiers.validate_label(key, value)
        return True
    except errdefs.InvalidArgument:
        return False


SpecBuilder = Any
"""A list of oci SpecOpts applied after the defaults and the image config, or a callable
`(image_config: Optional[oci.ImageConfig]) -> list[SpecOpt]` giving the whole list."""


async def new_container(client: Any, container_id: str, *, image: str = "", rootfs: str = "",
                        spec_opts: SpecBuilder = (), labels: Optional[Mapping[str, str]] = None,
                        runtime: str = DEFAULT_RUNTIME, runtime_options: Optional[AnyMessage] = None,
                        snapshotter: str = "", snapshot_labels: Optional[Mapping[str, str]] = None,
                        platform: str = "", unpack: bool = True) -> Container:
    """Create container `container_id` the way `ctr run`/`ctr containers create` does.

    From `image` (a name in the images service): the image is unpacked into `snapshotter` if it
    is not yet; an active snapshot named after the container is prepared on its top layer under
    a temporary lease (24h, deleted once the record holds the snapshot); labels are the image
    config's, the image record's, `labels`, and the stop signal label; the spec is containerd's
    default with the default devices, then `spec_opts` (see SpecBuilder), generated against the
    snapshot (for users and groups). With `rootfs` (an absolute host path) instead, no image and
    no snapshot are involved and the labels are just `labels`.

    On failure nothing is left behind but what the lease held (collected with it)."""
    from . import oci
    from .transfer import platforms as plat
    from .transfer.unpack import DEFAULT_SNAPSHOTTER, chain_ids, resolve_image
    from .transfer.unpack import unpack as unpack_image
    from .transfer._services import Services
    from .transfer.mediatypes import Descriptor

    if bool(image) == bool(rootfs):
        raise errdefs.InvalidArgument("exactly one of image and rootfs must be given")
    ctx = oci.SpecContext(namespace=client.namespace, id=container_id)
    record = Container(id=container_id, runtime=RuntimeInfo(runtime, runtime_options))

    def build(image_config: Optional["oci.ImageConfig"]) -> list:
        if callable(spec_opts):
            return list(spec_opts(image_config))
        base = [oci.with_default_unix_devices]
        if image_config is not None:
            base.append(oci.with_image_config(image_config))
        else:
            base.append(oci.with_rootfs_path(rootfs))
        return base + list(spec_opts)

    async with Services(client) as svc, svc.leased(sync_on_error=False) as leased:
        if rootfs:
            record.labels = dict(labels or {})
            spec = await asyncio.to_thread(oci.generate_spec, ctx, *build(None))
        else:
            snapshotter = snapshotter or DEFAULT_SNAPSHOTTER
            matcher = plat.only(plat.parse(platform)) if platform else plat.Matcher([plat.default()])
            img = await leased.image_get(image)
            target = img.target if isinstance(img.target, Descriptor) else Descriptor.from_proto(img.target)
            resolved = await resolve_image(leased, target, matcher)
            chain = chain_ids(resolved.diff_ids)
            parent = chain[-1] if chain else ""
            if parent and unpack:
                try:
                    await leased.snapshot_stat(snapshotter, parent)
                except errdefs.NotFound:
                    await unpack_image(leased, target, matcher, snapshotter)
            config = oci.ImageConfig.from_document(resolved.config_doc)
            merged = dict(config.labels)
            merged.update({k: v for k, v in (getattr(img, "labels", None) or {}).items() if _valid_label(k, v)})
            merged.update(labels or {})
            merged[oci.STOP_SIGNAL_LABEL] = config.stop_signal or "SIGTERM"
            record.labels = merged
            record.image = image
            record.snapshotter = snapshotter
            mounts = await leased.snapshot_prepare(snapshotter, container_id, parent, dict(snapshot_labels or {}))
            record.snapshot_key = container_id
            ctx.snapshotter, ctx.snapshot_key, ctx.mounts = snapshotter, container_id, mounts
            try:
                spec = await asyncio.to_thread(oci.generate_spec, ctx, *build(config))
                record.spec = AnyMessage(type_url=SPEC_TYPE_URL, value=oci.spec_bytes(spec))
                return await ContainersAPI(client).create(record)
            except BaseException:
                try:
                    await leased.snapshot_remove(snapshotter, container_id)
                except errdefs.ContainerdError:
                    pass
                raise
        record.spec = AnyMessage(type_url=SPEC_TYPE_URL, value=oci.spec_bytes(spec))
        return await ContainersAPI(client).create(record)


async def remove_container(client: Any, container_id: str, *, snapshot_cleanup: bool = True) -> None:
    """Delete a container as ctr's `containers rm` does: refused while it has a task
    (FailedPrecondition), its snapshot removed too unless snapshot_cleanup=False."""
    from .tasks import TasksAPI

    try:
        await TasksAPI(client).get(container_id)
    except errdefs.NotFound:
        pass
    except errdefs.Unimplemented:
        pass
    else:
        raise errdefs.FailedPrecondition(f"cannot delete running task {container_id}")
    c = await ContainersAPI(client).get(container_id)
    if snapshot_cleanup and c.snapshot_key:
        if not c.snapshotter:
            raise errdefs.InvalidArgument("container.Snapshotter must be set to cleanup rootfs snapshot")
        from .snapshots import SnapshotsAPI

        try:
            await SnapshotsAPI(client).remove(c.snapshot_key, snapshotter=c.snapshotter)
        except errdefs.NotFound:
            pass
    await ContainersAPI(client).delete(container_id)
