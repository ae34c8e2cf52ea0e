"""`client.namespaces`: create, get, list, update labels of, and delete containerd namespaces.

Namespaces are global: these calls ignore the client's own namespace.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from betterproto.lib.google.protobuf import FieldMask

from pycontainerd.api.gen.containerd.services.namespaces import v1 as api

from ._base import DEFAULT, ServiceAPI
from .types import Namespace


class NamespacesAPI(ServiceAPI):
    stub_class = api.NamespacesStub

    async def create(self, name: str, labels: Optional[Mapping[str, str]] = None, *,
                     timeout: Any = DEFAULT) -> Namespace:
        """Create namespace `name` (AlreadyExists if it is there)."""
        req = api.CreateNamespaceRequest(namespace=api.Namespace(name=name, labels=dict(labels or {})))
        resp = await self._unary("create", req, timeout=timeout)
        return Namespace.from_proto(resp.namespace)

    async def get(self, name: str, *, timeout: Any = DEFAULT) -> Namespace:
        resp = await self._unary("get", api.GetNamespaceRequest(name=name), timeout=timeout)
        return Namespace.from_proto(resp.namespace)

    async def list(self, filter: str = "", *, timeout: Any = DEFAULT) -> list[Namespace]:
        resp = await self._unary("list", api.ListNamespacesRequest(filter=filter), timeout=timeout)
        return [Namespace.from_proto(ns) for ns in resp.namespaces]

    async def update(self, name: str, labels: Mapping[str, str], *, replace: bool = False,
                     timeout: Any = DEFAULT) -> Namespace:
        """Set labels on namespace `name` and return it as it now is.

        By default only the given keys change and an empty value removes its label (what
        `ctr namespaces label` does); with replace=True the labels become exactly `labels`."""
        labels = dict(labels)
        if replace:
            mask = None  # containerd: no mask means "replace every label"
        elif labels:
            mask = FieldMask(paths=[f"labels.{key}" for key in labels])
        else:
            return await self.get(name, timeout=timeout)
        req = api.UpdateNamespaceRequest(namespace=api.Namespace(name=name, labels=labels),
                                         update_mask=mask)
        resp = await self._unary("update", req, timeout=timeout)
        if resp.namespace is not None and resp.namespace.name:
            return Namespace.from_proto(resp.namespace)
        # containerd 1.6 answers Update with an empty response: read the result back.
        return await self.get(name, timeout=timeout)

    async def set_label(self, name: str, key: str, value: str, *, timeout: Any = DEFAULT) -> Namespace:
        """Set one label; an empty value removes it."""
        return await self.update(name, {key: value}, timeout=timeout)

    async def delete(self, name: str, *, timeout: Any = DEFAULT) -> None:
        """Delete namespace `name` (it must be empty; NotFound if it does not exist)."""
        await self._unary("delete", api.DeleteNamespaceRequest(name=name), timeout=timeout)
