"""Build-queue activity of DeploymentPool: host health and buffer reservations, and the hosts placement chooses
from (registry only; the workflow places replicas itself, so a scale-up needs no round trip)."""

from __future__ import annotations

from collections import Counter

from temporalio import activity

from thaw.config import Config
from thaw.registry import deployments, snapshots
from thaw.registry.queries import NotFound
from thaw.snapshot import compat
from thaw.workflows.pool import HostSlot, HostsInput, HostsResult



class PoolActivities:
    def __init__(self, cfg: Config):
        self.cfg = cfg

    @activity.defn(name="pool_hosts")
    def pool_hosts(self, inp: HostsInput) -> HostsResult:
        """Every live host (a replica elsewhere is lost); of those that can run the model (a GPU model: GPU hosts
        only, restored or cold-booted), exactly ``buffer`` idle compatible ones reserved for the deployment (fewer
        if none), and each one's load."""
        url = self.cfg.registry_url
        try:
            facts = snapshots.get(url, inp.snapshot).host_facts
        except NotFound:  # removed while its pool was undeploying (a deploy of another one followed): no host
            facts = None  # can run it, and the undeploy gives its buffer back (it retried this for ever)
        alive = snapshots.live_hosts(url, self.cfg.host_stale_s)
        live = [h for h in alive if facts is not None and (compat.needs_gpu(h.facts) or not compat.needs_gpu(facts))]
        ok = {h.id for h in live if not compat.check(facts, h.facts)}
        every = deployments.replicas(url)  # one read for the load and the deployment's own rows: from two, a
        # replica whose row went in between (a stop) counted as another deployment's, holding a slot for nothing
        occupied = {r.host_id for r in every}
        rows = [r for r in every if r.deployment == inp.deployment]
        others = Counter(r.host_id for r in every if r.deployment != inp.deployment)
        names = {d.name for d in deployments.list_all(url)}

        def holder(h) -> str | None:  # a reservation of a deployment that is gone holds nothing
            return h.reserved_for if h.reserved_for in names else None
        idle = [h for h in live if h.id in ok and h.id not in occupied and h.id not in inp.busy
                and holder(h) in (None, inp.deployment)]
        idle.sort(key=lambda h: (holder(h) != inp.deployment, h.id))  # keep current reservations
        reserved = deployments.set_reservations(url, inp.deployment, [h.id for h in idle[: inp.buffer]])
        slots = [HostSlot(h.id, h.task_queue, h.capacity, others[h.id], h.id in ok,
                          inp.deployment if h.id in reserved else (None if holder(h) == inp.deployment
                                                                    else holder(h)))
                 for h in live]
        return HostsResult([h.id for h in alive], reserved, slots, [r.id for r in rows],
                           [r.id for r in rows if r.snapshot_digest != inp.snapshot])

    @activity.defn(name="forget_replicas")
    def forget_replicas(self, ids: list[str]) -> None:
        """Remove the rows of replicas an undeploy could not stop (their host was silent): their agent stops a
        replica with no row once it is heard from again (HostActivities.stop_orphans)."""
        for rid in ids:
            deployments.remove_replica(self.cfg.registry_url, rid)

    def all(self) -> list:
        return [self.pool_hosts, self.forget_replicas]
