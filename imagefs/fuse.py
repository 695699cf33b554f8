"""A read-only pyfuse3 filesystem serving one image manifest, lazily, from the chunk store.

* Inode numbers are stable: ``1 + index`` of the entry in the path-sorted manifest (the root, ``""``, sorts
  first and gets ``pyfuse3.ROOT_INODE``). Hard links share the inode of their first path; ``st_nlink`` counts
  the paths. Directories report ``2 + subdirectories`` links, like ext4.
* Attributes are exact (mode incl. setuid/setgid/sticky, uid/gid, size, ``mtime_ns`` for a/m/ctime, rdev,
  xattrs), so ``diff -r``/``stat`` match a materialized copy and Python trusts the image's ``.pyc`` files.
* The image is immutable: entries, negative lookups and attributes are cached by the kernel for a long time,
  and files are opened with ``FOPEN_KEEP_CACHE`` so warm reads come from the page cache without a request.
* Reads assemble the requested range from the file's chunks (a read may span chunk boundaries). Decoded chunks
  sit in a small byte-bounded LRU, so consecutive 128 KiB reads of a 4 MiB chunk fetch it once; concurrent
  reads of one chunk share one fetch. Fetches run in worker threads (the store does blocking I/O) under a
  timeout; a chunk that cannot be fetched (``StoreError``, timeout, wrong size) fails that read with ``EIO``.
* An optional :class:`AccessRecorder` notes the first read of each (file, chunk index) in order; the list is
  the prefetch profile of a real start (see :mod:`thaw.imagefs.prefetch`).
"""

from __future__ import annotations

import base64
import bisect
import errno
import inspect
import json
import logging
import os
import signal
import stat
import time
from collections import OrderedDict
from pathlib import Path

import pyfuse3
import trio

from thaw.files import write_atomic

from .manifest import BLK, CHR, DIR, FIFO, REG, SYMLINK, ImageManifest
from .store import ChunkStore

log = logging.getLogger(__name__)

MiB = 1 << 20
CACHE_TIMEOUT = 30 * 86400.0  # seconds the kernel may trust entries/attributes: the image never changes
DIR_SIZE = 4096  # what ext4 reports for a small directory (the manifest does not record directory sizes)
BLKSIZE = 4096
FAILURE_TTL = 1.0  # seconds a failed chunk fails again at once (the kernel retries a failed readahead page by page)

_TYPE_BITS = {DIR: stat.S_IFDIR, REG: stat.S_IFREG, SYMLINK: stat.S_IFLNK, FIFO: stat.S_IFIFO,
              CHR: stat.S_IFCHR, BLK: stat.S_IFBLK}

# trio renamed ``cancellable`` to ``abandon_on_cancel`` (0.23)
_ABANDON = ({"abandon_on_cancel": True} if "abandon_on_cancel" in inspect.signature(trio.to_thread.run_sync).parameters
            else {"cancellable": True})


class AccessRecorder:
    """First access of each (file path, chunk index), in order, with ms since the mount started."""

    def __init__(self, path: str | os.PathLike | None, image: str):
        self.path = Path(path) if path else None
        self.image = image
        self.t0 = time.monotonic()
        self.reads: list[list] = []
        self._seen: set[tuple[str, int]] = set()

    def note(self, path: str, index: int, digest: str) -> None:
        key = (path, index)
        if key not in self._seen:
            self._seen.add(key)
            self.reads.append([path, index, digest, round((time.monotonic() - self.t0) * 1000, 3)])

    def to_dict(self) -> dict:
        return {"image": self.image, "reads": list(self.reads)}

    def write(self, path: str | os.PathLike | None = None) -> Path | None:
        """Write the recording atomically (temp file + rename); returns the path written."""
        dest = Path(path) if path else self.path
        if dest is None:
            return None
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(dest, json.dumps(self.to_dict()))
        log.info("access recording: %d chunk reads written to %s", len(self.reads), dest)
        return dest


class _Fetch:
    __slots__ = ("done", "data", "error", "speculative")

    def __init__(self, speculative: bool):
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: str | None = None
        self.speculative = speculative  # a read-ahead's: its failure is not the failure of a read that joined it


class ImageFS(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, store: ChunkStore, manifest: ImageManifest, digest: str = "", *,
                 recorder: AccessRecorder | None = None, cache_bytes: int = 64 * MiB,
                 fetch_timeout: float = 30.0, fetch_threads: int = 16, readahead_bytes: int = 4 * MiB):
        super().__init__()
        self.store = store
        self.digest = digest
        self.recorder = recorder
        self.cache_bytes = cache_bytes
        self.fetch_timeout = fetch_timeout
        self.readahead_bytes = readahead_bytes
        self._next_off: dict[int, int] = {}  # inode -> where its last read ended (sequential readers)
        # threads for chunks on this host's disk, and for those fetched from S3: a local read never waits
        # behind remote fetches (a thread abandoned at fetch_timeout keeps its slot until S3 answers)
        self._local_limiter = trio.CapacityLimiter(fetch_threads)
        self._limiter = trio.CapacityLimiter(fetch_threads)
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached = 0
        self._inflight: dict[str, _Fetch] = {}
        self._failed: dict[str, tuple[float, str]] = {}  # digest -> (until, error)
        self._scopes: set[trio.CancelScope] = set()
        self.closing = False  # set on shutdown: no new fetches
        self._nursery: trio.Nursery | None = None  # for chunk read-ahead; set by serve()
        self._initialized: trio.Event | None = None  # set once the kernel's FUSE_INIT was answered
        self.stats = {"reads": 0, "read_bytes": 0, "fetches": 0, "fetch_bytes": 0, "cache_hits": 0, "errors": 0}
        self._build(manifest)

    # -- index -------------------------------------------------------------------------------
    def _build(self, manifest: ImageManifest) -> None:
        entries = sorted(manifest.entries, key=lambda e: e.path)
        if not entries or entries[0].path != "" or entries[0].type != DIR:
            raise ValueError("manifest has no root directory")
        index = {e.path: i + pyfuse3.ROOT_INODE for i, e in enumerate(entries)}
        n = len(entries) + pyfuse3.ROOT_INODE
        self.entries = [None] * n  # inode -> Entry (only the first path of a hard-linked inode)
        self.paths = [""] * n  # inode -> path
        self.children: dict[int, list[tuple[bytes, int]]] = {}
        self.names: dict[int, dict[bytes, int]] = {}
        self.parent: dict[int, int] = {pyfuse3.ROOT_INODE: pyfuse3.ROOT_INODE}
        self.nlink = [0] * n
        self.total_size = 0
        for e in entries:
            ino = index[e.path]
            if e.hardlink:
                target = index.get(e.hardlink)
                if target is None or entries[target - pyfuse3.ROOT_INODE].type != REG:
                    raise ValueError(f"hard link {e.path!r} names {e.hardlink!r}, not a regular file")
                ino = target
            else:
                self.entries[ino] = e
                self.paths[ino] = e.path
                if e.type == REG:
                    self.total_size += e.size
            self.nlink[ino] += 1
            if e.type == DIR:
                self.nlink[ino] += 1  # "." (the parent's link is counted below)
                self.children[ino] = []
            if e.path:
                parent_path, _, name = e.path.rpartition("/")
                pino = index[parent_path]
                self.children[pino].append((os.fsencode(name), ino))
                if e.type == DIR:
                    self.nlink[pino] += 1  # the child's ".."
                    self.parent[ino] = pino
        for pino, kids in self.children.items():
            kids.sort()
            self.names[pino] = dict(kids)
        self._attrs: dict[int, pyfuse3.EntryAttributes] = {}
        self._starts: dict[int, list[int]] = {}
        self._xattrs: dict[int, dict[bytes, bytes]] = {}
        self.inodes = sum(1 for e in self.entries if e is not None)

    def _entry(self, ino: int):
        try:
            e = self.entries[ino]
        except (IndexError, TypeError):
            e = None
        if e is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return e

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = self._attrs.get(ino)
        if a is not None:
            return a
        e = self._entry(ino)
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = CACHE_TIMEOUT
        a.attr_timeout = CACHE_TIMEOUT
        perm = 0o777 if e.type == SYMLINK else stat.S_IMODE(e.mode)
        a.st_mode = _TYPE_BITS[e.type] | perm
        a.st_nlink = self.nlink[ino]
        a.st_uid = e.uid
        a.st_gid = e.gid
        a.st_rdev = e.rdev or 0
        if e.type == REG:
            size = e.size
        elif e.type == SYMLINK:
            size = len(os.fsencode(e.target or ""))
        elif e.type == DIR:
            size = DIR_SIZE
        else:
            size = 0
        a.st_size = size
        a.st_blksize = BLKSIZE
        a.st_blocks = (size + 511) // 512 if e.type in (REG, DIR) else 0
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = e.mtime_ns
        self._attrs[ino] = a
        return a

    # -- metadata ops ------------------------------------------------------------------------
    def init(self):
        if self._initialized is not None:
            self._initialized.set()

    async def lookup(self, parent_inode, name, ctx=None):
        if name == b".":
            return self._attr(parent_inode)
        if name == b"..":
            return self._attr(self.parent.get(parent_inode, pyfuse3.ROOT_INODE))
        names = self.names.get(parent_inode)
        if names is None:
            self._entry(parent_inode)  # ENOENT for an unknown inode
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        ino = names.get(name)
        if ino is None:
            neg = pyfuse3.EntryAttributes()  # st_ino 0: a negative entry the kernel caches (imports probe a lot)
            neg.st_ino = 0
            neg.entry_timeout = CACHE_TIMEOUT
            return neg
        return self._attr(ino)

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)

    async def readlink(self, inode, ctx):
        e = self._entry(inode)
        if e.type != SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(e.target or "")

    async def opendir(self, inode, ctx):
        if inode not in self.children:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        kids = self.children[fh]
        for i in range(start_id, len(kids)):
            name, ino = kids[i]
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), i + 1):
                break

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = BLKSIZE
        s.f_blocks = (self.total_size + BLKSIZE - 1) // BLKSIZE
        s.f_bfree = s.f_bavail = 0
        s.f_files = self.inodes
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    def _xattr_map(self, ino: int) -> dict[bytes, bytes]:
        m = self._xattrs.get(ino)
        if m is None:
            e = self._entry(ino)
            m = {os.fsencode(k): base64.b64decode(v) for k, v in (e.xattrs or {}).items()}
            self._xattrs[ino] = m
        return m

    async def getxattr(self, inode, name, ctx):
        try:
            return self._xattr_map(inode)[name]
        except KeyError:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None

    async def listxattr(self, inode, ctx):
        return list(self._xattr_map(inode))

    async def setxattr(self, inode, name, value, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)

    async def removexattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)

    # -- data ops ----------------------------------------------------------------------------
    async def open(self, inode, flags, ctx):
        e = self._entry(inode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if e.type != REG:
            raise pyfuse3.FUSEError(errno.EISDIR if e.type == DIR else errno.EACCES)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=False)

    async def release(self, fh):
        pass

    # flush is left unimplemented: its ENOSYS makes the kernel stop sending FLUSH on every close

    def _chunk_starts(self, ino: int, e) -> list[int]:
        starts = self._starts.get(ino)
        if starts is None:
            starts, pos = [], 0
            for _digest, size in e.chunks:
                starts.append(pos)
                pos += size
            if pos != e.size:
                log.error("%s: chunks cover %d bytes but the file is %d", e.path, pos, e.size)
            self._starts[ino] = starts
        return starts

    async def read(self, fh, off, size):
        e = self._entry(fh)
        end = min(off + size, e.size)
        if off >= end:
            return b""
        starts = self._chunk_starts(fh, e)
        i = bisect.bisect_right(starts, off) - 1
        sequential = self._next_off.get(fh) == off
        self._next_off[fh] = end
        pieces = []
        pos = off
        try:
            while pos < end:
                if not 0 <= i < len(starts):
                    raise _ReadError("chunk list shorter than the file")
                digest, csize = e.chunks[i]
                if self.recorder is not None:
                    self.recorder.note(e.path, i, digest)
                data = await self._chunk(digest, csize)
                cstart = starts[i]
                lo, hi = pos - cstart, min(csize, end - cstart)
                pieces.append(memoryview(data)[lo:hi])
                pos = cstart + hi
                i += 1
        except _ReadError as err:
            self.stats["errors"] += 1
            log.error("read of %s [%d, +%d) failed: %s", e.path, off, size, err)
            raise pyfuse3.FUSEError(errno.EIO) from None
        # a sequential reader (this read starts where the file's last read ended): fetch the chunks of the next
        # readahead_bytes in the background. Only then: a page fault in a mmapped library or weights file reads a
        # window around the page, and fetching past that window would multiply what a cold start downloads.
        if sequential and self.readahead_bytes and self._nursery is not None:
            while i < len(starts) and starts[i] < end + self.readahead_bytes:
                d, csize = e.chunks[i]
                if d not in self._cache and d not in self._inflight:
                    self._nursery.start_soon(self._readahead, d, csize)
                i += 1
        self.stats["reads"] += 1
        self.stats["read_bytes"] += end - off
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def _readahead(self, digest: str, size: int) -> None:
        try:
            await self._chunk(digest, size, remember_failure=False)
        except _ReadError:
            pass  # logged; a read of that chunk fetches it again (this one may have timed out waiting its turn)

    async def _chunk(self, digest: str, size: int, remember_failure: bool = True) -> bytes:
        data = self._cache.get(digest)
        if data is not None:
            self._cache.move_to_end(digest)
            self.stats["cache_hits"] += 1
            return data
        failed = self._failed.get(digest)
        if failed is not None:
            if failed[0] > time.monotonic():
                raise _ReadError(f"{failed[1]} (failed less than {FAILURE_TTL:g} s ago)")
            del self._failed[digest]
        f = self._inflight.get(digest)
        if f is None:
            f = self._inflight[digest] = _Fetch(speculative=not remember_failure)
            try:
                await self._fetch(digest, size, f)
            finally:
                del self._inflight[digest]
                f.done.set()
                if f.error is not None and remember_failure:
                    self._failed[digest] = (time.monotonic() + FAILURE_TTL, f.error)
        else:
            await f.done.wait()
            if f.data is None and f.speculative and remember_failure:  # a read joined a read-ahead that failed
                return await self._chunk(digest, size)  # (it may have timed out waiting its turn): fetch it now
        if f.data is None:
            raise _ReadError(f.error or f"chunk {digest} fetch was cancelled")
        return f.data

    async def _fetch(self, digest: str, size: int, f: _Fetch) -> None:
        t0 = time.monotonic()
        if self.closing:
            f.error = f"chunk {digest}: the filesystem is being unmounted"
            return
        with trio.CancelScope(deadline=trio.current_time() + self.fetch_timeout) as scope:
            self._scopes.add(scope)
            try:
                data = await trio.to_thread.run_sync(self.store.get_chunk_local, digest,
                                                     limiter=self._local_limiter, **_ABANDON)
                if data is None:
                    data = await trio.to_thread.run_sync(self.store.get_chunk, digest, limiter=self._limiter,
                                                         **_ABANDON)
            except Exception as err:  # StoreError, OSError, anything the tiers raise
                f.error = f"chunk {digest}: {type(err).__name__}: {err}"
                log.error("%s", f.error)
                return
            finally:
                self._scopes.discard(scope)
        if scope.cancelled_caught:
            f.error = f"chunk {digest}: no answer from the store within {self.fetch_timeout:g} s"
            log.error("%s", f.error)
            return
        if len(data) != size:
            f.error = f"chunk {digest}: {len(data)} bytes, the manifest says {size}"
            log.error("%s", f.error)
            return
        self.stats["fetches"] += 1
        self.stats["fetch_bytes"] += size
        log.debug("fetched chunk %s (%d bytes) in %.1f ms", digest, size, (time.monotonic() - t0) * 1000)
        f.data = data
        self._cache[digest] = data
        self._cached += len(data)
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= len(old)

    def cancel_fetches(self) -> None:
        """Make every fetch in progress, and any started later, give up now (its read fails with EIO); used on
        shutdown."""
        self.closing = True
        for scope in list(self._scopes):
            scope.cancel()


class _ReadError(Exception):
    pass


def _ignore(sig, frame) -> None:
    pass


MOUNT_OPTIONS = ("fsname=thaw", "ro", "allow_other", "default_permissions", "suid", "dev")


async def serve(fs: ImageFS, *, max_tasks: int = 64, handle_signals: bool = True, on_ready=None) -> None:
    """Run the FUSE main loop (after ``pyfuse3.init``) until unmounted or SIGTERM/SIGINT/SIGHUP.

    ``on_ready()`` runs once the kernel's FUSE_INIT was answered: settings the kernel fixes at INIT (the bdi's
    read-ahead) can be changed from then on. SIGUSR1 writes the access recording. Signals blocked by the
    caller (to close the window between mount and this loop) are unblocked once the receiver is installed.
    Once the loop has ended they are ignored: a second one must not kill the caller while it unmounts and
    writes the recording (the mount daemon then ends with ``os._exit``)."""
    sigs = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1}
    if handle_signals:
        for sig in sigs:  # what the receiver puts back when it closes (a handler, unlike SIG_IGN, keeps a
            signal.signal(sig, _ignore)  # pending blocked signal for the receiver), in whichever thread it lands

    async def on_signals(task_status=trio.TASK_STATUS_IGNORED):
        with trio.open_signal_receiver(*sigs) as received:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)
            task_status.started()
            async for sig in received:
                if sig == signal.SIGUSR1:
                    if fs.recorder is not None:
                        try:
                            fs.recorder.write()
                        except OSError as err:
                            log.error("cannot write the access recording: %s", err)
                    continue
                if fs.closing:  # keep receiving: a closed receiver would let a second signal kill the process
                    continue
                log.info("%s: unmounting", signal.Signals(sig).name)
                fs.cancel_fetches()
                pyfuse3.terminate()

    async def when_ready():
        await fs._initialized.wait()
        await trio.sleep(0)  # the INIT reply is written by the time the worker task yields
        on_ready()

    fs._initialized = trio.Event()
    async with trio.open_nursery() as nursery:
        fs._nursery = nursery
        if handle_signals:
            await nursery.start(on_signals)
        if on_ready is not None:
            nursery.start_soon(when_ready)
        try:
            await pyfuse3.main(min_tasks=1, max_tasks=max_tasks)
        finally:
            fs._nursery = None
            fs.cancel_fetches()
            nursery.cancel_scope.cancel()
