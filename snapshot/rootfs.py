"""Per-replica root filesystems: an overlay of a read-only image root (``lower``) and a fresh writable layer.

``lower`` is only a path: today a directory (a materialised image), later the lazy FUSE mount of the image.
Every replica (the one launched for the snapshot and each restored one) gets its own upper layer, so
replicas never see each other's writes and the image itself is never written.

What the launched server wrote before its snapshot (a log it keeps open, a cache it filled, a file it deleted)
is part of the process's state: :meth:`Root.keep_writes` keeps that upper layer with the snapshot, and every
restore mounts it, read-only, as the topmost lower layer (overlayfs reads its whiteouts and opaque directories
there as in any lower layer), under a fresh upper layer of its own.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import _linux

log = logging.getLogger(__name__)
# overlayfs' own records of an upper layer, about the mount that wrote it (the lower inodes copied up, its
# uuid): stale under another mount. Whiteouts and opaque directories are what the layer means: kept.
BOOKKEEPING_XATTRS = ("trusted.overlay.origin", "trusted.overlay.impure", "trusted.overlay.nlink",
                      "trusted.overlay.uuid")


@dataclass
class Root:
    path: Path          # the merged tree: the replica's "/" (a mount point, as ``criu restore --root`` requires)
    lower: list[Path]   # the read-only layers, topmost first
    dir: Path    # holds upper/, work/ and root/ (= path); removed by cleanup()

    def cleanup(self) -> None:
        """Unmount the overlay and remove its layer; idempotent. Stop the replicas using it first."""
        self._unmount()
        shutil.rmtree(self.dir, ignore_errors=True)

    def keep_writes(self, dest: Path) -> int:
        """Unmount the overlay and move what was written on it (its upper layer) to ``dest``, to be a lower layer
        of the roots of the snapshot's restores (``dest``: on the same file system, a rename); then remove the
        rest, as :meth:`cleanup`. Returns how many entries were kept; with none, ``dest`` is not made.
        Stop the replica first: its writes must be those of the dumped process (CRIU reopens the files it had
        open by path, and checks their size). Sockets are left out (CRIU binds a restored one again; none can be
        stored), as are device nodes other than whiteouts: each becomes a whiteout, so that no file of a lower
        layer shows through in its place."""
        self._unmount()
        upper, kept = self.dir / "upper", 0
        if any(upper.iterdir()):
            os.rename(upper, dest)
            for d, dirs, files in os.walk(dest):
                for name in [*dirs, *files]:
                    p = os.path.join(d, name)
                    if _unstorable(os.lstat(p)):
                        log.info("left out of the snapshot's writes: %s (a socket or device)", p)
                        os.unlink(p)
                        os.mknod(p, stat.S_IFCHR, 0)
                    _drop_bookkeeping(p)
                    kept += 1
            _drop_bookkeeping(str(dest))
        self.cleanup()
        return kept

    def _unmount(self) -> None:
        for _ in range(8):  # more than one when something stacked a mount on it
            if str(self.path) not in _linux.mountpoints():
                break
            try:
                _linux.umount(self.path)
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                _linux.umount(self.path, _linux.MNT_DETACH)  # something still looks at it: detach lazily

    def __enter__(self) -> Root:
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


def _unstorable(st: os.stat_result) -> bool:
    """A socket, or a device node that is not an overlayfs whiteout (a 0:0 character device)."""
    m = st.st_mode
    return stat.S_ISSOCK(m) or stat.S_ISBLK(m) or (stat.S_ISCHR(m) and st.st_rdev != 0)


def _drop_bookkeeping(path: str) -> None:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:  # an upper file system without xattrs: nothing to drop
        if e.errno not in (errno.ENOTSUP, errno.EPERM):
            raise
        return
    for name in names:
        if name in BOOKKEEPING_XATTRS:
            os.removexattr(path, name, follow_symlinks=False)


def prepare_root(lower: Path | Sequence[Path], work: Path) -> Root:
    """Mount a fresh overlay of ``lower`` (the image root; or several read-only layers, topmost first) and a
    new writable layer, in a new directory under ``work``."""
    lowers = [Path(p).resolve() for p in ([lower] if isinstance(lower, (str, os.PathLike)) else lower)]
    work = Path(work).resolve()
    for p in (*lowers, work):
        if any(c in str(p) for c in ",:\\"):
            raise ValueError(f"overlayfs can't take the path {p} (it contains ',', ':' or '\\')")
    for p in lowers:
        if not p.is_dir():
            raise FileNotFoundError(f"image root {p} is not a directory")
    work.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="root-", dir=work))
    upper, wd, merged = d / "upper", d / "work", d / "root"
    for p in (upper, wd, merged):
        p.mkdir()
    try:  # no redirects and no metacopy files (whatever the host's defaults): an upper layer kept with a
        # snapshot (Root.keep_writes) then holds all it means, for hosts that would neither follow nor make them
        opts = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={wd},redirect_dir=off,metacopy=off"
        _linux.mount("overlay", merged, "overlay", 0, opts)
    except OSError:
        shutil.rmtree(d)
        raise
    return Root(path=merged, lower=lowers, dir=d)
