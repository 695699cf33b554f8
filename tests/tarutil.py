"""Craft tar layers and docker-archives in tests (including hostile ones)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path


def member(name, kind="file", data=b"", link="", mode=0o644, mtime=1_700_000_000, size=None, pax=None,
           devmajor=0, devminor=0):
    ti = tarfile.TarInfo(name)
    ti.mode, ti.mtime = mode, mtime
    ti.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
               "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
    ti.linkname = link
    ti.size = len(data) if size is None else size
    ti.devmajor, ti.devminor = devmajor, devminor
    if pax:
        ti.pax_headers = dict(pax)
    return ti, data


def layer(*members, pax=None) -> bytes:
    """A tar of ``members``; ``pax``: a global pax header before them."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers=pax) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


def docker_archive(path: Path, layers: list[bytes], config: dict | None = None) -> Path:
    """Write a `docker save`-style archive holding ``layers`` (bottom first)."""
    cfg = {"architecture": "amd64", "os": "linux", "config": config or {},
           "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(l).hexdigest() for l in layers]}}
    cfg_bytes = json.dumps(cfg).encode()
    cfg_name = hashlib.sha256(cfg_bytes).hexdigest() + ".json"
    names = [f"{hashlib.sha256(l).hexdigest()}/layer.tar" for l in layers]
    manifest = [{"Config": cfg_name, "RepoTags": ["test:latest"], "Layers": names}]
    with tarfile.open(path, "w") as tf:
        for name, data in [(cfg_name, cfg_bytes), *zip(names, layers),
                           ("manifest.json", json.dumps(manifest).encode())]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path
