"""Real services for the image-source tests: dockerd, Debian's docker-registry (anonymous and bearer-token auth
with a token server run in this process), skopeo and umoci. Import the fixtures into a test module.

Nothing here reaches Docker Hub: the base image is busybox-static packed into a tar and ``docker import``-ed.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from thaw.ports import free_port
BASE_IMAGE = "thaw-test/busybox:1"


def need(binary: str, package: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None)
    if not path:
        pytest.skip(f"{binary} is not installed (apt-get install {package}; `make setup` does it)")
    return path


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    code = proc.poll() if proc is not None else None
    raise RuntimeError(f"{what} did not become ready (exit code {code}):\n{tail}")


def wait_until(pred, timeout: float = 60, what: str = "condition", every: float = 0.1):
    """Poll ``pred`` every ``every`` s until it returns something truthy, and return that; AssertionError after
    ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a process this module started, by its PID."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# -- dockerd ---------------------------------------------------------------------------------------------
class Dockerd:
    def __init__(self, host: str, client, proc: subprocess.Popen | None = None, root: Path | None = None):
        self.host, self.client, self.proc, self.root = host, client, proc, root  # proc: None if not ours


def _reachable_daemon():
    import docker

    try:
        client = docker.from_env(timeout=10)
        client.ping()
        return client
    except Exception:
        return None


def _start_dockerd(root: Path, driver: str) -> Dockerd:
    import docker

    sock = root / "docker.sock"
    host = f"unix://{sock}"
    log = root / f"dockerd-{driver}.log"
    (root / "daemon.json").write_text("{}")
    # containerd namespaces must match [A-Za-z0-9]+([._-][A-Za-z0-9]+)*: mkdtemp's suffix may hold "_" anywhere
    ns = f"thaw-test-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}"
    cmd = [need("dockerd", "docker.io"), "--config-file", str(root / "daemon.json"),
           "--data-root", str(root / "data"), "--exec-root", str(root / "exec"), "--pidfile", str(root / "pid"),
           "-H", host, "--storage-driver", driver, "--bridge", "none", "--iptables=false", "--ip6tables=false",
           "--ip-masq=false", "--containerd-namespace", ns,
           "--containerd-plugins-namespace", f"{ns}-plugins", "--log-level", "warn"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        wait_for(lambda: sock.exists() and docker.DockerClient(base_url=host, timeout=5).ping(), 60,
                 f"dockerd ({driver})", proc, log)
        client = docker.DockerClient(base_url=host, timeout=300)
        if client.info()["Driver"] != driver:
            raise RuntimeError(f"dockerd runs {client.info()['Driver']}, not {driver}")
    except BaseException:
        stop_process(proc)
        raise
    return Dockerd(host, client, proc, root)


@pytest.fixture(scope="session")
def dockerd():
    """A reachable Docker daemon: the machine's (DOCKER_HOST or the default socket) or one started here."""
    client = _reachable_daemon()
    if client is not None:
        yield Dockerd(os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock", client)
        for ref in (BASE_IMAGE, APP_IMAGE):  # leave the machine's daemon as we found it
            with contextlib.suppress(Exception):
                client.images.remove(ref, force=True)
        client.close()
        return
    need("dockerd", "docker.io")
    root = Path(tempfile.mkdtemp(prefix="thaw-dockerd-"))  # short path: unix sockets live below it
    errors = []
    d = None
    for driver in ("overlay2", "vfs"):
        try:
            d = _start_dockerd(root, driver)
            break
        except RuntimeError as e:
            errors.append(str(e))
            shutil.rmtree(root / "data", ignore_errors=True)
    if d is None:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail("could not start dockerd:\n" + "\n".join(errors))
    try:
        yield d
    finally:
        d.client.close()
        stop_process(d.proc)
        subprocess.run(["umount", "-R", str(root / "exec")], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def docker_env(dockerd, monkeypatch):
    """Point thaw's docker.from_env() (the in-process worker) at the test daemon. Ask for it before ``worker``:
    a new worker's Rust threads call getenv as they start, and a setenv then can crash the process."""
    monkeypatch.setenv("DOCKER_HOST", dockerd.host)
    return dockerd


def busybox_rootfs_tar() -> bytes:
    """A small but varied root filesystem: busybox-static and its applet links, owners, modes, a hard link."""
    busybox = Path(need("busybox", "busybox-static")).read_bytes()
    applets = subprocess.run([shutil.which("busybox"), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    rnd = hashlib.sha256(b"thaw").digest() * 2048  # 64 KiB, deterministic
    buf = io.BytesIO()
    mtime = 1_700_000_000

    def add(name, kind="file", data=b"", mode=0o644, uid=0, gid=0, link=""):
        ti = tarfile.TarInfo(name)
        ti.mode, ti.uid, ti.gid, ti.mtime = mode, uid, gid, mtime
        ti.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE,
                   "hard": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
        ti.linkname = link
        ti.size = len(data) if kind == "file" else 0
        tf.addfile(ti, io.BytesIO(data) if kind == "file" else None)

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d, mode in (("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777), ("root", 0o700), ("usr", 0o755),
                        ("usr/share", 0o755), ("opt", 0o755), ("opt/data", 0o755), ("home", 0o755)):
            add(d, "dir", mode=mode)
        add("bin/busybox", data=busybox, mode=0o755)
        for a in applets:
            if a != "busybox":
                add(f"bin/{a}", "sym", link="busybox")
        add("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n")
        add("etc/group", data=b"root:x:0:\nalice:x:1000:\n")
        add("etc/motd", data=b"hello from the base layer\n")
        add("home/alice", "dir", mode=0o750, uid=1000, gid=1000)
        add("home/alice/secret", data=b"s3cret\n", mode=0o600, uid=1000, gid=1000)
        add("home/alice/secret.bak", "hard", link="home/alice/secret", mode=0o600, uid=1000, gid=1000)
        add("usr/share/data.bin", data=rnd)
        add("usr/share/data.link", "hard", link="usr/share/data.bin")
        add("usr/share/setuid-tool", data=b"#!/bin/sh\necho tool\n", mode=0o4755)
        add("opt/data/a", data=b"a\n")
        add("opt/data/b", data=b"b\n")
        add("opt/pipe", "fifo", mode=0o600)
    return buf.getvalue()


@pytest.fixture(scope="session")
def base_image(dockerd) -> str:
    """BASE_IMAGE in the test daemon, imported from busybox_rootfs_tar() (no registry involved)."""
    dockerd.client.api.import_image_from_data(busybox_rootfs_tar(), repository=BASE_IMAGE.split(":")[0],
                                              tag=BASE_IMAGE.split(":")[1],
                                              changes=['CMD ["/bin/sh"]', "ENV PATH=/bin"])
    return BASE_IMAGE


APP_IMAGE = "thaw-test/app:1"
APP_DOCKERFILE = f"""\
FROM {BASE_IMAGE}
COPY app/ /app/
RUN chmod 0750 /app/bin && chmod 0640 /app/cfg.txt && chown 123:456 /app/cfg.txt \\
 && ln -s cfg.txt /app/link && ln -s /bin/busybox /app/abs-link \\
 && rm /etc/motd && rm -r /usr/share && mkdir -p /var/empty
RUN rm -r /opt/data && mkdir /opt/data && echo new > /opt/data/c && rm /app/bin/tool && echo two > /app/second
ENV GREETING=hi
WORKDIR /app
CMD ["/bin/sh", "-c", "cat /app/cfg.txt"]
"""


def write_app_context(ctx: Path) -> Path:
    """A build context whose Dockerfile adds files, a symlink, chmod/chown, and deletes base files/dirs."""
    (ctx / "app" / "bin").mkdir(parents=True)
    (ctx / "Dockerfile").write_text(APP_DOCKERFILE)
    (ctx / "app" / "cfg.txt").write_text("port=8080\n")
    (ctx / "app" / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
    (ctx / "app" / "bin" / "run").write_text("#!/bin/sh\nexec cat /app/cfg.txt\n")
    os.chmod(ctx / "app" / "bin" / "run", 0o755)
    (ctx / "app" / "model.bin").write_bytes(hashlib.sha512(b"model").digest() * 40_000)  # 2.5 MiB
    return ctx


@pytest.fixture(scope="session")
def app_context(tmp_path_factory) -> Path:
    return write_app_context(tmp_path_factory.mktemp("app-context"))


@pytest.fixture(scope="session")
def app_image(dockerd, base_image, app_context) -> str:
    """APP_IMAGE built from app_context by the test daemon; returns its image id."""
    image, _ = dockerd.client.images.build(path=str(app_context), tag=APP_IMAGE, rm=True, forcerm=True)
    return image.id


@pytest.fixture(scope="session")
def app_archive(dockerd, app_image, tmp_path_factory) -> Path:
    """`docker save` of APP_IMAGE."""
    path = tmp_path_factory.mktemp("app-archive") / "app.tar"
    with open(path, "wb") as f:
        for chunk in dockerd.client.images.get(APP_IMAGE).save(named=True):
            f.write(chunk)
    return path


# Paths docker puts into every container (init layer and mount points): not part of the image.
CONTAINER_PATHS = {".dockerenv", "dev", "proc", "sys", "etc/hostname", "etc/hosts", "etc/resolv.conf", "etc/mtab"}


@pytest.fixture(scope="session")
def app_export(dockerd, app_image, tmp_path_factory) -> Path:
    """`docker export` of a container created from APP_IMAGE, unpacked (owners, modes, links kept)."""
    out = tmp_path_factory.mktemp("app-export")
    container = dockerd.client.containers.create(APP_IMAGE)
    try:
        tar = out.parent / "app-export.tar"
        with open(tar, "wb") as f:
            for chunk in container.export():
                f.write(chunk)
    finally:
        container.remove(force=True)
    subprocess.run(["tar", "-xpf", str(tar), "--numeric-owner", "-C", str(out)], check=True)
    return out


# -- tree comparison ---------------------------------------------------------------------------------------
def tree_snapshot(root: Path, skip: set[str] = frozenset(), mtimes: bool = False) -> dict[str, tuple]:
    """path -> (type, mode, uid, gid, sha256 of contents | symlink target [, mtime of files])."""
    out = {}
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if rel in skip or rel.split("/")[0] in skip:
                continue
            st = os.lstat(full)
            value = None
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    value = hashlib.file_digest(f, "sha256").hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                value = os.readlink(full)
            entry = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, value)
            if mtimes and stat.S_ISREG(st.st_mode):
                entry += (int(st.st_mtime),)
            out[rel] = entry
    return out


def hardlink_groups(root: Path) -> set[frozenset[str]]:
    groups: dict[int, set[str]] = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                groups.setdefault(st.st_ino, set()).add(os.path.relpath(full, root))
    return {frozenset(g) for g in groups.values()}


# -- skopeo / umoci ----------------------------------------------------------------------------------------
def skopeo_copy(src: str, dst: str, *args: str) -> None:
    cmd = [need("skopeo", "skopeo"), "--insecure-policy", "copy", "--quiet", *args, src, dst]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr}")


def umoci_unpack(layout: Path, ref: str, dest: Path) -> Path:
    """Unpack an OCI layout image with umoci (an independent layer applier); returns the rootfs."""
    cmd = [need("umoci", "umoci"), "unpack", "--image", f"{layout}:{ref}", str(dest)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr}")
    return dest / "rootfs"


# -- docker-registry ---------------------------------------------------------------------------------------
class Registry:
    def __init__(self, proc: subprocess.Popen, port: int, root: Path, token_server=None):
        self.proc, self.port, self.root, self.token_server = proc, port, root, token_server
        self.host = f"127.0.0.1:{port}"

    @property
    def creds(self) -> str:
        user, pw = next(iter(self.token_server.users.items()))
        return f"{user}:{pw}"


def _start_registry(root: Path, auth: dict | None = None, token_server=None) -> Registry:
    import requests

    binary = need("docker-registry", "docker-registry")
    port = free_port()
    config = {"version": 0.1, "log": {"level": "error", "accesslog": {"disabled": True}},
              "storage": {"filesystem": {"rootdirectory": str(root / "data")}, "delete": {"enabled": True}},
              "http": {"addr": f"127.0.0.1:{port}", "secret": uuid.uuid4().hex}}
    if auth:
        config["auth"] = auth
    (root / "config.yml").write_text(json.dumps(config))  # JSON is YAML
    log = root / "registry.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, "serve", str(root / "config.yml")], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/v2/", timeout=2).status_code in (200, 401),
                 30, "docker-registry", proc, log)
    except BaseException:
        stop_process(proc)
        raise
    return Registry(proc, port, root, token_server)


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """Debian's docker-registry, anonymous, plain HTTP on 127.0.0.1."""
    reg = _start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    stop_process(reg.proc)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Docker token authentication (https://distribution.github.io/distribution/spec/auth/token/): checks
    basic credentials and issues RS256 JWTs whose x5c certificate is the registry's rootcertbundle."""

    SERVICE, ISSUER = "thaw-test-registry", "thaw-test-issuer"

    def __init__(self, users: dict[str, str]):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.users = users
        self.issued: list[tuple[str, list]] = []
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "thaw-test-token-signer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self.x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def token(self, user: str | None, scopes: list[str]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        access = []
        if user is not None:  # a known user may pull and push anything; anonymous gets a token with no access
            for scope in scopes:
                parts = scope.split(":")
                if len(parts) >= 3:
                    access.append({"type": parts[0], "name": ":".join(parts[1:-1]),
                                   "actions": parts[-1].split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {"iss": self.ISSUER, "sub": user or "", "aud": self.SERVICE, "exp": now + 300, "nbf": now - 30,
                  "iat": now, "jti": uuid.uuid4().hex, "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        self.issued.append((user, access))
        return f"{signing_input}.{_b64url(sig)}"

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                url = urllib.parse.urlparse(self.path)
                if url.path != "/token":
                    return self._reply(404, {"error": "not found"})
                query = urllib.parse.parse_qs(url.query)
                scopes = [s for v in query.get("scope", []) for s in v.split()]
                user = None
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
                    if server.users.get(user) != pw:
                        return self._reply(401, {"details": "incorrect username or password"})
                token = server.token(user, scopes)
                self._reply(200, {"token": token, "access_token": token, "expires_in": 300})

        return Handler


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory):
    """docker-registry with bearer-token auth; ``.creds`` is a valid user:password for the token server."""
    root = tmp_path_factory.mktemp("token-registry")
    ts = TokenServer({"alice": "wonderland"})
    (root / "token.pem").write_bytes(ts.cert_pem)
    auth = {"token": {"realm": ts.realm, "service": ts.SERVICE, "issuer": ts.ISSUER,
                      "rootcertbundle": str(root / "token.pem")}}
    try:
        reg = _start_registry(root, auth, ts)
    except BaseException:
        ts.close()
        raise
    yield reg
    stop_process(reg.proc)
    ts.close()
