"""Image manifest: the file tree of an image, small, canonical JSON, addressed by its blake3 digest."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterator

from .store import ChunkStore, digest_of

FORMAT_VERSION = 1

# entry types
DIR, REG, SYMLINK, FIFO, CHR, BLK = "dir", "reg", "sym", "fifo", "chr", "blk"
TYPES = (DIR, REG, SYMLINK, FIFO, CHR, BLK)

# OCI config keys kept in the manifest (what a launcher needs)
CONFIG_KEYS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User", "ExposedPorts", "Labels", "StopSignal")
_STRINGS, _STRING, _OBJECT = "a list of strings", "a string", "a JSON object"
CONFIG_TYPES = {"Env": _STRINGS, "Cmd": _STRINGS, "Entrypoint": _STRINGS, "WorkingDir": _STRING, "User": _STRING,
                "StopSignal": _STRING, "ExposedPorts": _OBJECT, "Labels": _OBJECT, "Volumes": _OBJECT}


def config_errors(config: dict) -> list[str]:
    """What in an image config (its OCI ``config`` object) has the wrong type, as "Key: want ..." strings: a
    ``"Cmd": "python app.py"`` would otherwise run as the program "p" with arguments "y", "t", ...; Env entries
    without "=" are skipped where the config is used (``image_defaults``)."""
    bad = []
    for key, want in CONFIG_TYPES.items():
        v = config.get(key)
        if v is None:
            continue
        ok = {_STRINGS: isinstance(v, list) and all(isinstance(x, str) for x in v), _STRING: isinstance(v, str),
              _OBJECT: isinstance(v, dict)}[want]
        if not ok:
            bad.append(f"{key}: want {want}, got {json.dumps(v)[:60]}")
        elif want != _OBJECT and "\0" in (v if want == _STRING else "".join(v)):  # no exec() can pass one; an
            bad.append(f"{key}: a NUL character in {json.dumps(v)[:60]}")  # Env one would smuggle a variable
    return bad


@dataclass(slots=True)
class Entry:
    path: str  # relative to the image root, no leading "/", "" is the root directory
    type: str
    mode: int = 0o755  # permission bits including setuid/setgid/sticky
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    target: str | None = None  # symlink target
    hardlink: str | None = None  # path of the entry this one shares an inode with
    rdev: int | None = None  # device number for chr/blk
    xattrs: dict[str, str] | None = None  # name -> base64 value
    chunks: list[list] = field(default_factory=list)  # [[digest, size], ...] for reg files

    def to_dict(self) -> dict:
        return {k: v for k in self.__slots__ if (v := getattr(self, k)) is not None and v != [] and v != {}}

    @classmethod
    def from_dict(cls, d: dict) -> "Entry":
        return cls(**d)


@dataclass
class ImageManifest:
    entries: list[Entry]
    config: dict = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def to_bytes(self) -> bytes:
        body = {
            "version": self.version,
            "config": self.config,
            "entries": [e.to_dict() for e in sorted(self.entries, key=lambda e: e.path)],
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @property
    def digest(self) -> str:
        return digest_of(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> "ImageManifest":
        body = json.loads(data)
        version = body.get("version") if isinstance(body, dict) else None
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported manifest version {version!r}")
        try:
            return cls([Entry.from_dict(e) for e in body["entries"]], body.get("config", {}), body["version"])
        except (KeyError, TypeError, AttributeError) as e:  # a manifest of this version always parses: not ours
            raise ValueError(f"malformed manifest ({type(e).__name__}: {e})") from None

    @classmethod
    def load(cls, store: ChunkStore, digest: str) -> "ImageManifest":
        return cls.from_bytes(store.get_manifest_bytes(digest))

    def save(self, store: ChunkStore) -> str:
        digest, _ = store.put_manifest_bytes(self.to_bytes())
        return digest

    def files(self) -> Iterator[Entry]:
        return (e for e in self.entries if e.type == REG)

    def chunk_digests(self) -> set[str]:
        return {c[0] for e in self.files() for c in e.chunks}

    @property
    def size(self) -> int:
        """Bytes of file content, each inode counted once."""
        return sum(e.size for e in self.files() if not e.hardlink)

    def stats(self) -> dict:
        return {
            "entries": len(self.entries),
            "files": sum(1 for _ in self.files()),
            "size": self.size,
            "chunks": len(self.chunk_digests()),
        }
