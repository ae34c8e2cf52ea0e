"""Push: upload an image from the content store to a registry, as `ctr images push` does.

The graph under the target is walked in the content store (every platform of an index unless one
is asked for); blobs go first, concurrently (at most `max_concurrent_uploads` at a time): a HEAD
tells whether the registry has one already, a blob whose containerd.io/distribution.source label
names another repository of the same registry is offered for a cross-repository mount, the rest is
uploaded in one PUT (or in PATCH chunks of `chunk_size` bytes). Manifests follow, children before
parents; the target goes under the reference's tag (or its digest), the others under their digest.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Optional

from pycontainerd.core import errdefs

from . import mediatypes as mt
from . import platforms as plat
from ._services import Services
from .mediatypes import Descriptor
from .progress import Progress
from .pull import ref_key
from .registry import Registry, RemoteOptions, registry_for


@dataclass
class PushOptions:
    platform: str = ""
    max_concurrent_uploads: int = 3
    chunk_size: int = 0
    allow_non_distributable: bool = False


def mount_candidate(spec_locator: str, labels: dict[str, str]) -> str:
    """containerd's selectRepositoryMountCandidate: the source repository on the same registry
    sharing the longest path prefix with the target (never the target itself)."""
    host, _, target = spec_locator.partition("/")
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif ":" in host:
        host = host.rsplit(":", 1)[0]
    value = labels.get(mt.LABEL_DISTRIBUTION_SOURCE + host, "")
    if not value:
        return ""
    comps = target.split("/")
    best, match = 0, ""
    for repo in value.split(","):
        if repo == target or not repo:
            continue
        n = 0
        for a, b in zip(comps, repo.split("/")):
            if a != b:
                break
            n += 1
        if n >= best:
            best, match = n, repo
    return match


class _Pusher:
    def __init__(self, svc: Services, registry: Registry, options: PushOptions, progress: Progress):
        self.svc = svc
        self.registry = registry
        self.options = options
        self.progress = progress
        self.sem = asyncio.Semaphore(max(options.max_concurrent_uploads, 1))
        self.manifests: list[tuple[Descriptor, bytes]] = []
        self.blobs: dict[str, Descriptor] = {}
        self.seen: set[str] = set()

    async def collect(self, desc: Descriptor, matcher: plat.Matcher, depth: int = 0) -> None:
        if depth > 8:
            raise errdefs.InvalidArgument(f"{desc.digest}: indexes nested too deeply")
        if desc.digest in self.seen:
            return
        self.seen.add(desc.digest)
        if mt.is_manifest(desc.media_type) or mt.is_index(desc.media_type):
            data = await self.svc.read_all(desc.digest, limit=mt.MAX_MANIFEST_SIZE)
            doc = mt.parse_document(data, desc)
            kids = mt.children(doc, desc)
            if mt.is_index(desc.media_type):
                kids = [k for k in kids if matcher.match(k.platform)]
            self.manifests.append((desc, data))
            for k in kids:
                await self.collect(k, matcher, depth + 1)
            return
        if mt.is_non_distributable(desc.media_type) and not self.options.allow_non_distributable:
            return
        self.blobs[desc.digest] = desc

    async def push_blob(self, desc: Descriptor) -> None:
        async with self.sem:
            key = ref_key(desc)
            if await self.registry.exists(desc):
                self.progress.finish(key, "exists")
                return
            info = await self.svc.info(desc.digest)
            source = mount_candidate(self.registry.spec.locator, info.labels)
            self.progress.start(key, desc.size, "uploading")
            location = await self.registry.start_upload(desc, source)
            if location is None:
                self.progress.finish(key, "mounted")
                return

            async def body():
                async for chunk in self.svc.read_chunks(desc.digest):
                    self.progress.advance(key, len(chunk))
                    yield chunk

            def fresh():
                self.progress.set(key, 0)
                return body()

            await self.registry.upload(location, desc, fresh, self.options.chunk_size)
            self.progress.finish(key, "done")

    async def push_manifests(self, root: Descriptor) -> None:
        tag = self.registry.spec.tag
        for desc, data in reversed(self.manifests):
            key = ref_key(desc)
            ref = tag if desc.digest == root.digest and tag else desc.digest
            if await self.registry.exists(desc, manifest_ref=ref):
                self.progress.finish(key, "exists")
                continue
            self.progress.start(key, desc.size, "uploading")
            await self.registry.put_manifest(ref, desc, data)
            self.progress.finish(key, "done")


async def push(svc: Services, ref: str, target: Descriptor, remote: Optional[RemoteOptions] = None,
               options: Optional[PushOptions] = None, progress: Optional[Progress] = None) -> None:
    """Push `target` (an image's manifest or index) from the content store to `ref`."""
    options = options or PushOptions()
    progress = progress or Progress()
    async with registry_for(ref, remote) as registry:
        if not registry.repository:
            raise errdefs.InvalidArgument(f"{ref}: no repository in the reference")
        pusher = _Pusher(svc, registry, options, progress)
        await pusher.collect(target, plat.all_platforms())
        await asyncio.gather(*(pusher.push_blob(d) for d in pusher.blobs.values()))
        await pusher.push_manifests(target)


async def select_platform_manifest(svc: Services, target: Descriptor, platform: str) -> Descriptor:
    """ctr push --platform: the manifest of an index that matches `platform` (else the target)."""
    if not mt.is_index(target.media_type):
        return target
    matcher = plat.Matcher([plat.parse(platform)])
    data = await svc.read_all(target.digest, limit=mt.MAX_MANIFEST_SIZE)
    for child in mt.children(mt.parse_document(data, target), target):
        if child.platform is not None and matcher.match(child.platform):
            await svc.info(child.digest)
            return child
    return target
