"""Image archives: import an OCI image layout tar or a `docker save` tar into the content and
image stores, and export images as an OCI layout tar with a docker-compatible manifest.json.

Import follows ctr 1.6 (`ctr images import`, containerd's archive.ImportIndex + Client.Import):
every regular member is streamed into the content store under the transfer's lease (blobs/<alg>/
<hex> with its expected digest and size, so a blob already present is skipped without sending
its bytes); a docker archive gets the docker schema 2 manifests and the index containerd builds
for it; the index is walked for the chosen platforms, each manifest and index gets the
containerd.io/gc.ref.content.* labels of its children, and images are named from the
io.containerd.image.name / org.opencontainers.image.ref.name annotations.

It refuses, before any image is recorded (the lease then takes what was written): members that
escape the archive (absolute paths, "..", symlinks and hardlinks), a blob whose bytes do not match
its digest or size, a manifest or index that is over 4 MiB or not JSON, and manifest types it does
not know.
"""
from __future__ import annotations

import asyncio
import hashlib

import json
import posixpath
import re
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Optional

from pycontainerd.core import digest as digests
from pycontainerd.core import errdefs

from . import mediatypes as mt
from . import platforms as plat
from . import reference
from ._services import CHUNK, ImageRecord, Services
from .mediatypes import Descriptor, Platform
from .progress import Progress

# Small members are kept in memory as they stream by (manifests, configs, small layers), so
# the walk need not read them back; past this total, members are read back from the store.
_CACHE_LIMIT = 256 << 20
# JSON files of the archive itself (index.json, manifest.json, oci-layout).
_JSON_LIMIT = mt.MAX_MANIFEST_SIZE
_BLOB_PATH = re.compile(r"^blobs/([a-z0-9]+(?:[.+_-][a-z0-9]+)*)/([a-zA-Z0-9=_-]+)$")


class ArchiveError(errdefs.InvalidArgument):
    """The archive is malformed or unsafe; nothing from it was recorded."""


@dataclass
class ImportOptions:
    """ctr images import's flags."""

    base_name: str = ""
    digests: bool = False
    skip_digest_for_named: bool = False
    index_name: str = ""
    all_platforms: bool = False
    platform: str = ""
    compress_blobs: bool = False  # docker archives: gzip uncompressed layers

    def matcher(self) -> plat.Matcher:
        if self.all_platforms:
            return plat.all_platforms()
        if self.platform:
            return plat.Matcher([plat.parse(self.platform)])
        return plat.Matcher([plat.default()])


@dataclass
class _Member:
    name: str
    size: int
    digest: str = ""
    data: Optional[bytes] = None  # kept when small
    head: bytes = b""  # first bytes (compression sniffing)
    written: bool = False


def safe_member_name(info: tarfile.TarInfo) -> Optional[str]:
    """The cleaned name of a member worth reading (a regular file), None for directories and
    the like; ArchiveError when the member could escape the archive."""
    name = info.name
    if name.startswith("/"):
        raise ArchiveError(f"archive member {name!r}: absolute paths are not allowed")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"archive member {name!r}: '..' escapes the archive")
    if info.issym() or info.islnk():
        raise ArchiveError(f"archive member {name!r}: links are not allowed "
                           f"(points to {info.linkname!r})")
    if not info.isreg():
        return None
    return "/".join(parts)


async def _read(f: BinaryIO, n: int) -> bytes:
    return await asyncio.to_thread(f.read, n)


class _Ingest:
    """One pass over the archive: stream members into the store, remember what is where."""

    def __init__(self, svc: Services, progress: Progress):
        self.svc = svc
        self.progress = progress
        self.members: dict[str, _Member] = {}
        self.by_digest: dict[str, _Member] = {}
        self.layout: Optional[bytes] = None
        self.index: Optional[bytes] = None
        self.docker_manifest: Optional[bytes] = None
        self.cached = 0

    async def run(self, fileobj: BinaryIO, seekable: bool) -> None:
        tar = await asyncio.to_thread(tarfile.open, fileobj=fileobj, mode="r:" if seekable else "r|")
        try:
            if seekable:
                # Check every header before the first byte is written.
                infos = await asyncio.to_thread(tar.getmembers)
                for info in infos:
                    safe_member_name(info)
                for info in infos:
                    await self._member(tar, info)
            else:
                while True:
                    info = await asyncio.to_thread(tar.next)
                    if info is None:
                        break
                    await self._member(tar, info)
        except tarfile.TarError as err:
            raise ArchiveError(f"unreadable archive: {err}") from None
        finally:
            tar.close()

    async def _member(self, tar: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        name = safe_member_name(info)
        if name is None:
            return
        f = tar.extractfile(info)
        assert f is not None
        if name in ("oci-layout", "index.json", "manifest.json"):
            if info.size > _JSON_LIMIT:
                raise ArchiveError(f"{name}: {info.size} bytes is over the {_JSON_LIMIT} byte limit")
            data = await _read(f, info.size)
            if name == "oci-layout":
                self.layout = data
            elif name == "index.json":
                self.index = data
            else:
                self.docker_manifest = data
            return
        m = _BLOB_PATH.match(name)
        if m:
            expected = f"{m.group(1)}:{m.group(2)}"
            try:
                digests.parse(expected)
            except errdefs.InvalidArgument:
                raise ArchiveError(f"archive member {name!r}: not a valid blob digest") from None
            member = _Member(name, info.size, expected)
            await self._write(f, member, expected)
        else:
            member = _Member(name, info.size)
            if info.size <= mt.MAX_MANIFEST_SIZE:
                data = await _read(f, info.size)
                member.data, member.head = data, data[:16]
                member.digest = "sha256:" + hashlib.sha256(data).hexdigest()
            else:
                await self._write(f, member, "")
        self.members[name] = member
        if member.digest:
            self.by_digest.setdefault(member.digest, member)

    async def _write(self, f: BinaryIO, member: _Member, expected: str) -> None:
        size = member.size
        ref = f"tar-{member.name}"
        key = expected or member.name
        if size <= mt.MAX_MANIFEST_SIZE:
            data = await _read(f, size)
            if len(data) != size:
                raise ArchiveError(f"{member.name}: truncated archive")
            actual = "sha256:" + hashlib.sha256(data).hexdigest() if not expected or \
                expected.startswith("sha256:") else _hash(expected, data)
            if expected and actual != expected:
                raise ArchiveError(f"blob {member.name}: content does not match its digest "
                                   f"(got {actual})")
            member.digest, member.head = actual, data[:16]
            if self.cached + size <= _CACHE_LIMIT:
                member.data = data
                self.cached += size
            self.progress.start(key, size, "importing")
            await self.svc.write_blob(ref, data, actual)
            self.progress.finish(key, "done")
            member.written = True
            return
        hasher = None if expected else hashlib.sha256()
        self.progress.start(key, size, "importing")
        try:
            async with self.svc.writer(ref, size, expected) as w:
                if w.exists:
                    self.progress.finish(key, "exists")
                    member.written = True
                    member.head = await _read(f, 16)
                    return
                if w.offset and not hasher:
                    await asyncio.to_thread(_skip, f, w.offset)
                elif w.offset:
                    w.offset = 0
                    await self.svc.abort(ref)
                    raise errdefs.Unavailable(f"{ref}: an ingest of unknown digest was in progress; retry")
                remaining = size - w.offset
                first = True
                while remaining > 0:
                    chunk = await _read(f, min(CHUNK, remaining))
                    if not chunk:
                        raise ArchiveError(f"{member.name}: truncated archive")
                    if first:
                        member.head, first = chunk[:16], False
                    if hasher is not None:
                        hasher.update(chunk)
                    await w.write(chunk)
                    remaining -= len(chunk)
                    self.progress.advance(key, len(chunk))
                actual = expected or "sha256:" + hasher.hexdigest()
                try:
                    await w.commit(size, actual)
                except errdefs.FailedPrecondition as err:
                    raise ArchiveError(f"blob {member.name}: content does not match its digest "
                                       f"or size: {err.message}") from None
                member.digest = actual
        except errdefs.ContainerdError:
            await self.svc.abort(ref)
            raise
        self.progress.finish(key, "done")
        member.written = True


def _skip(f: BinaryIO, n: int) -> None:
    while n > 0:
        chunk = f.read(min(CHUNK, n))
        if not chunk:
            raise ArchiveError("truncated archive")
        n -= len(chunk)


def _hash(expected: str, data: bytes) -> str:
    algorithm = expected.split(":", 1)[0]
    try:
        return f"{algorithm}:" + hashlib.new(algorithm, data).hexdigest()
    except ValueError:
        raise ArchiveError(f"unsupported digest algorithm {algorithm}") from None


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise ArchiveError(f"{what}: not valid JSON: {err}") from None


class _Importer:
    def __init__(self, svc: Services, ingest: _Ingest, options: ImportOptions, progress: Progress):
        self.svc = svc
        self.ingest = ingest
        self.options = options
        self.progress = progress
        self.labels_done: set[str] = set()

    # -- reading blobs -------------------------------------------------------------------------

    def _member(self, digest: str) -> Optional[_Member]:
        return self.ingest.by_digest.get(digest)

    async def ensure(self, desc: Descriptor, what: str) -> None:
        """The blob of `desc` is in the store with that size (written now if it was held back)."""
        m = self._member(desc.digest)
        if m is not None:
            if m.size != desc.size:
                raise ArchiveError(f"{what} {desc.digest}: size {m.size} in the archive, "
                                   f"{desc.size} in its descriptor")
            if not m.written:
                assert m.data is not None
                await self.svc.write_blob(f"tar-{m.name}", m.data, m.digest)
                m.written = True
            return
        info = await self.svc.exists(desc.digest)
        if info is None:
            raise ArchiveError(f"{what} {desc.digest} is neither in the archive nor in the content store")
        if info.size != desc.size:
            raise ArchiveError(f"{what} {desc.digest}: size {info.size} in the store, "
                               f"{desc.size} in its descriptor")

    async def read(self, desc: Descriptor, what: str) -> bytes:
        if desc.size > mt.MAX_MANIFEST_SIZE:
            raise ArchiveError(f"{what} {desc.digest}: {desc.size} bytes is over the "
                               f"{mt.MAX_MANIFEST_SIZE} byte manifest limit")
        await self.ensure(desc, what)
        m = self._member(desc.digest)
        if m is not None and m.data is not None:
            return m.data
        return await self.svc.read_all(desc.digest, limit=mt.MAX_MANIFEST_SIZE)

    # -- the docker format ---------------------------------------------------------------------

    async def docker_index(self) -> Descriptor:
        doc = _json(self.ingest.docker_manifest or b"", "manifest.json")
        if not isinstance(doc, list):
            raise ArchiveError("manifest.json: expected a list of images")
        manifests = []
        for n, entry in enumerate(doc):
            if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
                raise ArchiveError(f"manifest.json entry {n}: no Config")
            config_member = self.ingest.members.get(posixpath.normpath(entry["Config"]))
            if config_member is None:
                raise ArchiveError(f"image config {entry['Config']!r} not found")
            config = Descriptor(mt.DOCKER_CONFIG, config_member.digest, config_member.size)
            await self.ensure(config, "image config")
            layers = await self._docker_layers(entry.get("Layers") or [])
            manifest = {"schemaVersion": 2, "mediaType": mt.DOCKER_MANIFEST,
                        "config": config.to_json(), "layers": [lay.to_json() for lay in layers]}
            data = mt.go_json(manifest)
            desc = Descriptor(mt.DOCKER_MANIFEST, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))
            await self.svc.write_blob(f"manifest-{desc.digest}", data, desc.digest)
            self._remember(desc, data)
            cfg = _json(await self.read(config, "image config"), f"image config {config.digest}")
            if isinstance(cfg, dict) and cfg.get("os"):
                desc.platform = plat.normalize(Platform(os=str(cfg.get("os", "")),
                                                        architecture=str(cfg.get("architecture", "")),
                                                        variant=str(cfg.get("variant", "") or "")))
            tags = entry.get("RepoTags") or []
            if not tags:
                manifests.append(desc)
            for tag in tags:
                name = reference.normalize(str(tag))
                manifests.append(desc.copy(annotations={mt.ANNOTATION_IMAGE_NAME: name,
                                                        mt.ANNOTATION_REF_NAME: reference.oci_ref_name(name)}))
        index = {"schemaVersion": 2, "manifests": [m.to_json() for m in manifests]}
        data = mt.go_json(index)
        desc = Descriptor(mt.OCI_INDEX, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))
        await self.svc.write_blob(f"manifest-{desc.digest}", data, desc.digest)
        self._remember(desc, data)
        return desc

    def _remember(self, desc: Descriptor, data: bytes) -> None:
        m = _Member(f"generated/{desc.digest}", len(data), desc.digest, data, data[:16], True)
        self.ingest.by_digest.setdefault(desc.digest, m)

    async def _docker_layers(self, files: list) -> list[Descriptor]:
        layers = []
        for f in files:
            member = self.ingest.members.get(posixpath.normpath(str(f)))
            if member is None:
                raise ArchiveError(f"layer {f!r} not found")
            layers.append(Descriptor("", member.digest, member.size))
        # A compressed blob already known to have this uncompressed digest is used instead.
        for i, layer in enumerate(layers):
            found = await self.svc.list_content([f'labels."{mt.LABEL_UNCOMPRESSED}"=={layer.digest}'])
            for info in found:
                if info.labels.get(mt.LABEL_UNCOMPRESSED) == layer.digest:
                    head = b""
                    async for chunk in self.svc.read_chunks(info.digest, 0, 10):
                        head += chunk
                    layers[i] = Descriptor(_layer_type(head[:10]), info.digest, info.size)
                    break
            else:
                member = self._member(layer.digest)
                await self.ensure(layer, "layer")
                media_type = _layer_type(member.head if member else b"")
                if media_type == mt.DOCKER_LAYER and self.options.compress_blobs:
                    layers[i] = await self._compress(layer)
                else:
                    layers[i] = layer.copy(media_type=media_type)
        return layers

    async def _compress(self, layer: Descriptor) -> Descriptor:
        """--compress-blobs: store a gzip of uncompressed layer `layer` (labelled with its
        uncompressed digest, as containerd does) and describe that instead."""
        algorithm, _, encoded = layer.digest.partition(":")
        ref = f"compress-blob-{algorithm}-{encoded}"
        z = zlib.compressobj(6, zlib.DEFLATED, 31)
        hasher = hashlib.sha256()
        size = 0
        key = f"compress-{layer.digest}"
        self.progress.start(key, layer.size, "compressing")
        async with self.svc.writer(ref, 0, "") as w:
            if w.offset:
                await self.svc.abort(ref)
                raise errdefs.Unavailable(f"{ref}: a compression was in progress; retry")
            member = self._member(layer.digest)

            async def chunks():
                if member is not None and member.data is not None:
                    for i in range(0, len(member.data), CHUNK):
                        yield member.data[i:i + CHUNK]
                else:
                    async for chunk in self.svc.read_chunks(layer.digest):
                        yield chunk

            async for chunk in chunks():
                out = await asyncio.to_thread(z.compress, chunk)
                self.progress.advance(key, len(chunk))
                if out:
                    hasher.update(out)
                    size += len(out)
                    await w.write(out)
            out = z.flush()
            hasher.update(out)
            size += len(out)
            await w.write(out)
            digest = "sha256:" + hasher.hexdigest()
            await w.commit(size, digest, labels={mt.LABEL_UNCOMPRESSED: layer.digest})
        self.progress.finish(key)
        return Descriptor(mt.DOCKER_LAYER_GZIP, digest, size)

    # -- the walk ------------------------------------------------------------------------------

    async def walk(self, index: Descriptor) -> list[tuple[str, Descriptor]]:
        matcher = self.options.matcher()
        data = await self.read(index, "index")
        doc = mt.parse_document(data, index)
        entries = mt.children(doc, index)
        images: list[tuple[str, Descriptor]] = []
        if self.options.index_name:
            images.append((self.options.index_name, index))
        base = self.options.base_name
        translate = reference.ref_translator(base, True) if base else \
            reference.ref_translator(f"import-{time.strftime('%Y-%m-%d')}", False)
        for i, entry in enumerate(entries):
            entries[i] = entry = await self._typed(entry)
            name = entry.annotations.get(mt.ANNOTATION_IMAGE_NAME, "")
            if not name:
                ref_name = entry.annotations.get(mt.ANNOTATION_REF_NAME, "")
                name = translate(ref_name) if ref_name else ""
            if name:
                images.append((name, entry))
            if self.options.skip_digest_for_named and name:
                continue
            if self.options.digests:
                images.append((f"{base or ('import-' + time.strftime('%Y-%m-%d'))}@{entry.digest}", entry))
        chosen = [e for e in entries if matcher.match(e.platform)]
        if not chosen:
            raise ArchiveError("image might be filtered out: no manifest in the archive matches "
                               f"platform {matcher}")
        await self._label(index, chosen)
        for entry in chosen:
            await self._visit(entry, matcher, 1)
        return images

    async def _typed(self, desc: Descriptor) -> Descriptor:
        """A manifest-position descriptor with a known media type (taken from the document
        itself when the descriptor has none); ArchiveError for anything else."""
        if not desc.media_type:
            data = await self.read(desc, "manifest")
            desc = desc.copy(media_type=mt.document_media_type(data))
        if desc.media_type == mt.DOCKER_SCHEMA1:
            raise ArchiveError(f"manifest {desc.digest}: docker schema 1 manifests are not supported")
        if not (mt.is_manifest(desc.media_type) or mt.is_index(desc.media_type)):
            raise ArchiveError(f"manifest {desc.digest}: unknown manifest media type "
                               f"{desc.media_type or '(none)'!r}")
        return desc

    async def _visit(self, desc: Descriptor, matcher: plat.Matcher, depth: int) -> None:
        if depth > 8:
            raise ArchiveError(f"{desc.digest}: indexes nested too deeply")
        data = await self.read(desc, "manifest")
        doc = mt.parse_document(data, desc)
        kids = mt.children(doc, desc)
        if mt.is_index(desc.media_type):
            kids = [await self._typed(k) for k in kids]
            kids = [k for k in kids if matcher.match(k.platform)]
            await self._label(desc, kids)
            for k in kids:
                await self._visit(k, matcher, depth + 1)
            return
        config, layers = kids[0], kids[1:]
        await self.ensure(config, "image config")
        for layer in layers:
            await self.ensure(layer, "layer")
        await self._label(desc, kids)

    async def _label(self, parent: Descriptor, kids: list[Descriptor]) -> None:
        if not kids or parent.digest in self.labels_done:
            return
        await self.svc.update_labels(parent.digest, mt.children_labels(kids))
        self.labels_done.add(parent.digest)


def _layer_type(head: bytes) -> str:
    if head[:3] == b"\x1f\x8b\x08" or head[:4] == b"\x28\xb5\x2f\xfd":
        return mt.DOCKER_LAYER_GZIP
    return mt.DOCKER_LAYER


async def import_archive(svc: Services, fileobj: BinaryIO, options: Optional[ImportOptions] = None,
                         progress: Optional[Progress] = None, *, seekable: Optional[bool] = None
                         ) -> list[ImageRecord]:
    """Import the archive read from `fileobj` and return the images recorded (ctr's Import).

    Runs under a lease of its own (or `svc`'s): on any failure nothing is recorded and the lease
    is deleted synchronously, taking the blobs written so far with it."""
    options = options or ImportOptions()
    progress = progress or Progress()
    if seekable is None:
        try:
            seekable = fileobj.seekable()
        except (AttributeError, OSError, ValueError):
            seekable = False
    async with svc.leased() as leased:
        ingest = _Ingest(leased, progress)
        await ingest.run(fileobj, seekable)
        importer = _Importer(leased, ingest, options, progress)
        if ingest.layout is not None:
            layout = _json(ingest.layout, "oci-layout")
            version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
            if version != mt.OCI_LAYOUT_VERSION:
                raise ArchiveError(f"unsupported OCI version {version}")
            if ingest.index is None:
                raise ArchiveError(f"missing index.json in OCI layout {mt.OCI_LAYOUT_VERSION}")
            data = ingest.index
            index = Descriptor(mt.OCI_INDEX, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))
            mt.parse_document(data, index)
            await leased.write_blob("tar-index.json", data, index.digest)
            importer._remember(index, data)
        elif ingest.docker_manifest is not None:
            index = await importer.docker_index()
        else:
            raise ArchiveError("unrecognized image format: neither an OCI layout (oci-layout, "
                               "index.json) nor a docker archive (manifest.json)")
        images = await importer.walk(index)
        records = []
        for name, target in images:
            records.append(await leased.image_put(name, target, update_fields=["target"]))
        return records


# -- export ------------------------------------------------------------------------------------

@dataclass
class ExportOptions:
    """ctr images export's flags."""

    platforms: list[str] = field(default_factory=list)
    all_platforms: bool = False
    skip_manifest_json: bool = False
    skip_non_distributable: bool = False

    def matcher(self) -> plat.Matcher:
        if self.platforms:
            return plat.Matcher([plat.parse(p) for p in self.platforms])
        return plat.Matcher([plat.default()])


@dataclass
class _Record:
    name: str
    size: int = 0
    mode: int = 0o444
    data: Optional[bytes] = None
    desc: Optional[Descriptor] = None
    is_dir: bool = False


def _annotated(name: str, target: Descriptor) -> Descriptor:
    ann = dict(target.annotations)
    ann[mt.ANNOTATION_IMAGE_NAME] = name
    ann[mt.ANNOTATION_REF_NAME] = reference.oci_ref_name(name)
    return target.copy(annotations=ann)


async def _blob_records(svc: Services, desc: Descriptor, options: ExportOptions,
                        out: list[_Record], algorithms: set[str], depth: int = 0) -> None:
    """desc and everything under it (containerd's getRecords: all children, no platform filter)."""
    if depth > 8:
        raise errdefs.InvalidArgument(f"{desc.digest}: indexes nested too deeply")
    digests.parse(desc.digest)
    if not (options.skip_non_distributable and mt.is_non_distributable(desc.media_type)):
        out.append(_Record(_blob_path(desc.digest), desc.size, desc=desc))
        algorithms.add(desc.digest.split(":", 1)[0])
    if mt.is_manifest(desc.media_type) or mt.is_index(desc.media_type):
        data = await svc.read_all(desc.digest, limit=mt.MAX_MANIFEST_SIZE)
        doc = mt.parse_document(data, desc)
        for child in mt.children(doc, desc):
            await _blob_records(svc, child, options, out, algorithms, depth + 1)


def _blob_path(dg: str) -> str:
    algorithm, _, encoded = dg.partition(":")
    return f"blobs/{algorithm}/{encoded}"


async def export_archive(svc: Services, out: BinaryIO, images: list[tuple[str, Descriptor]],
                         options: Optional[ExportOptions] = None,
                         progress: Optional[Progress] = None) -> None:
    """Write `images` ((name, target) pairs) to `out` as containerd's archive.Export does: an OCI
    layout (oci-layout, index.json, blobs/...) plus a docker manifest.json for one platform."""
    options = options or ExportOptions()
    progress = progress or Progress()
    matcher = options.matcher()
    manifests = [_annotated(name, target) for name, target in images]
    records: list[_Record] = []
    algorithms: set[str] = set()
    docker: dict[str, tuple[Descriptor, list[str]]] = {}
    resolved_index: dict[str, str] = {}
    for desc in manifests:
        if mt.is_manifest(desc.media_type):
            if desc.digest not in docker:
                await _blob_records(svc, desc, options, records, algorithms)
                docker[desc.digest] = (desc, [])
            name = desc.annotations.get(mt.ANNOTATION_IMAGE_NAME, "")
            if name and not options.skip_manifest_json:
                docker[desc.digest][1].append(name)
        elif mt.is_index(desc.media_type):
            chosen = resolved_index.get(desc.digest)
            if chosen is None:
                digests.parse(desc.digest)
                records.append(_Record(_blob_path(desc.digest), desc.size, desc=desc))
                algorithms.add(desc.digest.split(":", 1)[0])
                data = await svc.read_all(desc.digest, limit=mt.MAX_MANIFEST_SIZE)
                doc = mt.parse_document(data, desc)
                matching = []
                for m in mt.children(doc, desc):
                    if m.platform is None or matcher.match(m.platform):
                        matching.append(m)
                    elif not options.all_platforms:
                        continue
                    await _blob_records(svc, m, options, records, algorithms)
                chosen = ""
                if not options.skip_manifest_json:
                    if matching:
                        matching.sort(key=lambda m: matcher.rank(m.platform))
                        chosen = matching[0].digest
                        docker[chosen] = (matching[0], [])
                    else:
                        raise errdefs.NotFound("no manifest found for platform")
                resolved_index[desc.digest] = chosen
            name = desc.annotations.get(mt.ANNOTATION_IMAGE_NAME, "")
            if chosen and name:
                docker[chosen][1].append(name)
        else:
            raise errdefs.InvalidArgument("only manifests may be exported")

    records.insert(0, _Record("oci-layout", data=mt.go_json({"imageLayoutVersion": mt.OCI_LAYOUT_VERSION})))
    records.insert(1, _Record("index.json", mode=0o644, data=mt.go_json(
        {"schemaVersion": 2, "manifests": [m.to_json() for m in manifests]})))
    if docker:
        entries = []
        for desc, names in docker.values():
            data = await svc.read_all(desc.digest, limit=mt.MAX_MANIFEST_SIZE)
            doc = mt.parse_document(data, desc)
            kids = mt.children(doc, desc)
            entries.append({"Config": _blob_path(kids[0].digest),
                            "RepoTags": [reference.familiar(n) for n in names] or None,
                            "Layers": [_blob_path(k.digest) for k in kids[1:]] or None})
        records.append(_Record("manifest.json", mode=0o644, data=mt.go_json(entries)))
    if algorithms:
        records.append(_Record("blobs/", mode=0o755, is_dir=True))
        records += [_Record(f"blobs/{a}/", mode=0o755, is_dir=True) for a in sorted(algorithms)]

    records.sort(key=lambda r: r.name)
    last = None
    for r in records:
        if r.name == last:
            continue
        last = r.name
        await _write_record(svc, out, r, progress)
    await asyncio.to_thread(out.write, b"\0" * 1024)
    await asyncio.to_thread(out.flush)


def _header(name: str, size: int, mode: int, is_dir: bool) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = 0 if is_dir else size
    info.mode = mode
    info.mtime = 0
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.uname = info.gname = ""
    if len(name) > 100:
        return info.tobuf(format=tarfile.PAX_FORMAT)
    # Go's archive/tar writes the device numbers as octal zeros, not NULs: match it byte for byte.
    buf = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    buf[329:345] = b"0000000\0" * 2
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf)


async def _write_record(svc: Services, out: BinaryIO, r: _Record, progress: Progress) -> None:
    if r.is_dir:
        out.write(_header(r.name, 0, r.mode, True))
        return
    if r.data is not None:
        out.write(_header(r.name, len(r.data), r.mode, False) + r.data + _pad(len(r.data)))
        return
    desc = r.desc
    assert desc is not None
    out.write(_header(r.name, desc.size, r.mode, False))
    algorithm = desc.digest.split(":", 1)[0]
    hasher = hashlib.new(algorithm)
    written = 0
    progress.start(desc.digest, desc.size, "exporting")
    async for chunk in svc.read_chunks(desc.digest):
        hasher.update(chunk)
        written += len(chunk)
        if written > desc.size:
            break
        await asyncio.to_thread(out.write, chunk)
        progress.advance(desc.digest, len(chunk))
    if written != desc.size:
        raise errdefs.FailedPrecondition(f"unexpected copy size for {r.name}: {written} != {desc.size}")
    if f"{algorithm}:{hasher.hexdigest()}" != desc.digest:
        raise errdefs.FailedPrecondition(f"unexpected digest {algorithm}:{hasher.hexdigest()} copied")
    out.write(_pad(desc.size))
    progress.finish(desc.digest)


def _pad(n: int) -> bytes:
    rem = n % 512
    return b"\0" * (512 - rem) if rem else b""
