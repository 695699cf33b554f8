"""Image queries."""

from __future__ import annotations

from . import queries
from .models import Image
from .queries import NotFound  # noqa: F401  (re-exported: callers catch images.NotFound)


def register(url: str, image: Image) -> tuple[Image, bool]:
    return queries.register(url, image)


def get(url: str, ref: str) -> Image:
    return queries.by_prefix(url, Image, ref, "image", "thaw images ls")


def list_all(url: str) -> list[Image]:
    return queries.newest_first(url, Image)
