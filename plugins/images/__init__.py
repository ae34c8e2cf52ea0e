"""Images: the images service (`io.containerd.service.v1.images-service`, plain Python over the
metadata image store, publishing /images/create, /images/update and /images/delete) and its gRPC
API (`io.containerd.grpc.v1.images`), a thin adapter. Delete with sync waits for the garbage
collector to finish a collection, as containerd's does.

What other plugins use: `ctx.get(PluginType.SERVICE, "images-service")` -> ImagesService, whose
methods run in the request's namespace (core/context); `.store` takes namespaces explicitly.
"""
from __future__ import annotations

from typing import Any, Sequence

from betterproto.lib.google.protobuf import Empty
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from pycontainerd.api.gen.containerd import types as pbtypes
from pycontainerd.api.gen.containerd.services.images import v1 as api
from pycontainerd.core import errdefs
from pycontainerd.core.context import namespace
from pycontainerd.core.plugin import InitContext, PluginType, Registration, hookimpl
from pycontainerd.plugins.metadata.images import Descriptor, Image, ImageStore

TOPIC_CREATE, TOPIC_UPDATE, TOPIC_DELETE = "/images/create", "/images/update", "/images/delete"


class ImagesService:
    """Images of the request's namespace; every change is published, as containerd's local
    images service does."""

    def __init__(self, store: ImageStore, events: Any, gc: Any):
        self.store, self.events, self.gc = store, events, gc

    def get(self, name: str) -> Image:
        return self.store.get(namespace(), name)

    def list(self, filters: Sequence[str] = ()) -> list[Image]:
        return self.store.list(namespace(), filters)

    def create(self, image: Image) -> Image:
        ns = namespace()
        created = self.store.create(ns, image)
        self.events.publish(ns, TOPIC_CREATE, api.ImageCreate(name=created.name, labels=created.labels))
        return created

    def update(self, image: Image, fieldpaths: Sequence[str] = ()) -> Image:
        ns = namespace()
        updated = self.store.update(ns, image, fieldpaths)
        self.events.publish(ns, TOPIC_UPDATE, api.ImageUpdate(name=updated.name, labels=updated.labels))
        return updated

    async def delete(self, name: str, sync: bool = False) -> None:
        """Delete the image; with `sync`, return only after a garbage collection that started
        after the deletion has finished (its blobs are gone unless something else holds them)."""
        ns = namespace()
        self.store.delete(ns, name)
        self.events.publish(ns, TOPIC_DELETE, api.ImageDelete(name=name))
        if sync:
            await self.gc.schedule_and_wait()


# -- the gRPC adapter --------------------------------------------------------------------------

def image_from_pb(pb: api.Image) -> Image:
    target = pb.target if pb.target is not None else pbtypes.Descriptor()
    return Image(name=pb.name, labels=dict(pb.labels),
                 target=Descriptor(target.media_type, target.digest, int(target.size), dict(target.annotations)))


def image_to_pb(image: Image) -> api.Image:
    t = image.target
    return api.Image(name=image.name, labels=dict(image.labels),
                     target=pbtypes.Descriptor(media_type=t.media_type, digest=t.digest, size=t.size,
                                               annotations=dict(t.annotations)),
                     created_at=image.created_at, updated_at=image.updated_at)


def _name_required() -> GRPCError:
    # containerd's service answers with a bare status here, not a wrapped errdefs error
    return GRPCError(Status.INVALID_ARGUMENT, "Image.Name required")


class ImagesGRPC(api.ImagesBase):
    """The gRPC adapter, with the few checks containerd's service makes before its store."""

    def __init__(self, service: ImagesService):
        self.service = service

    async def get(self, request: api.GetImageRequest) -> api.GetImageResponse:
        return api.GetImageResponse(image=image_to_pb(self.service.get(request.name)))

    async def list(self, request: api.ListImagesRequest) -> api.ListImagesResponse:
        try:
            images = self.service.list(list(request.filters))
        except errdefs.InvalidArgument as err:
            # containerd's image store wraps the filter parser's InvalidArgument once more
            raise GRPCError(Status.INVALID_ARGUMENT, f"{err}: {err.suffix}") from None
        return api.ListImagesResponse(images=[image_to_pb(i) for i in images])

    async def create(self, request: api.CreateImageRequest) -> api.CreateImageResponse:
        if request.image is None or not request.image.name:
            raise _name_required()
        created = self.service.create(image_from_pb(request.image))
        return api.CreateImageResponse(image=image_to_pb(created))

    async def update(self, request: api.UpdateImageRequest) -> api.UpdateImageResponse:
        if request.image is None or not request.image.name:
            raise _name_required()
        paths = list(request.update_mask.paths) if request.update_mask is not None else []
        updated = self.service.update(image_from_pb(request.image), paths)
        return api.UpdateImageResponse(image=image_to_pb(updated))

    async def delete(self, request: api.DeleteImageRequest) -> Empty:
        await self.service.delete(request.name, sync=request.sync)
        return Empty()


async def init_service(ctx: InitContext) -> ImagesService:
    return ImagesService(ImageStore(ctx.get(PluginType.METADATA).db), ctx.events, ctx.get(PluginType.GC))


async def init_grpc(ctx: InitContext) -> ImagesGRPC:
    service = ctx.get_all(PluginType.SERVICE).get("images-service")
    if service is None:
        raise errdefs.NotFound("images service not found")
    return ImagesGRPC(service)


@hookimpl
def pycontainerd_register(registry):
    registry.register(Registration(PluginType.SERVICE, "images-service", init_service,
                                   requires=(PluginType.METADATA, PluginType.GC)))
    registry.register(Registration(PluginType.GRPC, "images", init_grpc,
                                   requires=(f"{PluginType.SERVICE}.images-service",)))
