"""Content-addressed chunk store.

Objects are addressed by the blake3 hex digest of their content. Chunks are at most ``chunk_size`` bytes
(4 MiB); manifests are stored zlib-compressed under the digest of their uncompressed bytes. Every read is
verified. Writes are atomic (temp file + rename), so a crash never leaves a partial object under its final
name. Builds write into a :class:`Staging` area first and :meth:`Staging.commit_chunks` moves the objects to their
final names and syncs the filesystem once, so nothing is visible (or registered) half-done.

Tiers are tried in order on reads (memory → disk → S3 in later issues); a corrupt copy in one tier is
dropped and the next tier is asked; a hit in a later tier is copied into the earlier ones.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Iterator, Protocol

import blake3

log = logging.getLogger(__name__)

CHUNKS = "chunks"
MANIFESTS = "manifests"


class StoreError(Exception):
    """A store problem the user can act on."""


class MissingObject(StoreError):
    pass


class CorruptObject(StoreError):
    pass


def digest_of(data: bytes | memoryview) -> str:
    return blake3.blake3(data).hexdigest()


_DIGEST = re.compile(r"[0-9a-f]{64}")


def _key(kind: str, digest: str) -> str:
    if not _DIGEST.fullmatch(digest):
        raise StoreError(f"not a blake3 digest: {digest!r}")
    return f"{kind}/{digest[:2]}/{digest}"


class Tier(Protocol):
    name: str

    def has(self, key: str) -> bool: ...
    def get(self, key: str) -> bytes | None: ...
    def put(self, key: str, data: bytes) -> bool: ...
    def put_file(self, key: str, path: Path) -> bool: ...
    def delete(self, key: str) -> None: ...
    def usage(self) -> tuple[int, int]: ...


def _syncfs(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs failed", str(path))
    finally:
        os.close(fd)


class LocalDirTier:
    """Objects as files under ``root/<kind>/<ab>/<digest>``."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.name = f"local:{self.root}"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / key

    def has(self, key: str) -> bool:
        return self.path(key).exists()

    def get(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, key: str, data: bytes) -> bool:
        if self.has(key):
            return False
        fd, tmp = tempfile.mkstemp(dir=self.tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return self.put_file(key, Path(tmp))

    def put_file(self, key: str, path: Path) -> bool:
        """Move ``path`` (on the same filesystem) to ``key`` atomically; False if it already existed."""
        dest = self.path(key)
        if dest.exists():
            path.unlink(missing_ok=True)
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
        return True

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def sync(self) -> None:
        _syncfs(self.root)

    def usage(self) -> tuple[int, int]:
        count = size = 0
        for kind in (CHUNKS, MANIFESTS):
            base = self.root / kind
            if not base.exists():
                continue
            for sub in os.scandir(base):
                for e in os.scandir(sub.path):
                    count += 1
                    size += e.stat().st_size
        return count, size


class ChunkStore:
    def __init__(self, tiers: list[Tier], *, chunk_size: int = 4 << 20):
        if not tiers:
            raise ValueError("a store needs at least one tier")
        self.tiers = tiers
        self.chunk_size = chunk_size

    @classmethod
    def open(cls, cfg) -> "ChunkStore":
        return cls([LocalDirTier(cfg.store_dir)], chunk_size=cfg.chunk_size)

    @property
    def local(self) -> LocalDirTier:
        return next(t for t in self.tiers if isinstance(t, LocalDirTier))

    # -- reads -------------------------------------------------------------------------------
    def _get_verified(self, kind: str, digest: str, decode=lambda b: b) -> bytes:
        key = _key(kind, digest)
        missed: list[Tier] = []
        for tier in self.tiers:
            raw = tier.get(key)
            if raw is None:
                missed.append(tier)
                continue
            try:
                data = decode(raw)
            except zlib.error:
                data = None
            if data is None or digest_of(data) != digest:
                log.warning("corrupt %s in %s: dropped", key, tier.name)
                tier.delete(key)
                missed.append(tier)
                continue
            for t in missed:  # heal / fill faster tiers
                t.put(key, raw)
            return data
        if any(t.has(key) for t in self.tiers):  # pragma: no cover - race
            raise CorruptObject(f"{kind[:-1]} {digest} is corrupt")
        raise MissingObject(f"{kind[:-1]} {digest} is not in the store ({', '.join(t.name for t in self.tiers)})")

    def get_chunk(self, digest: str) -> bytes:
        return self._get_verified(CHUNKS, digest)

    def get_manifest_bytes(self, digest: str) -> bytes:
        return self._get_verified(MANIFESTS, digest, zlib.decompress)

    def has_chunk(self, digest: str) -> bool:
        key = _key(CHUNKS, digest)
        return any(t.has(key) for t in self.tiers)

    def has_manifest(self, digest: str) -> bool:
        key = _key(MANIFESTS, digest)
        return any(t.has(key) for t in self.tiers)

    # -- writes ------------------------------------------------------------------------------
    def put_chunk(self, data: bytes) -> tuple[str, bool]:
        if len(data) > self.chunk_size:
            raise StoreError(f"chunk of {len(data)} bytes exceeds {self.chunk_size}")
        digest = digest_of(data)
        new = False
        for t in self.tiers:
            new = t.put(_key(CHUNKS, digest), data) or new
        return digest, new

    def put_manifest_bytes(self, data: bytes) -> tuple[str, bool]:
        digest = digest_of(data)
        packed = zlib.compress(data, 6)
        new = False
        for t in self.tiers:
            new = t.put(_key(MANIFESTS, digest), packed) or new
        return digest, new

    def sync(self) -> None:
        for t in self.tiers:
            sync = getattr(t, "sync", None)
            if sync:
                sync()

    def usage(self) -> tuple[int, int]:
        return self.local.usage()

    def staging(self, txn_id: str) -> "Staging":
        return Staging(self, txn_id)


class Staging:
    """A build's private area: chunks land here and become visible only on :meth:`commit_chunks`.

    Keyed by ``txn_id`` (the build's workflow id), so a retried activity reuses or discards it.
    """

    def __init__(self, store: ChunkStore, txn_id: str):
        if not txn_id or "/" in txn_id or txn_id.startswith("."):
            raise StoreError(f"bad staging id {txn_id!r}")
        self.store = store
        self.dir = store.local.root / "staging" / txn_id
        self.new_chunks = 0
        self.new_bytes = 0

    def reset(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.new_chunks = self.new_bytes = 0

    def exists(self) -> bool:
        return self.dir.is_dir()

    def put_chunk(self, data: bytes | memoryview) -> str:
        """Hash ``data``; stage it unless the store (or this staging area) already holds it."""
        if len(data) > self.store.chunk_size:
            raise StoreError(f"chunk of {len(data)} bytes exceeds {self.store.chunk_size}")
        digest = digest_of(data)
        staged = self.dir / digest
        if staged.exists() or self.store.has_chunk(digest):
            return digest
        # written straight under its digest: staging is private, reset by every (re)try before use, and
        # committed only after the whole ingest finished, so a torn write here is never committed
        with open(staged, "wb") as f:
            f.write(data)
        self.new_chunks += 1
        self.new_bytes += len(data)
        return digest

    def staged(self) -> Iterator[Path]:
        for e in os.scandir(self.dir):
            if not e.name.startswith("."):
                yield Path(e.path)

    def commit_chunks(self) -> tuple[int, int]:
        """Move staged chunks to their final names (skipping ones already there) and sync.

        Returns (chunks, bytes) newly stored. Safe to repeat; :meth:`abort` removes what is left."""
        count = size = 0
        if self.exists():
            for p in self.staged():
                n = p.stat().st_size
                key = _key(CHUNKS, p.name)
                # other tiers (S3) receive a copy before the local tier adopts the file
                for t in self.store.tiers:
                    if t is not self.store.local and not t.has(key):
                        t.put(key, p.read_bytes())
                if self.store.local.put_file(key, p):
                    count += 1
                    size += n
            self.store.sync()
        return count, size

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
