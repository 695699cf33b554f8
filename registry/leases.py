"""Leases: claims on something every host shares, taken in one statement so that two takers cannot both win.

`thaw gc` takes ``STORE`` for its sweep and renews it while it runs; a build waits for it to go before it stores
chunks (it may reuse an unreferenced chunk that the sweep is about to delete) and before it registers (the
sweep marked what was registered when it began). A holder that died stops renewing: its lease runs out.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator

from sqlalchemy.exc import IntegrityError
from sqlmodel import delete, literal_column, update

from thaw.errors import first_line

from .db import clock, session
from .models import Lease

STORE = "store"
TTL_S = 60.0  # a lease not renewed for this long is free (its holder died)


class LeaseHeld(RuntimeError):
    """Someone else holds the lease; the message says who and until when."""


def _now(s) -> float:
    """Epoch seconds by the database's clock (db.clock)."""
    return clock(s).timestamp()


def _now_sql(s):
    """The database's clock as epoch seconds, read when the statement runs: a renewal that waited on a lock
    must not judge the lease by the time it was sent."""
    if s.get_bind().dialect.name == "postgresql":
        return literal_column("extract(epoch FROM clock_timestamp())")
    return literal_column("((julianday('now') - 2440587.5) * 86400.0)")  # SQLite: this machine's clock, as _now


def current(url: str, name: str) -> Lease | None:
    """The lease ``name`` while someone holds it."""
    with session(url) as s:
        row = s.get(Lease, name)
        live = row is not None and row.expires > _now(s)
    return row if live else None


def take(url: str, name: str, holder: str, ttl_s: float = TTL_S) -> None:
    with session(url, write=True) as s:
        now = _now(s)
        try:
            s.add(Lease(name=name, holder=holder, since=now, expires=now + ttl_s))
            s.commit()
            return
        except IntegrityError:
            s.rollback()
        taken = s.exec(update(Lease).where(Lease.name == name, Lease.expires <= now)   # one that ran out
                       .values(holder=holder, since=now, expires=now + ttl_s))
        s.commit()
        if taken.rowcount == 1:
            return
        row = s.get(Lease, name)
    raise LeaseHeld(f"{row.holder} holds the {name} lease (for {now - row.since:.0f} s so far)" if row else
                    f"the {name} lease changed hands meanwhile; try again")


def renew(url: str, name: str, holder: str, ttl_s: float = TTL_S) -> bool:
    """Whether ``holder`` still held it, not run out (and now holds it for ``ttl_s`` more): a renewal that came
    too late does not bring back a lease that others already took as free."""
    with session(url, write=True) as s:
        now = _now_sql(s)
        res = s.exec(update(Lease).where(Lease.name == name, Lease.holder == holder, Lease.expires > now)
                     .values(expires=now + ttl_s))
        s.commit()
    return res.rowcount == 1


def give_back(url: str, name: str, holder: str) -> None:
    with session(url, write=True) as s:
        s.exec(delete(Lease).where(Lease.name == name, Lease.holder == holder))
        s.commit()


class Hold:
    """A lease being held: ``check()`` raises LeaseHeld once it was lost (its renewals failed until it ran out,
    or someone took it over), or once it may have run out: with ``ttl_s``, when no renewal sent in the last two
    thirds of it has come back (one stuck on a dead connection or a lock), so the holder stops before it acts
    without it."""

    def __init__(self, name: str, ttl_s: float | None = None) -> None:
        self.name, self.ttl_s = name, ttl_s
        self.lost: str | None = None
        self.renewed = time.monotonic()  # when the last take or renewal that came back was sent

    def check(self) -> None:
        if self.lost:
            raise LeaseHeld(f"the {self.name} lease was lost: {self.lost}")
        age = time.monotonic() - self.renewed
        if self.ttl_s is not None and age >= self.ttl_s * 2 / 3:
            raise LeaseHeld(f"the {self.name} lease was not renewed for {age:.0f} s: it may have run out")


@contextlib.contextmanager
def held(url: str, name: str, holder: str, ttl_s: float = TTL_S) -> Iterator[Hold]:
    """Hold the lease for the block (LeaseHeld if another does), renewed every third of ``ttl_s``; a renewal
    that fails (the database restarting, SQLite busy) is tried again at the next turn, and the hold counts as
    lost once the lease may have run out."""
    hold, stop = Hold(name, ttl_s), threading.Event()
    take(url, name, holder, ttl_s)

    def keep() -> None:
        sent = hold.renewed
        # a renewal a third of ttl_s after the last was sent (so one that took that long is followed at once)
        while not stop.wait(max(0.0, sent + ttl_s / 3 - time.monotonic())):
            sent = time.monotonic()
            try:
                if not renew(url, name, holder, ttl_s):
                    hold.lost = "it ran out before it was renewed, or someone else holds it now"
                    return
                hold.renewed = sent
            except Exception as e:  # noqa: BLE001 - tried again at the next turn
                if time.monotonic() - hold.renewed >= ttl_s * 2 / 3:  # the next failure would come after it ran out
                    hold.lost = f"not renewed for {time.monotonic() - hold.renewed:.0f} s ({first_line(e)})"
                    return

    t = threading.Thread(target=keep, name=f"lease-{name}", daemon=True)
    t.start()
    try:
        yield hold
    finally:
        stop.set()
        t.join(ttl_s)  # a renewal stuck on the database must not hold the holder's exit
        with contextlib.suppress(Exception):  # it runs out anyway
            give_back(url, name, holder)


def wait_free(url: str, name: str, waiting: Callable[[Lease], None] | None = None, poll_s: float = 1.0) -> None:
    """Return once nobody holds the lease; ``waiting`` is called with the holder's row each time round (a
    heartbeat)."""
    while (row := current(url, name)) is not None:
        if waiting is not None:
            waiting(row)
        time.sleep(poll_s)
