"""Engine and sessions: SQLite file by default, PostgreSQL (or anything SQLAlchemy speaks) by DSN."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from sqlalchemy import event, inspect, literal, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.schema import CreateIndex
from sqlmodel import Session, SQLModel, create_engine

from thaw.errors import first_line

from . import models  # noqa: F401  (registers the tables)

log = logging.getLogger("thaw.registry")


@lru_cache(maxsize=8)
def engine(url: str) -> Engine:
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        eng = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(eng, "connect")
        def _pragmas(conn, _record):
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
    elif url.startswith("postgresql"):  # UTC sessions: a column made naive (by sqlmodel < 0.0.45) reads right
        eng = create_engine(url, pool_pre_ping=True, connect_args={"options": "-c timezone=UTC"})
    else:
        eng = create_engine(url, pool_pre_ping=True)
    SQLModel.metadata.create_all(eng)
    _add_missing_columns(eng)
    _add_missing_indexes(eng)
    return eng


def _add_missing_columns(eng: Engine) -> None:
    """Tables made by an older thaw gain the columns added since (all nullable or defaulted: the rows there
    already get the default)."""
    insp = inspect(eng)
    with eng.begin() as conn:
        for table in SQLModel.metadata.sorted_tables:
            have = {c["name"] for c in insp.get_columns(table.name)}
            for col in table.columns:
                if col.name not in have:
                    ddl = col.type.compile(dialect=eng.dialect)
                    if col.default is not None and col.default.is_scalar and col.default.arg is not None:
                        ddl += " DEFAULT " + str(literal(col.default.arg, col.type).compile(
                            dialect=eng.dialect, compile_kwargs={"literal_binds": True}))
                    # two processes upgrading one registry at once: the second must not fail
                    guard = " IF NOT EXISTS" if eng.dialect.name == "postgresql" else ""
                    try:
                        conn.execute(text(f'ALTER TABLE "{table.name}" ADD COLUMN{guard} "{col.name}" {ddl}'))
                    except OperationalError as e:  # SQLite has no IF NOT EXISTS here
                        if "duplicate column name" not in str(e):
                            raise


def _add_missing_indexes(eng: Engine) -> None:
    """Tables made by an older thaw gain the indexes added since (create_all makes them only with a new table).
    Only missing ones are created (PostgreSQL locks the table for a CREATE INDEX even where it exists). One that
    cannot be made (a role that does not own the table) is only slower lookups: a warning, not a failure."""
    insp = inspect(eng)
    for table in SQLModel.metadata.sorted_tables:
        have = {i["name"] for i in insp.get_indexes(table.name)}
        for index in table.indexes:
            if index.name in have:
                continue
            try:
                with eng.begin() as conn:
                    conn.execute(CreateIndex(index, if_not_exists=True))
            except DBAPIError as e:  # another process made it meanwhile, or this role may not
                if index.name not in {i["name"] for i in inspect(eng).get_indexes(table.name)}:
                    log.warning("registry: index %s on %s not created (lookups by %s scan the table): %s",
                                index.name, table.name, ", ".join(c.name for c in index.columns), first_line(e))


@contextmanager
def session(url: str) -> Iterator[Session]:
    with Session(engine(url), expire_on_commit=False) as s:
        yield s
