"""`client.leases`: leases that protect content and snapshots from garbage collection, in the
client's namespace, and the resources each one holds."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Mapping, Optional, Union

from pycontainerd.api.gen.containerd.services.leases import v1 as api

from ._base import DEFAULT, ServiceAPI
from .types import Lease, LeaseResource

# The label containerd's GC reads a lease's expiry from (RFC 3339).
EXPIRE_LABEL = "containerd.io/gc.expire"

Expiry = Union[timedelta, datetime, float, int, None]


def expire_label_value(expire: Expiry, now: Optional[datetime] = None) -> Optional[str]:
    """The gc.expire label value for `expire`: a duration from now (timedelta or seconds) or an
    absolute time; None or a zero/negative duration means "never expires"."""
    if expire is None:
        return None
    if isinstance(expire, datetime):
        when = expire if expire.tzinfo else expire.replace(tzinfo=timezone.utc)
    else:
        delta = expire if isinstance(expire, timedelta) else timedelta(seconds=float(expire))
        if delta <= timedelta(0):
            return None
        when = (now or datetime.now(timezone.utc)) + delta
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class LeasesAPI(ServiceAPI):
    stub_class = api.LeasesStub

    async def create(self, id: Optional[str] = None, labels: Optional[Mapping[str, str]] = None,
                     expire: Expiry = None, *, timeout: Any = DEFAULT) -> Lease:
        """Create a lease; the server generates an id when none is given. `expire` (a duration
        or an absolute time) sets the containerd.io/gc.expire label."""
        labels = dict(labels or {})
        value = expire_label_value(expire)
        if value is not None:
            labels[EXPIRE_LABEL] = value
        resp = await self._unary("create", api.CreateRequest(id=id or "", labels=labels), timeout=timeout)
        return Lease.from_proto(resp.lease)

    async def list(self, filters: Iterable[str] = (), *, timeout: Any = DEFAULT) -> list[Lease]:
        resp = await self._unary("list", api.ListRequest(filters=list(filters)), timeout=timeout)
        return [Lease.from_proto(lease) for lease in resp.leases]

    async def delete(self, id: str, sync: bool = False, *, timeout: Any = DEFAULT) -> None:
        """Delete lease `id`; with sync=True the server also collects what it released first."""
        await self._unary("delete", api.DeleteRequest(id=id, sync=sync), timeout=timeout)

    async def add_resource(self, id: str, resource_id: str, type: str, *,
                           timeout: Any = DEFAULT) -> None:
        """Make lease `id` hold a resource, e.g. ("sha256:...", "content")."""
        req = api.AddResourceRequest(id=id, resource=api.Resource(id=resource_id, type=type))
        await self._unary("add_resource", req, timeout=timeout)

    async def delete_resource(self, id: str, resource_id: str, type: str, *,
                              timeout: Any = DEFAULT) -> None:
        req = api.DeleteResourceRequest(id=id, resource=api.Resource(id=resource_id, type=type))
        await self._unary("delete_resource", req, timeout=timeout)

    async def list_resources(self, id: str, *, timeout: Any = DEFAULT) -> list[LeaseResource]:
        resp = await self._unary("list_resources", api.ListResourcesRequest(id=id), timeout=timeout)
        return [LeaseResource.from_proto(r) for r in resp.resources]
