"""pyctr images import|export|pull|push|unpack|busybox: moving images in and out, as ctr 1.6's
commands of those names (same flags and messages), over pycontainerd.api.client.transfer.

These join the `images|image|i` group (made by the images commands' module when it is loaded
before this one, else here). Progress bars go to stderr when it is a terminal, never when piped
or with -q/--quiet; the result lines (`unpacking ...`, `done: ...`) go to stdout as ctr prints them.

Extensions to ctr: `images unpack IMAGE...`, `images busybox OUT.tar` and `images import
--busybox` (the embedded busybox image), `pull --no-unpack`, `push --chunk-size`,
`--http-timeout` for a registry that stops answering.
"""
from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from typing import Any

from pycontainerd.api.client import Client, errdefs

from .pyctr_output import label_args

# The transfer package (and httpx under it) is imported when one of these commands runs, so
# the rest of pyctr does not pay for it at start-up.
BUSYBOX_NAME = "docker.io/library/busybox:latest"
DEFAULT_SNAPSHOTTER = "overlayfs"


def _default_snapshotter() -> str:
    return os.environ.get("CONTAINERD_SNAPSHOTTER") or DEFAULT_SNAPSHOTTER


def _progress(args: argparse.Namespace, title: str = "") -> Any:
    from pycontainerd.api.client.transfer.progress import Progress, TerminalProgress
    if getattr(args, "quiet", False) or getattr(args, "debug", False):
        return Progress()
    if TerminalProgress.wanted(sys.stderr):
        return TerminalProgress(sys.stderr, title=title)
    return Progress()


def _remote(args: argparse.Namespace) -> Any:
    from pycontainerd.api.client.transfer.registry import RemoteOptions
    user = args.user or ""
    if user and ":" not in user:
        if not sys.stdin.isatty():
            raise errdefs.InvalidArgument("--user without a password needs a terminal to ask for it")
        user = f"{user}:{getpass.getpass('Password: ')}"
    timeout = float(args.http_timeout)
    if args.tlscert or args.tlskey:
        if not (args.tlscert and args.tlskey):
            raise errdefs.InvalidArgument("flags --tlscert and --tlskey must be set together")
    return RemoteOptions(plain_http=args.plain_http, hosts_dir=args.hosts_dir or "", user=user,
                         refresh_token=args.refresh or "", skip_verify=args.skip_verify,
                         tlscacert=args.tlscacert or "", tlscert=args.tlscert or "",
                         tlskey=args.tlskey or "", read_timeout=timeout)


# -- commands ----------------------------------------------------------------------------------

def _with_services(func):
    """Run `func(svc, args)` with a Services over the client, closed afterwards."""
    async def command(client: Client, args: argparse.Namespace) -> None:
        from pycontainerd.api.client.transfer._services import Services
        async with Services(client) as svc:
            await func(svc, args)
    command.__name__ = func.__name__
    command.__doc__ = func.__doc__
    return command


async def _unpack_images(svc: Any, images: list, matcher: Any, snapshotter: str, progress: Any) -> None:
    from pycontainerd.api.client.transfer.unpack import unpack
    for img in images:
        sys.stdout.write(f"unpacking {img.name} ({img.target.digest})...")
        sys.stdout.flush()
        await unpack(svc, img.target, matcher, snapshotter, progress)
        print("done", flush=True)


@_with_services
async def cmd_import(svc: Any, args: argparse.Namespace) -> None:
    from pycontainerd.api.client.transfer import archive, busybox
    from pycontainerd.api.client.transfer import platforms as plat
    from pycontainerd.api.client.transfer.progress import Progress
    options = archive.ImportOptions(base_name=args.base_name, digests=args.digests,
                                    skip_digest_for_named=args.skip_digest_for_named,
                                    index_name=args.index_name, all_platforms=args.all_platforms,
                                    platform=args.platform, compress_blobs=args.compress_blobs)
    if args.skip_digest_for_named and not args.digests:
        raise errdefs.InvalidArgument("--skip-digest-for-named must be specified with --digests option")
    if args.busybox:
        if args.input:
            raise errdefs.InvalidArgument("--busybox imports the embedded image: give no input file")
        import io
        img = busybox.build(args.busybox_name)
        source: Any = io.BytesIO(img.archive)
        close = False
    elif not args.input:
        raise errdefs.InvalidArgument("please provide an archive to import (or --busybox)")
    elif args.input == "-":
        source, close = sys.stdin.buffer, False
    else:
        try:
            source, close = open(args.input, "rb"), True
        except OSError as err:
            raise errdefs.NotFound(f"open {args.input}: {err.strerror.lower()}") from None
    progress = _progress(args, "importing")
    try:
        async with progress:
            images = await archive.import_archive(svc, source, options, progress)
    finally:
        if close:
            source.close()
    if not args.no_unpack:
        matcher = plat.Matcher([plat.parse(args.platform)]) if args.platform else plat.Matcher([plat.default()])
        await _unpack_images(svc, images, matcher, args.snapshotter, Progress())


@_with_services
async def cmd_export(svc: Any, args: argparse.Namespace) -> None:
    from pycontainerd.api.client.transfer import archive
    from pycontainerd.api.client.transfer.progress import Progress
    if not args.output or not args.images:
        raise errdefs.InvalidArgument("please provide both an output filename and an image reference to export")
    options = archive.ExportOptions(platforms=args.platform, all_platforms=args.all_platforms,
                                    skip_manifest_json=args.skip_manifest_json,
                                    skip_non_distributable=args.skip_non_distributable)
    images = []
    for name in args.images:
        img = await svc.image_get(name)
        images.append((name, img.target))
    if args.output == "-":
        out, close = sys.stdout.buffer, False
        progress: Progress = Progress()
    else:
        tmp = f"{args.output}.pyctr-tmp-{os.getpid()}"
        out, close = open(tmp, "wb"), True
        progress = _progress(args, "exporting")
    try:
        async with progress:
            await archive.export_archive(svc, out, images, options, progress)
        if close:
            out.flush()
            os.fsync(out.fileno())
            out.close()
            os.replace(tmp, args.output)
            close = False
    finally:
        if close:
            out.close()
            try:
                os.unlink(tmp)
            except OSError:
                pass


@_with_services
async def cmd_pull(svc: Any, args: argparse.Namespace) -> None:
    from pycontainerd.api.client.transfer import platforms as plat
    from pycontainerd.api.client.transfer.pull import PullOptions, fetch, image_platforms
    from pycontainerd.api.client.transfer.pull import pull as pull_and_unpack
    from pycontainerd.api.client.transfer.unpack import unpack
    if not args.ref:
        raise errdefs.InvalidArgument("please provide an image reference to pull")
    options = PullOptions(platforms=args.platform, all_platforms=args.all_platforms,
                          all_metadata=args.all_metadata,
                          labels=label_args(args.label), snapshotter=args.snapshotter,
                          max_concurrent_downloads=args.max_concurrent_downloads or 3)
    remote = _remote(args)
    progress = _progress(args, args.ref)
    async with svc.leased() as leased:
        if not args.no_unpack and not args.all_platforms and len(args.platform) <= 1:
            # one platform: unpack while the layers download
            p = plat.parse(args.platform[0]) if args.platform else plat.default()
            start = time.monotonic()
            async with progress:
                img, chain = await pull_and_unpack(leased, args.ref, remote, options, progress, p)
            print(f"unpacking {plat.format(p)} {img.target.digest}...", flush=True)
            if args.print_chainid:
                print(f"image chain ID: {chain}", flush=True)
            print(f"done: {_go_duration(time.monotonic() - start)}\t", flush=True)
            return
        async with progress:
            img = await fetch(leased, args.ref, remote, options, progress)
        if args.no_unpack:
            return
        if args.all_platforms:
            platforms = await image_platforms(leased, img.target)
        else:
            platforms = [plat.parse(p) for p in args.platform] or [plat.default()]
        start = time.monotonic()
        for p in platforms:
            print(f"unpacking {plat.format(p)} {img.target.digest}...", flush=True)
            chain = await unpack(leased, img.target, plat.Matcher([p]), args.snapshotter)
            if args.print_chainid:
                print(f"image chain ID: {chain}", flush=True)
        print(f"done: {_go_duration(time.monotonic() - start)}\t", flush=True)


def _trim(text: str) -> str:
    return text.rstrip("0").rstrip(".")


def _go_duration(seconds: float) -> str:
    """Go's time.Duration.String()."""
    ns = int(seconds * 1e9)
    if ns < 1000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return _trim(f"{ns / 1e3:.3f}") + "µs"
    if ns < 1_000_000_000:
        return _trim(f"{ns / 1e6:.6f}") + "ms"
    minutes, rest = divmod(ns, 60_000_000_000)
    secs = _trim(f"{rest / 1e9:.9f}") or "0"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@_with_services
async def cmd_push(svc: Any, args: argparse.Namespace) -> None:
    from pycontainerd.api.client.transfer.push import PushOptions, push, select_platform_manifest
    if not args.remote:
        raise errdefs.InvalidArgument("please provide a remote image reference to push")
    if args.manifest:
        from pycontainerd.core import digest as digests
        from pycontainerd.api.client.transfer.mediatypes import Descriptor
        try:
            digests.parse(args.manifest)
        except errdefs.InvalidArgument as err:
            raise errdefs.InvalidArgument(f"invalid manifest digest: {err.message}") from None
        info = await svc.info(args.manifest)
        target = Descriptor(args.manifest_type, args.manifest, info.size)
    else:
        local = args.local or args.remote
        try:
            img = await svc.image_get(local)
        except errdefs.NotFound as err:
            raise errdefs.NotFound(f"unable to resolve image to manifest: {err.message}") from None
        target = img.target
        if len(args.platform) == 1:
            target = await select_platform_manifest(svc, target, args.platform[0])
    options = PushOptions(max_concurrent_uploads=args.max_concurrent_uploaded_layers or 3,
                          chunk_size=args.chunk_size,
                          allow_non_distributable=args.allow_non_distributable_blobs)
    progress = _progress(args, args.remote)
    async with progress:
        await push(svc, args.remote, target, _remote(args), options, progress)


@_with_services
async def cmd_unpack(svc: Any, args: argparse.Namespace) -> None:
    from pycontainerd.api.client.transfer import platforms as plat
    from pycontainerd.api.client.transfer.progress import Progress
    matcher = plat.Matcher([plat.parse(args.platform)]) if args.platform else plat.Matcher([plat.default()])
    images = [await svc.image_get(name) for name in args.images]
    await _unpack_images(svc, images, matcher, args.snapshotter, Progress())


async def cmd_busybox(client: Client, args: argparse.Namespace) -> None:
    from pycontainerd.api.client.transfer import busybox
    img = busybox.build(args.name, args.busybox_binary or None)
    if args.output == "-":
        sys.stdout.buffer.write(img.archive)
        sys.stdout.buffer.flush()
        return
    tmp = f"{args.output}.pyctr-tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(img.archive)
    os.replace(tmp, args.output)
    print(img.manifest_digest)


# -- parser ------------------------------------------------------------------------------------

def _registry_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-k", "--skip-verify", action="store_true", help="skip SSL certificate validation")
    p.add_argument("--plain-http", action="store_true", help="allow connections using plain HTTP")
    p.add_argument("-u", "--user", default="", help="user[:password] Registry user and password")
    p.add_argument("--refresh", default="", help="refresh token for authorization server")
    p.add_argument("--hosts-dir", default="", help="Custom hosts configuration directory")
    p.add_argument("--tlscacert", default="", help="path to TLS root CA")
    p.add_argument("--tlscert", default="", help="path to TLS client certificate")
    p.add_argument("--tlskey", default="", help="path to TLS client key")
    p.add_argument("--http-timeout", default="60", type=float, metavar="SECONDS",
                   help="give up on a registry silent this long (default: 60)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def _snapshotter_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--snapshotter", default=_default_snapshotter(),
                   help="snapshotter name. Empty value stands for the default value. [$CONTAINERD_SNAPSHOTTER]")


def _images_subparsers(sub, group) -> Any:
    """The images group's subparsers, made here unless another module already did."""
    parser = sub.choices.get("images")
    if parser is not None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action
    return group(sub, "images", ["image", "i"], "manage images")


def register(sub) -> None:
    from .pyctr import _command, _group

    images = _images_subparsers(sub, _group)

    def add(name: str, func, help: str, aliases: tuple = ()) -> argparse.ArgumentParser:
        if name in images.choices:
            del images.choices[name]  # these commands are this module's
        return _command(images, name, func, help, aliases)

    p = add("import", cmd_import, "import images")
    p.add_argument("input", nargs="?", metavar="IN", help="the archive ('-' for stdin)")
    p.add_argument("--base-name", default="", help="base image name for added images, when provided "
                   "only images with this name prefix are imported")
    p.add_argument("--digests", action="store_true", help="whether to create digest images (default: false)")
    p.add_argument("--skip-digest-for-named", action="store_true",
                   help="skip applying --digests option to images named in the importing tar")
    p.add_argument("--index-name", default="", help="image name to keep index as, by default index is discarded")
    p.add_argument("--all-platforms", action="store_true", help="imports content for all platforms, false by default")
    p.add_argument("--platform", default="", help="imports content for specific platform")
    p.add_argument("--no-unpack", action="store_true", help="skip unpacking the images, false by default")
    p.add_argument("--compress-blobs", action="store_true",
                   help="compress uncompressed blobs when creating manifest (Docker format only)")
    p.add_argument("--busybox", action="store_true", help="import the embedded busybox image")
    p.add_argument("--busybox-name", default=BUSYBOX_NAME,
                   help=f"name of the embedded busybox image (default: {BUSYBOX_NAME})")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    _snapshotter_flag(p)

    p = add("export", cmd_export, "export images")
    p.add_argument("output", nargs="?", metavar="OUT")
    p.add_argument("images", nargs="*", metavar="IMAGE")
    p.add_argument("--skip-manifest-json", action="store_true",
                   help="do not add Docker compatible manifest.json to archive")
    p.add_argument("--skip-non-distributable", action="store_true",
                   help="do not add non-distributable blobs such as Windows layers to archive")
    p.add_argument("--platform", action="append", default=[], help="Pull content from a specific platform")
    p.add_argument("--all-platforms", action="store_true", help="exports content from all platforms")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    p = add("pull", cmd_pull, "pull an image from a remote")
    p.add_argument("ref", nargs="?", metavar="REF")
    _registry_flags(p)
    _snapshotter_flag(p)
    p.add_argument("--label", action="append", default=[], help="labels to attach to the image")
    p.add_argument("--platform", action="append", default=[], help="Pull content from a specific platform")
    p.add_argument("--all-platforms", action="store_true", help="pull content and metadata from all platforms")
    p.add_argument("--all-metadata", action="store_true", help="Pull metadata for all platforms")
    p.add_argument("--print-chainid", action="store_true", help="Print the resulting image's chain ID")
    p.add_argument("--max-concurrent-downloads", type=int, default=0,
                   help="Set the max concurrent downloads for each pull (default: 3)")
    p.add_argument("--no-unpack", action="store_true", help="fetch and record the image, do not unpack it")

    p = add("push", cmd_push, "push an image to a remote")
    p.add_argument("remote", nargs="?", metavar="REMOTE")
    p.add_argument("local", nargs="?", metavar="LOCAL")
    _registry_flags(p)
    p.add_argument("--manifest", default="", help="digest of manifest")
    p.add_argument("--manifest-type", default="application/vnd.oci.image.manifest.v1+json",
                   help="media type of manifest digest")
    p.add_argument("--platform", action="append", default=[], help="push content from a specific platform")
    p.add_argument("--max-concurrent-uploaded-layers", type=int, default=0,
                   help="Set the max concurrent uploaded layers for each push (default: 3)")
    p.add_argument("--allow-non-distributable-blobs", action="store_true",
                   help="Allow pushing blobs that are marked as non-distributable")
    p.add_argument("--chunk-size", type=int, default=0, metavar="BYTES",
                   help="upload blobs in PATCH chunks of this size (default: one PUT per blob)")

    p = add("unpack", cmd_unpack, "unpack images into a snapshotter")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--platform", default="", help="unpack content for a specific platform")
    _snapshotter_flag(p)

    p = add("busybox", cmd_busybox, "write the embedded busybox image as an OCI archive")
    p.add_argument("output", metavar="OUT", help="the archive to write ('-' for stdout)")
    p.add_argument("--name", default=BUSYBOX_NAME, help="the image name recorded in the archive")
    p.add_argument("--busybox-binary", default="", help="the static busybox to use (default: found on PATH)")
