"""Per-replica root filesystems: an overlay of a read-only image root (``lower``) and a fresh writable layer.

``lower`` is only a path: today a directory (a materialised image), later the lazy FUSE mount of the image.
Every replica (the one launched for the snapshot and each restored one) gets its own upper layer, so
replicas never see each other's writes and the image itself is never written.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import _linux


@dataclass
class Root:
    path: Path          # the merged tree: the replica's "/" (a mount point, as ``criu restore --root`` requires)
    lower: list[Path]   # the read-only layers, topmost first
    dir: Path    # holds upper/, work/ and root/ (= path); removed by cleanup()

    def cleanup(self) -> None:
        """Unmount the overlay and remove its layer; idempotent. Stop the replicas using it first."""
        for _ in range(8):  # more than one when something stacked a mount on it
            if str(self.path) not in _linux.mountpoints():
                break
            try:
                _linux.umount(self.path)
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                _linux.umount(self.path, _linux.MNT_DETACH)  # something still looks at it: detach lazily
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Root:
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


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
    try:
        opts = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={wd}"
        _linux.mount("overlay", merged, "overlay", 0, opts)
    except OSError:
        shutil.rmtree(d)
        raise
    return Root(path=merged, lower=lowers, dir=d)
