"""pyctr images pull/push against a real registry: Debian's docker-registry, run here on
127.0.0.1 with a temp config and storage (plain, with htpasswd basic auth, with TLS), against ours
and the stock containerd (PYCTR_TEST_SERVER picks one). skopeo and the stock ctr are the other
clients: what skopeo pushes pyctr pulls, what pyctr pushes ctr pulls.

A small forwarding proxy in front of the registry plays the registries that misbehave (a wrong
byte, a body cut short, a connection dropped once, one that hangs) and the one that wants bearer
tokens, and records the requests it saw.
"""
from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from daemons import Daemon, short_tmpdir
from sharedtools import MAKE_IMAGE
from pycontainerd.api.client import Client
from pycontainerd.api.client.transfer import Services

pytestmark = [pytest.mark.root]

VENV_BIN = Path(sys.executable).parent
PYCTR = str(VENV_BIN / "pyctr")
CTR = shutil.which("ctr")
REGISTRY = shutil.which("docker-registry")
SKOPEO = shutil.which("skopeo")
HTPASSWD = shutil.which("htpasswd")
KINDS = [os.environ["PYCTR_TEST_SERVER"]] if os.environ.get("PYCTR_TEST_SERVER") else ["pycontainerd", "containerd"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique(prefix: str = "r") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- the registry ------------------------------------------------------------------------------

class Registry:
    """docker-registry on 127.0.0.1:<free port>, storage and config in a temp dir."""

    def __init__(self, htpasswd: tuple[str, str] | None = None, tls: bool = False):
        self.dir = short_tmpdir("reg-")
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.tls = tls
        self.cert = self.dir / "cert.pem"
        cfg = ["version: 0.1", "log:", "  level: error", "  accesslog:", "    disabled: true",
               "storage:", "  filesystem:", f"    rootdirectory: {self.dir / 'data'}",
               "  delete:", "    enabled: true", "http:", f"  addr: {self.host}"]
        if tls:
            key = self.dir / "key.pem"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                            "-keyout", str(key), "-out", str(self.cert)], check=True, capture_output=True)
            cfg += ["  tls:", f"    certificate: {self.cert}", f"    key: {key}"]
        if htpasswd:
            user, password = htpasswd
            hashed = subprocess.run([HTPASSWD, "-Bbn", user, password], check=True, capture_output=True,
                                    text=True).stdout.strip()
            (self.dir / "htpasswd").write_text(hashed + "\n")
            cfg += ["auth:", "  htpasswd:", "    realm: test-realm", f"    path: {self.dir / 'htpasswd'}"]
        (self.dir / "config.yml").write_text("\n".join(cfg) + "\n")
        self.log = open(self.dir / "registry.log", "wb")
        self.proc = subprocess.Popen([REGISTRY, "serve", str(self.dir / "config.yml")], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.dir / "registry.log").read_text())
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("docker-registry did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the misbehaving proxy -----------------------------------------------------------------------

class Proxy:
    """Forwards to an upstream registry; `mode` makes it misbehave on blob GETs bigger than 64 KiB:
    corrupt (one byte flipped), truncate (half the body, then close), drop_once (the first GET of
    a blob over 2 MiB is cut halfway, later ones are served, Range included), hang (never answers), bearer
    (wants a token from /token; with `creds`, the token endpoint wants basic auth)."""

    def __init__(self, upstream: str, mode: str = "", creds: tuple[str, str] | None = None):
        self.upstream = upstream
        self.mode = mode
        self.creds = creds
        self.requests: list[tuple[str, str, dict]] = []
        self.dropped = 0
        self.stop_event = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                proxy.handle(self)

            do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop_event.set()
        self.server.shutdown()
        self.server.server_close()

    def _send(self, h, status: int, headers: dict, body: bytes = b"", length: int | None = None) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body) if length is None else length))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def handle(self, h) -> None:
        self.requests.append((h.command, h.path, dict(h.headers)))
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(h.rfile.readline().strip(), 16)
                if size == 0:
                    h.rfile.readline()
                    break
                body += h.rfile.read(size)
                h.rfile.readline()
        if self.mode == "bearer":
            if h.path.startswith("/token"):
                if self.creds:
                    want = "Basic " + base64.b64encode(":".join(self.creds).encode()).decode()
                    if h.headers.get("Authorization") != want:
                        return self._send(h, 401, {"Content-Type": "application/json"}, b"{}")
                return self._send(h, 200, {"Content-Type": "application/json"},
                                  json.dumps({"token": "good-token", "expires_in": 300}).encode())
            if h.headers.get("Authorization") != "Bearer good-token":
                realm = f"http://{self.host}/token"
                return self._send(h, 401, {"WWW-Authenticate":
                                           f'Bearer realm="{realm}",service="test-registry"',
                                           "Content-Type": "application/json"},
                                  b'{"errors":[{"code":"UNAUTHORIZED"}]}')
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        headers = {k: v for k, v in h.headers.items()
                   if k.lower() not in ("authorization", "transfer-encoding", "content-length", "connection")}
        if body or h.command in ("PUT", "POST", "PATCH"):
            headers["Content-Length"] = str(len(body))
        conn.request(h.command, h.path, body=body or None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        out_headers = {k: v for k, v in resp.getheaders()
                       if k.lower() not in ("content-length", "transfer-encoding", "connection")}
        big_blob = (h.command == "GET" and "/blobs/sha256:" in h.path and resp.status in (200, 206)
                    and len(data) > 65536)
        if big_blob and self.mode == "hang":
            self.stop_event.wait(60)
            return
        if big_blob and self.mode == "corrupt":
            data = bytearray(data)
            data[len(data) // 2] ^= 0xFF
            data = bytes(data)
        huge = big_blob and len(data) > (2 << 20)  # more than one 1 MiB chunk before the cut
        if big_blob and (self.mode == "truncate" or (self.mode == "drop_once" and huge and self.dropped == 0)):
            self.dropped += 1
            h.send_response(resp.status)
            for k, v in out_headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        head_length = resp.getheader("Content-Length") if h.command == "HEAD" else None
        self._send(h, resp.status, out_headers, data, int(head_length) if head_length else None)


# -- helpers -----------------------------------------------------------------------------------

def pyctr(d: Daemon, *args: str, ns: str = "default", ok: bool = True, timeout: float = 180
          ) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
    r = subprocess.run([PYCTR, "--address", d.address, "--namespace", ns, *args], capture_output=True,
                       text=True, timeout=timeout, env=env)
    assert "Traceback" not in r.stderr, r.stderr
    if ok:
        assert r.returncode == 0, f"pyctr {args} -> {r.returncode}\n{r.stderr}"
        assert r.stderr == "", r.stderr
    return r


def one_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyctr: "), r.stderr
    return lines[0]


def query(d: Daemon, ns: str, fn):
    import asyncio

    async def main():
        async with Client(d.address, namespace=ns) as c:
            async with Services(c) as svc:
                return await fn(svc)
    return asyncio.run(main())


def images(d: Daemon, ns: str) -> dict[str, str]:
    async def fn(svc):
        return {i.name: i.target.digest for i in await svc.image_list()}
    return query(d, ns, fn)


def content(d: Daemon, ns: str) -> dict[str, dict]:
    async def fn(svc):
        return {i.digest: i.labels for i in await svc.list_content()}
    return query(d, ns, fn)


def make_image(out: Path, *args: str) -> str:
    if not MAKE_IMAGE.exists():
        pytest.skip("../shared/conformance/make-busybox-image.py is not there")
    if not os.path.exists("/usr/bin/busybox"):
        pytest.skip("busybox-static is not installed")
    return subprocess.run([sys.executable, str(MAKE_IMAGE), str(out), *args], capture_output=True,
                          text=True, check=True).stdout.strip()


def upload_layout(host: str, repo: str, tag: str, layout: Path) -> str:
    """Push an OCI layout tar to a registry with plain HTTP requests (no daemon involved), so
    that its blobs are in no daemon's content store: blobs first, then the manifests (children
    by digest), then what index.json names under `tag`; returns that digest."""
    import tarfile
    with tarfile.open(layout) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isreg()}
    top = json.loads(files["index.json"])["manifests"][0]
    docs: list[tuple[dict, bytes]] = []

    def walk(desc: dict) -> None:
        data = files["blobs/sha256/" + desc["digest"].split(":")[1]]
        doc = json.loads(data)
        for child in doc.get("manifests", []):
            walk(child)
        docs.append((desc, data))
    walk(top)
    manifest_names = {"blobs/sha256/" + d["digest"].split(":")[1] for d, _ in docs}
    conn = http.client.HTTPConnection(host, timeout=60)

    def call(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> http.client.HTTPResponse:
        conn.request(method, path, body=body, headers={"Content-Length": str(len(body)), **(headers or {})})
        r = conn.getresponse()
        r.read()
        return r

    for name, data in files.items():
        if not name.startswith("blobs/sha256/") or name in manifest_names:
            continue
        r = call("POST", f"/v2/{repo}/blobs/uploads/")
        assert r.status == 202, r.status
        loc = r.getheader("Location")
        loc = loc.split(host, 1)[1] if "://" in loc else loc
        sep = "&" if "?" in loc else "?"
        r = call("PUT", f"{loc}{sep}digest=sha256:{name.rsplit('/', 1)[1]}", data,
                 {"Content-Type": "application/octet-stream"})
        assert r.status == 201, (r.status, name)
    for desc, data in docs:
        ref = tag if desc is top else desc["digest"]
        r = call("PUT", f"/v2/{repo}/manifests/{ref}", data, {"Content-Type": desc["mediaType"]})
        assert r.status == 201, r.status
    conn.close()
    return top["digest"]


@pytest.fixture
def remote_only(registry, tmp_path) -> tuple[str, str]:
    """(ref, digest) of an image of its own, in the registry only."""
    path = tmp_path / "remote.tar"
    make_image(path, "--extra-mb", "3")  # a layer of more than one 1 MiB chunk
    repo = f"{unique('remote')}/img"
    digest = upload_layout(registry.host, repo, "v1", path)
    return f"{registry.host}/{repo}:v1", digest


# -- fixtures ----------------------------------------------------------------------------------

def _need_root_and_registry():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if REGISTRY is None:
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")


@pytest.fixture(scope="module", params=KINDS)
def server(request):
    _need_root_and_registry()
    if request.param == "containerd" and not shutil.which("containerd"):
        pytest.skip("containerd is not installed")
    d = Daemon(request.param)
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


@pytest.fixture(scope="module")
def registry():
    _need_root_and_registry()
    r = Registry()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="module")
def auth_registry():
    _need_root_and_registry()
    if HTPASSWD is None:
        pytest.skip("htpasswd is not installed (apt-get install apache2-utils)")
    r = Registry(htpasswd=("tester", "s3cret"))
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="module")
def image_tar(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("reg") / "image.tar"
    return path, make_image(path, "--extra-mb", "1")


@pytest.fixture
def proxy_factory(registry):
    made: list[Proxy] = []

    def make(mode: str = "", creds=None) -> Proxy:
        p = Proxy(registry.host, mode, creds)
        made.append(p)
        return p
    yield make
    for p in made:
        p.close()


@pytest.fixture(scope="module")
def pushed(server, registry, image_tar) -> str:
    """The test image imported into `server` and pushed to the registry; its remote ref."""
    path, digest = image_tar
    ns = unique("src")
    pyctr(server, "images", "import", "--no-unpack", "--base-name", "x.io/src", str(path), ns=ns)
    ref = f"{registry.host}/{unique('repo')}/img:v1"
    pyctr(server, "images", "push", ref, "x.io/src:latest", ns=ns)
    return ref


# -- tests -------------------------------------------------------------------------------------

def test_push_then_pull_roundtrip(server, registry, image_tar, pushed):
    _, digest = image_tar
    ns = unique("pull")
    r = pyctr(server, "images", "pull", pushed, ns=ns)
    assert r.stdout.startswith("unpacking linux/") and f" {digest}...\n" in r.stdout, r.stdout
    assert r.stdout.splitlines()[-1].startswith("done: ")
    assert images(server, ns) == {pushed: digest}
    labels = content(server, ns)[digest]
    repo = pushed.split("/", 1)[1].rsplit(":", 1)[0]
    assert labels["containerd.io/distribution.source.127.0.0.1"] == repo
    assert "containerd.io/gc.ref.content.config" in labels
    # pulling again changes nothing
    pyctr(server, "images", "pull", pushed, ns=ns)
    assert images(server, ns) == {pushed: digest}
    # by digest, recorded under that name
    by_digest = pushed.rsplit(":", 1)[0] + "@" + digest
    pyctr(server, "images", "pull", "--no-unpack", by_digest, ns=ns)
    assert images(server, ns)[by_digest] == digest


def test_pull_what_skopeo_pushed(server, registry, tmp_path):
    if SKOPEO is None:
        pytest.skip("skopeo is not installed")
    path = tmp_path / "sk.tar"
    digest = make_image(path)
    ref = f"{registry.host}/{unique('skopeo')}/bb:latest"
    subprocess.run([SKOPEO, "copy", "-q", "--dest-tls-verify=false", f"oci-archive:{path}",
                    f"docker://{ref}"], check=True, capture_output=True, timeout=120)
    ns = unique("sk")
    pyctr(server, "images", "pull", ref, ns=ns)
    assert images(server, ns) == {ref: digest}


def test_ctr_pulls_what_pyctr_pushed(server, registry, image_tar, pushed):
    if CTR is None or not shutil.which("containerd"):
        pytest.skip("needs the stock ctr and containerd")
    _, digest = image_tar
    ref = pushed
    if server.kind != "containerd":
        reference = Daemon("containerd")
        reference.start()
    else:
        reference = server
    try:
        ns = unique("ctr")
        r = subprocess.run([CTR, "--address", reference.address, "--namespace", ns, "images", "pull",
                            "--plain-http", ref], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert images(reference, ns) == {ref: digest}
    finally:
        if reference is not server:
            reference.cleanup()


def test_chunked_upload_and_cross_repo_mount(server, registry, image_tar, proxy_factory):
    path, digest = image_tar
    proxy = proxy_factory()
    ns = unique("mnt")
    pyctr(server, "images", "import", "--no-unpack", "--base-name", "x.io/m", str(path), ns=ns)
    first = f"{proxy.host}/{unique('chunked')}/img:v1"
    pyctr(server, "images", "push", "--chunk-size", "65536", first, "x.io/m:latest", ns=ns)
    assert any(m == "PATCH" for m, _, _ in proxy.requests)
    # pulled from `first`, the blobs carry its repository as their source...
    ns2 = unique("mnt2")
    pyctr(server, "images", "pull", "--no-unpack", first, ns=ns2)
    # ...so pushing them to another repository of that registry mounts instead of uploading
    proxy.requests.clear()
    second = f"{proxy.host}/{unique('mounted')}/img:v2"
    pyctr(server, "images", "push", second, first, ns=ns2)
    mounts = [p for m, p, _ in proxy.requests if m == "POST" and "mount=" in p]
    assert mounts, proxy.requests
    assert not [p for m, p, _ in proxy.requests if m in ("PUT", "PATCH") and "/blobs/" in p]
    ns3 = unique("mnt3")
    pyctr(server, "images", "pull", second, ns=ns3)
    assert images(server, ns3) == {second: digest}


def test_basic_auth(server, auth_registry, image_tar):
    path, digest = image_tar
    ns = unique("auth")
    pyctr(server, "images", "import", "--no-unpack", "--base-name", "x.io/a", str(path), ns=ns)
    ref = f"{auth_registry.host}/{unique('private')}/img:v1"
    line = one_error(pyctr(server, "images", "push", ref, "x.io/a:latest", ns=ns, ok=False))
    assert "401" in line or "authoriz" in line.lower(), line
    pyctr(server, "images", "push", "--user", "tester:s3cret", ref, "x.io/a:latest", ns=ns)
    ns2 = unique("auth2")
    line = one_error(pyctr(server, "images", "pull", ref, ns=ns2, ok=False))
    assert "authoriz" in line.lower() or "401" in line, line
    line = one_error(pyctr(server, "images", "pull", "-u", "tester:wrong", ref, ns=ns2, ok=False))
    assert images(server, ns2) == {}
    pyctr(server, "images", "pull", "-u", "tester:s3cret", ref, ns=ns2)
    assert images(server, ns2) == {ref: digest}


def test_bearer_token_auth(server, image_tar, pushed, proxy_factory):
    _, digest = image_tar
    proxy = proxy_factory("bearer", creds=("bob", "pw"))
    ref = pushed.replace(pushed.split("/", 1)[0], proxy.host, 1)
    ns = unique("bearer")
    line = one_error(pyctr(server, "images", "pull", ref, ns=ns, ok=False))
    assert "token" in line.lower() or "authoriz" in line.lower(), line
    pyctr(server, "images", "pull", "--user", "bob:pw", ref, ns=ns)
    assert images(server, ns) == {ref: digest}
    token_requests = [p for m, p, _ in proxy.requests if p.startswith("/token")]
    assert token_requests and "service=test-registry" in token_requests[-1]
    assert "scope=repository" in token_requests[-1]


def test_hosts_dir_mirror(server, registry, image_tar, pushed, tmp_path):
    _, digest = image_tar
    hosts = tmp_path / "hosts"
    (hosts / "example.invalid").mkdir(parents=True)
    (hosts / "example.invalid" / "hosts.toml").write_text(
        'server = "https://example.invalid"\n\n'
        f'[host."http://{registry.host}"]\n  capabilities = ["pull", "resolve"]\n')
    ref = "example.invalid/" + pushed.split("/", 1)[1]
    ns = unique("mirror")
    pyctr(server, "images", "pull", "--hosts-dir", str(hosts), ref, ns=ns)
    assert images(server, ns) == {ref: digest}


def test_tls_registry_with_hosts_ca(server, image_tar, tmp_path):
    path, digest = image_tar
    reg = Registry(tls=True)
    try:
        ns = unique("tls")
        pyctr(server, "images", "import", "--no-unpack", "--base-name", "x.io/t", str(path), ns=ns)
        hosts = tmp_path / "certs.d"
        d = hosts / f"127.0.0.1:{reg.port}"
        d.mkdir(parents=True)
        (d / "hosts.toml").write_text(f'server = "https://{reg.host}"\nca = "{reg.cert}"\n')
        ref = f"{reg.host}/tls/img:v1"
        pyctr(server, "images", "push", "--hosts-dir", str(hosts), ref, "x.io/t:latest", ns=ns)
        ns2 = unique("tls2")
        pyctr(server, "images", "pull", "--hosts-dir", str(hosts), ref, ns=ns2)
        assert images(server, ns2) == {ref: digest}
        # without the CA the certificate is refused
        (d / "hosts.toml").write_text(f'server = "https://{reg.host}"\n')
        line = one_error(pyctr(server, "images", "pull", "--hosts-dir", str(hosts), ref, ns=unique("tls3"), ok=False))
        assert "certificate" in line.lower() or "ssl" in line.lower(), line
        # ...unless the host says skip_verify
        (d / "hosts.toml").write_text(f'server = "https://{reg.host}"\nskip_verify = true\n')
        ns4 = unique("tls4")
        pyctr(server, "images", "pull", "--no-unpack", "--hosts-dir", str(hosts), ref, ns=ns4)
        assert images(server, ns4) == {ref: digest}
    finally:
        reg.stop()


@pytest.mark.parametrize("mode,expect", [("corrupt", "does not match"), ("truncate", "truncated")])
def test_bad_registry_bytes_are_refused(server, remote_only, proxy_factory, mode, expect):
    pushed, _ = remote_only
    proxy = proxy_factory(mode)
    ref = pushed.replace(pushed.split("/", 1)[0], proxy.host, 1)
    ns = unique(mode)
    line = one_error(pyctr(server, "images", "pull", ref, ns=ns, ok=False))
    assert expect in line, line
    assert images(server, ns) == {}


def test_hanging_registry_times_out(server, remote_only, proxy_factory):
    pushed, _ = remote_only
    proxy = proxy_factory("hang")
    ref = pushed.replace(pushed.split("/", 1)[0], proxy.host, 1)
    ns = unique("hang")
    start = time.monotonic()
    line = one_error(pyctr(server, "images", "pull", "--http-timeout", "2", ref, ns=ns, ok=False))
    assert time.monotonic() - start < 60
    assert "timed out" in line, line
    assert images(server, ns) == {}
    # what did arrive is not left behind either
    assert content(server, ns) == {}


def test_dropped_connection_resumes_with_range(server, remote_only, proxy_factory):
    pushed, digest = remote_only
    proxy = proxy_factory("drop_once")
    ref = pushed.replace(pushed.split("/", 1)[0], proxy.host, 1)
    ns = unique("resume")
    pyctr(server, "images", "pull", ref, ns=ns)
    assert images(server, ns) == {ref: digest}
    assert proxy.dropped == 1
    assert any("Range" in h or "range" in h for m, p, h in proxy.requests if m == "GET" and "/blobs/" in p)


def test_unknown_reference_and_host(server, registry):
    ns = unique("nf")
    line = one_error(pyctr(server, "images", "pull", f"{registry.host}/no/such:tag", ns=ns, ok=False))
    assert "not found" in line, line
    port = free_port()
    line = one_error(pyctr(server, "images", "pull", f"127.0.0.1:{port}/x/y:z", ns=ns, ok=False))
    assert images(server, ns) == {}


def test_pull_platforms(server, registry, tmp_path):
    if os.uname().machine != "x86_64":
        pytest.skip("the image below assumes an amd64 host")
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from test_transfer import multi_platform_layout
    finally:
        sys.path.pop(0)
    base = tmp_path / "base.tar"
    make_image(base, "--extra-mb", "1")
    layout = tmp_path / "multi.tar"
    idx, amd, arm = multi_platform_layout(base, layout)
    repo = f"{unique('multi')}/img"
    assert upload_layout(registry.host, repo, "v1", layout) == idx
    ref = f"{registry.host}/{repo}:v1"

    ns = unique("pp")
    r = pyctr(server, "images", "pull", ref, ns=ns)
    assert r.stdout.startswith(f"unpacking linux/amd64 {idx}...")
    blobs = content(server, ns)
    assert amd in blobs and arm not in blobs
    assert blobs[idx]["containerd.io/gc.ref.content.m.0"] == amd

    ns2 = unique("pp-all")
    r = pyctr(server, "images", "pull", "--all-platforms", "--print-chainid", ref, ns=ns2)
    assert "unpacking linux/amd64" in r.stdout and "unpacking linux/arm64" in r.stdout
    assert r.stdout.count("image chain ID: sha256:") == 2
    blobs = content(server, ns2)
    assert amd in blobs and arm in blobs

    ns_meta = unique("pp-meta")
    pyctr(server, "images", "pull", "--all-metadata", ref, ns=ns_meta)
    blobs = content(server, ns_meta)
    arm_manifest = json.loads(query(server, ns_meta, lambda svc: svc.read_all(arm)))
    assert arm in blobs and arm_manifest["config"]["digest"] in blobs  # metadata of arm64 too
    assert blobs[idx]["containerd.io/gc.ref.content.m.1"] == arm

    ns3 = unique("pp-arm")
    pyctr(server, "images", "pull", "--platform", "linux/arm64", ref, ns=ns3)
    blobs = content(server, ns3)
    assert arm in blobs and amd not in blobs
    # push only one platform of it back, as ctr push --platform does: that manifest alone
    target = f"{registry.host}/{unique('one')}/img:arm"
    pyctr(server, "images", "push", "--platform", "linux/arm64", target, ref, ns=ns3)
    ns4 = unique("pp-back")
    pyctr(server, "images", "pull", "--platform", "linux/arm64", "--no-unpack", target, ns=ns4)
    assert images(server, ns4) == {target: arm}


def test_concurrent_pulls_of_one_image(server, remote_only):
    """Two pulls of the same image at once: one waits for the other's ingests, both succeed."""
    ref, digest = remote_only
    ns = unique("conc")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
    procs = [subprocess.Popen([PYCTR, "--address", server.address, "--namespace", ns, "images", "pull", ref],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    assert images(server, ns) == {ref: digest}
