"""Host-queue activities: the ones that start, checkpoint and restore processes. Thin over thaw.snapshot.host."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from temporalio import activity

from thaw.config import Config
from thaw.errors import first_line
from thaw.files import write_atomic
from thaw.heartbeat import keepalive
from thaw.imagefs.ingest import IngestError, Limits, ingest_and_commit
from thaw.imagefs.oci import SourceSpec
from thaw.imagefs.store import StoreError
from thaw.registry import deployments, snapshots
from thaw.registry.models import Replica, RestoreEvent
from thaw.runtime import metrics
from thaw.registry.queries import NotFound
from thaw.snapshot import compat, criu, cuda
from thaw.snapshot.host import LOGS_KEPT, HostSnapshots, Running, SnapshotError, breakdown, ended_logs
from thaw.workflows.build_snapshot import (
    CheckpointInput, CheckpointResult, ReplicaLogInput, ReplicaResult, RestorePlan, RestoreResult, StoredSnapshot,
    VerifyInput, VerifyResult)
from thaw.workflows.pool import ReplicaInfo, StartReplicaInput, StopReplicaInput, WarmInput

from .build_image import after_gc, fail_fast_on

log = logging.getLogger("thaw.agent")
# no driver >= 570 or cuda-python, or a process in a state the step refuses: a retry would only repeat a cold boot
# (a failed or timed-out CUDA call, out of memory on a busy GPU say, may succeed when retried)
host_errors_fail_fast = fail_fast_on(SnapshotError, criu.CriuError, criu.ReplicaError, compat.Incompatible, StoreError,
                                     IngestError, NotFound, cuda.CudaUnavailable, cuda.CudaStateError,
                                     cuda.CudaUnsupported)
STORED_FILE = "stored.json"


def _shielded():
    """Temporal's hold on the cancel it raises into an activity's thread, for the block (outside an activity:
    nothing to hold)."""
    return activity.shield_thread_cancel_exception() if activity.in_activity() else contextlib.nullcontext()


class HostActivities:
    def __init__(self, cfg: Config, host: HostSnapshots):
        self.cfg, self.host = cfg, host
        self.serving: dict[str, Running] = {}  # replicas kept serving, owned by this agent
        self.unwanted: dict[str, float] = {}  # ids stopped before they served (a start the pool gave up on)
        self.unlisted: set[str] = set()  # stopped replicas whose registry row could not go yet: reap() retries
        self.starts = 0  # start_replica calls under way (they hold capacity)
        self.stopping = 0  # replicas being drained and stopped (they hold capacity until they are gone)
        self.lock = threading.Lock()
        self.closing = False
        # set when the agent is told to stop: stops under way skip the rest of their drain and grace (the worker
        # waits for them before stop_all runs, and `thaw down` waits only so long)
        self.leaving = threading.Event()

    @activity.defn(name="checkpoint_model")
    @host_errors_fail_fast
    def checkpoint_model(self, inp: CheckpointInput) -> CheckpointResult:
        spec = dataclasses.asdict(inp.plan.spec)
        with keepalive("checkpoint") as hb:
            r = self.host.take(inp.build_id, inp.plan.image_digest, spec, dataclasses.asdict(inp.golden), hb)
        return CheckpointResult(build_id=inp.build_id, **r)

    @activity.defn(name="store_snapshot")
    @host_errors_fail_fast
    def store_snapshot(self, ck: CheckpointResult) -> StoredSnapshot:
        t0 = time.monotonic()
        dump = Path(ck.dump_dir)
        stored = dump.parent / STORED_FILE
        # a large dump, or its upload to S3, outlasts the heartbeat timeout; a retry waits for an attempt that
        # timed out but still stores here (it would drop the dump under the retry's reads)
        with keepalive("store"), self.host.build_lock(ck.build_id):
            if stored.exists():  # an earlier attempt stored it and dropped the dump
                return StoredSnapshot(**json.loads(stored.read_text()))
            if not dump.is_dir():
                raise SnapshotError(f"checkpoint of build {ck.build_id} is gone from {dump}; rebuild the snapshot")
            after_gc(self.cfg)
            # the whiteouts among what the server wrote to its root (Root.keep_writes left out other devices); no
            # size limits of images: a process's memory (with the GPU memory a checkpoint parks in it) is one
            # pages-N.img, over 64 GiB for a large model, and this host's disk holds it already
            limits = dataclasses.replace(Limits.from_config(self.cfg), allow_whiteouts=True,
                                         max_file_size=sys.maxsize, max_image_size=sys.maxsize)
            manifest, _, new_bytes = ingest_and_commit(SourceSpec("dir", str(dump)), self.host.store,
                                                       f"{ck.build_id}-snapshot", limits)
            stats = manifest.stats()
            res = StoredSnapshot(manifest.digest, stats["size"], stats["files"], new_bytes,
                                 int((time.monotonic() - t0) * 1000))
            write_atomic(stored, json.dumps(dataclasses.asdict(res)))
            shutil.rmtree(dump)
        return res

    @activity.defn(name="discard_build")
    @host_errors_fail_fast
    def discard_build(self, build_id: str) -> None:
        self.host.discard(build_id)

    @activity.defn(name="verify_snapshot")
    @host_errors_fail_fast
    def verify_snapshot(self, inp: VerifyInput) -> VerifyResult:
        spec = dataclasses.asdict(inp.plan.spec)
        # a cancel raised into this thread between the restore and its stop would leave the replica running
        with activity.shield_thread_cancel_exception(), keepalive("verify"):  # each step may be long
            ms = self.host.verify(inp.snapshot_digest, inp.plan.image_digest, spec, dataclasses.asdict(inp.golden),
                                  inp.golden_digest, inp.plan.spec.secrets, inp.host_facts)
        log.info("verified snapshot %s: %s", inp.snapshot_digest[:12], breakdown(ms))
        return VerifyResult(ms)

    @activity.defn(name="restore_replicas")
    @host_errors_fail_fast
    def restore_replicas(self, plan: RestorePlan) -> RestoreResult:
        """Restore a snapshot into replicas on this host: verified, then stopped, or kept serving (they take
        slots of the host's capacity)."""
        with self._slots(plan.replicas if plan.keep else 0):
            t0 = time.monotonic()
            row = snapshots.get(self.cfg.registry_url, plan.snapshot_digest)
            snap = row.model_dump()
            secrets = self.host.secrets(plan.secrets)
            # a cancel (timeout, worker shutdown) is an exception raised into this thread wherever it is: held back
            # until the replicas are kept or stopped, or one landing while they start would leave them with no owner
            with activity.shield_thread_cancel_exception():
                with keepalive("restore"):
                    results = self.host.restore_many(snap, plan.replicas, secrets)
                out = []
                try:
                    for running, info in results:
                        golden_ok = self._record(row.digest, running, info)
                        endpoint = self._serve(running, "", row.digest, info["outcome"]) if plan.keep else ""
                        out.append(ReplicaResult(running.id, info["outcome"], info["reason"], golden_ok,
                                                 info["timings_ms"], endpoint))
                    if activity.is_cancelled():
                        raise SnapshotError("the restore was cancelled")
                except BaseException:  # nobody will learn the ids of the replicas kept so far: each one stops
                    for r in out:
                        if r.endpoint:
                            try:
                                self._stop(r.replica, drain=False)
                            except Exception as e:  # noqa: BLE001 - the registry down, say: this error stands
                                log.warning("replica %s: its stop failed: %s", r.replica, first_line(e))
                    raise
                finally:  # what is not kept serving stops, also when something above failed
                    for running, _ in results:
                        if running.id not in self.serving:
                            try:  # one that outlived its SIGKILL is stopped once gone (logged)
                                running.stop()
                            except Exception as e:  # noqa: BLE001 - the others must still be stopped
                                log.warning("replica %s: its stop failed: %s", running.id, first_line(e))
            return RestoreResult(row.digest, self.cfg.host_id, out, int((time.monotonic() - t0) * 1000))

    @activity.defn(name="start_replica")
    @host_errors_fail_fast
    def start_replica(self, inp: StartReplicaInput) -> ReplicaInfo:
        """One serving replica of a deployment: restored (or cold-booted as a fallback), published, recorded."""
        started = int(time.time() * 1000)
        with self._slots(1):
            snap = snapshots.get(self.cfg.registry_url, inp.snapshot).model_dump()
            env = {**inp.env, **self.host.secrets(inp.secrets)}  # both arrive after the restore, not in the snapshot
            return self._start(inp, snap, env, started)

    @contextlib.contextmanager
    def _slots(self, n: int):
        """Hold ``n`` of this host's replica slots while replicas start to serve. Two pools (or a pool and a
        `thaw restore --keep`) placing at once both see the host free: their counts come from registry rows,
        written once a replica serves; the host itself says no."""
        held = 0
        try:
            with _shielded(), self.lock:  # a cancel raised into this thread lands once the count says what it holds
                busy = len(self.serving) + self.starts + self.stopping
                if n and busy + n > self.cfg.host_capacity:
                    raise SnapshotError(f"host {self.cfg.host_id} is full: {busy} of its {self.cfg.host_capacity} "
                                        f"replicas serve or start" + (f", {n} more asked for" if n > 1 else ""))
                self.starts += n
                held = n
            yield
        finally:
            with self.lock:
                self.starts -= held

    def _start(self, inp: StartReplicaInput, snap: dict, env: dict[str, str], started: int) -> ReplicaInfo:
        with activity.shield_thread_cancel_exception():  # as in restore_replicas: the replica ends owned or stopped
            with keepalive("restore"):
                ((running, info),) = self.host.restore_many(snap, 1, env,
                                                            [inp.replica_id] if inp.replica_id else None)
            endpoint = self._serve(running, inp.deployment, inp.snapshot, info["outcome"], inp.ports)
            if not endpoint:
                raise SnapshotError(f"replica {running.id} stopped: the agent of {self.cfg.host_id} is stopping, or "
                                    f"the pool gave up on this start")
            try:
                if activity.is_cancelled():  # the pool gave up on this start (its timeout) and will not learn of it
                    raise SnapshotError(f"replica {running.id} stopped: its start was cancelled")
                self._record(inp.snapshot, running, info, inp.deployment, endpoint)
            except BaseException:
                self.stop_replica(StopReplicaInput(running.id))
                raise
        return ReplicaInfo(running.id, self.cfg.host_id, self.cfg.host_task_queue, endpoint, info["outcome"],
                           info["reason"], info["timings_ms"], started, inp.signal_ms, running.published)

    def _record(self, snapshot: str, running: Running, info: dict, deployment: str | None = None,
                endpoint: str = "") -> bool:
        """A replica start in the registry, the metrics and the log; returns whether it replayed the golden
        request as the snapshot did."""
        golden_ok = info.pop("golden_ok")
        snapshots.record_restore(self.cfg.registry_url, RestoreEvent(
            snapshot_digest=snapshot, host_id=self.cfg.host_id, replica=running.id, deployment=deployment,
            golden_ok=golden_ok, **info))
        metrics.observe_restore(info["outcome"], info["timings_ms"])
        log.info("replica %s%s %s%s: %s%s", running.id, f" of {deployment}" if deployment else "", info["outcome"],
                 f" at {endpoint}" if endpoint else "", breakdown(info["timings_ms"]),
                 f" ({info['reason']})" if info["reason"] else "")
        return golden_ok

    def _serve(self, running: Running, deployment: str, snapshot: str, outcome: str, ports=()) -> str:
        """Publish ``running``, record it in the registry and keep it serving under this agent; returns its
        endpoint, or "" (replica stopped) when the agent is leaving: it would have no owner (and no traffic)."""
        try:
            endpoint = running.publish(self.cfg.replica_bind, ports)
            deployments.add_replica(self.cfg.registry_url, Replica(
                id=running.id, deployment=deployment, snapshot_digest=snapshot, host_id=self.cfg.host_id,
                endpoint=endpoint, ports=running.published or None, outcome=outcome))
        except BaseException:
            with contextlib.suppress(criu.ReplicaError):  # outlived its SIGKILL: stopped once gone (logged)
                running.stop()
            raise
        with self.lock:
            if not self.closing and not self.leaving.is_set() and running.id not in self.unwanted:
                self.serving[running.id] = running
                return endpoint
        with contextlib.suppress(criu.ReplicaError):
            running.stop()
        self._unlist(running.id)  # where the registry fails, reap() tries again
        return ""

    @activity.defn(name="warm_snapshot")
    @host_errors_fail_fast
    def warm_snapshot(self, inp: WarmInput) -> dict[str, int]:
        """Make this (buffer) host ready to restore a deployment's snapshot fast: trees mounted, pages pinned."""
        snap = snapshots.get(self.cfg.registry_url, inp.snapshot).model_dump()
        with keepalive("warm"):
            return self.host.warm(snap)

    @activity.defn(name="stop_replica")
    def stop_replica(self, inp: StopReplicaInput) -> None:
        """Stop a serving replica, drained and given its grace (see _drain); one still starting is stopped as soon
        as it would serve."""
        self._stop(inp.replica_id, drain=True)

    def _stop(self, replica_id: str, drain: bool) -> None:
        # a cancel (the pool's, a timeout, the worker's shutdown) is raised into this thread wherever it is: held
        # back until the replica is stopped, or one landing once it left self.serving (stop_all no longer sees it)
        # or in the drain would leave it running with no owner and no row
        with _shielded(), keepalive("stop"):
            with self.lock:
                running = self.serving.pop(replica_id, None)
                if running is None:
                    now = time.monotonic()
                    self.unwanted = {k: t for k, t in self.unwanted.items() if now - t < 3600}  # bounded
                    self.unwanted[replica_id] = now
                else:
                    self.stopping += 1
            try:
                if running:
                    if drain:
                        self._drain(replica_id)
                    running.stop(grace=self.cfg.replica_stop_grace_s if drain else 0, abort=self.leaving)
            finally:  # the process goes first: a registry that is down must not leave it running unowned
                if running:
                    with self.lock:
                        self.stopping -= 1
                self._unlist(replica_id)

    def _drain(self, replica_id: str) -> None:
        """Before a stop: the replica's row goes, then gateways (they look every 0.5 s) have replica_drain_s to
        stop sending it requests; then the stop gives its server replica_stop_grace_s to finish the requests under
        way and exit. A registry that is down: no wait (the stop's own unlist tries again)."""
        if self.cfg.replica_drain_s:
            try:
                self._unlist(replica_id)
            except Exception:  # noqa: BLE001 - the stop must go on
                return
            self.leaving.wait(self.cfg.replica_drain_s)

    def _unlist(self, replica_id: str) -> None:
        """Remove a stopped replica's row; where the registry fails, the heartbeat's reap() tries again (a row
        left behind counts against the host's capacity and sends gateways to a dead endpoint)."""
        try:
            deployments.remove_replica(self.cfg.registry_url, replica_id)
        except Exception:
            with self.lock:
                self.unlisted.add(replica_id)
            raise
        with self.lock:
            self.unlisted.discard(replica_id)

    @activity.defn(name="replica_log")
    @host_errors_fail_fast
    def replica_log(self, inp: ReplicaLogInput) -> str:
        running = self.serving.get(inp.replica_id)
        if running is not None:
            return running.replica.log_tail(inp.max_bytes)
        text = ended_logs(self.cfg.work_dir, inp.replica_id, inp.max_bytes)
        if text is None:
            raise NotFound(f"replica {inp.replica_id} is not served by host {self.cfg.host_id}, and left no logs "
                           f"there (a replica stopped plainly takes its logs; of those that failed to start, died or "
                           f"failed their health checks, the {LOGS_KEPT} that ended last keep theirs)")
        return text

    def reap(self) -> list[str]:
        """Stop and unregister the serving replicas whose process died on its own (its pool then replaces it);
        their ids."""
        with self.lock:
            dead = [r for r in self.serving.values() if not r.replica.alive()]
            for r in dead:
                del self.serving[r.id]
            unlisted = list(self.unlisted)
        failed = None
        for rid in unlisted:  # stopped earlier; their rows could not go then
            try:
                self._unlist(rid)
            except Exception as e:  # noqa: BLE001 - the next round tries again
                failed = failed or e
        failed = self._end([(r, "died") for r in dead], "died") or failed
        if failed:
            raise failed
        return [r.id for r in dead]

    def check_health(self) -> list[str]:
        """GET every serving replica's health path, all at once. One that fails replica_health_failures checks in
        a row (a hung server; one that answers 500, its GPU lost, say) is stopped and unregistered as a dead one
        is, and its deployment's pool starts another. Their ids."""
        n = self.cfg.replica_health_failures
        with self.lock:
            serving = list(self.serving.values())
        if not n or not serving:
            return []
        with ThreadPoolExecutor(min(len(serving), 32), thread_name_prefix="thaw-health") as ex:
            errors = list(ex.map(lambda r: r.health_error(self.cfg.replica_health_timeout_s), serving))
        sick = []
        for r, error in zip(serving, errors):
            r.health_failures = r.health_failures + 1 if error else 0
            if r.health_failures >= n:
                sick.append((r, f"failed {r.health_failures} health checks in a row (the last: {error})"))
        with self.lock:
            sick = [(r, why) for r, why in sick if self.serving.get(r.id) is r]  # not stopped meanwhile
            for r, _ in sick:
                del self.serving[r.id]
            self.stopping += len(sick)  # alive: they hold capacity until they are gone, as stop_replica's do
        try:
            failed = self._end(sick, "unhealthy")
        finally:
            with self.lock:
                self.stopping -= len(sick)
        if failed:
            raise failed
        return [r.id for r, _ in sick]

    def _end(self, ended: list[tuple[Running, str]], reason: str) -> Exception | None:
        """Stop and unregister replicas (taken out of self.serving) that ended on their own, keeping their logs;
        ``ended``: each with what happened. A row that cannot go yet puts its replica back in self.serving for
        the next round (reap: its process is gone). Returns the first error the registry gave."""
        failed = None
        for r, why in ended:
            if not r.keep_logs:  # not again in a next round's retry
                metrics.REPLICAS_ENDED.labels(reason).inc()
                log.warning("replica %s %s; stopped and unregistered (its deployment's pool, if any, starts "
                            "another). Its logs stay in %s; their end: %r", r.id, why, r.logs, r.replica.log_tail(300))
            r.keep_logs = True
            try:
                r.stop()
            except (OSError, criu.ReplicaError) as e:  # its scratch stays for cleanup_stale, or its stop ends once
                log.warning("replica %s: cleanup failed: %s", r.id, e)  # it is gone; the row must still go
            try:
                deployments.remove_replica(self.cfg.registry_url, r.id)
            except Exception as e:  # noqa: BLE001 - the next round tries again
                with self.lock:
                    self.serving.setdefault(r.id, r)
                failed = failed or e
        return failed

    def stop_orphans(self) -> list[str]:
        """Stop the replicas served here whose registry row is gone (an undeploy that could not reach this host,
        silent then, forgot them; or `thaw snapshots rm` did): nothing else would ever stop them. Their ids."""
        with self.lock:  # before the rows are read: a replica's row is written before it joins self.serving
            ids = set(self.serving)
        listed = {r.id for r in deployments.replicas(self.cfg.registry_url, host_id=self.cfg.host_id)}
        orphans = sorted(ids - listed)
        for rid in orphans:  # no gateway has listed it since its row went: nothing to drain (nor to hold a heartbeat)
            log.warning("replica %s: its registry row is gone (undeployed while this host was silent?): stopping it",
                        rid)
            self._stop(rid, drain=False)
        return orphans

    def stop_all(self) -> None:
        """Stop every replica this agent serves, and any a still-running activity starts from now on."""
        self.leaving.set()
        with self.lock:
            self.closing = True
            serving, self.serving = list(self.serving.values()), {}
        for r in serving:  # every replica first: a registry that is down must not keep one running
            try:
                r.stop()
            except Exception as e:  # noqa: BLE001 - one that would not die must not keep the others running
                log.error("replica %s: %s", r.id, e)
        for r in serving:  # the rows that could not go now go when this host's agent starts again
            try:
                deployments.remove_replica(self.cfg.registry_url, r.id)
            except Exception as e:  # noqa: BLE001
                log.warning("replica %s stopped; its registry row stays: %s", r.id, e)

    def all(self) -> list:
        return [self.checkpoint_model, self.store_snapshot, self.discard_build, self.verify_snapshot,
                self.restore_replicas, self.start_replica, self.warm_snapshot, self.stop_replica, self.replica_log]
