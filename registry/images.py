"""Image queries."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from .db import session
from .models import Image


class NotFound(LookupError):
    pass


def register(url: str, image: Image) -> tuple[Image, bool]:
    """Insert ``image`` unless its digest is already registered. Returns (row, created)."""
    with session(url) as s:
        existing = s.get(Image, image.digest)
        if existing:
            return existing, False
        s.add(image)
        try:
            s.commit()
        except IntegrityError:  # a concurrent registration of the same digest won
            s.rollback()
            return s.get(Image, image.digest), False
        s.refresh(image)
        return image, True


def get(url: str, ref: str) -> Image:
    """Look up by full digest or unique prefix (at least 6 hex characters)."""
    ref = ref.removeprefix("blake3:").lower()
    if len(ref) < 6 or any(c not in "0123456789abcdef" for c in ref):
        raise NotFound(f"{ref!r} is not an image digest (give at least 6 hex characters)")
    with session(url) as s:
        rows = s.exec(select(Image).where(col(Image.digest).startswith(ref)).limit(2)).all()
    if not rows:
        raise NotFound(f"no image {ref} in the registry (see `thaw images ls`)")
    if len(rows) > 1:
        raise NotFound(f"image prefix {ref} is ambiguous; give more characters")
    return rows[0]


def list_all(url: str) -> list[Image]:
    with session(url) as s:
        return list(s.exec(select(Image).order_by(col(Image.created_at).desc())).all())
