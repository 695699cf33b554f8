"""One scale signal's hops through Temporal: the embedded server as `thaw up` starts it vs Temporal's defaults.

P5's path without the pool's work or any load: a client signals a workflow, whose signal handler schedules an
activity on another task queue; the activity notes when it began. Two dev servers run in one run, alternately,
each with its own SQLite file and thaw's SQLite settings: one with thaw's dynamic config
(thaw.stack.TEMPORAL_DYNAMIC_CONFIG), one without. Prints, per server, signal -> activity start p50/p90 and two
hops inside it (signal -> the workflow's signal handler, and activity scheduled -> started as the server
records it), and when a workflow's 0.5 s timer (the pool's settle) fires, then both side by side.
Last line: ``temporal hop p50: <ms> ms vs <ms> ms with Temporal's defaults (<ratio>x)``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from temporalio import activity, workflow
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from thaw.stack import TEMPORAL_DYNAMIC_CONFIG, temporal_binary, temporal_dev_args

from common import machine_line, pct  # bench/common.py


NAP_S = 0.5  # as workflows/pool.py's SETTLE_S
NAPS = f"a {NAP_S:g} s timer fired after"  # its line in the output
SENT: dict[int, float] = {}  # signal number -> wall time it was sent
HANDLED: dict[int, float] = {}  # -> its handler first ran in the worker
BEGAN: dict[int, tuple[float, float, float]] = {}  # -> the activity's scheduled and started (server), began (here)


@activity.defn
async def hop(n: int) -> None:
    info = activity.info()
    BEGAN[n] = (info.scheduled_time.timestamp(), info.started_time.timestamp(), time.time())


@workflow.defn
class Hop:
    def __init__(self) -> None:
        self.done = False

    @workflow.signal
    def go(self, n: int) -> None:
        HANDLED.setdefault(n, time.time())  # unsandboxed: a bench probe, not workflow logic
        workflow.start_activity(hop, n, task_queue="hop-activities", start_to_close_timeout=timedelta(seconds=30))

    @workflow.signal
    def stop(self) -> None:
        self.done = True

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: self.done)


@workflow.defn
class Nap:
    @workflow.run
    async def run(self, naps: int) -> list[float]:
        """Sleep NAP_S ``naps`` times; how long each took by the server's clock (its timer-fired events), in ms."""
        took = []
        for _ in range(naps):
            t = workflow.now()
            await asyncio.sleep(NAP_S)
            took.append((workflow.now() - t).total_seconds() * 1000)
        return took


async def measure(dynamic_config: bool, db: Path, signals: int, gap_s: float) -> dict[str, list[float]]:
    for d in (SENT, HANDLED, BEGAN):
        d.clear()
    env = await WorkflowEnvironment.start_local(dev_server_existing_path=temporal_binary(),
                                                dev_server_database_filename=str(db),
                                                dev_server_extra_args=temporal_dev_args(dynamic_config))
    try:
        c = env.client
        async with Worker(c, task_queue="hop", workflows=[Hop, Nap], workflow_runner=UnsandboxedWorkflowRunner()), \
                Worker(c, task_queue="hop-activities", activities=[hop]):
            h = await c.start_workflow(Hop.run, id="hop", task_queue="hop")
            for i in range(signals):
                SENT[i] = time.time()
                await h.signal(Hop.go, i)
                await asyncio.sleep(gap_s)
            await h.signal(Hop.stop)
            await h.result()
            naps = await c.execute_workflow(Nap.run, 8, id="nap", task_queue="hop")
    finally:
        await env.shutdown()
    warm = [i for i in SENT if i >= 5 and i in BEGAN]  # the first few warm up the server's caches
    ms = 1000
    return {"signal -> activity start": [(BEGAN[i][2] - SENT[i]) * ms for i in warm],
            "signal -> handler": [(HANDLED[i] - SENT[i]) * ms for i in warm],
            "activity scheduled -> started (server)": [(BEGAN[i][1] - BEGAN[i][0]) * ms for i in warm],
            NAPS: naps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--signals", type=int, default=60, help="signals per server per round")
    ap.add_argument("--gap-s", type=float, default=0.05, help="time between signals")
    ap.add_argument("--rounds", type=int, default=2, help="rounds, each running both servers in turn")
    args = ap.parse_args()
    print(machine_line())
    setups = {"thaw": True, "defaults": False}
    got: dict[str, dict[str, list[float]]] = {name: {} for name in setups}
    with tempfile.TemporaryDirectory(prefix="thaw-hop-") as tmp:
        for r in range(args.rounds):
            for name, dynamic_config in setups.items():
                out = asyncio.run(measure(dynamic_config, Path(tmp) / f"{name}-{r}.db", args.signals, args.gap_s))
                for k, v in out.items():
                    got[name].setdefault(k, []).extend(v)
    for name, dynamic_config in setups.items():
        print(f"{name} ({TEMPORAL_DYNAMIC_CONFIG if dynamic_config else 'no dynamic config'}):")
        for k, v in got[name].items():
            print(f"    {k}: p50 {statistics.median(v):.1f} ms, p90 {pct(v, 90):.1f} ms (n={len(v)})")
    a, b = (statistics.median(got[n][NAPS]) for n in setups)
    print(f"{NAP_S:g} s timer p50: {a:.0f} ms vs {b:.0f} ms with Temporal's defaults")
    a, b = (statistics.median(got[n]["signal -> activity start"]) for n in setups)
    print(f"temporal hop p50: {a:.1f} ms vs {b:.1f} ms with Temporal's defaults ({b / a:.1f}x)")


if __name__ == "__main__":
    main()
