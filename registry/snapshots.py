"""Snapshot, host and restore-event queries."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Callable

from sqlmodel import col, delete, select, update

from . import queries
from .db import clock, session
from .models import Deployment, Host, Image, Replica, RestoreEvent, Snapshot


def register(url: str, snap: Snapshot) -> tuple[Snapshot, bool]:
    """NotFound when the snapshot's image is no longer registered (``thaw images rm`` during the build)."""
    return queries.register(url, snap, (Image, snap.image_digest, f"image {snap.image_digest[:12]} was removed "
                                        f"while its snapshot was built; nothing registered: build the image again"))


def get(url: str, ref: str) -> Snapshot:
    return queries.by_prefix(url, Snapshot, ref, "snapshot", "thaw snapshots ls")


def list_all(url: str, image_digest: str | None = None) -> list[Snapshot]:
    return queries.newest_first(url, Snapshot, **({"image_digest": image_digest} if image_digest else {}))


def remove(url: str, ref: str, pool_running: Callable[[str], bool],
           stale_s: float | None = None) -> tuple[Snapshot, list[str]]:
    """Forget snapshot ``ref`` and its restore events (its store objects stay until ``thaw gc``). Deployments
    of it whose pool has ended are forgotten too (returned); InUse while one of them runs a pool
    (``pool_running(name)``) or has replicas serving, or while replicas kept by ``thaw restore --keep`` serve.
    With ``stale_s``, a deployment's replicas on hosts silent that long do not count as serving (their rows
    go with it)."""
    row = get(url, ref)
    alive = {h.id for h in live_hosts(url, stale_s)} if stale_s is not None else None
    with session(url, write=True) as s:
        gone = s.exec(select(Snapshot).where(Snapshot.digest == row.digest).with_for_update()).first()  # a deploy
        if gone is None:  # of it waits (see queries.register); a concurrent `thaw snapshots rm` finished first
            raise queries.NotFound(f"no snapshot {row.digest[:12]} (removed meanwhile)")
        kept = s.exec(select(Replica.id).where(Replica.snapshot_digest == row.digest, Replica.deployment == "")).all()
        if kept:
            raise queries.InUse(f"snapshot {row.digest[:12]} has {len(kept)} replica(s) kept by `thaw restore --keep`: "
                                f"`thaw replicas stop {' '.join(kept)}` first")
        deps = s.exec(select(Deployment).where(Deployment.snapshot_digest == row.digest)).all()
        older = [r for r in s.exec(select(Replica).where(Replica.snapshot_digest == row.digest)).all()
                 if r.deployment not in {d.name for d in deps} and (alive is None or r.host_id in alive)]
        if older:  # replicas of a deployment moved on to another snapshot, not yet replaced: they read its files
            raise queries.InUse(f"snapshot {row.digest[:12]} still runs {len(older)} replica(s) of "
                                f"{', '.join(sorted({repr(r.deployment) for r in older}))}, deployed since with "
                                "another snapshot: they stop once replaced (`thaw status NAME`)")
        rows = {d.name: s.exec(select(Replica).where(Replica.deployment == d.name)).all() for d in deps}
        for d in deps:
            serving = [r.id for r in rows[d.name] if alive is None or r.host_id in alive]
            if serving or pool_running(d.name):
                raise queries.InUse(f"snapshot {row.digest[:12]} is deployed as {d.name!r}"
                                    f"{f' ({len(serving)} replica(s) serving)' if serving else ''}: "
                                    f"`thaw undeploy {d.name}` first")
        for d in deps:
            for r in rows[d.name]:  # on silent hosts only
                s.delete(r)
            s.delete(d)
        if deps:  # an ended pool that never released its buffer (terminated, say) must not hold hosts forever
            s.exec(update(Host).where(col(Host.reserved_for).in_([d.name for d in deps])).values(reserved_for=None))
        s.exec(delete(RestoreEvent).where(col(RestoreEvent.snapshot_digest) == row.digest))
        s.delete(gone)
        s.commit()
    return row, [d.name for d in deps]


def upsert_host(url: str, host_id: str, task_queue: str, facts: dict, pid: int | None, capacity: int = 4) -> Host:
    with session(url) as s:
        now = clock(s)  # the database's: every reader judges a heartbeat's age by it (live_hosts)
    return queries.upsert(url, Host(id=host_id, task_queue=task_queue), task_queue=task_queue, facts=facts, pid=pid,
                          capacity=capacity, started_at=now, heartbeat_at=now)


def heartbeat_host(url: str, host_id: str, gone: bool = False) -> None:
    """This host's agent lives (now); ``gone``: it stopped, so no work is placed there until it beats again."""
    with session(url, write=True) as s:
        row = s.get(Host, host_id)
        if row:
            row.heartbeat_at = datetime(1970, 1, 1, tzinfo=timezone.utc) if gone else clock(s)
            s.add(row)
            s.commit()


def get_host(url: str, host_id: str) -> Host:
    with session(url) as s:
        row = s.get(Host, host_id)
    if row is None:
        raise queries.NotFound(f"no host {host_id!r} in the registry: is its agent running (`thaw status`)?")
    return row


def live_hosts(url: str, stale_s: float) -> list[Host]:
    """Hosts whose agent heartbeated within ``stale_s`` seconds (by the database's clock), freshest first."""
    with session(url) as s:
        now = clock(s)
        hosts = list(s.exec(queries.select(Host).order_by(Host.id)).all())

    def age(h: Host) -> float:
        seen = h.heartbeat_at if h.heartbeat_at.tzinfo else h.heartbeat_at.replace(tzinfo=now.tzinfo)
        return (now - seen).total_seconds()

    return sorted((h for h in hosts if age(h) <= stale_s), key=age)


def list_hosts(url: str) -> list[Host]:
    with session(url) as s:
        return list(s.exec(queries.select(Host).order_by(Host.id)).all())


def record_restore(url: str, event: RestoreEvent) -> RestoreEvent:
    with session(url, write=True) as s:
        s.add(event)
        s.commit()
        s.refresh(event)
        return event


def restores(url: str, snapshot_digest: str | None = None, limit: int | None = None, replica: str | None = None
             ) -> list[RestoreEvent]:
    where = {"snapshot_digest": snapshot_digest, "replica": replica}
    return queries.newest_first(url, RestoreEvent, limit, **{k: v for k, v in where.items() if v})
