"""The transfer package's pure parts, no daemon: references, platforms, media types and gc
labels, chain ids and extraction keys, hosts.toml, WWW-Authenticate, the hand-written protobuf
codecs, archive member checks, export tar headers, the busybox image builder, progress output,
and the registry client against an in-process fake registry (httpx MockTransport)."""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import tarfile

import httpx
import pytest

from pycontainerd.api.client.transfer import busybox, hosts, mediatypes as mt, platforms as plat
from pycontainerd.api.client.transfer import reference as ref
from pycontainerd.api.client.transfer import registry as reg
from pycontainerd.api.client.transfer._wire import ReadResponse, WriteRequest, WriteResponse
from pycontainerd.api.client.transfer.archive import ArchiveError, _header, safe_member_name
from pycontainerd.api.client.transfer.progress import TerminalProgress, human_size
from pycontainerd.api.client.transfer.pull import ref_key
from pycontainerd.api.client.transfer.push import mount_candidate
from pycontainerd.api.client.transfer.unpack import chain_ids, unpack_key
from pycontainerd.api.gen.containerd.services.content import v1 as content_api
from pycontainerd.core import errdefs


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- references ------------------------------------------------------------------------------------

@pytest.mark.parametrize("given,normalized,familiar", [
    ("alpine", "docker.io/library/alpine:latest", "alpine:latest"),
    ("alpine:3.19", "docker.io/library/alpine:3.19", "alpine:3.19"),
    ("foo/bar:1", "docker.io/foo/bar:1", "foo/bar:1"),
    ("index.docker.io/library/x", "docker.io/library/x:latest", "x:latest"),
    ("localhost:5000/x:y", "localhost:5000/x:y", "localhost:5000/x:y"),
    ("127.0.0.1:5000/a/b", "127.0.0.1:5000/a/b:latest", "127.0.0.1:5000/a/b:latest"),
    ("example.com/a@sha256:" + "a" * 64, "example.com/a@sha256:" + "a" * 64, "example.com/a@sha256:" + "a" * 64),
])
def test_docker_names(given, normalized, familiar):
    assert ref.normalize(given) == normalized
    assert ref.familiar(normalized) == familiar


@pytest.mark.parametrize("bad", ["foo/Bar", "a" * 64, "x:y:z", ""])
def test_docker_names_refused(bad):
    with pytest.raises(errdefs.InvalidArgument):
        ref.normalize(bad)


def test_containerd_spec():
    s = ref.parse_spec("127.0.0.1:5000/a/b:tag@sha256:" + "b" * 64)
    assert (s.locator, s.hostname, s.repository) == ("127.0.0.1:5000/a/b", "127.0.0.1:5000", "a/b")
    assert s.tag == "tag" and s.digest == "sha256:" + "b" * 64
    assert ref.parse_spec("docker.io/library/x").object == ""
    assert str(ref.parse_spec("h/r@sha256:" + "c" * 64)) == "h/r@sha256:" + "c" * 64
    with pytest.raises(errdefs.InvalidArgument):
        ref.parse_spec("http://h/r:t")
    assert ref.oci_ref_name("docker.io/library/foo:1.0") == "1.0"


def test_import_name_translation():
    add = ref.ref_translator("import-2024-01-01", False)
    assert add("latest") == "import-2024-01-01:latest"
    assert add("other.io/x:1") == "other.io/x:1"
    only = ref.ref_translator("example.com/bb", True)
    assert only("v1") == "example.com/bb:v1"
    assert only("example.com/bb:v2") == "example.com/bb:v2"
    assert only("example.com/bbx:v2") == ""
    assert only("other.io/x:1") == ""


# -- platforms -------------------------------------------------------------------------------------

def test_platforms():
    assert plat.format(plat.parse("linux/x86_64")) == "linux/amd64"
    assert plat.format(plat.parse("linux/aarch64")) == "linux/arm64"
    assert plat.format(plat.parse("linux/arm")) == "linux/arm/v7"
    assert plat.parse("linux/arm64/v8").variant == ""
    with pytest.raises(errdefs.InvalidArgument):
        plat.parse("linux/amd64/v1/x")
    m = plat.Matcher([plat.parse("linux/arm/v7")])
    assert m.match(mt.Platform("linux", "arm", "v6")) and not m.match(mt.Platform("linux", "arm", "v8"))
    amd = plat.Matcher([plat.parse("linux/amd64")])
    assert amd.match(None) and not amd.match(mt.Platform("linux", "arm64"))
    assert plat.all_platforms().match(mt.Platform("windows", "amd64"))
    both = plat.Matcher([plat.parse("linux/arm64"), plat.parse("linux/amd64")])
    assert both.rank(mt.Platform("linux", "arm64")) < both.rank(mt.Platform("linux", "amd64"))


# -- media types and labels --------------------------------------------------------------------------

def test_children_labels_as_containerd():
    kids = [mt.Descriptor(mt.OCI_CONFIG, sha(b"c"), 1), mt.Descriptor(mt.OCI_LAYER_GZIP, sha(b"l0"), 2),
            mt.Descriptor(mt.DOCKER_LAYER, sha(b"l1"), 3)]
    assert mt.children_labels(kids) == {"containerd.io/gc.ref.content.config": sha(b"c"),
                                        "containerd.io/gc.ref.content.l.0": sha(b"l0"),
                                        "containerd.io/gc.ref.content.l.1": sha(b"l1")}
    idx = [mt.Descriptor(mt.OCI_MANIFEST, sha(b"m0"), 1), mt.Descriptor(mt.DOCKER_MANIFEST, sha(b"m1"), 1),
           mt.Descriptor(mt.OCI_INDEX, sha(b"i"), 1), mt.Descriptor("x/y", sha(b"u"), 1)]
    assert mt.children_labels(idx) == {"containerd.io/gc.ref.content.m.0": sha(b"m0"),
                                       "containerd.io/gc.ref.content.m.1": sha(b"m1"),
                                       "containerd.io/gc.ref.content.0": sha(b"i"),
                                       "containerd.io/gc.ref.content.1": sha(b"u")}


def test_parse_document_checks():
    man = mt.Descriptor(mt.OCI_MANIFEST, sha(b"m"), 1)
    idx = mt.Descriptor(mt.OCI_INDEX, sha(b"i"), 1)
    with pytest.raises(errdefs.InvalidArgument, match="JSON"):
        mt.parse_document(b"{nope", man)
    with pytest.raises(errdefs.InvalidArgument, match="limit"):
        mt.parse_document(b" " * (mt.MAX_MANIFEST_SIZE + 1), man)
    with pytest.raises(errdefs.InvalidArgument, match="expected manifest but found index"):
        mt.parse_document(b'{"manifests":[{"digest":"x"}]}', man)
    with pytest.raises(errdefs.InvalidArgument, match="expected index but found manifest"):
        mt.parse_document(b'{"config":{"digest":"x"}}', idx)
    with pytest.raises(errdefs.InvalidArgument, match="schema 1"):
        mt.parse_document(b'{"fsLayers":[{}]}', man)
    doc = mt.parse_document(json.dumps({"config": {"mediaType": mt.OCI_CONFIG, "digest": sha(b"c"), "size": 1},
                                        "layers": []}).encode(), man)
    assert [c.digest for c in mt.children(doc, man)] == [sha(b"c")]
    with pytest.raises(errdefs.InvalidArgument):
        mt.Descriptor.from_json({"digest": "sha256:short", "size": 1})
    assert mt.is_layer("application/vnd.oci.image.layer.v1.tar+zstd")
    assert mt.is_non_distributable("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip")


def test_descriptor_json_is_go_ordered():
    d = mt.Descriptor(mt.OCI_MANIFEST, sha(b"m"), 5, {"b": "2", "a": "1"}, platform=mt.Platform("linux", "amd64"))
    assert mt.go_json(d.to_json()) == (
        '{"mediaType":"%s","digest":"%s","size":5,"annotations":{"a":"1","b":"2"},'
        '"platform":{"architecture":"amd64","os":"linux"}}' % (mt.OCI_MANIFEST, sha(b"m"))).encode()
    assert mt.go_json({"x": "<&>"}) == b'{"x":"\\u003c\\u0026\\u003e"}'


def test_ref_keys():
    assert ref_key(mt.Descriptor(mt.OCI_LAYER_GZIP, sha(b"l"), 1)) == "layer-" + sha(b"l")
    assert ref_key(mt.Descriptor(mt.OCI_INDEX, sha(b"i"), 1, {mt.ANNOTATION_REF_NAME: "v1"})) == \
        "index-v1@" + sha(b"i")
    assert ref_key(mt.Descriptor("x/y", sha(b"u"), 1)) == "unknown-" + sha(b"u")


# -- unpack ----------------------------------------------------------------------------------------

def test_chain_ids_and_keys():
    a, b = sha(b"a"), sha(b"b")
    assert chain_ids([a]) == [a]
    assert chain_ids([a, b]) == [a, "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()]
    key = unpack_key(a)
    prefix, chain = key.split(" ")
    assert chain == a and prefix.startswith("extract-") and len(prefix.split("-")) >= 3
    assert unpack_key(a) != key


# -- hosts and auth ----------------------------------------------------------------------------------

def test_hosts_defaults():
    [h] = hosts.configure_hosts("127.0.0.1:5000")
    assert (h.scheme, h.host, h.path, h.skip_verify) == ("http", "127.0.0.1:5000", "/v2", True)
    [h] = hosts.configure_hosts("localhost")
    assert h.scheme == "http"
    [h] = hosts.configure_hosts("registry.example.com")
    assert h.scheme == "https"
    [h] = hosts.configure_hosts("registry.example.com", plain_http=True)
    assert h.scheme == "http"
    [h] = hosts.configure_hosts("docker.io")
    assert h.host == "registry-1.docker.io"


def test_hosts_toml(tmp_path):
    d = tmp_path / "example.com_5000_"
    d.mkdir()
    (d / "hosts.toml").write_text(
        'server = "https://example.com:5000"\nskip_verify = false\n\n'
        '[host."https://mirror-b.local"]\n  capabilities = ["pull", "resolve"]\n  ca = "ca.pem"\n'
        '  [host."https://mirror-b.local".header]\n    x-test = "1"\n\n'
        '[host."http://mirror-a.local/sub"]\n  capabilities = ["pull"]\n  skip_verify = true\n\n'
        '[host."https://raw.local/custom"]\n  override_path = true\n')
    hs = hosts.configure_hosts("example.com:5000", hosts_dir=str(tmp_path))
    assert [h.base_url for h in hs] == ["https://mirror-b.local/v2", "http://mirror-a.local/sub/v2",
                                        "https://raw.local/custom", "https://example.com:5000/v2"]
    assert hs[0].capabilities == hosts.CAP_PULL | hosts.CAP_RESOLVE and hs[0].ca_certs == [str(d / "ca.pem")]
    assert hs[0].header == {"x-test": ["1"]}
    assert hs[1].capabilities == hosts.CAP_PULL and hs[1].skip_verify is True
    assert hs[3].capabilities == hosts.ALL_CAPS and hs[3].skip_verify is False
    (tmp_path / "_default").mkdir()
    (tmp_path / "_default" / "hosts.toml").write_text('[host."http://any.local"]\n')
    assert hosts.configure_hosts("other.io", hosts_dir=str(tmp_path))[0].base_url == "http://any.local/v2"
    (d / "hosts.toml").write_text('[host."https://x"]\n capabilities = ["fly"]\n')
    with pytest.raises(errdefs.InvalidArgument, match="unknown capability"):
        hosts.configure_hosts("example.com:5000", hosts_dir=str(tmp_path))


def test_www_authenticate():
    [c] = reg.parse_challenges(['Bearer realm="https://auth.io/token",service="registry.io",'
                                'scope="repository:a/b:pull push"'])
    assert c.scheme == "bearer" and c.params == {"realm": "https://auth.io/token", "service": "registry.io",
                                                 "scope": "repository:a/b:pull push"}
    cs = reg.parse_challenges(['Basic realm="r"', 'Bearer realm="x",error="insufficient_scope"'])
    assert [c.scheme for c in cs] == ["basic", "bearer"] and cs[1].params["error"] == "insufficient_scope"


def test_mount_candidate():
    labels = {"containerd.io/distribution.source.127.0.0.1": "a/b,team/x/y,team/q"}
    assert mount_candidate("127.0.0.1:5000/team/x/z", labels) == "team/x/y"
    assert mount_candidate("127.0.0.1:5000/a/b", labels) in ("team/x/y", "team/q")
    assert mount_candidate("other.io/a/c", labels) == ""


# -- wire codecs -----------------------------------------------------------------------------------

def test_wire_codecs_match_generated():
    for kw in (dict(action=1, offset=1 << 40, data=os.urandom(3000)),
               dict(action=2, ref="r", total=10, expected="sha256:x", labels={"a": "b", "c": "d"}), {}):
        ours = WriteRequest(**kw).SerializeToString()
        gen = content_api.WriteContentRequest(**{k: (content_api.WriteAction(v) if k == "action" else v)
                                                 for k, v in kw.items()})
        assert content_api.WriteContentRequest().parse(ours) == gen
    import datetime
    raw = bytes(content_api.WriteContentResponse(
        action=content_api.WriteAction.COMMIT, offset=123456789, total=99, digest="sha256:abc",
        started_at=datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)))
    r = WriteResponse.FromString(raw)
    assert (r.action, r.offset, r.total, r.digest) == (2, 123456789, 99, "sha256:abc")
    data = os.urandom(100000)
    r = ReadResponse.FromString(bytes(content_api.ReadContentResponse(offset=7, data=data)))
    assert (r.offset, r.data) == (7, data)


# -- archives --------------------------------------------------------------------------------------

def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    i.type, i.linkname = kind, link
    return i


def test_member_names():
    assert safe_member_name(_info("./blobs//sha256/abc")) == "blobs/sha256/abc"
    assert safe_member_name(_info("blobs", tarfile.DIRTYPE)) is None
    for bad in (_info("../x"), _info("a/../../x"), _info("/etc/passwd"),
                _info("l", tarfile.SYMTYPE, "/etc"), _info("h", tarfile.LNKTYPE, "index.json")):
        with pytest.raises(ArchiveError):
            safe_member_name(bad)


def test_export_header_is_gos():
    """Go's archive/tar: USTAR, zero uid/gid/mtime, empty user names, device numbers as octal zeros."""
    h = _header("blobs/sha256/" + "a" * 64, 1036075, 0o444, False)
    assert len(h) == 512 and h[257:263] == b"ustar\x00"
    assert h[100:108] == b"0000444\x00" and h[124:136] == b"%011o\x00" % 1036075
    assert h[329:345] == b"0000000\x000000000\x00"
    chk = sum(h[:148]) + 8 * 32 + sum(h[156:])
    assert h[148:156] == b"%06o\x00 " % chk
    info = tarfile.TarInfo.frombuf(h, "utf-8", "surrogateescape")
    assert info.size == 1036075 and info.mtime == 0


# -- busybox -------------------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists("/usr/bin/busybox"), reason="busybox-static is not installed")
def test_busybox_image_is_deterministic():
    a, b = busybox.build(), busybox.build()
    assert a.archive == b.archive and a.manifest_digest == b.manifest_digest
    with tarfile.open(fileobj=io.BytesIO(a.archive)) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isreg()}
    index = json.loads(files["index.json"])
    assert index["manifests"][0]["annotations"][mt.ANNOTATION_IMAGE_NAME] == busybox.DEFAULT_NAME
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    for name, data in files.items():
        if name.startswith("blobs/sha256/"):
            assert sha(data) == "sha256:" + name.rsplit("/", 1)[1]
    assert busybox.is_static_elf(open("/usr/bin/busybox", "rb").read())


def test_static_elf_check():
    assert not busybox.is_static_elf(b"not an elf")
    py = open(os.path.realpath("/proc/self/exe"), "rb").read()
    assert not busybox.is_static_elf(py)  # python is dynamically linked


# -- progress ------------------------------------------------------------------------------------

def test_terminal_progress_renders_bars():
    out = io.StringIO()
    p = TerminalProgress(out)
    p.start("layer-sha256:aaa", 2 << 20, "downloading")
    p.advance("layer-sha256:aaa", 1 << 20)
    p.finish("config-sha256:bbb", "exists")
    lines = p.render()
    assert "downloading" in lines[0] and "|" in lines[0] and "1.0 MiB/2.0 MiB" in lines[0]
    assert "exists" in lines[1] and lines[-1].startswith("elapsed:")
    p.draw()
    p.draw()
    assert "\x1b[3A" in out.getvalue()
    assert human_size(1536) == "1.5 KiB"
    assert not TerminalProgress.wanted(io.StringIO())


# -- the registry client against a fake registry --------------------------------------------------------

class FakeRegistry:
    """Just enough of the distribution API for resolve/fetch/push, behind bearer auth."""

    def __init__(self, token_user: str = ""):
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, tuple[str, bytes]] = {}
        self.uploads: dict[str, bytearray] = {}
        self.requests: list[httpx.Request] = []
        self.token_user = token_user

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        url = request.url
        if url.path == "/token":
            if self.token_user and not request.headers.get("authorization", "").startswith("Basic "):
                return httpx.Response(401)
            return httpx.Response(200, json={"token": "tok"})
        if request.headers.get("authorization") != "Bearer tok":
            return httpx.Response(401, headers={"www-authenticate":
                                                'Bearer realm="https://reg.test/token",service="reg.test"'})
        parts = url.path.split("/")
        if "/manifests/" in url.path:
            key = parts[-1]
            if request.method == "PUT":
                data = request.read()
                d = sha(data)
                self.manifests[key] = self.manifests[d] = (request.headers["content-type"], data)
                return httpx.Response(201, headers={"docker-content-digest": d})
            if key not in self.manifests:
                return httpx.Response(404)
            media_type, data = self.manifests[key]
            return httpx.Response(200, content=b"" if request.method == "HEAD" else data,
                                  headers={"content-type": media_type, "docker-content-digest": sha(data),
                                           "content-length": str(len(data))})
        if url.path.endswith("/blobs/uploads/") and request.method == "POST":
            uid = str(len(self.uploads))
            self.uploads[uid] = bytearray()
            return httpx.Response(202, headers={"location": f"/v2/upload/{uid}"})
        if url.path.startswith("/v2/upload/"):
            uid = parts[-1]
            self.uploads[uid] += request.read()
            if request.method == "PATCH":
                return httpx.Response(202, headers={"location": f"/v2/upload/{uid}"})
            d = url.params["digest"]
            if sha(bytes(self.uploads[uid])) != d:
                return httpx.Response(400)
            self.blobs[d] = bytes(self.uploads[uid])
            return httpx.Response(201, headers={"docker-content-digest": d})
        if "/blobs/" in url.path:
            d = parts[-1]
            if d not in self.blobs:
                return httpx.Response(404)
            data = self.blobs[d]
            rng = request.headers.get("range")
            if rng:
                start = int(rng.split("=")[1].rstrip("-"))
                return httpx.Response(206, content=data[start:],
                                      headers={"content-range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
            return httpx.Response(200, content=b"" if request.method == "HEAD" else data,
                                  headers={"content-length": str(len(data))})
        return httpx.Response(404)


def _registry(fake: FakeRegistry, ref_: str, **options) -> reg.Registry:
    r = reg.Registry(ref.parse_spec(ref_), reg.RemoteOptions(**options))
    transport = httpx.MockTransport(fake)
    for h in r.hosts:
        r._clients[id(h)] = httpx.AsyncClient(transport=transport)
    return r


def test_registry_push_resolve_fetch_with_tokens():
    fake = FakeRegistry()
    layer = os.urandom(300000)
    ldesc = mt.Descriptor(mt.OCI_LAYER_GZIP, sha(layer), len(layer))
    manifest = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": ldesc.to_json(),
                           "layers": [ldesc.to_json()]}).encode()
    mdesc = mt.Descriptor(mt.OCI_MANIFEST, sha(manifest), len(manifest))

    async def main():
        async with _registry(fake, "reg.test/team/app:v1") as r:
            assert not await r.exists(ldesc)
            loc = await r.start_upload(ldesc)

            def body():
                async def gen():
                    for i in range(0, len(layer), 65536):
                        yield layer[i:i + 65536]
                return gen()
            await r.upload(loc, ldesc, body, chunk_size=100000)
            assert await r.exists(ldesc)
            await r.put_manifest("v1", mdesc, manifest)
            got = await r.resolve()
            assert (got.digest, got.size, got.media_type) == (mdesc.digest, len(manifest), mt.OCI_MANIFEST)
            assert await r.fetch_bytes(mdesc) == manifest
            resp = await r.open(ldesc, 1000)
            try:
                assert await resp.aread() == layer[1000:]
            finally:
                await resp.aclose()
            bad = mt.Descriptor(mt.OCI_MANIFEST, sha(b"other"), len(manifest))
            fake.manifests[bad.digest] = (mt.OCI_MANIFEST, manifest)
            with pytest.raises(errdefs.FailedPrecondition, match="digest"):
                await r.fetch_bytes(bad)
        async with _registry(fake, "reg.test/team/app:nope") as r:
            with pytest.raises(errdefs.NotFound):
                await r.resolve()
    asyncio.run(main())
    patches = [q for q in fake.requests if q.method == "PATCH"]
    assert len(patches) == 3  # 300000 bytes in chunks of 100000
    tokens = [q for q in fake.requests if q.url.path == "/token"]
    assert tokens and tokens[0].url.params["service"] == "reg.test"
    assert "repository:team/app:pull,push" in tokens[0].url.params.get_list("scope")


def test_registry_token_needs_credentials():
    fake = FakeRegistry(token_user="u")

    async def main():
        async with _registry(fake, "reg.test/a/b:v1") as r:
            with pytest.raises(errdefs.ContainerdError, match="token"):
                await r.resolve()
        fake.manifests["v1"] = (mt.OCI_MANIFEST, b"{}")
        async with _registry(fake, "reg.test/a/b:v1", user="u:p") as r:
            assert (await r.resolve()).size == 2
    asyncio.run(main())
