"""Thin ctypes wrappers for the Linux calls the stdlib of Python 3.11 lacks (mount, umount2, setns)."""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from pathlib import Path
from typing import Callable, TypeVar

from thaw.imagefs.mount import mountinfo, unescape

from ._nsinit import loopback_up

T = TypeVar("T")

MNT_DETACH = 0x2
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]


def _raise(what: str) -> None:
    e = ctypes.get_errno()
    raise OSError(e, f"{what}: {os.strerror(e)}")


def mount(source: str | None, target: str | Path, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    if _libc.mount(source and source.encode(), os.fsencode(target), fstype and fstype.encode(), flags,
                   data and data.encode()):
        _raise(f"mount {fstype or source} on {target}")


def umount(target: str | Path, flags: int = 0) -> None:
    if _libc.umount2(os.fsencode(target), flags):
        _raise(f"umount {target}")


def setns(fd: int, nstype: int) -> None:
    """Move the calling *thread* into the namespace behind ``fd`` (per-thread for network namespaces)."""
    if _libc.setns(fd, nstype):
        _raise("setns")


def in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` on a fresh thread and return its result: for per-thread namespace changes (setns/unshare
    of a network namespace) that must never touch the caller's thread. The thread ends right after."""
    box: dict = {}

    def run():
        try:
            box["ok"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["err"] = e

    t = threading.Thread(target=run, name="thaw-ns")
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]
    return box["ok"]


def new_netns() -> int:
    """A new network namespace with loopback up, as an O_CLOEXEC fd."""
    def make() -> int:
        if _libc.unshare(CLONE_NEWNET):
            _raise("unshare(CLONE_NEWNET)")
        loopback_up()
        return os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    return in_thread(make)


def socket_in(netns: int, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
    """A new socket in the network namespace that fd ``netns`` names (it stays there, whichever thread uses it)."""
    def make() -> socket.socket:
        setns(netns, CLONE_NEWNET)
        return socket.socket(family, type)
    return in_thread(make)


CAP_SYS_RESOURCE = 24


def has_capability(cap: int) -> bool:
    """Whether this process has capability number ``cap`` in its effective set (/proc/self/status CapEff)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def mountpoints(pid: int | str = "self") -> list[str]:
    """Every mount point visible to ``pid``."""
    return [m.mountpoint for m in mountinfo(pid)]


def overlay_lowers(pid: int | str = "self") -> set[str]:
    """Every lower layer of the overlay mounts visible to ``pid`` (from their ``lowerdir=`` options)."""
    out: set[str] = set()
    for m in mountinfo(pid):
        if m.fstype != "overlay":
            continue
        for opt in m.super_options.split(","):
            name, _, value = opt.partition("=")
            if name in ("lowerdir", "lowerdir+"):
                out.update(unescape(p) for p in value.split(":") if p)
    return out


def fd_mnt_id(fd: int) -> int:
    """The id of the mount an open file was reached through (``mnt_id`` of /proc/self/fdinfo)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(f"no mnt_id in /proc/self/fdinfo/{fd}")
