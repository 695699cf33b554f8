"""`thaw simulate`: the simulator against hand-computed traces, trace parsing, registry timings, the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import uuid
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from test_registry import _image
from thaw.config import Config
from thaw.registry import images, snapshots
from thaw.registry.models import RestoreEvent, Snapshot
from thaw.runtime import simulate as sim
from thaw.runtime.simulate import Autoscaler, Policy, Request, Timings, Trace

# Autoscaler settings simple enough to follow by hand: one request per replica, target 100 %, ticks every
# second, demand = work arrived in the last second, no panic window, no backlog term, cold service at t=0.
HAND = Autoscaler(concurrency=1, target_utilization=1.0, tick_s=1.0, window_s=1.0, panic_window_s=0.0,
                  drain_s=0.0, cooldown_s=3.0, min_replicas=0, max_replicas=10, warm_start=False)
HAND_T = Timings(cold_start_s=5.0, restore_s=0.5, provision_s=2.0)
# two requests at t=0 and one at t=10, 1 s each; the replay ends at the last arrival or completion
THREE = Trace((Request(0, 1), Request(0, 1), Request(10, 1)), end_s=10, source="hand")


def test_restore_with_buffer_by_hand():
    """buffer=1 (restore 0.5 s, acquiring a host 2 s):
    t=0   buffer host H0 idle. Tick: demand 2 s of work in 1 s -> 2 replicas. #1 takes H0 (ready 0.5); the buffer
          is refilled by acquiring H1 (ready 2). #2: no idle host, so it claims H1 (ready 2, restored 2.5); the
          buffer is refilled again with H2 (ready 2).
    0.5   H0 serves request a (delay 0.5) until 1.5, then b (delay 1.5) until 2.5.
    2     H1 arrives and restores (ready 2.5); H2 arrives and idles in the buffer.
    2.5   H0 and H1 idle. Tick 6: both idle 3.5 s >= cooldown 3, desired 0: released (buffer already full).
    10    c arrives; tick: H2 restores (ready 10.5), H3 acquired for the buffer (10 -> 12).
    10.5  c served (delay 0.5) until 11.5 = horizon.
    paid: H0 0-6, H1 0-6, H2 0-11.5, H3 10-11.5 = 6 + 6 + 11.5 + 1.5 = 25 GPU-s; busy 3 GPU-s."""
    r = sim.simulate(THREE, Policy("restore", buffer=1), HAND_T, HAND, gpu_hour_usd=3.6)
    assert r.delays == [0.5, 0.5, 1.5]
    assert (r.paid_gpu_s, r.busy_gpu_s, r.horizon_s) == (25.0, 3.0, 11.5)
    assert r.utilization == pytest.approx(3 / 25)
    assert (r.delay_p50_s, r.delay_p99_s, r.delay_max_s) == (0.5, 1.5, 1.5)
    assert r.delay_mean_s == pytest.approx(2.5 / 3)
    assert r.cost_usd == pytest.approx(25 / 3600 * 3.6)
    assert (r.served, r.restores, r.cold_starts, r.hosts_acquired, r.peak_hosts) == (3, 3, 0, 3, 3)


def test_a_request_held_at_zero_gets_a_replica_even_after_its_window_passed():
    """A demand window shorter than the tick: by the next tick the request has left the window, but it is
    still queued at zero replicas, so a replica is started (the replay used to run forever)."""
    scaler = Autoscaler(concurrency=1, target_utilization=1.0, tick_s=20.0, window_s=10.0, panic_window_s=0.0,
                        drain_s=0.0, cooldown_s=3.0, min_replicas=0, max_replicas=1, warm_start=False)
    r = sim.simulate(Trace((Request(5, 1),), end_s=5, source="hand"), Policy("restore", buffer=1), HAND_T, scaler)
    assert r.served == 1 and r.delays == [15.5]  # tick at 20, restore 0.5 s on the buffer host


def test_cold_by_hand():
    """cold (no buffer): a replica is a new host (2 s) plus a cold boot (5 s), paid from the request.
    t=0 two hosts requested, serving at 7: a and b wait 7 s, done at 8. c at 10 goes to the oldest idle replica
    (delay 0), done at 11 = horizon. Tick 11: the other replica has idled 3 s and desired is 1: released.
    paid 11 + 11 = 22 GPU-s."""
    r = sim.simulate(THREE, Policy("cold"), HAND_T, HAND)
    assert r.delays == [0.0, 7.0, 7.0]
    assert (r.paid_gpu_s, r.busy_gpu_s, r.horizon_s) == (22.0, 3.0, 11.0)
    assert r.utilization == pytest.approx(3 / 22)
    assert (r.delay_p50_s, r.delay_p99_s) == (7.0, 7.0)
    assert (r.cold_starts, r.restores, r.hosts_acquired) == (2, 0, 2)


def test_restore_without_buffer_and_long_cooldown_by_hand():
    """buffer=0: each replica acquires a host (2 s) then restores (0.5 s): a, b wait 2.5 s, done 3.5.
    cooldown 3: both released at tick 7 (idle 3.5 s) -> 7 + 7; c at 10: new host, serving at 12.5 (delay 2.5),
    done 13.5 -> 3.5 more. With a 100 s cooldown nothing is released: the first two replicas carry c at once."""
    r = sim.simulate(THREE, Policy("restore", buffer=0), HAND_T, HAND)
    assert r.delays == [2.5, 2.5, 2.5]
    assert (r.paid_gpu_s, r.horizon_s, r.restores) == (17.5, 13.5, 3)
    long = sim.simulate(THREE, Policy("restore", buffer=0), HAND_T,
                        Autoscaler(**{**HAND.__dict__, "cooldown_s": 100.0}))
    assert long.delays == [0.0, 2.5, 2.5]
    assert (long.paid_gpu_s, long.horizon_s, long.restores) == (22.0, 11.0, 2)


def test_static_and_warm_start_by_hand():
    r = sim.simulate(THREE, Policy("static", replicas=2), HAND_T, HAND)
    assert r.delays == [0.0, 0.0, 0.0]
    assert (r.paid_gpu_s, r.busy_gpu_s, r.horizon_s, r.peak_hosts) == (22.0, 3.0, 11.0, 2)
    # warm start: the first second's 2 s of work -> 2 replicas already serving at t=0 under any policy
    warm = sim.simulate(THREE, Policy("cold"), HAND_T, Autoscaler(**{**HAND.__dict__, "warm_start": True}))
    # tick 4: both idle 3 s -> released; c at 10: new host + cold boot = 7 s -> 17, done 18
    assert warm.delays == [0.0, 0.0, 7.0]
    assert warm.cold_starts == 1
    assert (warm.paid_gpu_s, warm.horizon_s) == (4 + 4 + 8, 18.0)


def test_backlog_drain_by_hand():
    """Four 2 s requests at t=0, a 10 s window (0.8 busy slots of offered load), cold start 3 s, no host wait.
    drain_s=8: t=0 the queue (8 s of work) adds 8 / max(8, 3) = 1 -> desired ceil(1.8) = 2, ready at 3: a, b wait
    3 s. While they start, the backlog is not counted again (desired 1). At t=3 the queue holds 4 s: 0.8 + 0.5
    -> 2, no change; c, d start at 5 (delay 5), done 7. paid 2 x 7 = 14."""
    scaler = Autoscaler(**{**HAND.__dict__, "window_s": 10.0, "drain_s": 8.0, "cooldown_s": 100.0})
    four = Trace(tuple(Request(0, 2) for _ in range(4)), 0, "four")
    r = sim.simulate(four, Policy("cold"), Timings(cold_start_s=3, restore_s=1, provision_s=0), scaler)
    assert r.delays == [3.0, 3.0, 5.0, 5.0]
    assert (r.paid_gpu_s, r.busy_gpu_s, r.utilization) == (14.0, 8.0, pytest.approx(8 / 14))
    assert (r.delay_p50_s, r.delay_p99_s, r.cold_starts) == (3.0, 5.0, 2)
    # drain_s=1: 8 / max(1, 3) adds 2.67 -> 4 replicas at once, all wait 3 s, done at 5: 4 x 5 = 20
    fast = sim.simulate(four, Policy("cold"), Timings(cold_start_s=3, restore_s=1, provision_s=0),
                        Autoscaler(**{**scaler.__dict__, "drain_s": 1.0}))
    assert fast.delays == [3.0] * 4
    assert (fast.paid_gpu_s, fast.cold_starts) == (20.0, 4)


def test_fleet_shares_one_buffer_by_hand():
    """Two deployments, one buffered host between them (restore 0.5 s, acquiring a host 2 s, cooldown 3 s):
    a (deployment 0) and b (deployment 1) arrive at t=0, c (deployment 1) at 8; 1 s each.
    t=0   buffer: H0 idle. Tick: deployment 0 (lower index first) wants 1 replica: takes H0 (restored 0.5); the
          buffer is refilled by acquiring H1 (ready 2). Deployment 1 wants 1: no idle host, so it claims H1, the
          host on its way (ready 2, restored 2.5); the buffer is refilled again with H2 (ready 2).
    0.5   H0 serves a (delay 0.5) until 1.5.
    2     H1 arrives and restores for deployment 1 (ready 2.5); H2 arrives and idles in the shared buffer.
    2.5   H1 serves b (delay 2.5: it waited for an acquisition) until 3.5.
    5     tick: H0 idle 3.5 s >= 3, deployment 0 wants 0: the buffer is full (H2), so H0 is released.
    7     tick: H1 idle 3.5 s: released the same way.
    8     c arrives; tick: deployment 1 takes H2 from the buffer (restored 8.5), H3 acquired for the buffer
          (8 -> 10).
    8.5   c served (delay 0.5) until 9.5 = horizon.
    paid: H0 0-5, H1 0-7, H2 0-9.5, H3 8-9.5 = 5 + 7 + 9.5 + 1.5 = 23 GPU-s; busy 3 GPU-s.
    replicas (no buffer time): deployment 0: H0 0-5 = 5; deployment 1: H1 0-7 (claimed while acquired) + H2
    8-9.5 = 8.5; 13.5 GPU-s in all."""
    tr = Trace((Request(0, 1, 0), Request(0, 1, 1), Request(8, 1, 1)), end_s=8, source="hand", deployments=2)
    r = sim.simulate(tr, Policy("restore", buffer=1), HAND_T, HAND)
    assert r.delays == [0.5, 0.5, 2.5]
    assert (r.paid_gpu_s, r.busy_gpu_s, r.horizon_s) == (23.0, 3.0, 9.5)
    assert r.utilization == pytest.approx(3 / 23)
    assert (r.replica_gpu_s, r.replica_utilization) == (13.5, pytest.approx(3 / 13.5))
    assert (r.deployments, r.restores, r.hosts_acquired, r.peak_hosts) == (2, 3, 3, 3)
    d0, d1 = r.per_deployment
    keys = ("served", "starts", "busy_gpu_s", "replica_gpu_s", "delay_p99_s")
    assert [tuple(d[k] for k in keys) for d in (d0, d1)] == [(1, 1, 1, 5, 0.5), (2, 2, 2, 8.5, 2.5)]
    # swap the labels: now deployment 0 holds b and c, takes the buffered host at t=0, and a (deployment 1)
    # waits for the acquisition; the fleet's numbers are the same
    swapped = Trace(tuple(Request(q.t, q.service_s, 1 - q.deployment) for q in tr.requests), 8, "swapped", 2)
    s = sim.simulate(swapped, Policy("restore", buffer=1), HAND_T, HAND)
    assert [(d["served"], d["delay_p99_s"]) for d in s.per_deployment] == [(2, 0.5), (1, 2.5)]
    assert (s.delays, s.paid_gpu_s) == ([0.5, 0.5, 2.5], 23.0)
    # a buffer the fleet can no longer share: each deployment alone with its own buffer of 1 pays for two
    alone = [sim.simulate(tr.only(i), Policy("restore", buffer=1), HAND_T, HAND) for i in (0, 1)]
    assert [a.delays for a in alone] == [[0.5], [0.5, 0.5]]
    assert sum(a.paid_gpu_s for a in alone) > r.paid_gpu_s


def test_scaled_down_host_refills_the_shared_buffer_by_hand():
    """Buffer 1, acquiring a host takes 20 s: a (deployment 0) at t=0, b (deployment 1) at 6; 1 s each.
    t=0  deployment 0 takes the buffered H0 (restored 0.5, serves a until 1.5); H1 is acquired for the buffer
         (ready 20).
    5    tick: H0 idle 3.5 s, deployment 0 wants 0. The buffer has no idle host, so H0 goes back to it and the
         acquisition of H1, now one too many, is cancelled (paid 0-5).
    6    b arrives; tick: deployment 1 takes H0 from the buffer (restored 6.5, delay 0.5, done 7.5 = horizon);
         H2 is acquired for the buffer (6 -> 26).
    paid: H0 0-7.5 + H1 0-5 + H2 6-7.5 = 14 GPU-s; replicas: H0 for deployment 0 0-5, for deployment 1 6-7.5.
    (Released instead of returned, H0 would leave b to wait for H1 until 20.5.)"""
    tr = Trace((Request(0, 1, 0), Request(6, 1, 1)), end_s=6, source="hand")
    r = sim.simulate(tr, Policy("restore", buffer=1), Timings(cold_start_s=5, restore_s=0.5, provision_s=20), HAND)
    assert r.delays == [0.5, 0.5]
    assert (r.paid_gpu_s, r.busy_gpu_s, r.horizon_s, r.replica_gpu_s) == (14.0, 2.0, 7.5, 6.5)
    assert [d["replica_gpu_s"] for d in r.per_deployment] == [5.0, 1.5]
    assert (r.restores, r.hosts_acquired, r.peak_hosts) == (2, 2, 2)


def test_a_host_freed_at_a_tick_serves_a_start_at_that_tick_whatever_the_labels():
    """Buffer 1, acquiring a host takes 20 s: a (deployment 1) at t=0, b (deployment 0) at 5; 1 s each.
    t=0  deployment 1 takes the buffered H0 (restored 0.5, serves a until 1.5); H1 is acquired for the buffer.
    5    tick: deployment 1's H0 has idled 3.5 s, deployment 0 wants 1. Scale-downs go first: H0 joins the idle
         hosts, then deployment 0 takes it (restored 5.5, done 6.5); H1's acquisition goes on for the buffer.
         paid H0 0-6.5 + H1 0-6.5 = 13.
    Starts first (lower index first), b claimed H1 on its way and waited for it until 20.5."""
    t = Timings(cold_start_s=5, restore_s=0.5, provision_s=20)
    for labels in ((1, 0), (0, 1)):
        tr = Trace((Request(0, 1, labels[0]), Request(5, 1, labels[1])), end_s=5, source="hand", deployments=2)
        r = sim.simulate(tr, Policy("restore", buffer=1), t, HAND)
        assert (r.delays, r.paid_gpu_s, r.horizon_s, r.restores, r.hosts_acquired) == ([0.5, 0.5], 13, 6.5, 2, 1)


def test_a_host_freed_while_the_buffer_is_full_serves_another_deployment_at_that_tick():
    """Buffer 1, acquiring a host takes 20 s. Deployment 0 gets a 1 s request every second from 0 to 21, then
    deployment 1 one at 26 and deployment 2 one at 27.
    t=0   deployment 0 takes the buffered H0 (restored 0.5; each request waits 0.5 behind the one before);
          H1 is acquired for the buffer (idle from 20).
    26    tick: H0 has idled 3.5 s (last done 22.5). It joins the idle hosts with H1, one more than the buffer:
          deployment 1's start at this tick takes H0 (restored 26.5, done 27.5); H1 stays the buffer.
    27    deployment 2 takes H1 (restored 27.5, done 28.5 = horizon); H2 is acquired (27 -> 28.5).
    paid H0 0-28.5 + H1 0-28.5 + H2 27-28.5 = 58.5; every request waits 0.5. (H0 released at 26 instead left
    deployment 2 to wait for H2 until 47.)"""
    reqs = tuple([Request(i, 1, 0) for i in range(22)] + [Request(26, 1, 1), Request(27, 1, 2)])
    r = sim.simulate(Trace(reqs, end_s=27, source="hand", deployments=3), Policy("restore", buffer=1),
                     Timings(cold_start_s=5, restore_s=0.5, provision_s=20), HAND)
    assert r.delays == [0.5] * 24
    assert (r.paid_gpu_s, r.horizon_s, r.restores, r.hosts_acquired) == (58.5, 28.5, 3, 2)
    assert [d["replica_gpu_s"] for d in r.per_deployment] == [26.0, 2.5, 1.5]


def test_an_idle_host_serves_a_deployment_waiting_for_a_host_being_acquired():
    """Buffer 1, acquiring a host takes 20 s: a (deployment 0) and b (deployment 1) at 0, 1 s each.
    t=0  deployment 0 takes the buffered H0 (restored 0.5, done 1.5); H1 is acquired for the buffer, and
         deployment 1, with no idle host, claims it (ready 20); H2 is acquired for the buffer.
    5    tick: H0 has idled 3.5 s and joins the idle hosts. Deployment 1 still waits for H1: H0 restores for it
         (5.5, done 6.5 = horizon) and H1 goes back to the buffer's acquisitions; H2, now one too many and
         ready no sooner, is cancelled (paid 0-5).
    paid H0 0-6.5 + H1 0-6.5 + H2 0-5 = 18; deployment 1's replica: H1 claimed 0-5, H0 5-6.5. (Left idle, H0
    made b wait until 20.5.)"""
    tr = Trace((Request(0, 1, 0), Request(0, 1, 1)), end_s=0, source="hand", deployments=2)
    r = sim.simulate(tr, Policy("restore", buffer=1), Timings(cold_start_s=5, restore_s=0.5, provision_s=20), HAND)
    assert r.delays == [0.5, 5.5]
    assert (r.paid_gpu_s, r.horizon_s, r.restores, r.hosts_acquired) == (18.0, 6.5, 2, 2)
    assert [d["replica_gpu_s"] for d in r.per_deployment] == [5.0, 6.5]


def test_no_scale_down_while_a_start_is_under_way():
    """As the pool: cold, min 1, target 80 %. a (0.9 s) at 0.05: tick 1 sees 0.9 s of work in 1 s -> 2 replicas,
    H1 acquired (ready 3, booted 8). Ticks 4 and 5: H0 has idled 3 s but H1 still boots, so H0 stays and serves
    b at 5 (delay 0). The replay ends at 6: paid H0 0-6 + H1 1-6 = 11. (Stopping H0 left b waiting for H1.)"""
    scaler = Autoscaler(**{**HAND.__dict__, "target_utilization": 0.8, "min_replicas": 1})
    tr = Trace((Request(0.05, 0.9), Request(5, 1)), end_s=5, source="hand")
    r = sim.simulate(tr, Policy("cold"), Timings(cold_start_s=5, restore_s=0.5, provision_s=2), scaler)
    assert (r.delays, r.paid_gpu_s, r.horizon_s, r.cold_starts, r.hosts_acquired) == ([0, 0], 11, 6, 1, 1)


def test_nothing_starts_once_the_replay_is_over():
    """min 1 serves a (0.9 s at 0.05) at once; the tick at 1 finds the replay over (a done at 0.95): it starts
    no replica, so none is counted. paid: the replica and the buffer host, 0-0.95 each."""
    scaler = Autoscaler(**{**HAND.__dict__, "target_utilization": 0.8, "min_replicas": 1})
    r = sim.simulate(Trace((Request(0.05, 0.9),), end_s=0.05, source="hand"), Policy("restore", buffer=1),
                     HAND_T, scaler)
    assert (r.delays, r.restores, r.hosts_acquired) == ([0.0], 0, 0)
    assert r.paid_gpu_s == pytest.approx(1.9)


def test_one_deployment_replays_as_before_the_fleet():
    """Numbers from the simulator before it modelled fleets (commit 240d610), same trace and parameters."""
    tr = sim.bursty_trace(seed=3, duration_s=1200, base_rps=2, burst_rps=20, burst_every_s=600, burst_len_s=60)
    t = Timings(cold_start_s=30, restore_s=1.5, provision_s=60)
    r = sim.simulate(tr, Policy("restore", 2), t, Autoscaler())
    assert (len(tr.requests), r.restores, r.hosts_acquired, r.peak_hosts) == (4572, 31, 32, 20)
    assert (r.paid_gpu_s, r.busy_gpu_s) == (pytest.approx(8866.5563), 2286.0)
    assert (r.delay_p50_s, r.delay_p99_s) == (pytest.approx(5.046705), pytest.approx(31.065992))
    c = sim.simulate(tr, Policy("cold"), t, Autoscaler())
    assert (c.paid_gpu_s, c.cold_starts, c.delay_p99_s) == (7882.0, 31, pytest.approx(62.594935))
    s = sim.size_static(tr, Autoscaler(), 2.0)
    assert (s.policy, s.paid_gpu_s, s.delay_p99_s) == ("static:replicas=11", pytest.approx(13210.514658),
                                                       pytest.approx(0.700485))
    # the same requests as deployment 1 of a fleet whose deployment 0 has none (and needs no replica): the same
    moved = Trace(tuple(Request(q.t, q.service_s, 1) for q in tr.requests), tr.end_s, "moved")
    assert moved.n_deployments == 2
    scaler = Autoscaler(min_replicas=0)
    a, b = (sim.simulate(x, Policy("restore", 2), t, scaler) for x in (tr, moved))
    def fleet_part(res):
        return {k: v for k, v in res.summary().items() if k not in ("deployments", "per_deployment")}
    assert fleet_part(a) == fleet_part(b) and a.delays == b.delays
    assert b.per_deployment[0]["served"] == 0 and b.per_deployment[0]["replica_gpu_s"] == 0


def test_fleet_static_is_sized_per_deployment():
    tr = sim.fleet_trace(seed=2, deployments=3, duration_s=900, base_rps_lo=0.5, base_rps_hi=5)
    r = sim.size_static(tr, Autoscaler(), p99_target_s=1.0)
    counts = [d["replicas"] for d in r.per_deployment]
    assert r.replicas == sum(counts) and r.policy == f"static:replicas={sum(counts)}" and r.delay_p99_s <= 1.0
    for i, n in enumerate(counts):
        alone = sim.simulate(tr.only(i), Policy("static", 0, n), scaler=Autoscaler())
        assert alone.delay_p99_s <= 1.0 and r.per_deployment[i]["delay_p99_s"] == alone.delay_p99_s
        if n > 1:
            assert sim.simulate(tr.only(i), Policy("static", 0, n - 1), scaler=Autoscaler()).delay_p99_s > 1.0
    assert (r.paid_gpu_s, r.replica_gpu_s) == (pytest.approx(sum(counts) * r.horizon_s),) * 2


def test_fleet_trace_is_deterministic():
    kw = dict(duration_s=1200, base_rps_lo=0.1, base_rps_hi=10, burst_x=10)
    a, b = sim.fleet_trace(7, 5, **kw), sim.fleet_trace(7, 5, **kw)
    assert a == b and a.n_deployments == 5 and a.requests != sim.fleet_trace(8, 5, **kw).requests
    ts = [q.t for q in a.requests]
    assert ts == sorted(ts) and all(0 <= t < 1200 for t in ts)
    # deployment i does not depend on how many there are
    three = sim.fleet_trace(7, 3, **kw)
    assert three.requests == tuple(q for q in a.requests if q.deployment < 3)
    # each: base in [0.1, 10] rps, bursting 10x for 60 s in 600 s: on average 1.9 x base
    rates = [sum(1 for q in a.requests if q.deployment == i) / 1200 / 1.9 for i in range(5)]
    assert all(0.07 < x < 13 for x in rates) and max(rates) / min(rates) > 2
    # bursts are not in phase: the busiest 60 s of each deployment start at different times
    def busiest(i):
        per_s = [0] * 1200
        for q in a.requests:
            if q.deployment == i:
                per_s[int(q.t)] += 1
        return max(range(1140), key=lambda s: sum(per_s[s:s + 60])) % 600
    assert len({busiest(i) // 30 for i in range(5)}) > 1
    assert sim.simulate(a, Policy("restore", 4)).summary() == sim.simulate(b, Policy("restore", 4)).summary()
    with pytest.raises(sim.SimError, match="deployments must be >= 1"):
        sim.fleet_trace(1, 0)


def test_concurrency_counts_slots():
    """Two slots per replica: 2 requests of 1 s on one replica = 1 GPU-s busy (half of each slot-second)."""
    tr = Trace((Request(0, 1), Request(0, 1)), 0, "two")
    r = sim.simulate(tr, Policy("static", replicas=1), HAND_T, Autoscaler(**{**HAND.__dict__, "concurrency": 2}))
    assert r.delays == [0.0, 0.0]
    assert (r.busy_gpu_s, r.paid_gpu_s) == (1.0, 1.0)


def test_percentile_nearest_rank():
    xs = [float(i) for i in range(1, 101)]
    assert (sim.percentile(xs, 50), sim.percentile(xs, 99), sim.percentile(xs, 100)) == (50.0, 99.0, 100.0)
    assert sim.percentile([3.0], 99) == 3.0


def test_bursty_trace_is_deterministic():
    a = sim.bursty_trace(seed=7, duration_s=1200, base_rps=2, burst_rps=20, burst_every_s=600, burst_len_s=60)
    b = sim.bursty_trace(seed=7, duration_s=1200, base_rps=2, burst_rps=20, burst_every_s=600, burst_len_s=60)
    c = sim.bursty_trace(seed=8, duration_s=1200, base_rps=2, burst_rps=20, burst_every_s=600, burst_len_s=60)
    assert a == b and a.requests != c.requests
    ts = [r.t for r in a.requests]
    assert ts == sorted(ts) and all(0 <= t < 1200 for t in ts)
    calm = sum(1 for t in ts if t % 600 < 540)
    burst = len(ts) - calm
    # expected 2 x 1080 = 2160 calm and 20 x 120 = 2400 burst arrivals; Poisson noise is a few %
    assert 1950 < calm < 2370 and 2200 < burst < 2600
    assert sim.simulate(a, Policy("restore", 2)).summary() == sim.simulate(b, Policy("restore", 2)).summary()


def test_csv_trace(tmp_path, monkeypatch):
    p = tmp_path / "t.csv"
    p.write_text("timestamp,duration_s\n1700000010,2\n1700000000,\n1700000005.5,0.25\n")
    tr = sim.load_trace(p, service_s=1.0)
    assert [(r.t, r.service_s) for r in tr.requests] == [(0.0, 1.0), (5.5, 0.25), (10.0, 2.0)]  # sorted
    assert tr.end_s == 10.0
    # requests of one instant (a log's whole seconds) queue in the file's order, not shortest first
    p.write_text("timestamp,duration_s\n0,1\n0,0.5\n0,0.2\n")
    tr = sim.load_trace(p)
    assert [r.service_s for r in tr.requests] == [1, 0.5, 0.2]
    assert sim.simulate(tr, Policy("static", replicas=1), HAND_T, HAND).delays == [0, 1, 1.5]  # one at a time
    d = tmp_path / "deps.csv"
    d.write_text("deployment,timestamp\n10,0\n9,1\n10,2\n")  # whole-number labels sort as numbers
    tr = sim.load_trace(d)
    assert [r.deployment for r in tr.requests] == [1, 0, 1] and tr.n_deployments == 2
    d.write_text("timestamp,deployment\n0,chat\n1,embed\n2,chat\n3,asr\n")
    assert [r.deployment for r in sim.load_trace(d).requests] == [1, 2, 1, 0]  # asr, chat, embed
    q = tmp_path / "plain.csv"
    q.write_text("# seconds\n3\n1\n2000-01-01T00:00:05Z\n")  # no header, mixed forms, a comment
    assert [r.t for r in sim.load_trace(q, 0.5).requests] == [0.0, 2.0, pytest.approx(946684805 - 1)]
    q.write_text("2000-01-01T00:00:05Z\n2000-01-01T00:00:07Z\n")  # ISO 8601 first: not taken for a header
    assert [r.t for r in sim.load_trace(q, 0.5).requests] == [0.0, 2.0]
    # a spreadsheet's byte-order mark; a time without a zone is UTC on every machine (this one's TZ aside)
    q.write_text("\ufefftimestamp\n2000-01-01T00:00:05\n2000-01-01T00:00:07Z\n", encoding="utf-8")
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert [r.t for r in sim.load_trace(q, 0.5).requests] == [0.0, 2.0]
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("text,match", [
    ("", "has no requests"),
    ("timestamp\n", "has a header but no requests"),
    ("0\nsoon\n", r"line 2: 'soon' is not a timestamp"),
    ("time,dur\n1,2\n", "has no 'timestamp' column"),
    ("timestamp,duration_s\n1,fast\n", "line 2: duration 'fast' is not a number"),
    ("timestamp,duration_s\n1,0\n", "must be > 0"),
    ("timestamp,deployment\n1,a\n2,\n", "line 3: no deployment"),
    ("timestamp\n1\n\xff\n", "is not UTF-8 text"),
    ("timestamp\n# nothing yet\n", "every row after the header is a comment"),
    ("timestamp,duration_ms\n1,500\n", "header has unknown column\\(s\\) 'duration_ms'"),  # not 0.5 s each
    ("1,0.5,chat\n", "line 1: 3 columns without a header row"),  # the deployment column was dropped
    ("timestamp\n0,5\n", "line 2: 2 columns, but the header names 1"),  # 5 s taken for --service-s
    ("timestamp,duration_s\n0,0.5\n1,0.5,chat\n", "line 3: 3 columns, but the header names 2"),
    ("timestamp,\n0,\n", "header has unknown column\\(s\\) ''"),  # a spreadsheet's trailing comma
    ("timestamp\n1\n\"BIG\"\n", "is not CSV as expected: field larger than field limit"),  # BIG: 200 kB
])
def test_csv_errors_are_one_line(tmp_path, text, match):
    p = tmp_path / "bad.csv"
    p.write_bytes(text.replace("BIG", "x" * 200_000).encode("latin-1"))
    with pytest.raises(sim.TraceError, match=match) as e:
        sim.load_trace(p)
    assert "\n" not in str(e.value) and str(p) in str(e.value)


def test_csv_comments_and_labels(tmp_path):
    """'#' starts a comment, except in a column that is not the timestamp's (a label may start with '#'); labels
    that look like digits but are not ASCII ones ('²') sort as text, without a traceback."""
    p = tmp_path / "t.csv"
    p.write_text("# exported today\ndeployment,timestamp\n# note\n#chat,5\n\u00b2,6\n\u00b3,7\n", encoding="utf-8")
    tr = sim.load_trace(p)
    assert [(r.t, r.deployment) for r in tr.requests] == [(0, 0), (1, 1), (2, 2)] and tr.n_deployments == 3
    big = "1" + "0" * 5000  # more digits than int() takes: still in numeric order, no traceback
    p.write_text(f"deployment,timestamp\n{big},0\n9,1\n010,2\n")
    assert [r.deployment for r in sim.load_trace(p).requests] == [2, 0, 1]


@pytest.mark.parametrize("call,match", [
    (lambda: sim.bursty_trace(duration_s=math.inf), "duration_s must be a finite number > 0"),
    (lambda: sim.bursty_trace(burst_rps=math.nan), "burst_rps must be a finite number >= 0"),
    (lambda: sim.fleet_trace(base_rps_hi=math.inf), "base_rps_hi must be a finite number"),
    (lambda: sim.fleet_trace(burst_x=math.inf), "burst_x must be >= 1"),
    (lambda: Autoscaler(cooldown_s=math.nan).check(), "cooldown_s must be a finite number >= 0"),
    (lambda: Autoscaler(tick_s=math.inf).check(), "tick_s must be a finite number > 0"),
    (lambda: sim.simulate(THREE, Policy("cold", 0), Timings(cold_start_s=math.inf)), "cold_start_s must be a finite"),
    (lambda: sim.simulate(THREE, Policy("cold", 0), gpu_hour_usd=-1), "gpu_hour_usd must be a finite number >= 0"),
    (lambda: sim.simulate(THREE, Policy("static", 0, 0)), "at least 1 replica per deployment"),
    (lambda: sim.run_policies(THREE, [Policy("static", 0)], p99_target_s=-1), "p99_target_s must be a finite"),
    # epoch seconds with one stray 0: 1.7e9 one-second ticks
    (lambda: sim.simulate(Trace((Request(0, 1), Request(1.7e9, 1)), 1.7e9, "t"), Policy("cold", 0)),
     "more than 10,000,000 ticks"),
    (lambda: sim.simulate(Trace((Request(0, 5e8),), 0, "t"), Policy("cold", 0)), "more than 10,000,000 ticks"),
    (lambda: sim.simulate(Trace((Request(0, math.inf),), 0, "t"), Policy("cold", 0)), "duration must be > 0 s"),
])
def test_numbers_must_be_finite_and_in_range(call, match):
    """An infinite duration never ends and NaN silently switches a rule off: both are refused in one line."""
    with pytest.raises(sim.SimError, match=match):
        call()


def test_policy_specs():
    assert Policy.parse("restore") == Policy("restore", 1)
    assert Policy.parse("restore:buffer=4").name == "restore:buffer=4"
    assert Policy.parse("cold") == Policy("cold", 0)
    assert Policy.parse("static:replicas=3") == Policy("static", 0, 3)
    for bad in ("warm", "restore:buffer=-1", "restore:replicas=2", "static:replicas=x", "cold:buffer"):
        with pytest.raises(sim.SimError):
            Policy.parse(bad)


def test_static_sizing_meets_target():
    tr = sim.bursty_trace(seed=3, duration_s=900, base_rps=2, burst_rps=10, burst_every_s=300, burst_len_s=60)
    r = sim.size_static(tr, Autoscaler(), p99_target_s=1.0)
    assert r.delay_p99_s <= 1.0
    fewer = sim.simulate(tr, Policy("static", replicas=r.replicas - 1), scaler=Autoscaler())
    assert fewer.delay_p99_s > 1.0


def _register(url: str, timings: dict) -> Snapshot:
    """A snapshot of one image (registered first: a snapshot needs its image) with these build timings."""
    images.register(url, _image("ab" * 32))
    return snapshots.register(url, Snapshot(digest=uuid.uuid4().hex * 2, image_digest="ab" * 32, compat_key="k",
                                            golden_digest="g", size=1, files=1, new_bytes=1, timings_ms=timings))[0]


def _event(digest: str, outcome: str, total_ms: int) -> RestoreEvent:
    return RestoreEvent(snapshot_digest=digest, host_id="h", replica=uuid.uuid4().hex[:8], outcome=outcome,
                        timings_ms={"criu": total_ms - 40, "total": total_ms})


def test_measured_timings_from_registry(tmp_path):
    url = f"sqlite:///{tmp_path / 'reg.db'}"
    assert sim.measured_timings(url)["restore_s"] is None  # no registry file: nothing, and none created
    assert not (tmp_path / "reg.db").exists()
    s1 = _register(url, {"root": 100, "cold_boot": 3000, "golden": 40, "dump": 900})
    _register(url, {"root": 0, "cold_boot": 5000, "golden": 60})
    _register(url, {"root": 0, "cold_boot": 2000, "golden": 0})
    for ms in (200, 400, 250):
        snapshots.record_restore(url, _event(s1.digest, "restored", ms))
    m = sim.measured_timings(url)
    assert m["restore_s"] == 0.25
    assert m["cold_start_s"] == 3.14  # median of 3.14, 5.06, 2.0 (root + cold_boot + golden)
    assert "3 restored replicas" in m["sources"]["restore_s"] and "3 snapshot builds" in m["sources"]["cold_start_s"]
    for ms in (2500, 2300):
        snapshots.record_restore(url, _event(s1.digest, "cold-boot", ms))
    m = sim.measured_timings(url)
    assert m["cold_start_s"] == 2.4 and "2 cold-booted replicas" in m["sources"]["cold_start_s"]
    t, src = sim.resolve_timings(url, cold_start_s=60.0, provision_s=30.0)
    assert (t.cold_start_s, t.restore_s, t.provision_s) == (60.0, 0.25, 30.0)
    assert src["cold_start_s"] == "--cold-start-s" and "registry" in src["restore_s"]


def _cli():
    return click.Group(commands=[sim.cli_command()])


def test_cli_end_to_end(tmp_path):
    cfg = Config(state_dir=tmp_path / "state")
    url = cfg.registry_url
    s = _register(url, {"root": 0, "cold_boot": 30000, "golden": 0})
    for ms in (1500, 1000, 2000):
        snapshots.record_restore(url, _event(s.digest, "restored", ms))
    trace = tmp_path / "trace.csv"
    trace.write_text("timestamp\n" + "".join(f"{t / 4}\n" for t in range(400)) + "".join(
        f"{100 + t / 40}\n" for t in range(800)))
    out = tmp_path / "plots"
    res = CliRunner().invoke(_cli(), ["simulate", str(trace), "--policy", "cold", "--policy", "restore:buffer=2",
                                      "--policy", "static", "--service-s", "0.5", "--provision-s", "30",
                                      "--out", str(out)], obj=cfg)
    assert res.exit_code == 0, res.output
    assert "restore: 1.5 s  (median total of 3 restored replicas in the registry)" in res.output
    assert "cold start: 30 s  (median launch-to-first-answer" in res.output
    assert "provision: 30 s  (--provision-s)" in res.output
    for name in ("cold:buffer=0", "restore:buffer=2", "static:replicas="):
        assert name in res.output
    for png in ("timeline.png", "delay_cdf.png", "summary.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    res = CliRunner().invoke(_cli(), ["simulate", "--generate", "--duration-s", "1200", "--json", "--no-plots",
                                      "--restore-s", "2", "--cold-start-s", "60"], obj=cfg)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert [r["policy"] for r in doc["results"]][:4] == [Policy.parse(p).name for p in sim.DEFAULT_POLICIES[:4]]
    assert doc["timings"]["sources"]["restore_s"] == "--restore-s" and doc["plots"] == []
    by = {r["policy"]: r for r in doc["results"]}
    assert by["restore:buffer=4"]["delay_p99_s"] < by["cold:buffer=0"]["delay_p99_s"]
    for r in doc["results"]:
        assert 0 < r["utilization"] <= 1 and r["paid_gpu_s"] >= r["busy_gpu_s"]

    res = CliRunner().invoke(_cli(), ["simulate", "--generate", "--deployments", "3", "--duration-s", "600",
                                      "--json", "--no-plots", "--restore-s", "2", "--cold-start-s", "60"], obj=cfg)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["trace"]["deployments"] == 3 and "fleet seed=1 3 deployments" in doc["trace"]["source"]
    for r in doc["results"]:
        assert r["deployments"] == 3 and [d["deployment"] for d in r["per_deployment"]] == [0, 1, 2]
        assert sum(d["served"] for d in r["per_deployment"]) == r["served"] == doc["trace"]["requests"]
        assert r["replica_gpu_s"] <= r["paid_gpu_s"] + 1e-6
    static = doc["results"][-1]
    assert static["replicas"] == sum(d["replicas"] for d in static["per_deployment"])


@pytest.mark.parametrize("args,match", [
    ([], "give either a TRACE CSV file or --generate"),
    (["--generate", "--policy", "warm"], "policy 'warm'"),
    (["missing.csv"], "cannot read trace missing.csv"),
    (["--generate", "--target-utilization", "1.5"], "target utilization"),
    (["--generate", "--deployments", "0"], "--deployments must be >= 1"),
    (["t.csv", "--deployments", "2"], "--deployments is for --generate"),
    (["--generate", "--service-s", "inf"], "--service-s must be > 0 and finite"),
    (["--generate", "--p99-target-s", "nan"], "p99_target_s must be a finite number"),
])
def test_cli_errors(tmp_path, args, match, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(_cli(), ["simulate", *args, "--no-plots"], obj=Config(state_dir=tmp_path / "s"))
    assert res.exit_code == 1
    assert match in res.output and res.output.count("\n") == 1 and res.output.startswith("error: ")


@pytest.mark.parametrize("args,match", [
    (["--p99-target-s", "nan"], "--p99-target-s must be a finite number >= 0 (got nan)"),
    (["--gpu-hour-usd", "-1"], "--gpu-hour-usd must be a finite number >= 0 (got -1.0)"),
    (["--buffers", "2,-1"], "--buffers needs sizes >= 0"),
    (["--provision-s", "-1"], "provision_s must be a finite number >= 0 (got -1.0)"),
    (["--restore-s", "nan"], "restore_s must be a finite number >= 0 (got nan)"),
])
def test_bench_errors(args, match):
    """bench/runtime_sim.py refuses bad numbers before it prints anything, in one line."""
    bench = Path(__file__).parent.parent / "bench" / "runtime_sim.py"
    r = subprocess.run([sys.executable, str(bench), "--deployments", "1", "--duration-s", "60", *args],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr.startswith(f"error: {match}") and r.stderr.count("\n") == 1
