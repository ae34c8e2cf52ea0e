"""Unpack an image into a snapshotter, as containerd's client does (image.Unpack and the pull
unpacker): for each layer, in order, a snapshot is prepared under the key
"extract-<nanoseconds>-<random> <chainid>" on top of the previous chain id, the layer is applied
through the Diff service, and the snapshot is committed as its chain id with the
containerd.io/snapshot.ref label. A layer whose chain id already exists is skipped, so two unpacks
of the same image may race: whoever commits second drops its extraction snapshot and moves on.
Afterwards each applied layer blob carries containerd.io/uncompressed (its diff id) and the image
config carries containerd.io/gc.ref.snapshot.<snapshotter> (the top chain id), which is what keeps
the snapshots alive through garbage collection.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional

from pycontainerd.core import errdefs

from . import mediatypes as mt
from . import platforms as plat
from ._services import Services
from .mediatypes import Descriptor
from .progress import Progress

DEFAULT_SNAPSHOTTER = "overlayfs"
INHERITED_LABEL_PREFIX = "containerd.io/snapshot/"


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The chain id after each layer (OCI image-spec identity.ChainIDs)."""
    out: list[str] = []
    for d in diff_ids:
        if not out:
            out.append(d)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def unpack_key(chain_id: str) -> str:
    """containerd's extraction key: "extract-<nanoseconds>-<4 base64 chars> <chainid>"."""
    unique = f"{time.time_ns() % 1_000_000_000}-{base64.urlsafe_b64encode(os.urandom(3)).decode()}"
    return f"extract-{unique} {chain_id}"


@dataclass
class ResolvedImage:
    manifest: Descriptor
    config: Descriptor
    layers: list[Descriptor]
    config_doc: dict

    @property
    def diff_ids(self) -> list[str]:
        rootfs = self.config_doc.get("rootfs") or {}
        ids = rootfs.get("diff_ids") or []
        return [str(d) for d in ids]

    @property
    def platform(self) -> mt.Platform:
        c = self.config_doc
        return plat.normalize(mt.Platform(os=str(c.get("os", "")), architecture=str(c.get("architecture", "")),
                                          variant=str(c.get("variant", "") or "")))


Waiter = Optional[Callable[[str], Awaitable[None]]]


async def _no_wait(digest: str) -> None:
    return None


async def resolve_manifest(svc: Services, target: Descriptor, matcher: plat.Matcher,
                           depth: int = 0, wait: Waiter = None) -> Descriptor:
    """The manifest `target` stands for on the matcher's platform (best match of an index).
    `wait(digest)`, when given, is awaited before a blob is read (a pull still fetching it)."""
    wait = wait or _no_wait
    if depth > 8:
        raise errdefs.InvalidArgument(f"{target.digest}: indexes nested too deeply")
    if mt.is_manifest(target.media_type):
        return target
    if not mt.is_index(target.media_type):
        raise errdefs.InvalidArgument(f"{target.digest}: unknown manifest media type {target.media_type!r}")
    await wait(target.digest)
    data = await svc.read_all(target.digest, limit=mt.MAX_MANIFEST_SIZE)
    doc = mt.parse_document(data, target)
    candidates = [c for c in mt.children(doc, target)
                  if (mt.is_manifest(c.media_type) or mt.is_index(c.media_type)) and matcher.match(c.platform)]
    candidates.sort(key=lambda c: matcher.rank(c.platform))
    for c in candidates:
        try:
            return await resolve_manifest(svc, c, matcher, depth + 1, wait)
        except errdefs.NotFound:
            continue
    raise errdefs.NotFound(f"manifest {target.digest}: no match for platform {matcher} in manifest")


async def resolve_image(svc: Services, target: Descriptor, matcher: plat.Matcher,
                        wait: Waiter = None) -> ResolvedImage:
    wait = wait or _no_wait
    manifest = await resolve_manifest(svc, target, matcher, wait=wait)
    await wait(manifest.digest)
    data = await svc.read_all(manifest.digest, limit=mt.MAX_MANIFEST_SIZE)
    doc = mt.parse_document(data, manifest)
    kids = mt.children(doc, manifest)
    config, layers = kids[0], kids[1:]
    await wait(config.digest)
    cfg_data = await svc.read_all(config.digest, limit=mt.MAX_MANIFEST_SIZE)
    try:
        cfg = json.loads(cfg_data)
    except ValueError as err:
        raise errdefs.InvalidArgument(f"unmarshal image config: {err}") from None
    if not isinstance(cfg, dict):
        raise errdefs.InvalidArgument("unmarshal image config: not a JSON object")
    return ResolvedImage(manifest, config, layers, cfg)


async def unpack(svc: Services, target: Descriptor, matcher: Optional[plat.Matcher] = None,
                 snapshotter: str = DEFAULT_SNAPSHOTTER, progress: Optional[Progress] = None,
                 wait: Waiter = None) -> str:
    """Unpack the image `target` for the matcher's platform into `snapshotter`; returns the
    image's chain id (the name of its top snapshot). With `wait`, each blob is awaited before
    use: a pull passes one to apply layers while later ones are still downloading."""
    wait = wait or _no_wait
    matcher = matcher or plat.Matcher([plat.default()])
    progress = progress or Progress()
    snapshotter = snapshotter or DEFAULT_SNAPSHOTTER
    async with svc.leased(sync_on_error=False) as leased:
        image = await resolve_image(leased, target, matcher, wait)
        diff_ids = image.diff_ids
        if len(diff_ids) != len(image.layers):
            raise errdefs.InvalidArgument(f"number of layers and diffIDs don't match: "
                                          f"{len(image.layers)} != {len(diff_ids)}")
        chains = chain_ids(diff_ids)
        for i, layer in enumerate(image.layers):
            if not mt.is_layer(layer.media_type):
                raise errdefs.InvalidArgument(f"layer {layer.digest}: not a layer media type "
                                              f"({layer.media_type!r})")
            parent = chains[i - 1] if i else ""
            key = f"unpack-{layer.digest}"
            progress.start(key, layer.size, "unpacking")
            if not await _snapshot_exists(leased, snapshotter, chains[i]):
                await wait(layer.digest)
            applied = await _apply_layer(leased, snapshotter, layer, diff_ids[i], chains[i], parent)
            if applied:
                await leased.update_labels(layer.digest, {mt.LABEL_UNCOMPRESSED: diff_ids[i]})
            progress.finish(key, "done" if applied else "exists")
        top = chains[-1] if chains else ""
        if top:
            await leased.update_labels(image.config.digest,
                                       {f"containerd.io/gc.ref.snapshot.{snapshotter}": top})
        return top


async def _apply_layer(svc: Services, snapshotter: str, layer: Descriptor, diff_id: str,
                       chain_id: str, parent: str) -> bool:
    """Make snapshot `chain_id` exist; True when this call applied it."""
    if await _snapshot_exists(svc, snapshotter, chain_id):
        return False
    labels = {k: v for k, v in layer.annotations.items()
              if k == mt.LABEL_SNAPSHOT_REF or k.startswith(INHERITED_LABEL_PREFIX)}
    labels[mt.LABEL_SNAPSHOT_REF] = chain_id
    key = ""
    mounts = None
    for _ in range(3):
        key = unpack_key(chain_id)
        try:
            mounts = await svc.snapshot_prepare(snapshotter, key, parent, labels)
            break
        except errdefs.AlreadyExists:
            if await _snapshot_exists(svc, snapshotter, chain_id):
                return False  # someone else unpacked it meanwhile
    if mounts is None:
        raise errdefs.AlreadyExists(f"unable to prepare extraction snapshot for {chain_id}")
    try:
        applied = await svc.diff_apply(layer, mounts)
        if applied.digest != diff_id:
            raise errdefs.FailedPrecondition(f"wrong diff id calculated on extraction "
                                             f"{applied.digest!r}, expected {diff_id!r}")
        try:
            await svc.snapshot_commit(snapshotter, chain_id, key, labels)
        except errdefs.AlreadyExists:
            await _remove_quietly(svc, snapshotter, key)
            return False
    except BaseException:
        await _remove_quietly(svc, snapshotter, key)
        raise
    return True


async def _snapshot_exists(svc: Services, snapshotter: str, key: str) -> bool:
    try:
        await svc.snapshot_stat(snapshotter, key)
        return True
    except errdefs.NotFound:
        return False


async def _remove_quietly(svc: Services, snapshotter: str, key: str) -> None:
    try:
        await svc.snapshot_remove(snapshotter, key)
    except errdefs.ContainerdError:
        pass
