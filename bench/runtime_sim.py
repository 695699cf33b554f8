"""P7: simulated GPU allocation utilization and p99 queueing delay, buffer + restore vs cold boot, on a bursty
multi-tenant fleet trace (thaw.runtime.simulate; deterministic: same arguments, same numbers).

The fleet (default): --deployments bursty deployments (simulate.fleet_trace: base rates log-uniform in
[--base-rps-lo, --base-rps-hi], bursts of --burst-x times the base, random phases) share one pool of hosts and one
buffer of idle hosts; each deployment has its own queue, replicas and autoscaler. The fleet is replayed for
1800 s by default (3600 s would take the --sweep past two minutes on 2 CPUs); --duration-s changes it. For
reference the one-deployment trace of earlier runs (bursty, --base-rps -> --burst-rps, 3600 s, buffers 0,1,2,4)
is replayed too; --deployments 1 makes it the only (and headline) trace, as before.

Policies: cold (new host + cold boot), restore with the --buffers fleet buffers (idle paid hosts, snapshot
restore) and, for reference, static (always-on replicas per deployment, each the fewest that meet the p99
target: "provision for the peak"). Start times: flags, else the registry's measured medians (--db-url), else the
defaults below; each number's source is printed. The autoscaler runs with thaw.runtime.simulate.Autoscaler's
defaults for every policy and deployment (--target-utilization / --cooldown-s change them for all); --sweep
instead tunes each autoscaled policy on its own over a grid of target utilization x cooldown, the same grid for
cold and restore.

util = GPU-seconds busy / GPU-seconds paid by the fleet (acquiring, booting/restoring, idle buffered hosts
included). depl.util, for context only, is the deployments' own view: busy / GPU-seconds of their replicas,
without the shared buffer.

Headline rule: P7 utilization = the highest util among the restore policies on the (fleet) trace whose p99
queueing delay is <= --p99-target-s (default 2 s). If none meets the target, the restore policy with the lowest
p99 is reported and the line says "p99 target missed".

Usage: python3 bench/runtime_sim.py [--cold-start-s 60] [--restore-s 2] [--provision-s 90] [--db-url DSN]
       [--deployments 20 --base-rps-lo 0.1 --base-rps-hi 10 --burst-x 10 --duration-s 1800]
       [--base-rps 2 --burst-rps 20 (one deployment)] [--burst-every-s 600 --burst-len-s 60 --ramp-s 0
       --service-s 0.5] [--buffers 0,4,8,16,32,64] [--p99-target-s 2] [--sweep] [--out DIR]
The last line is the headline: ``P7 utilization: <percent>%``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from thaw.runtime import simulate as sim

from common import machine_line  # bench/common.py

SWEEP_UTILIZATION = (0.6, 0.7, 0.8, 0.9, 0.95)
SWEEP_COOLDOWN_S = (10.0, 30.0, 60.0)


FLEET_BUFFERS = "0,4,8,16,32,64"  # up to about the largest single jump (a 10 rps deployment bursting 10x)
ONE_BUFFERS = "0,1,2,4"
FLEET_DURATION_S = 1800.0
ONE_DURATION_S = 3600.0


def evaluate(trace: sim.Trace, buffers: list[int], timings: sim.Timings, scaler: sim.Autoscaler,
             args: argparse.Namespace) -> tuple[sim.Result, str]:
    """Replay every policy (or sweep them), print the table and the p99 verdicts; return the headline result and
    its note ("" or " (p99 target missed)")."""
    policies = [sim.Policy("cold")] + [sim.Policy("restore", b) for b in buffers] + [sim.Policy("static")]
    print(f"trace: {trace.source}")
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
        n_runs = f"{runs} replays + static sizing"
    else:
        results = sim.run_policies(trace, policies, timings, scaler, args.gpu_hour_usd, args.p99_target_s)
        n_runs = f"{len(results) - 1} replays + static sizing"
    wall = time.monotonic() - t0
    print(sim.format_table(results))
    print(f"({n_runs} of {len(trace.requests)} requests in {wall:.1f} s)")
    if args.out:
        out = args.out / ("fleet" if trace.n_deployments > 1 else "one")
        for p in sim.plot(results, trace, out, scaler.concurrency):
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
    if trace.n_deployments > 1:
        print(f"per deployment under {best.policy}: requests, p99 s, depl.util")
        rows = sorted(best.per_deployment, key=lambda d: -d["served"])
        for k in range(0, len(rows), 4):
            print("  " + "   ".join(f"#{d['deployment']:<2} {d['served']:>6} {d['delay_p99_s']:>6.2f} "
                                    f"{d['replica_utilization'] * 100:>5.1f}%" for d in rows[k:k + 4]))
    return best, note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cold-start-s", type=float, help=f"model cold boot on a host (default: registry, else "
                                                       f"{sim.DEFAULT_COLD_START_S:g})")
    ap.add_argument("--restore-s", type=float, help=f"snapshot restore (default: registry, else "
                                                    f"{sim.DEFAULT_RESTORE_S:g})")
    ap.add_argument("--provision-s", type=float, help=f"acquiring a GPU host (default {sim.DEFAULT_PROVISION_S:g})")
    ap.add_argument("--db-url", help="registry DSN to take measured restore / cold-boot medians from")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--deployments", type=int, default=20, help="fleet size; 1: the one-deployment trace only")
    ap.add_argument("--duration-s", type=float,
                    help=f"default {FLEET_DURATION_S:g} for the fleet, {ONE_DURATION_S:g} for one deployment")
    ap.add_argument("--base-rps-lo", type=float, default=0.1, help="fleet: lowest base rate of a deployment")
    ap.add_argument("--base-rps-hi", type=float, default=10.0, help="fleet: highest base rate of a deployment")
    ap.add_argument("--burst-x", type=float, default=10.0, help="fleet: burst rate / base rate")
    ap.add_argument("--base-rps", type=float, default=2.0, help="one deployment: calm rate")
    ap.add_argument("--burst-rps", type=float, default=20.0, help="one deployment: burst rate")
    ap.add_argument("--burst-every-s", type=float, default=600.0)
    ap.add_argument("--burst-len-s", type=float, default=60.0)
    ap.add_argument("--ramp-s", type=float, default=0.0)
    ap.add_argument("--service-s", type=float, default=0.5)
    ap.add_argument("--buffers", help=f"restore buffer sizes, comma-separated (default: {FLEET_BUFFERS} for the "
                                      f"fleet, {ONE_BUFFERS} for one deployment)")
    ap.add_argument("--p99-target-s", type=float, default=2.0)
    ap.add_argument("--gpu-hour-usd", type=float, default=2.5)
    ap.add_argument("--target-utilization", type=float, default=sim.Autoscaler.target_utilization)
    ap.add_argument("--cooldown-s", type=float, default=sim.Autoscaler.cooldown_s)
    ap.add_argument("--sweep", action="store_true",
                    help="tune each autoscaled policy on its own: target utilization x cooldown grid, keep the "
                         "setting with the highest utilization that meets the p99 target (else the lowest p99)")
    ap.add_argument("--out", type=Path, help="also write the PNG plots here (fleet/ and one/)")
    args = ap.parse_args()

    fleet = args.deployments > 1
    try:
        if args.deployments < 1:
            raise sim.SimError(f"--deployments must be >= 1 (got {args.deployments})")
        buffers = [int(b) for b in (args.buffers or (FLEET_BUFFERS if fleet else ONE_BUFFERS)).split(",")
                   if b.strip()]
        shape = (args.burst_every_s, args.burst_len_s, args.service_s, args.ramp_s)
        given = args.duration_s is not None  # (0 is refused by the trace, not taken for the default)
        one = sim.bursty_trace(args.seed, args.duration_s if not fleet and given else ONE_DURATION_S,
                               args.base_rps, args.burst_rps, *shape)
        main_trace = (sim.fleet_trace(args.seed, args.deployments, args.duration_s if given else FLEET_DURATION_S,
                                      args.base_rps_lo, args.base_rps_hi, args.burst_x, *shape)
                      if fleet else one)
        if not buffers or min(buffers) < 0:
            raise sim.SimError(f"--buffers needs sizes >= 0, e.g. 0,4,16 (got {args.buffers!r})")
        timings, sources = sim.resolve_timings(args.db_url, args.cold_start_s, args.restore_s, args.provision_s)
        timings.check()
        scaler = sim.Autoscaler(target_utilization=args.target_utilization, cooldown_s=args.cooldown_s)
        scaler.check()
        sim.check_finite("--p99-target-s", args.p99_target_s)
        sim.check_finite("--gpu-hour-usd", args.gpu_hour_usd)
    except (ValueError, sim.SimError) as e:
        sys.exit(f"error: {e}")

    print(machine_line())
    for name, label in (("cold_start_s", "cold start"), ("restore_s", "restore"), ("provision_s", "provision")):
        print(f"{label}: {getattr(timings, name):g} s  ({sources[name]})")
    print("autoscaler: " + " ".join(f"{k}={v}" for k, v in scaler.__dict__.items()))
    print("util = GPU-s busy / GPU-s paid by the fleet (paid includes acquiring, booting/restoring and idle "
          "buffered hosts); depl.util = busy / GPU-s of the deployments' replicas, without the shared buffer "
          "(context only, not the headline)")
    if fleet:
        print(f"== fleet: {args.deployments} deployments sharing one buffer ==")
    best, note = evaluate(main_trace, buffers, timings, scaler, args)
    if fleet:
        print("== for reference: the one-deployment trace with a dedicated buffer ==")
        ref, ref_note = evaluate(one, [int(b) for b in ONE_BUFFERS.split(",")], timings, scaler, args)
        print(f"one-deployment P7 (reference, not the headline): {ref.utilization * 100:.1f}%{ref_note}")
    print(f"P7 utilization: {best.utilization * 100:.1f}%{note}")


if __name__ == "__main__":
    main()
