"""Image sources: turn the user's SOURCE string into a :class:`SourceSpec`, then open it as an image config
plus a list of verified layer streams.

Kinds (``resolve`` takes the prefix, or autodetects a bare path or a HOST[:PORT]/REPO[:TAG] reference):

- ``dir:PATH``: a root filesystem directory (read by :func:`thaw.imagefs.ingest.ingest_directory`);
- ``docker-archive:PATH[:TAG]``: a ``docker save`` tar;
- ``oci:PATH[:REF]``: an OCI image layout, directory or tar; REF is an ``org.opencontainers.image.ref.name``;
- ``docker://[HOST/]REPO[:TAG|@DIGEST]``: a registry;
- ``docker-daemon:IMAGE``: an image in the local dockerd;
- ``dockerfile:DIR`` (or the Dockerfile's path): ``docker build`` through the docker SDK, then as above.

An OCI layout directory is read in place. Everything else is copied by skopeo (registry protocol and auth,
manifest lists, docker-archive and OCI-archive formats, the daemon's export, digest checks, retries) into a
temporary OCI layout, which is then read the same way.

Every layer is read as a stream: its bytes are hashed as they go by and checked against the layer digest
when the stream ends or is closed, and its uncompressed tar against the config's diff_id when the ingest
has read it all, so a tampered blob fails the ingest (which only commits at the end).
Errors a user can cause are :class:`SourceError` with a one-line message naming the input.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import gzip
import hashlib
import io
import ipaddress
import json
import os
import platform
import posixpath
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from .manifest import config_errors

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_V1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MT_TAR = "application/vnd.oci.image.layer.v1.tar"
INDEX_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST)
CONFIG_TYPES = ("application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json")
# OCI layers (also "nondistributable") and Docker's (also "foreign"): tar, plain or compressed
LAYER_TYPE_RE = re.compile(r"^application/vnd\.(oci\.image\.layer(\.nondistributable)?\.v1\.tar"
                           r"|docker\.image\.rootfs(\.foreign)?\.diff\.tar)(\.gzip|\+gzip|\+zstd)?$")
REF_NAME = "org.opencontainers.image.ref.name"
CONFIG_FIELDS = ("User", "ExposedPorts", "Env", "Entrypoint", "Cmd", "Volumes", "WorkingDir", "Labels",
                 "StopSignal")

MAX_TRAILER = 1 << 20  # uncompressed bytes after a layer's tar end blocks (padding there is at most a few KiB)
# \Z, not $ (which also matches before a final newline); ASCII: no other letters in a tag
DIGEST_RE = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})\Z")
DOMAIN_RE = re.compile(r"^(localhost|\[[0-9a-fA-F:]+\]|[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+|[A-Za-z0-9-]+)(:[0-9]+)?\Z")
REPO_RE = re.compile(r"^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*\Z")
TAG_RE = re.compile(r"^[\w][\w.-]{0,127}\Z", re.ASCII)
MAX_JSON = 16 << 20  # index, manifest and config documents are small; refuse absurd ones
GZIP_MAGIC, ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"
KINDS_HINT = ("give a directory, docker-archive:TAR, oci:LAYOUT[:REF], docker://HOST/REPO[:TAG], "
              "docker-daemon:IMAGE or dockerfile:CONTEXT_DIR")


class SourceError(ValueError):
    """A source the user named cannot be used; the one-line message names it and says what to do."""


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # dir | docker-archive | oci | registry | docker-daemon | dockerfile
    location: str  # plain string: travels in workflow history, usable by open_image on the same machine

    def __str__(self) -> str:
        return f"docker://{self.location}" if self.kind == "registry" else f"{self.kind}:{self.location}"


@dataclass
class Layer:
    digest: str  # of the blob as stored (compressed or not); verified while streaming
    size: int | None
    media_type: str
    opener: Callable[[], BinaryIO]  # the raw blob
    source: str = ""  # for messages
    diff_id: str | None = None  # of the uncompressed tar (the config's rootfs.diff_ids); verified by finish()

    def open(self) -> BinaryIO:
        """The layer as an uncompressed tar stream; a digest mismatch raises SourceError at EOF or close."""
        return _LayerStream(self.opener(), self)


@dataclass
class ImageSource:
    ref: str
    config: dict
    layers: list[Layer] = field(default_factory=list)


# -- resolve ---------------------------------------------------------------------------------------------
def resolve(source: str) -> SourceSpec:
    """Classify SOURCE without pulling anything (cheap: it runs as the ``resolve_source`` activity)."""
    s = source.strip()
    if not s:
        raise SourceError(f"empty image source: {KINDS_HINT}")
    for prefix, fn in (("dir:", _resolve_dir), ("docker-archive:", _resolve_docker_archive),
                       ("oci-archive:", _resolve_oci), ("oci:", _resolve_oci),
                       ("docker://", _resolve_registry), ("docker-daemon:", _resolve_daemon),
                       ("dockerfile:", _resolve_dockerfile)):
        if s.startswith(prefix):
            return fn(s[len(prefix):])
    p = Path(s).expanduser()
    if p.exists():
        return _autodetect(p)
    if _looks_like_registry_ref(s):
        return _resolve_registry(s)
    raise SourceError(f"{source}: no such file or directory, and not a registry reference "
                      f"(HOST[:PORT]/REPO[:TAG], or docker://NAME[:TAG] for Docker Hub); {KINDS_HINT}")


def _abs(p: Path) -> str:
    return str(p.expanduser().absolute())


def _split_path_ref(rest: str) -> tuple[Path, str | None]:
    """``PATH[:REF]``: the whole string if it exists, else the first ``:``-prefix that exists is the path."""
    whole = Path(rest).expanduser()
    if whole.exists():
        return whole, None
    i = rest.find(":")
    while i != -1:
        head = Path(rest[:i]).expanduser()
        if rest[:i] and head.exists():
            return head, rest[i + 1:] or None
        i = rest.find(":", i + 1)
    return whole, None


def _tar_names(path: Path, label: str) -> set[str]:
    """The member names of an uncompressed tar, normalised (``./index.json`` is ``index.json``)."""
    try:
        with tarfile.open(path, "r:") as tf:
            return {posixpath.normpath(n.lstrip("/")) for n in tf.getnames()}
    except (tarfile.TarError, ValueError, EOFError) as e:  # ValueError: a bad number in a pax header
        with open(path, "rb") as f:
            hint = "; decompress it first" if f.read(4).startswith((GZIP_MAGIC, ZSTD_MAGIC)) else ""
        raise SourceError(f"{label}: not a readable tar file ({e}){hint}") from None
    except OSError as e:
        raise SourceError(f"{label}: cannot read {path}: {e.strerror or e}") from None


def _with_ref(path: Path, ref: str | None) -> str:
    return _abs(path) + (f":{ref}" if ref else "")


def _resolve_dir(rest: str) -> SourceSpec:
    p = Path(rest).expanduser()
    if not p.is_dir():
        raise SourceError(f"dir:{rest}: no such directory; give the root filesystem directory of the image")
    return SourceSpec("dir", _abs(p))


def _resolve_docker_archive(rest: str) -> SourceSpec:
    path, ref = _split_path_ref(rest)
    if not path.is_file():
        raise SourceError(f"docker-archive:{rest}: no such file; give the tar written by `docker save`")
    if "manifest.json" not in _tar_names(path, f"docker-archive:{rest}"):
        raise SourceError(f"docker-archive:{rest}: not a docker-archive (no manifest.json); "
                          f"give a `docker save` tar")
    return SourceSpec("docker-archive", _with_ref(path, ref))


def _resolve_oci(rest: str) -> SourceSpec:
    path, ref = _split_path_ref(rest)
    label = f"oci:{rest}"
    if path.is_dir():
        if not (path / "index.json").is_file():
            raise SourceError(f"{label}: not an OCI image layout (no index.json); "
                              f"give a directory written by e.g. `skopeo copy ... oci:DIR:TAG`")
    elif path.is_file():
        if "index.json" not in _tar_names(path, label):
            raise SourceError(f"{label}: not an OCI archive (no index.json in the tar)")
    else:
        raise SourceError(f"{label}: no such OCI layout directory or archive")
    return SourceSpec("oci", _with_ref(path, ref))


def _resolve_daemon(rest: str) -> SourceSpec:
    name = rest.strip()
    if not name or any(c.isspace() for c in name):
        raise SourceError(f"docker-daemon:{rest}: give an image name, NAME:TAG or ID, e.g. docker-daemon:app:v1")
    return SourceSpec("docker-daemon", name)


def _resolve_dockerfile(rest: str) -> SourceSpec:
    p = Path(rest).expanduser()
    if p.is_dir():
        if not (p / "Dockerfile").is_file():
            raise SourceError(f"dockerfile:{rest}: no Dockerfile in that directory; "
                              f"give the build context dir or the Dockerfile's path")
    elif not p.is_file():
        raise SourceError(f"dockerfile:{rest}: no such build context directory or Dockerfile")
    return SourceSpec("dockerfile", _abs(p))


def _autodetect(p: Path) -> SourceSpec:
    if p.is_dir():
        if (p / "index.json").is_file() and (p / "oci-layout").is_file():
            return SourceSpec("oci", _abs(p))
        return SourceSpec("dir", _abs(p))
    if not p.is_file():
        raise SourceError(f"{p}: not a directory, docker-archive or OCI archive")
    try:
        is_tar = tarfile.is_tarfile(p)
    except (ValueError, EOFError):  # a tar with a damaged header: _tar_names below says what is wrong
        is_tar = True
    if not is_tar:
        raise SourceError(f"{p}: not a directory or a tar file; {KINDS_HINT}")
    names = _tar_names(p, str(p))
    if "manifest.json" in names:
        return SourceSpec("docker-archive", _abs(p))
    if "index.json" in names:
        return SourceSpec("oci", _abs(p))
    raise SourceError(f"{p}: a tar file, but neither a docker-archive (manifest.json) nor an OCI archive "
                      f"(index.json); unpack a root filesystem tar and give the directory")


# -- registry references ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegistryRef:
    host: str  # as written (docker.io for Docker Hub)
    repo: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        return (f"{self.host}/{self.repo}" + (f":{self.tag}" if self.tag else "")
                + (f"@{self.digest}" if self.digest else ""))


def _looks_like_registry_ref(s: str) -> bool:
    first, slash, rest = s.partition("/")
    return bool(slash and rest and DOMAIN_RE.match(first) and ("." in first or ":" in first
                                                                or first == "localhost"))


def parse_registry_ref(s: str) -> RegistryRef:
    """``[HOST[:PORT]/]REPO[:TAG][@DIGEST]``, Docker's rules: no host means Docker Hub (library/ for one part)."""
    label = f"docker://{s}"
    name, _, digest = s.partition("@")
    tag = None
    if name.rfind(":") > name.rfind("/"):
        name, tag = name.rsplit(":", 1)
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        host, repo = first, rest
    else:
        host, repo = "docker.io", name
    if host == "docker.io" and "/" not in repo:
        repo = f"library/{repo}"
    if not DOMAIN_RE.match(host) or not REPO_RE.match(repo):
        raise SourceError(f"{label}: not a valid image reference; write HOST[:PORT]/REPO[:TAG] "
                          f"(lowercase repository name)")
    if tag is not None and not TAG_RE.match(tag):
        raise SourceError(f"{label}: {tag!r} is not a valid tag")
    if digest and not DIGEST_RE.match(digest):
        raise SourceError(f"{label}: {digest!r} is not a valid digest (sha256:<64 hex>)")
    if digest:  # as Docker does: the digest names the image, the tag beside it is ignored (skopeo refuses both)
        tag = None
    elif not tag:
        tag = "latest"
    return RegistryRef(host, repo, tag, digest or None)


def _resolve_registry(rest: str) -> SourceSpec:
    return SourceSpec("registry", str(parse_registry_ref(rest.strip())))


# -- open ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def open_image(spec: SourceSpec, scratch: Path | None = None, max_bytes: int | None = None) -> Iterator[ImageSource]:
    """Open a resolved source; the temporary layout (under ``scratch``, default the system's temporary
    directory) and the daemon connection go away on exit. ``max_bytes``: a registry image with more than that
    to download is refused before its layers are pulled."""
    label = str(spec)
    if spec.kind == "dir":
        raise SourceError(f"{label}: a directory has no layers; ingest it with ingest_directory")
    path, ref = _split_path_ref(spec.location)
    if spec.kind == "oci" and path.is_dir():
        yield _oci_layout(_DirFS(path, label), label, ref)
        return
    if spec.kind in ("oci", "docker-archive") and ":" in str(path):
        raise SourceError(f"{label}: an archive path with ':' in it can't be named to skopeo; rename or link it")
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="thaw-pull-", dir=scratch)))
        if spec.kind == "oci":
            yield _copy(f"oci-archive:{_with_ref(path, ref)}", tmp / "layout", label,
                        not_found=f"no image named {ref!r} in the archive")
        elif spec.kind == "docker-archive":
            tag = f"{ref}:latest" if ref and ref.rfind(":") <= ref.rfind("/") else ref
            yield _copy(f"docker-archive:{_with_ref(path, tag)}", tmp / "layout", label,
                        not_found=f"no image tagged {tag!r} in the archive")
        elif spec.kind == "registry":
            yield _pull(parse_registry_ref(spec.location), tmp, label, max_bytes)
        elif spec.kind in ("docker-daemon", "dockerfile"):
            client = stack.enter_context(_docker_client(label))
            image_id = (_docker_build(client, Path(spec.location), label) if spec.kind == "dockerfile"
                        else spec.location)
            daemon = os.environ.get("DOCKER_HOST")
            yield _copy(f"docker-daemon:{_docker_image_id(client, image_id, label)}", tmp / "layout", label,
                        *(["--src-daemon-host", daemon] if daemon else []))
        else:
            raise SourceError(f"{label}: unknown source kind {spec.kind!r}")


def _json(data: bytes, what: str):
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise SourceError(f"{what} is not valid JSON ({e})") from None
    except RecursionError:
        raise SourceError(f"{what}: JSON nested too deep") from None


def _obj(v) -> dict:
    """A JSON object from a document, or {} where it holds something else (a hostile index, say)."""
    return v if isinstance(v, dict) else {}


def _list(v) -> list:
    return v if isinstance(v, list) else []


def _check_digest(digest, what: str) -> str:
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise SourceError(f"{what}: bad digest {digest!r} (want sha256:<64 lowercase hex>)")
    return digest


def _verify(data: bytes, digest: str, what: str) -> bytes:
    alg, _, hexd = digest.partition(":")
    got = hashlib.new(alg, data).hexdigest()
    if got != hexd:
        raise SourceError(f"{what}: content does not match its digest {digest} (got {alg}:{got}); "
                          f"the image is corrupt or was tampered with")
    return data


def _small_config(doc, label: str) -> dict:
    cfg = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(cfg, dict):
        return {}
    bad = config_errors(cfg)
    if bad:
        raise SourceError(f"{label}: bad image config: {'; '.join(bad)}")
    return {k: cfg[k] for k in CONFIG_FIELDS if cfg.get(k) not in (None, [], {}, "")}


def _keepalive(stage: str, every: float = 1.0):
    from thaw.heartbeat import keepalive

    return keepalive(stage, every)


# -- layer streams -----------------------------------------------------------------------------------------
class _Hashing(io.RawIOBase):
    """The raw blob, hashed as it is read; at EOF the size and digest must match."""

    def __init__(self, raw: BinaryIO, layer: Layer):
        self.raw, self.layer = raw, layer
        alg, _, self.want = _check_digest(layer.digest, f"{layer.source}: layer").partition(":")
        self.hash = hashlib.new(alg)
        self.n = 0
        self.done = False
        self.error: SourceError | None = None  # once failed, the same error again (never a misleading second one)

    def readable(self) -> bool:
        return True

    def _fail(self, message: str):
        self.done = True
        self.error = SourceError(f"{self.what}: {message}")
        raise self.error

    def _feed(self, data: bytes) -> None:
        self.hash.update(data)
        self.n += len(data)
        size = self.layer.size
        if size is not None and self.n > size:
            self._fail(f"blob is larger than the {size} bytes its manifest declares")

    @property
    def what(self) -> str:
        return f"{self.layer.source}: layer {self.layer.digest}" if self.layer.source else f"layer {self.layer.digest}"

    def _finish(self) -> None:
        self.done = True
        size = self.layer.size
        if size is not None and self.n < size:
            self._fail(f"blob is truncated ({self.n} of {size} bytes)")
        got = self.hash.hexdigest()
        if got != self.want:
            self._fail(f"content does not match its digest (got {self.hash.name}:{got}); "
                       f"the image is corrupt or was tampered with")

    def readinto(self, b) -> int:
        if self.error:
            raise self.error
        if self.done:
            return 0
        data = self.raw.read(len(b))
        if not data:
            self._finish()
            return 0
        self._feed(data)
        b[:len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Hash what the consumer left unread (tar padding, gzip trailer, or all of it after an error)."""
        if self.error:
            raise self.error
        while not self.done:
            data = self.raw.read(1 << 20)
            if not data:
                self._finish()
            else:
                self._feed(data)


class _LayerStream(io.RawIOBase):
    """Uncompressed tar bytes of a layer (gzip, zstd or plain, told by magic bytes), verified on the fly."""

    def __init__(self, raw: BinaryIO, layer: Layer):
        self._raw = raw
        try:
            self._hash = _Hashing(raw, layer)
            self._buf = io.BufferedReader(self._hash, 1 << 16)
            magic = self._buf.peek(4)[:4]
            if magic.startswith(GZIP_MAGIC):
                self.kind, self._out = "gzip", gzip.GzipFile(fileobj=self._buf, mode="rb")
            elif magic == ZSTD_MAGIC:
                self.kind, self._out = "zstd", _zstd_reader(self._buf, self._hash.what)
            else:
                self.kind, self._out = "tar", self._buf
            alg = layer.diff_id.partition(":")[0] if layer.diff_id else None
            # an uncompressed layer's tar is its blob, whose digest _Hashing checks: not hashed again the same way
            same = self.kind == "tar" and layer.digest.startswith(f"{alg}:")
            self._diff = hashlib.new(alg) if alg and not same else None
        except BaseException:
            raw.close()
            raise

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        try:
            data = self._out.read(len(b))
        except SourceError:
            raise
        except Exception as e:
            if not _is_decode_error(e):
                raise
            self._hash.drain()  # a digest mismatch is the better explanation
            raise SourceError(f"{self._hash.what}: corrupt {self.kind} data ({e})") from None
        if self._diff:
            self._diff.update(data)
        b[:len(data)] = data
        return len(data)

    def finish(self) -> None:
        """Read the rest of the uncompressed stream (the tar reader stops at its end-of-archive block): gzip
        checks its CRC and length, and zstd its checksum, only at the end. SourceError if they do not match,
        or if more than a tar's end padding follows (a small compressed tail can expand without bound)."""
        buf, left = bytearray(1 << 16), MAX_TRAILER
        while n := self.readinto(buf):
            left -= n
            if left < 0:
                raise SourceError(f"{self._hash.what}: more than {MAX_TRAILER >> 20} MiB of data after the end of "
                                  f"its tar")
        layer = self._hash.layer
        got = f"{self._diff.name}:{self._diff.hexdigest()}" if self._diff else layer.digest
        if layer.diff_id and got != layer.diff_id:
            self._hash.drain()  # the blob's own digest failing is the better explanation
            raise SourceError(f"{self._hash.what}: its uncompressed tar does not match the config's diff_id "
                              f"{layer.diff_id} (got {got}); the image is corrupt or was tampered with")

    def close(self) -> None:
        """Verify the digest (hashing whatever was left unread), then release everything."""
        if self.closed:
            return
        try:
            self._hash.drain()
        finally:
            self._release()

    def _release(self) -> None:
        for name in ("_out", "_buf", "_raw"):
            with contextlib.suppress(Exception):
                getattr(self, name).close()
        super().close()

    def __del__(self) -> None:  # an unclosed stream is released without reading the rest of the blob
        with contextlib.suppress(Exception):
            self._release()


def _is_decode_error(e: Exception) -> bool:
    if isinstance(e, (gzip.BadGzipFile, zlib.error, EOFError)):
        return True
    return type(e).__name__ == "ZstdError"


def _zstd_reader(f: BinaryIO, what: str):
    """The stream across its frames. One cut short raises EOFError at its end, as gzip does (python-zstandard's
    reader ends quietly there, so a layer cut at a block boundary lost its last files without an error)."""
    try:
        from compression import zstd  # Python 3.14
    except ImportError:
        try:
            from backports import zstd
        except ImportError:
            raise SourceError(f"{what} is zstd-compressed: install the backports.zstd module where the worker "
                              f"runs (pip install backports.zstd)") from None
    return zstd.ZstdFile(f, "rb")


# -- OCI image layout --------------------------------------------------------------------------------------
class _DirFS:
    def __init__(self, root: Path, label: str):
        self.root, self.label = Path(root), label

    def _path(self, name: str) -> Path:
        parts = name.split("/")
        if name.startswith("/") or ".." in parts:
            raise SourceError(f"{self.label}: refusing path {name!r} outside the layout")
        return self.root / name

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def size(self, name: str) -> int:
        return self._path(name).stat().st_size

    def open(self, name: str) -> BinaryIO:
        try:  # O_NONBLOCK: a FIFO would block the open until a writer came (forever); a regular file ignores it
            fd = os.open(self._path(name), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SourceError(f"{self.label}: {name} is missing") from None
        except OSError as e:
            raise SourceError(f"{self.label}: cannot read {name}: {e.strerror or e}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a directory, FIFO, device (/dev/zero: no end)...
                raise SourceError(f"{self.label}: {name} is not a regular file")
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            data = f.read(MAX_JSON + 1)
        if len(data) > MAX_JSON:
            raise SourceError(f"{self.label}: {name} is over {MAX_JSON} bytes")
        return data


def _blob_path(digest: str, what: str) -> str:
    alg, _, hexd = _check_digest(digest, what).partition(":")
    return f"blobs/{alg}/{hexd}"


def _oci_layout(fs, label: str, ref: str | None) -> ImageSource:
    if not fs.exists("index.json"):
        raise SourceError(f"{label}: not an OCI image layout (no index.json)")
    index = _json(fs.read("index.json"), f"{label}: index.json")
    descs = [d for d in _list(_obj(index).get("manifests")) if isinstance(d, dict)]
    names = [n for d in descs if isinstance(n := _obj(d.get("annotations")).get(REF_NAME), str) and n]
    if ref:
        picked = [d for d in descs if _obj(d.get("annotations")).get(REF_NAME) == ref or d.get("digest") == ref]
        if not picked:
            raise SourceError(f"{label}: no image named {ref!r} in the layout (has: {', '.join(names) or 'none'})")
        desc = picked[0]
    elif len(descs) == 1:
        desc = descs[0]
    elif not descs:
        raise SourceError(f"{label}: index.json lists no images")
    elif all(d.get("platform") for d in descs):
        desc = _pick_platform(descs, label)
    else:
        raise SourceError(f"{label}: the layout holds {len(descs)} images; pick one with oci:PATH:REF "
                          f"(refs: {', '.join(names) or 'none'})")

    def blob(digest: str) -> bytes:
        return _verify(fs.read(_blob_path(digest, label)), digest, f"{label}: blob {digest}")

    digest, manifest = _resolve_manifest(desc, blob, label)
    return _image_from_manifest(manifest, blob, lambda d: fs.open(_blob_path(d, label)), label,
                                f"{label}@{digest}")


def _host_platform() -> tuple[str, str | None]:
    m = platform.machine().lower()
    return {"x86_64": ("amd64", None), "amd64": ("amd64", None), "aarch64": ("arm64", None),
            "arm64": ("arm64", None), "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "i686": ("386", None),
            "i386": ("386", None)}.get(m, (m, None))


def _pick_platform(descs: list[dict], label: str) -> dict:
    arch, variant = _host_platform()
    seen, matches = [], []
    for d in descs:
        p = _obj(d.get("platform"))
        if p.get("os") == "unknown" or _obj(d.get("annotations")).get("vnd.docker.reference.type"):
            continue  # attestations and other non-images
        seen.append("/".join(x for x in (p.get("os"), p.get("architecture"), p.get("variant")) if isinstance(x, str)
                             and x))
        if p.get("os") == "linux" and p.get("architecture") == arch:
            matches.append(d)
    if variant:
        matches.sort(key=lambda d: _obj(d.get("platform")).get("variant") != variant)
    if matches:
        return matches[0]
    raise SourceError(f"{label}: no linux/{arch} image in the index (has: {', '.join(seen) or 'none'})")


def _resolve_manifest(desc: dict, fetch: Callable[[str], bytes], label: str) -> tuple[str, dict]:
    """Follow index → manifest (picking the host platform) until an image manifest."""
    for _ in range(4):
        digest = _check_digest(desc.get("digest"), f"{label}: manifest descriptor")
        doc = _json(fetch(digest), f"{label}: manifest {digest}")
        if not isinstance(doc, dict):
            raise SourceError(f"{label}: manifest {digest} is not a JSON object")
        mt = doc.get("mediaType") or desc.get("mediaType") or ""
        if doc.get("schemaVersion") == 1 or mt == MT_DOCKER_V1:
            raise SourceError(f"{label}: Docker schema 1 manifests are not supported; re-push the image "
                              f"with a current docker or skopeo")
        if mt in INDEX_TYPES or ("manifests" in doc and "layers" not in doc):
            desc = _pick_platform([d for d in _list(doc.get("manifests")) if isinstance(d, dict)], label)
            continue
        return digest, doc
    raise SourceError(f"{label}: image indexes nest too deep")


def _image_from_manifest(doc: dict, fetch: Callable[[str], bytes], open_blob: Callable[[str], BinaryIO],
                         label: str, ref: str) -> ImageSource:
    cdesc = doc.get("config")
    if not isinstance(cdesc, dict):
        raise SourceError(f"{label}: image manifest has no config")
    cmt = cdesc.get("mediaType") or CONFIG_TYPES[0]
    if cmt not in CONFIG_TYPES:
        raise SourceError(f"{label}: its config is {cmt!r}, not a container image's: an artifact (a Helm chart, a "
                          f"signature...) cannot run")
    config = _json(fetch(_check_digest(cdesc.get("digest"), f"{label}: config")), f"{label}: image config")
    descs, diff_ids = doc.get("layers"), _obj(_obj(config).get("rootfs")).get("diff_ids")
    if not isinstance(descs, list):  # not an image without layers: a damaged or hostile manifest
        raise SourceError(f"{label}: image manifest has no layers list")
    if not isinstance(diff_ids, list) or len(diff_ids) != len(descs):
        have = f"{len(diff_ids)} rootfs.diff_ids" if isinstance(diff_ids, list) else "no rootfs.diff_ids list"
        raise SourceError(f"{label}: image manifest lists {len(descs)} layers but its config has {have}")
    layers = []
    for ldesc, diff_id in zip(descs, diff_ids):
        if not isinstance(ldesc, dict):
            raise SourceError(f"{label}: bad layer descriptor {ldesc!r}")
        digest = _check_digest(ldesc.get("digest"), f"{label}: layer")
        mt = ldesc.get("mediaType") or MT_TAR
        if "encrypted" in str(mt):
            raise SourceError(f"{label}: layer {digest} is encrypted ({mt}); decrypt the image first")
        if not LAYER_TYPE_RE.match(str(mt)):
            raise SourceError(f"{label}: layer {digest} is {mt!r}, not a tar layer of a container image")
        size = ldesc.get("size")
        layers.append(Layer(digest, size if isinstance(size, int) else None, mt,
                            functools.partial(open_blob, digest), label,
                            _check_digest(diff_id, f"{label}: config rootfs.diff_ids")))
    return ImageSource(ref=ref, config=_small_config(config, label), layers=layers)


# -- docker daemon -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _docker_client(label: str):
    try:
        import docker
    except ImportError:
        raise SourceError(f"{label}: the docker Python SDK is not installed (pip install docker)") from None
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except Exception as e:
        raise SourceError(f"{label}: cannot reach the Docker daemon at {host}: start dockerd or set DOCKER_HOST "
                          f"({_one_line(e)[:200]})") from None
    try:
        yield client
    finally:
        client.close()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:500]


def _docker_build(client, location: Path, label: str) -> str:
    import docker

    context, dockerfile = (location, None) if location.is_dir() else (location.parent, location.name)
    if not context.is_dir():
        raise SourceError(f"{label}: build context {context} is gone")
    image_id = None
    try:
        with _keepalive("docker build"):
            for chunk in client.api.build(path=str(context), dockerfile=dockerfile, rm=True, forcerm=True,
                                          decode=True):
                if "error" in chunk:
                    raise SourceError(f"{label}: docker build failed: {_one_line(chunk['error'])}")
                aux = chunk.get("aux")
                if isinstance(aux, dict) and aux.get("ID"):
                    image_id = aux["ID"]
                m = re.match(r"Successfully built ([0-9a-f]{12,64})", chunk.get("stream", ""))
                if m and not image_id:
                    image_id = m.group(1)
    except docker.errors.APIError as e:
        raise SourceError(f"{label}: docker build failed: {_one_line(e.explanation or e)}") from None
    except docker.errors.DockerException as e:
        raise SourceError(f"{label}: docker build failed: {_one_line(e)}") from None
    if not image_id:
        raise SourceError(f"{label}: docker build reported no image id")
    return image_id


def _docker_image_id(client, name: str, label: str) -> str:
    """The full ID of a daemon image given by name, tag or (short) ID: what skopeo's docker-daemon: takes."""
    import docker

    try:
        return client.images.get(name).id
    except docker.errors.ImageNotFound:
        raise SourceError(f"{label}: no such image in the Docker daemon; pull or build it first") from None
    except docker.errors.APIError as e:
        raise SourceError(f"{label}: docker could not find the image: {_one_line(e.explanation or e)}") from None


# -- skopeo: registries, archives and the daemon, copied into a temporary OCI layout ---------------------------
COPY_REF = "thaw"  # the name of the one image in the temporary layout
_FATAL_RE = re.compile(r'level=fatal msg="((?:[^"\\]|\\.)*)"')
_REGISTRY_ERRORS = (  # (words in skopeo's message, what the user reads), first match wins
    (("connection refused", "no such host", "network is unreachable", "no route to host"),
     "registry {host} unreachable: {reason}; check the address and that the registry runs"),
    (("x509", "tls:", "certificate"),
     "TLS with registry {host} failed ({reason}); for a plain-HTTP registry add it to THAW_INSECURE_REGISTRIES"),
    (("unauthorized", "denied", "authentication required", "invalid username/password", "forbidden"),
     "registry {host} denied access{who} ({reason}); set THAW_REGISTRY_USERNAME and THAW_REGISTRY_PASSWORD "
     "(or docker login)"),
    (("manifest unknown", "name unknown", "not found"),
     "image not found in registry {host} ({reason}); check the repository and tag"),
)
# retried by the activity: a registry overloaded or restarting, or a network that dropped the pull half-way
_TRANSIENT = re.compile(r"\b(429|500|502|503|504)\b|toomanyrequests|service unavailable|bad gateway|i/o timeout"
                        r"|connection reset|unexpected eof|handshake timeout|timeout exceeded|deadline exceeded"
                        r"|server misbehaving")  # the last: a DNS server that failed to answer for now


@dataclass(frozen=True)
class _Registry:
    """What an error message about a registry needs."""
    host: str
    user: str | None


def _copy(src: str, dest: Path, label: str, *flags: str, registry: _Registry | None = None,
          not_found: str | None = None) -> ImageSource:
    """``skopeo copy SRC`` into an OCI layout at ``dest``, then read it like any layout."""
    argv = [_skopeo(label), "--insecure-policy", "copy", "--quiet", "--retry-times", "3", *flags, src,
            f"oci:{dest}:{COPY_REF}"]
    with _keepalive("skopeo copy"):
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True)
    if r.returncode:
        raise _copy_error(r.stderr.decode(errors="replace"), label, registry, not_found)
    return _oci_layout(_DirFS(dest, label), label, COPY_REF)


def _skopeo(label: str) -> str:
    exe = shutil.which("skopeo")
    if exe is None:
        raise SourceError(f"{label}: skopeo is not installed; thaw reads registries, archives and the Docker "
                          f"daemon through it (apt-get install skopeo)")
    return exe


def _copy_error(stderr: str, label: str, registry: _Registry | None, not_found: str | None) -> Exception:
    """skopeo's fatal message as one line that says what to do; a registry's 5xx/429 stays retryable."""
    m = _FATAL_RE.search(stderr)
    msg = _one_line(_unquote(m[1]) if m else (stderr.strip().splitlines() or ["no output"])[-1])
    low, reason = msg.lower(), msg.rsplit(": ", 1)[-1]
    if "digest did not match" in low or "digest mismatch" in low:
        return SourceError(f"{label}: a blob does not match its digest ({reason}); the image is corrupt or was "
                           f"tampered with")
    if registry:
        who = f" as {registry.user!r}" if registry.user else ""
        for words, message in _REGISTRY_ERRORS:
            if any(w in low for w in words):
                return SourceError(f"{label}: " + message.format(host=registry.host, who=who, reason=reason))
        if _TRANSIENT.search(low):
            return RuntimeError(f"{label}: registry {registry.host} failed: {msg}")  # transient: the activity retries
    elif not_found and ("not found" in low or "no descriptor found" in low):  # docker-archive, oci-archive
        return SourceError(f"{label}: {not_found}")
    return SourceError(f"{label}: {msg}")


def _unquote(text: str) -> str:
    """logrus quotes the message Go-style; JSON reads the same escapes (\\n, \\", \\uXXXX)."""
    try:
        return json.loads(f'"{text}"')
    except ValueError:
        return text


def _insecure(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    try:
        loopback = ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:  # a name: only "localhost" counts (127.example.com is a real host)
        loopback = name == "localhost"
    if loopback:
        return True
    listed = {h.strip() for h in os.environ.get("THAW_INSECURE_REGISTRIES", "").split(",") if h.strip()}
    return host in listed or name in listed


def _pull(ref: RegistryRef, tmp: Path, label: str, max_bytes: int | None = None) -> ImageSource:
    """A registry image: credentials from THAW_REGISTRY_USERNAME/PASSWORD, else skopeo's own lookup
    (``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``, containers' auth.json). With ``max_bytes``,
    an image whose layers are more than that to download is refused before any layer is."""
    insecure, auth = _insecure(ref.host), None
    user = os.environ.get("THAW_REGISTRY_USERNAME") or os.environ.get("THAW_REGISTRY_USER")
    if user:  # an auth file, not --src-creds: no password on a command line
        auth = tmp / "auth.json"
        secret = base64.b64encode(f"{user}:{os.environ.get('THAW_REGISTRY_PASSWORD', '')}".encode()).decode()
        auth.touch(mode=0o600)
        auth.write_text(json.dumps({"auths": {ref.host: {"auth": secret}}}))
    elif os.environ.get("DOCKER_CONFIG"):
        config = Path(os.environ["DOCKER_CONFIG"]) / "config.json"
        auth = config if config.is_file() else None
    registry = _Registry(ref.host, user)
    opts = [*(["tls-verify=false"] if insecure else []), *([f"authfile={auth}"] if auth else [])]
    if max_bytes is not None:  # and then pull what was checked, even if the tag moves meanwhile
        ref = _check_download(ref, label, max_bytes, registry, [f"--{o}" for o in opts])
    return _copy(f"docker://{ref}", tmp / "layout", label, *(f"--src-{o}" for o in opts), registry=registry)


def _check_download(ref: RegistryRef, label: str, max_bytes: int, registry: _Registry,
                    flags: list[str]) -> RegistryRef:
    """Refuse an image whose layers (for this host's platform) are over ``max_bytes`` to download, from its
    manifest alone: a pull lands on the state dir's disk before ingest can count anything. Returns ``ref``
    pinned to the digest of the manifest it checked."""
    def raw(target: str) -> bytes:
        with _keepalive("skopeo inspect"):
            r = subprocess.run([_skopeo(label), "inspect", "--raw", "--retry-times", "3", *flags, f"docker://{target}"],
                               stdin=subprocess.DEVNULL, capture_output=True)
        if r.returncode:
            raise _copy_error(r.stderr.decode(errors="replace"), label, registry, None)
        return r.stdout

    top = raw(str(ref))
    first = ref.digest or f"sha256:{hashlib.sha256(top).hexdigest()}"

    def fetch(digest: str) -> bytes:  # the manifest named by the tag, or one an index names (verified)
        return top if digest == first else _verify(raw(f"{ref.host}/{ref.repo}@{digest}"), digest,
                                                   f"{label}: manifest {digest}")

    digest, doc = _resolve_manifest({"digest": first}, fetch, label)  # as the ingest picks: schema 1 refused
    layers = doc.get("layers")
    if not isinstance(layers, list) or not all(isinstance(d, dict) and type(d.get("size")) is int and d["size"] >= 0
                                               for d in layers):
        raise SourceError(f"{label}: manifest {digest} does not give every layer's size (a damaged or hostile "
                          f"manifest); nothing was pulled")
    size = sum(d["size"] for d in layers)
    if size > max_bytes:
        raise SourceError(f"{label}: its layers are {size} bytes to download, over the image size limit of "
                          f"{max_bytes} bytes (THAW_MAX_IMAGE_SIZE); nothing was pulled")
    return RegistryRef(ref.host, ref.repo, None, digest)  # the image manifest measured, not an index
