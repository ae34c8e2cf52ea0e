"""pyctr tasks|task|t: manage tasks, as ctr's command of that name: attach, delete|del|remove|rm
(-f, --exec-id), exec (--exec-id, -t, -d, --cwd, --user, --env, --fifo-dir, --log-uri),
list|ls (-q, --format json), kill (-s/--signal, -a/--all, --exec-id), pause, ps, resume, start
(-d, --null-io, --log-uri, --fifo-dir, --pid-file), metrics|metric (--format table|json), and
pyctr's own `wait` (blocks, prints the exit status, exits with it).

Foreground commands (start, attach, exec) forward signals to the process, or with a TTY put the
terminal in raw mode and follow its size, and exit with the process's exit code, as ctr does.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import timezone
from typing import Optional

from pycontainerd.api.client import Client, cio, errdefs, oci
from pycontainerd.api.client.containers import Container
from pycontainerd.api.client.tasks import (CgroupsV1Metrics, CgroupsV2Metrics, Process, decode_metrics,
                                           exec_process, new_task, parse_signal)

import betterproto

from .pyctr_output import TabWriter, print_json
from .pyctr_run import discard


def _err(message: str) -> None:
    sys.stderr.write(f"pyctr: {message}\n")
    sys.stderr.flush()


def _require(value: str, what: str = "container id must be provided") -> str:
    if not value:
        raise errdefs.InvalidArgument(what)
    return value


def _go_time(ts) -> str:
    if ts is None:
        return "0001-01-01 00:00:00 +0000 UTC"
    ts = ts.astimezone(timezone.utc)
    frac = f"{ts.microsecond:06d}".rstrip("0")
    return ts.strftime("%Y-%m-%d %H:%M:%S") + (f".{frac}" if frac else "") + " +0000 UTC"


async def _load(client: Client, cid: str) -> tuple[Container, dict]:
    c = await client.containers.get(cid)
    return c, (c.spec_dict() or {})


async def _task_exists(client: Client, cid: str) -> None:
    """ctr's container.Task(): NotFound reads "no running task found"."""
    try:
        await client.tasks.get(cid)
    except errdefs.NotFound as err:
        raise errdefs.NotFound(f"no running task found: {err}") from None


def _exit(code: Optional[int]) -> None:
    if code:
        raise SystemExit(code)


# -- start / attach / exec ---------------------------------------------------------------------

async def cmd_start(client: Client, args: argparse.Namespace) -> None:
    from .pyctr_run import run_process, task_io

    cid = _require(args.id)
    container, spec = await _load(client, cid)
    tty = bool((spec.get("process") or {}).get("terminal"))
    console = None
    code = None
    try:
        if tty:
            console = cio.Console.current()
            console.set_raw()
        io = task_io(cid, tty=tty, null_io=args.null_io, log_uri=args.log_uri, fifo_dir=args.fifo_dir)
        rootfs = []
        if container.snapshot_key:
            rootfs = await client.snapshots.mounts(container.snapshot_key, snapshotter=container.snapshotter)
        options = None
        if args.no_pivot and container.runtime.name == "io.containerd.runc.v2":
            from .pyctr_run import runc_options_no_pivot
            options = runc_options_no_pivot()
        process = await new_task(client.tasks, cid, io, rootfs=rootfs, options=options)
        waiter = None if args.detach else process.wait()
        try:
            code = await run_process(process, waiter, console, args.detach, args.pid_file)
        finally:
            await discard(waiter)
            if not args.detach:
                from .pyctr_run import _delete_quietly
                await _delete_quietly(process)
    finally:
        if console is not None:
            console.reset()
    _exit(code)


async def cmd_attach(client: Client, args: argparse.Namespace) -> None:
    from .pyctr_run import Foreground

    cid = _require(args.id)
    _, spec = await _load(client, cid)
    tty = bool((spec.get("process") or {}).get("terminal"))
    try:
        st = await client.tasks.get(cid)
    except errdefs.NotFound as err:
        raise errdefs.NotFound(f"no running task found: {err}") from None
    console = None
    try:
        if tty:
            console = cio.Console.current()
            console.set_raw()
        io = cio.attach(st.io_config, **cio.stdio())
        process = Process(client.tasks, cid, io=io, pid=st.pid)
        waiter = process.wait()
        try:
            async with Foreground(process, console):
                status = await waiter
        finally:
            await discard(waiter)
            # ctr's attach deletes the task once it has exited, and the FIFOs with it
            try:
                await process.delete()
                cio.remove_fifos(st.io_config)
            except errdefs.ContainerdError:
                io.close()
    finally:
        if console is not None:
            console.reset()
    _exit(status.code)


async def cmd_exec(client: Client, args: argparse.Namespace) -> None:
    from .pyctr_run import Foreground

    cid = _require(args.id)
    if not args.exec_id:
        raise errdefs.InvalidArgument('Required flag "exec-id" not set')
    container, spec = await _load(client, cid)
    if args.user:
        ctx = oci.SpecContext(client.namespace, cid, container.snapshotter, container.snapshot_key)
        if container.snapshot_key:
            ctx.mounts = await client.snapshots.mounts(container.snapshot_key, snapshotter=container.snapshotter)
        await asyncio.to_thread(oci.with_user(args.user), ctx, spec)
    pspec = dict(spec.get("process") or {})
    pspec["terminal"] = args.tty
    pspec["args"] = list(args.args)
    if args.cwd:
        pspec["cwd"] = args.cwd
    if args.env:
        pspec["env"] = oci.replace_or_append_env(pspec.get("env") or [], args.env)
    await _task_exists(client, cid)
    if args.tty and args.log_uri:
        raise errdefs.InvalidArgument("can't use log-uri with tty")
    if args.log_uri and args.fifo_dir:
        raise errdefs.InvalidArgument("can't use log-uri with fifo-dir")
    console = None
    code = None
    try:
        if args.tty:
            console = cio.Console.current()
            console.set_raw()
            io = cio.fifo_io(args.exec_id, stdin=0, stdout=1, terminal=True, fifo_dir=args.fifo_dir)
        elif args.log_uri:
            io = cio.log_uri(args.log_uri)
        else:
            io = cio.fifo_io(args.exec_id, **cio.stdio(), fifo_dir=args.fifo_dir)
        process = await exec_process(client.tasks, cid, args.exec_id, oci.marshal_process(pspec), io)
        waiter = None if args.detach else process.wait()
        try:
            if waiter is None:
                await process.start()
                await process.detach()
                return
            async with Foreground(process, console, started=False) as fg:
                await process.start()
                await fg.started()
                code = (await waiter).code
        finally:
            await discard(waiter)
            if not args.detach:
                try:
                    await process.delete()
                except errdefs.ContainerdError as err:
                    io.close()
                    _err(f"delete exec process {args.exec_id}: {err}")
    finally:
        if console is not None:
            console.reset()
    _exit(code)


# -- simple commands ---------------------------------------------------------------------------

async def cmd_list(client: Client, args: argparse.Namespace) -> None:
    tasks = await client.tasks.list()
    if args.format == "json":
        print_json([t.to_dict() for t in tasks])
        return
    if args.quiet:
        for t in tasks:
            print(t.id)
        return
    w = TabWriter(minwidth=4, tabwidth=8, padding=4)
    w.write("TASK\tPID\tSTATUS\t\n")
    for t in tasks:
        w.write(f"{t.id}\t{t.pid}\t{t.status.upper()}\n")
    w.flush()


async def cmd_kill(client: Client, args: argparse.Namespace) -> None:
    cid = _require(args.id)
    if args.all and args.exec_id:
        raise errdefs.InvalidArgument("specify an exec-id or all; not both")
    container = await client.containers.get(cid)
    if args.signal:
        sig = parse_signal(args.signal)
    else:
        sig = parse_signal(container.labels.get(oci.STOP_SIGNAL_LABEL) or "SIGTERM")
    await _task_exists(client, cid)
    await client.tasks.kill(cid, sig, exec_id=args.exec_id, all=args.all)


async def cmd_pause(client: Client, args: argparse.Namespace) -> None:
    cid = _require(args.id)
    await client.containers.get(cid)
    await _task_exists(client, cid)
    await client.tasks.pause(cid)


async def cmd_resume(client: Client, args: argparse.Namespace) -> None:
    cid = _require(args.id)
    await client.containers.get(cid)
    await _task_exists(client, cid)
    await client.tasks.resume(cid)


def _info_text(info) -> str:
    """ctr prints the runtime's process info with %+v; for runc's ProcessDetails that is
    &ProcessDetails{ExecID:...,}."""
    if info is None:
        return "-"
    name = info.type_url.rsplit("/", 1)[-1]
    if name.endswith("ProcessDetails"):
        from pycontainerd.api.gen.containerd.runc import v1 as runc_api

        details = runc_api.ProcessDetails().parse(info.value)
        return f"&ProcessDetails{{ExecID:{details.exec_id},XXX_unrecognized:[],}}"
    return f"&{{TypeUrl:{info.type_url}}}"


async def cmd_ps(client: Client, args: argparse.Namespace) -> None:
    cid = _require(args.id)
    await client.containers.get(cid)
    await _task_exists(client, cid)
    pids = await client.tasks.pids(cid)
    if args.format == "json":
        print_json([{"pid": p.pid, "info": _info_text(p.info) if p.info else None} for p in pids])
        return
    w = TabWriter(minwidth=1, tabwidth=8, padding=4)
    w.write("PID\tINFO\n")
    for p in pids:
        w.write(f"{p.pid}\t{_info_text(p.info)}\n")
    w.flush()


async def cmd_delete(client: Client, args: argparse.Namespace) -> None:
    if args.exec_id:
        cid = _require(args.ids[0] if args.ids else "")
        await client.containers.get(cid)
        await _task_exists(client, cid)
        st = await client.tasks.get(cid, args.exec_id)
        process = Process(client.tasks, cid, args.exec_id, pid=st.pid)
        status = await process.delete(force=args.force)
        cio.remove_fifos(st.io_config)
        _exit(status.code)
        return
    first = None
    for cid in args.ids:
        try:
            await client.containers.get(cid)
            try:
                st = await client.tasks.get(cid)
            except errdefs.NotFound as err:
                raise errdefs.NotFound(f"no running task found: {err}") from None
        except errdefs.ContainerdError as err:
            first = first or err
            _err(f"failed to load task from {cid}: {err}")
            continue
        try:
            status = await Process(client.tasks, cid, pid=st.pid).delete(force=args.force)
        except errdefs.ContainerdError as err:
            first = first or err
            _err(f"unable to delete {cid}: {err}")
            continue
        cio.remove_fifos(st.io_config)
        if status.code != 0:
            _err(f"task {cid} exit with non-zero exit code {status.code}")
    if first is not None:
        from .pyctr import CommandFailed

        raise CommandFailed()


async def cmd_wait(client: Client, args: argparse.Namespace) -> None:
    cid = _require(args.id)
    await client.containers.get(cid)
    await _task_exists(client, cid)
    status = await client.tasks.wait(cid, args.exec_id)
    print(status.code, flush=True)
    _exit(status.code)


def _metrics_table(w: TabWriter, data: betterproto.Message) -> None:
    w.write("METRIC\tVALUE\t\n")
    if isinstance(data, CgroupsV1Metrics):
        if betterproto.serialized_on_wire(data.memory):
            w.write(f"memory.usage_in_bytes\t{data.memory.usage.usage}\t\n")
            w.write(f"memory.limit_in_bytes\t{data.memory.usage.limit}\t\n")
            w.write(f"memory.stat.cache\t{data.memory.total_cache}\t\n")
        if betterproto.serialized_on_wire(data.cpu):
            w.write(f"cpuacct.usage\t{data.cpu.usage.total}\t\n")
            w.write(f"cpuacct.usage_percpu\t[{' '.join(str(v) for v in data.cpu.usage.per_cpu)}]\t\n")
        if betterproto.serialized_on_wire(data.pids):
            w.write(f"pids.current\t{data.pids.current}\t\n")
            w.write(f"pids.limit\t{data.pids.limit}\t\n")
    elif isinstance(data, CgroupsV2Metrics):
        if betterproto.serialized_on_wire(data.pids):
            w.write(f"pids.current\t{data.pids.current}\t\n")
            w.write(f"pids.limit\t{data.pids.limit}\t\n")
        if betterproto.serialized_on_wire(data.cpu):
            for name in ("usage_usec", "user_usec", "system_usec", "nr_periods", "nr_throttled", "throttled_usec"):
                w.write(f"cpu.{name}\t{getattr(data.cpu, name)}\t\n")
        if betterproto.serialized_on_wire(data.memory):
            for name in ("usage", "usage_limit", "swap_usage", "swap_limit"):
                w.write(f"memory.{name}\t{getattr(data.memory, name)}\t\n")


async def cmd_metrics(client: Client, args: argparse.Namespace) -> None:
    cid = _require(args.id)
    await client.containers.get(cid)
    await _task_exists(client, cid)
    metrics = await client.tasks.metrics([f"id=={cid}"])
    if not metrics:
        raise errdefs.NotFound(f"no metrics received for {cid}")
    metric = metrics[0]
    data = decode_metrics(metric.data)
    if data is None:
        raise errdefs.InvalidArgument("cannot convert metric data to cgroups.Metrics or windows.Statistics")
    if args.format == "json":
        sys.stdout.write(json.dumps(data.to_dict(casing=betterproto.Casing.SNAKE), indent=2) + "\n")
        return
    w = TabWriter(minwidth=1, tabwidth=8, padding=4)
    w.write("ID\tTIMESTAMP\t\n")
    w.write(f"{metric.id}\t{_go_time(metric.timestamp)}\t\n\n")
    _metrics_table(w, data)
    w.flush()


def register(sub) -> None:
    from .pyctr import _add_format, _command, _group

    grp = _group(sub, "tasks", ["t", "task"], "manage tasks")

    p = _command(grp, "attach", cmd_attach, "attach to the IO of a running container")
    p.add_argument("id", metavar="CONTAINER", nargs="?", default="")

    p = _command(grp, "delete", cmd_delete, "delete one or more tasks", ("del", "remove", "rm"))
    p.add_argument("-f", "--force", action="store_true", help="force delete task process")
    p.add_argument("--exec-id", default="", help="process ID to kill")
    p.add_argument("ids", metavar="CONTAINER", nargs="*")

    p = _command(grp, "exec", cmd_exec, "execute additional processes in an existing container")
    p.usage = "%(prog)s [flags] CONTAINER CMD [ARG...]"
    p.add_argument("--cwd", default="", help="working directory of the new process")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a TTY for the container")
    p.add_argument("-d", "--detach", action="store_true",
                   help="detach from the task after it has started execution")
    p.add_argument("--exec-id", default="", help="exec specific id for the process (required)")
    p.add_argument("--fifo-dir", default="", help="directory used for storing IO FIFOs")
    p.add_argument("--log-uri", default="", help="log uri for custom shim logging")
    p.add_argument("--user", default="", help="user id or name")
    p.add_argument("--env", action="append", default=[], help="additional environment variables (pyctr only)")
    p.add_argument("id", metavar="CONTAINER", nargs="?", default="")
    p.add_argument("args", metavar="CMD", nargs=argparse.REMAINDER)

    p = _command(grp, "list", cmd_list, "list tasks", ("ls",))
    _add_format(p, "print only the task id")

    p = _command(grp, "kill", cmd_kill, "signal a container (default: SIGTERM)")
    p.add_argument("-s", "--signal", default="", help="signal to send to the container")
    p.add_argument("--exec-id", default="", help="process ID to kill")
    p.add_argument("-a", "--all", action="store_true", help="send signal to all processes inside the container")
    p.add_argument("id", metavar="CONTAINER", nargs="?", default="")

    p = _command(grp, "pause", cmd_pause, "pause an existing container")
    p.add_argument("id", metavar="CONTAINER", nargs="?", default="")

    p = _command(grp, "ps", cmd_ps, "list processes for container")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")
    p.add_argument("id", metavar="CONTAINER", nargs="?", default="")

    p = _command(grp, "resume", cmd_resume, "resume a paused container")
    p.add_argument("id", metavar="CONTAINER", nargs="?", default="")

    p = _command(grp, "start", cmd_start, "start a container that has been created")
    p.add_argument("--null-io", action="store_true", help="send all IO to /dev/null")
    p.add_argument("--log-uri", default="", help="log uri")
    p.add_argument("--fifo-dir", default="", help="directory used for storing IO FIFOs")
    p.add_argument("--pid-file", default="", help="file path to write the task's pid")
    p.add_argument("-d", "--detach", action="store_true", help="detach from the task after it has started execution")
    p.add_argument("--no-pivot", action="store_true", help="disable use of pivot-root (linux only)")
    p.add_argument("id", metavar="CONTAINER", nargs="?", default="")

    p = _command(grp, "metrics", cmd_metrics,
                 "get a single data point of metrics for a task with the built-in Linux runtime", ("metric",))
    p.add_argument("--format", choices=("table", "json"), default="table", help='"table" or "json"')
    p.add_argument("id", metavar="CONTAINER", nargs="?", default="")

    p = _command(grp, "wait", cmd_wait, "wait for a task to exit and print its exit status (pyctr only)")
    p.add_argument("--exec-id", default="", help="wait for this exec process instead")
    p.add_argument("id", metavar="CONTAINER", nargs="?", default="")
