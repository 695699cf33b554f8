"""P7: simulated GPU allocation utilization and p99 queueing delay, buffer + restore vs cold boot, on one bursty
trace (thaw.runtime.simulate; deterministic: same arguments, same numbers).

Policies: cold (new host + cold boot), restore with buffers 0, 1, 2, 4 (idle paid hosts, snapshot restore) and,
for reference, static (always-on replicas, the fewest that meet the p99 target: "provision for the peak").
Start times: flags, else the registry's measured medians (--db-url), else the defaults below; each number's
source is printed. The autoscaler runs with thaw.runtime.simulate.Autoscaler's defaults for every policy
(--target-utilization / --cooldown-s change them for all); --sweep instead tunes each autoscaled policy on its
own over a grid of target utilization x cooldown, the same grid for cold and restore.

Headline rule: P7 utilization = the highest utilization among the restore policies whose p99 queueing delay is
<= --p99-target-s (default 2 s). If none meets the target, the restore policy with the lowest p99 is reported
and the line says "p99 target missed".

Usage: python3 bench/runtime_sim.py [--cold-start-s 60] [--restore-s 2] [--provision-s 90] [--db-url DSN]
       [--base-rps 2 --burst-rps 20 --burst-every-s 600 --burst-len-s 60 --ramp-s 0 --service-s 0.5]
       [--buffers 0,1,2,4] [--p99-target-s 2] [--sweep] [--out DIR]
The last line is the headline: ``P7 utilization: <percent>%``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from thaw.runtime import simulate as sim

SWEEP_UTILIZATION = (0.6, 0.7, 0.8, 0.9, 0.95)
SWEEP_COOLDOWN_S = (10.0, 30.0, 60.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cold-start-s", type=float, help=f"model cold boot on a host (default: registry, else "
                                                       f"{sim.DEFAULT_COLD_START_S:g})")
    ap.add_argument("--restore-s", type=float, help=f"snapshot restore (default: registry, else "
                                                    f"{sim.DEFAULT_RESTORE_S:g})")
    ap.add_argument("--provision-s", type=float, help=f"acquiring a GPU host (default {sim.DEFAULT_PROVISION_S:g})")
    ap.add_argument("--db-url", help="registry DSN to take measured restore / cold-boot medians from")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--duration-s", type=float, default=3600.0)
    ap.add_argument("--base-rps", type=float, default=2.0)
    ap.add_argument("--burst-rps", type=float, default=20.0)
    ap.add_argument("--burst-every-s", type=float, default=600.0)
    ap.add_argument("--burst-len-s", type=float, default=60.0)
    ap.add_argument("--ramp-s", type=float, default=0.0)
    ap.add_argument("--service-s", type=float, default=0.5)
    ap.add_argument("--buffers", default="0,1,2,4", help="restore buffer sizes, comma-separated")
    ap.add_argument("--p99-target-s", type=float, default=2.0)
    ap.add_argument("--gpu-hour-usd", type=float, default=2.5)
    ap.add_argument("--target-utilization", type=float, default=sim.Autoscaler.target_utilization)
    ap.add_argument("--cooldown-s", type=float, default=sim.Autoscaler.cooldown_s)
    ap.add_argument("--sweep", action="store_true",
                    help="tune each autoscaled policy on its own: target utilization x cooldown grid, keep the "
                         "setting with the highest utilization that meets the p99 target (else the lowest p99)")
    ap.add_argument("--out", type=Path, help="also write the PNG plots here")
    args = ap.parse_args()

    try:
        buffers = [int(b) for b in args.buffers.split(",") if b.strip()]
        trace = sim.bursty_trace(args.seed, args.duration_s, args.base_rps, args.burst_rps, args.burst_every_s,
                                 args.burst_len_s, args.service_s, args.ramp_s)
        timings, sources = sim.resolve_timings(args.db_url, args.cold_start_s, args.restore_s, args.provision_s)
    except (ValueError, sim.SimError) as e:
        sys.exit(f"error: {e}")
    scaler = sim.Autoscaler(target_utilization=args.target_utilization, cooldown_s=args.cooldown_s)
    policies = ([sim.Policy("cold")] + [sim.Policy("restore", b) for b in buffers] + [sim.Policy("static")])

    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, {platform.platform()}, "
          f"Python {platform.python_version()}")
    print(f"trace: {trace.source}")
    for name, label in (("cold_start_s", "cold start"), ("restore_s", "restore"), ("provision_s", "provision")):
        print(f"{label}: {getattr(timings, name):g} s  ({sources[name]})")
    print("autoscaler: " + " ".join(f"{k}={v}" for k, v in scaler.__dict__.items()))
    t0 = time.monotonic()
    if args.sweep:
        results, runs = [], 0
        for p in policies:
            if p.kind == "static":
                results += sim.run_policies(trace, [p], timings, scaler, args.gpu_hour_usd, args.p99_target_s)
                continue
            tried = []
            for u in SWEEP_UTILIZATION:
                for cd in SWEEP_COOLDOWN_S:
                    sc = sim.Autoscaler(**{**scaler.__dict__, "target_utilization": u, "cooldown_s": cd})
                    tried.append((sim.simulate(trace, p, timings, sc, args.gpu_hour_usd), u, cd))
            runs += len(tried)
            ok = [t for t in tried if t[0].delay_p99_s <= args.p99_target_s]
            r, u, cd = (max(ok, key=lambda t: t[0].utilization) if ok
                        else min(tried, key=lambda t: (t[0].delay_p99_s, -t[0].utilization)))
            print(f"sweep {p.name}: target_utilization={u} cooldown_s={cd:g} "
                  f"({'best utilization within the p99 target' if ok else 'none meets the p99 target: lowest p99'})")
            results.append(r)
        n_runs = runs + 1
    else:
        results = sim.run_policies(trace, policies, timings, scaler, args.gpu_hour_usd, args.p99_target_s)
        n_runs = len(results)
    wall = time.monotonic() - t0
    print(sim.format_table(results))
    print(f"({n_runs} replays of {len(trace.requests)} requests in {wall:.1f} s; util = GPU-s busy / GPU-s "
          f"paid, paid includes acquiring, booting/restoring and idle buffered hosts)")
    if args.out:
        for p in sim.plot(results, trace, args.out, scaler.concurrency):
            print(f"plot: {p}")

    target = args.p99_target_s
    for r in results:
        ok = "meets" if r.delay_p99_s <= target else "misses"
        print(f"p99 {r.policy}: {r.delay_p99_s:.2f} s ({ok} <= {target:g} s), utilization {r.utilization * 100:.1f}%")
    restore = [r for r in results if r.kind == "restore"]
    cold = next(r for r in results if r.kind == "cold")
    meeting = [r for r in restore if r.delay_p99_s <= target]
    if meeting:
        best = max(meeting, key=lambda r: (r.utilization, -r.delay_p99_s))
        note = ""
        print(f"best restore policy within p99 <= {target:g} s: {best.policy} ({best.utilization * 100:.1f}%, p99 "
              f"{best.delay_p99_s:.2f} s) vs cold {cold.utilization * 100:.1f}% at p99 {cold.delay_p99_s:.2f} s")
    else:
        best = min(restore, key=lambda r: (r.delay_p99_s, -r.utilization))
        note = " (p99 target missed)"
        print(f"no restore policy met p99 <= {target:g} s; lowest p99: {best.policy} ({best.delay_p99_s:.2f} s, "
              f"{best.utilization * 100:.1f}%) vs cold {cold.utilization * 100:.1f}% at p99 {cold.delay_p99_s:.2f} s")
    print(f"P7 utilization: {best.utilization * 100:.1f}%{note}")


if __name__ == "__main__":
    main()
