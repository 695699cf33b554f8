"""Queries shared by every table keyed by a digest or id: idempotent insert, upsert, lookup by unique prefix."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel, col, select

from .db import session

T = TypeVar("T", bound=SQLModel)


class NotFound(LookupError):
    pass


class InUse(ValueError):
    """A row that others still use cannot be removed; the message says which, and what to do first."""


def _pk(model: type[SQLModel]):
    (pk,) = model.__table__.primary_key.columns
    return getattr(model, pk.name)


def register(url: str, row: T, requires: tuple[type[SQLModel], str, str] | None = None) -> tuple[T, bool]:
    """Insert ``row`` unless its primary key is already registered. Returns (row, created). ``requires``
    (model, key, message): NotFound(message) instead, when that row is not registered; the row is locked until
    the insert commits (FOR SHARE on PostgreSQL, SQLite's write lock: see :func:`~.db.session`), so a delete that
    locks it first (:func:`images.remove`) either finishes before, or sees the new row."""
    model = type(row)
    key = getattr(row, _pk(model).key)
    with session(url, write=True) as s:
        existing = s.get(model, key)
        if existing:
            return existing, False
        require(s, requires)
        s.add(row)
        try:
            s.commit()
        except IntegrityError:  # a concurrent registration of the same key won
            s.rollback()
            return s.get(model, key), False
        s.refresh(row)
        return row, True


def require(s, requires: tuple[type[SQLModel], str, str] | None) -> None:
    """NotFound(message) unless the row ``requires`` names (model, key, message) is registered; locked until the
    caller's transaction ends (a ``write`` session): see :func:`register`."""
    if requires:
        need = requires[0]
        if s.exec(select(need).where(_pk(need) == requires[1]).with_for_update(read=True)).first() is None:
            raise NotFound(requires[2])


def upsert(url: str, new: T, requires: tuple[type[SQLModel], str, str] | None = None, **fields) -> T:
    """Insert ``new`` unless a row with its primary key exists; then set ``fields`` on the row. Returns the row.
    ``requires``: as for :func:`register`."""
    model = type(new)
    key = getattr(new, _pk(model).key)
    for attempt in (1, 2):
        with session(url, write=True) as s:
            require(s, requires)
            row = s.get(model, key) or new  # on the second attempt: the row that won
            for k, v in fields.items():
                setattr(row, k, v)
            s.add(row)
            try:
                s.commit()
            except IntegrityError:  # another process inserted the same key meanwhile: update that row instead
                if attempt == 2:
                    raise
                continue
            s.refresh(row)
            return row


def delete(url: str, model: type[SQLModel], key) -> None:
    """Delete the row of ``model`` with primary key ``key``, if there is one."""
    with session(url, write=True) as s:
        row = s.get(model, key)
        if row is not None:
            s.delete(row)
            s.commit()


def by_prefix(url: str, model: type[T], ref: str, what: str, ls_cmd: str) -> T:
    """Look up by full digest or unique prefix (at least 6 hex characters)."""
    ref = ref.removeprefix("blake3:").lower()
    if len(ref) < 6 or any(c not in "0123456789abcdef" for c in ref):
        article = "an" if what[0] in "aeiou" else "a"
        raise NotFound(f"{ref!r} is not {article} {what} digest (give at least 6 hex characters)")
    pk = _pk(model)
    with session(url) as s:
        rows = s.exec(select(model).where(col(pk).startswith(ref)).limit(2)).all()
    if not rows:
        raise NotFound(f"no {what} {ref} in the registry (see `{ls_cmd}`)")
    if len(rows) > 1:
        raise NotFound(f"{what} prefix {ref} is ambiguous; give more characters")
    return rows[0]


def newest_first(url: str, model: type[T], limit: int | None = None, **where) -> list[T]:
    with session(url) as s:
        q = select(model)
        for k, v in where.items():
            q = q.where(getattr(model, k) == v)
        return list(s.exec(q.order_by(col(model.created_at).desc()).limit(limit)).all())
