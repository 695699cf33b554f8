"""Engine and sessions: SQLite file by default, PostgreSQL (or anything SQLAlchemy speaks) by DSN."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from sqlalchemy import event, inspect, literal, make_url, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.schema import CreateIndex
from sqlmodel import Session, SQLModel, create_engine

from thaw.errors import first_line
from thaw.files import changing

from . import models  # noqa: F401  (registers the tables)

log = logging.getLogger("thaw.registry")


SCHEMA_LOCK = 0x7468_6177  # PostgreSQL advisory lock id ("thaw") held while a process creates missing tables


@lru_cache(maxsize=8)
def engine(url: str) -> Engine:
    setup = nullcontext()
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        # processes opening a new file at once take turns: its switch to WAL fails at once when another holds it
        setup = changing(Path(parsed.database))
        eng = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(eng, "connect")
        def _pragmas(conn, _record):
            conn.isolation_level = None  # transactions begin below, not only at pysqlite's first write
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(eng, "begin")
        def _begin(conn):  # a writer takes the write lock before it reads what it checks (see session)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("thaw_write") else "BEGIN")
    elif parsed.get_backend_name() == "postgresql":
        # UTC sessions: a column made naive (by sqlmodel < 0.0.45) reads right; after the user's own options (the
        # URL's, else PGOPTIONS, which libpq reads only where none are given), not instead of them
        given = parsed.query.get("options") or os.environ.get("PGOPTIONS") or ""
        options = " ".join(filter(None, [given if isinstance(given, str) else " ".join(given), "-c timezone=UTC"]))
        eng = create_engine(url, pool_pre_ping=True, connect_args={"options": options})
        setup = _advisory_lock(eng, SCHEMA_LOCK)  # create_all looks, then creates: two at once clash
    else:
        eng = create_engine(url, pool_pre_ping=True)
    ddl = _writer(eng)  # each looks, then creates: under SQLite's write lock (a look before another process's
    with setup:  # write, then a write, fails at once)
        SQLModel.metadata.create_all(ddl)
        _add_missing_columns(ddl)
        _add_missing_indexes(ddl)
    return eng


@contextmanager
def _advisory_lock(eng: Engine, key: int) -> Iterator[None]:
    """PostgreSQL's session advisory lock ``key``, held on a connection of its own for the ``with`` block."""
    with eng.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})


def _add_missing_columns(eng: Engine) -> None:
    """Tables made by an older thaw gain the columns added since (all nullable or defaulted: the rows there
    already get the default)."""
    with eng.begin() as conn:
        insp = inspect(conn)  # on this connection: another one would wait for this one's SQLite write lock
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
def session(url: str, write: bool = False) -> Iterator[Session]:
    """A session; one transaction from its first statement to its commit. ``write``: it checks rows and then
    writes on what it saw. PostgreSQL locks the rows it checks (``with_for_update``); SQLite has no row locks,
    so such a session takes the database's write lock when it begins and other writers wait for its commit
    (readers do not)."""
    eng = engine(url)
    with Session(_writer(eng) if write else eng, expire_on_commit=False) as s:
        yield s


def clock(s: Session) -> datetime:
    """Now (UTC) by the database's clock where it is a server every host shares (PostgreSQL): the hosts' own
    clocks may disagree by more than a heartbeat's or a lease's age allows. SQLite lives on this machine: its
    clock is this one."""
    if s.get_bind().dialect.name == "postgresql":
        return s.exec(text("SELECT clock_timestamp()")).one()[0].astimezone(timezone.utc)
    return datetime.now(timezone.utc)


def _writer(eng: Engine) -> Engine:
    """``eng`` for transactions that check and then write: on SQLite they begin with ``BEGIN IMMEDIATE``."""
    return eng.execution_options(thaw_write=True)
