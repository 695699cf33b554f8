"""Temporal worker wiring (kept apart from workflow and activity logic): the build worker and its run loop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Awaitable, Callable

from temporalio.client import Client
from temporalio.worker import Worker

from thaw.activities.build_image import BuildActivities
from thaw.activities.pool import PoolActivities
from thaw.activities.snapshot import SnapshotActivities
from thaw.client import connect
from thaw.config import Config
from thaw.workflows.build_image import BuildImage
from thaw.workflows.build_snapshot import BuildSnapshot, ReplicaLog, RestoreSnapshot, StopReplicas
from thaw.workflows.pool import DeploymentPool

log = logging.getLogger(__name__)


def build_worker(client: Client, cfg: Config, executor: ThreadPoolExecutor) -> Worker:
    builds = BuildActivities(cfg)
    return Worker(
        client,
        task_queue=cfg.build_task_queue,
        workflows=[BuildImage, BuildSnapshot, RestoreSnapshot, StopReplicas, ReplicaLog, DeploymentPool],
        activities=[*builds.all(), *SnapshotActivities(cfg, builds.store).all(), *PoolActivities(cfg).all()],
        activity_executor=executor,
        max_concurrent_activities=4,
    )


def stop_on_signals() -> asyncio.Event:
    """An event SIGTERM/SIGINT set from now on (instead of killing the process): install it before anything
    that a signal must not cut short, so that the callers' clean-up still runs."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve(cfg: Config, make: Callable[[Client, ThreadPoolExecutor], Worker], ready_file: Path | None,
                background: Callable[[Client], Awaitable[None]] | None = None, stop: asyncio.Event | None = None
                ) -> None:
    """Run one worker until SIGTERM/SIGINT (``stop``, if the caller installed it earlier); ``ready_file`` exists
    exactly while it polls, and ``background(client)`` runs meanwhile."""
    stop = stop or stop_on_signals()  # before connecting: a SIGTERM then still runs the callers' clean-up
    client = await connect(cfg)
    with ThreadPoolExecutor(max_workers=16, thread_name_prefix="thaw-activity") as executor:
        worker = make(client, executor)
        log.info("worker polling %s on %s", worker.task_queue, cfg.temporal_address)
        async with worker:
            side = asyncio.ensure_future(background(client)) if background else None
            if ready_file:
                ready_file.write_text(str(os.getpid()))
            try:
                await stop.wait()
            finally:
                if side:
                    side.cancel()
                if ready_file:
                    ready_file.unlink(missing_ok=True)
        log.info("worker stopped")


async def run(cfg: Config, ready_file: Path | None = None) -> None:
    await serve(cfg, lambda client, ex: build_worker(client, cfg, ex), ready_file)
