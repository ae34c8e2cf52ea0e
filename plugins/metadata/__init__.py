"""The metadata plugin (`io.containerd.metadata.v1.sqlite`): the namespaced database every store
of records (namespaces, leases, and later content, images, containers, snapshots) lives in."""
from __future__ import annotations

from dataclasses import dataclass

from pycontainerd.core.plugin import InitContext, PluginType, Registration, hookimpl

from .db import MetadataDB
from .leases import LeaseStore
from .namespaces import NamespaceStore


@dataclass
class Metadata:
    db: MetadataDB
    namespaces: NamespaceStore
    leases: LeaseStore


async def init(ctx: InitContext) -> Metadata:
    db = MetadataDB(ctx.root / "meta.db")
    ctx.meta.exports["path"] = str(db.path)
    return Metadata(db, NamespaceStore(db), LeaseStore(db))


async def close(md: Metadata) -> None:
    md.db.close()


@hookimpl
def pycontainerd_register(registry):
    registry.register(Registration(PluginType.METADATA, "sqlite", init, close=close))
