"""The OCI runtime spec, generated client-side exactly as containerd 1.6's client (package oci)
and ctr generate it.

A spec is a plain dict shaped like the JSON of runtime-spec 1.0.2. `generate_spec(ctx, *opts)`
starts from containerd's default Linux spec (namespaces pid/ipc/uts/mount/network, the default
mounts, capabilities, RLIMIT_NOFILE 1024, masked and read-only paths, deny-all device cgroup,
cgroups path /<namespace>/<id>) and applies options in order; each option is a function
`(ctx: SpecContext, spec: dict) -> None`, named after its Go counterpart (`with_env`,
`with_image_config`, `with_user`, `with_privileged`, ...). `marshal(spec)` drops what Go's
encoding/json would omit and orders fields as the Go structs do; `spec_bytes(spec)` is the JSON
containerd stores. No default option ever sets a negative `oomScoreAdj`.

Options that resolve users and groups (`with_user`, `with_user_id`, `with_username`,
`with_additional_gids`) read /etc/passwd and /etc/group of the container's root filesystem, as
containerd does: an absolute `root.path` (--rootfs), or the container's snapshot mounted
read-only in a temp dir (`SpecContext.mounts`, which the caller fetched from the snapshotter).
Those options block (mounting): call generation through `asyncio.to_thread` from async code.

`image_config(...)` is the part of an image config (the OCI/Docker config JSON) the options need.
Owns nothing else; it never talks to a daemon.
"""
from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, TypeVar

from pycontainerd.core import errdefs

OCI_VERSION = "1.0.2-dev"
"""The runtime-spec version containerd 1.6 writes."""

DEFAULT_UNIX_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
DEFAULT_ROOTFS_PATH = "rootfs"
RWM = "rwm"

DEFAULT_CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]

KNOWN_CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
    "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
]
"""Capability names by number (containerd's pkg/cap list)."""

MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]

STOP_SIGNAL_LABEL = "io.containerd.image.config.stop-signal"

T = TypeVar("T")


# -- context ---------------------------------------------------------------------------------

@dataclass
class SpecContext:
    """What options may look at besides the spec: the container's namespace and id, and where
    its root filesystem is (a snapshot's mounts, or the spec's absolute root path)."""

    namespace: str
    id: str
    snapshotter: str = ""
    snapshot_key: str = ""
    mounts: Optional[Sequence[Any]] = None
    """The snapshot's mounts (core.mount.Mount or anything Mount.from_any takes)."""

    def with_rootfs(self, spec: dict, fn: Callable[[str], T]) -> T:
        """Run fn(root) with the container's root filesystem readable at `root`."""
        if not self.snapshotter and not self.snapshot_key:
            root = (spec.get("root") or {}).get("path", "")
            if not os.path.isabs(root):
                raise errdefs.InvalidArgument("rootfs absolute path is required")
            return fn(root)
        if not self.snapshotter:
            raise errdefs.InvalidArgument("no snapshotter set for container")
        if not self.snapshot_key:
            raise errdefs.InvalidArgument("rootfs snapshot not created for container")
        if self.mounts is None:
            raise errdefs.FailedPrecondition("the snapshot's mounts are needed to read the container's users")
        from pycontainerd.core.mount import Mount, temp_mount

        mounts = [Mount.from_any(m) for m in self.mounts]
        if len(mounts) == 1 and mounts[0].type == "overlay":  # containerd's tryReadonlyMounts
            mounts = [Mount(mounts[0].type, mounts[0].source, mounts[0].target, [*mounts[0].options, "ro"])]
        with temp_mount(mounts, prefix="pyctr-rootfs") as root:
            return fn(root)


SpecOpt = Callable[[SpecContext, dict], None]


# -- the default spec ------------------------------------------------------------------------

def default_mounts() -> list[dict]:
    return [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/run", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    ]


def default_spec(namespace: str, container_id: str) -> dict:
    """containerd's populateDefaultUnixSpec."""
    if not namespace:
        raise errdefs.FailedPrecondition("namespace is required")
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "user": {"uid": 0, "gid": 0},
            "cwd": "/",
            "capabilities": {"bounding": list(DEFAULT_CAPABILITIES), "effective": list(DEFAULT_CAPABILITIES),
                             "permitted": list(DEFAULT_CAPABILITIES)},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": DEFAULT_ROOTFS_PATH},
        "mounts": default_mounts(),
        "linux": {
            "resources": {"devices": [{"allow": False, "access": RWM}]},
            "cgroupsPath": os.path.join("/", namespace, container_id),
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }


def generate_spec(ctx: SpecContext, *opts: SpecOpt) -> dict:
    """The default spec for ctx's namespace and id, with `opts` applied in order."""
    spec = default_spec(ctx.namespace, ctx.id)
    apply_opts(ctx, spec, *opts)
    return spec


def apply_opts(ctx: SpecContext, spec: dict, *opts: SpecOpt) -> dict:
    for opt in opts:
        opt(ctx, spec)
    return spec


# -- helpers ---------------------------------------------------------------------------------

def _process(s: dict) -> dict:
    return s.setdefault("process", {"user": {"uid": 0, "gid": 0}, "cwd": ""})


def _linux(s: dict) -> dict:
    if s.get("linux") is None:
        s["linux"] = {}
    return s["linux"]


def _resources(s: dict) -> dict:
    linux = _linux(s)
    if linux.get("resources") is None:
        linux["resources"] = {}
    return linux["resources"]


def _cpu(s: dict) -> dict:
    res = _resources(s)
    if res.get("cpu") is None:
        res["cpu"] = {}
    return res["cpu"]


def _caps(s: dict) -> dict:
    p = _process(s)
    if p.get("capabilities") is None:
        p["capabilities"] = {}
    return p["capabilities"]


def _user(s: dict) -> dict:
    return _process(s).setdefault("user", {"uid": 0, "gid": 0})


def replace_or_append_env(defaults: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """containerd's replaceOrAppendEnvValues: overrides replace same-named defaults in place or
    are appended; an override without "=" removes that variable."""
    results = list(defaults)
    cache: dict[str, int] = {}
    for i, e in enumerate(defaults):
        cache[e.split("=", 1)[0]] = i
    for value in overrides:
        if "=" not in value:
            i = cache.get(value)
            if i is not None:
                results[i] = ""
            continue
        name = value.split("=", 1)[0]
        i = cache.get(name)
        if i is not None:
            results[i] = value
        else:
            results.append(value)
    return [r for r in results if r != ""]


# -- simple options --------------------------------------------------------------------------

def with_env(env: Iterable[str]) -> SpecOpt:
    env = list(env)

    def opt(ctx: SpecContext, s: dict) -> None:
        if env:
            p = _process(s)
            p["env"] = replace_or_append_env(p.get("env") or [], env)
    return opt


def read_env_file(path: str) -> list[str]:
    """The lines of an env file, as WithEnvFile reads them (every line, unparsed)."""
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def with_env_file(path: str) -> SpecOpt:
    def opt(ctx: SpecContext, s: dict) -> None:
        with_env(read_env_file(path))(ctx, s)
    return opt


def with_default_path_env(ctx: SpecContext, s: dict) -> None:
    p = _process(s)
    p["env"] = replace_or_append_env(p.get("env") or [], DEFAULT_UNIX_ENV)


def with_process_args(*args: str) -> SpecOpt:
    def opt(ctx: SpecContext, s: dict) -> None:
        p = _process(s)
        p["args"] = list(args)
        p.pop("commandLine", None)
    return opt


def with_process_cwd(cwd: str) -> SpecOpt:
    def opt(ctx: SpecContext, s: dict) -> None:
        _process(s)["cwd"] = cwd
    return opt


def with_tty(ctx: SpecContext, s: dict) -> None:
    p = _process(s)
    p["terminal"] = True
    if s.get("linux") is not None:
        p["env"] = [*(p.get("env") or []), "TERM=xterm"]


def with_tty_size(width: int, height: int) -> SpecOpt:
    def opt(ctx: SpecContext, s: dict) -> None:
        _process(s)["consoleSize"] = {"height": height, "width": width}
    return opt


def with_hostname(name: str) -> SpecOpt:
    def opt(ctx: SpecContext, s: dict) -> None:
        s["hostname"] = name
    return opt


def with_mounts(mounts: Iterable[Mapping[str, Any]]) -> SpecOpt:
    mounts = [dict(m) for m in mounts]

    def opt(ctx: SpecContext, s: dict) -> None:
        s["mounts"] = [*(s.get("mounts") or []), *[dict(m) for m in mounts]]
    return opt


def with_host_namespace(ns_type: str) -> SpecOpt:
    """Leave namespace `ns_type` ("network", "pid", ...) shared with the host."""
    def opt(ctx: SpecContext, s: dict) -> None:
        linux = _linux(s)
        namespaces = linux.get("namespaces") or []
        for i, n in enumerate(namespaces):
            if n.get("type") == ns_type:
                del namespaces[i]
                break
        linux["namespaces"] = namespaces
    return opt


def with_linux_namespace(ns_type: str, path: str = "") -> SpecOpt:
    def opt(ctx: SpecContext, s: dict) -> None:
        linux = _linux(s)
        namespaces = linux.setdefault("namespaces", [])
        entry = {"type": ns_type, **({"path": path} if path else {})}
        for i, n in enumerate(namespaces):
            if n.get("type") == ns_type:
                namespaces[i] = entry
                return
        namespaces.append(entry)
    return opt


def with_new_privileges(ctx: SpecContext, s: dict) -> None:
    _process(s)["noNewPrivileges"] = False


def with_no_new_privileges(ctx: SpecContext, s: dict) -> None:
    _process(s)["noNewPrivileges"] = True


def with_rootfs_path(path: str) -> SpecOpt:
    def opt(ctx: SpecContext, s: dict) -> None:
        s.setdefault("root", {})["path"] = path
    return opt


def with_rootfs_readonly(ctx: SpecContext, s: dict) -> None:
    s.setdefault("root", {"path": ""})["readonly"] = True


def _bind_host_file(path: str) -> SpecOpt:
    def opt(ctx: SpecContext, s: dict) -> None:
        s["mounts"] = [*(s.get("mounts") or []),
                       {"destination": path, "type": "bind", "source": path, "options": ["rbind", "ro"]}]
    return opt


with_host_hosts_file = _bind_host_file("/etc/hosts")
with_host_resolvconf = _bind_host_file("/etc/resolv.conf")
with_host_localtime = _bind_host_file("/etc/localtime")


def with_cgroup(path: str) -> SpecOpt:
    def opt(ctx: SpecContext, s: dict) -> None:
        _linux(s)["cgroupsPath"] = path
    return opt


def with_annotations(annotations: Mapping[str, str]) -> SpecOpt:
    annotations = dict(annotations)

    def opt(ctx: SpecContext, s: dict) -> None:
        s["annotations"] = {**(s.get("annotations") or {}), **annotations}
    return opt


def with_memory_limit(limit: int) -> SpecOpt:
    def opt(ctx: SpecContext, s: dict) -> None:
        if s.get("linux") is not None:
            res = _resources(s)
            if res.get("memory") is None:
                res["memory"] = {}
            res["memory"]["limit"] = int(limit)
    return opt


def with_cpu_shares(shares: int) -> SpecOpt:
    def opt(ctx: SpecContext, s: dict) -> None:
        _cpu(s)["shares"] = int(shares)
    return opt


def with_cpu_cfs(quota: int, period: int) -> SpecOpt:
    def opt(ctx: SpecContext, s: dict) -> None:
        cpu = _cpu(s)
        cpu["quota"] = int(quota)
        cpu["period"] = int(period)
    return opt


def with_cpus(cpus: float) -> SpecOpt:
    """ctr's --cpus: a CFS quota of cpus * 100000 per period of 100000."""
    return with_cpu_cfs(int(cpus * 100000.0), 100000)


def with_pids_limit(limit: int) -> SpecOpt:
    def opt(ctx: SpecContext, s: dict) -> None:
        res = _resources(s)
        res["pids"] = {"limit": int(limit)}
    return opt


def with_oom_score_adj(score: int) -> SpecOpt:
    """Set process.oomScoreAdj. Lowering it below the caller's needs CAP_SYS_RESOURCE (runc
    fails otherwise): no default option uses this."""
    def opt(ctx: SpecContext, s: dict) -> None:
        _process(s)["oomScoreAdj"] = int(score)
    return opt


def with_capabilities(caps: Iterable[str]) -> SpecOpt:
    caps = list(caps)

    def opt(ctx: SpecContext, s: dict) -> None:
        c = _caps(s)
        c["bounding"], c["effective"], c["permitted"] = list(caps), list(caps), list(caps)
    return opt


def with_added_capabilities(caps: Iterable[str]) -> SpecOpt:
    caps = list(caps)

    def opt(ctx: SpecContext, s: dict) -> None:
        c = _caps(s)
        for cap in caps:
            for key in ("bounding", "effective", "permitted"):
                current = c.get(key) or []
                if cap not in current:
                    c[key] = [*current, cap]
    return opt


def with_dropped_capabilities(caps: Iterable[str]) -> SpecOpt:
    caps = list(caps)

    def opt(ctx: SpecContext, s: dict) -> None:
        c = _caps(s)
        for cap in caps:
            for key in ("bounding", "effective", "permitted"):
                c[key] = [x for x in (c.get(key) or []) if x != cap]
    return opt


def current_capabilities() -> list[str]:
    """The caller's effective capabilities by name (containerd's cap.Current)."""
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "CapEff":
                bits = int(value.strip(), 16)
                return [KNOWN_CAPABILITIES[i] for i in range(64)
                        if bits >> i & 1 and i < len(KNOWN_CAPABILITIES)]
    return []


def with_all_current_capabilities(ctx: SpecContext, s: dict) -> None:
    with_capabilities(current_capabilities())(ctx, s)


def with_masked_paths(paths: Optional[Iterable[str]]) -> SpecOpt:
    def opt(ctx: SpecContext, s: dict) -> None:
        _linux(s)["maskedPaths"] = list(paths) if paths is not None else None
    return opt


def with_readonly_paths(paths: Optional[Iterable[str]]) -> SpecOpt:
    def opt(ctx: SpecContext, s: dict) -> None:
        _linux(s)["readonlyPaths"] = list(paths) if paths is not None else None
    return opt


def _writeable(fstype: str) -> SpecOpt:
    def opt(ctx: SpecContext, s: dict) -> None:
        for m in s.get("mounts") or []:
            if m.get("type") == fstype:
                m["options"] = ["rw" if o == "ro" else o for o in (m.get("options") or [])]
    return opt


with_writeable_sysfs = _writeable("sysfs")
with_writeable_cgroupfs = _writeable("cgroup")


def with_selinux_label(label: str) -> SpecOpt:
    def opt(ctx: SpecContext, s: dict) -> None:
        _process(s)["selinuxLabel"] = label
    return opt


def with_apparmor_profile(profile: str) -> SpecOpt:
    def opt(ctx: SpecContext, s: dict) -> None:
        _process(s)["apparmorProfile"] = profile
    return opt


def with_seccomp_unconfined(ctx: SpecContext, s: dict) -> None:
    _linux(s)["seccomp"] = None


def with_privileged(ctx: SpecContext, s: dict) -> None:
    """containerd's WithPrivileged: the caller's capabilities, no masked or read-only paths,
    writable sysfs and cgroupfs, no SELinux/AppArmor/seccomp confinement."""
    for opt in (with_all_current_capabilities, with_masked_paths(None), with_readonly_paths(None),
                with_writeable_sysfs, with_writeable_cgroupfs, with_selinux_label(""),
                with_apparmor_profile(""), with_seccomp_unconfined):
        opt(ctx, s)


def with_all_devices_allowed(ctx: SpecContext, s: dict) -> None:
    _resources(s)["devices"] = [{"allow": True, "access": RWM}]


def with_default_unix_devices(ctx: SpecContext, s: dict) -> None:
    res = _resources(s)
    rules = [(1, 3), (1, 8), (1, 7), (5, 0), (1, 5), (1, 9), (5, 1), (136, None), (5, 2)]
    res["devices"] = [*(res.get("devices") or []),
                      *[{"allow": True, "type": "c", "major": major,
                         **({"minor": minor} if minor is not None else {}), "access": RWM}
                        for major, minor in rules]]


def device_from_path(path: str) -> Optional[dict]:
    """containerd's DeviceFromPath as a spec dict; None when `path` is not a device node."""
    st = os.lstat(path)
    if stat.S_ISBLK(st.st_mode):
        kind = "b"
    elif stat.S_ISCHR(st.st_mode):
        kind = "c"
    elif stat.S_ISFIFO(st.st_mode):
        kind = "p"
    else:
        return None
    return {"path": path, "type": kind, "major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev),
            "fileMode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}


def host_devices(path: str = "/dev", container_path: str = "") -> list[dict]:
    """Every device node under `path` (containerd's getDevices: pts, shm, fd, mqueue and
    console skipped, FIFOs left out, entries in name order)."""
    if not os.path.isdir(path):
        dev = device_from_path(path)
        if dev is None:
            raise errdefs.InvalidArgument(f"{path}: not a device node")
        if container_path:
            dev["path"] = container_path
        return [dev]
    out: list[dict] = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            if name in ("pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"):
                continue
            out += host_devices(full, os.path.join(container_path, name) if container_path else "")
            continue
        if name == "console":
            continue
        try:
            dev = device_from_path(full)
        except FileNotFoundError:
            continue
        if dev is None or dev["type"] == "p":
            continue
        if container_path:
            dev["path"] = os.path.join(container_path, name)
        out.append(dev)
    return out


def with_host_devices(ctx: SpecContext, s: dict) -> None:
    linux = _linux(s)
    linux["devices"] = [*(linux.get("devices") or []), *host_devices()]


def with_devices(device_path: str, container_path: str = "", permissions: str = RWM) -> SpecOpt:
    def opt(ctx: SpecContext, s: dict) -> None:
        linux, res = _linux(s), _resources(s)
        for dev in host_devices(device_path, container_path):
            linux["devices"] = [*(linux.get("devices") or []), dev]
            res["devices"] = [*(res.get("devices") or []),
                              {"allow": True, "type": dev["type"], "major": dev["major"],
                               "minor": dev["minor"], "access": permissions}]
    return opt


# -- users and groups ------------------------------------------------------------------------

@dataclass(frozen=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int
    home: str = ""
    shell: str = ""


@dataclass(frozen=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...] = ()


def _atoi(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        return 0


def parse_passwd(text: str) -> list[PasswdEntry]:
    """/etc/passwd entries as libcontainer's user package parses them (comments and blank lines
    skipped, missing fields empty, unparsable numbers 0)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        f = line.split(":") + [""] * 7
        out.append(PasswdEntry(f[0], _atoi(f[2]), _atoi(f[3]), f[5], f[6]))
    return out


def parse_group(text: str) -> list[GroupEntry]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        f = line.split(":") + [""] * 4
        members = tuple(m for m in f[3].split(",") if m) if f[3] else ()
        out.append(GroupEntry(f[0], _atoi(f[2]), members))
    return out


def root_path(root: str, path: str) -> str:
    """`path` resolved inside `root`, symlinks followed as if `root` were "/" (never out of it)."""
    parts = [p for p in path.split("/") if p and p != "."]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        if os.path.islink(candidate):
            hops += 1
            if hops > 255:
                raise OSError(40, "too many levels of symbolic links", path)
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


class NoUsersFound(errdefs.NotFound):
    pass


def _read(root: str, path: str) -> str:
    with open(root_path(root, path), encoding="utf-8", errors="replace") as f:
        return f.read()


def user_from_path(root: str, match: Callable[[PasswdEntry], bool]) -> PasswdEntry:
    """The first /etc/passwd entry of `root` that matches; FileNotFoundError without the file,
    NoUsersFound when none matches."""
    for entry in parse_passwd(_read(root, "/etc/passwd")):
        if match(entry):
            return entry
    raise NoUsersFound("no users found")


def gid_from_path(root: str, match: Callable[[GroupEntry], bool]) -> int:
    for entry in parse_group(_read(root, "/etc/group")):
        if match(entry):
            return entry.gid
    raise errdefs.NotFound("no groups found")


def _ensure_additional_gids(s: dict) -> None:
    user = _user(s)
    gids = user.get("additionalGids") or []
    if user.get("gid", 0) not in gids:
        user["additionalGids"] = [user.get("gid", 0), *gids]


MAX_ID = 2**31 - 1


_GO_INT = re.compile(r"[+-]?[0-9]+")


def _parse_id(text: str) -> Optional[int]:
    """strconv.Atoi within 0..MaxInt32, or None (then the text is a name)."""
    if not _GO_INT.fullmatch(text):
        return None
    v = int(text)
    return v if 0 <= v <= MAX_ID else None


def with_user_id(uid: int) -> SpecOpt:
    """Run as `uid`, with its primary group from the rootfs's /etc/passwd (0 when absent)."""
    def opt(ctx: SpecContext, s: dict) -> None:
        user = _user(s)
        user.pop("additionalGids", None)

        def set_user(root: str) -> None:
            try:
                entry = user_from_path(root, lambda u: u.uid == uid)
            except (FileNotFoundError, NoUsersFound):
                user["uid"], user["gid"] = uid, 0
                return
            user["uid"], user["gid"] = entry.uid, entry.gid
        try:
            ctx.with_rootfs(s, set_user)
        finally:
            _ensure_additional_gids(s)
    return opt


def with_username(username: str) -> SpecOpt:
    """Run as the rootfs's user `username` (its uid and primary gid)."""
    def opt(ctx: SpecContext, s: dict) -> None:
        user = _user(s)
        user.pop("additionalGids", None)

        def set_user(root: str) -> None:
            try:
                entry = user_from_path(root, lambda u: u.name == username)
            except FileNotFoundError:
                raise errdefs.NotFound("open /etc/passwd: no such file or directory") from None
            user["uid"], user["gid"] = entry.uid, entry.gid
        try:
            ctx.with_rootfs(s, set_user)
        finally:
            _ensure_additional_gids(s)
    return opt


def with_user(userstr: str) -> SpecOpt:
    """containerd's WithUser: "uid", "name", "uid:gid", "name:group", "uid:group", "name:gid"."""
    def opt(ctx: SpecContext, s: dict) -> None:
        user = _user(s)
        user.pop("additionalGids", None)
        parts = userstr.split(":")
        try:
            if len(parts) == 1:
                uid = _parse_id(parts[0])
                if uid is None:
                    with_username(userstr)(ctx, s)
                else:
                    with_user_id(uid)(ctx, s)
                return
            if len(parts) != 2:
                raise errdefs.InvalidArgument(f"invalid USER value {userstr}")
            uid, gid = _parse_id(parts[0]), _parse_id(parts[1])
            username = parts[0] if uid is None else ""
            groupname = parts[1] if gid is None else ""
            uid, gid = uid or 0, gid or 0
            if not username and not groupname:
                user["uid"], user["gid"] = uid, gid
                return

            def resolve(root: str) -> None:
                nonlocal uid, gid
                if username:
                    uid = user_from_path(root, lambda u: u.name == username).uid
                if groupname:
                    gid = gid_from_path(root, lambda g: g.name == groupname)
                user["uid"], user["gid"] = uid, gid
            ctx.with_rootfs(s, resolve)
        finally:
            _ensure_additional_gids(s)
    return opt


def with_uid_gid(uid: int, gid: int) -> SpecOpt:
    def opt(ctx: SpecContext, s: dict) -> None:
        user = _user(s)
        user.pop("additionalGids", None)
        user["uid"], user["gid"] = uid, gid
        _ensure_additional_gids(s)
    return opt


def with_additional_gids(userstr: str) -> SpecOpt:
    """The supplementary groups of `userstr` (a name, or a uid looked up in /etc/passwd) from the
    rootfs's /etc/group, plus the primary gid first (containerd's WithAdditionalGIDs)."""
    def opt(ctx: SpecContext, s: dict) -> None:
        user = _user(s)
        user.pop("additionalGids", None)

        def set_gids(root: str) -> None:
            try:
                uid = int(userstr) if _GO_INT.fullmatch(userstr) else None
                if uid is not None:
                    try:
                        username = user_from_path(root, lambda u: u.uid == uid).name
                    except (FileNotFoundError, NoUsersFound):
                        return
                else:
                    username = userstr
                try:
                    groups = parse_group(_read(root, "/etc/group"))
                except FileNotFoundError:
                    return
                gids = [g.gid for g in groups if g.name != username and username in g.members]
                if gids:
                    user["additionalGids"] = gids
            finally:
                _ensure_additional_gids(s)
        ctx.with_rootfs(s, set_gids)
    return opt


# -- the image config ------------------------------------------------------------------------

@dataclass
class ImageConfig:
    """The `config` part of an OCI/Docker image config, with the fields ctr uses."""

    env: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    working_dir: str = ""
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    stop_signal: str = ""

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> "ImageConfig":
        """From the whole image config JSON (the blob the manifest's config names)."""
        c = doc.get("config") or {}
        return cls(env=list(c.get("Env") or []), entrypoint=list(c.get("Entrypoint") or []),
                   cmd=list(c.get("Cmd") or []), working_dir=c.get("WorkingDir") or "",
                   user=c.get("User") or "", labels=dict(c.get("Labels") or {}),
                   stop_signal=c.get("StopSignal") or "")


def with_image_config(config: ImageConfig, args: Optional[Sequence[str]] = None) -> SpecOpt:
    """containerd's WithImageConfigArgs (Linux): the image's Env under the spec's, Entrypoint +
    (args or Cmd), WorkingDir (or "/"), and its User with that user's groups."""
    def opt(ctx: SpecContext, s: dict) -> None:
        p = _process(s)
        if s.get("linux") is None:
            raise errdefs.InvalidArgument("spec does not contain Linux or Windows section")
        defaults = config.env or DEFAULT_UNIX_ENV
        p["env"] = replace_or_append_env(defaults, p.get("env") or [])
        cmd = list(args) if args else config.cmd
        p["args"] = [*config.entrypoint, *cmd]
        p["cwd"] = config.working_dir or "/"
        if config.user:
            with_user(config.user)(ctx, s)
            with_additional_gids(str(_user(s).get("uid", 0)))(ctx, s)
        else:
            with_additional_gids("root")(ctx, s)
    return opt


# -- marshalling like Go ---------------------------------------------------------------------

# (key, kind, element): kind "r" always emitted, "o" omitted when zero, "p" omitted when None
# (a Go pointer); element names the struct of a nested object, or of a list's items ("[X]").
_SCHEMA: dict[str, list[tuple[str, str, Optional[str]]]] = {
    "Spec": [("ociVersion", "r", None), ("process", "p", "Process"), ("root", "p", "Root"),
             ("hostname", "o", None), ("domainname", "o", None), ("mounts", "o", "[Mount]"),
             ("hooks", "p", None), ("annotations", "o", None), ("linux", "p", "Linux"),
             ("solaris", "p", None), ("windows", "p", None), ("vm", "p", None)],
    "Process": [("terminal", "o", None), ("consoleSize", "p", "Box"), ("user", "r", "User"),
                ("args", "o", None), ("commandLine", "o", None), ("env", "o", None), ("cwd", "r", None),
                ("capabilities", "p", "Caps"), ("rlimits", "o", "[Rlimit]"), ("noNewPrivileges", "o", None),
                ("apparmorProfile", "o", None), ("oomScoreAdj", "p", None), ("selinuxLabel", "o", None)],
    "Box": [("height", "r", None), ("width", "r", None)],
    "User": [("uid", "r", None), ("gid", "r", None), ("umask", "p", None), ("additionalGids", "o", None),
             ("username", "o", None)],
    "Caps": [("bounding", "o", None), ("effective", "o", None), ("inheritable", "o", None),
             ("permitted", "o", None), ("ambient", "o", None)],
    "Rlimit": [("type", "r", None), ("hard", "r", None), ("soft", "r", None)],
    "Root": [("path", "r", None), ("readonly", "o", None)],
    "Mount": [("destination", "r", None), ("type", "o", None), ("source", "o", None), ("options", "o", None),
              ("uidMappings", "o", None), ("gidMappings", "o", None)],
    "Linux": [("uidMappings", "o", None), ("gidMappings", "o", None), ("sysctl", "o", None),
              ("resources", "p", "Resources"), ("cgroupsPath", "o", None), ("namespaces", "o", "[Namespace]"),
              ("devices", "o", "[Device]"), ("seccomp", "p", None), ("rootfsPropagation", "o", None),
              ("maskedPaths", "o", None), ("readonlyPaths", "o", None), ("mountLabel", "o", None),
              ("intelRdt", "p", None), ("personality", "p", None)],
    "Namespace": [("type", "r", None), ("path", "o", None)],
    "Device": [("path", "r", None), ("type", "r", None), ("major", "r", None), ("minor", "r", None),
               ("fileMode", "p", None), ("uid", "p", None), ("gid", "p", None)],
    "Resources": [("devices", "o", "[DeviceCgroup]"), ("memory", "p", "Memory"), ("cpu", "p", "CPU"),
                  ("pids", "p", None), ("blockIO", "p", None), ("hugepageLimits", "o", None),
                  ("network", "p", None), ("rdma", "o", None), ("unified", "o", None)],
    "DeviceCgroup": [("allow", "r", None), ("type", "o", None), ("major", "p", None), ("minor", "p", None),
                     ("access", "o", None)],
    "Memory": [("limit", "p", None), ("reservation", "p", None), ("swap", "p", None), ("kernel", "p", None),
               ("kernelTCP", "p", None), ("swappiness", "p", None), ("disableOOMKiller", "p", None),
               ("useHierarchy", "p", None), ("checkBeforeUpdate", "p", None)],
    "CPU": [("shares", "p", None), ("quota", "p", None), ("burst", "p", None), ("period", "p", None),
            ("realtimeRuntime", "p", None), ("realtimePeriod", "p", None), ("cpus", "o", None),
            ("mems", "o", None), ("idle", "p", None)],
}


def _zero(value: Any) -> bool:
    return value is None or value is False or value == "" or value == 0 or value == [] or value == {}


def _marshal(value: Any, struct: Optional[str]) -> Any:
    if struct is None or value is None:
        return value
    if struct.startswith("["):
        return [_marshal(v, struct[1:-1]) for v in value]
    fields = _SCHEMA[struct]
    out: dict[str, Any] = {}
    known = set()
    for key, kind, element in fields:
        known.add(key)
        if key not in value:
            if kind == "r":
                out[key] = _required_zero(struct, key)
            continue
        v = value[key]
        if kind == "o" and _zero(v):
            continue
        if kind == "p" and v is None:
            continue
        out[key] = _marshal(v, element)
    for key, v in value.items():  # fields we do not model are kept as they are
        if key not in known and v is not None:
            out[key] = v
    return out


def _required_zero(struct: str, key: str) -> Any:
    if struct == "User" and key in ("uid", "gid"):
        return 0
    if struct == "DeviceCgroup" and key == "allow":
        return False
    if struct in ("Rlimit", "Box", "Device") and key not in ("type", "path"):
        return 0
    return ""


def marshal(spec: Mapping[str, Any]) -> dict:
    """`spec` as Go's encoding/json would write the runtime-spec struct: omitted empty fields,
    fields in struct order."""
    return _marshal(dict(spec), "Spec")


def spec_bytes(spec: Mapping[str, Any]) -> bytes:
    """The JSON containerd stores for `spec` (compact, Go's escaping of <, > and &)."""
    text = json.dumps(marshal(spec), separators=(",", ":"), ensure_ascii=False)
    text = (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))
    return text.encode("utf-8")


def marshal_process(process: Mapping[str, Any]) -> dict:
    """A spec's `process` as Go would write it (for an exec's process spec)."""
    return _marshal(dict(process), "Process")


# -- mount flags ------------------------------------------------------------------------------

def parse_mount_flag(text: str) -> dict:
    """ctr's --mount value ("type=bind,src=/a,dst=/b,options=rbind:ro", CSV) as a spec mount."""
    import csv

    try:
        fields = next(csv.reader([text]))
    except (csv.Error, StopIteration) as err:
        raise errdefs.InvalidArgument(f"invalid mount specification: {err}") from None
    mount: dict[str, Any] = {"destination": ""}
    for f in fields:
        key, sep, val = f.partition("=")
        if not sep:
            raise errdefs.InvalidArgument("invalid mount specification: expected key=val")
        if key == "type":
            mount["type"] = val
        elif key in ("source", "src"):
            mount["source"] = val
        elif key in ("destination", "dst"):
            mount["destination"] = val
        elif key == "options":
            mount["options"] = val.split(":")
        else:
            raise errdefs.InvalidArgument(f"mount option {json.dumps(key)} not supported")
    return {k: mount[k] for k in ("destination", "type", "source", "options") if k in mount}
