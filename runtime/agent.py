"""Host agent: a Temporal worker on this host's own task queue, registered in the registry with its facts.

It owns every replica it starts: replicas kept serving stop when the agent stops, and the replica scratch
left by an agent that was killed is cleared (processes by recorded pid, mounts by path) when it starts again.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

from thaw.activities.host import HostActivities
from thaw.config import Config
from thaw.errors import first_line
from thaw.registry import deployments, snapshots
from thaw.snapshot.forward import Forwarder, unix_socket
from thaw.snapshot.host import HostSnapshots, cleanup_stale, release_dead

from . import metrics
from .worker import serve, stop_on_signals

log = logging.getLogger("thaw.agent")
ENDED_BUILDS_EVERY_S = 600.0  # how often the agent drops the dirs of checkpoints whose build ended


def build_agent_worker(client: Client, cfg: Config, acts: HostActivities, executor: ThreadPoolExecutor) -> Worker:
    return Worker(client, task_queue=cfg.host_task_queue, activities=acts.all(), activity_executor=executor,
                  max_concurrent_activities=8)


def register(cfg: Config, host: HostSnapshots) -> None:
    """Announce this host (facts, capacity); replicas the registry still lists for it died with its last agent."""
    forget_replicas(cfg)
    snapshots.upsert_host(cfg.registry_url, cfg.host_id, cfg.host_task_queue, host.facts, os.getpid(),
                          cfg.host_capacity)


_beat_lock = threading.Lock()  # a heartbeat's check and write, and the write that marks the host gone


def beat(cfg: Config, acts: HostActivities) -> None:
    """One heartbeat: this host marked alive in the registry. Nothing once the agent is leaving: it marks the
    host gone itself (a beat written after that would make it look live again)."""
    with _beat_lock:
        if not acts.closing and not acts.leaving.is_set():
            snapshots.heartbeat_host(cfg.registry_url, cfg.host_id)


def mark_gone(cfg: Config, acts: HostActivities) -> None:
    """The agent is leaving: no work placed on this host from now on, not only after host_stale_s (its worker
    takes no more; starts placed here would wait out their pickup timeout)."""
    acts.leaving.set()
    with _beat_lock:
        try:
            snapshots.heartbeat_host(cfg.registry_url, cfg.host_id, gone=True)
        except Exception as e:  # noqa: BLE001 - the registry down: the host goes stale in host_stale_s
            log.warning("agent %s: could not mark the host gone: %s", cfg.host_id, first_line(e))


def tidy(cfg: Config, acts: HostActivities) -> None:
    """One round of the host's clean-up (blocking): replicas that died unregistered, replicas whose row is gone
    stopped, mounts idle for mount_idle_s released. Apart from the heartbeat: each stop waits for its process
    to go and each unmount for its daemon, seconds that would make a live host look dead."""
    if acts.closing:
        return
    acts.reap()
    acts.stop_orphans()
    if cfg.mount_idle_s > 0:
        acts.host.release_idle(cfg.mount_idle_s)


async def heartbeat(cfg: Config, acts: HostActivities) -> None:
    """Every agent_heartbeat_s: metrics, and the registry told this host lives. A failed round (the registry
    down for a moment) is logged and the next one runs as usual: a host whose heartbeats stop is taken for dead
    and its replicas are replaced elsewhere."""
    last = time.monotonic()
    while True:
        await asyncio.sleep(cfg.agent_heartbeat_s)
        now = time.monotonic()
        n = len(acts.serving)
        metrics.REPLICAS.set(n)
        metrics.PINNED.set(acts.host.pins.pinned_bytes)
        for gpu, replicas in enumerate(acts.host.gpu_loads()):
            metrics.GPU_REPLICAS.labels(str(gpu)).set(replicas)
        metrics.GPU_SECONDS_ALLOCATED.inc(n * (now - last))
        last = now
        try:
            await asyncio.to_thread(beat, cfg, acts)
        except Exception as e:  # noqa: BLE001 - the next round tries again
            log.warning("agent %s: heartbeat round failed: %s", cfg.host_id, first_line(e))


async def watch_health(cfg: Config, acts: HostActivities) -> None:
    """Every agent_heartbeat_s, the serving replicas' health checks (HostActivities.check_health), apart from the
    heartbeat: checks that wait out their timeout, or the stops of replicas that failed them, must not delay it
    (a host whose heartbeats stop is taken for dead, and every replica on it replaced)."""
    await rounds(cfg, acts, "health check", acts.check_health)


async def rounds(cfg: Config, acts: HostActivities, what: str, work: Callable[[], object]) -> None:
    """``work`` in a thread every agent_heartbeat_s, until the agent is closing. A failed round (the registry
    down for a moment) is logged, and the next one runs."""
    while not acts.closing:
        await asyncio.sleep(cfg.agent_heartbeat_s)
        try:
            await asyncio.to_thread(work)
        except Exception as e:  # noqa: BLE001 - the next round tries again
            log.warning("agent %s: %s round failed: %s", cfg.host_id, what, first_line(e))


async def drop_ended_builds(client: Client, host: HostSnapshots) -> list[str]:
    """The dirs of checkpoints that finished here (kept by :func:`cleanup_stale` for their build's next step) whose
    build workflow has ended: an agent away longer than the build's pickup timeout failed the build, whose own
    clean-up could not reach it, and the dump (GBs for a GPU model) would stay. Returns the build ids dropped."""
    dropped = []
    try:
        finished = host.finished_builds()
    except OSError as e:  # an unreadable work dir: the agent's own work reports it; nothing dropped
        log.warning("cannot list finished builds: %s", e)
        return dropped
    for build_id in finished:
        try:
            try:
                desc = await client.get_workflow_handle(build_id).describe()
                ended = desc.status != WorkflowExecutionStatus.RUNNING
            except RPCError as e:
                if e.status != RPCStatusCode.NOT_FOUND:
                    raise
                ended = True  # gone from Temporal (past its retention)
            if ended:
                await asyncio.to_thread(host.discard, build_id)
                dropped.append(build_id)
        except Exception as e:  # noqa: BLE001 - Temporal unreachable, say: kept until the next agent start
            log.warning("build %s: its dir stays for now: %s", build_id, first_line(e))
    if dropped:
        log.info("dropped the dirs of %d ended build(s): %s", len(dropped), ", ".join(dropped))
    return dropped


async def drop_ended_builds_every(client: Client, host: HostSnapshots, every_s: float = ENDED_BUILDS_EVERY_S) -> None:
    """:func:`drop_ended_builds` at the agent's start and then every ``every_s``: a build can end while the agent
    runs without its clean-up reaching the agent (its store step timed out waiting for a busy agent's slots)."""
    while True:
        await drop_ended_builds(client, host)
        await asyncio.sleep(every_s)


async def background(cfg: Config, acts: HostActivities, client: Client) -> None:
    await asyncio.gather(heartbeat(cfg, acts), watch_health(cfg, acts), rounds(cfg, acts, "clean-up",
                         lambda: tidy(cfg, acts)), drop_ended_builds_every(client, acts.host))


def push_store(store) -> None:
    try:
        n, size = store.push()
        log.info("pushed %d objects (%d MiB) of %s to %s", n, size >> 20, store.local.name, store.durable.name)
    except Exception as e:  # noqa: BLE001 - S3 down: the disk keeps every object (no eviction) until a restart
        log.warning("could not push %s to %s: %s", store.local.name, store.durable.name, first_line(e))


def hold_host(cfg: Config) -> int:
    """An exclusive lock on this host's work dir, held (by an fd kept open) for the agent's life: a second agent
    of the same host would stop the first one's replicas as stale and unregister them."""
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cfg.work_dir / "agent.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RuntimeError(f"host {cfg.host_id} already has an agent running (pid {pid}); stop it first, or give "
                           f"this one another --host-id") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def forget_replicas(cfg: Config) -> None:
    """The registry rows of this host's replicas go (they died with its agent)."""
    for rep in deployments.replicas(cfg.registry_url, host_id=cfg.host_id):
        deployments.remove_replica(cfg.registry_url, rep.id)


def release_if_dead(cfg: Config) -> bool:
    """What an agent of ``cfg.host_id`` that no longer runs left (replicas by recorded pid, their roots, its
    mounts) goes, and its rows: its replicas', and the host's marked gone (an agent killed, or that died, did
    neither; a replica kept by `thaw restore --keep` would hold its snapshot for good). False, and nothing done,
    while one runs (it holds the work dir's lock)."""
    if not cfg.work_dir.is_dir():
        return True
    try:
        fd = hold_host(cfg)
    except RuntimeError:
        return False
    try:
        release_dead(cfg)
        try:
            forget_replicas(cfg)
            snapshots.heartbeat_host(cfg.registry_url, cfg.host_id, gone=True)
        except Exception as e:  # noqa: BLE001 - the registry down: the next agent of this host clears the rows
            log.warning("host %s: its agent's registry rows stay for now: %s", cfg.host_id, first_line(e))
    finally:
        os.close(fd)
    return True


def raise_open_files_limit() -> None:
    """Raise this process's soft limit on open files to its hard one, as Go programs and containerd do. The
    replicas it launches inherit it (a snapshot keeps its launch's), and each connection through a replica's
    forwarder holds two here: the soft 1024 of a login shell or a systemd service runs out under load."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.info("open files limit raised from %d to %d (its hard limit)", soft, hard)


def s3_relay(cfg: Config) -> Forwarder | None:
    """On a host of `thaw hosts up` (``s3_socket`` set): the loopback port of its S3 endpoint, in its network
    namespace, relayed to the Unix socket of `thaw up --s3`'s SeaweedFS, which listens on nothing else this
    namespace could reach (no S3 port of its is open beyond the machine's loopback)."""
    if not cfg.s3_socket:
        return None
    url = urlsplit(cfg.s3_endpoint or "")
    if url.hostname != "127.0.0.1" or not url.port:
        raise RuntimeError(f"THAW_S3_SOCKET needs THAW_S3_ENDPOINT=http://127.0.0.1:PORT, not {cfg.s3_endpoint}")
    try:
        return Forwarder(unix_socket(str(cfg.s3_socket)), "127.0.0.1", url.port)
    except OSError as e:
        raise RuntimeError(f"S3 relay on 127.0.0.1:{url.port}: {e.strerror or e}") from None


async def _leave_when(stop: asyncio.Event, cfg: Config, acts: HostActivities) -> None:
    """Once the agent is told to stop (SIGTERM), replica stops under way end their drain and grace (its worker
    waits for those before the agent's own stop can run), and the host is marked gone."""
    await stop.wait()
    await asyncio.to_thread(mark_gone, cfg, acts)


async def run(cfg: Config, ready_file: Path | None = None) -> None:
    stop = stop_on_signals()  # first: a SIGTERM once the host row below exists must still mark the host gone
    hold_host(cfg)  # its fd stays open, and the lock held, until this process ends
    raise_open_files_limit()  # before any replica is launched
    stale = cleanup_stale(cfg.work_dir)
    if stale:
        log.info("cleared %d replica/build dirs left by an earlier agent", stale)
    try:  # before the host row is written: a port in use must not leave a host that looks live
        port = metrics.serve(cfg.agent_metrics_port, cfg.agent_metrics_bind)
    except OSError as e:
        raise RuntimeError(f"metrics on {cfg.agent_metrics_bind}:{cfg.agent_metrics_port}: {e.strerror or e} "
                           f"(THAW_AGENT_METRICS_PORT: another port, or 0 for any)") from None
    relay = s3_relay(cfg)  # before the store is opened: it reaches S3 through it (its mount daemons too)
    host = await asyncio.to_thread(HostSnapshots, cfg)  # GPU access (driver layer, device nodes) included
    if host.store.held_back:  # its disk has objects from before S3 was configured: S3 gets those it lacks
        threading.Thread(target=push_store, args=(host.store,), name="thaw-push", daemon=True).start()
    register(cfg, host)
    acts = HostActivities(cfg, host)
    log.info("agent %s: facts %s; metrics on :%s", cfg.host_id,
             {k: v for k, v in host.facts.items() if k != "cpu_flags"}, port)
    leave = asyncio.ensure_future(_leave_when(stop, cfg, acts))
    try:
        await serve(cfg, lambda client, ex: build_agent_worker(client, cfg, acts, ex), ready_file,
                    background=lambda client: background(cfg, acts, client), stop=stop)
    finally:
        leave.cancel()
        acts.stop_all()
        mark_gone(cfg, acts)  # again: the agent may end without a SIGTERM (its worker failed)
        host.close()
        if relay:
            relay.close()
