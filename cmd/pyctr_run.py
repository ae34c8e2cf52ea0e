"""pyctr run: create a container from an image (or a root filesystem), start its task with the
terminal's IO, wait, and exit with the task's exit code — as `ctr run` does, same flags.

    pyctr run [flags] IMAGE|ROOTFS ID [COMMAND] [ARG...]

Flags end at IMAGE: everything after ID is the command. pyctr's default runtime is
io.containerd.pyrunc.v2 (ctr's is io.containerd.runc.v2: pass --runtime for it). Additions to
ctr's flags: --user/-u (user[:group], resolved in the image's /etc/passwd and /etc/group) and
--init (run the command under pyctr-init, which forwards signals and reaps zombies).
Not supported (refused with a message): --cni, --uidmap/--gidmap, --gpus, --seccomp without
--seccomp-profile, --apparmor-default-profile, --checkpoint.

Also home of the shared container flags (`add_container_flags`) and of `spec_builder`, which
`pyctr containers create` uses too. Owns argument handling only; the work is in the client
library (containers.new_container, tasks, cio, oci).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
from typing import Any, Optional

from pycontainerd.api.client import Client, errdefs
from pycontainerd.api.client import cio, oci
from pycontainerd.api.client.containers import (RUNC_V2, Container, new_container, remove_container,
                                                 runc_options)
from pycontainerd.api.client.tasks import Process, new_task

from .pyctr_output import label_args

DEFAULT_RUNTIME = "io.containerd.pyrunc.v2"

FORWARDED_SIGNALS = [s for s in (
    "SIGHUP", "SIGINT", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGTERM", "SIGCONT",
    "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGWINCH", "SIGPWR", "SIGVTALRM", "SIGPROF", "SIGIO",
    "SIGXCPU", "SIGXFSZ") if hasattr(signal, s)]
"""What a foreground pyctr passes on to the task (ctr forwards every signal but SIGURG; we also
keep SIGCHLD, SIGPIPE and the fault signals to ourselves)."""


from .pyctr import UsageError  # noqa: E402  (a bad command line: "pyctr: <message>", exit 1)


# -- flags -----------------------------------------------------------------------------------

def add_container_flags(p: argparse.ArgumentParser, run: bool) -> None:
    """ctr's ContainerFlags and snapshotter flags (+ its run-only flags when `run`)."""
    add = p.add_argument
    add("--snapshotter", default=os.environ.get("CONTAINERD_SNAPSHOTTER", ""),
        help="snapshotter name. Empty value stands for the default value. [$CONTAINERD_SNAPSHOTTER]")
    add("--snapshotter-label", action="append", default=[], help="labels added to the new snapshot for this container.")
    add("-c", "--config", default="", help="path to the runtime-specific spec config file")
    add("--cwd", default="", help="specify the working directory of the process")
    add("--env", action="append", default=[], help="specify additional container environment variables (e.g. FOO=bar)")
    add("--env-file", default="", help="specify additional container environment variables in a file(e.g. FOO=bar, one per line)")
    add("--label", action="append", default=[], help="specify additional labels (e.g. foo=bar)")
    add("--annotation", action="append", default=[], help="specify additional OCI annotations (e.g. foo=bar)")
    add("--mount", action="append", default=[],
        help="specify additional container mount (e.g. type=bind,src=/tmp,dst=/host,options=rbind:ro)")
    add("--net-host", action="store_true", help="enable host networking for the container")
    add("--privileged", action="store_true", help="run privileged container")
    add("--read-only", action="store_true", help="set the containers filesystem as readonly")
    add("--runtime", default=DEFAULT_RUNTIME, help="runtime name (default: %(default)s)")
    add("--runtime-config-path", default="", help="optional runtime config path")
    add("-t", "--tty", action="store_true", help="allocate a TTY for the container")
    add("--with-ns", action="append", default=[],
        help="specify existing Linux namespaces to join at container runtime (format '<nstype>:<path>')")
    add("--pid-file", default="", help="file path to write the task's pid")
    add("--gpus", action="append", default=[], help="add gpus to the container (not supported)")
    add("--allow-new-privs", action="store_true", help="turn off OCI spec's NoNewPrivileges feature flag")
    add("--memory-limit", type=int, default=0, help="memory limit (in bytes) for the container (default: 0)")
    add("--device", action="append", default=[],
        help="file path to a device to add to the container; or a path to a directory tree of devices")
    add("--cap-add", action="append", default=[], help="add Linux capabilities (Set capabilities with 'CAP_' prefix)")
    add("--cap-drop", action="append", default=[], help="drop Linux capabilities (Set capabilities with 'CAP_' prefix)")
    add("--seccomp", action="store_true", help="enable a seccomp profile (needs --seccomp-profile here)")
    add("--seccomp-profile", default="", help="file path to custom seccomp profile. seccomp must be set to true")
    add("--apparmor-default-profile", default="", help="not supported")
    add("--apparmor-profile", default="", help="enable AppArmor with an existing custom profile")
    add("--rdt-class", default="", help="name of the RDT class to associate the container with")
    add("--rootfs", action="store_true", help="use custom rootfs that is not managed by containerd snapshotter")
    add("--no-pivot", action="store_true", help="disable use of pivot-root (linux only)")
    add("--cpu-quota", type=int, default=-1, help="Limit CPU CFS quota (default: -1)")
    add("--cpu-period", type=int, default=0, help="Limit CPU CFS period (default: 0)")
    add("--rootfs-propagation", default="", help="set the propagation of the container rootfs")
    add("-u", "--user", default="", help="run as user[:group] (name or id; pyctr only)")
    add("--init", action="store_true",
        help="run the command under pyctr-init, which forwards signals and reaps zombies (pyctr only)")
    if run:
        add("--rm", action="store_true", help="remove the container after running, cannot be used with --detach")
        add("--null-io", action="store_true", help="send all IO to /dev/null")
        add("--log-uri", default="", help="log uri")
        add("-d", "--detach", action="store_true",
            help="detach from the task after it has started execution, cannot be used with --rm")
        add("--fifo-dir", default="", help="directory used for storing IO FIFOs")
        add("--cgroup", default=None, help='cgroup path (To disable use of cgroup, set to "" explicitly)')
        add("--platform", default="", help="run image for specific platform")
        add("--cni", action="store_true", help="enable cni networking for the container (not supported)")
        add("--runc-binary", default="", help="specify runc-compatible binary")
        add("--runc-root", default="", help="specify runc-compatible root")
        add("--runc-systemd-cgroup", action="store_true", help="start runc with systemd cgroup manager")
        add("--uidmap", default="", help="not supported")
        add("--gidmap", default="", help="not supported")
        add("--cpus", type=float, default=0.0, help="set the CFS cpu quota (default: 0)")
        add("--cpu-shares", type=int, default=1024, help="set the cpu shares (default: 1024)")
    add("ref", metavar="IMAGE|ROOTFS", nargs="?", default="")
    add("id", metavar="ID", nargs="?", default="")
    add("args", metavar="COMMAND", nargs=argparse.REMAINDER)


def _flag(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    return getattr(args, name, default)


def _unsupported(args: argparse.Namespace) -> None:
    if _flag(args, "cni"):
        raise UsageError("--cni is not supported by pyctr")
    if _flag(args, "uidmap") or _flag(args, "gidmap"):
        raise UsageError("--uidmap/--gidmap are not supported by pyctr")
    if args.gpus:
        raise UsageError("--gpus is not supported by pyctr")
    if args.apparmor_default_profile:
        raise UsageError("--apparmor-default-profile is not supported by pyctr; use --apparmor-profile")
    if not args.seccomp and args.seccomp_profile:
        raise UsageError("seccomp must be set to true, if using a custom seccomp-profile")
    if args.seccomp and not args.seccomp_profile:
        raise UsageError("pyctr has no built-in default seccomp profile: pass --seccomp-profile FILE")


def spec_builder(args: argparse.Namespace, run: bool):
    """The oci options ctr's NewContainer applies, in its order, for these flags: a callable
    `(image_config or None) -> [SpecOpt]` for containers.new_container."""
    def build(image_config: Optional[oci.ImageConfig]) -> list:
        opts: list = [oci.with_default_unix_devices]
        if args.env_file:
            opts.append(oci.with_env(oci.read_env_file(args.env_file)))
        opts.append(oci.with_env(args.env))
        opts.append(oci.with_mounts([oci.parse_mount_flag(m) for m in args.mount]))
        if image_config is None:
            opts.append(oci.with_rootfs_path(os.path.abspath(args.ref)))
        else:
            opts.append(oci.with_image_config(image_config))
        if args.read_only:
            opts.append(oci.with_rootfs_readonly)
        if args.args:
            opts.append(oci.with_process_args(*args.args))
        if args.user:
            opts.append(_with_user_and_groups(args.user))
        if args.cwd:
            opts.append(oci.with_process_cwd(args.cwd))
        if args.tty:
            opts.append(oci.with_tty)
        if args.privileged:
            opts += [oci.with_privileged, oci.with_all_devices_allowed, oci.with_host_devices]
        if args.net_host:
            opts += [oci.with_host_namespace("network"), oci.with_host_hosts_file, oci.with_host_resolvconf,
                     oci.with_env([f"HOSTNAME={socket.gethostname()}"])]
        if args.annotation:
            annotations = {}
            for a in args.annotation:
                k, sep, v = a.partition("=")
                if not sep:
                    raise UsageError(f"invalid key=value format annotation: {a}")
                annotations[k] = v
            opts.append(oci.with_annotations(annotations))
        for flag, caps in (("add", args.cap_add), ("drop", args.cap_drop)):
            if caps:
                if any(not c.startswith("CAP_") for c in caps):
                    raise UsageError("capabilities must be specified with 'CAP_' prefix")
                opts.append(oci.with_added_capabilities(caps) if flag == "add" else oci.with_dropped_capabilities(caps))
        if args.seccomp:
            with open(args.seccomp_profile) as f:
                profile = json.load(f)
            opts.append(_with_seccomp(profile))
        if args.apparmor_profile:
            opts.append(oci.with_apparmor_profile(args.apparmor_profile))
        cpus = _flag(args, "cpus", 0.0) or 0.0
        if cpus > 0.0:
            opts.append(oci.with_cpus(cpus))
        shares = _flag(args, "cpu_shares", 0) or 0
        if shares > 0:
            opts.append(oci.with_cpu_shares(shares))
        if args.cpu_quota != -1 or args.cpu_period != 0:
            if cpus > 0.0:
                raise UsageError("cpus and quota/period should be used separately")
            opts.append(oci.with_cpu_cfs(args.cpu_quota, args.cpu_period))
        for ns in args.with_ns:
            parts = ns.split(":")
            if len(parts) != 2:
                raise UsageError("joining a Linux namespace using --with-ns requires the format 'nstype:path'")
            if parts[0] not in ("pid", "network", "uts", "mount", "user", "ipc", "cgroup"):
                raise UsageError("the Linux namespace type specified in --with-ns is not valid: " + parts[0])
            opts.append(oci.with_linux_namespace(parts[0], parts[1]))
        if args.allow_new_privs:
            opts.append(oci.with_new_privileges)
        if _flag(args, "cgroup") is not None:
            opts.append(oci.with_cgroup(args.cgroup))
        if args.memory_limit:
            opts.append(oci.with_memory_limit(args.memory_limit))
        for dev in args.device:
            opts.append(oci.with_devices(dev, "", "rwm"))
        if args.rootfs_propagation:
            opts.append(_with_rootfs_propagation(args.rootfs_propagation))
        if args.rdt_class:
            opts.append(_with_rdt(args.rdt_class))
        if args.init:
            from pycontainerd.api.client import init as pyctr_init

            try:
                host_path = pyctr_init.binary_path()
            except pyctr_init.InitUnavailable as err:
                raise errdefs.FailedPrecondition(str(err)) from None
            opts.append(_with_init(host_path))
        opts.append(oci.with_annotations(label_args(args.label)))
        return opts
    return build


def _with_user_and_groups(user: str):
    def opt(ctx: oci.SpecContext, s: dict) -> None:
        oci.with_user(user)(ctx, s)
        oci.with_additional_gids(str(s["process"]["user"].get("uid", 0)))(ctx, s)
    return opt


def _with_seccomp(profile: dict):
    def opt(ctx: oci.SpecContext, s: dict) -> None:
        s.setdefault("linux", {})["seccomp"] = profile
    return opt


def _with_rootfs_propagation(value: str):
    def opt(ctx: oci.SpecContext, s: dict) -> None:
        s.setdefault("linux", {})["rootfsPropagation"] = value
    return opt


def _with_rdt(clos_id: str):
    def opt(ctx: oci.SpecContext, s: dict) -> None:
        s.setdefault("linux", {})["intelRdt"] = {"closID": clos_id}
    return opt


def _with_init(host_path: str):
    from pycontainerd.api.client import init as pyctr_init

    def opt(ctx: oci.SpecContext, s: dict) -> None:
        p = s.setdefault("process", {})
        p["args"] = [pyctr_init.CONTAINER_PATH, "--", *(p.get("args") or [])]
        s["mounts"] = [*(s.get("mounts") or []), pyctr_init.mount_spec(host_path)]
    return opt


def runtime_options(args: argparse.Namespace):
    """ctr's getRuntimeOptions: runc options for io.containerd.runc.v2, else none."""
    binary, systemd = _flag(args, "runc_binary", ""), _flag(args, "runc_systemd_cgroup", False)
    if (binary or systemd) and args.runtime != RUNC_V2:
        raise UsageError('specifying runc-binary and runc-systemd-cgroup is only supported for '
                         '"io.containerd.runc.v2" runtime')
    if args.runtime == RUNC_V2:
        if systemd and not _flag(args, "cgroup"):
            raise UsageError('option --runc-systemd-cgroup requires --cgroup to be set, e.g. '
                             '"machine.slice:foo:deadbeef"')
        return runc_options(binary_name=binary, root=_flag(args, "runc_root", ""), systemd_cgroup=systemd)
    if args.runtime_config_path:
        raise UsageError("--runtime-config-path is not supported by pyctr")
    return None


async def container_from_args(client: Client, args: argparse.Namespace, run: bool) -> Container:
    """ctr's NewContainer for these flags."""
    _unsupported(args)
    if args.config:
        cid = args.ref
        if args.id:
            raise UsageError("with spec config file, only container id should be provided")
        if not cid:
            raise UsageError("container id must be provided")
        with open(args.config, "rb") as f:
            spec = json.load(f)
        labels = label_args(args.label)
        spec = oci.apply_opts(oci.SpecContext(client.namespace, cid), spec, oci.with_annotations(labels))
        from pycontainerd.api.client.containers import RuntimeInfo, spec_any

        return await client.containers.create(Container(
            id=cid, labels=labels, runtime=RuntimeInfo(args.runtime, runtime_options(args)),
            spec=spec_any(oci.marshal(spec))))
    if not args.ref:
        raise UsageError("image ref must be provided")
    if not args.id:
        raise UsageError("container id must be provided")
    common = dict(spec_opts=spec_builder(args, run), labels=label_args(args.label),
                  runtime=args.runtime, runtime_options=runtime_options(args))
    if args.rootfs:
        return await new_container(client, args.id, rootfs=os.path.abspath(args.ref), **common)
    return await new_container(client, args.id, image=args.ref, snapshotter=args.snapshotter,
                               snapshot_labels=label_args(args.snapshotter_label),
                               platform=_flag(args, "platform", ""), **common)


# -- running a task with the terminal --------------------------------------------------------

def task_io(process_id: str, *, tty: bool, null_io: bool, log_uri: str, fifo_dir: str) -> cio.IO:
    """ctr's IO choice: a console (tty), /dev/null, a log URI, or the terminal's stdio."""
    if tty:
        if null_io:
            raise UsageError("tty and null-io cannot be used together")
        return cio.fifo_io(process_id, stdin=0, stdout=1, terminal=True, fifo_dir=fifo_dir)
    if null_io:
        return cio.null_io()
    if log_uri:
        return cio.log_uri(log_uri)
    return cio.fifo_io(process_id, **cio.stdio(), fifo_dir=fifo_dir)


def write_pid_file(path: str, pid: int) -> None:
    """ctr's WritePidFile: written aside as .<name>, then renamed."""
    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path))
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_SYNC, 0o666)
    try:
        os.write(fd, str(pid).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


class Foreground:
    """While a process runs in the foreground: raw console + resize (tty), or signal forwarding.

    Enter it before starting the process: signals that arrive before `started()` are held and
    forwarded once the process runs (ctr would die of them in that window)."""

    def __init__(self, process: Process, console: Optional[cio.Console], started: bool = True):
        self.process, self.console = process, console
        self._installed: list[int] = []
        self._forwarding = True
        self._started = started
        self._held: list[int] = []

    async def started(self) -> None:
        self._started = True
        if self.console is not None:
            await self._resize()
        held, self._held = self._held, []
        for sig in held:
            await self._kill(sig)

    async def __aenter__(self) -> "Foreground":
        loop = asyncio.get_running_loop()
        if self.console is not None:
            if self._started:
                await self._resize()
            loop.add_signal_handler(signal.SIGWINCH, lambda: asyncio.ensure_future(self._resize()))
            self._installed.append(signal.SIGWINCH)
        else:
            for name in FORWARDED_SIGNALS:
                sig = getattr(signal, name)
                try:
                    loop.add_signal_handler(sig, self._forward, sig)
                    self._installed.append(sig)
                except (ValueError, RuntimeError, OSError):
                    continue
        return self

    async def __aexit__(self, *exc) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._installed:
            loop.remove_signal_handler(sig)

    async def _resize(self) -> None:
        if not self._started:
            return
        try:
            width, height = self.console.size()
            await self.process.resize(width, height)
        except (OSError, errdefs.ContainerdError):
            pass

    def _forward(self, sig: int) -> None:
        if not self._started:
            self._held.append(sig)
        elif self._forwarding:
            asyncio.ensure_future(self._kill(sig))

    async def _kill(self, sig: int) -> None:
        try:
            await self.process.kill(sig)
        except errdefs.NotFound:
            self._forwarding = False
        except errdefs.ContainerdError as err:
            sys.stderr.write(f"pyctr: forward signal {signal.Signals(sig).name}: {err}\n")


async def run_process(process: Process, waiter: "asyncio.Future", console: Optional[cio.Console],
                      detach: bool, pid_file: str = "") -> Optional[int]:
    """Start `process` (already waited on, unless detach) and stay with it until it exits; its
    exit code, or None when detached."""
    if pid_file:
        write_pid_file(pid_file, process.pid)
    if detach:
        await process.start()
        await process.detach()
        return None
    async with Foreground(process, console, started=False) as fg:
        await process.start()
        await fg.started()
        status = await waiter
    return status.code


async def cmd_run(client: Client, args: argparse.Namespace) -> None:
    if args.rm and args.detach:
        raise UsageError("flags --detach and --rm cannot be specified together")
    container = await container_from_args(client, args, run=True)
    cid = container.id
    console: Optional[cio.Console] = None
    code: Optional[int] = 0
    try:
        if args.tty:
            console = cio.Console.current()
            console.set_raw()
        io = task_io(cid, tty=args.tty, null_io=args.null_io, log_uri=args.log_uri, fifo_dir=args.fifo_dir)
        rootfs = []
        if container.snapshot_key:
            rootfs = await client.snapshots.mounts(container.snapshot_key, snapshotter=container.snapshotter)
        options = None
        if args.no_pivot and args.runtime == RUNC_V2:
            options = runc_options_no_pivot()
        process = await new_task(client.tasks, cid, io, rootfs=rootfs, options=options)
        waiter = None if args.detach else process.wait()
        try:
            code = await run_process(process, waiter, console, args.detach, args.pid_file)
        finally:
            await discard(waiter)
            if not args.detach:
                await _delete_quietly(process)
    finally:
        if console is not None:
            console.reset()
        if args.rm and not args.detach:
            try:
                await remove_container(client, cid)
            except errdefs.ContainerdError as err:
                sys.stderr.write(f"pyctr: remove container {cid}: {err}\n")
    if code:
        raise SystemExit(code)


def runc_options_no_pivot():
    from betterproto.lib.google.protobuf import Any as AnyMessage
    from pycontainerd.api.gen.containerd.runc import v1 as runc_api

    return AnyMessage(type_url="containerd.runc.v1.Options", value=bytes(runc_api.Options(no_pivot_root=True)))


async def discard(waiter: Optional["asyncio.Future"]) -> None:
    """Cancel a pending wait and swallow whatever it ended with."""
    if waiter is None:
        return
    if not waiter.done():
        waiter.cancel()
    try:
        await waiter
    except BaseException:  # cancelled, or the daemon's error: nobody waits for it any more
        pass


async def _delete_quietly(process: Process) -> None:
    try:
        await process.delete()
    except errdefs.NotFound:
        if process.io is not None:
            process.io.close()
    except errdefs.ContainerdError as err:
        if process.io is not None:
            process.io.close()
        sys.stderr.write(f"pyctr: delete task {process.container_id}: {err}\n")


def register(sub) -> None:
    from .pyctr import _command

    p = _command(sub, "run", cmd_run, "run a container")
    p.usage = "%(prog)s [flags] IMAGE|ROOTFS ID [COMMAND] [ARG...]"
    add_container_flags(p, run=True)
