"""Pull: resolve a reference on its registry, fetch the image graph into the content store under
a lease, record the image, and (by default) unpack it, as `ctr images pull` does.

The graph is walked as containerd's Dispatch walks it: a manifest or index is read whole (at most
4 MiB) and checked against its digest before its children are looked at; an index keeps only the
children for the chosen platforms; children are fetched concurrently, at most
`max_concurrent_downloads` at a time. Blobs stream into Content.Write with their expected digest
and size, so the content store verifies them on commit; a layer already present is skipped, a
partial ingest left by an interrupted pull is resumed with a Range request, and a connection that
breaks mid-layer is resumed the same way. Each parent gets the gc.ref labels of its children and
every blob the containerd.io/distribution.source.<host> label. A wrong digest or size, or a body
cut short, fails the pull; the image is recorded only when everything arrived.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Optional

import httpx

from pycontainerd.core import errdefs

from . import mediatypes as mt
from . import platforms as plat
from ._services import CHUNK, ImageRecord, Services
from .mediatypes import Descriptor
from .progress import Progress
from .registry import Registry, RemoteOptions, registry_for
from .unpack import DEFAULT_SNAPSHOTTER

RESUME_ATTEMPTS = 3


@dataclass
class PullOptions:
    platforms: list[str] = field(default_factory=list)
    all_platforms: bool = False
    all_metadata: bool = False  # also the manifests and configs of the other platforms
    labels: dict[str, str] = field(default_factory=dict)
    max_concurrent_downloads: int = 3
    unpack: bool = True
    snapshotter: str = DEFAULT_SNAPSHOTTER

    def matcher(self) -> plat.Matcher:
        return plat.from_specs(self.platforms, self.all_platforms)


def ref_key(desc: Descriptor) -> str:
    """containerd's remotes.MakeRefKey: the ingest ref of a fetch."""
    key = desc.digest
    name = desc.annotations.get(mt.ANNOTATION_REF_NAME)
    if name:
        key = f"{name}@{desc.digest}"
    m = desc.media_type
    if mt.is_manifest(m):
        return "manifest-" + key
    if mt.is_index(m):
        return "index-" + key
    if mt.is_layer(m):
        return "layer-" + key
    if mt.is_known_config(m):
        return "config-" + key
    return "unknown-" + key


def _append_source(existing: str, repo: str) -> str:
    repos = [r for r in existing.split(",") if r] if existing else []
    repos.append(repo)
    return ",".join(sorted(set(repos)))


class Arrivals:
    """Which blobs a running fetch has stored: `wait(digest)` returns once that blob is in the
    content store, or once the fetch is over (whatever it fetched or not)."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._over = False

    def _event(self, digest: str) -> asyncio.Event:
        ev = self._events.get(digest)
        if ev is None:
            ev = self._events[digest] = asyncio.Event()
            if self._over:
                ev.set()
        return ev

    def arrived(self, digest: str) -> None:
        self._event(digest).set()

    def over(self) -> None:
        self._over = True
        for ev in self._events.values():
            ev.set()

    async def wait(self, digest: str) -> None:
        await self._event(digest).wait()


class _Fetcher:
    def __init__(self, svc: Services, registry: Registry, limit: int, progress: Progress,
                 arrivals: Optional[Arrivals] = None, all_metadata: bool = False):
        self.svc = svc
        self.registry = registry
        self.sem = asyncio.Semaphore(max(limit, 1))
        self.progress = progress
        host = registry.spec.hostname
        if host.startswith("["):
            host = host[1:].split("]", 1)[0]
        elif ":" in host:
            host = host.rsplit(":", 1)[0]
        self.source_key = mt.LABEL_DISTRIBUTION_SOURCE + host
        self.repo = registry.repository
        self.seen: dict[tuple[str, bool], asyncio.Task] = {}
        self.arrivals = arrivals or Arrivals()
        self.all_metadata = all_metadata

    async def dispatch(self, desc: Descriptor, matcher: plat.Matcher, depth: int = 0,
                       metadata_only: bool = False) -> None:
        """Fetch `desc` and what it needs. The gc.ref labels of a manifest or index name all its
        children, as containerd's pull labels them (before the platform filter); an index's
        children for other platforms are skipped, or with all_metadata fetched as metadata
        (their manifest and config, no layers)."""
        if depth > 8:
            raise errdefs.InvalidArgument(f"{desc.digest}: indexes nested too deeply")
        if desc.media_type == mt.DOCKER_SCHEMA1:
            raise errdefs.Unimplemented(f"{desc.media_type} not supported")
        async with self.sem:
            data = await self.fetch(desc)
        self.arrivals.arrived(desc.digest)
        todo: list[tuple[Descriptor, bool]] = []
        if data is not None:
            doc = mt.parse_document(data, desc)
            kids = mt.children(doc, desc)
            if kids:
                await self.svc.update_labels(desc.digest, mt.children_labels(kids))
            if mt.is_index(desc.media_type):
                for k in kids:
                    if not (mt.is_manifest(k.media_type) or mt.is_index(k.media_type)):
                        raise errdefs.InvalidArgument(
                            f"index {desc.digest}: unknown manifest media type {k.media_type!r}")
                    if matcher.match(k.platform):
                        todo.append((k, metadata_only))
                    elif self.all_metadata:
                        todo.append((k, True))
            elif metadata_only:
                todo = [(kids[0], True)]  # a manifest's config
            else:
                todo = [(k, False) for k in kids]
        await self._source_label(desc)
        if todo:
            await asyncio.gather(*(self._once(k, matcher, depth + 1, meta) for k, meta in todo))

    async def cancel(self) -> None:
        """Stop every fetch still running (after a failure)."""
        tasks = [t for t in self.seen.values() if not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _once(self, desc: Descriptor, matcher: plat.Matcher, depth: int, metadata_only: bool) -> asyncio.Task:
        key = (desc.digest, metadata_only)
        task = self.seen.get(key)
        if task is None:
            task = asyncio.ensure_future(self.dispatch(desc, matcher, depth, metadata_only))
            self.seen[key] = task
        return task

    async def _source_label(self, desc: Descriptor) -> None:
        info = await self.svc.info(desc.digest)
        value = _append_source(info.labels.get(self.source_key, ""), self.repo)
        if info.labels.get(self.source_key) != value and len(self.source_key) + len(value) <= 4096:
            await self.svc.update_labels(desc.digest, {self.source_key: value})

    async def fetch(self, desc: Descriptor) -> Optional[bytes]:
        """Fetch `desc` into the store; the bytes of a manifest or index (read from the store
        when it was already there)."""
        if desc.size == 0 and not mt.is_layer(desc.media_type):
            raise errdefs.InvalidArgument(f"unable to fetch descriptor ({desc.digest}) which reports "
                                          f"content size of zero")
        is_doc = mt.is_manifest(desc.media_type) or mt.is_index(desc.media_type)
        key = ref_key(desc)
        if is_doc:
            if desc.size > mt.MAX_MANIFEST_SIZE:
                raise errdefs.InvalidArgument(f"manifest {desc.digest}: {desc.size} bytes is over "
                                              f"the {mt.MAX_MANIFEST_SIZE} byte limit")
            info = await self.svc.exists(desc.digest)
            if info is not None:
                self.progress.finish(key, "exists")
                return await self.svc.read_all(desc.digest, limit=mt.MAX_MANIFEST_SIZE)
            self.progress.start(key, desc.size, "downloading")
            data = await self.registry.fetch_bytes(desc)
            await self.svc.write_blob(key, data, desc.digest)
            self.progress.finish(key, "done")
            return data
        await self._stream(desc, key)
        return None

    async def _stream(self, desc: Descriptor, key: str) -> None:
        bad: Optional[errdefs.FailedPrecondition] = None
        async with self.svc.writer(key, desc.size, desc.digest) as w:
            if w.exists:
                self.progress.finish(key, "exists")
                return
            try:
                await self._copy(desc, key, w)
                await w.commit(desc.size, desc.digest)
            except errdefs.FailedPrecondition as err:
                bad = err
        if bad is not None:
            # bad bytes: drop the ingest, so that the next pull does not resume them
            await self.svc.abort(key)
            if "registry sent" in bad.message or "truncated" in bad.message:
                raise bad
            raise errdefs.FailedPrecondition(
                f"{desc.digest}: content from the registry does not match its descriptor: "
                f"{bad.message}")
        self.progress.finish(key, "done")

    async def _copy(self, desc: Descriptor, key: str, w) -> None:
        self.progress.start(key, desc.size, "downloading")
        self.progress.set(key, w.offset)
        attempts = 0
        while w.offset < desc.size:
            start = w.offset
            resp = await self.registry.open(desc, start)
            skip = resp.extensions.get("skip", 0)
            received = start
            try:
                async for chunk in resp.aiter_bytes(CHUNK):
                    if skip:
                        if len(chunk) <= skip:
                            skip -= len(chunk)
                            continue
                        chunk, skip = chunk[skip:], 0
                    if received + len(chunk) > desc.size:
                        raise errdefs.FailedPrecondition(
                            f"{desc.digest}: the registry sent more than the {desc.size} bytes expected")
                    await w.write(chunk)
                    received += len(chunk)
                    self.progress.advance(key, len(chunk))
            except httpx.TimeoutException:
                raise errdefs.DeadlineExceeded(f"fetching {desc.digest}: registry timed out") from None
            except httpx.TransportError as err:
                attempts += 1
                if attempts > RESUME_ATTEMPTS:
                    raise errdefs.Unavailable(f"fetching {desc.digest}: {err}") from None
            finally:
                await resp.aclose()
            await w.drain()
            if received < desc.size:
                attempts += 1
                if attempts > RESUME_ATTEMPTS:
                    raise errdefs.FailedPrecondition(
                        f"{desc.digest}: truncated: the registry sent {received} of {desc.size} bytes")
                continue
            break


async def _resolve(registry: Registry, ref: str) -> Descriptor:
    """registry.resolve(), its failure worded as ctr's: failed to resolve reference "REF": ..."""
    try:
        return await registry.resolve()
    except errdefs.ContainerdError as err:
        raise type(err)(f'failed to resolve reference "{ref}": {err.message}') from None


async def fetch(svc: Services, ref: str, remote: Optional[RemoteOptions] = None,
                options: Optional[PullOptions] = None, progress: Optional[Progress] = None) -> ImageRecord:
    """Fetch `ref` and record it as image `ref` (no unpack): ctr's content.Fetch."""
    options = options or PullOptions()
    progress = progress or Progress()
    matcher = options.matcher()
    async with registry_for(ref, remote) as registry:
        desc = await _resolve(registry, ref)
        progress.note(ref, "resolved")
        async with svc.leased() as leased:
            fetcher = _Fetcher(leased, registry, options.max_concurrent_downloads, progress,
                               all_metadata=options.all_metadata)
            try:
                await fetcher.dispatch(desc, matcher)
            except BaseException:
                await fetcher.cancel()
                raise
            return await leased.image_put(ref, desc, options.labels)


async def pull(svc: Services, ref: str, remote: Optional[RemoteOptions] = None,
               options: Optional[PullOptions] = None, progress: Optional[Progress] = None,
               platform: Optional[mt.Platform] = None) -> tuple[ImageRecord, str]:
    """Fetch `ref`, record it, and unpack it for `platform` (the host's by default) while it
    downloads: each layer is applied as soon as it and the ones below it are stored. Returns the
    image and its chain id. The image is recorded when the fetch is complete, before the unpack
    ends (an unpack failure leaves the image, as with ctr)."""
    from .unpack import unpack

    options = options or PullOptions()
    progress = progress or Progress()
    matcher = options.matcher()
    want = plat.Matcher([platform or plat.default()])
    async with registry_for(ref, remote) as registry:
        desc = await _resolve(registry, ref)
        progress.note(ref, "resolved")
        async with svc.leased() as leased:
            arrivals = Arrivals()
            fetcher = _Fetcher(leased, registry, options.max_concurrent_downloads, progress, arrivals,
                               all_metadata=options.all_metadata)
            unpacking = asyncio.ensure_future(unpack(leased, desc, want, options.snapshotter,
                                                     wait=arrivals.wait))
            try:
                try:
                    await fetcher.dispatch(desc, matcher)
                except BaseException:
                    await fetcher.cancel()
                    raise
                finally:
                    arrivals.over()
                record = await leased.image_put(ref, desc, options.labels)
                chain = await unpacking
            except BaseException:
                unpacking.cancel()
                await asyncio.gather(unpacking, return_exceptions=True)
                raise
            return record, chain


async def image_platforms(svc: Services, target: Descriptor) -> list[mt.Platform]:
    """The platforms an image has content for (containerd's images.Platforms, simplified)."""
    if mt.is_manifest(target.media_type):
        if target.platform is not None:
            return [target.platform]
        data = await svc.read_all(target.digest, limit=mt.MAX_MANIFEST_SIZE)
        config = mt.children(mt.parse_document(data, target), target)[0]
        import json
        cfg = json.loads(await svc.read_all(config.digest, limit=mt.MAX_MANIFEST_SIZE))
        return [plat.normalize(mt.Platform(os=cfg.get("os", ""), architecture=cfg.get("architecture", ""),
                                           variant=cfg.get("variant", "") or ""))]
    data = await svc.read_all(target.digest, limit=mt.MAX_MANIFEST_SIZE)
    out: list[mt.Platform] = []
    for child in mt.children(mt.parse_document(data, target), target):
        if child.platform is not None and await svc.exists(child.digest) is not None:
            out.append(plat.normalize(child.platform))
    return out
