"""Image layer tars: apply one to a directory, and write one from the difference of two trees.

Owns the layer format (OCI image-spec layer.md, with containerd's semantics) and nothing else:
it knows no content store, snapshotter, mount or namespace. The differ plugin (plugins/diff)
mounts, reads blobs and writes content; tests and benchmarks call this module directly.

Apply (`apply_layer`, `apply_tar`)
- media types: `…layer.v1.tar[+gzip|+zstd]` (OCI, non-distributable too) and Docker's
  `…rootfs.diff.tar[.gzip]` (foreign too). As in containerd, a compressed (or Docker, possibly
  compressed) media type is decompressed by what its first bytes say (gzip or zstd magic), a
  plain OCI tar is read as it is.
- gzip is piped through `unpigz -d -c` when it is on PATH (as containerd does; set
  CONTAINERD_DISABLE_PIGZ=1 to turn it off), which reads a blob file itself when it is given
  one; else it is decompressed with zlib; zstd with `zstandard`. Decompression and both hashes
  (the input's digest, checked against the expected one, and the uncompressed stream's: the
  diff_id) run in worker threads while the calling thread parses the tar and writes files from
  1 MiB chunks without copying them. Regular files up to 256 KiB are created by a few more
  threads (file creation is mostly kernel time, GIL released); the applier flushes them before
  anything that could see or touch their paths (removals, whiteouts, hard links, the same path
  again, a directory where a queued file stands), so the effects keep the archive's order.
  chown/chmod are left out when a new file already has that owner and mode.
- whiteouts: `.wh.NAME` removes NAME (a whole tree), `.wh..wh..opq` removes everything in its
  directory that this layer did not itself unpack (containerd's order-independent rule).
  With `overlay=True` (applying into an overlayfs upperdir) they become overlay's own form
  instead: a 0/0 character device for NAME, xattr trusted.overlay.opaque=y on the directory;
  `parents` (the lowerdirs, topmost first) give implicitly created directories the owner, mode,
  times and xattrs of the directory below, as containerd's WithParents does.
- members: regular files, directories (merged into an existing directory), hard links, symlinks,
  character/block devices, fifos; numeric uid/gid, modes with setuid/setgid/sticky, PAX
  SCHILY.xattr.* (never trusted.*), mtime and atime (atime = the later of the two, times
  before 1970 become 0), directory times set after everything else. GNU long names/links,
  PAX path/linkpath/size/uid/gid/mtime/atime, base-256 numbers are read. Sparse members are not.
- confinement (containerd's fs.RootPath): a member's parent path is resolved inside `root`
  component by component with lstat; `..` stops at the root, absolute paths and symlink targets
  (absolute or relative) are taken relative to the root, more than 255 links is an error. So
  `../x`, `/x`, `link -> /etc` then `link/passwd`, chains of links and hard links to `/etc/...`
  all land inside `root`. The member's own last component is never followed (an existing entry
  there is removed first, unless directory meets directory).
- errors: anything wrong with the stream (bad header or checksum, a member longer than what is
  left, truncated or corrupt gzip/zstd, digest or size mismatch) raises `ArchiveError`, an
  errdefs.InvalidArgument. The directory may then hold part of the layer: the caller rolls back
  (removes the snapshot), as containerd's callers do.

Write (`write_layer`, `write_diff`, `changes`, `tar_header`)
- `changes(lower, upper)` is continuity's double walk: both trees in lexical order with '/'
  sorting first, yielding added / modified / deleted (a deleted directory once, not its
  contents) and "unmodified" for hard-linked files (needed to keep their links together).
  Files are the same when type, mode, owner, rdev and security.capability agree and, for
  non-directories, size and mtime agree (contents compared only when both mtimes have no
  sub-second part).
- `write_diff` writes containerd's ChangeWriter stream: whiteout `.wh.NAME` members (mode 0,
  uid/gid 0, the time the writer started) for deletions, missing parent directories included,
  hard links of one inode written once and linked, sockets skipped, only security.capability
  among xattrs, Go archive/tar's header layout (USTAR when the fields fit, else a PAX header
  named `dir/PaxHeaders.0/base`; mtimes truncated to seconds; no user/group names), two zero
  blocks at the end.
- `write_layer` compresses that stream (gzip by default: `pigz -n` when present, using both
  cores, else zlib at level 6) and hashes the uncompressed tar for the
  `containerd.io/uncompressed` label.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import posixpath
import queue
import shutil
import stat
import struct
import subprocess
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Optional, Union

import structlog

from . import errdefs

log = structlog.get_logger(__name__)

# ---------------------------------------------------------------------------------------------
# media types

MEDIA_TYPE_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_LAYER_GZIP = MEDIA_TYPE_LAYER + "+gzip"
MEDIA_TYPE_LAYER_ZSTD = MEDIA_TYPE_LAYER + "+zstd"
MEDIA_TYPE_LAYER_NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar"
MEDIA_TYPE_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MEDIA_TYPE_DOCKER_LAYER_GZIP = MEDIA_TYPE_DOCKER_LAYER + ".gzip"
MEDIA_TYPE_DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar"
MEDIA_TYPE_DOCKER_LAYER_FOREIGN_GZIP = MEDIA_TYPE_DOCKER_LAYER_FOREIGN + ".gzip"

UNCOMPRESSED_LABEL = "containerd.io/uncompressed"
"""The content label that holds a compressed layer's diff_id."""

GZIP, ZSTD, UNCOMPRESSED = "gzip", "zstd", ""
DETECT = "unknown"
"""diff_compression's answer for media types that may or may not be compressed."""

WHITEOUT_PREFIX = b".wh."
WHITEOUT_META_PREFIX = b".wh..wh."
WHITEOUT_OPAQUE = b".wh..wh..opq"

CHUNK = 1 << 20
_PAX_XATTR = "SCHILY.xattr."
_MAX_SPECIAL = 1 << 20  # Go archive/tar's limit for PAX and GNU long-name data
_MAX_LINKS = 255
_MAX_TIME_NS = (1 << 63) - 1


class ArchiveError(errdefs.InvalidArgument):
    """The layer stream is not a valid (compressed) tar, or not the one that was expected."""


def diff_compression(media_type: str) -> str:
    """containerd's images.DiffCompression: GZIP, ZSTD, UNCOMPRESSED, or DETECT (Docker's plain
    tar types, which are sometimes compressed anyway). Unimplemented for non-layer types."""
    base, *ext = media_type.split("+")
    ext.sort()
    if base in (MEDIA_TYPE_DOCKER_LAYER, MEDIA_TYPE_DOCKER_LAYER_FOREIGN):
        return UNCOMPRESSED if ext else DETECT
    if base in (MEDIA_TYPE_DOCKER_LAYER_GZIP, MEDIA_TYPE_DOCKER_LAYER_FOREIGN_GZIP):
        return UNCOMPRESSED if ext else GZIP
    if base in (MEDIA_TYPE_LAYER, MEDIA_TYPE_LAYER_NONDISTRIBUTABLE):
        if ext and ext[-1] in (GZIP, ZSTD):
            return ext[-1]
        return UNCOMPRESSED
    raise errdefs.Unimplemented(f"unrecognised mediatype {media_type}")


def detect_compression(head: bytes) -> str:
    """GZIP, ZSTD or UNCOMPRESSED from a stream's first bytes (containerd's magic numbers)."""
    if head.startswith(b"\x1f\x8b\x08"):
        return GZIP
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return ZSTD
    if len(head) >= 8 and (int.from_bytes(head[:4], "little") & 0xFFFFFFF0) == 0x184D2A50:
        return ZSTD  # a skippable frame first
    return UNCOMPRESSED


def _pigz_path(name: str) -> Optional[str]:
    value = os.environ.get("CONTAINERD_DISABLE_PIGZ", "").strip().lower()
    if value in ("1", "t", "true"):
        return None
    return shutil.which(name)


# ---------------------------------------------------------------------------------------------
# decompressing and hashing in worker threads


def _set_pipe_size(fd: int, size: int = CHUNK) -> None:
    try:
        fcntl.fcntl(fd, 1031, size)  # F_SETPIPE_SZ
    except OSError:
        pass


class _Decoder:
    """Reads `source`, hashes it, decompresses it and hashes the output in worker threads; the
    consumer takes the output with `get()` (b"" at the end, then any error is raised)."""

    _END = object()

    def __init__(self, read: Callable[[int], bytes], compression: str, algorithm: str,
                 use_pigz: Optional[bool], fileno: Optional[int] = None):
        self._read = read
        self._fileno = fileno  # a regular file read from offset 0: unpigz may read it itself
        self.compression = compression  # GZIP, ZSTD, UNCOMPRESSED or DETECT
        self._algorithm = algorithm
        self._use_pigz = use_pigz
        self._queue: queue.Queue = queue.Queue(maxsize=8)
        self._stop = threading.Event()
        self._error: Optional[BaseException] = None
        self._threads: list[threading.Thread] = []
        self._proc: Optional[subprocess.Popen] = None
        self.input_hash = hashlib.new(algorithm)
        self.input_size = 0
        self.output_hash = hashlib.sha256()
        self.output_size = 0
        self._finished = False

    # -- producer side --------------------------------------------------------------------

    def start(self) -> None:
        t = threading.Thread(target=self._run, name="layer-decode", daemon=True)
        self._threads.append(t)
        t.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _emit(self, data: bytes, hashed: bool = False) -> bool:
        if not data:
            return True
        if not hashed:
            self.output_hash.update(data)
        self.output_size += len(data)
        return self._put(data)

    def _read_input(self) -> bytes:
        data = self._read(CHUNK)
        if data:
            self.input_hash.update(data)
            self.input_size += len(data)
        return data

    def _run(self) -> None:
        try:
            first = self._read_input()
            if self.compression in (GZIP, ZSTD, DETECT):
                self.compression = detect_compression(first)
            if self.compression == GZIP:
                pigz = None if self._use_pigz is False else _pigz_path("unpigz")
                if pigz and self._fileno is not None:
                    self._run_pigz_file(pigz, first)
                elif pigz:
                    self._run_pigz(pigz, first)
                else:
                    self._run_zlib(first)
            elif self.compression == ZSTD:
                self._run_zstd(first)
            else:
                self._run_raw(first)
        except BaseException as e:  # handed to the consumer
            self._error = e
        finally:
            self._put(self._END)

    def _run_raw(self, first: bytes) -> None:
        same = self._algorithm == "sha256"  # one hash serves as digest and diff_id
        if same:
            self.output_hash = self.input_hash
        data = first
        while data and not self._stop.is_set():
            if not self._emit(data, hashed=same):
                return
            data = self._read_input()

    def _run_zlib(self, first: bytes) -> None:
        d = zlib.decompressobj(31)
        member_started = False
        data = first
        while data and not self._stop.is_set():
            while data:
                if d.eof:  # a further gzip member (Go's reader is multistream too)
                    d = zlib.decompressobj(31)
                    member_started = False
                try:
                    out = d.decompress(data, CHUNK)
                except zlib.error as e:
                    raise ArchiveError(f"gzip: invalid data: {e}") from None
                member_started = True
                if not self._emit(out):
                    return
                data = d.unused_data if d.eof else d.unconsumed_tail
            data = self._read_input()
        if member_started and not d.eof and not self._stop.is_set():
            # input used up: whatever inflate still holds comes out with flush()
            if not self._emit(d.flush()):
                return
            if not d.eof:
                raise ArchiveError("gzip: unexpected EOF (truncated gzip stream)")

    def _run_pigz(self, pigz: str, first: bytes) -> None:
        proc = subprocess.Popen([pigz, "-d", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, bufsize=0)
        self._proc = proc
        _set_pipe_size(proc.stdin.fileno())
        _set_pipe_size(proc.stdout.fileno())
        feed_error: list[BaseException] = []

        def feed() -> None:
            fd = proc.stdin.fileno()
            try:
                data = first
                while data and not self._stop.is_set():
                    view = memoryview(data)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                    data = self._read_input()
            except BrokenPipeError:
                pass  # unpigz gave up; its exit status says why
            except BaseException as e:
                feed_error.append(e)
            finally:
                try:
                    proc.stdin.close()
                except OSError:
                    pass

        feeder = threading.Thread(target=feed, name="layer-feed", daemon=True)
        self._threads.append(feeder)
        feeder.start()
        out_fd = proc.stdout.fileno()
        try:
            while not self._stop.is_set():
                data = os.read(out_fd, CHUNK)
                if not data:
                    break
                if not self._emit(data):
                    break
        finally:
            if self._stop.is_set():
                proc.kill()
            feeder.join()
            stderr = proc.stderr.read().decode(errors="replace").strip()
            rc = proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        if feed_error:
            raise feed_error[0]
        if rc != 0 and not self._stop.is_set():
            raise ArchiveError(f"gzip: unpigz failed ({rc}): {stderr or 'invalid gzip stream'}")

    def _run_pigz_file(self, pigz: str, first: bytes) -> None:
        """unpigz reads the file itself; a thread hashes it (page cache) meanwhile."""
        fd = self._fileno
        assert fd is not None
        os.lseek(fd, 0, os.SEEK_SET)
        proc = subprocess.Popen([pigz, "-d", "-c"], stdin=fd, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, bufsize=0)
        self._proc = proc
        _set_pipe_size(proc.stdout.fileno())
        offset = len(first)
        hash_error: list[BaseException] = []

        def hash_rest() -> None:
            nonlocal offset
            try:
                while not self._stop.is_set():
                    data = os.pread(fd, CHUNK, offset)
                    if not data:
                        return
                    offset += len(data)
                    self.input_hash.update(data)
                    self.input_size += len(data)
            except BaseException as e:
                hash_error.append(e)

        hasher = threading.Thread(target=hash_rest, name="layer-hash", daemon=True)
        self._threads.append(hasher)
        hasher.start()
        out_fd = proc.stdout.fileno()
        try:
            while not self._stop.is_set():
                data = os.read(out_fd, CHUNK)
                if not data:
                    break
                if not self._emit(data):
                    break
        finally:
            if self._stop.is_set():
                proc.kill()
            hasher.join()
            stderr = proc.stderr.read().decode(errors="replace").strip()
            rc = proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        if hash_error:
            raise hash_error[0]
        if rc != 0 and not self._stop.is_set():
            raise ArchiveError(f"gzip: unpigz failed ({rc}): {stderr or 'invalid gzip stream'}")

    def _run_zstd(self, first: bytes) -> None:
        try:
            import zstandard
        except ImportError:  # pragma: no cover - a dependency of the project
            raise errdefs.Unimplemented("zstd layers need the zstandard package") from None
        dctx = zstandard.ZstdDecompressor()
        d = dctx.decompressobj()
        frame_started = False
        data = first
        piece = 128 << 10  # bounds what one call can expand to
        while data and not self._stop.is_set():
            view = memoryview(data)
            while view:
                if d.eof:  # the next frame (skippable frames end with no output)
                    d = dctx.decompressobj()
                    frame_started = False
                part, view = view[:piece], view[piece:]
                try:
                    out = d.decompress(part)
                except zstandard.ZstdError as e:
                    raise ArchiveError(f"zstd: {e}") from None
                frame_started = True
                if d.eof and d.unused_data:
                    view = memoryview(bytes(d.unused_data) + bytes(view))
                if not self._emit(out):
                    return
            data = self._read_input()
        if frame_started and not d.eof:
            raise ArchiveError("zstd: unexpected EOF (truncated zstd stream)")

    # -- consumer side --------------------------------------------------------------------

    def get(self) -> bytes:
        if self._finished:
            return b""
        item = self._queue.get()
        if item is self._END:
            self._finished = True
            if self._error is not None:
                raise self._error
            return b""
        return item

    def close(self) -> None:
        """Stop the workers (after an error, or once everything was read) and wait for them."""
        self._stop.set()
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._proc.kill()
            except OSError:
                pass
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        for t in self._threads:
            t.join()

    def drain(self) -> None:
        """Read to the end (trailing bytes after the tar count in the diff_id, as in containerd)."""
        while self.get():
            pass


# ---------------------------------------------------------------------------------------------
# reading tar


class _Input:
    """The uncompressed stream as the tar reader sees it: exact reads, skips, and copies into
    file descriptors straight from the decoder's chunks."""

    __slots__ = ("_get", "_buf", "_pos")

    def __init__(self, get: Callable[[], bytes]):
        self._get = get
        self._buf = b""
        self._pos = 0

    def read(self, n: int) -> bytes:
        """Exactly n bytes, or fewer at the end of the stream."""
        buf, pos = self._buf, self._pos
        end = pos + n
        if end <= len(buf):
            self._pos = end
            return buf[pos:end]
        parts = [buf[pos:]]
        need = n - (len(buf) - pos)
        while need > 0:
            chunk = self._get()
            if not chunk:
                self._buf, self._pos = b"", 0
                return b"".join(parts)
            if len(chunk) >= need:
                parts.append(chunk[:need])
                self._buf, self._pos = chunk, need
                need = 0
            else:
                parts.append(chunk)
                need -= len(chunk)
        return b"".join(parts)

    def read_view(self, n: int) -> Union[bytes, memoryview]:
        """Like read(), without copying when the bytes lie in one chunk."""
        buf, pos = self._buf, self._pos
        if pos + n <= len(buf):
            self._pos = pos + n
            return memoryview(buf)[pos:pos + n]
        return self.read(n)

    def skip(self, n: int) -> int:
        """Skip n bytes; how many were there."""
        done = 0
        while n > 0:
            avail = len(self._buf) - self._pos
            if avail <= 0:
                chunk = self._get()
                if not chunk:
                    break
                self._buf, self._pos = chunk, 0
                continue
            take = avail if avail < n else n
            self._pos += take
            n -= take
            done += take
        return done

    def copy_to(self, fd: int, n: int) -> int:
        """Write the next n bytes to fd; how many there were."""
        done = 0
        while n > 0:
            buf, pos = self._buf, self._pos
            avail = len(buf) - pos
            if avail <= 0:
                chunk = self._get()
                if not chunk:
                    break
                self._buf, self._pos = chunk, 0
                continue
            take = avail if avail < n else n
            view = memoryview(buf)[pos:pos + take]
            while view:
                w = os.write(fd, view)
                view = view[w:]
            self._pos = pos + take
            n -= take
            done += take
        return done


# tar typeflags
REGTYPE, AREGTYPE, LNKTYPE, SYMTYPE = b"0", b"\0", b"1", b"2"
CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE, CONTTYPE = b"3", b"4", b"5", b"6", b"7"
XHDTYPE, XGLTYPE, GNU_LONGNAME, GNU_LONGLINK, GNU_SPARSE = b"x", b"g", b"L", b"K", b"S"
_HEADER_ONLY = frozenset((LNKTYPE, SYMTYPE, CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE))

_V7 = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12s")
_ZERO_BLOCK = bytes(512)


class TarHeader:
    """One member as Go's archive/tar presents it after merging PAX and GNU extensions."""

    __slots__ = ("name", "linkname", "mode", "uid", "gid", "size", "mtime_ns", "atime_ns",
                 "typeflag", "devmajor", "devminor", "pax")

    def __init__(self) -> None:
        self.atime_ns: Optional[int] = None
        self.pax: Optional[dict[str, bytes]] = None

    def xattrs(self) -> list[tuple[str, bytes]]:
        if not self.pax:
            return []
        return [(k[len(_PAX_XATTR):], v) for k, v in self.pax.items() if k.startswith(_PAX_XATTR)]

    def __repr__(self) -> str:
        return f"TarHeader({self.name!r}, type={self.typeflag!r}, size={self.size})"


def _bad(msg: str) -> ArchiveError:
    return ArchiveError(f"invalid tar archive: {msg}")


def _nts(b: bytes) -> bytes:
    i = b.find(b"\0")
    return b if i < 0 else b[:i]


def _num(b: bytes) -> int:
    """Go's parseNumeric: base-256 when the high bit is set, else octal padded with spaces/NULs."""
    if b[:1] >= b"\x80":
        return _base256(b)
    f = b.strip(b" \0")
    i = f.find(b"\0")
    if i >= 0:
        f = f[:i]
    if not f:
        return 0
    if f.isdigit():  # ASCII digits only; 8 and 9 fail in int()
        try:
            return int(f, 8)
        except ValueError:
            pass
    raise _bad(f"bad number {f!r} in header")


def _base256(b: bytes) -> int:
    inv = 0xFF if b[0] & 0x40 else 0
    x = 0
    for i, c in enumerate(b):
        c ^= inv
        if i == 0:
            c &= 0x7F
        if x >> 56:
            raise _bad("numeric field overflows")
        x = (x << 8) | c
    if x >> 63:
        raise _bad("numeric field overflows")
    return ~x if inv else x


def _pax_time_ns(v: bytes) -> int:
    s = v.decode("ascii", "replace")
    secs_s, _, frac = s.partition(".")
    try:
        secs = int(secs_s, 10)
    except ValueError:
        raise _bad(f"bad PAX time {s!r}") from None
    if not frac:
        return secs * 1_000_000_000
    if not frac.isdigit():
        raise _bad(f"bad PAX time {s!r}")
    nsecs = int((frac + "000000000")[:9])
    if secs_s.startswith("-"):
        nsecs = -nsecs
    return secs * 1_000_000_000 + nsecs


def _parse_pax(data: bytes) -> dict[str, bytes]:
    """PAX records "<len> <key>=<value>\\n"; keys as str, values as raw bytes."""
    records: dict[str, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        sp = data.find(b" ", pos)
        if sp < 0:
            raise _bad("malformed PAX record")
        try:
            n = int(data[pos:sp], 10)
        except ValueError:
            raise _bad("malformed PAX record length") from None
        if n < 5 or pos + n > end or n <= sp - pos + 1:
            raise _bad("malformed PAX record length")
        rec = data[sp + 1:pos + n]
        if not rec.endswith(b"\n"):
            raise _bad("PAX record without newline")
        key, eq, value = rec[:-1].partition(b"=")
        if not eq or not key:
            raise _bad("PAX record without key")
        k = key.decode("utf-8", "surrogateescape")
        if k in ("path", "linkpath", "uname", "gname"):
            if b"\0" in value:
                raise _bad(f"NUL in PAX {k}")
        elif b"\0" in key:
            raise _bad("NUL in PAX key")
        records[k] = value
        pos += n
    return records


def _checksum_ok(block: bytes, stored: bytes) -> bool:
    try:
        value = _num(stored)
    except ArchiveError:
        return False
    unsigned = sum(block) - sum(block[148:156]) + 8 * 0x20
    if value == unsigned:
        return True
    signed = unsigned - 256 * sum(1 for c in block if c >= 0x80) + \
        256 * sum(1 for c in block[148:156] if c >= 0x80)
    return value == signed


class TarReader:
    """The members of a tar stream, by Go archive/tar's rules: `next()` gives the next header
    (None at two zero blocks, or at the end of the stream on a block boundary); its data is then
    taken with `copy_data(fd)` / `read_data()`, or skipped by the following `next()`."""

    def __init__(self, inp: _Input):
        self.inp = inp
        self._remaining = 0
        self._pad = 0

    def __iter__(self) -> Iterator[TarHeader]:
        while True:
            h = self.next()
            if h is None:
                return
            yield h

    def copy_data(self, fd: int) -> None:
        n = self._remaining
        got = self.inp.copy_to(fd, n)
        self._remaining -= got
        if got != n:
            raise _bad("unexpected EOF: a member is larger than the archive")

    def read_data(self, view: bool = False) -> Union[bytes, memoryview]:
        n = self._remaining
        data = self.inp.read_view(n) if view else self.inp.read(n)
        self._remaining -= len(data)
        if len(data) != n:
            raise _bad("unexpected EOF: a member is larger than the archive")
        return data

    def _read_block(self) -> bytes:
        block = self.inp.read(512)
        if block and len(block) < 512:
            raise _bad("unexpected EOF in a header")
        return block

    def next(self) -> Optional[TarHeader]:
        n = self._remaining + self._pad
        if n:
            if self.inp.skip(n) != n:
                raise _bad("unexpected EOF: a member is larger than the archive")
            self._remaining = self._pad = 0
        pax: Optional[dict[str, bytes]] = None
        long_name: Optional[bytes] = None
        long_link: Optional[bytes] = None
        inp = self.inp
        while True:
            block = self._read_block()
            if not block:
                return None
            if block == _ZERO_BLOCK:
                nxt = self._read_block()
                if not nxt or nxt == _ZERO_BLOCK:
                    return None
                raise _bad("a zero block followed by data")
            (name, mode, uid, gid, size, mtime, chksum, typeflag, linkname, magic, version,
             _uname, _gname, devmajor, devminor, prefix, _pad) = _V7.unpack(block)
            if not _checksum_ok(block, chksum):
                raise _bad("header checksum mismatch")
            size_n = _num(size)
            if typeflag in (XHDTYPE, XGLTYPE, GNU_LONGNAME, GNU_LONGLINK):
                if size_n < 0 or size_n > _MAX_SPECIAL:
                    raise _bad("extended header too long")
                data = inp.read(size_n)
                pad = -size_n % 512
                if len(data) != size_n or (pad and inp.skip(pad) != pad):
                    raise _bad("unexpected EOF in an extended header")
                if typeflag == XHDTYPE:
                    pax = _parse_pax(data)
                    continue
                if typeflag == XGLTYPE:  # returned as is, its records apply to nothing
                    h = TarHeader()
                    h.name, h.typeflag, h.size, h.pax = _nts(name), XGLTYPE, 0, _parse_pax(data)
                    h.linkname, h.mode, h.uid, h.gid, h.mtime_ns = b"", 0, 0, 0, 0
                    h.devmajor = h.devminor = 0
                    return h
                if typeflag == GNU_LONGNAME:
                    long_name = _nts(data)
                else:
                    long_link = _nts(data)
                continue
            h = TarHeader()
            h.typeflag = typeflag
            h.name = _nts(name)
            if magic == b"ustar\0" and version == b"00":
                p = _nts(prefix[:131]) if block[508:512] == b"tar\0" else _nts(prefix)  # star
                if p:
                    h.name = p + b"/" + h.name
            elif magic == b"ustar " and version == b" \0":  # GNU keeps atime where prefix is
                if prefix[0]:
                    h.atime_ns = _num(prefix[:12]) * 1_000_000_000
            h.linkname = _nts(linkname)
            h.mode = _num(mode)
            h.uid = _num(uid)
            h.gid = _num(gid)
            h.size = size_n
            h.mtime_ns = _num(mtime) * 1_000_000_000
            if typeflag == CHRTYPE or typeflag == BLKTYPE:
                h.devmajor = _num(devmajor)
                h.devminor = _num(devminor)
            else:
                h.devmajor = h.devminor = 0
            if pax:
                _merge_pax(h, pax)
            if long_name:
                h.name = long_name
            if long_link:
                h.linkname = long_link
            if h.typeflag == AREGTYPE:
                h.typeflag = DIRTYPE if h.name.endswith(b"/") else REGTYPE
            if h.typeflag == GNU_SPARSE or (h.pax and any(k.startswith("GNU.sparse.") for k in h.pax)):
                raise _bad(f"sparse member {h.name!r} is not supported")
            if h.size < 0:
                raise _bad("negative size")
            self._remaining = 0 if h.typeflag in _HEADER_ONLY else h.size
            self._pad = -self._remaining % 512
            return h


def _merge_pax(h: TarHeader, pax: dict[str, bytes]) -> None:
    for k, v in pax.items():
        if not v:
            continue
        try:
            if k == "path":
                h.name = v
            elif k == "linkpath":
                h.linkname = v
            elif k == "uid":
                h.uid = int(v, 10)
            elif k == "gid":
                h.gid = int(v, 10)
            elif k == "size":
                h.size = int(v, 10)
            elif k == "mtime":
                h.mtime_ns = _pax_time_ns(v)
            elif k == "atime":
                h.atime_ns = _pax_time_ns(v)
        except ValueError:
            raise _bad(f"bad PAX {k} value {v!r}") from None
    h.pax = pax


# ---------------------------------------------------------------------------------------------
# paths inside a root


def clean(p: bytes) -> bytes:
    """Go's filepath.Clean for byte paths ("" -> ".", "//a/../b/" -> "/b", "../a" stays)."""
    if not p:
        return b"."
    rooted = p[:1] == b"/"
    comps: list[bytes] = []
    for c in p.split(b"/"):
        if not c or c == b".":
            continue
        if c == b"..":
            if comps and comps[-1] != b"..":
                comps.pop()
            elif not rooted:
                comps.append(b"..")
            continue
        comps.append(c)
    out = b"/".join(comps)
    if rooted:
        return b"/" + out
    return out or b"."


def _fsencode(p: Union[str, bytes, os.PathLike]) -> bytes:
    return os.fsencode(p)


def root_path(root: Union[str, bytes, os.PathLike], path: Union[str, bytes]) -> bytes:
    """containerd's fs.RootPath: `path` resolved inside `root`, every existing component looked
    at with lstat and every symlink followed as if `root` were "/" (absolute targets start over
    at root, `..` never climbs above it). Components that do not exist are kept as they are.
    More than 255 links (a loop) is an ArchiveError. Returns an absolute byte path under root."""
    rootb = _fsencode(root)
    prefix = rootb.rstrip(b"/")
    pathb = _fsencode(path)
    if not pathb:
        return rootb
    resolved: list[bytes] = []
    pending = [c for c in reversed(pathb.split(b"/")) if c and c != b"."]
    links = 0
    while pending:
        c = pending.pop()
        if c == b".":
            continue
        if c == b"..":
            if resolved:
                resolved.pop()
            continue
        resolved.append(c)
        full = prefix + b"/" + b"/".join(resolved)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            continue
        if not stat.S_ISLNK(st.st_mode):
            continue
        links += 1
        if links > _MAX_LINKS:
            raise ArchiveError(f"failed to get root path of {pathb!r}: too many links")
        target = os.readlink(full)
        resolved.pop()
        comps = [] if target[:1] == b"/" else resolved
        cleaned: list[bytes] = list(comps)
        for t in target.split(b"/"):
            if not t or t == b".":
                continue
            if t == b"..":
                if cleaned:
                    cleaned.pop()
                continue
            cleaned.append(t)
        # the already resolved prefix stays resolved; the rest is looked at again
        keep = 0
        while keep < len(resolved) and keep < len(cleaned) and cleaned[keep] == resolved[keep]:
            keep += 1
        resolved = cleaned[:keep]
        pending.extend(reversed(cleaned[keep:]))
    if not resolved:
        return rootb
    return prefix + b"/" + b"/".join(resolved)


# ---------------------------------------------------------------------------------------------
# applying


@dataclass
class ApplyResult:
    """What applying a layer read: its digest as given (the algorithm of the expected digest,
    else sha256) and size, the diff_id (sha256 of the uncompressed stream, trailing bytes
    included, as containerd counts them) and its size, the compression found, and how many
    tar members there were."""

    digest: str
    size: int
    diff_id: str
    uncompressed_size: int
    compression: str
    entries: int


_S_IFMT_OF = {CHRTYPE: stat.S_IFCHR, BLKTYPE: stat.S_IFBLK, FIFOTYPE: stat.S_IFIFO}
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _bound_ns(ns: int) -> int:
    return 0 if ns < 0 or ns > _MAX_TIME_NS else ns


def _times(h: TarHeader) -> tuple[int, int]:
    mtime = h.mtime_ns
    atime = h.atime_ns if h.atime_ns is not None and h.atime_ns > mtime else mtime
    return _bound_ns(atime), _bound_ns(mtime)


_PARALLEL_MAX = 256 << 10  # regular files up to this size may go to the worker threads
DEFAULT_WORKERS = 4


class _Applier:
    def __init__(self, root: bytes, overlay: bool, parents: Iterable[bytes], workers: int = DEFAULT_WORKERS):
        root = clean(root)
        self.root = root
        self.prefix = root.rstrip(b"/")
        self.overlay = overlay
        self.parents = [clean(_fsencode(p)) for p in parents]
        self._cache: dict[bytes, tuple[bytes, bool]] = {}  # tar parent -> (real dir, setgid?)
        self._unpacked: set[bytes] = set()
        self._dirs: list[tuple[bytes, int, int]] = []
        self.entries = 0
        # what a new file gets anyway, so that chown/chmod can be left out when they change nothing
        self._umask = _current_umask()
        self._euid, self._egid = os.geteuid(), os.getegid()
        self._nworkers = workers
        self._writers: Optional[_FileWriters] = None
        self._pending: set[bytes] = set()  # paths of files queued to the writers, not yet flushed

    # -- the loop -------------------------------------------------------------------------

    def run(self, reader: TarReader) -> int:
        try:
            for h in reader:
                self.entries += 1
                try:
                    self._entry(h, reader)
                except (errdefs.ContainerdError, MemoryError):
                    raise
                except OSError as e:
                    raise _extract_error(h.name, e) from e
            self._flush()
        finally:
            if self._writers is not None:
                self._writers.close()
        for name, atime, mtime in self._dirs:
            path = root_path(self.root, name)
            try:
                os.utime(path, ns=(atime, mtime), follow_symlinks=False)
            except FileNotFoundError:
                pass  # removed by a later member
        return self.entries

    def _entry(self, h: TarHeader, reader: TarReader) -> None:
        name = clean(h.name)
        i = name.rfind(b"/")
        ppath, base = name[:i + 1], name[i + 1:]
        if not base or base == b"." or base == b"..":
            return  # resolves to the root itself
        cached = self._cache.get(ppath)
        if cached is None:
            parent = root_path(self.root, ppath)
            if self._pending and self._pending_ancestor(parent):
                self._flush()  # a queued file stands where a directory is wanted
                parent = root_path(self.root, ppath)
            if parent != self.root:
                self._mkparent(parent)
            sgid = bool(os.stat(parent).st_mode & stat.S_ISGID)
            self._cache[ppath] = (parent, sgid)
        else:
            parent, sgid = cached
        path = parent + b"/" + base if parent != b"/" else b"/" + base

        if base[:4] == WHITEOUT_PREFIX:
            self._flush()
            self._whiteout(h, parent, base)
            return
        if path in self._pending:
            self._flush()

        t = h.typeflag
        if t == REGTYPE:
            mode = h.mode & 0o7777
            chown = sgid or h.uid != self._euid or h.gid != self._egid
            chmod = bool(mode & 0o7000 or mode & self._umask)
            if self._nworkers > 0 and h.size <= _PARALLEL_MAX:
                task = _FileTask()
                task.name, task.path, task.mode, task.times = h.name, path, mode, _times(h)
                task.chown, task.uid, task.gid, task.chmod = chown, h.uid, h.gid, chmod
                task.xattrs = h.xattrs() if h.pax else None
                task.data = reader.read_data(view=True)
                if self._writers is None:
                    self._writers = _FileWriters(self._nworkers)
                self._pending.add(path)
                self._writers.submit(task)
            else:
                fd = self._create(path, lambda: os.open(path, _OPEN_FLAGS, mode & 0o777))
                try:
                    reader.copy_data(fd)
                    if chown:
                        os.fchown(fd, h.uid, h.gid)
                    if h.pax:
                        self._xattrs(h, fd, path, True)
                    if chmod:
                        os.fchmod(fd, mode)
                    os.utime(fd, ns=_times(h))
                finally:
                    os.close(fd)
        elif t == DIRTYPE:
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                st = os.lstat(path)
                if not stat.S_ISDIR(st.st_mode):
                    self._remove(path, st)
                    os.mkdir(path, 0o700)
                else:
                    self._cache.clear()  # its mode (setgid) may change
            self._meta(h, path, symlink=False)
            self._dirs.append((name, *_times(h)))
        elif t == SYMTYPE:
            self._create(path, lambda: os.symlink(h.linkname, path))
            self._meta(h, path, symlink=True)
        elif t == LNKTYPE:
            self._flush()  # the target may be a queued file
            target = self._hardlink_target(h.linkname)
            self._create(path, lambda: os.link(target, path, follow_symlinks=False))
            self._meta(h, path, symlink=stat.S_ISLNK(os.lstat(path).st_mode))
        elif t in _S_IFMT_OF:
            mode = (h.mode & 0o7777) | _S_IFMT_OF[t]
            dev = os.makedev(h.devmajor, h.devminor) if t != FIFOTYPE else 0
            self._create(path, lambda: os.mknod(path, mode, dev))
            self._meta(h, path, symlink=False)
        elif t == XGLTYPE:  # containerd clears the spot, then ignores the header
            self._remove(path)
            return
        else:
            self._remove(path)
            raise ArchiveError(f"unhandled tar header type {t[0]} for {h.name!r}")
        self._unpacked.add(path)

    # -- pieces ---------------------------------------------------------------------------

    def _flush(self) -> None:
        """Wait for the queued files; redo those whose path was taken; raise their errors."""
        if not self._pending or self._writers is None:
            return
        retry, errors = self._writers.wait()
        self._pending.clear()
        if errors:
            task, e = errors[0]
            if isinstance(e, OSError):
                raise _extract_error(task.name, e) from e
            raise e
        for task in retry:
            try:
                self._remove(task.path)
                if not _write_file(task):
                    raise FileExistsError(errno.EEXIST, "file exists", task.path)
            except OSError as e:
                raise _extract_error(task.name, e) from e

    def _pending_ancestor(self, path: bytes) -> bool:
        p = path
        while len(p) > len(self.prefix):
            if p in self._pending:
                return True
            p = p[:p.rfind(b"/")]
        return False

    def _create(self, path: bytes, make: Callable[[], Any]) -> Any:
        """Run `make`; when something is in the way, remove it (a whole tree) and run it again."""
        try:
            return make()
        except FileExistsError:
            self._remove(path)
            return make()

    def _remove(self, path: bytes, st: Optional[os.stat_result] = None) -> None:
        """os.RemoveAll: whatever is at path, never following a symlink; absent is fine."""
        if self._pending:
            self._flush()  # queued files may be at or below path
            st = None
        if st is None:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
            self._cache.clear()
        else:
            os.unlink(path)
            if stat.S_ISLNK(st.st_mode):
                self._cache.clear()

    def _meta(self, h: TarHeader, path: bytes, symlink: bool) -> None:
        """containerd's order: owner, xattrs, mode (never on a symlink), times."""
        os.chown(path, h.uid, h.gid, follow_symlinks=False)
        if h.pax:
            self._xattrs(h, path, path, h.typeflag in (DIRTYPE, REGTYPE))
        if not symlink:
            os.chmod(path, h.mode & 0o7777)
        if h.typeflag != DIRTYPE:
            os.utime(path, ns=_times(h), follow_symlinks=False)

    def _xattrs(self, h: TarHeader, target: Union[int, bytes], path: bytes, reg_or_dir: bool) -> None:
        _set_xattrs(h.xattrs(), target, path, reg_or_dir)

    def _whiteout(self, h: TarHeader, parent: bytes, base: bytes) -> None:
        if base == WHITEOUT_OPAQUE:
            if self.overlay:
                os.setxattr(parent, "trusted.overlay.opaque", b"y")
            else:
                os.lstat(parent)
                self._clear_opaque(parent)
            return
        original = base[len(WHITEOUT_PREFIX):]
        if not original or original in (b".", b".."):
            raise ArchiveError(f"invalid whiteout name: {base.decode(errors='replace')}: invalid archive")
        target = parent + b"/" + original if parent != b"/" else b"/" + original
        if self.overlay:
            os.mknod(target, stat.S_IFCHR, 0)
            os.chown(target, h.uid, h.gid)
        else:
            self._remove(target)

    def _clear_opaque(self, d: bytes) -> None:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except FileNotFoundError:
            return
        for e in entries:
            p = e.path
            if p not in self._unpacked:
                self._remove(p)
            elif e.is_dir(follow_symlinks=False):
                self._clear_opaque(p)

    def _hardlink_target(self, linkname: bytes) -> bytes:
        """containerd's hardlinkRootPath: the parent resolved inside root, the last component
        not followed (a hard link to a symlink links the symlink)."""
        i = linkname.rfind(b"/")
        parent = root_path(self.root, linkname[:i + 1])
        target = clean(parent + b"/" + linkname[i + 1:])
        if not (target == self.root or target.startswith(self.prefix + b"/")):
            target = self.root
        return target

    def _mkparent(self, path: bytes) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISDIR(st.st_mode):
                return
            raise NotADirectoryError(errno.ENOTDIR, "mkparent: not a directory", path)
        i = path.rfind(b"/")
        if i > len(self.prefix):
            self._mkparent(path[:i])
        try:
            os.mkdir(path, 0o755)
            os.chmod(path, 0o755)
        except FileExistsError:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                return
            raise
        rel = path[len(self.prefix):]
        for lower in self.parents:
            try:
                lpath = root_path(lower, rel)
                st = os.lstat(lpath)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if not stat.S_ISDIR(st.st_mode):
                break  # replaced below: keep the defaults
            os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
            os.chmod(path, stat.S_IMODE(st.st_mode))
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
            _copy_xattrs(lpath, path)
            return


def _extract_error(name: bytes, e: OSError) -> errdefs.ContainerdError:
    where = f": {os.fsdecode(e.filename)}" if e.filename else ""
    return errdefs.Unknown(f"failed to extract {name.decode(errors='replace')!r}: {e.strerror or e}{where}")


def _set_xattrs(items: Iterable[tuple[str, bytes]], target: Union[int, bytes], path: bytes,
                reg_or_dir: bool) -> None:
    """containerd's rules: trusted.* never; user.* refused on other types and unsupported
    attributes are skipped with a warning; anything else failing fails the member."""
    for key, value in items:
        if key.startswith("trusted."):
            log.warning("ignored xattr in archive: admin attributes are not supported",
                        xattr=key, path=os.fsdecode(path))
            continue
        try:
            if isinstance(target, int):
                os.setxattr(target, key, value)
            else:
                os.setxattr(target, key, value, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.EPERM and key.startswith("user.") and not reg_or_dir:
                continue  # user.* exists only on regular files and directories
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                log.warning("ignored xattr in archive", xattr=key, path=os.fsdecode(path),
                            error=e.strerror)
                continue
            raise


class _FileTask:
    __slots__ = ("name", "path", "data", "mode", "chown", "uid", "gid", "chmod", "times", "xattrs")


def _write_file(t: _FileTask) -> bool:
    """Create and fill one regular file; False when something is already there."""
    try:
        fd = os.open(t.path, _OPEN_FLAGS, t.mode & 0o777)
    except FileExistsError:
        return False
    try:
        view = t.data
        while view:
            view = view[os.write(fd, view):]
        if t.chown:
            os.fchown(fd, t.uid, t.gid)
        if t.xattrs:
            _set_xattrs(t.xattrs, fd, t.path, True)
        if t.chmod:
            os.fchmod(fd, t.mode)
        os.utime(fd, ns=t.times)
    finally:
        os.close(fd)
    return True


class _FileWriters:
    """Worker threads that create small regular files while the main thread reads on.

    File creation is mostly kernel time (and waiting on the filesystem journal), with the GIL
    released: a few threads keep both cores busy and hide the waits. The applier keeps the
    order of effects: it flushes (waits for every queued file) before anything that could see
    or touch a queued path (see _Applier). A file whose path turned out to be taken is handed
    back and redone by the main thread at the flush, in submission order."""

    def __init__(self, workers: int, depth: int = 64):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._lock = threading.Lock()
        self._errors: list[tuple[_FileTask, BaseException]] = []
        self._retry: list[tuple[int, _FileTask]] = []
        self._seq = 0
        self._threads = [threading.Thread(target=self._run, name=f"layer-files-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                seq, task = item
                try:
                    if not _write_file(task):
                        with self._lock:
                            self._retry.append((seq, task))
                except BaseException as e:
                    with self._lock:
                        self._errors.append((task, e))
            finally:
                self._queue.task_done()

    def submit(self, task: _FileTask) -> None:
        self._seq += 1
        self._queue.put((self._seq, task))

    def wait(self) -> tuple[list[_FileTask], list[tuple[_FileTask, BaseException]]]:
        """Wait for everything queued; (tasks to redo in order, errors)."""
        self._queue.join()
        with self._lock:
            retry = [t for _, t in sorted(self._retry, key=lambda x: x[0])]
            errors = list(self._errors)
            self._retry.clear()
            self._errors.clear()
        return retry, errors

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()


def _current_umask() -> int:
    """The process umask, read without changing it (other threads may be creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o7777  # unknown: always chmod


def _copy_xattrs(src: bytes, dst: bytes) -> None:
    """containerd's copyUpXAttrs: every xattr but trusted.*, never replacing one."""
    try:
        keys = os.listxattr(src, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENODATA):
            return
        raise
    for key in keys:
        if key.startswith("trusted."):
            continue
        try:
            value = os.getxattr(src, key, follow_symlinks=False)
            os.setxattr(dst, key, value, os.XATTR_CREATE, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.ENODATA, errno.EEXIST):
                continue
            raise


def apply_tar(root: Union[str, bytes, os.PathLike], stream: Union[BinaryIO, _Input], *,
              overlay: bool = False, parents: Iterable[Union[str, bytes]] = (),
              workers: int = DEFAULT_WORKERS) -> int:
    """Apply an uncompressed layer tar read from `stream` (a binary file object) to `root`;
    the number of members. See the module docstring for the rules. `workers` threads create
    small files (0: all on the calling thread)."""
    inp = stream if isinstance(stream, _Input) else _Input(lambda: stream.read(CHUNK))
    applier = _Applier(_fsencode(root), overlay, [_fsencode(p) for p in parents], workers)
    return applier.run(TarReader(inp))


Source = Union[str, bytes, os.PathLike, BinaryIO, Callable[[int], bytes]]


def _regular_fileno(f: Any) -> Optional[int]:
    """The fd of a regular file read from its start, which a subprocess may read directly."""
    try:
        fd = f.fileno()
        if stat.S_ISREG(os.fstat(fd).st_mode) and os.lseek(fd, 0, os.SEEK_CUR) == 0:
            return fd
    except (AttributeError, OSError, ValueError):
        pass
    return None


def _reader_of(source: Source) -> tuple[Callable[[int], bytes], Optional[BinaryIO]]:
    if isinstance(source, (str, os.PathLike)):
        f = open(source, "rb", buffering=0)
        return f.read, f
    if isinstance(source, (bytes, bytearray, memoryview)):
        import io
        b = io.BytesIO(bytes(source))
        return b.read, None
    if callable(source):
        return source, None
    return source.read, None


def apply_layer(root: Union[str, bytes, os.PathLike], source: Source, media_type: Optional[str] = None,
                *, expected_digest: str = "", expected_size: int = -1, overlay: bool = False,
                parents: Iterable[Union[str, bytes]] = (), use_pigz: Optional[bool] = None,
                workers: int = DEFAULT_WORKERS) -> ApplyResult:
    """Apply a layer blob to `root` and verify it.

    source: a path, a binary file object, bytes, or a read(n) function.
    media_type: the descriptor's; None reads whatever the first bytes say. A type that is no
      layer raises errdefs.Unimplemented ("unrecognised mediatype ...").
    expected_digest / expected_size: checked against the blob as read (ArchiveError when they
      differ, after the tar was applied: the caller discards the target).
    overlay / parents: `root` is an overlayfs upperdir over `parents` (lowerdirs, top first).
    use_pigz: None = unpigz when installed; False = zlib.
    workers: threads creating small files alongside (0: none).
    """
    compression = DETECT if media_type is None else diff_compression(media_type)
    algorithm = expected_digest.partition(":")[0] if expected_digest else "sha256"
    if algorithm not in hashlib.algorithms_available:
        raise errdefs.InvalidArgument(f"unsupported digest algorithm {algorithm!r}")
    read, owned = _reader_of(source)
    fileno = _regular_fileno(owned if owned is not None else source)
    decoder = _Decoder(read, compression, algorithm, use_pigz, fileno)
    decoder.start()
    try:
        entries = apply_tar(root, _Input(decoder.get), overlay=overlay, parents=parents, workers=workers)
        decoder.drain()
    finally:
        decoder.close()
        if owned is not None:
            owned.close()
    digest = f"{algorithm}:{decoder.input_hash.hexdigest()}"
    if expected_size >= 0 and decoder.input_size != expected_size:
        raise ArchiveError(f"layer size mismatch: read {decoder.input_size} bytes, "
                           f"expected {expected_size}")
    if expected_digest and digest != expected_digest:
        raise ArchiveError(f"layer digest mismatch: got {digest}, expected {expected_digest}")
    return ApplyResult(digest=digest, size=decoder.input_size,
                       diff_id=f"sha256:{decoder.output_hash.hexdigest()}",
                       uncompressed_size=decoder.output_size, compression=decoder.compression,
                       entries=entries)


# ---------------------------------------------------------------------------------------------
# comparing two trees (continuity's double walk)

CHANGE_UNMODIFIED, CHANGE_ADD, CHANGE_MODIFY, CHANGE_DELETE = "unmodified", "add", "modify", "delete"


def _walk(root: bytes) -> Iterator[tuple[bytes, os.stat_result]]:
    """filepath.Walk: every path under root ("/a/b", root itself left out) in lexical order,
    directories before their contents, with lstat results."""
    prefix = root.rstrip(b"/")
    stack: list[tuple[bytes, Iterator[bytes]]] = [(b"", iter(sorted(os.listdir(root))))]
    while stack:
        rel_dir, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
            continue
        rel = rel_dir + b"/" + name
        st = os.lstat(prefix + rel)
        yield rel, st
        if stat.S_ISDIR(st.st_mode):
            stack.append((rel, iter(sorted(os.listdir(prefix + rel)))))


def _capability(path: bytes) -> Optional[bytes]:
    try:
        return os.getxattr(path, "security.capability", follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise


def _same_content(p1: bytes, p2: bytes) -> bool:
    with open(p1, "rb", buffering=0) as f1, open(p2, "rb", buffering=0) as f2:
        while True:
            b1 = f1.read(CHUNK)
            b2 = f2.read(CHUNK)
            if b1 != b2:
                return False
            if not b1:
                return True


def _same_file(lower: bytes, st1: os.stat_result, upper: bytes, st2: os.stat_result) -> bool:
    """continuity's sameFile (see the module docstring)."""
    if st1.st_dev == st2.st_dev and st1.st_ino == st2.st_ino:
        return True
    if (st1.st_mode != st2.st_mode or st1.st_uid != st2.st_uid or st1.st_gid != st2.st_gid
            or st1.st_rdev != st2.st_rdev):
        return False
    if _capability(lower) != _capability(upper):
        return False
    if stat.S_ISDIR(st1.st_mode):
        return True
    if st1.st_size != st2.st_size:
        return False
    s1, n1 = divmod(st1.st_mtime_ns, 1_000_000_000)
    s2, n2 = divmod(st2.st_mtime_ns, 1_000_000_000)
    if s1 != s2:
        return False
    if n1 == 0 and n2 == 0:
        if stat.S_ISLNK(st1.st_mode):
            return os.readlink(lower) == os.readlink(upper)
        if st1.st_size == 0:
            return True
        return _same_content(lower, upper)
    return n1 == n2


def changes(lower: Union[str, bytes, os.PathLike, None],
            upper: Union[str, bytes, os.PathLike]) -> Iterator[tuple[str, bytes, Optional[os.stat_result]]]:
    """(kind, "/path", upper's lstat or None for deletions) turning `lower` into `upper`, in
    path order. With no lower every path of upper is an addition."""
    up = _fsencode(upper).rstrip(b"/") or b"/"
    if not lower:
        for rel, st in _walk(up):
            yield CHANGE_ADD, rel, st
        return
    low = _fsencode(lower).rstrip(b"/") or b"/"
    lp, upp = low.rstrip(b"/"), up.rstrip(b"/")
    a, b = _walk(low), _walk(up)
    f1, f2 = next(a, None), next(b, None)
    rmdir: Optional[bytes] = None
    while f1 is not None or f2 is not None:
        if f1 is None:
            kind = CHANGE_ADD
        elif f2 is None:
            kind = CHANGE_DELETE
        else:
            k1, k2 = f1[0].replace(b"/", b"\0"), f2[0].replace(b"/", b"\0")
            kind = CHANGE_DELETE if k1 < k2 else CHANGE_ADD if k1 > k2 else CHANGE_MODIFY
        if kind == CHANGE_ADD:
            rmdir = None
            yield CHANGE_ADD, f2[0], f2[1]
            f2 = next(b, None)
        elif kind == CHANGE_DELETE:
            rel, st = f1
            f1 = next(a, None)
            if rmdir is not None and rel.startswith(rmdir):
                continue
            if stat.S_ISDIR(st.st_mode):
                rmdir = rel + b"/"
            else:
                rmdir = None
            yield CHANGE_DELETE, rel, None
        else:
            (rel, st1), (_, st2) = f1, f2
            same = _same_file(lp + rel, st1, upp + rel, st2)
            if stat.S_ISDIR(st1.st_mode) and not stat.S_ISDIR(st2.st_mode):
                rmdir = rel + b"/"
            else:
                rmdir = None
            f1, f2 = next(a, None), next(b, None)
            if same:
                if stat.S_ISDIR(st2.st_mode) or st2.st_nlink <= 1:
                    continue
                yield CHANGE_UNMODIFIED, rel, st2
            else:
                yield CHANGE_MODIFY, rel, st2


# ---------------------------------------------------------------------------------------------
# writing tar (Go archive/tar's layout)


def _fits_octal(width: int, x: int) -> bool:
    return x >= 0 and (width >= 22 or x < 1 << (3 * (width - 1)))


def _split_ustar(name: bytes) -> Optional[tuple[bytes, bytes]]:
    length = len(name)
    if length <= 100 or not name.isascii():
        return None
    if length > 156:
        length = 156
    elif name[length - 1:length] == b"/":
        length -= 1
    i = name.rfind(b"/", 0, length)
    nlen, plen = len(name) - i - 1, i
    if i <= 0 or nlen > 100 or nlen == 0 or plen > 155:
        return None
    return name[:i], name[i + 1:]


def _to_ascii(s: bytes) -> bytes:
    if s.isascii() and b"\0" not in s:
        return s
    return bytes(c for c in s if 0 < c < 0x80)


def _put_str(blk: bytearray, off: int, width: int, s: bytes, pax: bool = False) -> None:
    n = min(len(s), width)
    blk[off:off + n] = s[:n]
    if pax and len(s) > width and blk[off + width - 1] == 0x2F:  # no misleading trailing '/'
        keep = len(s[:width - 1].rstrip(b"/"))
        blk[off + keep] = 0


def _put_oct(blk: bytearray, off: int, width: int, x: int) -> None:
    if not _fits_octal(width, x):
        x = 0
    s = b"%o" % x
    s = b"0" * (width - len(s) - 1) + s
    blk[off:off + len(s)] = s


def _finish_block(blk: bytearray) -> bytes:
    blk[257:263] = b"ustar\0"
    blk[263:265] = b"00"
    blk[148:156] = b"        "
    chk = sum(blk)
    blk[148:155] = b"%06o\0" % chk
    blk[155] = 0x20
    return bytes(blk)


def _pax_record(k: bytes, v: bytes) -> bytes:
    size = len(k) + len(v) + 3
    size += len(str(size))
    rec = b"%d %s=%s\n" % (size, k, v)
    if len(rec) != size:
        size = len(rec)
        rec = b"%d %s=%s\n" % (size, k, v)
    return rec


def tar_header(name: bytes, typeflag: bytes, *, mode: int = 0, uid: int = 0, gid: int = 0,
               size: int = 0, mtime: int = 0, linkname: bytes = b"", devmajor: int = 0,
               devminor: int = 0, pax_records: Optional[dict[bytes, bytes]] = None) -> bytes:
    """The header block(s) Go's tar.Writer writes for such a header (whole-second mtime, no
    user/group names): USTAR when every field fits, else a PAX extended header first."""
    pax: dict[bytes, bytes] = {}
    ustar = True
    for value, key in ((name, b"path"), (linkname, b"linkpath")):
        too_long = len(value) > 100
        if too_long or not value.isascii():
            if key != b"path" or _split_ustar(value) is None:
                ustar = False
            pax[key] = value
    for value, width, key in ((uid, 8, b"uid"), (gid, 8, b"gid"), (size, 12, b"size")):
        if not _fits_octal(width, value):
            ustar = False
            pax[key] = b"%d" % value
    if not _fits_octal(12, mtime):
        ustar = False
        pax[b"mtime"] = b"%d" % mtime
    if pax_records:
        ustar = False
        for k, v in pax_records.items():
            pax.setdefault(k, v)
    out = []
    blk = bytearray(512)
    if ustar:
        split = _split_ustar(name)
        prefix, short = split if split else (b"", name)
        _put_str(blk, 0, 100, short)
        _put_str(blk, 345, 155, prefix)
        _put_str(blk, 157, 100, linkname)
    else:
        data = b"".join(_pax_record(k, pax[k]) for k in sorted(pax))
        if len(data) > _MAX_SPECIAL:
            raise errdefs.InvalidArgument(f"PAX header of {name!r} too long")
        d, _, f = name.rpartition(b"/")
        xname = clean((d + b"/" if d else b"") + b"PaxHeaders.0/" + f) if f else clean(name + b"/PaxHeaders.0")
        xname = _to_ascii(xname)[:100].rstrip(b"/")
        xblk = bytearray(512)
        _put_str(xblk, 0, 100, xname)
        for off, width in ((100, 8), (108, 8), (116, 8), (136, 12)):
            _put_oct(xblk, off, width, 0)
        _put_oct(xblk, 124, 12, len(data))
        xblk[156] = ord("x")
        out.append(_finish_block(xblk))
        out.append(data + bytes(-len(data) % 512))
        _put_str(blk, 0, 100, _to_ascii(name), pax=True)
        _put_str(blk, 157, 100, _to_ascii(linkname), pax=True)
    _put_oct(blk, 100, 8, mode)
    _put_oct(blk, 108, 8, uid)
    _put_oct(blk, 116, 8, gid)
    _put_oct(blk, 124, 12, size)
    _put_oct(blk, 136, 12, mtime)
    blk[156] = typeflag[0]
    _put_oct(blk, 329, 8, devmajor)
    _put_oct(blk, 337, 8, devminor)
    out.append(_finish_block(blk))
    return b"".join(out)


class ChangeWriter:
    """containerd's archive.ChangeWriter: turns `changes()` into an OCI layer tar written to
    `write` (a function taking bytes). `source` is the upper tree the changes came from."""

    def __init__(self, write: Callable[[bytes], Any], source: Union[str, bytes, os.PathLike],
                 whiteout_time_ns: Optional[int] = None):
        self._write = write
        self.source = _fsencode(source).rstrip(b"/")
        ns = time.time_ns() if whiteout_time_ns is None else whiteout_time_ns
        self._whiteout_mtime = (ns + 500_000_000) // 1_000_000_000  # Go rounds unset formats
        self._inode_src: dict[int, bytes] = {}
        self._inode_refs: dict[int, list[bytes]] = {}
        self._added_dirs: set[bytes] = set()
        self._buf = bytearray()

    def _emit(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= CHUNK:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self._write(bytes(self._buf))
            self._buf.clear()

    def close(self) -> None:
        self._emit(bytes(1024))
        self.flush()

    def handle(self, kind: str, path: bytes, st: Optional[os.stat_result]) -> None:
        if kind == CHANGE_DELETE:
            d, _, base = path.rpartition(b"/")
            name = (d + b"/" + WHITEOUT_PREFIX + base).lstrip(b"/")
            self._include_parents(name, REGTYPE)
            self._emit(tar_header(name, REGTYPE, mtime=self._whiteout_mtime))
            return
        assert st is not None
        mode = st.st_mode
        if stat.S_ISSOCK(mode):
            return
        source = self.source + b"/" + path.lstrip(b"/")
        name = path.lstrip(b"/")
        link = b""
        size = 0
        devmajor = devminor = 0
        if stat.S_ISREG(mode):
            typeflag, size = REGTYPE, st.st_size
        elif stat.S_ISDIR(mode):
            typeflag = DIRTYPE
            if not name.endswith(b"/"):
                name += b"/"
        elif stat.S_ISLNK(mode):
            typeflag, link = SYMTYPE, os.readlink(source)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            typeflag = CHRTYPE if stat.S_ISCHR(mode) else BLKTYPE
            devmajor, devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(mode):
            typeflag = FIFOTYPE
        else:
            raise errdefs.Unknown(f"archive/tar: unknown file mode {mode:o}")
        perm = stat.S_IMODE(mode)
        mtime = st.st_mtime_ns // 1_000_000_000

        additional: list[bytes] = []
        if not stat.S_ISDIR(mode) and st.st_nlink > 1:
            inode = st.st_ino
            src = self._inode_src.get(inode)
            if src is not None:
                typeflag, link, size = LNKTYPE, src, 0
            else:
                if kind == CHANGE_UNMODIFIED:
                    self._inode_refs.setdefault(inode, []).append(name)
                    return
                self._inode_src[inode] = name
                additional = self._inode_refs.pop(inode, [])
        elif kind == CHANGE_UNMODIFIED:
            return

        records = None
        cap = _capability(source)
        if cap:
            records = {b"SCHILY.xattr.security.capability": cap}
        self._include_parents(name, typeflag)
        self._emit(tar_header(name, typeflag, mode=perm, uid=st.st_uid, gid=st.st_gid, size=size,
                              mtime=mtime, linkname=link, devmajor=devmajor, devminor=devminor,
                              pax_records=records))
        if typeflag == REGTYPE and size > 0:
            self._copy_file(source, size)
        for extra in additional:
            self._include_parents(extra, LNKTYPE)
            self._emit(tar_header(extra, LNKTYPE, mode=perm, uid=st.st_uid, gid=st.st_gid,
                                  mtime=mtime, devmajor=devmajor, devminor=devminor,
                                  pax_records=records, linkname=name))

    def _copy_file(self, source: bytes, size: int) -> None:
        done = 0
        with open(source, "rb", buffering=0) as f:
            while True:
                data = f.read(CHUNK)
                if not data:
                    break
                done += len(data)
                if done > size:
                    raise errdefs.Unknown(f"archive/tar: write too long ({os.fsdecode(source)} grew)")
                self._emit(data)
        if done != size:
            raise errdefs.Unknown(f"short write copying file {os.fsdecode(source)}")
        if size % 512:
            self._emit(bytes(512 - size % 512))

    def _include_parents(self, name: bytes, typeflag: bytes) -> None:
        trimmed = name.rstrip(b"/")
        parent = posixpath.dirname(trimmed) or b"."
        if trimmed and parent != b".":
            if parent not in self._added_dirs:
                self._added_dirs.add(parent)
                st = os.stat(self.source + b"/" + parent)
                self.handle(CHANGE_MODIFY, parent, st)
        if typeflag == DIRTYPE:
            self._added_dirs.add(trimmed)


def write_diff(lower: Union[str, bytes, os.PathLike, None], upper: Union[str, bytes, os.PathLike],
               write: Callable[[bytes], Any], *, whiteout_time_ns: Optional[int] = None) -> None:
    """Write the uncompressed layer tar that turns `lower` into `upper` to `write`."""
    cw = ChangeWriter(write, upper, whiteout_time_ns)
    for kind, path, st in changes(lower, upper):
        cw.handle(kind, path, st)
    cw.close()


@dataclass
class DiffResult:
    """A written layer: diff_id and size of the tar, digest and size of what was written
    (the same for an uncompressed layer), and the compression used."""

    diff_id: str
    uncompressed_size: int
    digest: str
    size: int
    compression: str


class _Compressor:
    """Hashes a tar stream and passes it on compressed (gzip via `pigz -n` or zlib) or as is."""

    def __init__(self, sink: Callable[[bytes], Any], compression: str, use_pigz: Optional[bool], level: int):
        self._sink = sink
        self.compression = compression
        self.tar_hash = hashlib.sha256()
        self.tar_size = 0
        self.out_hash = hashlib.sha256()
        self.out_size = 0
        self._proc: Optional[subprocess.Popen] = None
        self._reader: Optional[threading.Thread] = None
        self._error: list[BaseException] = []
        self._zlib = None
        if compression == GZIP:
            pigz = None if use_pigz is False else _pigz_path("pigz")
            if pigz:
                self._proc = subprocess.Popen([pigz, "-n", "-c", f"-{level}"], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
                _set_pipe_size(self._proc.stdin.fileno())
                _set_pipe_size(self._proc.stdout.fileno())
                self._reader = threading.Thread(target=self._pump, name="layer-compress", daemon=True)
                self._reader.start()
            else:
                self._zlib = zlib.compressobj(level, zlib.DEFLATED, 31)
        elif compression != UNCOMPRESSED:
            raise errdefs.Unimplemented(f"unsupported compression {compression!r}")

    def _out(self, data: bytes) -> None:
        if data:
            self.out_hash.update(data)
            self.out_size += len(data)
            self._sink(data)

    def _pump(self) -> None:
        assert self._proc is not None
        fd = self._proc.stdout.fileno()
        try:
            while True:
                data = os.read(fd, CHUNK)
                if not data:
                    return
                self._out(data)
        except BaseException as e:
            self._error.append(e)
            self._proc.kill()

    def write(self, data: bytes) -> None:
        self.tar_hash.update(data)
        self.tar_size += len(data)
        if self._proc is not None:
            try:
                view = memoryview(data)
                fd = self._proc.stdin.fileno()
                while view:
                    view = view[os.write(fd, view):]
            except BrokenPipeError:
                self._raise()
                raise errdefs.Unknown("pigz exited early") from None
        elif self._zlib is not None:
            self._out(self._zlib.compress(data))
        else:
            self._out(data)

    def _raise(self) -> None:
        if self._error:
            raise self._error[0]

    def close(self) -> None:
        if self._proc is not None:
            self._proc.stdin.close()
            assert self._reader is not None
            self._reader.join()
            stderr = self._proc.stderr.read().decode(errors="replace").strip()
            rc = self._proc.wait()
            self._proc.stdout.close()
            self._proc.stderr.close()
            self._raise()
            if rc != 0:
                raise errdefs.Unknown(f"pigz failed ({rc}): {stderr}")
        elif self._zlib is not None:
            self._out(self._zlib.flush())

    def abort(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
            if self._reader is not None:
                self._reader.join()
            for f in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
                try:
                    f.close()
                except OSError:
                    pass


def write_layer(lower: Union[str, bytes, os.PathLike, None], upper: Union[str, bytes, os.PathLike],
                sink: Callable[[bytes], Any], compression: str = GZIP, *, use_pigz: Optional[bool] = None,
                level: int = 6, whiteout_time_ns: Optional[int] = None) -> DiffResult:
    """Write the layer turning `lower` into `upper` to `sink`, gzip-compressed by default
    (UNCOMPRESSED for a plain tar); returns its digests and sizes."""
    comp = _Compressor(sink, compression, use_pigz, level)
    try:
        write_diff(lower, upper, comp.write, whiteout_time_ns=whiteout_time_ns)
        comp.close()
    except BaseException:
        comp.abort()
        raise
    diff_id = f"sha256:{comp.tar_hash.hexdigest()}"
    return DiffResult(diff_id=diff_id, uncompressed_size=comp.tar_size,
                      digest=f"sha256:{comp.out_hash.hexdigest()}", size=comp.out_size,
                      compression=compression)
