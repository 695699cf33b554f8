"""Client side of DeploymentPool: every scale path (CLI, HTTP API, gateway, KEDA) ends in ``scale()`` here."""

from __future__ import annotations

import time

from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError

from thaw.config import Config
from thaw.registry import deployments, snapshots
from thaw.registry.models import Deployment
from thaw.registry.queries import NotFound
from thaw.workflows.pool import WORKFLOW_ID, DeploymentPool, PoolSpec, PoolState, ScaleRequest


def workflow_id(name: str) -> str:
    return WORKFLOW_ID.format(name=name)


async def deploy(client: Client, cfg: Config, spec: PoolSpec) -> tuple[PoolSpec, bool]:
    """Store the deployment and start its pool, or update the running pool. Returns (spec, started)."""
    if not spec.name or not spec.name.replace("-", "").replace("_", "").isalnum():
        raise NotFound(f"deployment name {spec.name!r}: use letters, digits, '-' and '_'")
    if not 0 <= spec.min_replicas <= spec.max_replicas or spec.buffer < 0:
        raise NotFound(f"need 0 <= --min ({spec.min_replicas}) <= --max ({spec.max_replicas}) and --buffer >= 0")
    spec.snapshot = snapshots.get(cfg.registry_url, spec.snapshot).digest
    deployments.upsert(cfg.registry_url, Deployment(
        name=spec.name, snapshot_digest=spec.snapshot, min_replicas=spec.min_replicas,
        max_replicas=spec.max_replicas, buffer=spec.buffer, secrets=spec.secrets))
    handle = client.get_workflow_handle(workflow_id(spec.name))
    try:
        desc = await handle.describe()
        running = desc.status == WorkflowExecutionStatus.RUNNING
    except RPCError:
        running = False
    if running:
        await handle.signal(DeploymentPool.update, spec)
        return spec, False
    await client.start_workflow(DeploymentPool.run, PoolState(spec, desired=spec.min_replicas),
                                id=workflow_id(spec.name), task_queue=cfg.build_task_queue)
    return spec, True


async def scale(client: Client, name: str, replicas: int, source: str) -> None:
    if replicas < 0:
        raise NotFound(f"replicas must be >= 0 (got {replicas})")
    try:
        await client.get_workflow_handle(workflow_id(name)).signal(
            DeploymentPool.scale, ScaleRequest(replicas, source, int(time.time() * 1000)))
    except RPCError as e:
        raise NotFound(f"deployment {name!r} has no running pool ({e.message}); `thaw deploy` it first") from None


async def state(client: Client, name: str) -> PoolState:
    try:
        return await client.get_workflow_handle(workflow_id(name)).query(DeploymentPool.state)
    except RPCError as e:
        raise NotFound(f"deployment {name!r} has no running pool ({e.message})") from None


async def undeploy(client: Client, name: str) -> None:
    try:
        await client.get_workflow_handle(workflow_id(name)).signal(DeploymentPool.stop)
    except RPCError as e:
        raise NotFound(f"deployment {name!r} has no running pool ({e.message})") from None
