"""Deployment, replica and host-reservation queries (the runtime's view of the registry)."""

from __future__ import annotations

from sqlmodel import col, select, update

from .db import session
from .models import Deployment, Host, Replica, Snapshot
from . import queries
from .queries import NotFound
from .snapshots import live_hosts


def upsert(url: str, dep: Deployment) -> Deployment:
    """Create the deployment, or change an existing one's snapshot, replica bounds, buffer, secrets, env, ports."""
    fields = ("snapshot_digest", "min_replicas", "max_replicas", "buffer", "secrets", "env", "ports")
    gone = f"snapshot {dep.snapshot_digest[:12]} was removed meanwhile (`thaw snapshots ls`)"
    return queries.upsert(url, dep, (Snapshot, dep.snapshot_digest, gone), **{k: getattr(dep, k) for k in fields})


def get(url: str, name: str) -> Deployment:
    with session(url) as s:
        row = s.get(Deployment, name)
    if row is None:
        raise NotFound(f"no deployment {name!r} (see `thaw deploy`)")
    return row


def put_back(url: str, name: str, before: Deployment | None) -> None:
    """Undo an ``upsert`` of deployment ``name`` whose pool could not be started or told: ``before`` is the row
    it replaced (None: there was none, and the row goes)."""
    if before is not None:
        upsert(url, before)
    else:
        queries.delete(url, Deployment, name)


def list_all(url: str) -> list[Deployment]:
    with session(url) as s:
        return list(s.exec(select(Deployment).order_by(Deployment.name)).all())


def summary(d: Deployment) -> dict:
    """A deployment as the control API lists it: name, snapshot, replica bounds, buffer."""
    return {"name": d.name, "snapshot": d.snapshot_digest, "min": d.min_replicas, "max": d.max_replicas,
            "buffer": d.buffer}


def add_replica(url: str, rep: Replica) -> None:
    """NotFound when its snapshot was removed while it started (`thaw snapshots rm` counted no row of it yet):
    gc would take the files it reads."""
    with session(url, write=True) as s:
        if rep.snapshot_digest:
            queries.require(s, (Snapshot, rep.snapshot_digest, f"snapshot {rep.snapshot_digest[:12]} was removed "
                                f"while replica {rep.id} started: it is stopped"))
        s.merge(rep)
        s.commit()


def remove_replica(url: str, replica_id: str) -> None:
    queries.delete(url, Replica, replica_id)


def serving(cfg, deployment: str | None = None) -> list[Replica]:
    """``deployment``'s replicas (default: every replica) on live hosts: a host that stopped heartbeating keeps
    its rows (its agent removes them when it starts again, and its replicas count there if it comes back), but
    nobody is sent there."""
    alive = {h.id for h in live_hosts(cfg.registry_url, cfg.host_stale_s)}
    return [r for r in replicas(cfg.registry_url, deployment=deployment) if r.host_id in alive]


def replicas(url: str, deployment: str | None = None, host_id: str | None = None) -> list[Replica]:
    with session(url) as s:
        q = select(Replica)
        if deployment:
            q = q.where(Replica.deployment == deployment)
        if host_id:
            q = q.where(Replica.host_id == host_id)
        return list(s.exec(q.order_by(col(Replica.created_at))).all())


def set_reservations(url: str, deployment: str, host_ids: list[str]) -> list[str]:
    """Reserve ``host_ids`` for ``deployment`` and release its other hosts; returns the hosts reserved for it
    afterwards. A host another deployment reserved meanwhile stays that deployment's (conditional updates:
    two pools choosing the same idle host at once can't both get it)."""
    with session(url, write=True) as s:
        s.exec(update(Host).where(col(Host.reserved_for) == deployment, col(Host.id).not_in(host_ids))
               .values(reserved_for=None))
        s.exec(update(Host).where(col(Host.id).in_(host_ids),
                                  col(Host.reserved_for).is_(None) | (col(Host.reserved_for) == deployment)
                                  | col(Host.reserved_for).not_in(select(Deployment.name)))  # its deployment went
               .values(reserved_for=deployment))
        held = sorted(s.exec(select(Host.id).where(col(Host.reserved_for) == deployment)).all())
        s.commit()
        return held
