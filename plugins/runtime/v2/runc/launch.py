"""The shim binary's command line: Go-style flags, the `start` and `delete` actions, the zygote
client, and the hand-off to the server.

containerd runs `containerd-shim-pyrunc-v2 -namespace NS -address ADDR -publish-binary BIN -id ID
[-debug] start` from the bundle directory for every new task and waits for it to print an address;
after a shim disconnects it runs `... -id ID -bundle PATH delete` and reads a marshalled
task.v2.DeleteResponse from stdout. Both run in a fresh interpreter each time, so this module
imports only the standard library (no betterproto, no asyncio) and keeps its work to a few
syscalls: its import time is container start latency. Our daemon skips that interpreter: when the
runtime's binary is this entry point for its own interpreter (`runs_this_code`), it calls
`start()` in a worker thread with the bundle, environment and options it would have passed.

What `start` does, as containerd's runc shim manager does (runtime/v2/runc/manager, shim/util*):
  * the socket address is `unix:///run/pycontainerd/s/<sha256(join(ADDR, NS, GROUP))>` (containerd's
    hashing, under our own directory instead of containerd's /run/containerd/s; the directory is
    created 0711 when missing), where GROUP
    is the task id or, when the bundle's config.json carries the annotation
    `io.containerd.runc.v2.group` (or `io.containerd.pyrunc.v2.group`) or
    `io.kubernetes.cri.sandbox-id`, that value; a socket that is in use and answers means a shim
    of the group already runs: its address is reused and no new server is started;
  * the listening socket is created here (mode 0600), the `address` file written in the bundle,
    and the server process receives the socket as fd 3, in a process group of its own;
  * the task options on stdin (a containerd.runc.v1.Options Any) may name a `shim_cgroup` the
    server joins; the server's oom_score_adj is set to containerd's + 1.

The server process comes from the zygote (see zygote.py): a template process that has imported
everything once and forks every server, so a shim costs a fork instead of an interpreter start
and ~30 MB of imports. When the zygote cannot be used (PYRUNC_ZYGOTE=0, or it
fails to start) the server is exec'd directly: `<this binary> -namespace NS -id ID -address ADDR`.

Environment knobs (read by `start`, inherited from containerd): PYRUNC_ZYGOTE=0 disables the
zygote; PYRUNC_ZYGOTE_DIR (default /run/pycontainerd/pyrunc) is where its socket lives (one zygote per
daemon address and code version);
PYRUNC_ZYGOTE_IDLE is the number of seconds it lingers without requests (default 600);
How containers share servers (PYRUNC_SHIM_GROUP): `namespace`, the default, serves the
containers of a daemon's namespace from a few servers of up to PYRUNC_SHIM_GROUP_SIZE containers
each (default 8; 0: no limit) instead of one process each. The servers are numbered slots (the
GROUP `io.containerd.pyrunc.v2.shared.<N>`); `start` reserves a place in the first slot whose
server takes it (a Connect call, which a full server refuses with FailedPrecondition) and starts
a server in the first free slot otherwise. The price is a shared fate: a server that dies takes
its containers' tasks with it, so the size bounds how many. `container` gives every container a
server of its own, as containerd's Go shim does. A grouped server lingers PYRUNC_SHIM_LINGER
seconds (default 10) after its last container, so that the next one needs no new process.
Containers with a group annotation are grouped by it, with no limit, whatever the setting.
"""
import _socket as socket  # socket.py imports selectors and builds enums: ~5 ms we do not need
import errno
import json
import os
import struct
import sys
import time

try:
    from _sha256 import sha256  # the builtin one; hashlib loads OpenSSL (~4 ms)
except ImportError:  # pragma: no cover
    from hashlib import sha256

NAME = "io.containerd.pyrunc.v2"
VERSION = "0.1.0"
# Our shims' own places (never containerd's /run/containerd/{s,runc}, which its Go shims use):
# SOCKET_ROOT holds the shims' sockets (v2 shims create them, the v1 runtime creates the v1 ones),
# RUNC_ROOT is the default runc --root of both Python shims (runc Options.root / -runtime-root win).
SOCKET_ROOT = "/run/pycontainerd/s"
SOCKET_DIR_MODE = 0o711
SOCKET_PATH_LIMIT = 106
RUNC_ROOT = "/run/pycontainerd/runc"
INIT_PID_FILE = "init.pid"
GROUP_LABELS = ("io.containerd.runc.v2.group", "io.containerd.pyrunc.v2.group", "io.kubernetes.cri.sandbox-id")
DEFAULT_ZYGOTE_DIR = "/run/pycontainerd/pyrunc"
SHARED_GROUP = "io.containerd.pyrunc.v2.shared"
DEFAULT_GROUP_SIZE = 8
SHARED_ENV = "PYRUNC_SHIM_SHARED"  # set by `start` for the server of a slot: its capacity
MAX_SLOTS = 4096
SIGKILL_STATUS = 128 + 9

_RESET_SIGNALS = (13, 25)  # SIGPIPE, SIGXFSZ: Python ignores them, children must not inherit that


class ShimError(Exception):
    """A failure the shim reports on stderr before exiting 1 (as `<runtime name>: <message>`)."""


# --------------------------------------------------------------------------------------------
# Flags, as Go's flag package parses them


class Flags:
    __slots__ = ("debug", "version", "namespace", "id", "socket", "bundle", "address", "publish_binary",
                 "action", "args")

    def __init__(self) -> None:
        self.debug = False
        self.version = False
        self.namespace = ""
        self.id = ""
        self.socket = ""
        self.bundle = ""
        self.address = ""
        self.publish_binary = "containerd"
        self.action = ""
        self.args: list = []

    def server_args(self) -> list:
        """The flags a server process is started with (containerd's runc manager newCommand)."""
        args = ["-namespace", self.namespace, "-id", self.id, "-address", self.address]
        if self.debug:
            args.append("-debug")
        return args


_BOOL_FLAGS = {"debug": "debug", "v": "version"}
_STRING_FLAGS = {"namespace": "namespace", "id": "id", "socket": "socket", "bundle": "bundle",
                 "address": "address", "publish-binary": "publish_binary"}


class FlagError(ShimError):
    pass


def parse_go_flags(argv: list, target, bools: dict, strings: dict) -> list:
    """Go's flag.Parse: `-name value`, `-name=value`, `--name`, bools without a value, into the
    attributes of `target` that `bools` / `strings` name for each flag; parsing stops at the
    first non-flag argument or after `--`. Returns the arguments left."""
    i = 0
    n = len(argv)
    while i < n:
        arg = argv[i]
        if len(arg) < 2 or arg[0] != "-":
            break
        if arg == "--":
            i += 1
            break
        name = arg[2:] if arg.startswith("--") else arg[1:]
        if not name or name[0] in "-=":
            raise FlagError(f"bad flag syntax: {arg}")
        value = None
        if "=" in name:
            name, value = name.split("=", 1)
        i += 1
        if name in bools:
            if value is None or value.lower() in ("1", "t", "true"):
                setattr(target, bools[name], True)
            elif value.lower() in ("0", "f", "false"):
                setattr(target, bools[name], False)
            else:
                raise FlagError(f'invalid boolean value "{value}" for -{name}: parse error')
        elif name in strings:
            if value is None:
                if i >= n:
                    raise FlagError(f"flag needs an argument: -{name}")
                value = argv[i]
                i += 1
            setattr(target, strings[name], value)
        elif name in ("h", "help"):
            raise FlagError("flag: help requested")
        else:
            raise FlagError(f"flag provided but not defined: -{name}")
    return argv[i:]


def parse_flags(argv: list) -> Flags:
    """The shim's flags; the first argument after them is the action."""
    flags = Flags()
    rest = parse_go_flags(argv, flags, _BOOL_FLAGS, _STRING_FLAGS)
    flags.action = rest[0] if rest else ""
    flags.args = rest[1:]
    return flags


# --------------------------------------------------------------------------------------------
# Entry point


def main(argv: list | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        flags = parse_flags(argv)
    except FlagError as err:
        sys.stderr.write(f"{err}\n")
        return 2
    if flags.version:
        sys.stdout.write(f"{sys.argv[0]}:\n  Version:  {VERSION}\n  Revision: pycontainerd\n"
                         f"  Python version: {sys.version.split()[0]}\n\n")
        return 0
    if flags.action == "zygote":
        from . import zygote
        return zygote.main(flags)
    try:
        if not flags.namespace:
            raise ShimError("shim namespace cannot be empty")
        if flags.action == "start":
            options = sys.stdin.buffer.read() if not sys.stdin.closed else b""
            sys.stdout.write(start(flags, options=options, warn=_warn_to_log_fifo))
            sys.stdout.flush()
            return 0
        if flags.action == "delete":
            data = delete(flags)
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
            return 0
    except ShimError as err:
        sys.stderr.write(f"{NAME}: {err}")
        return 1
    except OSError as err:
        sys.stderr.write(f"{NAME}: {oserror_text(err)}")
        return 1
    # no action: serve (a server exec'd directly rather than forked from the zygote); show the
    # argv a Go shim would have, not the interpreter running this script
    from . import zygote
    zygote.set_cmdline(sys.argv)
    from . import server
    return server.main(flags, listen_fd=None if flags.socket else 3)


def oserror_text(err: OSError) -> str:
    if err.filename:
        return f"{err.filename}: {err.strerror or err}"
    return err.strerror or str(err)


# --------------------------------------------------------------------------------------------
# Socket address and the `start` action


def _clean(path: str) -> str:
    """Go's filepath.Clean for the paths we hash."""
    cleaned = os.path.normpath(path) if path else "."
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned


def socket_address(containerd_address: str, namespace: str, group: str) -> str:
    """containerd's shim.SocketAddress, under our SOCKET_ROOT: unix://SOCKET_ROOT/<sha256 of ADDR/NS/ID>."""
    digest = sha256(_clean(os.path.join(containerd_address, namespace, group)).encode()).hexdigest()
    return f"unix://{SOCKET_ROOT}/{digest}"


def socket_path(address: str) -> str:
    if address.startswith("unix://"):
        return address[len("unix://"):]
    return "\0" + address


def read_spec_annotations(path: str = "config.json") -> dict:
    with open(path, "rb") as f:
        spec = json.load(f)
    annotations = spec.get("annotations") if isinstance(spec, dict) else None
    return annotations if isinstance(annotations, dict) else {}


def env_number(env, name: str, default, kind=float):
    """A numeric knob from the environment: `kind(env[name])`, or `default` when it is unset or
    not a number."""
    try:
        return kind(env.get(name, default))
    except ValueError:
        return default


def groups_by_namespace(env) -> bool:
    """PYRUNC_SHIM_GROUP: `namespace` (the default) shares servers, `container` does not."""
    return env.get("PYRUNC_SHIM_GROUP") != "container"


def shim_group_size(env) -> int:
    """PYRUNC_SHIM_GROUP_SIZE: containers per grouped server (0: no limit)."""
    return max(0, env_number(env, "PYRUNC_SHIM_GROUP_SIZE", DEFAULT_GROUP_SIZE, int))


def shared_group(slot: int) -> str:
    return f"{SHARED_GROUP}.{slot}"


def group_id(task_id: str, annotations: dict) -> str:
    for label in GROUP_LABELS:
        value = annotations.get(label)
        if isinstance(value, str):
            return value
    return task_id


def make_dirs(path: str, mode: int = SOCKET_DIR_MODE) -> None:
    """Create `path` and its missing parents with exactly `mode` (umask aside); existing ones are
    left as they are."""
    if not path or os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent != path:
        make_dirs(parent, mode)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return
    os.chmod(path, mode)


def new_socket(address: str):
    """Listen on the address (mode 0600), as shim.NewSocket; EADDRINUSE passes through. A missing
    socket directory is created 0711."""
    path = socket_path(address)
    abstract = path.startswith("\0")
    if not abstract:
        make_dirs(os.path.dirname(path))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        if not abstract:
            try:
                os.chmod(path, 0o600)
            except OSError:
                os.unlink(path)
                raise
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return sock


def can_connect(address: str, timeout: float = 0.1) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path(address))
    except OSError:
        return False
    finally:
        sock.close()
    return True


def _pb_bytes(num: int, data: bytes) -> bytes:
    return _varint((num << 3) | 2) + _varint(len(data)) + data


_TTRPC_HEADER = struct.Struct(">IIBB")


def ttrpc_connect(address: str, task_id: str, timeout: float = 2.0) -> str:
    """containerd.task.v2.Task/Connect on the shim at `address` (a hand-made ttrpc request, to
    keep this module free of the generated API): "ok" when it answered OK, "refused" when nothing
    listens there, "busy" when something does but did not answer OK (a grouped server that is
    full or on its way out, or one that does not answer)."""
    request = (_pb_bytes(1, b"containerd.task.v2.Task") + _pb_bytes(2, b"Connect")
               + _pb_bytes(3, _pb_bytes(1, task_id.encode())))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path(address))
        except OSError:
            return "refused"
        sock.sendall(_TTRPC_HEADER.pack(len(request), 1, 1, 0) + request)
        data = b""
        while len(data) < _TTRPC_HEADER.size or len(data) < _TTRPC_HEADER.size + _TTRPC_HEADER.unpack(
                data[:_TTRPC_HEADER.size])[0]:
            chunk = sock.recv(65536)
            if not chunk:
                return "busy"
            data += chunk
    except OSError:
        return "busy"
    finally:
        sock.close()
    length, stream, mtype, _flags = _TTRPC_HEADER.unpack(data[:_TTRPC_HEADER.size])
    if stream != 1 or mtype != 2:
        return "busy"
    try:
        for num, wire, value in proto_fields(data[_TTRPC_HEADER.size:_TTRPC_HEADER.size + length]):
            if num == 1 and wire == 2:
                for snum, swire, svalue in proto_fields(value):
                    if snum == 1 and swire == 0 and svalue != 0:
                        return "busy"
    except ValueError:
        return "busy"
    return "ok"


def remove_socket(address: str) -> None:
    if address.startswith("unix://"):
        try:
            os.unlink(address[len("unix://"):])
        except FileNotFoundError:
            pass


def write_address(path: str, address: str) -> None:
    """Atomically (temp file, O_SYNC, rename), as shim.WriteAddress."""
    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path))
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_SYNC | os.O_CLOEXEC, 0o666)
    try:
        os.write(fd, address.encode())
    finally:
        os.close(fd)
    os.rename(tmp, path)


def read_address(path: str = "address") -> str:
    with open(path) as f:
        data = f.read()
    if not data:
        raise ShimError("no shim address")
    return data


def start(flags: Flags, *, bundle: str = ".", env=None, options: bytes = b"", executable: str = "",
          warn=None, direct: bool = True) -> str:
    """The `start` action for the task in `bundle` (containerd runs it from there), with the
    environment `env` (default: ours) and the task options `options` (a marshalled Any); returns
    the address to print. `executable` is this shim's binary (default: the running script);
    `warn` receives what the caller should log (a fallback taken). Without `direct`, a server
    comes from the zygote or not at all (ZygoteUnavailable, nothing left behind): a caller whose
    working directory is not the bundle runs the binary instead. Blocks: at most a few seconds,
    while a lingering shim of the group goes away or a zygote starts."""
    env = os.environ if env is None else env
    executable = executable or self_executable()
    if len(flags.address) > 0 and "\0" in flags.address:
        raise ShimError("invalid containerd address")
    group = group_id(flags.id, read_spec_annotations(os.path.join(bundle, "config.json")))
    shared = group == flags.id and groups_by_namespace(env)
    slot = 0
    deadline = time.monotonic() + 10.0
    while True:
        address = socket_address(flags.address, flags.namespace, shared_group(slot) if shared else group)
        try:
            sock = new_socket(address)
            break
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise ShimError(f"create new shim socket: {oserror_text(err)}") from None
        # a shim of this group already serves it. A grouped server may be lingering after its
        # last container, or full: it is asked for a place (Connect) rather than just probed.
        # An explicit group waits for a server on its way out; a slot is passed over instead.
        state = ttrpc_connect(address, flags.id) if shared else ("ok" if can_connect(address) else "refused")
        if state == "ok":
            write_address(os.path.join(bundle, "address"), address)
            return address
        if state == "refused":  # dead: its socket file is stale
            remove_socket(address)
        elif shared and slot + 1 < MAX_SLOTS:
            slot += 1
        elif time.monotonic() > deadline:
            raise ShimError(f"the shim at {address} neither serves nor goes away")
        else:
            time.sleep(0.05)
    pid = 0
    try:
        write_address(os.path.join(bundle, "address"), address)
        if shared:  # the server takes at most that many containers, and lingers
            env = {**env, SHARED_ENV: str(shim_group_size(env))}
        pid = launch_server(flags, sock, bundle, env, executable, warn, direct)
        sock.close()
        shim_cgroup = _shim_cgroup(options)
        if shim_cgroup:
            join_cgroup(pid, shim_cgroup)
        adjust_oom_score(pid)
    except BaseException:
        sock.close()
        remove_socket(address)
        try:
            os.unlink(os.path.join(bundle, "address"))
        except OSError:
            pass
        if pid:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        raise
    return address


_ENTRY_LINE = b"from pycontainerd.cmd.shim import main"


def runs_this_code(binary: str) -> bool:
    """Whether `binary` is this shim's installed entry point run by this very interpreter (a
    console script: `#!<sys.executable>` importing pycontainerd.cmd.shim). Its `start` action
    is then exactly `start()` here, and a caller with this module loaded can run it in-process
    instead of paying an interpreter start per container."""
    try:
        with open(binary, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    first, _, body = head.partition(b"\n")
    if not first.startswith(b"#!") or _ENTRY_LINE not in body:
        return False
    interpreter = first[2:].strip().split(b" ")[0].decode(errors="replace")
    try:  # the same file in the same bin/ (a venv's python links to its base interpreter)
        return (os.path.samefile(interpreter, sys.executable)
                and os.path.samefile(os.path.dirname(interpreter), os.path.dirname(sys.executable)))
    except OSError:
        return False


def self_executable() -> str:
    exe = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if exe and os.sep in exe and os.path.exists(exe):
        return os.path.abspath(exe)
    import shutil
    return shutil.which("containerd-shim-pyrunc-v2") or os.path.abspath(exe)


def launch_server(flags: Flags, sock, bundle: str, env, executable: str, warn=None,
                  direct: bool = True) -> int:
    """Start the server process serving `sock`, from `bundle` with `env`; returns its pid. A
    server spawned directly (no zygote; only when `direct`) inherits our working directory."""
    argv = [executable, *flags.server_args()]
    env = dict(env)
    env["GOMAXPROCS"] = "4"
    if env.get("PYRUNC_ZYGOTE", "1") not in ("0", "false", "no", "off"):
        try:
            return zygote_fork(argv, os.path.abspath(bundle), env, sock.fileno(), flags.address)
        except ZygoteUnavailable as err:
            if not direct:
                raise
            if warn is not None:
                warn(f"zygote unavailable, starting the shim directly: {err}")
    elif not direct:
        raise ZygoteUnavailable("the zygote is disabled (PYRUNC_ZYGOTE)")
    return spawn(argv, env, fds={3: sock.fileno()}, setpgroup=True)


def _warn_to_log_fifo(text: str) -> None:
    """The binary's `start` output is its address (containerd reads stdout and stderr together):
    warnings go to the bundle's `log` fifo, which the daemon copies to its log."""
    try:
        fd = os.open("log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.write(fd, f'time="{stamp}" level=warning msg="{text}" runtime={NAME}\n'.encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def spawn(argv: list, env: dict, fds: dict | None = None, stdout: int | None = None,
          setpgroup: bool = False, setsid: bool = False) -> int:
    """posix_spawn with stdin/stderr (and stdout unless given) on /dev/null and `fds` placed at
    their numbers (target -> source)."""
    actions = []
    keep = []
    try:
        for target, source in (fds or {}).items():
            high = _fcntl().fcntl(source, _fcntl().F_DUPFD_CLOEXEC, 64)
            keep.append(high)
            actions.append((os.POSIX_SPAWN_DUP2, high, target))
        actions.append((os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0))
        if stdout is None:
            actions.append((os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0))
        else:
            high = _fcntl().fcntl(stdout, _fcntl().F_DUPFD_CLOEXEC, 64)
            keep.append(high)
            actions.append((os.POSIX_SPAWN_DUP2, high, 1))
        actions.append((os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0))
        kwargs = {"setsigdef": _RESET_SIGNALS, "setsigmask": ()}
        if setsid:
            kwargs["setsid"] = True
        elif setpgroup:
            kwargs["setpgroup"] = 0
        return os.posix_spawn(argv[0], argv, env, file_actions=actions, **kwargs)
    finally:
        for fd in keep:
            os.close(fd)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _fcntl():
    import fcntl
    return fcntl


def _read_varint(data: bytes, pos: int) -> tuple:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def proto_fields(data: bytes):
    """(field number, wire type, value) of a protobuf message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            value = data[pos:pos + length]
            pos += length
        elif wire == 1:
            value = data[pos:pos + 8]
            pos += 8
        elif wire == 5:
            value = data[pos:pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield key >> 3, wire, value


def _shim_cgroup(data: bytes) -> str:
    """`shim_cgroup` of the containerd.runc.v1.Options Any containerd writes on our stdin."""
    if not data:
        return ""
    try:
        type_url = b""
        value = b""
        for num, wire, field_value in proto_fields(data):
            if num == 1 and wire == 2:
                type_url = field_value
            elif num == 2 and wire == 2:
                value = field_value
        if not type_url.decode().endswith("containerd.runc.v1.Options"):
            return ""
        for num, wire, field_value in proto_fields(value):
            if num == 3 and wire == 2:
                return field_value.decode()
    except (ValueError, UnicodeDecodeError) as err:
        raise ShimError(f"unmarshal task options: {err}") from None
    return ""


def _cgroup_mounts() -> list:
    """(mount point, fstype, super options) of the cgroup file systems."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            parts = post.split()
            if len(parts) >= 3 and parts[0] in ("cgroup", "cgroup2"):
                mounts.append((pre.split()[4], parts[0], parts[2].split(",")))
    return mounts


def join_cgroup(pid: int, path: str) -> None:
    """Put `pid` in cgroup `path` (a static path in every v1 hierarchy, or the unified one)."""
    mounts = _cgroup_mounts()
    unified = [m for m in mounts if m[0] == "/sys/fs/cgroup" and m[1] == "cgroup2"]
    targets = []
    if unified:
        targets.append(os.path.join(unified[0][0], path.lstrip("/")))
    else:
        for mountpoint, fstype, _options in mounts:
            if fstype == "cgroup":
                targets.append(os.path.join(mountpoint, path.lstrip("/")))
    for target in targets:
        try:
            with open(os.path.join(target, "cgroup.procs"), "w") as f:
                f.write(str(pid))
        except OSError as err:
            if unified:
                raise ShimError(f"failed to join cgroup {path}: {oserror_text(err)}") from None
            # a v1 hierarchy without that cgroup: containerd's cgroups.Load skips missing ones


def adjust_oom_score(pid: int) -> None:
    """The shim's oom_score_adj is containerd's + 1 (capped at 1000). Lowering a score needs
    CAP_SYS_RESOURCE, which these hosts lack: a refused write is not an error."""
    try:
        with open(f"/proc/{os.getppid()}/oom_score_adj") as f:
            score = int(f.read().strip() or 0)
    except (OSError, ValueError) as err:
        raise ShimError(f"failed to adjust OOM score for shim: get parent OOM score: {err}") from None
    score = min(score + 1, 1000)
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(score))
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EPERM, errno.ESRCH, errno.ENOENT):
            raise ShimError(f"failed to adjust OOM score for shim: set shim OOM score: {err}") from None


# --------------------------------------------------------------------------------------------
# The zygote client


class ZygoteUnavailable(Exception):
    pass


def zygote_dir(env=None) -> str:
    return (os.environ if env is None else env).get("PYRUNC_ZYGOTE_DIR") or DEFAULT_ZYGOTE_DIR


def _package_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def code_fingerprint() -> str:
    """Changes whenever the code a zygote would run changes: the interpreter, this package and
    the project's core (their files' names, sizes and mtimes)."""
    h = sha256()
    h.update(sys.executable.encode())
    h.update(sys.version.encode())
    pkg = _package_dir()
    core = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(pkg)))), "core")
    for directory in (pkg, core):
        h.update(directory.encode())
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.name.endswith(".py"):
                st = entry.stat()
                h.update(f"{entry.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def zygote_socket_path(containerd_address: str = "", env=None) -> str:
    """One zygote per code version and daemon: a daemon's shims never come from a zygote another
    daemon started (its environment, cgroups, lifetime are that daemon's business)."""
    key = sha256(f"{code_fingerprint()}\0{containerd_address}".encode()).hexdigest()[:16]
    return os.path.join(zygote_dir(env), f"zygote-{key}.sock")


_HEADER = struct.Struct(">I")


def stop_zygote(containerd_address: str, env=None) -> bool:
    """Let this daemon's zygote (of this code version) go: remove its socket, which it notices
    within 5 s and exits. Shim servers it forked are not its children and keep running. True
    when there was one."""
    path = zygote_socket_path(containerd_address, env)
    try:
        lock = os.open(path + ".lock", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    fcntl = _fcntl()
    existed = True
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # not while a `start` is starting it
        for leftover in (path, path + ".lock"):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                existed = existed and leftover != path
    finally:
        os.close(lock)
    return existed


def _zygote_request(path: str, request: dict, fd: int, timeout: float) -> dict:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        body = json.dumps(request).encode()
        sock.sendmsg([_HEADER.pack(len(body)), body],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        sock.close()
    data = b"".join(chunks)
    if not data:
        raise ZygoteUnavailable("zygote closed the connection without an answer")
    return json.loads(data)


def zygote_fork(argv: list, cwd: str, env: dict, listen_fd: int, containerd_address: str = "") -> int:
    """Ask the zygote (starting it if needed, as argv[0] with `env`) for a server process that
    runs `argv` in `cwd` with `env`; returns its pid."""
    path = zygote_socket_path(containerd_address, env)
    request = {"argv": argv, "cwd": cwd, "env": env}
    try:
        reply = _zygote_request(path, request, listen_fd, 10.0)
    except (FileNotFoundError, ConnectionRefusedError):
        start_zygote(path, argv[0], env, containerd_address)
        try:
            reply = _zygote_request(path, request, listen_fd, 10.0)
        except OSError as err:
            raise ZygoteUnavailable(f"{path}: {err}") from None
    except (OSError, ValueError) as err:
        raise ZygoteUnavailable(f"{path}: {err}") from None
    if "error" in reply:
        raise ZygoteUnavailable(reply["error"])
    return int(reply["pid"])


def start_zygote(path: str, executable: str, env: dict, containerd_address: str = "",
                 timeout: float = 30.0) -> None:
    """Start a zygote (`executable zygote ...` with `env`) listening on `path` unless one already
    answers there (one at a time: concurrent `start`s serialise on a lock file next to the socket)."""
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, 0o700, exist_ok=True)
        lock = os.open(path + ".lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise ZygoteUnavailable(f"{directory}: {oserror_text(err)}") from None
    fcntl = _fcntl()
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            return  # another `start` started it meanwhile
        except OSError:
            pass
        finally:
            probe.close()
        r, w = os.pipe()
        try:
            # the padding leaves room to rewrite a forked server's cmdline; the daemon's address
            # names the zygote's owner to ps (and to test harnesses cleaning up after a daemon)
            argv = [executable, "zygote", path, containerd_address or "-", "-" * 1024]
            pid = spawn(argv, dict(env), stdout=w, setsid=True)
            # a `start` process exits at once and leaves the zygote to init; a daemon starting
            # shims in-process lives on and must reap it when it ends
            import threading
            threading.Thread(target=_reap, args=(pid,), name="pyrunc-zygote-reaper", daemon=True).start()
        finally:
            os.close(w)
        try:
            import select
            deadline = time.monotonic() + timeout
            data = b""
            while b"\n" not in data:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([r], [], [], left)[0]:
                    raise ZygoteUnavailable(f"zygote not ready after {timeout}s")
                chunk = os.read(r, 4096)
                if not chunk:
                    raise ZygoteUnavailable(f"zygote exited before it was ready: {data.decode(errors='replace')}")
                data += chunk
            if not data.startswith(b"ready"):
                raise ZygoteUnavailable(data.decode(errors="replace").strip())
        finally:
            os.close(r)
    finally:
        os.close(lock)


# --------------------------------------------------------------------------------------------
# The `delete` action


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_timestamp(seconds: int, nanos: int) -> bytes:
    body = b""
    if seconds:
        body += b"\x08" + _varint(seconds)
    if nanos:
        body += b"\x10" + _varint(nanos)
    return body


def encode_delete_response(pid: int, exit_status: int, exited_ns: int) -> bytes:
    """task.v2.DeleteResponse{pid=1, exit_status=2, exited_at=3 (always present, like gogo's
    non-nullable timestamps)}."""
    out = b""
    if pid:
        out += b"\x08" + _varint(pid)
    if exit_status:
        out += b"\x10" + _varint(exit_status)
    ts = encode_timestamp(exited_ns // 1_000_000_000, exited_ns % 1_000_000_000)
    return out + b"\x1a" + _varint(len(ts)) + ts


def read_pid_file(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


def read_options(bundle: str) -> dict:
    """The bundle's options.json (the runc Options as Go's encoding/json wrote them), {} if absent."""
    try:
        with open(os.path.join(bundle, "options.json"), "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


def read_runtime(bundle: str) -> str:
    try:
        with open(os.path.join(bundle, "runtime")) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _mountpoints_under(path: str) -> list:
    path = path.rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            if "\\" in mp:
                mp = mp.encode().decode("unicode_escape")
            if mp == path or mp.startswith(path + "/"):
                found.append(mp)
    return found


def unmount_all(target: str) -> None:
    """Unmount every mount stacked on `target` (containerd's mount.UnmountAll)."""
    if not _mountpoints_under(target):
        return
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for _ in range(1000):
        if libc.umount2(os.fsencode(target), 0) != 0:
            err = ctypes.get_errno()
            if err in (errno.EINVAL, errno.ENOENT):
                return
            if err == errno.EBUSY:
                time.sleep(0.05)
                continue
            raise OSError(err, f"unmount {target}: {os.strerror(err)}")


def delete(flags: Flags) -> bytes:
    """The `delete` action (runc manager Stop): force-delete the runc container, unmount the
    rootfs, report the init pid with status 137. Problems are warnings on stderr."""
    warnings = []
    cwd = os.getcwd()
    bundle = os.path.join(os.path.dirname(cwd), flags.id)
    runtime = read_runtime(bundle) or "runc"
    try:
        opts = read_options(bundle)
    except (OSError, ValueError) as err:
        raise ShimError(f"read options.json: {err}") from None
    root = os.path.join(opts.get("root") or RUNC_ROOT, flags.namespace)
    if os.path.isdir(os.path.join(root, flags.id)):
        argv = [runtime, "--root", root, "--log", os.path.join(bundle, "log.json"), "--log-format", "json"]
        if opts.get("systemd_cgroup"):
            argv.append("--systemd-cgroup")
        argv += ["delete", "--force", flags.id]
        import subprocess
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True)
        if proc.returncode != 0:
            output = (proc.stdout + proc.stderr).decode(errors="replace").strip()
            warnings.append(f"failed to remove runc container: exit status {proc.returncode}: {output}")
    try:
        unmount_all(os.path.join(bundle, "rootfs"))
    except OSError as err:
        warnings.append(f"failed to cleanup rootfs mount: {err}")
    try:  # a shim killed outright leaves its socket behind (the Go shim leaks it); a live one
        address = read_address(os.path.join(bundle, "address"))  # (grouped shims) answers
        if address.startswith("unix://") and not can_connect(address):
            remove_socket(address)
    except (OSError, ShimError):
        pass
    pid = 0
    try:
        pid = read_pid_file(os.path.join(bundle, INIT_PID_FILE))
    except (OSError, ValueError) as err:
        warnings.append(f"failed to read init pid file: {err}")
    for text in warnings:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        sys.stderr.write(f'time="{stamp}" level=warning msg="{text}" runtime={NAME}\n')
    return encode_delete_response(pid, SIGKILL_STATUS, time.time_ns())
