"""BuildSnapshot and RestoreSnapshot: launch a model once, checkpoint it, verify by replay, register; restore it.
StopReplicas stops replicas that ``thaw restore --keep`` left serving; ReplicaLog reads a serving replica's output.

Deterministic and small: every stage is an activity (so Temporal UI shows each with its duration); activities
that touch a process run on the chosen host's own task queue; only ids, digests and small specs travel.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, TimeoutType
from temporalio.exceptions import TimeoutError as ActivityTimeout
from temporalio.workflow import ActivityCancellationType

from .build_image import QUICK, RETRY, Staged, long_step
from .pool import StopReplicaInput


@dataclass
class Golden:
    """The request replayed after every restore; the answer must be byte-identical to the one at build (once the
    JSON fields in ``ignore`` are left out)."""

    path: str = "/"
    method: str = "GET"
    body_b64: str = ""  # base64 of the request body
    content_type: str = "application/json"
    ignore: list[str] = field(default_factory=list)  # fields of a JSON answer left out when it is compared


DEFAULT_PORT = 8080  # a server's port when neither --port nor the image's ExposedPorts names one


@dataclass
class ModelSpec:
    cmd: list[str] = field(default_factory=list)  # empty: the image's Entrypoint + Cmd
    port: int = 0  # 0: the image's one exposed TCP port, else DEFAULT_PORT
    health: str = "/healthz"  # snapshot.replica.DEFAULT_HEALTH (a launch fails fast on its 404s)
    env: dict[str, str] = field(default_factory=dict)  # plain env, part of the snapshot
    secrets: list[str] = field(default_factory=list)  # names only; values injected by the host after restore
    cwd: str = ""  # empty: the image's WorkingDir or /
    user: str = ""  # empty: the image's User (user[:group], names or ids), or root
    shm_bytes: int = 0  # the size of the server's /dev/shm; 0: 64 MiB (Docker's default)
    stop_signal: str = ""  # what asks the server to exit before a replica is stopped; empty: the image's StopSignal,
    # else SIGTERM
    ready_timeout_s: float = 600.0
    hook_token: str = ""  # what the SDK's hooks need (snapshot/sdk.py), drawn when the build is planned


@dataclass
class BuildSnapshotInput:
    image: str  # digest or unique prefix
    spec: ModelSpec
    golden: Golden
    host: str = ""  # host id; empty: any live host
    heartbeat_timeout_s: float = 30.0
    pickup_timeout_s: float = 300.0  # a host's work not picked up this long fails (its agent died meanwhile)
    activity_timeout_s: float = 3600.0  # storing the dump: hashing and uploading tens of GB (a GPU model's memory)


@dataclass
class Plan:
    image_digest: str
    spec: ModelSpec  # with the image's defaults filled in
    host_id: str
    task_queue: str


@dataclass
class CheckpointInput:
    build_id: str
    plan: Plan
    golden: Golden


@dataclass
class CheckpointResult:
    build_id: str
    dump_dir: str
    golden_digest: str
    golden_size: int
    host_facts: dict
    compat_key: str
    timings_ms: dict[str, int]
    sdk: bool | None = None  # whether the server answered the SDK's before-snapshot hook (None: an older agent)
    applied: dict | None = None  # golden_ignore and shm_bytes as the launch used them (None: an older agent)


@dataclass
class StoredSnapshot:
    digest: str
    size: int
    files: int
    new_bytes: int
    ms: int


@dataclass
class VerifyInput:
    plan: Plan
    snapshot_digest: str
    golden: Golden
    golden_digest: str
    host_facts: dict = field(default_factory=dict)  # the snapshot's (which GPU its process saw); {}: the host's


@dataclass
class VerifyResult:
    timings_ms: dict[str, int]


@dataclass
class RegisterSnapshotInput:
    build_id: str
    plan: Plan
    golden: Golden
    checkpoint: CheckpointResult
    stored: StoredSnapshot
    timings_ms: dict[str, int]


@dataclass
class BuildSnapshotResult:
    digest: str
    created: bool
    image_digest: str
    host_id: str
    compat_key: str
    size: int
    new_bytes: int
    timings_ms: dict[str, int]


@workflow.defn(name="BuildSnapshot")
class BuildSnapshot(Staged):
    @workflow.run
    async def run(self, inp: BuildSnapshotInput) -> BuildSnapshotResult:
        build_id = workflow.info().workflow_id
        quick = QUICK
        timings: dict[str, int] = {}

        self.stage = "plan"
        plan = await workflow.execute_activity("plan_snapshot", inp, result_type=Plan, **quick)
        # ready, the golden requests, the dump (up to 30 min of a big GPU model) and the profiling restore: the
        # build's activity timeout on top of the wait for ready (heartbeats catch a host that died)
        on_host = dict(task_queue=plan.task_queue,
                       start_to_close_timeout=timedelta(seconds=plan.spec.ready_timeout_s + inp.activity_timeout_s),
                       heartbeat_timeout=timedelta(seconds=inp.heartbeat_timeout_s), retry_policy=RETRY,
                       schedule_to_start_timeout=timedelta(seconds=inp.pickup_timeout_s),
                       cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED)  # then discard_build

        host_gone = False
        try:
            self.stage = "launch+checkpoint"
            ckpt = await workflow.execute_activity(
                "checkpoint_model", CheckpointInput(build_id, plan, inp.golden), result_type=CheckpointResult,
                **on_host)
            timings.update(ckpt.timings_ms)
            self.stage = "store"
            stored = await workflow.execute_activity(  # as long as its size needs: its heartbeats catch a dead host
                "store_snapshot", ckpt, result_type=StoredSnapshot,
                **{**on_host, "start_to_close_timeout": timedelta(seconds=inp.activity_timeout_s)})
            timings["store"] = stored.ms
            self.stage = "verify"
            ver = await workflow.execute_activity(
                "verify_snapshot", VerifyInput(plan, stored.digest, inp.golden, ckpt.golden_digest, ckpt.host_facts),
                result_type=VerifyResult, **on_host)
            timings.update({f"verify_{k}": v for k, v in ver.timings_ms.items()})
            self.stage = "register"
            snap = await workflow.execute_activity(  # it asks S3 for every chunk of the dump: as long as the store
                "register_snapshot", RegisterSnapshotInput(build_id, plan, inp.golden, ckpt, stored, timings),
                result_type=BuildSnapshotResult, **long_step(inp))
        except ActivityError as e:
            host_gone = isinstance(e.cause, ActivityTimeout) and e.cause.type == TimeoutType.SCHEDULE_TO_START
            raise
        finally:  # succeeded, failed or cancelled: the host drops the build's dir (a failed build's dump: GBs)
            if not host_gone and workflow.patched("discard-build"):  # builds that closed before it replay as they ran
                try:
                    await workflow.execute_activity(
                        "discard_build", build_id, task_queue=plan.task_queue, retry_policy=RETRY,
                        start_to_close_timeout=timedelta(minutes=2),
                        schedule_to_start_timeout=timedelta(seconds=min(60.0, inp.pickup_timeout_s)))
                except ActivityError as e:
                    workflow.logger.warning("build %s: its dir on host %s stays: %s", build_id, plan.host_id,
                                            e.cause)
        self.stage = "done"
        return snap


@dataclass
class RestoreInput:
    snapshot: str  # digest or unique prefix
    replicas: int = 1
    host: str = ""
    secrets: list[str] = field(default_factory=list)  # extra secret names (beyond the snapshot's)
    keep: bool = False  # leave the replicas serving (owned by the host agent) instead of stopping them
    heartbeat_timeout_s: float = 30.0
    pickup_timeout_s: float = 300.0  # as BuildSnapshotInput's


@dataclass
class RestorePlan:
    snapshot_digest: str
    host_id: str
    task_queue: str
    replicas: int
    secrets: list[str]
    keep: bool
    ready_timeout_s: float = 600.0  # the snapshot's: a restore that falls back to a cold boot waits for it


@dataclass
class ReplicaResult:
    replica: str
    outcome: str  # "restored" | "cold-boot"
    reason: str
    golden_ok: bool
    timings_ms: dict[str, int]
    endpoint: str = ""  # where a kept replica serves


@dataclass
class RestoreResult:
    snapshot_digest: str
    host_id: str
    replicas: list[ReplicaResult]
    total_ms: int


@workflow.defn(name="RestoreSnapshot")
class RestoreSnapshot:
    @workflow.run
    async def run(self, inp: RestoreInput) -> RestoreResult:
        plan = await workflow.execute_activity("plan_restore", inp, result_type=RestorePlan, **QUICK)
        return await workflow.execute_activity(
            "restore_replicas", plan, result_type=RestoreResult, task_queue=plan.task_queue,
            start_to_close_timeout=timedelta(seconds=1800 + plan.ready_timeout_s),  # a cold-boot fallback's wait too
            heartbeat_timeout=timedelta(seconds=inp.heartbeat_timeout_s),
            schedule_to_start_timeout=timedelta(seconds=inp.pickup_timeout_s),
            retry_policy=RetryPolicy(maximum_attempts=1) if plan.keep else RETRY)  # a retry would keep more


@dataclass
class StopTarget:
    replica_id: str
    task_queue: str  # of the agent that owns the replica


@workflow.defn(name="StopReplicas")
class StopReplicas:
    """Stop kept replicas, each by the agent that owns it (``stop_replica`` on that host's queue)."""

    @workflow.run
    async def run(self, targets: list[StopTarget]) -> None:
        await asyncio.gather(*(workflow.execute_activity(
            "stop_replica", StopReplicaInput(t.replica_id), task_queue=t.task_queue,
            start_to_close_timeout=timedelta(minutes=2), schedule_to_start_timeout=timedelta(seconds=30),
            retry_policy=RETRY) for t in targets))


@dataclass
class ReplicaLogInput:
    replica_id: str
    task_queue: str  # of the agent that owns the replica
    max_bytes: int = 16 << 10


@workflow.defn(name="ReplicaLog")
class ReplicaLog:
    """The end of a replica's stdout + stderr (or of the logs one that ended left), read by its host's agent."""

    @workflow.run
    async def run(self, inp: ReplicaLogInput) -> str:
        return await workflow.execute_activity(
            "replica_log", inp, result_type=str, task_queue=inp.task_queue,
            start_to_close_timeout=timedelta(seconds=30), schedule_to_start_timeout=timedelta(seconds=30),
            retry_policy=RETRY)
