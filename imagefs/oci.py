"""Image sources: turn the user's SOURCE string into a :class:`SourceSpec`, then open it as an image config
plus a list of verified layer streams.

Kinds (``resolve`` takes the prefix, or autodetects a bare path or a HOST[:PORT]/REPO[:TAG] reference):

- ``dir:PATH``: a root filesystem directory (read by :func:`thaw.imagefs.ingest.ingest_directory`);
- ``docker-archive:PATH[:TAG]``: a ``docker save`` tar, legacy ``<id>/layer.tar`` or ``blobs/sha256/…`` layout;
- ``oci:PATH[:REF]``: an OCI image layout, directory or tar; REF is an ``org.opencontainers.image.ref.name``;
- ``docker://[HOST/]REPO[:TAG|@DIGEST]``: a registry (HTTP API v2; anonymous, basic or bearer-token auth);
- ``docker-daemon:IMAGE``: an image in the local dockerd, saved through the docker SDK to a temporary archive;
- ``dockerfile:DIR`` (or the Dockerfile's path): ``docker build`` through the docker SDK, then as above.

Every layer is read as a stream: its bytes are hashed as they go by and checked against the layer digest
when the stream ends or is closed, so a tampered blob fails the ingest (which only commits at the end).
Errors a user can cause are :class:`SourceError` with a one-line message naming the input.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import gzip
import hashlib
import io
import json
import os
import platform
import posixpath
import re
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_V1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MT_TAR = "application/vnd.oci.image.layer.v1.tar"
INDEX_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST)
ACCEPT = ", ".join((MT_OCI_INDEX, MT_OCI_MANIFEST, MT_DOCKER_LIST, MT_DOCKER_MANIFEST))
REF_NAME = "org.opencontainers.image.ref.name"
CONFIG_FIELDS = ("User", "ExposedPorts", "Env", "Entrypoint", "Cmd", "Volumes", "WorkingDir", "Labels",
                 "StopSignal")

DIGEST_RE = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
DOMAIN_RE = re.compile(r"^(localhost|\[[0-9a-fA-F:]+\]|[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+|[A-Za-z0-9-]+)(:[0-9]+)?$")
REPO_RE = re.compile(r"^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*$")
TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
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
    if "manifest.json" not in _TarFS(path, f"docker-archive:{rest}").names:
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
        if "index.json" not in _TarFS(path, label).names:
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
    if not tarfile.is_tarfile(p):
        raise SourceError(f"{p}: not a directory or a tar file; {KINDS_HINT}")
    names = _TarFS(p, str(p)).names
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

    @property
    def api_host(self) -> str:
        return "registry-1.docker.io" if self.host == "docker.io" else self.host

    @property
    def reference(self) -> str:
        return self.digest or self.tag or "latest"


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
    if not tag and not digest:
        tag = "latest"
    return RegistryRef(host, repo, tag, digest or None)


def _resolve_registry(rest: str) -> SourceSpec:
    return SourceSpec("registry", str(parse_registry_ref(rest.strip())))


# -- open ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def open_image(spec: SourceSpec) -> Iterator[ImageSource]:
    """Open a resolved source; temporary files and connections go away on exit."""
    label = str(spec)
    with contextlib.ExitStack() as stack:
        if spec.kind == "docker-archive":
            path, ref = _split_path_ref(spec.location)
            yield _docker_archive(_TarFS(path, label), label, ref)
        elif spec.kind == "oci":
            path, ref = _split_path_ref(spec.location)
            fs = _DirFS(path, label) if path.is_dir() else _TarFS(path, label)
            yield _oci_layout(fs, label, ref)
        elif spec.kind == "registry":
            reg = stack.enter_context(contextlib.closing(_Registry(parse_registry_ref(spec.location), label)))
            yield reg.image()
        elif spec.kind in ("docker-daemon", "dockerfile"):
            client = stack.enter_context(_docker_client(label))
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="thaw-docker-")))
            image_id = (_docker_build(client, Path(spec.location), label) if spec.kind == "dockerfile"
                        else spec.location)
            archive = _docker_save(client, image_id, tmp / "image.tar", label)
            yield _docker_archive(_TarFS(archive, label), label, None)
        elif spec.kind == "dir":
            raise SourceError(f"{label}: a directory has no layers; ingest it with ingest_directory")
        else:
            raise SourceError(f"{label}: unknown source kind {spec.kind!r}")


def _json(data: bytes, what: str):
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise SourceError(f"{what} is not valid JSON ({e})") from None


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


def _small_config(doc) -> dict:
    cfg = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(cfg, dict):
        return {}
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
        b[:len(data)] = data
        return len(data)

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
    try:
        import zstandard
    except ImportError:
        raise SourceError(f"{what} is zstd-compressed: install the zstandard module where the worker runs "
                          f"(pip install zstandard)") from None
    return zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True, closefd=False)


class _Bounded(io.RawIOBase):
    """``size`` bytes of ``f`` from its current position."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.left = f, size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.left <= 0:
            return 0
        data = self.f.read(min(len(b), self.left))
        self.left -= len(data)
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self.f.close()
        super().close()


# -- file systems: a directory or a tar -------------------------------------------------------------------
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
        try:
            return open(self._path(name), "rb")
        except FileNotFoundError:
            raise SourceError(f"{self.label}: {name} is missing") from None

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            data = f.read(MAX_JSON + 1)
        if len(data) > MAX_JSON:
            raise SourceError(f"{self.label}: {name} is over {MAX_JSON} bytes")
        return data


class _TarFS:
    """Random access to the members of an uncompressed tar (``docker save`` output, OCI archives)."""

    def __init__(self, path: Path, label: str):
        self.path, self.label = Path(path), label
        try:
            with tarfile.open(self.path, "r:") as tf:
                members = tf.getmembers()
        except tarfile.ReadError as e:
            hint = "; decompress it first" if "compress" in str(e) or self._compressed() else ""
            raise SourceError(f"{label}: not a readable tar file ({e}){hint}") from None
        except OSError as e:
            raise SourceError(f"{label}: cannot read {self.path}: {e.strerror or e}") from None
        self.members = {}
        for m in members:
            name = posixpath.normpath(m.name.lstrip("/")) if m.name not in ("", ".", "./") else ""
            self.members[name] = m
        self.names = set(self.members)

    def _compressed(self) -> bool:
        with open(self.path, "rb") as f:
            return f.read(4).startswith((GZIP_MAGIC, ZSTD_MAGIC))

    def _member(self, name: str) -> tarfile.TarInfo:
        name = posixpath.normpath(name)
        for _ in range(16):
            m = self.members.get(name)
            if m is None:
                raise SourceError(f"{self.label}: {name} is missing from the archive")
            if m.issym():
                name = posixpath.normpath(posixpath.join(posixpath.dirname(name), m.linkname))
            elif m.islnk():
                name = posixpath.normpath(m.linkname)
            elif m.isreg() and not m.issparse():
                return m
            else:
                raise SourceError(f"{self.label}: {name} is not a regular file in the archive")
        raise SourceError(f"{self.label}: too many links at {name}")

    def exists(self, name: str) -> bool:
        return posixpath.normpath(name) in self.members

    def size(self, name: str) -> int:
        return self._member(name).size

    def open(self, name: str) -> BinaryIO:
        m = self._member(name)
        f = open(self.path, "rb")
        f.seek(m.offset_data)
        return _Bounded(f, m.size)

    def read(self, name: str) -> bytes:
        if self.size(name) > MAX_JSON:
            raise SourceError(f"{self.label}: {name} is over {MAX_JSON} bytes")
        with self.open(name) as f:
            return f.read()


# -- docker-archive ----------------------------------------------------------------------------------------
def _docker_archive(fs: _TarFS, label: str, ref: str | None) -> ImageSource:
    if not fs.exists("manifest.json"):
        raise SourceError(f"{label}: not a docker-archive (no manifest.json); give a `docker save` tar")
    entries = _json(fs.read("manifest.json"), f"{label}: manifest.json")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise SourceError(f"{label}: manifest.json lists no images")
    tags = [t for e in entries for t in (e.get("RepoTags") or [])]
    if ref:
        want = {ref, f"{ref}:latest"}
        picked = [e for e in entries if want & set(e.get("RepoTags") or [])]
        if not picked:
            raise SourceError(f"{label}: no image tagged {ref!r} in the archive (has: {', '.join(tags) or 'none'})")
        entry = picked[0]
    elif len(entries) == 1:
        entry = entries[0]
    else:
        raise SourceError(f"{label}: the archive holds {len(entries)} images; pick one with "
                          f"docker-archive:PATH:TAG (tags: {', '.join(tags) or 'none'})")
    config_name, layer_names = entry.get("Config"), entry.get("Layers")
    if not isinstance(config_name, str) or not isinstance(layer_names, list):
        raise SourceError(f"{label}: manifest.json entry has no Config or Layers")
    config = _json(fs.read(config_name), f"{label}: {config_name}")
    diff_ids = ((config.get("rootfs") or {}).get("diff_ids") or []) if isinstance(config, dict) else []
    if diff_ids and len(diff_ids) != len(layer_names):
        raise SourceError(f"{label}: config lists {len(diff_ids)} layers but the manifest {len(layer_names)}")
    layers = []
    for i, name in enumerate(layer_names):
        if not isinstance(name, str):
            raise SourceError(f"{label}: bad layer entry {name!r} in manifest.json")
        layers.append(Layer(_archive_layer_digest(fs, name, diff_ids[i] if diff_ids else None, label),
                            fs.size(name), MT_TAR, functools.partial(fs.open, name), label))
    return ImageSource(ref=label + (f":{ref}" if ref else ""), config=_small_config(config), layers=layers)


def _archive_layer_digest(fs: _TarFS, name: str, diff_id, label: str) -> str:
    """The digest to verify a docker-archive layer file against.

    ``blobs/sha256/<hex>`` is content-addressed; an uncompressed legacy ``<id>/layer.tar`` must hash to its
    config ``diff_id``; anything else (a compressed legacy layer) is hashed up front, which at least pins
    the bytes read later to those seen now.
    """
    m = re.search(r"(?:^|/)(sha256|sha512)/([0-9a-f]{64,128})$", name)
    if m and DIGEST_RE.match(f"{m[1]}:{m[2]}"):
        return f"{m[1]}:{m[2]}"
    with fs.open(name) as f:
        magic = f.read(4)
        if diff_id is not None and not magic.startswith((GZIP_MAGIC, ZSTD_MAGIC)):
            return _check_digest(diff_id, f"{label}: config diff_id")
        h = hashlib.sha256(magic)
        while data := f.read(1 << 20):
            h.update(data)
    return f"sha256:{h.hexdigest()}"


# -- OCI image layout --------------------------------------------------------------------------------------
def _blob_path(digest: str, what: str) -> str:
    alg, _, hexd = _check_digest(digest, what).partition(":")
    return f"blobs/{alg}/{hexd}"


def _oci_layout(fs, label: str, ref: str | None) -> ImageSource:
    if not fs.exists("index.json"):
        raise SourceError(f"{label}: not an OCI image layout (no index.json)")
    index = _json(fs.read("index.json"), f"{label}: index.json")
    descs = [d for d in (index.get("manifests") or []) if isinstance(d, dict)] if isinstance(index, dict) else []
    names = [n for d in descs if (n := (d.get("annotations") or {}).get(REF_NAME))]
    if ref:
        picked = [d for d in descs if (d.get("annotations") or {}).get(REF_NAME) == ref or d.get("digest") == ref]
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
        p = d.get("platform") or {}
        if p.get("os") == "unknown" or (d.get("annotations") or {}).get("vnd.docker.reference.type"):
            continue  # attestations and other non-images
        seen.append("/".join(x for x in (p.get("os"), p.get("architecture"), p.get("variant")) if x))
        if p.get("os") == "linux" and p.get("architecture") == arch:
            matches.append(d)
    if variant:
        matches.sort(key=lambda d: (d.get("platform") or {}).get("variant") != variant)
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
            desc = _pick_platform([d for d in doc.get("manifests") or [] if isinstance(d, dict)], label)
            continue
        return digest, doc
    raise SourceError(f"{label}: image indexes nest too deep")


def _image_from_manifest(doc: dict, fetch: Callable[[str], bytes], open_blob: Callable[[str], BinaryIO],
                         label: str, ref: str) -> ImageSource:
    cdesc = doc.get("config")
    if not isinstance(cdesc, dict):
        raise SourceError(f"{label}: image manifest has no config")
    config = _json(fetch(_check_digest(cdesc.get("digest"), f"{label}: config")), f"{label}: image config")
    layers = []
    for ldesc in doc.get("layers") or []:
        if not isinstance(ldesc, dict):
            raise SourceError(f"{label}: bad layer descriptor {ldesc!r}")
        digest = _check_digest(ldesc.get("digest"), f"{label}: layer")
        mt = ldesc.get("mediaType") or MT_TAR
        if "encrypted" in mt:
            raise SourceError(f"{label}: layer {digest} is encrypted ({mt}); decrypt the image first")
        size = ldesc.get("size")
        layers.append(Layer(digest, size if isinstance(size, int) else None, mt,
                            functools.partial(open_blob, digest), label))
    return ImageSource(ref=ref, config=_small_config(config), layers=layers)


# -- registry (Docker Registry HTTP API v2) ----------------------------------------------------------------
def _insecure(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if name in ("localhost", "127.0.0.1", "[::1]") or name.startswith("127."):
        return True
    listed = {h.strip() for h in os.environ.get("THAW_INSECURE_REGISTRIES", "").split(",") if h.strip()}
    return host in listed or name in listed


def _credentials(host: str) -> tuple[str, str] | None:
    """THAW_REGISTRY_USERNAME (or _USER) / THAW_REGISTRY_PASSWORD, else ~/.docker/config.json ``auths``."""
    user = os.environ.get("THAW_REGISTRY_USERNAME") or os.environ.get("THAW_REGISTRY_USER")
    if user:
        return user, os.environ.get("THAW_REGISTRY_PASSWORD", "")
    cfg_dir = Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker")
    try:
        auths = json.loads((cfg_dir / "config.json").read_text()).get("auths") or {}
    except (OSError, ValueError, AttributeError):
        return None
    keys = [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"http://{host}/v1/"]
    if host == "docker.io":
        keys += ["https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io"]
    for k in keys:
        entry = auths.get(k)
        if not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            with contextlib.suppress(ValueError):
                u, _, p = base64.b64decode(entry["auth"]).decode().partition(":")
                return u, p
        if entry.get("username"):
            return entry["username"], entry.get("password", "")
    return None


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', rest))
    params.update({k: v for k, v in re.findall(r'(\w+)\s*=\s*([^",\s]+)', rest) if k not in params})
    return scheme.lower(), params


def _net_reason(e: Exception) -> str:
    text = str(e)
    m = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text) or re.search(r"Error\(-?\d+, '([^']+)'", text)
    if m:
        return m.group(1).strip()
    for word in ("timed out", "Connection refused", "Name or service not known", "certificate verify failed"):
        if word in text:
            return word
    return text.splitlines()[0][:200] if text else type(e).__name__


class _HTTPBody(io.RawIOBase):
    def __init__(self, resp):
        self.resp = resp

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.resp.raw.read(len(b), decode_content=False)
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self.resp.close()
        super().close()


class _Registry:
    def __init__(self, ref: RegistryRef, label: str):
        import requests

        self.requests = requests
        self.ref, self.label = ref, label
        scheme = "http" if _insecure(ref.host) else "https"
        self.base = f"{scheme}://{ref.api_host}/v2/{ref.repo}"
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "thaw"
        self.creds = _credentials(ref.host)
        self.auth: str | None = None

    def close(self) -> None:
        self.session.close()

    def _get(self, path: str, accept: str | None = None, stream: bool = False):
        requests = self.requests
        url = f"{self.base}/{path}"
        for attempt in range(2):
            headers = {"Accept": accept} if accept else {}
            if self.auth:
                headers["Authorization"] = self.auth
            try:
                r = self.session.get(url, headers=headers, stream=stream, timeout=(15, 300))
            except requests.exceptions.SSLError as e:
                raise SourceError(f"{self.label}: TLS with registry {self.ref.host} failed ({_net_reason(e)}); "
                                  f"for a plain-HTTP registry add it to THAW_INSECURE_REGISTRIES") from None
            except requests.ConnectionError as e:
                raise SourceError(f"{self.label}: registry {self.ref.host} unreachable: {_net_reason(e)}; "
                                  f"check the address and that the registry runs") from None
            except requests.Timeout as e:
                raise SourceError(f"{self.label}: registry {self.ref.host} timed out: {_net_reason(e)}") from None
            if r.status_code == 401 and attempt == 0:
                challenge = r.headers.get("WWW-Authenticate", "")
                r.close()
                self._authenticate(challenge)
                continue
            return r
        return r

    def _authenticate(self, challenge: str) -> None:
        requests = self.requests
        scheme, params = _parse_challenge(challenge)
        who = f"user {self.creds[0]!r}" if self.creds else "anonymous access"
        if scheme == "basic":
            if not self.creds:
                raise SourceError(f"{self.label}: registry {self.ref.host} needs credentials; set "
                                  f"THAW_REGISTRY_USERNAME and THAW_REGISTRY_PASSWORD (or docker login)")
            self.auth = "Basic " + base64.b64encode(":".join(self.creds).encode()).decode()
            return
        if scheme != "bearer" or "realm" not in params:
            raise SourceError(f"{self.label}: registry {self.ref.host} asks for unsupported auth {challenge!r}")
        query = {"scope": params.get("scope") or f"repository:{self.ref.repo}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        realm = params["realm"]
        try:
            r = requests.get(realm, params=query, auth=self.creds, timeout=(15, 60))
        except requests.RequestException as e:
            raise SourceError(f"{self.label}: token server {realm} unreachable: {_net_reason(e)}") from None
        with contextlib.closing(r):
            if r.status_code in (401, 403):
                raise SourceError(f"{self.label}: token server {realm} refused {who} (HTTP {r.status_code}); "
                                  f"check THAW_REGISTRY_USERNAME / THAW_REGISTRY_PASSWORD")
            if r.status_code != 200:
                raise SourceError(f"{self.label}: token server {realm} answered HTTP {r.status_code}")
            try:
                body = r.json()
            except ValueError:
                body = {}
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not token:
            raise SourceError(f"{self.label}: token server {realm} returned no token")
        self.auth = f"Bearer {token}"

    def _check(self, r, what: str) -> None:
        if r.status_code == 200:
            return
        try:
            errors = r.json().get("errors") or []
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict))
        except Exception:
            detail = ""
        r.close()
        detail = f" ({detail})" if detail else ""
        who = f" as {self.creds[0]!r}" if self.creds else " (anonymous)"
        if r.status_code == 404:
            raise SourceError(f"{self.label}: {what} not found in registry {self.ref.host}{detail}; "
                              f"check the repository and tag")
        if r.status_code in (401, 403):
            raise SourceError(f"{self.label}: registry {self.ref.host} denied access{who} (HTTP {r.status_code})"
                              f"{detail}; check THAW_REGISTRY_USERNAME / THAW_REGISTRY_PASSWORD and that the "
                              f"repository exists")
        if r.status_code >= 500 or r.status_code == 429:  # transient: let the activity retry
            raise RuntimeError(f"{self.label}: registry {self.ref.host} answered HTTP {r.status_code}{detail}")
        raise SourceError(f"{self.label}: registry {self.ref.host} answered HTTP {r.status_code} for {what}{detail}")

    def manifest(self, reference: str) -> bytes:
        r = self._get(f"manifests/{reference}", accept=ACCEPT)
        self._check(r, f"manifest {reference}")
        with contextlib.closing(r):
            data = r.content
        if len(data) > MAX_JSON:
            raise SourceError(f"{self.label}: manifest {reference} is over {MAX_JSON} bytes")
        if DIGEST_RE.match(reference):
            _verify(data, reference, f"{self.label}: manifest")
        return data

    def open_blob(self, digest: str) -> BinaryIO:
        r = self._get(f"blobs/{digest}", stream=True)
        self._check(r, f"blob {digest}")
        return _HTTPBody(r)

    def blob(self, digest: str) -> bytes:
        with self.open_blob(digest) as f:
            data = f.read(MAX_JSON + 1)
        if len(data) > MAX_JSON:
            raise SourceError(f"{self.label}: blob {digest} is over {MAX_JSON} bytes")
        return _verify(data, digest, f"{self.label}: blob {digest}")

    def image(self) -> ImageSource:
        top = self.manifest(self.ref.reference)
        top_digest = self.ref.digest or f"sha256:{hashlib.sha256(top).hexdigest()}"
        fetched = {top_digest: top}

        def fetch(digest: str) -> bytes:
            return fetched.pop(digest, None) or self.manifest(digest)

        digest, doc = _resolve_manifest({"digest": top_digest}, fetch, self.label)
        return _image_from_manifest(doc, self.blob, self.open_blob, self.label,
                                    f"{self.ref.host}/{self.ref.repo}@{digest}")


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
                          f"({_net_reason(e)})") from None
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


def _docker_save(client, name: str, dest: Path, label: str) -> Path:
    import docker

    try:
        image = client.images.get(name)
    except docker.errors.ImageNotFound:
        raise SourceError(f"{label}: no such image in the Docker daemon; pull or build it first") from None
    except docker.errors.APIError as e:
        raise SourceError(f"{label}: docker could not find the image: {_one_line(e.explanation or e)}") from None
    try:
        with _keepalive("docker save"), open(dest, "wb") as f:
            for chunk in image.save(chunk_size=1 << 20, named=False):
                f.write(chunk)
    except docker.errors.APIError as e:
        raise SourceError(f"{label}: docker save failed: {_one_line(e.explanation or e)}") from None
    return dest
