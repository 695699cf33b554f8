"""Leases: claims on something every host shares, taken in one statement so that two takers cannot both win.

`thaw gc` takes ``STORE`` for its sweep and renews it while it runs; a build waits for it to go before it stores
chunks (it may reuse an unreferenced chunk that the sweep is about to delete) and before it registers (the
sweep marked what was registered when it began). A holder that died stops renewing: its lease runs out.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from sqlalchemy.exc import IntegrityError
from sqlmodel import delete, update

from .db import session
from .models import Lease

STORE = "store"
TTL_S = 60.0  # a lease not renewed for this long is free (its holder died)


class LeaseHeld(RuntimeError):
    """Someone else holds the lease; the message says who and until when."""


def current(url: str, name: str) -> Lease | None:
    """The lease ``name`` while someone holds it."""
    with session(url) as s:
        row = s.get(Lease, name)
    return row if row is not None and row.expires > time.time() else None


def take(url: str, name: str, holder: str, ttl_s: float = TTL_S) -> None:
    now = time.time()
    with session(url) as s:
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
    """Whether ``holder`` still held it (and now holds it for ``ttl_s`` more)."""
    with session(url) as s:
        res = s.exec(update(Lease).where(Lease.name == name, Lease.holder == holder)
                     .values(expires=time.time() + ttl_s))
        s.commit()
    return res.rowcount == 1


def give_back(url: str, name: str, holder: str) -> None:
    with session(url) as s:
        s.exec(delete(Lease).where(Lease.name == name, Lease.holder == holder))
        s.commit()


@contextmanager
def held(url: str, name: str, holder: str, ttl_s: float = TTL_S) -> Iterator[None]:
    """Hold the lease for the block (LeaseHeld if another does), renewed every third of ``ttl_s``."""
    take(url, name, holder, ttl_s)
    stop = threading.Event()

    def keep() -> None:
        while not stop.wait(ttl_s / 3):
            renew(url, name, holder, ttl_s)

    t = threading.Thread(target=keep, name=f"lease-{name}", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        give_back(url, name, holder)


def wait_free(url: str, name: str, waiting: Callable[[Lease], None] | None = None, poll_s: float = 1.0) -> None:
    """Return once nobody holds the lease; ``waiting`` is called with the holder's row each time round (a
    heartbeat)."""
    while (row := current(url, name)) is not None:
        if waiting is not None:
            waiting(row)
        time.sleep(poll_s)
