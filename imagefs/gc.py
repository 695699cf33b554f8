"""Garbage collection of the chunk store: delete the chunks and manifests no registered image or snapshot uses.

Mark: the manifests of every registered image and snapshot, and every chunk they list. A registered manifest
that cannot be read stops the collection before anything is deleted: without it the marks would be wrong.
Sweep: every other object in the store's tiers (the local directory and S3 where configured) that is older
than ``min_age_s``, and the scratch of that age: the local directory's half-written objects in ``tmp/`` and
``staging/`` areas of builds that never finished, and S3's multipart uploads never completed. The age bound
keeps what a build in progress has already stored but not yet registered; ``thaw gc`` also refuses to run while
a build workflow runs, and holds the store's lease (``registry.leases``) that builds wait for (a build may re-use
an old unreferenced chunk it found in the store without storing it again).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from thaw.errors import first_line

from .manifest import ImageManifest
from .store import CHUNKS, MANIFESTS, ChunkStore, StoreError


class GcError(StoreError):
    """The collection stopped: before deleting anything (a registered manifest unreadable), or part way (its
    check failed: the store's lease was lost); the message says which and why."""


@dataclass
class GcResult:
    manifests_kept: int = 0
    chunks_kept: int = 0
    deleted: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # tier name -> [(key, size)]
    young: int = 0  # unreferenced objects kept because they are younger than min_age_s
    scratch: list[str] = field(default_factory=list)  # tmp/, staging/, S3 uploads left over (gone unless dry_run)

    def deleted_bytes(self) -> int:
        return sum(n for objs in self.deleted.values() for _, n in objs)


def collect(store: ChunkStore, keep: Iterable[str], *, min_age_s: float = 3600.0, dry_run: bool = False,
            now: float | None = None, check: Callable[[], None] = lambda: None) -> GcResult:
    """Delete (or with ``dry_run`` only list) what the manifests ``keep`` (digests) do not reach. ``check`` is
    called before each deletion; what it raises stops the collection (the store's lease was lost)."""
    manifests = set(keep)
    chunks: set[str] = set()
    for digest in sorted(manifests):
        try:
            chunks |= ImageManifest.load(store, digest).chunk_digests()
        except (StoreError, ValueError) as e:
            raise GcError(f"registered manifest {digest[:12]} cannot be read ({first_line(e)}): "
                          f"nothing collected") from None
    res = GcResult(len(manifests), len(chunks))
    live = {CHUNKS: chunks, MANIFESTS: manifests}
    cutoff = (time.time() if now is None else now) - min_age_s
    for tier in [store.local, *store.remote]:
        gone = res.deleted.setdefault(tier.name, [])
        for key, size, mtime in tier.entries():
            kind, _, digest = key.rpartition("/")
            kind = kind.split("/")[0]
            if kind not in live or digest in live[kind]:
                continue
            if mtime > cutoff:
                res.young += 1
                continue
            if not dry_run:
                _check(check, res)
                tier.delete(key)
            gone.append((key, size))
    for tier in store.remote:  # multipart uploads (large manifests) whose writer died part way
        for key, upload_id, initiated in tier.uploads():
            if key.split("/")[0] not in live or initiated > cutoff:  # not thaw's (a shared bucket), or young
                continue
            res.scratch.append(f"{tier.name}: upload of {key}")
            if not dry_run:
                _check(check, res)
                tier.abort_upload(key, upload_id)
    for parent in (store.local.root / "tmp", store.local.root / "staging"):
        for p in sorted(parent.iterdir()) if parent.is_dir() else []:
            if _mtime(p) > cutoff:
                continue
            res.scratch.append(f"{parent.name}/{p.name}")
            if dry_run:
                continue
            _check(check, res)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    return res


def _check(check: Callable[[], None], res: GcResult) -> None:
    try:
        check()
    except Exception as e:
        raise GcError(f"gc stopped after deleting {sum(map(len, res.deleted.values()))} object(s): "
                      f"{first_line(e)}") from None


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except FileNotFoundError:  # gone meanwhile (a fetch renamed its temporary file into place)
        return float("inf")
