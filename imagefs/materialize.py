"""Write an image manifest back out as a directory tree (exact modes, owners, mtimes, xattrs, links)."""

from __future__ import annotations

import base64
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from .manifest import BLK, CHR, DIR, FIFO, REG, SYMLINK, ImageManifest
from .store import ChunkStore, syncfs


class MaterializeError(Exception):
    pass


def materialize(manifest: ImageManifest, store: ChunkStore, dest: Path | str) -> Path:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise MaterializeError(f"{dest} is not empty")
    is_root = os.geteuid() == 0
    dirs = []
    for e in sorted(manifest.entries, key=lambda e: e.path):
        p = str(dest / e.path) if e.path else str(dest)
        if e.type == DIR:
            if e.path:
                os.mkdir(p, 0o700)
            dirs.append((p, e))
        elif e.type == REG and e.hardlink:
            os.link(dest / e.hardlink, p)
            continue  # the inode's metadata was set with its first path
        elif e.type == REG:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                for digest, _size in e.chunks:
                    f.write(store.get_chunk(digest))
        elif e.type == SYMLINK:
            os.symlink(e.target, p)
        elif e.type == FIFO:
            os.mkfifo(p, 0o600)
        elif e.type in (CHR, BLK):
            kind = 0o020000 if e.type == CHR else 0o060000
            os.mknod(p, kind | 0o600, e.rdev or 0)
        else:
            raise MaterializeError(f"unknown entry type {e.type!r} at {e.path!r}")
        if e.type != DIR:
            _set_meta(p, e, is_root)
    for p, e in reversed(dirs):  # children first, so writing into a dir does not bump its mtime again
        _set_meta(p, e, is_root)
    return dest


def _set_meta(p: str, e, is_root: bool) -> None:
    if is_root:
        os.chown(p, e.uid, e.gid, follow_symlinks=False)
    for name, value in (e.xattrs or {}).items():  # after chown, which clears security.capability; before
        try:  # chmod, which may take away the write permission user.* xattrs need
            os.setxattr(p, name, base64.b64decode(value), follow_symlinks=False)
        except OSError as err:
            if is_root or not name.startswith(("trusted.", "security.")):
                raise MaterializeError(f"cannot set xattr {name} on {e.path!r}: {err}") from None
    if e.type != SYMLINK:
        os.chmod(p, e.mode)  # after chown, which clears setuid/setgid
    os.utime(p, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)


def materialize_cached(store: ChunkStore, digest: str, parent: Path | str) -> Path:
    """``parent/<digest>``: the manifest materialized once per host (atomic rename; concurrent callers agree)."""
    parent = Path(parent)
    final = parent / digest
    if final.is_dir():
        return final
    parent.mkdir(parents=True, exist_ok=True)
    with open(parent / f".{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}.tmp-", dir=parent))
        try:
            materialize(ImageManifest.load(store, digest), store, tmp / "root")
            syncfs(tmp)  # the files' data on disk before the name that says the tree is complete
            os.rename(tmp / "root", final)
            syncfs(parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
