"""P5 + P7: scale-signal latency of the real runtime, and simulated utilization with the measured timings.

Starts its own embedded stack (`thaw up` on free ports, temporary state dir), builds the example model's image
and snapshot, deploys it, then:
  P5a  bursts of 8 scale-up signals (1, 2, ... 8 replicas, 20 ms apart, from one connected client: a CLI
       process per signal would space them by its start-up) from 0: for every replica, the time from the
       signal that asked for it to the moment its host began the restore (Temporal signal → workflow task →
       placement → start_replica on the host), p50/p99 over all bursts (--bursts, 13: 104 replicas, so the
       p99 is not simply the slowest one);
  P5b  from 0 replicas, a request sent to the gateway: time until it is answered (scale from zero);
  P7   the simulator (bench/runtime_sim.py) fed with this run's measured times, each to a first answer: the
       cold boot (launch, warm-up, golden request) and P5b's scale from zero (signal, one restore on an idle
       host, the request). In a fleet each replica restores on a host of its own; P5a's restore 8 at once
       on this machine's CPUs, so their times are printed for context only.
Last line: ``P5 signal-to-restore p99: <ms> ms P7 utilization: <percent>%``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from thaw.examples.minilm import recipe
from thaw.ports import free_port

from common import machine_line, pct  # bench/common.py

ROOT = Path(__file__).resolve().parent.parent


def thaw(env, *args) -> str:
    r = subprocess.run(["thaw", *args], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"thaw {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def wait(pred, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise SystemExit("timed out")


async def bursts(address: str, name: str, n: int, gap_s: float = 0.02, poll_s: float = 0.5) -> list:
    """``n`` bursts of 8 scale signals (1, 2, ... 8 replicas) from one connected client, ``gap_s`` apart (each
    stamped when sent, as `thaw scale` stamps it), each from 0 replicas; returns the replicas of every burst.
    Waiting for a burst to end is an in-process query every ``poll_s``: a `thaw status` process every 50 ms (as
    this bench did until 2026-11-28) took CPU from the runtime it measures."""
    from temporalio.client import Client

    from thaw.runtime import pool

    client = await Client.connect(address)

    async def until(pred):
        deadline = time.monotonic() + 120
        while not pred(st := await pool.state(client, name)):
            if time.monotonic() > deadline:
                raise SystemExit("timed out")
            await asyncio.sleep(poll_s)
        return st

    out = []
    for _ in range(n):
        for count in range(1, 9):
            await pool.scale(client, name, count, "bench")
            await asyncio.sleep(gap_s)
        st = await until(lambda st: len(st.replicas) == 8)
        out.append(st.replicas)
        stopped = st.counts.get("stopped", 0) + 8
        await pool.scale(client, name, 0, "bench")  # and wait for the stops to end (each replica drains first,
        await until(lambda st: not st.replicas and st.counts.get("stopped", 0) >= stopped)  # holding its slot)
    return out


async def split(address: str, workflow_id: str) -> dict[str, list[float]]:
    """From the pool's history: per start_replica, its signal's time -> the activity scheduled (the pool's
    workflow task) and scheduled -> started (the host agent's worker picking it up); per workflow task of the
    pool, scheduled -> started (the server handing it to the worker) and started -> completed (the worker)."""
    from temporalio.api.enums.v1 import EventType
    from temporalio.client import Client

    handle = (await Client.connect(address)).get_workflow_handle(workflow_id)
    scheduled, out = {}, {"workflow side": [], "agent pickup": [], "task dispatch": [], "task in worker": []}
    task_at = 0
    async for e in handle.fetch_history_events():
        ms = e.event_time.ToMilliseconds()
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            a = e.activity_task_scheduled_event_attributes
            if a.activity_type.name == "start_replica":
                scheduled[e.event_id] = ms
                out["workflow side"].append(ms - json.loads(a.input.payloads[0].data)["signal_ms"])
        elif e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            at = scheduled.get(e.activity_task_started_event_attributes.scheduled_event_id)
            if at is not None:
                out["agent pickup"].append(ms - at)
        elif e.event_type in (EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED, EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED,
                              EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED):
            if e.event_type != EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
                out["task dispatch" if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED
                    else "task in worker"].append(ms - task_at)
            task_at = ms
    return out


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bursts", type=int, default=13, help="bursts of 8 scale-ups (P5a)")
    args = ap.parse_args()
    state = Path(tempfile.mkdtemp(prefix="thaw-bench-runtime-"))
    env = {**os.environ, "THAW_STATE_DIR": str(state), "THAW_TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
           "THAW_TEMPORAL_UI_PORT": str(free_port()), "THAW_API_PORT": str(free_port()),
           "THAW_GATEWAY_PORT": str(free_port()), "THAW_AGENT_METRICS_PORT": "0", "THAW_HOST_CAPACITY": "8",
           "THAW_AGENT_HEARTBEAT_S": "2"}
    print(machine_line())
    gateway = None
    try:
        thaw(env, "up")
        rootfs = recipe.build_rootfs()
        image = json.loads(thaw(env, "build", "image", str(rootfs), "--config",
                                str(rootfs.parent / "image-config.json"), "--json"))["digest"]
        snap = json.loads(thaw(env, "build", "snapshot", image, "--port", "8080", "--health", "/healthz",
                               "--golden", str(recipe.GOLDEN_JSON), "--golden-path", "/embed", "--json"))
        t = snap["timings_ms"]
        cold_ms = t["root"] + t["cold_boot"] + t["golden"]  # launch to first answer, as the registry counts it
        thaw(env, "deploy", "bench", "--snapshot", snap["digest"], "--min", "0", "--max", "8", "--buffer", "0",
             "--cooldown", "0")

        lat, restore_ms, fallbacks = [], [], []
        for replicas in asyncio.run(bursts(env["THAW_TEMPORAL_ADDRESS"], "bench", args.bursts)):
            for r in replicas:
                lat.append(r.started_at_ms - r.signal_ms)
                if r.outcome == "restored":  # a fallback cold boot is no restore time
                    restore_ms.append(r.timings_ms["total"])
                else:
                    fallbacks.append(f"{r.outcome}: {r.reason}")
        print(f"P5a signal -> restore start over {len(lat)} replicas in {args.bursts} bursts of 8: p50 "
              f"{pct(lat, 50):.0f} ms, p99 {pct(lat, 99):.0f} ms, max {max(lat):.0f} ms")
        print(f"    slowest of each burst: {[round(max(lat[i:i + 8])) for i in range(0, len(lat), 8)]} ms")
        if not restore_ms:
            raise SystemExit(f"no replica restored: {fallbacks[0]}")
        print(f"    restore of each replica (8 at once on {os.cpu_count()} cpus): median "
              f"{statistics.median(restore_ms):.0f} ms over {len(restore_ms)} restores"
              + (f"; {len(fallbacks)} fell back ({fallbacks[0]})" if fallbacks else ""))
        parts = asyncio.run(split(env["THAW_TEMPORAL_ADDRESS"], "pool-bench"))
        print("    of which (p50/p99 ms): signal -> start_replica scheduled (workflow side) {}; scheduled -> started "
              "on the host (agent pickup) {}; each pool workflow task: handed to the worker {}, in the worker {}"
              .format(*(f"{pct(xs, 50):.0f}/{pct(xs, 99):.0f}" for xs in parts.values())))

        port = int(env["THAW_GATEWAY_PORT"])
        gateway = subprocess.Popen(["thaw", "gateway", "bench", "--port", str(port)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait(lambda: _up(port))
        t0 = time.monotonic()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/embed", data=recipe.GOLDEN_JSON.read_bytes(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            body = json.loads(r.read())
        zero_ms = (time.monotonic() - t0) * 1000
        assert len(body["embeddings"]) == 8
        print(f"P5b first request at 0 replicas, through the gateway: answered in {zero_ms:.0f} ms "
              f"(cold boot to first answer: {cold_ms} ms)")

        sim = subprocess.run([sys.executable, str(ROOT / "bench" / "runtime_sim.py"), "--cold-start-s",
                              f"{cold_ms / 1000:.3f}", "--restore-s", f"{zero_ms / 1000:.3f}"],
                             capture_output=True, text=True, check=True).stdout
        print(sim.rstrip())
        util = sim.strip().splitlines()[-1].split(":", 1)[1].strip()
        print(f"P5 signal-to-restore p99: {pct(lat, 99):.0f} ms P7 utilization: {util}")
    finally:
        if gateway:
            gateway.terminate()
            try:
                gateway.wait(30)
            except subprocess.TimeoutExpired:  # the stack below must still come down
                gateway.kill()
                gateway.wait()
        subprocess.run(["thaw", "down"], env=env, capture_output=True)
        shutil.rmtree(state, ignore_errors=True)


def _up(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
