"""The walking differ (containerd's diff/walking + diff/apply): applies layer blobs from the
namespaced content store onto mounts, and writes the difference between two mounts as a new
layer blob into it. The tar work is core/archive's; this module only mounts, reads, writes and
names errors as containerd does. It must not know snapshotters: it gets mounts.

Apply(desc, mounts):
- one overlay mount with an `upperdir=`: the layer goes into the upperdir directly, whiteouts in
  overlay's form, new directories copying their attributes from the lowerdirs (containerd's
  overlay fast path); one read-write bind mount: into its source; anything else is mounted on a
  temporary directory first;
- the blob must have the descriptor's digest (and size, when the descriptor gives one);
- the answer is the uncompressed layer: media type `application/vnd.oci.image.layer.v1.tar`,
  the diff_id as digest, the tar's size.
Compare(lower, upper, media type, ref, labels):
- media type `…layer.v1.tar+gzip` (the default) or `…layer.v1.tar`; anything else is
  NotImplemented "unsupported diff media type: <type>";
- lower is mounted (a bind mount is read in place), upper read-only; the tar goes through a
  content writer under `ref` (a fresh one when empty, aborted on failure), committed with the
  given labels plus `containerd.io/uncompressed` = the tar's digest for gzip.

Blocking work runs on a thread of its own per call (never the loop's shared executor, which the
content store's writes need meanwhile).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

import structlog

from pycontainerd.core import archive, errdefs
from pycontainerd.core import mount as mountmod
from pycontainerd.core.mount import Mount

log = structlog.get_logger(__name__)


@dataclass
class Descriptor:
    """An OCI descriptor, as the diff API carries it."""

    media_type: str = ""
    digest: str = ""
    size: int = 0
    annotations: dict[str, str] = field(default_factory=dict)


def unique_ref() -> str:
    """containerd's uniqueRef: "<unix nanos>-<4 url-safe base64 chars>"."""
    return f"{time.time_ns()}-{base64.urlsafe_b64encode(os.urandom(3)).decode()}"


async def run_in_thread(fn: Callable[..., Any], *args: Any, name: str = "differ") -> Any:
    """Run fn(*args) on a new thread and await its result. If the caller is cancelled, the
    thread still runs to its end (mounts get unmounted) before the cancellation goes on."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()
    ctx = contextvars.copy_context()

    def done(ok: bool, value: Any) -> None:
        if fut.cancelled():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def run() -> None:
        try:
            value = ctx.run(fn, *args)
        except BaseException as e:  # handed to the awaiting task
            loop.call_soon_threadsafe(done, False, e)
        else:
            loop.call_soon_threadsafe(done, True, value)

    threading.Thread(target=run, name=name, daemon=True).start()
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await fut
        raise


def readonly_mounts(mounts: Iterable[Any]) -> list[Mount]:
    """containerd's readonlyMounts: an overlay loses upperdir/workdir (the upperdir becomes the
    top lowerdir), anything else gets "ro"."""
    out = []
    for m in mounts:
        m = Mount.from_any(m)
        if m.type == "overlay":
            upper = None
            opts = []
            for o in m.options:
                if o.startswith("upperdir="):
                    upper = o[len("upperdir="):]
                elif o.startswith("workdir="):
                    continue
                else:
                    opts.append(o)
            if upper is not None:
                opts = [f"lowerdir={upper}:{o[len('lowerdir='):]}" if o.startswith("lowerdir=") else o
                        for o in opts]
            out.append(Mount(m.type, m.source, m.target, opts))
            continue
        opts = [o for o in m.options if o != "rw"]
        if "ro" not in opts:
            opts.append("ro")
        out.append(Mount(m.type, m.source, m.target, opts))
    return out


def _bind_source(mounts: list[Mount]) -> Optional[str]:
    """The directory to use in place of mounting: the source of a single bind mount."""
    if len(mounts) == 1 and mounts[0].type in ("bind", "rbind") and not mounts[0].target:
        return mounts[0].source
    return None


@contextlib.contextmanager
def _mounted(mounts: list[Mount], temp_root: Optional[str], readonly: bool = False):
    """A directory showing `mounts`: a bind mount's source as it is, else a temp mount."""
    src = _bind_source(mounts)
    if src is not None:
        yield src
        return
    if not mounts:  # containerd mounts nothing on its temp dir: an empty tree
        empty = tempfile.mkdtemp(prefix="containerd-mount-", dir=temp_root)
        try:
            yield empty
        finally:
            shutil.rmtree(empty, ignore_errors=True)
        return
    cm = mountmod.temp_mount(readonly_mounts(mounts) if readonly else mounts, root=temp_root,
                             prefix="containerd-mount")
    try:
        root = cm.__enter__()
    except OSError as e:
        raise errdefs.Unknown(f"failed to mount: {e}") from e
    with contextlib.ExitStack() as stack:
        stack.push(cm)
        yield root


class _BlobReader:
    """A content store ReaderAt as the read(n) function archive wants (worker thread side)."""

    def __init__(self, ra: Any):
        self._ra = ra
        self._offset = 0

    def read(self, n: int) -> bytes:
        data = self._ra.read_at_sync(self._offset, n)
        self._offset += len(data)
        return data


class WalkingDiff:
    """Apply and Compare over a namespaced content service (plugins/content/service.py)."""

    def __init__(self, content: Any, temp_root: Optional[str] = None):
        self.content = content
        self.temp_root = temp_root

    def _temp_root(self) -> Optional[str]:
        if self.temp_root:
            os.makedirs(self.temp_root, exist_ok=True)
        return self.temp_root

    # -- apply ----------------------------------------------------------------------------

    async def apply(self, desc: Descriptor, mounts: Iterable[Any],
                    payloads: Optional[Mapping[str, Any]] = None) -> Descriptor:
        started = time.monotonic()
        mounts = [Mount.from_any(m) for m in mounts]
        try:
            archive.diff_compression(desc.media_type)
        except errdefs.Unimplemented:
            raise errdefs.Unknown(f"failed to get stream processor for {desc.media_type}: "
                                  "no processor for media-type") from None
        try:
            ra = await self.content.reader(desc.digest)
        except errdefs.NotFound as e:
            raise errdefs.NotFound(f"failed to get reader from content store: {e}") from None
        try:
            result = await run_in_thread(self._apply_sync, desc, mounts, ra, name="differ-apply")
        finally:
            ra.close()
        log.debug("diff applied", d=f"{time.monotonic() - started:.3f}s", digest=desc.digest,
                  size=desc.size, media=desc.media_type)
        return Descriptor(media_type=archive.MEDIA_TYPE_LAYER, digest=result.diff_id,
                          size=result.uncompressed_size)

    def _blob_file(self, digest: str) -> Optional[Any]:
        """The blob's file in the local store, opened (unpigz can then read it itself)."""
        blob_path = getattr(getattr(self.content, "backend", None), "blob_path", None)
        if blob_path is None:
            return None
        try:
            return open(blob_path(digest), "rb", buffering=0)
        except (OSError, errdefs.ContainerdError):
            return None

    def _apply_sync(self, desc: Descriptor, mounts: list[Mount], ra: Any) -> archive.ApplyResult:
        f = self._blob_file(desc.digest)
        try:
            return self._apply_from(desc, mounts, f if f is not None else _BlobReader(ra).read)
        finally:
            if f is not None:
                f.close()

    def _apply_from(self, desc: Descriptor, mounts: list[Mount], source: Any) -> archive.ApplyResult:
        kwargs = dict(expected_digest=desc.digest, expected_size=desc.size if desc.size > 0 else -1)
        upper = mountmod.overlay_option(mounts, "upperdir") if len(mounts) == 1 and mounts[0].type == "overlay" else None
        if upper is not None:
            return archive.apply_layer(upper, source, desc.media_type, overlay=True,
                                       parents=mountmod.overlay_lowerdirs(mounts), **kwargs)
        src = _bind_source(mounts)
        if src is not None and "ro" not in mounts[0].options:
            return archive.apply_layer(src, source, desc.media_type, **kwargs)
        with _mounted(mounts, self._temp_root()) as root:
            return archive.apply_layer(root, source, desc.media_type, **kwargs)

    # -- compare --------------------------------------------------------------------------

    async def compare(self, lower: Iterable[Any], upper: Iterable[Any], media_type: str = "",
                      ref: str = "", labels: Optional[Mapping[str, str]] = None) -> Descriptor:
        media_type = media_type or archive.MEDIA_TYPE_LAYER_GZIP
        if media_type == archive.MEDIA_TYPE_LAYER:
            compression = archive.UNCOMPRESSED
        elif media_type == archive.MEDIA_TYPE_LAYER_GZIP:
            compression = archive.GZIP
        else:
            raise errdefs.Unimplemented(f"unsupported diff media type: {media_type}")
        lower = [Mount.from_any(m) for m in lower]
        upper = [Mount.from_any(m) for m in upper]
        new_ref = not ref
        ref = ref or unique_ref()
        try:
            writer = await self.content.writer(ref)
        except errdefs.ContainerdError as e:
            raise type(e)(f"failed to open writer: {e}") from None
        labels = dict(labels or {})
        committed = False
        try:
            if not new_ref:
                await writer.truncate(0)
            loop = asyncio.get_running_loop()

            def sink(data: bytes) -> None:
                asyncio.run_coroutine_threadsafe(writer.write(data), loop).result()

            result = await run_in_thread(self._compare_sync, lower, upper, sink, compression,
                                         name="differ-compare")
            if compression == archive.GZIP:
                labels[archive.UNCOMPRESSED_LABEL] = result.diff_id
            dgst = writer.digest()
            try:
                await writer.commit(0, dgst, labels)
            except errdefs.AlreadyExists:
                pass
            committed = True
        except errdefs.ContainerdError:
            raise
        except OSError as e:
            raise errdefs.Unknown(f"failed to write compressed diff: {e}") from e
        finally:
            if not committed:
                await writer.close()
                if new_ref:
                    with contextlib.suppress(errdefs.ContainerdError):
                        await self.content.abort(ref)
        info = self.content.info(dgst)
        if compression == archive.GZIP and archive.UNCOMPRESSED_LABEL not in (info.labels or {}):
            info.labels = dict(info.labels or {})
            info.labels[archive.UNCOMPRESSED_LABEL] = labels[archive.UNCOMPRESSED_LABEL]
            try:
                await self.content.update(info, [f"labels.{archive.UNCOMPRESSED_LABEL}"])
            except errdefs.ContainerdError as e:
                raise type(e)(f"error setting uncompressed label: {e}") from None
        return Descriptor(media_type=media_type, digest=info.digest, size=info.size)

    def _compare_sync(self, lower: list[Mount], upper: list[Mount], sink: Callable[[bytes], None],
                      compression: str) -> archive.DiffResult:
        temp_root = self._temp_root()
        with _mounted(lower, temp_root) as lower_root, \
                _mounted(upper, temp_root, readonly=True) as upper_root:
            return archive.write_layer(lower_root, upper_root, sink, compression)
