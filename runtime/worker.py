"""Temporal worker wiring for the build task queue (kept apart from workflow and activity logic)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor

from temporalio.client import Client
from temporalio.worker import Worker

from thaw.activities.build_image import BuildActivities
from thaw.config import Config
from thaw.workflows.build_image import BuildImage

log = logging.getLogger(__name__)


async def connect(cfg: Config) -> Client:
    return await Client.connect(cfg.temporal_address, namespace=cfg.temporal_namespace)


def build_worker(client: Client, cfg: Config, executor: ThreadPoolExecutor) -> Worker:
    acts = BuildActivities(cfg)
    return Worker(
        client,
        task_queue=cfg.build_task_queue,
        workflows=[BuildImage],
        activities=acts.all(),
        activity_executor=executor,
        max_concurrent_activities=4,
    )


async def run(cfg: Config, ready_file=None) -> None:
    client = await connect(cfg)
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="thaw-activity") as executor:
        worker = build_worker(client, cfg, executor)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("worker polling %s on %s", cfg.build_task_queue, cfg.temporal_address)
        async with worker:
            if ready_file:
                ready_file.write_text(str(os.getpid()))
            try:
                await stop.wait()
            finally:
                if ready_file:
                    ready_file.unlink(missing_ok=True)
        log.info("worker stopped")
