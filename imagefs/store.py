"""Content-addressed chunk store.

Objects are addressed by the blake3 hex digest of their content. Chunks are at most ``chunk_size`` bytes
(4 MiB); manifests are stored zlib-compressed under the digest of their uncompressed bytes. Every read is
verified. Writes are atomic (temp file + rename), so a crash never leaves a partial object under its final
name. Builds write into a :class:`Staging` area first and :meth:`Staging.commit_chunks` moves the objects to their
final names and syncs the filesystem once, so nothing is visible (or registered) half-done.

Tiers are tried in order on reads: memory → local disk → S3 (see :meth:`ChunkStore.open`). A corrupt copy in
one tier is dropped and the next tier is asked; a hit in a later tier is copied into the earlier ones. A
fetch from a remote tier holds a lock on the object's stripe of the local directory
(:meth:`LocalDirTier.fetch_lock`), so the processes of a host (the agent's prefetch, the FUSE daemons) fetch
each object once and the others find it on the disk. Nothing
enters a tier unverified: ``put_chunk``/``put_manifest_bytes`` address data by the digest they compute,
the heal path copies only verified bytes, and :meth:`Staging.commit_chunks` re-hashes each staged file before
it uploads it or adopts it.

Roles: the tiers before :attr:`ChunkStore.local` are caches filled by reads (memory); ``local`` is the
disk; the tiers after it are remote (S3). The last tier is the durable one, the source of truth: without a
remote tier that is the local directory (unbounded), with one it is S3 and the local directory becomes a
bounded cache (``LocalDirTier(max_bytes=...)``). Writes go to the remote tiers first (the durable one
first), then to ``local``, so with S3 configured a chunk is on the local disk only once S3 has it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import blake3

from thaw.files import write_atomic

log = logging.getLogger(__name__)

CHUNKS = "chunks"
HEADS_PER_LIST = 100  # missing_chunks lists S3 with at most one LIST call (1,000 keys) per this many HEADs
MANIFESTS = "manifests"


class StoreError(Exception):
    """A store problem the user can act on."""


class MissingObject(StoreError):
    pass


class CorruptObject(StoreError):
    pass


class StoreUnavailable(StoreError):
    """A remote tier did not answer (timeouts, refused connections, 5xx): transient, worth a retry."""


def digest_of(data: bytes | memoryview) -> str:
    return blake3.blake3(data).hexdigest()


_DIGEST = re.compile(r"[0-9a-f]{64}")


def check_digest(digest: str) -> str:
    """``digest`` if it is a blake3 digest (64 lowercase hex), else StoreError: it names files and objects."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise StoreError(f"not a blake3 digest: {digest!r}")
    return digest


def _key(kind: str, digest: str) -> str:
    return f"{kind}/{digest[:2]}/{check_digest(digest)}"


def _decoded(raw: bytes, digest: str, decode=lambda b: b, check: bool = True) -> bytes | None:
    """``raw`` decoded, if it decodes and (with ``check``) has blake3 digest ``digest``; None if not."""
    try:
        data = decode(raw)
    except zlib.error:
        return None
    if data is None or (check and digest_of(data) != digest):
        return None
    return data


class Tier(Protocol):
    """Bytes under keys. ``put``/``put_file`` return False when the key was already there. ``put_file``
    moves the file into a :class:`LocalDirTier` and copies it into any other tier."""

    name: str

    def has(self, key: str) -> bool: ...
    def get(self, key: str) -> bytes | None: ...
    def put(self, key: str, data: bytes) -> bool: ...
    def put_file(self, key: str, path: Path) -> bool: ...
    def delete(self, key: str) -> None: ...
    def usage(self) -> tuple[int, int]: ...
    def forget(self) -> None: ...  # drop anything remembered about what the tier holds (not the objects)


QUARANTINE = "quarantine"  # objects found corrupt twice in the durable tier, set aside (not deleted)
BACKED_BY = "backed-by"  # in a store's local dir: the durable tier that has every object of it


def syncfs(path: Path) -> None:
    """Write out the dirty data of the filesystem holding ``path`` (one call for a tree of many files)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs failed", str(path))
    finally:
        os.close(fd)


def _touch_file(path: Path) -> None:
    now = time.time_ns()  # finer than the kernel's coarse clock that os.utime(path) would use
    os.utime(path, ns=(now, now))


class LocalDirTier:
    """Objects as files under ``root/<kind>/<ab>/<digest>``.

    Unbounded by default: then it is the store's source of truth. With ``max_bytes`` (only when a remote tier
    holds everything) it is a cache: when chunks beyond ``max_bytes`` are stored, the least recently used
    chunks are deleted. Recency is the file's mtime (set when an object is stored, touched on every read),
    mirrored in an in-memory LRU index built lazily from one directory scan, so a restart and other processes
    sharing the directory see the same order; each process enforces the bound on its index and rescans the
    directory (at most every ``rescan_s``) before evicting, to count what other processes added. Manifests
    are never evicted and do not count against the bound: they are small and every image a host runs needs
    its manifest. Evicting a file another thread is reading is harmless (the reader has it open, or gets a
    miss and asks the next tier). Thread-safe.
    """

    def __init__(self, root: Path | str, max_bytes: int | None = None, *, rescan_s: float = 30.0):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.rescan_s = rescan_s
        bound = f" (cache, {max_bytes >> 20} MiB)" if max_bytes is not None else ""
        self.name = f"local:{self.root}{bound}"
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)  # image files (secrets, setuid programs) and snapshots' process memory
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, int] | None = None  # chunk key -> size, least recently used first
        self._lru_bytes = 0
        self._scanned = 0.0
        self.evicted = 0  # chunks evicted by this process

    def path(self, key: str) -> Path:
        return self.root / key

    @contextlib.contextmanager
    def fetch_lock(self, key: str):
        """Held while ``key`` is fetched from a remote tier into this directory: an exclusive ``flock`` on one
        of 4096 stripe files (by the digest's first three hex digits), which excludes the other processes and
        threads of this host that use the same directory (each call opens its own file description)."""
        d, fd = self.root / "locks", None
        try:
            d.mkdir(exist_ok=True)
            fd = os.open(d / key.rsplit("/", 1)[-1][:3], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:  # a read-only or failing disk: fetch anyway (maybe twice), rather than not at all
            log.warning("%s: fetching %s without the host's lock: %s", self.name, key, e)
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            if fd is not None:
                os.close(fd)  # releases the lock

    def has(self, key: str) -> bool:
        """An object of the store is never empty: an empty file is one a crash cut short before ``syncfs``."""
        try:
            return self.path(key).stat().st_size > 0
        except FileNotFoundError:
            return False

    def get(self, key: str) -> bytes | None:
        try:
            data = self.path(key).read_bytes()
        except FileNotFoundError:
            return None
        if self._bounded(key):
            self._touch(key, len(data))
        return data

    def put(self, key: str, data: bytes) -> bool:
        if self.has(key):
            return False
        fd, tmp = tempfile.mkstemp(dir=self.tmp)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return self.put_file(key, Path(tmp))
        finally:
            Path(tmp).unlink(missing_ok=True)

    def put_file(self, key: str, path: Path) -> bool:
        """Move ``path`` (on the same filesystem) to ``key`` atomically; False if it already existed."""
        dest = self.path(key)
        if self.has(key):  # not an empty file a crash left (has() calls it absent: replace it, or it stays absent)
            path.unlink(missing_ok=True)
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
        if self._bounded(key):
            with self._lock:
                try:
                    _touch_file(dest)  # recency = stored now, not when the staged file was written
                    size = dest.stat().st_size
                except FileNotFoundError:  # pragma: no cover - evicted by another process already
                    return True
                self._index_add(key, size)
                self._evict(keep=key)
        return True

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)
        if self._bounded(key):
            with self._lock:
                if self._lru is not None and key in self._lru:
                    self._lru_bytes -= self._lru.pop(key)

    def quarantine(self, key: str) -> str:
        """Move the object to ``quarantine/<key>`` and return that key, as the S3 tier does: out of readers'
        way (a build stores it again) and out of gc's, for an operator to look at or move back."""
        aside = f"{QUARANTINE}/{key}"
        self.path(aside).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # another reader on this host set it aside first
            os.replace(self.path(key), self.path(aside))
        return aside

    def sync(self) -> None:
        syncfs(self.root)

    def backed_by(self, name: str) -> bool:
        """Whether every object here is also in tier ``name`` (the S3 tier), so that evicting loses nothing:
        true once :meth:`ChunkStore.push` marked it so, or when the directory holds no object yet."""
        marker = self.root / BACKED_BY
        with contextlib.suppress(OSError):
            if marker.read_text() == name:
                return True
        if next(self._stats(), None) is not None:  # objects of a store that ran without this tier
            return False
        self.mark_backed(name)
        return True

    def mark_backed(self, name: str | None) -> None:
        """Record that tier ``name`` has every object here (None: forget it)."""
        if name is None:
            with contextlib.suppress(OSError):  # a read-only disk: nothing gets stored here either
                (self.root / BACKED_BY).unlink(missing_ok=True)
        else:
            write_atomic(self.root / BACKED_BY, name)

    def _stats(self, kinds: tuple[str, ...] = (CHUNKS, MANIFESTS)):
        """(key, stat) of every object of these kinds."""
        for kind in kinds:
            base = self.root / kind
            if not base.is_dir():
                continue
            for sub in os.scandir(base):
                if not sub.is_dir():
                    continue
                for e in os.scandir(sub.path):
                    try:
                        st = e.stat()
                    except FileNotFoundError:  # deleted or evicted meanwhile
                        continue
                    yield f"{kind}/{sub.name}/{e.name}", st

    def entries(self) -> list[tuple[str, int, float]]:
        """(key, size, mtime in epoch seconds) of every chunk and manifest."""
        return [(key, st.st_size, st.st_mtime) for key, st in self._stats()]

    def usage(self) -> tuple[int, int]:
        objects = self.entries()
        return len(objects), sum(n for _, n, _ in objects)

    def forget(self) -> None:
        """Nothing to forget: every ``has`` looks at the directory."""

    # -- the bound (chunks only) ---------------------------------------------------------------
    def _bounded(self, key: str) -> bool:
        return self.max_bytes is not None and key.startswith(CHUNKS + "/")

    def cached_bytes(self) -> int:
        """Bytes of chunks the LRU index counts (what the bound applies to)."""
        with self._lock:
            self._index()
            return self._lru_bytes

    def _scan(self) -> None:
        items = sorted((st.st_mtime_ns, key, st.st_size) for key, st in self._stats((CHUNKS,)))
        self._lru = OrderedDict((k, n) for _, k, n in items)
        self._lru_bytes = sum(n for _, _, n in items)
        self._scanned = time.monotonic()

    def _index(self) -> OrderedDict:
        if self._lru is None:
            self._scan()
        return self._lru

    def _index_add(self, key: str, size: int) -> None:
        lru = self._index()
        old = lru.pop(key, None)
        if old is not None:
            self._lru_bytes -= old
        lru[key] = size
        self._lru_bytes += size

    def _touch(self, key: str, size: int) -> None:
        with self._lock:
            try:
                _touch_file(self.path(key))
            except OSError:  # evicted meanwhile (or a read-only disk: the object is still good to read)
                return
            lru = self._index()
            if key in lru:
                lru.move_to_end(key)
            else:  # stored by another process since our scan
                self._index_add(key, size)

    def _evict(self, keep: str) -> None:
        if time.monotonic() - self._scanned > self.rescan_s:
            self._scan()  # what the host's other processes (mount daemons, the agent) stored or evicted
        if self._lru_bytes <= self.max_bytes:
            return
        lru = self._lru
        while self._lru_bytes > self.max_bytes and len(lru) > 1:
            key, size = lru.popitem(last=False)
            if key == keep:  # the newest object stays even when it alone is over the bound
                lru[key] = size
                continue
            self.path(key).unlink(missing_ok=True)
            self._lru_bytes -= size
            self.evicted += 1


class ChunkStore:
    def __init__(self, tiers: list[Tier], *, chunk_size: int = 4 << 20, upload_workers: int = 8):
        if not tiers:
            raise ValueError("a store needs at least one tier")
        self.tiers = tiers
        self.chunk_size = chunk_size
        self.upload_workers = upload_workers
        i = next((i for i, t in enumerate(tiers) if isinstance(t, LocalDirTier)), None)
        if i is None:
            raise ValueError("a store needs a LocalDirTier (staging and the disk cache live there)")
        self.local: LocalDirTier = tiers[i]
        self.front: list[Tier] = tiers[:i]  # caches in front of the disk, filled by reads
        self.remote: list[Tier] = tiers[i + 1:]  # behind the disk; the last one is the source of truth
        self.durable: Tier = tiers[-1]
        if not self.remote:  # objects stored from now on exist here only: a later S3 must get them pushed
            self.local.mark_backed(None)
        self._bound = self.local.max_bytes  # held back while the disk has objects the durable tier may lack:
        self.held_back = bool(self.remote) and self._bound is not None and not self.local.backed_by(self.durable.name)
        if self.held_back:
            log.warning("%s holds objects from before %s was configured: not evicting any until they are "
                        "pushed there (the host agent does that as it starts)", self.local.name, self.durable.name)
            self.local.max_bytes = None  # evicting the only copy of a chunk would lose it
        self._held_checked = time.monotonic()

    def _bound_again_once_pushed(self) -> None:
        """A store held back takes its bound back once the disk is marked backed, at most every ``rescan_s``:
        the agent's push marks it, while the mount daemons it started meanwhile fill the disk with fetches."""
        if not self.held_back or time.monotonic() - self._held_checked < self.local.rescan_s:
            return
        self._held_checked = time.monotonic()
        with contextlib.suppress(OSError):  # a failing disk: asked again later (a read from S3 must not fail)
            if self.local.backed_by(self.durable.name):
                self.local.max_bytes, self.held_back = self._bound, False

    @classmethod
    def open(cls, cfg) -> "ChunkStore":
        """The store ``cfg`` describes: [memory, local disk cache (bounded), S3] when ``s3_endpoint`` is
        set, else the local directory alone (unbounded: it is the source of truth, and the kernel's page
        cache already keeps its hot files in memory)."""
        endpoint = getattr(cfg, "s3_endpoint", None)
        if not endpoint:
            return cls([LocalDirTier(cfg.store_dir)], chunk_size=cfg.chunk_size)
        from .tiers import MemoryTier, S3Tier

        tiers: list[Tier] = []
        if cfg.memory_cache_bytes > 0:
            tiers.append(MemoryTier(cfg.memory_cache_bytes))
        tiers.append(LocalDirTier(cfg.store_dir, max_bytes=cfg.disk_cache_bytes))
        tiers.append(S3Tier.from_config(cfg))
        return cls(tiers, chunk_size=cfg.chunk_size, upload_workers=cfg.s3_upload_workers)

    # -- reads -------------------------------------------------------------------------------
    def _get_verified(self, kind: str, digest: str, decode=lambda b: b) -> bytes:
        key = _key(kind, digest)
        missed: list[Tier] = []
        dropped: list[str] = []
        local = self.tiers.index(self.local)
        data = self._first(key, digest, decode, self.tiers[:local + 1], missed, dropped)
        if data is None and self.remote:
            with self.local.fetch_lock(key):  # one fetch per object on this host; then the disk has it
                data = self._first(key, digest, decode, [self.local, *self.remote], missed, dropped)
        if data is not None:
            return data
        if dropped:
            raise CorruptObject(f"{kind[:-1]} {digest} was corrupt in {', '.join(dict.fromkeys(dropped))} "
                                f"and no other tier has it")
        if any(t.has(key) for t in self.tiers):  # pragma: no cover - race
            raise CorruptObject(f"{kind[:-1]} {digest} is corrupt")
        raise MissingObject(f"{kind[:-1]} {digest} is not in the store ({', '.join(t.name for t in self.tiers)})")

    def _first(self, key: str, digest: str, decode, tiers: list[Tier], missed: list[Tier],
               dropped: list[str] | None = None) -> bytes | None:
        """The verified object from the first of ``tiers`` that has it, copied into the tiers in ``missed``
        (which gains the tiers that lacked it or held a corrupt copy, named in ``dropped`` too); None if none
        has it."""
        def verified(raw: bytes, tier) -> bytes | None:
            return _decoded(raw, digest, decode, check=not getattr(tier, "trusted", False))

        for tier in tiers:
            try:
                raw = tier.get(key)
            except OSError as e:  # a failing or read-only cache disk: the next tier has the object
                if tier is self.durable:
                    raise
                log.warning("%s: cannot read %s (%s): trying the next tier", tier.name, key, e)
                raw = None
            if raw is not None:
                data = verified(raw, tier)
                if data is None and (tier in self.remote or tier is self.durable):  # bytes damaged on the way
                    # (or in this reader's memory)? the only copy may be fine
                    raw = tier.get(key)
                    data = verified(raw, tier) if raw is not None else None
                if data is None:
                    # the only durable copy, bad twice: set aside where an operator may look (the fault may be
                    # this reader's: a proxy that strips metadata, bad memory), not deleted; a build puts it back
                    aside = getattr(tier, "quarantine", None) if tier is self.durable else None
                    what = "dropped"
                    try:
                        if aside:
                            what = f"set aside as {aside(key)}"
                        else:
                            tier.delete(key)
                    except (OSError, StoreError) as e:  # a cache disk gone read-only: the next tier has it
                        if tier is self.durable:
                            raise
                        log.warning("%s: cannot drop %s (%s)", tier.name, key, e)
                    log.warning("corrupt %s in %s: %s", key, tier.name, what)
                    if dropped is not None:
                        dropped.append(f"{tier.name} ({what})")
                    raw = None
            if raw is None:
                if tier not in missed:
                    missed.append(tier)
                continue
            self._bound_again_once_pushed()
            for t in missed:  # heal / fill faster tiers, with verified bytes only
                if t is tier:
                    continue
                try:
                    t.put(key, raw)
                except (OSError, StoreError) as e:  # a full disk must not fail a good read
                    log.warning("could not copy %s into %s: %s", key, t.name, e)
            return data
        return None

    def get_chunk(self, digest: str) -> bytes:
        return self._get_verified(CHUNKS, digest)

    def get_chunk_local(self, digest: str) -> bytes | None:
        """The verified chunk from this host's own tiers (memory, disk), None where they lack it: never waits
        on a remote tier."""
        return self._first(_key(CHUNKS, digest), digest, lambda b: b, self.tiers[:self.tiers.index(self.local) + 1],
                           [])

    def get_manifest_bytes(self, digest: str) -> bytes:
        return self._get_verified(MANIFESTS, digest, zlib.decompress)

    def has_chunk(self, digest: str) -> bool:
        """In any tier (a local copy counts)."""
        key = _key(CHUNKS, digest)
        return any(t.has(key) for t in self.tiers)

    def has_manifest(self, digest: str) -> bool:
        key = _key(MANIFESTS, digest)
        return any(t.has(key) for t in self.tiers)

    def has_manifest_durably(self, digest: str) -> bool:
        return self.durable.has(_key(MANIFESTS, digest))

    def has_chunk_durably(self, digest: str) -> bool:
        """In the source-of-truth tier (S3 when configured): what a build may skip uploading."""
        return self.durable.has(_key(CHUNKS, digest))

    def missing_chunks(self, digests: Iterable[str]) -> list[str]:
        """The digests the durable tier lacks now. A remote tier that can list (S3) is listed first, with at most one
        LIST per ``HEADS_PER_LIST`` digests (a bucket far larger than the image is not listed whole); the digests
        not found are then asked one HEAD each, ``upload_workers`` at a time. On local SeaweedFS a LIST page
        took as long as ~55 HEADs (boto3's CPU): an image of 6,667 chunks was checked in 0.5 s instead of 9 s."""
        digests = list(dict.fromkeys(digests))
        self.durable.forget()  # asked afresh: an object this process saw there may have been deleted (gc) since
        listing = getattr(self.durable, "list_keys", None)
        if listing and len(digests) >= HEADS_PER_LIST:
            keys, complete = listing(CHUNKS + "/", max_pages=len(digests) // HEADS_PER_LIST)
            present = {k.rpartition("/")[2] for k in keys}
            digests = [d for d in digests if d not in present]
            if complete:
                return digests
        workers = min(self.upload_workers, len(digests)) if self.remote else 1
        if workers <= 1:
            return [d for d in digests if not self.has_chunk_durably(d)]
        with ThreadPoolExecutor(workers, thread_name_prefix="thaw-head") as pool:
            return [d for d, ok in zip(digests, pool.map(self.has_chunk_durably, digests)) if not ok]

    # -- writes ------------------------------------------------------------------------------
    def _put(self, key: str, data: bytes) -> bool:
        """Remote tiers (durable first), then the local disk; True when new to the durable tier."""
        self._bound_again_once_pushed()
        new = False
        for t in [*reversed(self.remote), self.local]:  # (the disk last: it never holds what S3 lacks)
            stored = t.put(key, data)
            if t is self.durable:
                new = stored
        return new

    def put_chunk(self, data: bytes) -> tuple[str, bool]:
        if len(data) > self.chunk_size:
            raise StoreError(f"chunk of {len(data)} bytes exceeds {self.chunk_size}")
        digest = digest_of(data)  # the key is the digest of these very bytes: verified by construction
        return digest, self._put(_key(CHUNKS, digest), data)

    def put_manifest_bytes(self, data: bytes) -> tuple[str, bool]:
        digest = digest_of(data)
        return digest, self._put(_key(MANIFESTS, digest), zlib.compress(data, 6))

    def push(self) -> tuple[int, int]:
        """Upload the local disk's objects the durable tier lacks (verified first: a corrupt one is dropped, not
        spread), then mark the disk as backed by it, so its bound applies again. For a store that ran without
        S3 (or with another bucket) before. Idempotent; returns (objects, bytes) uploaded."""
        if not self.remote:
            return 0, 0
        keys = [key for key, _ in self.local._stats()]
        workers = max(1, min(self.upload_workers, len(keys)))
        with ThreadPoolExecutor(workers, thread_name_prefix="thaw-push") as pool:
            missing = [k for k, ok in zip(keys, pool.map(self.durable.has, keys)) if not ok]
            sent = [n for n in pool.map(self._push_one, missing) if n]
        self.local.mark_backed(self.durable.name)
        self.local.max_bytes, self.held_back = self._bound, False
        return len(sent), sum(sent)

    def _push_one(self, key: str) -> int:
        """Bytes uploaded for local object ``key`` (0: gone meanwhile, or corrupt and dropped)."""
        raw = self.local.get(key)
        if raw is None:
            return 0
        kind, _, digest = key.rpartition("/")
        if _decoded(raw, digest, zlib.decompress if kind.startswith(MANIFESTS) else lambda b: b) is None:
            log.warning("corrupt %s in %s: dropped, not pushed", key, self.local.name)
            self.local.delete(key)
            return 0
        self.durable.put(key, raw)
        return len(raw)

    def sync(self) -> None:
        for t in self.tiers:
            sync = getattr(t, "sync", None)
            if sync:
                sync()

    def usage(self) -> tuple[int, int]:
        return self.local.usage()

    def staging(self, txn_id: str) -> "Staging":
        """A build's staging area. The remote tiers first forget which objects they saw earlier: `thaw gc` may
        have deleted some since (it runs only while no build does), and a build must upload what S3 lacks."""
        for t in self.remote:
            t.forget()
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
        self.uploaded_chunks = 0  # by the last commit_chunks, into the remote tiers
        self.uploaded_bytes = 0

    def reset(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.new_chunks = self.new_bytes = 0

    def exists(self) -> bool:
        return self.dir.is_dir()

    def put_chunk(self, data: bytes | memoryview) -> str:
        """Hash ``data``; stage it unless the store's durable tier (or this staging area) already holds it.

        With S3 configured that is S3, so chunks only cached locally (say, built before S3 was configured)
        are staged again and uploaded by :meth:`commit_chunks`."""
        if len(data) > self.store.chunk_size:
            raise StoreError(f"chunk of {len(data)} bytes exceeds {self.store.chunk_size}")
        digest = digest_of(data)
        staged = self.dir / digest
        if staged.exists() or self.store.has_chunk_durably(digest):
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
        """Make staged chunks durable: each staged file is re-hashed, uploaded to the remote tiers that
        lack it (S3: HEAD, then a PUT; ``upload_workers`` in parallel), then moved to its final name in the
        local tier; then the filesystem is synced once (without S3, once before the moves too).

        Returns (chunks, bytes) newly stored in the local tier; ``uploaded_chunks``/``uploaded_bytes`` count
        what went to the durable remote tier. Safe to repeat; :meth:`abort` removes what is left. A staged
        file that no longer matches its digest raises :class:`CorruptObject` (nothing of it is stored)."""
        count = size = 0
        up_count = up_size = 0
        lock = threading.Lock()

        def one(p: Path) -> None:
            nonlocal count, size, up_count, up_size
            data = p.read_bytes()
            if digest_of(data) != p.name:  # left in place: every retry fails the same way, abort() removes it
                raise CorruptObject(f"staged chunk {p.name} in {self.dir} is corrupt (disk error?); "
                                    f"build the image again")
            key = _key(CHUNKS, p.name)
            uploaded = False
            for t in reversed(self.store.remote):  # the durable tier first
                if t.put(key, data) and t is self.store.durable:
                    uploaded = True
            moved = self.store.local.put_file(key, p)
            with lock:
                if uploaded:
                    up_count += 1
                    up_size += len(data)
                if moved:
                    count += 1
                    size += len(data)

        if self.exists():
            staged = list(self.staged())
            if not self.store.remote:  # the disk is the only copy: the staged bytes reach it before their names
                self.store.sync()  # do (a power cut then leaves no cut-short chunk that has() counts as stored)
            if self.store.remote and len(staged) > 1 and self.store.upload_workers > 1:
                with ThreadPoolExecutor(min(self.store.upload_workers, len(staged)),
                                        thread_name_prefix="upload") as pool:
                    for f in [pool.submit(one, p) for p in staged]:
                        f.result()
            else:
                for p in staged:
                    one(p)
            self.store.sync()
        self.uploaded_chunks, self.uploaded_bytes = up_count, up_size
        return count, size

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
