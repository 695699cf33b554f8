"""A deployment's front door (`thaw gateway NAME`): the gateway wired to its pool, and the KEDA scaler.

The gateway reads the serving replicas from the registry (an agent records a replica only once its health
check and golden replay passed) and sends its scale decisions as the pool's `scale` signal. The KEDA external
scaler reports the same gateway's concurrency, so a Kubernetes ScaledObject sees the numbers thaw acts on.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from temporalio.client import Client

from thaw.client import connect
from thaw.config import Config
from thaw.errors import first_line
from thaw.registry import deployments
from thaw.registry.queries import NotFound

from . import pool
from .gateway import Gateway, NotServing, serving
from .keda.scaler import Demand

log = logging.getLogger("thaw.gateway")

GATEWAY_QUERY_S = 1.0  # how long a gateway's scale signal waits for the pool to say whether it dropped it


class PoolBackends:
    """The gateway's view of a deployment: registry replicas in, pool signals out."""

    def __init__(self, cfg: Config, name: str, client: Client | None = None):
        self.cfg, self.name, self.client = cfg, name, client

    async def endpoints(self) -> list[str]:
        return [r.endpoint for r in await asyncio.to_thread(deployments.serving, self.cfg, self.name)]

    async def scale(self, replicas: int, reason: str, at_least: bool = False) -> None:
        if self.client is None:  # connected on the gateway's own loop, at first use
            self.client = await connect(self.cfg)
        try:  # report_dropped: an undeploying pool drops the signal (its replicas are going); the gateway's next
            # signals wait on the answer, so no longer than GATEWAY_QUERY_S (then the signal counts as heard)
            await pool.scale(self.client, self.name, replicas, "gateway", at_least, report_dropped=True,
                             query_s=GATEWAY_QUERY_S)
        except (NotFound, pool.Undeploying) as e:  # undeployed: its requests are answered 503 at once
            raise NotServing(str(e)) from None


class GatewayDemand:
    """KEDA's DemandSource over one gateway: what its last tick published (one dict, swapped whole on the
    gateway's loop, so reading it from the scaler's threads is safe)."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    def demand(self, deployment: str) -> Demand:
        g = self.gateway
        if deployment != g.deployment:
            raise KeyError(deployment)
        d = g.demand
        return Demand(desired_replicas=d["desired"], queued=d["queued"], inflight=d["inflight"],
                      ready_replicas=d["ready"])


async def follow_limits(cfg: Config, gw: Gateway, every_s: float = 5.0) -> None:
    """Keep the gateway's autoscaler within the deployment's --min/--max as `thaw deploy` changes them while it
    runs (it would otherwise never ask for more than the old --max, or never let go of the old --min)."""
    a = gw.autoscaler
    while True:
        await asyncio.sleep(every_s)
        try:
            dep = await asyncio.to_thread(deployments.get, cfg.registry_url, gw.deployment)
        except Exception as e:  # noqa: BLE001 - the registry down, or undeployed: keep the limits, look again
            log.warning("gateway %s: could not read the deployment's limits: %s", gw.deployment, first_line(e))
            continue
        if (a.min_replicas, a.max_replicas) != (dep.min_replicas, dep.max_replicas):
            log.info("gateway %s: replicas now --min %d --max %d (were %d, %s)", gw.deployment, dep.min_replicas,
                     dep.max_replicas, a.min_replicas, a.max_replicas)
            a.min_replicas, a.max_replicas = dep.min_replicas, dep.max_replicas


async def run(cfg: Config, name: str, port: int, keda_port: int | None, host: str = "127.0.0.1",
              **gateway_options) -> None:
    from .keda import serve as keda_serve

    dep = deployments.get(cfg.registry_url, name)
    gw = Gateway(name, PoolBackends(cfg, name), min_replicas=dep.min_replicas,
                 max_replicas=dep.max_replicas, **gateway_options)
    keda = None
    if keda_port is not None:
        keda, bound = keda_serve(GatewayDemand(gw), f"[{host}]:{keda_port}" if ":" in host else f"{host}:{keda_port}",
                                 registry=gw.registry)
        log.info("KEDA external scaler for %s on %s:%d", name, host, bound)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    limits = asyncio.ensure_future(follow_limits(cfg, gw))
    try:
        async with serving(gw, host, port) as url:
            log.info("gateway for %s on %s", name, url)
            await stop.wait()
    finally:
        limits.cancel()
        if keda:
            keda.stop(1)
