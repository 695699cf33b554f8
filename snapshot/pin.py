"""Keep the memory pages of recently used snapshots resident in RAM, within a budget.

A restore copies the snapshot's CRIU page images (``pages-*.img``, the process's memory) into the new process.
From the page cache that is a memory copy; from disk (or through the FUSE mount from the disk tier) it is several
times slower. Hosts reclaim idle page cache, some eagerly (this project's VMs page out file pages left idle for
about a minute), so a snapshot restored now and again would often be read from disk. ``Pins`` maps each pinned
snapshot's page images and locks them (``mlock``): they stay in RAM until unpinned, the least recently used
snapshot first when the budget is short.

Pinning needs CAP_IPC_LOCK or a large enough RLIMIT_MEMLOCK; without them it logs once and does nothing.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger("thaw.snapshot")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value

PAGES_GLOB = "pages-*.img"


def _map_locked(path: Path) -> tuple[int, int]:
    """mmap ``path`` read-only and lock it in RAM (reads it all first). Returns (address, size)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0, 0
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            e = ctypes.get_errno()
            raise OSError(e, f"mmap {path}: {os.strerror(e)}")
    finally:
        os.close(fd)
    if _libc.mlock(addr, size) != 0:
        e = ctypes.get_errno()
        _libc.munmap(addr, size)
        raise OSError(e, f"mlock {size >> 20} MiB of {path}: {os.strerror(e)}")
    return addr, size


class Pins:
    """Snapshots' page images locked in RAM, least recently used first out, at most ``budget`` bytes."""

    def __init__(self, budget: int):
        self.budget = budget
        self._pinned: OrderedDict[str, list[tuple[int, int]]] = OrderedDict()
        self._lock = threading.Lock()  # held while a pin reads its pages in: seconds, from a remote tier
        self._refused = False
        self._bytes = 0  # what _pinned holds, and its keys: updated under the lock, read without it
        self._keys: tuple[str, ...] = ()

    @property
    def pinned_bytes(self) -> int:
        """Read without the lock: the agent's event loop reads it (a pin under way must not stall it)."""
        return self._bytes

    def _changed(self) -> None:
        self._bytes = sum(size for maps in self._pinned.values() for _, size in maps)
        self._keys = tuple(self._pinned)

    def pinned(self) -> list[str]:
        """Read without the lock: the agent's heartbeat asks (a pin reading GBs in must not make its host stale)."""
        return list(self._keys)

    def pin(self, key: str, images_dir: Path) -> bool:
        """Lock ``images_dir``'s page images under ``key`` (already pinned: only marked most recently used).
        Unpins least recently used snapshots to make room; False if it does not fit or cannot be locked."""
        with self._lock:
            if key in self._pinned:
                self._pinned.move_to_end(key)
                self._changed()
                return True
            if self._refused or self.budget <= 0:  # pinning off
                return False
            maps = []
            try:
                files = sorted(Path(images_dir).glob(PAGES_GLOB))
                need = sum(f.stat().st_size for f in files)
                if need > self.budget:
                    log.info("snapshot %s: %d MiB of pages exceed the pin budget (%d MiB); not pinned", key[:12],
                             need >> 20, self.budget >> 20)
                    return False
                while self._pinned and self._bytes + need > self.budget:
                    self._unmap(self._pinned.popitem(last=False)[1])
                    self._changed()
                for f in files:
                    maps.append(_map_locked(f))
            except OSError as e:
                self._unmap(maps)
                # not root: no CAP_IPC_LOCK, or over RLIMIT_MEMLOCK, for good; root: short of memory right now
                self._refused = e.errno == errno.EPERM or (e.errno == errno.ENOMEM and os.geteuid() != 0)
                log.warning("snapshot %s: cannot pin its pages in RAM (%s)%s", key[:12], e,
                            "; pinning is off on this host" if self._refused else "")
                return False
            self._pinned[key] = maps
            self._changed()
            return True

    def unpin(self, key: str) -> None:
        with self._lock:
            self._unmap(self._pinned.pop(key, []))
            self._changed()

    def close(self) -> None:
        with self._lock:
            while self._pinned:
                self._unmap(self._pinned.popitem()[1])
            self._changed()

    @staticmethod
    def _unmap(maps: list[tuple[int, int]]) -> None:
        for addr, size in maps:
            if size:
                _libc.munmap(addr, size)
