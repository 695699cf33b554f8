"""Deployment, replica and host-reservation queries (the runtime's view of the registry)."""

from __future__ import annotations

from sqlmodel import col, func, select

from .db import session
from .models import Deployment, Host, Replica
from . import queries
from .queries import NotFound


def upsert(url: str, dep: Deployment) -> Deployment:
    """Create the deployment, or change an existing one's snapshot, replica bounds, buffer, secrets, env, ports."""
    fields = ("snapshot_digest", "min_replicas", "max_replicas", "buffer", "secrets", "env", "ports")
    return queries.upsert(url, dep, **{k: getattr(dep, k) for k in fields})


def get(url: str, name: str) -> Deployment:
    with session(url) as s:
        row = s.get(Deployment, name)
    if row is None:
        raise NotFound(f"no deployment {name!r} (see `thaw deploy`)")
    return row


def list_all(url: str) -> list[Deployment]:
    with session(url) as s:
        return list(s.exec(select(Deployment).order_by(Deployment.name)).all())


def add_replica(url: str, rep: Replica) -> None:
    with session(url) as s:
        s.merge(rep)
        s.commit()


def remove_replica(url: str, replica_id: str) -> None:
    with session(url) as s:
        row = s.get(Replica, replica_id)
        if row:
            s.delete(row)
            s.commit()


def replicas(url: str, deployment: str | None = None, host_id: str | None = None) -> list[Replica]:
    with session(url) as s:
        q = select(Replica)
        if deployment:
            q = q.where(Replica.deployment == deployment)
        if host_id:
            q = q.where(Replica.host_id == host_id)
        return list(s.exec(q.order_by(col(Replica.created_at))).all())


def load(url: str) -> dict[str, int]:
    """host id -> replicas running there."""
    with session(url) as s:
        return dict(s.exec(select(Replica.host_id, func.count()).group_by(Replica.host_id)).all())


def set_reservations(url: str, deployment: str, host_ids: list[str]) -> None:
    """Exactly ``host_ids`` are reserved for ``deployment`` afterwards."""
    with session(url) as s:
        for h in s.exec(select(Host).where((Host.reserved_for == deployment) | (col(Host.id).in_(host_ids)))).all():
            h.reserved_for = deployment if h.id in host_ids else None
            s.add(h)
        s.commit()
