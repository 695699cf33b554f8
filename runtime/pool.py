"""Client side of DeploymentPool: every scale path (CLI, HTTP API, gateway, KEDA) ends in ``scale()`` here."""

from __future__ import annotations

import math
import re
import time
from datetime import timedelta

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowQueryFailedError
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from thaw.config import Config
from thaw.registry import deployments, snapshots
from thaw.registry.models import Deployment
from thaw.registry.queries import NotFound
from thaw.workflows.pool import WORKFLOW_ID, DeploymentPool, PoolSpec, PoolState, ScaleRequest


ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
QUERY_S = 5.0  # how long `thaw scale` waits for the pool to say whether it dropped the signal


def env_name_error(names, what: str = "--env") -> str | None:
    """One line naming those of ``names`` that are not environment variable names (None: all are)."""
    bad = sorted(k for k in names if not ENV_NAME.match(k))
    return f"{what} {', '.join(map(repr, bad))}: not an environment variable name" if bad else None


def env_error(env: dict, what: str = "--env") -> str | None:
    """One line on what makes ``env`` unusable as a process's environment (None: nothing does)."""
    nul = sorted(k for k, v in env.items() if "\0" in str(v))  # an environment goes NUL-separated
    return env_name_error(env, what) or (
        f"{what} {', '.join(nul)}: a NUL character in the value (no process can be given one)" if nul else None)


def workflow_id(name: str) -> str:
    return WORKFLOW_ID.format(name=name)


async def deploy(client: Client, cfg: Config, spec: PoolSpec) -> tuple[PoolSpec, bool]:
    """Store the deployment and start its pool, or update the running pool. Returns (spec, started)."""
    if not spec.name or not spec.name.replace("-", "").replace("_", "").isalnum():
        raise NotFound(f"deployment name {spec.name!r}: use letters, digits, '-' and '_'")
    if not 0 <= spec.min_replicas <= spec.max_replicas or spec.buffer < 0:
        raise NotFound(f"need 0 <= --min ({spec.min_replicas}) <= --max ({spec.max_replicas}) and --buffer >= 0")
    if not 0 <= spec.cooldown_s < math.inf:
        raise NotFound(f"--cooldown {spec.cooldown_s}: need a number of seconds >= 0")
    error = env_error(spec.env) or env_name_error(spec.secrets, "--secret")
    if error:
        raise NotFound(error)
    both = sorted(set(spec.env) & set(spec.secrets))
    if both:
        raise NotFound(f"{', '.join(both)}: given as --env and as --secret; a secret's value comes from "
                       f"`thaw secrets set` only")
    snap = snapshots.get(cfg.registry_url, spec.snapshot)
    spec.snapshot = snap.digest
    given = [o for o, v in (("--env", spec.env), ("--secret", spec.secrets)) if v]
    if given and snap.spec.get("sdk") is False:  # absent: built before thaw recorded it
        reach = f"{' and '.join(given)} {'reach' if len(given) > 1 else 'reaches'}"
        raise NotFound(f"snapshot {snap.digest[:12]}'s server does not use thaw_sdk: {reach} a restored replica only "
                       f"through the SDK's /thaw/after-restore, so every replica would cold-boot; put plain env in "
                       f"the snapshot (`thaw build snapshot --env`), or use thaw_sdk (a copy from 2026-11-28 on)")
    bad = [p for p in spec.ports if not 0 < p < 65536]
    if bad:
        raise NotFound(f"--port {', '.join(map(str, bad))}: a port is 1..65535")
    spec.ports = sorted({p for p in spec.ports if p != snap.spec["port"]})  # the server's port is always published
    spec.secrets = sorted(set(spec.secrets))  # the same set in another order is no new spec (no replica rolls)
    try:
        before = deployments.get(cfg.registry_url, spec.name)
    except NotFound:
        before = None
    # the row first: the pool's host checks count reservations of existing deployments only
    deployments.upsert(cfg.registry_url, Deployment(
        name=spec.name, snapshot_digest=spec.snapshot, min_replicas=spec.min_replicas,
        max_replicas=spec.max_replicas, buffer=spec.buffer, secrets=spec.secrets, env=spec.env or None,
        ports=spec.ports or None))
    try:
        if not await running(client, spec.name):
            try:
                await client.start_workflow(DeploymentPool.run, PoolState(spec, desired=spec.min_replicas),
                                            id=workflow_id(spec.name), task_queue=cfg.build_task_queue)
                return spec, True
            except WorkflowAlreadyStartedError:  # a deploy of the same name at once (CLI and API) started it
                pass
        await client.get_workflow_handle(workflow_id(spec.name)).signal(DeploymentPool.update, spec)
        return spec, False
    except BaseException as e:  # the pool was not told: the registry keeps what it had
        deployments.put_back(cfg.registry_url, spec.name, before)
        if isinstance(e, RPCError):
            raise PoolUnreachable(f"Temporal did not start or update the pool of deployment {spec.name!r}: "
                                  f"{e.message}") from None
        raise


class PoolUnreachable(RuntimeError):
    """Temporal did not answer about a pool (unavailable, timed out): unlike NotFound, the pool may well run."""


class Undeploying(RuntimeError):
    """The pool is undeploying: it drops scale signals."""


def _no_pool(name: str, e: RPCError, hint: str = "") -> Exception:
    if e.status == RPCStatusCode.NOT_FOUND:
        return NotFound(f"deployment {name!r} has no running pool ({e.message}){hint}")
    return PoolUnreachable(f"Temporal did not answer about the pool of deployment {name!r}: {e.message}")


async def running(client: Client, name: str) -> bool:
    """Whether deployment ``name``'s pool workflow runs (False: never started, ended, or its history is gone;
    PoolUnreachable: Temporal did not say)."""
    try:
        desc = await client.get_workflow_handle(workflow_id(name)).describe()
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            return False
        raise _no_pool(name, e) from None
    return desc.status == WorkflowExecutionStatus.RUNNING


def bounded(dep: Deployment, replicas: int) -> int:
    """The replica count the pool keeps for a scale to ``replicas`` (within the deployment's --min/--max)."""
    return max(dep.min_replicas, min(dep.max_replicas, replicas))


async def scale(client: Client, name: str, replicas: int, source: str, at_least: bool = False,
                report_dropped: bool = False, query_s: float = QUERY_S) -> None:
    """Signal deployment ``name``'s pool to run ``replicas`` replicas (``at_least``: or more, if it wants more).
    ``report_dropped`` (the CLI's, the API's and the gateway's calls): then ask the pool whether it is undeploying,
    which drops the signal, and raise Undeploying if so (the signal's time is taken before). A pool that does not
    answer that in ``query_s`` (its worker down, say) is taken to have the signal: it was sent."""
    if replicas < 0:
        raise NotFound(f"replicas must be >= 0 (got {replicas})")
    handle = client.get_workflow_handle(workflow_id(name))
    try:
        await handle.signal(DeploymentPool.scale, ScaleRequest(replicas, source, int(time.time() * 1000), at_least))
    except RPCError as e:
        raise _no_pool(name, e, "; `thaw deploy` it first") from None
    if report_dropped:
        try:
            st = await handle.query(DeploymentPool.state, rpc_timeout=timedelta(seconds=query_s))
        except (RPCError, WorkflowQueryFailedError):
            return
        if st.stopping:
            raise Undeploying(f"deployment {name!r} is undeploying: this scale was dropped (a `thaw deploy` starts "
                              f"its pool afresh once the undeploy ends)")


async def state(client: Client, name: str) -> PoolState:
    try:
        return await client.get_workflow_handle(workflow_id(name)).query(DeploymentPool.state)
    except RPCError as e:
        raise _no_pool(name, e) from None


async def undeploy(client: Client, name: str) -> None:
    try:
        await client.get_workflow_handle(workflow_id(name)).signal(DeploymentPool.stop)
    except RPCError as e:
        raise _no_pool(name, e) from None
