"""Image queries."""

from __future__ import annotations

from sqlmodel import select

from . import queries
from .db import session
from .models import Image, Snapshot
from .queries import InUse, NotFound  # noqa: F401  (re-exported: callers catch images.NotFound)


def register(url: str, image: Image) -> tuple[Image, bool]:
    return queries.register(url, image)


def get(url: str, ref: str) -> Image:
    return queries.by_prefix(url, Image, ref, "image", "thaw images ls")


def list_all(url: str) -> list[Image]:
    return queries.newest_first(url, Image)


def remove(url: str, ref: str) -> Image:
    """Forget image ``ref`` (its store objects stay until ``thaw gc``). InUse while snapshots of it exist."""
    row = get(url, ref)
    with session(url, write=True) as s:
        locked = s.exec(select(Image).where(Image.digest == row.digest).with_for_update()).first()  # see
        if locked is None:  # queries.register
            raise NotFound(f"no image {row.digest[:12]} (removed meanwhile)")
        snaps = s.exec(select(Snapshot.digest).where(Snapshot.image_digest == row.digest)).all()
        if snaps:
            raise InUse(f"image {row.digest[:12]} has {len(snaps)} snapshot(s) ({', '.join(d[:12] for d in snaps)}): "
                        f"`thaw snapshots rm` them first")
        s.delete(locked)
        s.commit()
    return row
