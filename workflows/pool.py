"""DeploymentPool: one long-running entity workflow per deployment.

It owns the deployment's replicas and its buffer of reserved idle hosts, and turns every scale signal (CLI,
HTTP control API, raw Temporal signal, gateway) into restores on hosts. A host newly reserved for the buffer is
warmed at once (its agent mounts the snapshot and pins its pages), so the first restore there is as fast as
the next. Deterministic: all I/O is in activities; the state is small and continues as new before the history
grows large.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import timedelta

from temporalio import workflow
from temporalio.workflow import ActivityCancellationType
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError
from temporalio.exceptions import CancelledError as ActivityCancelled

from .build_image import QUICK

WORKFLOW_ID = "pool-{name}"
RECENT = 20  # restores kept in the state for `thaw status NAME`
FAILURES = 5  # failed replica starts kept there, with their errors
SETTLE_S = 0.5  # a burst's signals and finished starts within this share one host check
STOP_TIMEOUT_S = 60  # a replica's stop on its host: drain, stop signal and grace, SIGKILL (thaw.config checks)
AVOID_S = 300  # a host where a replica start failed is placed on again this soon only if no other has room


@dataclass
class PoolSpec:
    name: str
    snapshot: str  # full digest
    min_replicas: int = 0
    max_replicas: int = 1
    buffer: int = 0
    secrets: list[str] = field(default_factory=list)
    cooldown_s: float = 30.0  # no scale-down sooner than this after the last scale-up
    check_every_s: float = 5.0  # host health / buffer check period
    start_timeout_s: float = 600.0
    heartbeat_timeout_s: float = 30.0
    env: dict[str, str] = field(default_factory=dict)  # delivered after each restore (plain env on a cold boot)
    ports: list[int] = field(default_factory=list)  # replica ports published besides the snapshot's server port
    history_limit: int = 8000  # events: continue as new past this (or when Temporal suggests it)


@dataclass
class ScaleRequest:
    replicas: int
    source: str = "signal"  # cli | api | temporal | gateway | keda
    at_ms: int = 0  # sender's wall clock (ms since epoch): signal → restore-start latency
    at_least: bool = False  # raise to ``replicas`` but never lower (the gateway's scale-ups)


@dataclass
class ReplicaInfo:
    id: str
    host_id: str
    task_queue: str
    endpoint: str
    outcome: str  # restored | cold-boot
    reason: str = ""
    timings_ms: dict[str, int] = field(default_factory=dict)
    started_at_ms: int = 0  # when the host began the restore (agent's wall clock)
    signal_ms: int = 0  # the scale signal that caused it
    ports: dict[str, str] = field(default_factory=dict)  # extra replica port -> host:port publishing it


@dataclass
class HostSlot:
    """A live host that can run the deployment's model, as the last host check saw it."""
    host_id: str
    task_queue: str
    capacity: int
    others: int  # replicas of other deployments on it
    compatible: bool  # its facts can restore the snapshot (else a replica cold-boots there)
    reserved_for: str | None = None


@dataclass
class StartReplicaInput:
    deployment: str
    snapshot: str
    secrets: list[str]
    signal_ms: int
    env: dict[str, str] = field(default_factory=dict)
    ports: list[int] = field(default_factory=list)
    replica_id: str = ""  # chosen by the pool, so it can stop a start it gave up on; "": the agent picks one


@dataclass
class StopReplicaInput:
    replica_id: str


@dataclass
class WarmInput:
    snapshot: str


@dataclass
class HostsInput:
    deployment: str
    snapshot: str
    buffer: int
    busy: list[str]  # hosts with replicas of this deployment (not idle, so not buffer)


@dataclass
class HostsResult:
    live: list[str]  # every live host, whether or not it can run the model (replicas of an earlier spec there)
    reserved: list[str]
    hosts: list[HostSlot] = field(default_factory=list)  # what placement chooses from
    rows: list[str] | None = None  # ids of the deployment's replicas the registry lists (None: not checked)
    rows_of_other_snapshots: list[str] = field(default_factory=list)  # of those, ones not of the spec's snapshot


def place(hosts: list[HostSlot], count: int, deployment: str, own: dict[str, int],
          avoid: frozenset[str] | set[str] = frozenset()) -> list[HostSlot]:
    """Hosts for ``count`` new replicas: compatible ones with free capacity, least loaded first, this deployment's
    buffer hosts first among equals; with no compatible host left, any other (the replica cold-boots there).
    ``own``: this deployment's replicas per host, running or starting. Hosts in ``avoid`` (where a start just
    failed: a secret missing there, a bad GPU) come last: else the one whose start failed, the least loaded
    after it, was chosen again each time while others had room."""
    load = {h.host_id: h.others + own.get(h.host_id, 0) for h in hosts}
    out: list[HostSlot] = []
    fine = [h for h in hosts if h.host_id not in avoid]
    for pool in ([h for h in fine if h.compatible], fine, [h for h in hosts if h.compatible], hosts):
        cands = [h for h in pool if h.reserved_for in (None, deployment)]
        while len(out) < count:
            free = [h for h in cands if load[h.host_id] < h.capacity]
            if not free:
                break
            h = min(free, key=lambda h: (load[h.host_id], h.reserved_for != deployment, h.host_id))
            load[h.host_id] += 1
            out.append(h)
    return out


@dataclass
class StartFailure:
    """A replica start that failed: where, when (ms since epoch) and the error its host or Temporal gave."""
    replica: str
    host_id: str
    at_ms: int
    error: str


@dataclass
class PoolState:
    spec: PoolSpec
    desired: int = 0
    replicas: list[ReplicaInfo] = field(default_factory=list)
    reserved: list[str] = field(default_factory=list)
    recent: list[ReplicaInfo] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # restored, cold-boot, failed, lost, back, gone, stopped
    last_signal: ScaleRequest | None = None
    asks: list[ScaleRequest] = field(default_factory=list)  # scale-ups not yet placed in full, oldest first
    last_scale_up_s: float = 0.0
    stopping: bool = False
    warmed: list[str] = field(default_factory=list)  # buffer hosts asked to warm the snapshot
    failed_in_a_row: int = 0  # replica starts that failed since the last one that worked (backoff)
    lost: list[ReplicaInfo] = field(default_factory=list)  # given up with their silent host: stopped if it returns
    outdated: list[str] = field(default_factory=list)  # replicas of an earlier spec: replaced, then stopped
    failures: list[StartFailure] = field(default_factory=list)  # the last FAILURES failed starts, newest first
    last_ok_ms: int = 0  # when the last start that worked ended (ms since epoch): later failures are "current"
    avoid: dict[str, float] = field(default_factory=dict)  # host id -> until when (s) placement avoids it


def _differs(a: PoolSpec, b: PoolSpec) -> bool:
    """Whether a replica started under spec ``a`` is not what spec ``b`` asks for."""
    return (a.snapshot, a.secrets, a.env, a.ports) != (b.snapshot, b.secrets, b.env, b.ports)


@workflow.defn(name="DeploymentPool")
class DeploymentPool:
    @workflow.init  # the state exists before any signal: a signal can be handled before run() starts
    def __init__(self, state: PoolState) -> None:
        self.s = state
        self.wake = False
        self.starting: list[str] = []  # host ids of replica starts in flight (background tasks)
        self.tasks: dict[asyncio.Task, None] = {}  # insertion-ordered: the same order on a replay
        self.hosts: list[HostSlot] = []  # from the last host check: a scale-up places without a round trip
        self.hosts_at = 0.0  # when that check answered (workflow time, s)
        self.draining = False  # waiting for starts to end before continue-as-new: no new ones
        self.stopping_on: list[str] = []  # host ids of replicas a scale-down is stopping (they hold capacity)
        self.placed = 0  # replica starts placed so far by this run
        self.backoff = 0  # failed starts waiting out their backoff: their slot is held, their replica is not
        self.updates = 0  # update signals received (a new spec ends a failed start's backoff)
        self.redeploy: PoolSpec | None = None  # the spec of a deploy that came while undeploying
        self.short = 0  # scale-ups in a row that found too little capacity (their retries back off)
        self.stopping_ids: list[str] = []  # replicas whose stop is under way

    @workflow.signal
    def scale(self, req: ScaleRequest) -> None:
        if self.s.stopping:  # undeploying: every replica goes
            return
        sp = self.s.spec
        n = max(req.replicas, self.s.desired) if req.at_least and workflow.patched("scale-at-least") else req.replicas
        self.s.desired = max(sp.min_replicas, min(sp.max_replicas, n))
        self.s.last_signal = req
        # a replica is timed from the first signal that asked for it (a burst of 1, 2, ... 8 is 8 signals);
        # what a later signal no longer wants, or what runs already, is not asked for any more
        have = self._have()
        asks = [replace(a, replicas=min(a.replicas, self.s.desired)) for a in self.s.asks[-31:]]
        self.s.asks = [a for a in asks + [replace(req, replicas=self.s.desired)] if a.replicas > have]
        self.wake = True
        # place at once on the hosts the last check saw: the loop may be waiting on a host check, and a signal
        # of a burst must not wait for it (what cannot be placed here, the loop places after its check). Not on
        # hosts seen long ago: the loop may be in a long wait (stopping replicas, a host check being retried)
        fresh = workflow.now().timestamp() - self.hosts_at <= 2 * self.s.spec.check_every_s
        if self._missing() > 0 and self.hosts and fresh and not self.draining and workflow.patched("place-on-signal"):
            self._place(self._missing())

    @workflow.signal
    def update(self, spec: PoolSpec) -> None:
        if self.s.stopping:  # deployed again while undeploying: a fresh run follows the stop (else it was lost)
            if workflow.patched("redeploy-while-stopping"):
                self.redeploy = spec
            return
        self.updates += 1
        if spec.snapshot != self.s.spec.snapshot:
            self.s.warmed = []
            if workflow.patched("hosts-per-snapshot"):  # the last check's compatibility was the old snapshot's
                self.hosts, self.hosts_at = [], 0.0
        if _differs(self.s.spec, spec) and workflow.patched("roll-on-update"):  # a new snapshot, env, secrets or
            # ports: new replicas take the old ones' place, then the old ones stop (they serve until then)
            ours = self.s.replicas + (self.s.lost if workflow.patched("roll-lost") else [])  # and none of those
            self.s.outdated += [r.id for r in ours if r.id not in self.s.outdated]  # is taken back when seen again
        self.s.spec = spec
        self.s.desired = max(spec.min_replicas, min(spec.max_replicas, self.s.desired))
        self.wake = True

    @workflow.signal
    def stop(self) -> None:
        self.s.stopping = True
        self.redeploy = None
        self.wake = True

    @workflow.query
    def state(self) -> PoolState:
        return self.s

    @workflow.run
    async def run(self, state: PoolState) -> PoolState:
        self.s.desired = max(self.s.spec.min_replicas, self.s.desired)
        if self._missing() > 0 and workflow.patched("place-at-run-start"):  # continued as new short of replicas:
            self.wake = True  # place now, not after a check's period
        try:
            while True:
                try:
                    await workflow.wait_condition(lambda: self.wake,
                                                  timeout=timedelta(seconds=self.s.spec.check_every_s))
                except asyncio.TimeoutError:
                    pass
                else:
                    await self._settle()
                self.wake = False
                if self.s.stopping or self._cancelled():
                    break
                await self._reconcile()
                if self._cancelled():
                    break
                length = workflow.info().get_current_history_length()
                if workflow.info().is_continue_as_new_suggested() or length > self.s.spec.history_limit:
                    busy = self.starting or self._stops() or not workflow.all_handlers_finished()
                    if busy and length < 2.5 * self.s.spec.history_limit and workflow.patched("drain-when-idle"):
                        continue  # on a turn with nothing under way: waiting for a start to end (minutes, for
                        # a cold boot) checked no host and placed nothing meanwhile
                    self.draining = True
                    tasks = workflow.patched("drain-background")  # a lost replica's stop too: the next run can't
                    await workflow.wait_condition(lambda: not self.starting and not (tasks and self._stops())
                                                  and workflow.all_handlers_finished())
                    if (self.s.stopping or self._cancelled()) and workflow.patched("undeploy-while-draining"):
                        break  # undeployed meanwhile: stopped here, where a deploy that followed is not lost
                    workflow.continue_as_new(self.s)
        except asyncio.CancelledError:
            if not self._cancelled():
                raise
        cancelled = False
        while True:  # undeploy; a cancel (Temporal UI, `temporal workflow cancel`) undeploys too, even midway
            if self._cancelled() and not cancelled:  # a deploy that came before it does not stand
                cancelled, self.s.stopping, self.redeploy = True, True, None
            try:
                await self._stop_everything()
            except asyncio.CancelledError:
                if not self._cancelled():
                    raise
                continue
            if not (self._cancelled() and self.s.replicas):  # else stops the cancel cut short: again
                break
        cancelled = cancelled or self._cancelled()  # one that came during the last round ends it cancelled too
        if self.redeploy is not None:  # deployed again while undeploying: a fresh run with the new spec
            stale = [r.id for r in self.s.lost] if workflow.patched("roll-lost") else []  # the undeploy's: not
            workflow.continue_as_new(PoolState(self.redeploy, desired=self.redeploy.min_replicas,  # taken back,
                                               lost=self.s.lost, outdated=stale))  # stopped when seen again
        if cancelled:
            raise asyncio.CancelledError(f"pool cancelled ({workflow.cancellation_reason() or 'no reason given'})")
        return self.s

    async def _settle(self) -> None:
        """Woken with nothing to place or stop (a signal placed its replicas itself, a start ended): wait a
        moment before the host check, so that a burst of signals and of finished starts shares one check. Every
        check is a workflow task more, and the signals of the burst queued behind each one (P5)."""
        if self._missing() != 0 or self.s.stopping or not workflow.patched("settle-before-check"):
            return
        with contextlib.suppress(asyncio.TimeoutError):  # what cannot wait ends it: a scale-up the signal could
            # not place in full, a scale-down, an undeploy
            await workflow.wait_condition(lambda: self._missing() != 0 or self.s.stopping,
                                          timeout=timedelta(seconds=SETTLE_S))

    def _stops(self) -> list[asyncio.Task]:
        """Background stops under way (of replicas whose silent host came back): a run must not end before
        them, or a stop not yet started would be dropped with it."""
        return [t for t in self.tasks if t.get_name() == "stop"]

    def _cancelled(self) -> bool:
        """Whether the pool was cancelled. Not only a CancelledError says so: one that reaches the pool while it
        waits on an activity comes out of that activity as its ActivityError, which the loop rides out."""
        return workflow.cancellation_reason() is not None and workflow.patched("undeploy-on-cancel")

    async def _stop_everything(self) -> None:
        """Stop every replica (and those left on hosts that went silent), then give the buffer's hosts back:
        no other pool may take them until then."""
        self.s.desired = 0
        await workflow.wait_condition(lambda: not self.starting)
        lost, self.s.lost = self.s.lost, []  # those whose stop fails now join it again: not tried twice here
        await self._scale_down(force=True)
        if workflow.patched("stop-lost-on-undeploy"):
            await asyncio.gather(*(self._stop(r) for r in lost), *self._stops())
        else:
            self.s.lost = lost + self.s.lost
        if self.s.lost and self.redeploy is None and workflow.patched("forget-lost-on-undeploy"):  # no run
            # follows to stop them when their hosts are seen again: their agents do, once the rows are gone
            try:
                await workflow.execute_activity("forget_replicas", [r.id for r in self.s.lost], **QUICK)
            except ActivityError as e:
                workflow.logger.warning("pool %s: %d replica(s) on silent hosts keep their rows: %s",
                                        self.s.spec.name, len(self.s.lost), e.cause or e)
        while True:
            try:
                await self._hosts(buffer=0, keep_last=False)
                break
            except ActivityError:
                await workflow.sleep(10)

    def _count(self, key: str, n: int = 1) -> None:
        self.s.counts[key] = self.s.counts.get(key, 0) + n

    async def _hosts(self, buffer: int, keep_last: bool = True) -> HostsResult:
        """Check the hosts and reserve ``buffer`` of them; where the check fails (the registry is down for a
        moment) and ``keep_last``, go on with what the last check saw."""
        busy = sorted({r.host_id for r in self.s.replicas} | set(self.starting))
        snapshot = self.s.spec.snapshot
        try:
            res = await workflow.execute_activity(
                "pool_hosts", HostsInput(self.s.spec.name, snapshot, buffer, busy),
                result_type=HostsResult, **QUICK)
        except ActivityError as e:
            if not keep_last:
                raise
            workflow.logger.warning("pool %s: host check failed: %s", self.s.spec.name, e.cause or e)
            return HostsResult(busy, self.s.reserved, self.hosts)
        if snapshot != self.s.spec.snapshot and workflow.patched("hosts-per-snapshot"):  # a new snapshot came
            self.s.reserved = res.reserved  # during the check: what it found placeable was for the old one
            return res
        self.s.reserved, self.hosts, self.hosts_at = res.reserved, res.hosts, workflow.now().timestamp()
        if self.s.lost and not self.s.stopping and workflow.patched("adopt-back"):
            self._adopt(res)
        if workflow.patched("warm-buffer-hosts"):
            self._warm(res)
        return res

    def _adopt(self, res: HostsResult) -> None:
        """Take back lost replicas whose host is live again and still lists them (so they serve), as many as the
        pool misses: every host looks silent after a registry outage longer than host_stale_s, say, and nothing
        could replace them. Before any placement on these hosts; the others are stopped (``_reconcile``)."""
        rows = set(res.rows or ()) - set(res.rows_of_other_snapshots)  # not one of a snapshot deployed before
        keep = [r for r in self.s.lost if r.host_id in res.live and r.endpoint and r.id in rows
                and r.id not in self.s.outdated]  # not of a spec deployed since (stopped instead)
        keep = keep[:max(0, self._missing())]
        if keep:
            self.s.lost = [r for r in self.s.lost if r not in keep]
            self.s.replicas += keep
            self._count("back", len(keep))

    def _warm(self, res: HostsResult) -> None:
        """Warm the buffer hosts reserved since the last check, in the background."""
        self.s.warmed = [h for h in self.s.warmed if h in res.reserved]
        queues = {h.host_id: h.task_queue for h in res.hosts}  # reserved hosts are live ones: all here
        for host_id in res.reserved:
            if host_id not in self.s.warmed:
                self.s.warmed.append(host_id)
                self._background(self._warm_one(queues[host_id]), "warm")

    def _background(self, coro, name: str) -> asyncio.Task:
        """Run ``coro`` as a workflow task (``name``: "warm", "start" or "stop") while the loop goes on answering
        signals."""
        task = asyncio.create_task(coro, name=name)
        self.tasks[task] = None
        task.add_done_callback(lambda t: self.tasks.pop(t, None))
        return task

    async def _warm_one(self, task_queue: str) -> None:
        sp = self.s.spec
        try:
            await workflow.execute_activity(
                "warm_snapshot", WarmInput(sp.snapshot), task_queue=task_queue,
                start_to_close_timeout=timedelta(seconds=sp.start_timeout_s),
                heartbeat_timeout=timedelta(seconds=sp.heartbeat_timeout_s),
                schedule_to_start_timeout=timedelta(seconds=sp.heartbeat_timeout_s),
                retry_policy=RetryPolicy(maximum_attempts=1))
        except Exception:  # noqa: BLE001 - best effort: a restore there still works, only slower
            pass

    def _current(self) -> int:
        """Replicas running the spec (not the outdated ones that new ones replace)."""
        return len([r for r in self.s.replicas if r.id not in self.s.outdated])

    def _missing(self) -> int:
        return self.s.desired - self._current() - len(self.starting)

    def _have(self) -> int:
        """Replicas running or on their way, as scale signals count them (a failed start in backoff is not)."""
        return self._current() + len(self.starting) - self.backoff

    async def _reconcile(self) -> None:
        if self._missing() > 0 and self.hosts:  # a scale-up starts at once, on the hosts the last check saw
            await self._scale_up(self._missing())
        known = {r.id for r in self.s.replicas}  # a start that ends during the check is not in its rows
        before = self.placed
        hosts = await self._hosts(self.s.spec.buffer)
        if (self.s.stopping and workflow.patched("reconcile-stop")) or self._cancelled():  # undeployed during
            return  # the check: the loop stops everything next
        # a signal placed replicas during the check, on hosts it may have reserved as idle buffer hosts
        placed_meanwhile = self.placed != before
        lost = [r for r in self.s.replicas if r.host_id not in hosts.live]
        if lost:  # their host stopped heartbeating: replace them
            self.s.replicas = [r for r in self.s.replicas if r.host_id in hosts.live]
            self._count("lost", len(lost))
        if workflow.patched("stop-lost"):  # a host back from a pause or a network split still runs them
            back = [r for r in self.s.lost if r.host_id in hosts.live]
            self.s.lost = [r for r in self.s.lost if r.host_id not in hosts.live] + lost
            self.s.lost = self.s.lost[-64:]
            for r in back:
                self._background(self._stop(r), "stop")
        if hosts.rows is not None and workflow.patched("pool-drop-gone"):  # their process died, or their agent
            # restarted: the row went with them
            gone = {r.id for r in self.s.replicas if r.id in known and r.id not in hosts.rows}
            if gone:
                self.s.replicas = [r for r in self.s.replicas if r.id not in gone]
                self._count("gone", len(gone))
        ids = {r.id for r in self.s.replicas}
        if workflow.patched("roll-lost"):  # lost ones stay outdated too, and those whose stop is under way (a stop
            ids |= {r.id for r in self.s.lost} | set(self.stopping_ids)  # that fails puts its replica among them)
        self.s.outdated = [i for i in self.s.outdated if i in ids]
        missing = self._missing()
        if missing > 0:
            await self._scale_up(missing)
        elif (missing < 0 or self.s.outdated) and not self.starting:  # outdated ones: once replaced
            await self._scale_down()
        if missing or placed_meanwhile:  # hosts turned busy or idle: refill the buffer now, not at the next check
            await self._hosts(self.s.spec.buffer)

    async def _scale_up(self, n: int) -> None:
        """Place n replicas; where the hosts lack capacity, look again shortly (1, 2, 4 s ... up to a check's
        period while they still lack it)."""
        if self._place(n) >= n:
            self.short = 0
            return
        self.wake = True
        self.short += 1
        if not workflow.patched("short-backoff"):
            await workflow.sleep(1)
            return
        with contextlib.suppress(asyncio.TimeoutError):  # an undeploy ends the wait
            await workflow.wait_condition(lambda: self.s.stopping, timeout=timedelta(
                seconds=min(self.s.spec.check_every_s, 2 ** min(self.short - 1, 6))))

    def _place(self, n: int) -> int:
        """Place up to n replicas on the hosts the last check saw and start them in the background (the loop and
        the signal handlers go on meanwhile); returns how many were placed."""
        last = self.s.last_signal.at_ms if self.s.last_signal else 0
        own = Counter([r.host_id for r in self.s.replicas] + self.starting + self.stopping_on)
        now = workflow.now().timestamp()
        self.s.avoid = {h: until for h, until in self.s.avoid.items() if until > now}
        placed = place(self.hosts, n, self.s.spec.name, own, set(self.s.avoid))
        for h in placed:
            self.placed += 1
            self.starting.append(h.host_id)
            count = self._have()  # this replica's number
            sig = next((a.at_ms for a in self.s.asks if a.replicas >= count), last)
            self._background(self._start(h, sig), "start")
        count = self._have()
        self.s.asks = [a for a in self.s.asks if a.replicas > count]  # the others are placed in full
        self.s.last_scale_up_s = workflow.now().timestamp()
        return len(placed)

    async def _start(self, h: HostSlot, sig: int) -> None:
        sp = self.s.spec
        rid = f"r-{workflow.uuid4().hex[:10]}" if workflow.patched("pool-replica-ids") else ""
        backing_off, aside = False, None
        try:
            info = await workflow.execute_activity(
                "start_replica", StartReplicaInput(sp.name, sp.snapshot, sp.secrets, sig, sp.env, sp.ports, rid),
                result_type=ReplicaInfo,
                task_queue=h.task_queue, start_to_close_timeout=timedelta(seconds=sp.start_timeout_s),
                heartbeat_timeout=timedelta(seconds=sp.heartbeat_timeout_s),
                schedule_to_start_timeout=timedelta(seconds=sp.heartbeat_timeout_s),  # placed on a host that died
                retry_policy=RetryPolicy(maximum_attempts=1))  # a failed host: place again, elsewhere
            self.s.replicas.append(info)
            if _differs(sp, self.s.spec) and workflow.patched("roll-on-update"):  # started before an update
                self.s.outdated.append(info.id)
            self.s.recent = [info, *self.s.recent][:RECENT]
            self._count(info.outcome)
            self.s.failed_in_a_row = 0
            self.s.last_ok_ms = int(workflow.now().timestamp() * 1000)
            self.s.avoid.pop(h.host_id, None)
        except Exception as e:  # noqa: BLE001 - counted; the next reconcile places it again, after a fresh host check
            self._count("failed")
            if workflow.patched("avoid-failed-hosts"):  # elsewhere, where another host has room
                self.s.avoid[h.host_id] = workflow.now().timestamp() + AVOID_S
            why = str(e.cause or e) if isinstance(e, ActivityError) else str(e)
            self.s.failures = [StartFailure(rid, h.host_id, int(workflow.now().timestamp() * 1000), why[:1000]),
                               *self.s.failures][:FAILURES]
            # its replacement is timed from the same signal
            self.s.asks.insert(0, ScaleRequest(self._have(), "retry", sig))
            if workflow.patched("retry-ask"):  # else a signal or placement meanwhile counts this slot as
                self.backoff += 1  # its replacement, and drops that ask
                backing_off = True
            self.hosts = []
            if rid:  # timed out, say, while the agent goes on: it must not keep a replica nobody counts
                gone = ReplicaInfo(rid, h.host_id, h.task_queue, "", "")
                if workflow.patched("stop-failed-start-aside"):  # its host may be dead: a stop waits 30 s for it,
                    aside = self._background(self._stop(gone), "stop")  # not the replacement
                else:
                    await self._stop(gone)
            self.s.failed_in_a_row += 1
            if workflow.patched("start-backoff"):  # a start that fails at once (a missing secret) must not spin
                seen = self.updates
                with contextlib.suppress(asyncio.TimeoutError):  # an undeploy or a new spec ends the wait
                    await workflow.wait_condition(lambda: self.s.stopping or self.updates != seen, timeout=timedelta(
                        seconds=min(60, 2 ** min(self.s.failed_in_a_row - 1, 6))))
        finally:
            if backing_off:
                self.backoff -= 1
            self.starting.remove(h.host_id)
            if aside is not None and not aside.done():  # the slot stays taken until its replica is stopped
                self.stopping_on.append(h.host_id)
                aside.add_done_callback(lambda _: self.stopping_on.remove(h.host_id))
            self.wake = True

    async def _scale_down(self, force: bool = False) -> None:
        if not force and workflow.now().timestamp() - self.s.last_scale_up_s < self.s.spec.cooldown_s:
            return
        extra = len(self.s.replicas) - (0 if force else self.s.desired)
        if extra <= 0:
            return
        old = [r for r in self.s.replicas if r.id in self.s.outdated]  # outdated ones go first, then the newest
        order = [r for r in self.s.replicas if r.id not in self.s.outdated] + old
        victims, self.s.replicas = order[-extra:], order[:-extra]
        replaced = 0 if force else len([r for r in victims if r.id in self.s.outdated])
        if replaced:
            self._count("replaced", replaced)
            self.s.outdated = [i for i in self.s.outdated if i not in {r.id for r in victims}]
        self.stopping_on += [r.host_id for r in victims]  # a signal placing meanwhile must not take their slots
        if force or not workflow.patched("scale-down-in-background"):
            await self._stop_victims(victims)
        else:  # a host cut off holds a stop for minutes: the loop goes on answering meanwhile
            self._background(self._stop_victims(victims), "stop")

    async def _stop_victims(self, victims: list[ReplicaInfo]) -> None:
        stopped: list[bool | None] = []
        try:
            stopped = await asyncio.gather(*(self._stop(r) for r in victims))
        finally:
            for r in victims:
                self.stopping_on.remove(r.host_id)
            if self._cancelled():  # stops the cancel cut short: the undeploy stops them again
                self.s.replicas += [r for r, ok in zip(victims, stopped or [None] * len(victims)) if ok is None]
        self._count("stopped", len(victims))

    async def _stop(self, r: ReplicaInfo) -> bool | None:
        """Stop replica ``r`` on its host. True: the host said it is stopped; None: a cancel of the pool cut it
        short; False: it failed (the host is gone, or too busy or cut off to take the work in time), and ``r``
        joins the lost replicas, stopped again when its host is next seen live (not left serving uncounted)."""
        self.stopping_ids.append(r.id)
        try:
            await workflow.execute_activity(
                "stop_replica", StopReplicaInput(r.id), task_queue=r.task_queue,
                cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,  # a cancelled pool
                # ends once its replicas are stopped (they drain first), not before
                start_to_close_timeout=timedelta(seconds=STOP_TIMEOUT_S),
                heartbeat_timeout=timedelta(seconds=self.s.spec.heartbeat_timeout_s),  # a host paused after it took
                # the task (its poll was waiting) holds it this long, not a minute per attempt
                schedule_to_start_timeout=timedelta(seconds=self.s.spec.heartbeat_timeout_s),
                retry_policy=RetryPolicy(maximum_attempts=3))
        except Exception as e:  # noqa: BLE001 - an ActivityError, or the host is gone
            if isinstance(e, ActivityError) and isinstance(e.cause, ActivityCancelled):
                return None
            if workflow.patched("retry-failed-stop"):
                self.s.lost = [*self.s.lost, r][-64:]
            return False
        finally:
            self.stopping_ids.remove(r.id)
        return True
