"""The local content store: the backend of `io.containerd.content.v1.content`, blobs on disk keyed
by digest, and the resumable ingests that become them. Not namespaced: the metadata layer
(plugins/metadata/content.py) decides who sees what; this module knows no namespace, lease or
database, and must not.

On disk, under the plugin root (containerd's layout):

    blobs/<algorithm>/<hex>        committed blobs, read-only files, only ever created by rename
    ingest/<sha256 of ref>/        one dir per open ingest:
        ref                        the ref, verbatim
        data                       the bytes written so far (offset = its size)
        startedat, updatedat       RFC 3339 timestamps
        total                      the announced total size, when one was given

Semantics (containerd's content/local):
- one writer per ref at a time (in this process); a second `writer(ref)` retries briefly and then
  fails with Unavailable "ref <ref> locked for <d> (since <t>)";
- a writer resumes an ingest left by a closed writer, a dead client or a killed daemon: its
  offset is the size of `data` and the running hash is recomputed from it;
- `commit(size, expected)` fsyncs the data, checks size and digest (FailedPrecondition, nothing
  committed, the ingest stays), renames `data` into blobs/ and fsyncs that directory. A digest
  that is already in blobs/ gives AlreadyExists (the ingest is removed). Nothing in blobs/ is ever
  partial: a crash leaves either no blob or the whole one.
- digests: sha256 (canonical), sha384 and sha512. A writer hashes with the algorithm of the
  digest it expects (sha256 when none is known); a commit expecting another algorithm rehashes.

API for the rest of the daemon (all coroutines unless noted; hashing, fsync and big reads and
writes run in worker threads, small metadata file operations inline):

    info(digest) -> Info                       NotFound "content <digest>: not found"
    reader(digest) -> ReaderAt                 `await ra.read_at(offset, n)`, `ra.size`, `ra.close()`
    read(digest, offset=0, size=-1) -> bytes
    walk(*filters) -> list[Info]               every blob (filters: digest, labels.*)
    delete(digest)                             removes the blob file; NotFound when absent
    update(info, paths) -> Info                only with a label store (else FailedPrecondition)
    writer(ref, total=0, expected="", algorithm="") -> Writer
    status(ref) / list_statuses(*filters) / abort(ref)
    walk_status_refs() -> list[str]            the refs of every ingest dir, cheap (for GC)

The garbage collector uses `walk()` and `delete(digest)` for blobs no namespace references, and
`walk_status_refs()` with `abort(ref)` for ingests nobody records; it must hold the namespaced
store's exclusive lock meanwhile (see plugins/metadata/content.py).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import hashlib
import os
import random
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import structlog

from pycontainerd.core import digest as digests
from pycontainerd.core import errdefs, filters

log = structlog.get_logger(__name__)

CANONICAL = "sha256"
ALGORITHMS = tuple(digests.ALGORITHMS)  # sha256, sha384, sha512
CHUNK = 1 << 20
"""Read/copy buffer size (containerd's 1 MiB pool buffers)."""
INLINE_LIMIT = 64 << 10
"""Writes and reads up to this size run on the event loop; bigger ones go to a worker thread."""


# ---------------------------------------------------------------------------------------------
# plain types


@dataclass
class Info:
    """A blob: digest, size, times and (at the metadata layer) labels."""

    digest: str
    size: int
    created_at: datetime | None = None
    updated_at: datetime | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Status:
    """Progress of an ingest."""

    ref: str
    offset: int = 0
    total: int = 0
    expected: str = ""
    started_at: datetime | None = None
    updated_at: datetime | None = None


def adapt_info(info: Info) -> filters.Adaptor:
    """containerd's content.AdaptInfo: `digest` and `labels.<key>` are filterable."""
    def adaptor(path):
        if not path:
            return "", False
        if path[0] == "digest":
            return info.digest, True
        if path[0] == "labels":
            if not info.labels or len(path) < 2:
                return "", False
            key = ".".join(path[1:])
            return (info.labels[key], True) if key in info.labels else ("", False)
        return "", False
    return adaptor


def adapt_status(status: Status) -> filters.Adaptor:
    """Only `ref` is filterable, as in containerd."""
    def adaptor(path):
        if path and path[0] == "ref":
            return status.ref, True
        return "", False
    return adaptor


class LabelStore(Protocol):
    """Optional mutable labels per digest (the metadata layer keeps its own; tests use this)."""

    def get(self, digest: str) -> dict[str, str]: ...
    def set(self, digest: str, labels: Mapping[str, str]) -> None: ...
    def update(self, digest: str, labels: Mapping[str, str]) -> dict[str, str]: ...


class MemoryLabelStore:
    """A LabelStore in a dict; `update` removes keys given an empty value."""

    def __init__(self) -> None:
        self._labels: dict[str, dict[str, str]] = {}

    def get(self, digest: str) -> dict[str, str]:
        return dict(self._labels.get(digest, {}))

    def set(self, digest: str, labels: Mapping[str, str]) -> None:
        self._labels[digest] = {k: v for k, v in labels.items() if v}

    def update(self, digest: str, labels: Mapping[str, str]) -> dict[str, str]:
        current = self._labels.setdefault(digest, {})
        for k, v in labels.items():
            if v:
                current[k] = v
            else:
                current.pop(k, None)
        return dict(current)


# ---------------------------------------------------------------------------------------------
# helpers


def new_hasher(algorithm: str):
    if algorithm not in digests.ALGORITHMS:
        raise errdefs.InvalidArgument(f"unsupported digest algorithm {algorithm!r}")
    return hashlib.new(algorithm)


def _hash_file(path: Path | str, algorithm: str, hasher=None) -> tuple[Any, int]:
    """Hash a whole file (worker thread): (hasher, bytes read)."""
    hasher = hasher or hashlib.new(algorithm)
    n = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while True:
            got = f.readinto(buf)
            if not got:
                break
            hasher.update(view[:got])
            n += got
    return hasher, n


def format_timestamp(dt: datetime) -> str:
    """RFC 3339 with nanosecond precision in UTC, as Go's time.MarshalText writes."""
    dt = dt.astimezone(timezone.utc)
    frac = f"{dt.microsecond:06d}".rstrip("0")
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


def parse_timestamp(text: str) -> datetime:
    """Go's RFC 3339 (nanoseconds allowed) to an aware datetime; ValueError if malformed."""
    s = text.strip()
    if s.endswith("Z") or s.endswith("z"):
        s = s[:-1] + "+00:00"
    head, dot, rest = s.partition(".")
    if dot:  # cut fractions to microseconds
        digits = ""
        i = 0
        while i < len(rest) and rest[i].isdigit():
            digits += rest[i]
            i += 1
        s = f"{head}.{(digits + '000000')[:6]}{rest[i:]}"
    dt = datetime.fromisoformat(s)
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _mtime(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(st.st_mtime_ns / 1e9, timezone.utc)


def _atime(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(st.st_atime_ns / 1e9, timezone.utc)


def _write_small(path: Path, text: str) -> None:
    """Replace a small metadata file atomically (temp + rename). No fsync: a torn ingest
    metadata file only makes resume start the ingest over."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def go_duration(seconds: float) -> str:
    """Go's Duration.String() (e.g. "1.5s", "2m3.000001s", "350µs")."""
    ns = int(round(seconds * 1e9))
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_trim(ns / 1e3)}µs"
    if ns < 1_000_000_000:
        return f"{sign}{_trim(ns / 1e6)}ms"
    h, rem = divmod(ns, 3600 * 10**9)
    m, rem = divmod(rem, 60 * 10**9)
    s = _trim(rem / 1e9)
    if h:
        return f"{sign}{h}h{m}m{s}s"
    if m:
        return f"{sign}{m}m{s}s"
    return f"{sign}{s}s"


def _trim(value: float) -> str:
    return f"{value:.9f}".rstrip("0").rstrip(".")


# ---------------------------------------------------------------------------------------------
# ref locks (process-wide, like containerd's)

_locks: dict[tuple[str, str], float] = {}
_locks_mu = threading.Lock()


def _try_lock(root: str, ref: str) -> None:
    with _locks_mu:
        since = _locks.get((root, ref))
        if since is not None:
            held = time.time() - since
            when = datetime.fromtimestamp(since, timezone.utc)
            raise errdefs.Unavailable(
                f"ref {ref} locked for {go_duration(held)} (since {when.strftime('%Y-%m-%d %H:%M:%S.%f')} +0000 UTC)")
        _locks[(root, ref)] = time.time()


def _unlock(root: str, ref: str) -> None:
    with _locks_mu:
        _locks.pop((root, ref), None)


# ---------------------------------------------------------------------------------------------
# reading


class ReaderAt:
    """An open blob: `size`, `await read_at(offset, n)` (short only at the end), `close()`."""

    def __init__(self, fd: int, size: int):
        self._fd = fd
        self.size = size

    def read_at_sync(self, offset: int, n: int) -> bytes:
        """Blocking read (for worker threads)."""
        out = []
        while n > 0:
            data = os.pread(self._fd, n, offset)
            if not data:
                break
            out.append(data)
            offset += len(data)
            n -= len(data)
        return out[0] if len(out) == 1 else b"".join(out)

    async def read_at(self, offset: int, n: int) -> bytes:
        if offset < 0:
            raise errdefs.InvalidArgument(f"negative offset {offset}")
        n = max(0, min(n, self.size - offset))
        if n <= INLINE_LIMIT:
            return self.read_at_sync(offset, n)
        return await asyncio.get_running_loop().run_in_executor(None, self.read_at_sync, offset, n)

    async def chunks(self, offset: int = 0, size: int = -1, chunk: int = CHUNK):
        """The bytes of [offset, offset+size) (size < 0: to the end) in chunks of `chunk`."""
        end = self.size if size < 0 else min(self.size, offset + size)
        while offset < end:
            data = await self.read_at(offset, min(chunk, end - offset))
            if not data:
                return
            yield data
            offset += len(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "ReaderAt":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------
# the store


class LocalStore:
    """The content store on disk under `root` (see the module docstring)."""

    def __init__(self, root: Path | str, labels: LabelStore | None = None):
        self.root = Path(root)
        self.labels = labels
        (self.root / "ingest").mkdir(parents=True, exist_ok=True)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self._lock_root = str(self.root.resolve())
        self._active: dict[str, "Writer"] = {}
        """Open writers by ingest dir name: their offset runs ahead of the file while a
        pipelined write is in flight, so status reports theirs."""

    # -- paths -------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Where blob `digest` lives; InvalidArgument for a malformed digest."""
        try:
            digests.parse(digest)
        except errdefs.InvalidArgument as e:
            raise errdefs.InvalidArgument(
                f"cannot calculate blob path from invalid digest: {e.message}") from None
        algorithm, _, hexpart = digest.partition(":")
        return self.root / "blobs" / algorithm / hexpart

    def ingest_root(self, ref: str) -> Path:
        """The ingest dir of `ref`: named by the sha256 of the ref, so paths stay short."""
        return self.root / "ingest" / hashlib.sha256(ref.encode()).hexdigest()

    # -- blobs -------------------------------------------------------------------------------

    def info_sync(self, digest: str) -> Info:
        path = self.blob_path(digest)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise errdefs.NotFound(f"content {digest}") from None
        labels = self.labels.get(digest) if self.labels is not None else {}
        return Info(digest, st.st_size, _mtime(st), _atime(st), labels)

    async def info(self, digest: str) -> Info:
        return self.info_sync(digest)

    def exists(self, digest: str) -> bool:
        """True when the blob is present (a plain stat; no error for a missing one)."""
        return self.blob_path(digest).exists()

    async def reader(self, digest: str) -> ReaderAt:
        path = self.blob_path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise errdefs.NotFound(f"blob {digest} expected at {path}: blob not found") from None
        return ReaderAt(fd, os.fstat(fd).st_size)

    async def read(self, digest: str, offset: int = 0, size: int = -1) -> bytes:
        """The bytes of a blob from `offset`, `size` of them (negative: to the end)."""
        with await self.reader(digest) as ra:
            n = ra.size - offset if size < 0 else size
            return await ra.read_at(offset, n)

    async def delete(self, digest: str) -> None:
        """Remove blob `digest` (the garbage collector's tool); NotFound when absent."""
        path = self.blob_path(digest)
        try:
            os.unlink(path)
        except FileNotFoundError:
            raise errdefs.NotFound(f"content {digest}") from None

    async def update(self, info: Info, paths: list[str] | tuple[str, ...] = ()) -> Info:
        """Set labels (all, or the `labels.<key>` paths) through the label store."""
        if self.labels is None:
            raise errdefs.FailedPrecondition("update not supported on immutable content store")
        path = self.blob_path(info.digest)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise errdefs.NotFound(f"content {info.digest}") from None
        replace, labels = True, dict(info.labels or {})
        if paths:
            replace, labels = False, {}
            for p in paths:
                if p.startswith("labels."):
                    key = p[len("labels."):]
                    labels[key] = (info.labels or {}).get(key, "")
                elif p == "labels":
                    replace, labels = True, dict(info.labels or {})
                else:
                    raise errdefs.InvalidArgument(
                        f'cannot update "{p}" field on content info "{info.digest}"')
        if replace:
            self.labels.set(info.digest, labels)
            labels = self.labels.get(info.digest)
        else:
            labels = self.labels.update(info.digest, labels)
        updated = _now()
        try:
            os.utime(path, ns=(int(updated.timestamp() * 1e9), st.st_mtime_ns))
        except OSError:
            log.warning("could not change access time", digest=info.digest)
        return Info(info.digest, st.st_size, _mtime(st), updated, labels)

    def _walk_sync(self, match: filters.Filter) -> list[Info]:
        found: list[Info] = []
        blobs = self.root / "blobs"
        for algorithm in sorted(os.listdir(blobs)):
            if algorithm not in digests.ALGORITHMS:
                continue
            with os.scandir(blobs / algorithm) as entries:
                for entry in entries:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    digest = f"{algorithm}:{entry.name}"
                    try:
                        digests.parse(digest)
                    except errdefs.InvalidArgument:
                        log.error("invalid digest for blob path", path=entry.path)
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # deleted meanwhile
                    labels = self.labels.get(digest) if self.labels is not None else {}
                    info = Info(digest, st.st_size, _mtime(st), _atime(st), labels)
                    if match.match(adapt_info(info)):
                        found.append(info)
        return found

    async def walk(self, *filter_strings: str) -> list[Info]:
        """Every blob matching the filters (OR-ed; `digest==...`, `labels.k==v`)."""
        match = filters.parse(*filter_strings)
        return await asyncio.get_running_loop().run_in_executor(None, self._walk_sync, match)

    # -- ingests -----------------------------------------------------------------------------

    def _status_sync(self, path: Path) -> Status:
        try:
            st = os.stat(path / "data")
        except FileNotFoundError as e:
            raise errdefs.NotFound(f"stat {path / 'data'}: {e.strerror.lower()}") from None
        try:
            ref = (path / "ref").read_text()
        except FileNotFoundError as e:
            raise errdefs.NotFound(f"open {path / 'ref'}: {e.strerror.lower()}") from None
        try:
            started = parse_timestamp((path / "startedat").read_text())
        except FileNotFoundError as e:
            raise errdefs.NotFound(f"could not read startedat: open {path / 'startedat'}: "
                                   f"{e.strerror.lower()}") from None
        except ValueError as e:
            raise errdefs.Unknown(f"could not read startedat: {e}") from None
        try:
            updated = parse_timestamp((path / "updatedat").read_text())
        except FileNotFoundError as e:
            raise errdefs.NotFound(f"could not read updatedat: open {path / 'updatedat'}: "
                                   f"{e.strerror.lower()}") from None
        except ValueError as e:
            raise errdefs.Unknown(f"could not read updatedat: {e}") from None
        mtime = _mtime(st)
        if mtime > updated:  # updatedat is written on close only; the data's mtime is fresher
            updated = mtime
        offset = st.st_size
        active = self._active.get(path.name)
        if active is not None:
            offset, updated = active.offset, max(updated, active.updated_at)
        return Status(ref=ref, offset=offset, total=self._total(path), started_at=started,
                      updated_at=updated)

    @staticmethod
    def _total(path: Path) -> int:
        try:
            return int((path / "total").read_text())
        except (OSError, ValueError):
            return 0

    async def status(self, ref: str) -> Status:
        """The ingest of `ref` (NotFound when there is none)."""
        return self._status_sync(self.ingest_root(ref))

    async def list_statuses(self, *filter_strings: str) -> list[Status]:
        """Every ingest matching the filters (only `ref` is filterable)."""
        match = filters.parse(*filter_strings)
        found = []
        ingest = self.root / "ingest"
        for name in sorted(os.listdir(ingest)):
            try:
                status = self._status_sync(ingest / name)
            except errdefs.NotFound:
                continue  # committed or aborted meanwhile
            if match.match(adapt_status(status)):
                found.append(status)
        return found

    def walk_status_refs(self) -> list[str]:
        """The ref of every ingest dir (unreadable ones are logged and skipped)."""
        refs = []
        ingest = self.root / "ingest"
        for name in sorted(os.listdir(ingest)):
            try:
                refs.append((ingest / name / "ref").read_text())
            except OSError as e:
                log.error("failed to read ingest ref", path=str(ingest / name / "ref"), error=str(e))
        return refs

    async def abort(self, ref: str) -> None:
        """Remove the ingest of `ref` and its data; NotFound when there is none."""
        path = self.ingest_root(ref)
        if not path.exists():
            raise errdefs.NotFound(f'ingest ref "{ref}"')
        await asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, path, True)

    async def writer(self, ref: str, total: int = 0, expected: str = "", algorithm: str = "") -> "Writer":
        """Open (or resume) the ingest `ref`; one writer per ref at a time.

        `expected` already present: AlreadyExists. `algorithm` picks the running hash when no
        `expected` says it (default sha256)."""
        if not ref:
            raise errdefs.InvalidArgument("ref must not be empty")
        err: errdefs.ContainerdError | None = None
        for count in range(10):
            try:
                _try_lock(self._lock_root, ref)
                err = None
                break
            except errdefs.Unavailable as e:
                err = e
                await asyncio.sleep(random.randrange(1 << count) / 1000)
        if err is not None:
            raise err
        try:
            return await self._writer(ref, total, expected, algorithm)
        except BaseException:
            _unlock(self._lock_root, ref)
            raise

    async def _writer(self, ref: str, total: int, expected: str, algorithm: str) -> "Writer":
        if expected:
            if self.blob_path(expected).exists():
                raise errdefs.AlreadyExists(f"content {expected}")
            algorithm = expected.partition(":")[0]
        algorithm = algorithm or CANONICAL
        hasher = new_hasher(algorithm)
        path = self.ingest_root(ref)
        data = path / "data"
        offset = 0
        started = updated = None
        resumed = False
        try:
            path.mkdir()
        except FileExistsError:
            try:
                status = self._status_sync(path)
                if status.ref != ref:
                    raise errdefs.Unknown(f"ref key does not match: {ref} != {status.ref}")
                if total > 0 and status.total > 0 and total != status.total:
                    raise errdefs.Unknown(f"provided total differs from status: {total} != {status.total}")
                if status.offset > INLINE_LIMIT:
                    hasher, offset = await asyncio.get_running_loop().run_in_executor(
                        None, _hash_file, data, algorithm, hasher)
                else:
                    hasher, offset = _hash_file(data, algorithm, hasher)
                started, updated, total = status.started_at, status.updated_at, status.total
                resumed = True
            except errdefs.ContainerdError as e:
                log.info("failed to resume the ingest, starting over", path=str(path), error=str(e))
        if not resumed:
            started = updated = _now()
            (path / "ref").write_text(ref)
            stamp = format_timestamp(started)
            _write_small(path / "startedat", stamp)
            _write_small(path / "updatedat", stamp)
            if total > 0:
                _write_small(path / "total", str(total))
            else:
                try:
                    os.unlink(path / "total")
                except FileNotFoundError:
                    pass
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        if not resumed:
            flags |= os.O_TRUNC
        fd = os.open(data, flags, 0o666)
        os.lseek(fd, offset, os.SEEK_SET)
        if resumed and os.fstat(fd).st_size != offset:  # grew while we hashed: keep what we hashed
            os.ftruncate(fd, offset)
        w = Writer(self, ref, path, fd, offset, total, hasher, algorithm, started, updated)
        self._active[path.name] = w
        return w


def _resolve(fut: asyncio.Future, error: BaseException | None) -> None:
    if not fut.done():
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


def _file_id(fd: int) -> tuple[int, int] | None:
    """(device, inode) of the file open on `fd`; None when `fd` is not open."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class Writer:
    """One open ingest. Used by one task at a time; `close()` keeps the ingest for a later
    resume, `commit()` turns it into a blob. Either releases the ref's lock.

    Big writes are pipelined: a write hands its bytes to the writer's own worker thread, which
    hashes them, reports back (so `offset` and `digest()` are exact when `write()` returns), and
    then writes them to the file while the caller already receives the next chunk (a mutable
    buffer is copied first, so the caller may reuse it). Every write lands at its own offset
    (pwrite), never at a shared file position. A failed file write is
    raised by the next write, truncate, commit or close: close() waits for the queued write and
    raises Unknown when the file does not hold every byte `write()` accepted."""

    def __init__(self, store: LocalStore, ref: str, path: Path, fd: int, offset: int, total: int,
                 hasher: Any, algorithm: str, started_at: datetime, updated_at: datetime):
        self.store, self.ref, self.path = store, ref, path
        self._fd = fd
        self._file = _file_id(fd)  # what `fd` must still be when we fsync and close it
        self.offset, self.total = offset, total
        self._hasher, self.algorithm = hasher, algorithm
        self.started_at, self.updated_at = started_at, updated_at
        self._closed = False
        self._executor: ThreadPoolExecutor | None = None
        self._tail: concurrent.futures.Future | None = None   # the last queued file write
        self._error: BaseException | None = None               # a failed queued file write

    @property
    def closed(self) -> bool:
        return self._closed

    def status(self) -> Status:
        return Status(ref=self.ref, offset=self.offset, total=self.total,
                      started_at=self.started_at, updated_at=self.updated_at)

    def digest(self) -> str:
        """The digest of the bytes written so far."""
        return f"{self.algorithm}:{self._hasher.hexdigest()}"

    def _write_failed(self) -> errdefs.ContainerdError:
        return errdefs.Unknown(f"write to ingest {self.ref} failed: {self._error}")

    def _check_open(self) -> None:
        if self._closed:
            raise errdefs.FailedPrecondition("cannot write on closed writer")
        if self._error is not None:
            raise self._write_failed()

    @staticmethod
    def _write_all(fd: int, view: memoryview, offset: int) -> None:
        written = 0
        while written < len(view):
            written += os.pwrite(fd, view[written:], offset + written)

    def _job(self, fd: int, data: bytes | memoryview, offset: int, loop: asyncio.AbstractEventLoop,
             hashed: asyncio.Future) -> None:
        """Worker thread: hash, tell the loop, then write to `fd` at `offset` (GIL released for
        both). The fd is passed in: close() takes the writer's own before this job may have
        run. The bytes are written even when nobody waits for the hash any more."""
        try:
            self._hasher.update(data)
        except BaseException as e:
            self._error = e
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
                loop.call_soon_threadsafe(_resolve, hashed, e)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve, hashed, None)
        try:
            self._write_all(fd, memoryview(data), offset)
        except BaseException as e:
            self._error = e

    def _idle(self) -> bool:
        return self._tail is None or self._tail.done()

    async def _drain(self) -> None:
        """Wait for the queued file writes; raise the first that failed."""
        if self._tail is not None:
            await asyncio.wrap_future(self._tail)
            self._tail = None
        if self._error is not None:
            raise self._write_failed()

    async def write(self, data: bytes | memoryview) -> int:
        """Append `data` at the current offset; the number of bytes written."""
        self._check_open()
        n = len(data)
        if not n:
            return 0
        if n <= INLINE_LIMIT and self._idle():
            self._write_all(self._fd, memoryview(data), self.offset)
            self._hasher.update(data)
            self.offset += n
            self.updated_at = _now()
            return n
        if not isinstance(data, bytes):  # the caller may reuse its buffer once write() returns
            data = bytes(data)
        loop = asyncio.get_running_loop()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="ingest")
        hashed = loop.create_future()
        self._tail = self._executor.submit(self._job, self._fd, data, self.offset, loop, hashed)
        # The job hashes and writes these bytes whatever happens to this caller now.
        self.offset += n
        self.updated_at = _now()
        await hashed
        return n

    async def truncate(self, size: int) -> None:
        """Start over (only size 0 is supported, as in containerd)."""
        self._check_open()
        if size != 0:
            raise errdefs.InvalidArgument("Truncate: unsupported size")
        await self._drain()
        os.ftruncate(self._fd, 0)
        self.offset = 0
        self._hasher = new_hasher(self.algorithm)

    def _stop_executor(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)  # its last job (our tail) still runs to the end
            self._executor = None

    def _forget(self) -> None:
        """No longer the store's open writer of this ingest (status reads the file again)."""
        if self.store._active.get(self.path.name) is self:
            del self.store._active[self.path.name]

    def _release_fd(self, fd: int, sync: bool) -> None:
        """fsync (when `sync`) and close our fd, unless it no longer is our ingest file: then
        someone else closed it (and the number may be reused), which is reported, never
        passed on by closing another owner's file."""
        if _file_id(fd) != self._file:
            raise errdefs.Unknown(f"ingest {self.ref}: its file descriptor {fd} was closed "
                                  f"behind the writer's back; written bytes may be lost")
        try:
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    async def commit(self, size: int = 0, expected: str = "",
                     labels: Mapping[str, str] | None = None) -> str:
        """Make the ingest a blob; its digest. See the module docstring for the checks.
        `labels` go to the label store when there is one (the metadata layer keeps its own)."""
        if self._closed:
            raise errdefs.FailedPrecondition("cannot commit on closed writer")
        if expected:
            digests.parse(expected)
        try:
            await self._drain()
        except BaseException:
            with contextlib.suppress(errdefs.ContainerdError):  # the error raised is the one
                await self.close()
            raise
        self._closed = True
        self._stop_executor()
        self._forget()
        try:
            dgst = await asyncio.get_running_loop().run_in_executor(None, self._commit_sync, size, expected)
        finally:
            _unlock(self.store._lock_root, self.ref)
        if self.store.labels is not None:
            self.store.labels.set(dgst, dict(labels or {}))
        return dgst

    def _commit_sync(self, size: int, expected: str) -> str:
        fd, self._fd = self._fd, -1
        actual_size = os.fstat(fd).st_size if _file_id(fd) == self._file else -1
        self._release_fd(fd, sync=True)
        if size > 0 and size != actual_size:
            raise errdefs.FailedPrecondition(f"unexpected commit size {actual_size}, expected {size}")
        algorithm = expected.partition(":")[0] if expected else self.algorithm
        if algorithm == self.algorithm and actual_size == self.offset:
            dgst = self.digest()
        else:  # another algorithm than the running hash (or the file changed under us): rehash
            hasher, _ = _hash_file(self.path / "data", algorithm)
            dgst = f"{algorithm}:{hasher.hexdigest()}"
        if expected and expected != dgst:
            raise errdefs.FailedPrecondition(f"unexpected commit digest {dgst}, expected {expected}")
        target = self.store.blob_path(dgst)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(self.path, ignore_errors=True)
            err = errdefs.AlreadyExists(f"content {dgst}")
            err.digest = dgst  # type: ignore[attr-defined]  # for callers that go on with it
            raise err
        ingest = self.path / "data"
        mode = os.stat(ingest).st_mode & 0o777
        os.chmod(ingest, mode & ~0o333)  # read-only before it becomes visible
        os.rename(ingest, target)
        _fsync_dir(target.parent)
        now = time.time_ns()
        try:
            os.utime(target, ns=(now, now))
        except OSError:
            log.error("failed to change file time to commit time", digest=dgst)
        shutil.rmtree(self.path, ignore_errors=True)
        return dgst

    def _close_sync(self, fd: int, tail: concurrent.futures.Future | None) -> None:
        """Worker thread: wait for the queued write, fsync and close the file, stamp updatedat,
        then stop being the active writer and release the ref, in that order, whatever fails.
        Raises Unknown when bytes accepted by write() did not reach the file."""
        try:
            if tail is not None:
                try:
                    tail.result()
                except BaseException as e:  # the job itself failed (it records its errors)
                    self._error = self._error or e
            try:
                self._release_fd(fd, sync=True)
            except OSError as e:
                raise errdefs.Unknown(f"closing ingest {self.ref} failed: {e}") from None
            if self._error is not None:
                raise self._write_failed()
            try:
                _write_small(self.path / "updatedat", format_timestamp(self.updated_at))
            except OSError as e:
                if e.errno != errno.ENOENT:  # aborted meanwhile
                    log.warning("closing ingest failed", ref=self.ref, error=str(e))
        finally:
            self._forget()
            _unlock(self.store._lock_root, self.ref)

    async def close(self) -> None:
        """Keep the ingest for a later resume and release the ref. Safe to call twice. Raises
        Unknown when a queued write failed (the ingest then holds fewer bytes than written:
        a resume starts from what the file holds)."""
        if self._closed:
            return
        self._closed = True
        fd, self._fd = self._fd, -1
        tail, self._tail = self._tail, None
        self._stop_executor()
        # The worker thread finishes the close and releases the lock, even when this task is
        # cancelled meanwhile; until the last queued bytes are in the file the store's status
        # keeps reporting this writer's offset.
        await asyncio.get_running_loop().run_in_executor(None, self._close_sync, fd, tail)
