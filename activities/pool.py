"""Build-queue activities of DeploymentPool: host health, buffer reservations and placement (registry only)."""

from __future__ import annotations

from temporalio import activity

from thaw.config import Config
from thaw.registry import deployments, snapshots
from thaw.snapshot import compat
from thaw.workflows.pool import HostsInput, HostsResult, PlacedHost, PlaceInput



class PoolActivities:
    def __init__(self, cfg: Config):
        self.cfg = cfg

    def _live(self, snapshot: str):
        """(live hosts that can run ``snapshot``'s model, the ones whose facts can restore it), freshest heartbeat
        first. A GPU model runs on GPU hosts only, restored or cold-booted."""
        snap = snapshots.get(self.cfg.registry_url, snapshot)
        live = snapshots.live_hosts(self.cfg.registry_url, self.cfg.host_stale_s)
        if compat.needs_gpu(snap.host_facts):
            live = [h for h in live if compat.needs_gpu(h.facts)]
        return live, [h for h in live if not compat.check(snap.host_facts, h.facts)]

    @activity.defn(name="pool_hosts")
    def pool_hosts(self, inp: HostsInput) -> HostsResult:
        """Live hosts, and exactly ``buffer`` idle compatible ones reserved for the deployment (fewer if none)."""
        live, ok = self._live(inp.snapshot)
        load = deployments.load(self.cfg.registry_url)
        idle = [h for h in ok if not load.get(h.id) and h.id not in inp.busy
                and h.reserved_for in (None, inp.deployment)]
        idle.sort(key=lambda h: (h.reserved_for != inp.deployment, h.id))  # keep current reservations
        reserved = [h.id for h in idle[: inp.buffer]]
        deployments.set_reservations(self.cfg.registry_url, inp.deployment, reserved)
        return HostsResult([h.id for h in live], reserved)

    @activity.defn(name="place_replicas")
    def place_replicas(self, inp: PlaceInput) -> list[PlacedHost]:
        """Hosts for ``count`` new replicas: compatible ones with free capacity, least loaded first, this
        deployment's buffer hosts first among equals. With no compatible host left, any live host: the replica cold-boots there."""
        live, ok = self._live(inp.snapshot)
        load = deployments.load(self.cfg.registry_url)
        for host_id in inp.pending:
            load[host_id] = load.get(host_id, 0) + 1
        out: list[PlacedHost] = []
        for pool in (ok, live):
            cands = [h for h in pool if h.id not in inp.exclude and h.reserved_for in (None, inp.deployment)]
            while len(out) < inp.count:
                free = [h for h in cands if load.get(h.id, 0) < h.capacity]
                if not free:
                    break
                h = min(free, key=lambda h: (load.get(h.id, 0), h.reserved_for != inp.deployment, h.id))
                load[h.id] = load.get(h.id, 0) + 1
                out.append(PlacedHost(h.id, h.task_queue))
        return out

    def all(self) -> list:
        return [self.pool_hosts, self.place_replicas]
