"""`thaw simulate`: replay a demand trace against scaling policies and report GPU allocation utilization,
queueing delay and cost.

A small deterministic discrete-event simulation (heapq, no randomness once the trace is fixed).

Model
-----
* A **fleet** of one or more **deployments** shares one pool of hosts and one buffer of idle hosts (as the
  runtime's pool shares unreserved idle hosts between deployments). Each deployment has its own FIFO queue, its
  own replicas and its own autoscaler state; the autoscaler parameters are the same for all. One deployment is
  the fleet of one.
* **Requests** arrive at ``t`` for a ``deployment`` and need ``service_s`` seconds of one replica slot. A request
  goes to its deployment's oldest ready replica with a free slot (packing, so that the newest replicas go idle
  first).
* **Hosts** are GPUs. A host is *paid from the moment it is requested until it is released* (or the end of the
  replay), whatever it is doing: being acquired (``provision_s``), booting or restoring, serving, or sitting
  idle in the buffer. Buffer hosts are reserved GPUs, so they are paid.
* A **replica** is a host running the model, serving ``concurrency`` requests at a time.
* **Policies**

  - ``cold``: a new replica needs a new host (``provision_s``; or one that another deployment freed at that
    tick, see below) and then a cold boot of the model (``cold_start_s``: image pull, CUDA init, weight load,
    warm-up).
  - ``restore``: thaw. ``buffer`` idle hosts are kept ready for the whole fleet; a new replica of any
    deployment takes one and restores the snapshot onto it (``restore_s``). Each host taken is replaced by
    acquiring another (``provision_s``, paid while it is acquired). When the buffer is empty a new replica takes
    a host already being acquired for the buffer (the one ready soonest) or acquires one itself, then restores.
    At each tick every deployment scales down before any starts, so a host freed at that tick serves any
    deployment's start; then an idle host left over restores for a deployment still waiting for a host being
    acquired (that acquisition goes back to the buffer), and the buffer is trimmed to ``buffer`` hosts, idle or
    being acquired (acquisitions ready last are cancelled first, then idle hosts released). At the same tick,
    deployments start in index order (a lower index takes a buffered host first).
  - ``cold:buffer=N`` is also allowed (idle hosts, but cold boots on them).
  - ``static``: ``replicas`` always-on warm replicas per deployment, no autoscaling, no buffer: the "provision
    for the peak" reference. Without ``replicas=N`` each deployment gets the fewest replicas whose p99 delay
    over its requests meets the p99 target (reported: the fleet's total).

* **Autoscaler** (cold and restore), per deployment, evaluated every ``tick_s`` seconds (ticks at k * tick_s,
  after the events of the same instant). Demand, in busy request slots: the offered load, i.e. the service
  seconds of the requests that arrived in (now - window_s, now] divided by window_s (while requests are queued,
  the same over the shorter ``panic_window_s`` when that is higher: a burst is seen within seconds); plus, when
  no replica is starting, the queued service seconds divided by max(``drain_s``, provision_s + start time) (a
  backlog the present replicas do not absorb, planned to drain no faster than new capacity can arrive; not
  counted again while the capacity asked for is on its way). desired = ceil(demand / (concurrency *
  target_utilization)), clamped to [min_replicas, max_replicas]; replicas starting count as present.
  Scale-down: a ready replica idle for ``cooldown_s`` is stopped (newest first) while the replicas left stay
  >= max(min_replicas, desired). At time 0 the buffer is full and each deployment has max(min_replicas, desired
  for the offered load of its first ``window_s`` seconds) replicas warm (``warm_start``; else just
  min_replicas), so that a replay starts in a steady state rather than with a cold service.

Metrics
-------
* GPU-seconds paid: sum over hosts of (release - request), each clipped to [0, horizon]; horizon = the later of
  the trace end (generated: its duration; CSV: the last arrival) and the last completion.
* GPU-seconds busy: sum of service_s / concurrency (the share of the GPU's request slots in use).
* utilization = busy / paid (DESIGN: GPU-seconds used / GPU-seconds paid), over the whole fleet, shared buffer
  included: the headline.
* replica utilization (``depl.util``), for context: busy / the GPU-seconds hosts spent as some deployment's
  replica (from being taken or acquired for it, through starting, serving and idling until cool-down, to being
  stopped), i.e. without the shared buffer: what the deployments see, not what the fleet pays.
* queueing delay = start of service - arrival; percentiles are nearest-rank (p-th = sorted[ceil(p/100 * n) - 1]).
* cost = paid GPU-hours * gpu_hour_usd.
"""

from __future__ import annotations

import bisect
import csv
import heapq
import json
import math
import random
import statistics
import sys
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from thaw.errors import first_line

# Used when neither a flag nor the registry gives a number (GPU-sized assumptions, not measurements).
DEFAULT_COLD_START_S = 60.0  # image pull + CUDA init + weight load + warm-up of a GPU model server
DEFAULT_RESTORE_S = 2.0  # snapshot restore of the same server onto a buffered host
DEFAULT_PROVISION_S = 90.0  # acquiring a GPU host from the cloud until its agent is healthy

POLICY_KINDS = ("cold", "restore", "static")


class SimError(ValueError):
    """A one-line, user-facing problem with a trace, a policy spec or a parameter."""


class TraceError(SimError):
    pass


def check_finite(name: str, v: float, positive: bool = False) -> None:
    """A number given to the simulator: finite (an infinite duration never ends; NaN compares false everywhere, so
    it would silently switch a rule off) and >= 0, or > 0 where ``positive``."""
    if not (math.isfinite(v) and (v > 0 if positive else v >= 0)):
        raise SimError(f"{name} must be a finite number {'>' if positive else '>='} 0 (got {v})")


COLUMNS = ("timestamp", "duration_s", "deployment")  # a trace CSV's header names
MAX_TICKS = 10_000_000  # a replay of more ticks than this: hours of work, and a timeline row per tick


# -- traces -----------------------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Request:
    t: float  # arrival, seconds from the start of the trace
    service_s: float
    deployment: int = 0  # index of the deployment the request is for


@dataclass(frozen=True)
class Trace:
    requests: tuple[Request, ...]
    end_s: float  # the replay covers [0, max(end_s, last completion)]
    source: str
    deployments: int = 1  # at least this many deployments (also every index a request names)

    @property
    def n_deployments(self) -> int:
        return max(self.deployments, 1 + max((r.deployment for r in self.requests), default=0))

    def only(self, deployment: int) -> "Trace":
        """The requests of one deployment, as a one-deployment trace over the same span."""
        return Trace(tuple(Request(r.t, r.service_s) for r in self.requests if r.deployment == deployment),
                     self.end_s, f"{self.source}, deployment {deployment}")


def _parse_time(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError from None
    if dt.tzinfo is None:  # not this machine's local time: one trace must read the same everywhere (and no DST)
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def load_trace(path: str | Path, service_s: float = 0.5) -> Trace:
    """A CSV with a ``timestamp`` column (seconds, e.g. epoch, or ISO 8601) and optionally ``duration_s`` and
    ``deployment`` (any label; the distinct labels, sorted (numerically when all are whole numbers), become
    deployments 0, 1, ...).

    A header row is optional (without one: column 1 is the timestamp, column 2 the duration, one deployment).
    Rows without a duration use ``service_s``. Rows need not be sorted. Times are shifted so the earliest arrival
    is t=0. A row starting with '#' is a comment (unless a header put the timestamp in a later column and the row
    has one there: a deployment label may start with '#').
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's "CSV UTF-8" starts with a byte-order mark
    except OSError as e:
        raise TraceError(f"cannot read trace {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise TraceError(f"trace {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        rows = [(n, r) for n, r in enumerate(csv.reader(text.splitlines()), 1) if r and any(c.strip() for c in r)]
    except csv.Error as e:  # a field over the csv module's limit, say
        raise TraceError(f"trace {path} is not CSV as expected: {e}") from None

    def comment(r: list[str], ts_col: int) -> bool:
        if not r[0].lstrip().startswith("#"):
            return False
        if ts_col == 0 or ts_col >= len(r):
            return True
        try:
            _parse_time(r[ts_col].strip())
        except ValueError:
            return True
        return False

    while rows and comment(rows[0][1], 0):  # comments before the header (or the first request)
        rows = rows[1:]
    if not rows:
        raise TraceError(f"trace {path} has no requests (expected CSV rows: timestamp[,duration_s])")
    ts_col, dur_col, dep_col = 0, 1, None
    first = [c.strip().lower() for c in rows[0][1]]
    try:
        _parse_time(rows[0][1][0].strip())  # as written: ISO 8601 may end in "Z"
        header = False
    except ValueError:
        header = True
    if header:
        if "timestamp" not in first:
            raise TraceError(f"trace {path} line {rows[0][0]}: header {','.join(first)!r} has no 'timestamp' column "
                             f"(expected timestamp[,duration_s])")
        unknown = [c for c in first if c not in COLUMNS]
        if unknown:  # a "duration" or "duration_ms" column would be left out, every request taken as --service-s
            raise TraceError(f"trace {path} line {rows[0][0]}: header has unknown column(s) "
                             f"{', '.join(map(repr, unknown))} (known: {', '.join(COLUMNS)})")
        ts_col = first.index("timestamp")
        dur_col = first.index("duration_s") if "duration_s" in first else None
        dep_col = first.index("deployment") if "deployment" in first else None
        rows = rows[1:]
        if not rows:
            raise TraceError(f"trace {path} has a header but no requests")
    parsed = []
    for n, r in rows:
        if comment(r, ts_col):
            continue
        if not header and len(r) > 2:
            raise TraceError(f"trace {path} line {n}: {len(r)} columns without a header row (give one, e.g. "
                             f"{','.join(COLUMNS)})")
        if header and len(r) > len(first):  # a column the header does not name would be left out
            raise TraceError(f"trace {path} line {n}: {len(r)} columns, but the header names {len(first)}")
        cell = r[ts_col].strip() if ts_col < len(r) else ""
        try:
            t = _parse_time(cell)
        except ValueError:
            raise TraceError(f"trace {path} line {n}: {cell!r} is not a timestamp "
                             f"(give seconds or an ISO 8601 time)") from None
        if not math.isfinite(t):
            raise TraceError(f"trace {path} line {n}: timestamp {cell!r} is not finite")
        d = service_s
        if dur_col is not None and dur_col < len(r) and r[dur_col].strip():
            try:
                d = float(r[dur_col])
            except ValueError:
                raise TraceError(f"trace {path} line {n}: duration {r[dur_col].strip()!r} is not a number of "
                                 f"seconds") from None
            if not (d > 0 and math.isfinite(d)):
                raise TraceError(f"trace {path} line {n}: duration {r[dur_col].strip()!r} must be > 0 seconds")
        label = ""
        if dep_col is not None:
            label = r[dep_col].strip() if dep_col < len(r) else ""
            if not label:
                raise TraceError(f"trace {path} line {n}: no deployment (give a label in the deployment column)")
        parsed.append((t, d, label))
    if not parsed:
        raise TraceError(f"trace {path} has no requests (every row after the header is a comment)")
    t0 = min(t for t, _, _ in parsed)
    labels = sorted({x for _, _, x in parsed})
    if all(x.isascii() and x.isdigit() for x in labels):  # in numeric order, however many digits
        labels.sort(key=lambda x: (len(x.lstrip("0")), x.lstrip("0")))
    index = {x: i for i, x in enumerate(labels)}
    # by arrival only: requests of the same instant queue in the file's order (sorted() keeps it)
    reqs = tuple(sorted((Request(t - t0, d, index[x]) for t, d, x in parsed), key=lambda r: r.t))
    deps = f", {len(labels)} deployments" if len(labels) > 1 else ""
    return Trace(reqs, reqs[-1].t, f"{path} ({len(reqs)} requests{deps})", len(labels))


def bursty_trace(seed: int = 1, duration_s: float = 3600.0, base_rps: float = 2.0, burst_rps: float = 20.0,
                 burst_every_s: float = 600.0, burst_len_s: float = 60.0, service_s: float = 0.5,
                 ramp_s: float = 0.0, phase_s: float = 0.0, deployment: int = 0) -> Trace:
    """Poisson arrivals at ``base_rps``, rising to ``burst_rps`` for ``burst_len_s`` seconds in every
    ``burst_every_s`` seconds (bursts at the end of each period, so the trace starts calm; ``phase_s`` shifts the
    pattern: the rate at t is the rate at t + phase_s without it). With ``ramp_s`` > 0 a burst ramps linearly up
    over its first ramp_s seconds and down over its last ramp_s (else it is a step). Fixed ``service_s``; every
    request is for ``deployment``. Deterministic for a given seed: ``random.Random`` drawing a Poisson process
    at the highest rate, thinned to the rate at each instant."""
    for name, v in (("duration_s", duration_s), ("burst_every_s", burst_every_s), ("service_s", service_s)):
        check_finite(name, v, positive=True)
    for name, v in (("base_rps", base_rps), ("burst_rps", burst_rps), ("burst_len_s", burst_len_s),
                    ("ramp_s", ramp_s)):
        check_finite(name, v)
    if not burst_len_s <= burst_every_s:
        raise SimError("need burst_len_s <= burst_every_s")
    if not 0 <= ramp_s <= burst_len_s / 2:
        raise SimError(f"ramp_s must be between 0 and burst_len_s / 2 (got {ramp_s})")
    calm = burst_every_s - burst_len_s

    def rate(t: float) -> float:
        phase = (t + phase_s) % burst_every_s
        if phase < calm:
            return base_rps
        if ramp_s <= 0:
            return burst_rps
        f = min(1.0, (phase - calm) / ramp_s, (burst_every_s - phase) / ramp_s)
        return base_rps + (burst_rps - base_rps) * f

    top = max(base_rps, burst_rps)
    rng = random.Random(seed)
    reqs, t = [], 0.0
    while top > 0:
        t += rng.expovariate(top)
        if t >= duration_s:
            break
        if rng.random() * top < rate(t):
            reqs.append(Request(round(t, 6), service_s, deployment))
    ramp = f" ramp {ramp_s:g}s" if ramp_s > 0 else ""
    return Trace(tuple(reqs), duration_s,
                 f"bursty seed={seed} {duration_s:g}s base={base_rps:g}rps burst={burst_rps:g}rps "
                 f"{burst_len_s:g}s every {burst_every_s:g}s{ramp} service={service_s:g}s ({len(reqs)} requests)",
                 deployment + 1)


def fleet_trace(seed: int = 1, deployments: int = 20, duration_s: float = 3600.0, base_rps_lo: float = 0.1,
                base_rps_hi: float = 10.0, burst_x: float = 10.0, burst_every_s: float = 600.0,
                burst_len_s: float = 60.0, service_s: float = 0.5, ramp_s: float = 0.0) -> Trace:
    """Many deployments on one fleet: each deployment is an independent :func:`bursty_trace` with its own seed,
    its own base rate and its own burst phase.

    Deployment i draws, from ``random.Random(f"fleet-{seed}-{i}")`` (so deployment i does not depend on how many
    there are), a base rate log-uniform in [``base_rps_lo``, ``base_rps_hi``], a burst phase uniform in
    [0, ``burst_every_s``) and the seed of its arrivals; it bursts to ``burst_x`` times its base for
    ``burst_len_s`` seconds in every ``burst_every_s``.

    Defaults, chosen as a picture of a multi-tenant inference platform before looking at any result:

    * 20 deployments: a small region of a shared GPU pool (platforms host hundreds to thousands; fewer tenants
      mean less pooling, so this is on the conservative side).
    * base rates log-uniform over two decades, 0.1 to 10 rps (mean 2.15 rps, so the fleet's average tenant is
      the one-deployment trace's 2 rps): demand across tenants is heavy-tailed, a few busy deployments and many
      small ones, and 0.1 rps of 0.5 s requests is 5 % of one GPU.
    * each burst 10x the base for 60 s in every 600 s: the same shape as the one-deployment P7 trace (a 10x jump
      within a second, 10 % of the time), so the difference between the two results is the sharing.
    * phases independent and uniform: tenants do not burst together (no fleet-wide event).
    * 0.5 s per request, as in the one-deployment trace.
    """
    if deployments < 1:
        raise SimError(f"deployments must be >= 1 (got {deployments})")
    check_finite("base_rps_hi", base_rps_hi)
    if not 0 < base_rps_lo <= base_rps_hi:
        raise SimError(f"need 0 < base_rps_lo <= base_rps_hi (got {base_rps_lo}, {base_rps_hi})")
    if not 1 <= burst_x < math.inf:
        raise SimError(f"burst_x must be >= 1 (got {burst_x})")
    reqs: list[Request] = []
    for i in range(deployments):
        rng = random.Random(f"fleet-{seed}-{i}")
        base = math.exp(rng.uniform(math.log(base_rps_lo), math.log(base_rps_hi)))
        phase = rng.uniform(0, burst_every_s)
        reqs += bursty_trace(rng.getrandbits(63), duration_s, base, base * burst_x, burst_every_s, burst_len_s,
                             service_s, ramp_s, phase, i).requests
    reqs.sort()
    ramp = f" ramp {ramp_s:g}s" if ramp_s > 0 else ""
    return Trace(tuple(reqs), duration_s,
                 f"fleet seed={seed} {deployments} deployments {duration_s:g}s "
                 f"base={base_rps_lo:g}..{base_rps_hi:g}rps (log-uniform) burst={burst_x:g}x {burst_len_s:g}s "
                 f"every {burst_every_s:g}s (random phase){ramp} "
                 f"service={service_s:g}s ({len(reqs)} requests)", deployments)


# -- parameters -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Policy:
    kind: str  # cold | restore | static
    buffer: int = 0  # the fleet's idle hosts, shared by its deployments
    replicas: int | tuple[int, ...] | None = None  # static only: per deployment (one count for all, or each's)

    @property
    def name(self) -> str:
        if self.kind == "static":
            if isinstance(self.replicas, tuple):
                return f"static:replicas={sum(self.replicas)}"  # the fleet's total
            return f"static:replicas={self.replicas}" if self.replicas is not None else "static"
        return f"{self.kind}:buffer={self.buffer}"

    @staticmethod
    def parse(spec: str) -> "Policy":
        """``cold``, ``restore``, ``restore:buffer=2``, ``cold:buffer=1``, ``static``, ``static:replicas=8``."""
        kind, _, rest = spec.strip().partition(":")
        kind = kind.strip().lower()
        if kind not in POLICY_KINDS:
            raise SimError(f"policy {spec!r}: kind must be one of {', '.join(POLICY_KINDS)} "
                           f"(e.g. restore:buffer=2, static:replicas=8)")
        opts: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, val = part.partition("=")
            allowed = ("replicas",) if kind == "static" else ("buffer",)
            if not eq or key.strip() not in allowed:
                raise SimError(f"policy {spec!r}: unknown option {part!r} (allowed: {', '.join(allowed)}=N)")
            try:
                n = int(val)
            except ValueError:
                raise SimError(f"policy {spec!r}: {key.strip()} must be a whole number (got {val!r})") from None
            if n < (1 if key.strip() == "replicas" else 0):
                raise SimError(f"policy {spec!r}: {key.strip()}={n} is out of range")
            opts[key.strip()] = n
        if kind == "restore":
            return Policy("restore", opts.get("buffer", 1))
        if kind == "cold":
            return Policy("cold", opts.get("buffer", 0))
        return Policy("static", 0, opts.get("replicas"))


@dataclass(frozen=True)
class Timings:
    cold_start_s: float = DEFAULT_COLD_START_S
    restore_s: float = DEFAULT_RESTORE_S
    provision_s: float = DEFAULT_PROVISION_S

    def check(self) -> None:
        for name in ("cold_start_s", "restore_s", "provision_s"):
            check_finite(name, getattr(self, name))


@dataclass(frozen=True)
class Autoscaler:
    concurrency: int = 1  # requests a replica serves at once
    target_utilization: float = 0.8  # of the replicas' slots, by the demand estimate
    tick_s: float = 1.0
    window_s: float = 10.0  # offered load = work arriving in the last window_s / window_s
    panic_window_s: float = 2.0  # while requests are queued, the offered load of this shorter window counts too
    drain_s: float = 10.0  # queued work adds work / max(drain_s, provision+start) when none is starting (0: off)
    cooldown_s: float = 30.0  # idle time before a replica is stopped
    min_replicas: int = 1
    max_replicas: int = 1000
    warm_start: bool = True  # t=0: replicas for the offered load of the trace's first window are already warm

    def check(self) -> None:
        if self.concurrency < 1:
            raise SimError(f"concurrency must be >= 1 (got {self.concurrency})")
        if not 0 < self.target_utilization <= 1:
            raise SimError(f"target utilization must be in (0, 1] (got {self.target_utilization})")
        check_finite("tick_s", self.tick_s, positive=True)
        check_finite("window_s", self.window_s, positive=True)
        for name in ("panic_window_s", "drain_s", "cooldown_s"):
            check_finite(name, getattr(self, name))
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise SimError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1 "
                           f"(got {self.min_replicas}, {self.max_replicas})")


@dataclass
class Result:
    policy: str
    kind: str
    buffer: int
    replicas: int | None
    paid_gpu_s: float
    busy_gpu_s: float
    utilization: float
    delay_p50_s: float
    delay_p99_s: float
    delay_max_s: float
    delay_mean_s: float
    served: int
    cost_usd: float
    cold_starts: int
    restores: int
    hosts_acquired: int  # hosts requested during the replay (not counting those present at t=0)
    peak_hosts: int  # most hosts paid for at once
    horizon_s: float
    deployments: int = 1
    # the deployments' own view: GPU-seconds of hosts while they were a deployment's replica (acquired for it,
    # starting, serving, idle until cool-down), without the shared buffer; busy / that
    replica_gpu_s: float = float("nan")
    replica_utilization: float = float("nan")
    # per deployment: {deployment, served, replicas (static), starts, busy_gpu_s, replica_gpu_s,
    # replica_utilization, delay_p50_s, delay_p99_s, delay_max_s}
    per_deployment: list[dict] = field(default_factory=list, repr=False)
    delays: list[float] = field(default_factory=list, repr=False)
    # (t, serving, starting, buffer_idle, provisioning, in_system, in_flight) at every tick, fleet-wide
    timeline: list[tuple] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        """The numbers, JSON-safe (NaN, e.g. the delays of an empty trace, becomes None)."""
        d = asdict(self)
        d.pop("delays")
        d.pop("timeline")

        def clean(v):
            if isinstance(v, float) and math.isnan(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v
        return clean(d)


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest rank: the smallest value with at least p % of the values at or below it."""
    if not sorted_values:
        return float("nan")
    k = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[k - 1]


# -- the simulation ---------------------------------------------------------------------------------------
_HOST_READY, _REPLICA_READY, _DONE, _ARRIVAL, _TICK = range(5)  # order of events at the same instant


class _Host:
    __slots__ = ("id", "since", "until", "state", "ready_at", "dep", "gen", "inflight", "idle_since", "in_free",
                 "spans")

    def __init__(self, hid: int, since: float, state: str):
        self.id, self.since, self.until, self.state = hid, since, None, state
        self.ready_at, self.inflight, self.idle_since, self.in_free = 0.0, 0, since, False
        self.dep: _Deployment | None = None  # whose replica it is (acquired for it, starting, serving); else buffer
        self.gen = 0  # assignments so far: tells a deployment's stale free-slot entries apart
        self.spans: list[tuple[int, float, float]] = []  # (deployment, from, to) while a replica


class _Deployment:
    """One deployment's queue, replicas and autoscaler state."""

    def __init__(self, index: int):
        self.index = index
        self.reps: list[_Host] = []  # its replicas (acquired for it, starting or serving), by host id
        self.queue: list[Request] = []
        self.qhead = 0
        self.queued_work = 0.0  # service seconds waiting in the queue
        self.free: list[tuple[int, int, _Host]] = []  # (id, gen, host) with a free slot; stale entries skipped
        self.recent: deque[Request] = deque()  # arrivals in the demand window
        self.window_work = 0.0
        self.delays: list[float] = []
        self.busy = 0.0
        self.starts = 0
        self.static = 0


def simulate(trace: Trace, policy: Policy, timings: Timings = Timings(), scaler: Autoscaler = Autoscaler(),
             gpu_hour_usd: float = 2.5) -> Result:
    """Replay ``trace`` under ``policy``. ``policy`` must be concrete (static needs ``replicas``).

    The trace's deployments share the fleet: the buffer, and the hosts a scaled-down replica gives back. Each
    deployment has its own FIFO queue, replicas and autoscaler (the same parameters for all); at a tick the
    deployments are evaluated in index order, so at the same instant a lower index takes a buffered host first.
    One deployment is the fleet of one."""
    scaler.check()
    if policy.kind == "static" and policy.replicas is None:
        raise SimError("static policy needs replicas=N here (size_static() picks it)")
    timings.check()
    check_finite("gpu_hour_usd", gpu_hour_usd)
    if any(r.deployment < 0 for r in trace.requests):
        raise SimError("a request's deployment must be >= 0")
    if not all(0 < r.service_s < math.inf for r in trace.requests):
        raise SimError("a request's duration must be > 0 s and finite")
    span = trace.end_s + max((r.service_s for r in trace.requests), default=0.0)  # when the last one may end
    if span / scaler.tick_s > MAX_TICKS:
        raise SimError(f"the trace spans {span:.0f} s: more than {MAX_TICKS:,} ticks of {scaler.tick_s:g} s "
                       f"(timestamps or durations in milliseconds, or one far from the others?)")
    deps = [_Deployment(i) for i in range(trace.n_deployments)]
    if isinstance(policy.replicas, tuple) and len(policy.replicas) != len(deps):
        raise SimError(f"static policy gives {len(policy.replicas)} replica counts for {len(deps)} deployments")
    if policy.kind == "static" and min(policy.replicas if isinstance(policy.replicas, tuple)
                                       else (policy.replicas,)) < 1:
        raise SimError(f"a static policy needs at least 1 replica per deployment (got {policy.replicas})")
    c = scaler.concurrency
    start_s = timings.restore_s if policy.kind == "restore" else timings.cold_start_s
    static = policy.kind == "static"
    # time to add a replica when the buffer is empty: the backlog is planned to drain over at least this long
    add_s = timings.provision_s + start_s

    events: list = []
    seq = 0

    def push(t: float, kind: int, payload=None) -> None:
        nonlocal seq
        heapq.heappush(events, (t, kind, seq, payload))
        seq += 1

    hosts: list[_Host] = []  # every host ever paid for, for the accounting
    live: list[_Host] = []  # hosts not yet released, oldest first
    idle_buffer: list[_Host] = []  # the fleet's idle hosts, by id
    acquiring: list[_Host] = []  # hosts being acquired for the buffer
    counts = {"cold": 0, "restore": 0, "acquired": 0}

    def assign(h: _Host, d: _Deployment, now: float) -> None:
        h.dep, h.gen, h.idle_since = d, h.gen + 1, now
        h.spans.append((d.index, now, math.inf))
        bisect.insort(d.reps, h, key=lambda x: x.id)

    def unassign(h: _Host, now: float) -> None:
        h.dep.reps.remove(h)
        h.spans[-1] = (h.dep.index, h.spans[-1][1], now)
        h.dep, h.in_free = None, False

    def new_host(now: float, state: str, d: _Deployment | None = None) -> _Host:
        h = _Host(len(hosts), now, state)
        hosts.append(h)
        live.append(h)
        if d is not None:
            assign(h, d, now)
        if state == "provisioning":
            counts["acquired"] += 1
            h.ready_at = now + timings.provision_s
            push(h.ready_at, _HOST_READY, h)
            if d is None:
                acquiring.append(h)
        elif state == "buffer":
            idle_buffer.append(h)
        return h

    def release(h: _Host, now: float) -> None:
        h.state, h.until = "released", now
        live.remove(h)
        if h in acquiring:
            acquiring.remove(h)

    for d in deps:
        if static:
            d.static = policy.replicas[d.index] if isinstance(policy.replicas, tuple) else policy.replicas
            n0 = d.static
        else:
            n0 = scaler.min_replicas
            if scaler.warm_start:
                first = sum(r.service_s for r in trace.requests
                            if r.t < scaler.window_s and r.deployment == d.index) / scaler.window_s
                n0 = max(n0, min(scaler.max_replicas, math.ceil(first / (c * scaler.target_utilization) - 1e-9)))
        for _ in range(n0):
            new_host(0.0, "serving", d)
    for _ in range(0 if static else policy.buffer):
        new_host(0.0, "buffer")

    def begin_start(h: _Host, now: float) -> None:
        h.state = "starting"
        counts["restore" if policy.kind == "restore" else "cold"] += 1
        h.dep.starts += 1
        push(now + start_s, _REPLICA_READY, h)

    def refill(now: float) -> None:
        for _ in range(policy.buffer - len(idle_buffer) - len(acquiring)):
            new_host(now, "provisioning")

    def start_replica(d: _Deployment, now: float) -> None:
        """A buffered host restores (or boots) for d; with none idle, d claims the host being acquired for the
        buffer that is ready soonest, else acquires one. The buffer is then refilled."""
        if idle_buffer:
            h = idle_buffer.pop(0)
            assign(h, d, now)
            begin_start(h, now)
        elif acquiring:
            h = min(acquiring, key=lambda x: (x.ready_at, x.id))
            acquiring.remove(h)
            assign(h, d, now)
        else:
            new_host(now, "provisioning", d)
        refill(now)

    def scale_down(h: _Host, now: float) -> None:
        """A replica stops serving: its host joins the idle ones, for any deployment's start at this tick
        (:func:`settle` then trims them to the buffer)."""
        unassign(h, now)
        h.state = "buffer"
        bisect.insort(idle_buffer, h, key=lambda x: x.id)

    def settle(now: float) -> None:
        """After a tick's scale-downs and starts: an idle host restores (or boots) for a deployment still waiting
        for a host being acquired, which goes to the buffer instead (the one ready last first); then the buffer
        keeps ``policy.buffer`` hosts, idle or being acquired: the acquisitions ready last are cancelled first,
        then idle hosts released."""
        waiting = sorted((h for h in live if h.state == "provisioning" and h.dep is not None),
                         key=lambda x: (x.ready_at, x.id)) if idle_buffer else []
        while idle_buffer and waiting:
            claimed = waiting.pop()
            d = claimed.dep
            unassign(claimed, now)
            acquiring.append(claimed)
            h = idle_buffer.pop(0)
            assign(h, d, now)
            begin_start(h, now)
        extra = len(idle_buffer) + len(acquiring) - policy.buffer
        for x in sorted(acquiring, key=lambda x: (-x.ready_at, -x.id))[:max(0, extra)]:
            release(x, now)
        while len(idle_buffer) > policy.buffer:
            release(idle_buffer.pop(), now)

    in_system = 0
    last_done = 0.0

    def has_slot(h: _Host) -> None:
        if not h.in_free:
            h.in_free = True
            heapq.heappush(h.dep.free, (h.id, h.gen, h))

    for h in live:
        if h.state == "serving":
            has_slot(h)

    def dispatch(d: _Deployment, now: float) -> None:
        """d's queue head to d's oldest serving replica with a free slot, while both exist."""
        queue, free = d.queue, d.free
        while d.qhead < len(queue) and free:
            _, gen, h = free[0]
            if h.gen != gen or h.state != "serving" or h.inflight >= c:
                heapq.heappop(free)
                if h.gen == gen:
                    h.in_free = False
                continue
            r = queue[d.qhead]
            d.qhead += 1
            h.inflight += 1
            d.queued_work -= r.service_s
            d.delays.append(now - r.t)
            d.busy += r.service_s / c
            push(now + r.service_s, _DONE, h)
        if d.qhead > 4096 and d.qhead * 2 > len(queue):
            del queue[:d.qhead]
            d.qhead = 0

    for r in trace.requests:
        push(r.t, _ARRIVAL, r)
    push(0.0, _TICK, 0)
    n_total = len(trace.requests)
    arrived = 0
    timeline: list[tuple] = []
    window = scaler.window_s

    def autoscale(d: _Deployment, now: float) -> int:
        """Scale ``d`` down where it has too many replicas; returns how many it should start."""
        recent = d.recent
        while recent and recent[0].t <= now - window + 1e-9:
            d.window_work -= recent.popleft().service_s
        demand = max(d.window_work, 0.0) / window  # offered load, in busy slots (Erlangs)
        pw = scaler.panic_window_s
        if 0 < pw < window and d.qhead < len(d.queue):
            lo = now - pw + 1e-9
            panic = 0.0
            for r in reversed(recent):
                if r.t <= lo:
                    break
                panic += r.service_s
            demand = max(demand, panic / pw)
        if scaler.drain_s > 0 and not any(h.state in ("starting", "provisioning") for h in d.reps):
            demand += max(d.queued_work, 0.0) / max(scaler.drain_s, add_s)
        desired = math.ceil(demand / (c * scaler.target_utilization) - 1e-9)
        if d.qhead < len(d.queue) and not d.reps:  # held at zero replicas: ask for one (the gateway's activator),
            desired = max(desired, 1)  # also when the request already left a window shorter than the tick
        desired = min(max(desired, scaler.min_replicas), scaler.max_replicas)
        n_act = len(d.reps)
        if desired > n_act:
            return desired - n_act
        if any(h.state != "serving" for h in d.reps):  # as the pool: no scale-down while a start is under way
            return 0  # (else the one ready replica could stop while its successor still boots)
        idle = [h for h in d.reps if h.inflight == 0 and now - h.idle_since >= scaler.cooldown_s - 1e-9]
        for h in idle[::-1][:n_act - desired]:  # newest first, down to the desired count
            scale_down(h, now)
        return 0

    while events:
        now, kind, _, obj = heapq.heappop(events)
        if kind == _HOST_READY:
            h = obj
            if h.state != "provisioning":
                continue  # cancelled
            if h.dep is not None:
                begin_start(h, now)
            else:
                acquiring.remove(h)
                h.state = "buffer"
                bisect.insort(idle_buffer, h, key=lambda x: x.id)
        elif kind == _REPLICA_READY:
            obj.state, obj.idle_since = "serving", now
            has_slot(obj)
            dispatch(obj.dep, now)
        elif kind == _DONE:
            h = obj
            h.inflight -= 1
            in_system -= 1
            last_done = now
            if h.inflight == 0:
                h.idle_since = now
            has_slot(h)
            dispatch(h.dep, now)
        elif kind == _ARRIVAL:
            d = deps[obj.deployment]
            arrived += 1
            in_system += 1
            d.queue.append(obj)
            d.recent.append(obj)
            d.window_work += obj.service_s
            d.queued_work += obj.service_s
            dispatch(d, now)
        else:  # tick
            done = arrived == n_total and in_system == 0 and now >= trace.end_s
            if not static and not done:  # scale-downs first, then starts: a host freed at this tick is
                starts = [(d, autoscale(d, now)) for d in deps]  # in the buffer for any deployment's start
                for d, n in starts:
                    for _ in range(n):
                        start_replica(d, now)
                settle(now)
            sv = st = bi = pv = fl = 0
            for h in live:
                s = h.state
                if s == "serving":
                    sv += 1
                    fl += h.inflight
                elif s == "starting" or (s == "provisioning" and h.dep is not None):
                    st += 1
                elif s == "buffer":
                    bi += 1
                else:
                    pv += 1
            timeline.append((now, sv, st, bi, pv, in_system, fl))
            if done:
                # nothing left to serve; the events left (hosts or replicas becoming ready) change nothing that
                # is counted, as paid time is clipped to the horizon
                break
            push((obj + 1) * scaler.tick_s, _TICK, obj + 1)

    horizon = max(trace.end_s, last_done)

    def clipped(since: float, until: float | None) -> float:
        return max(0.0, (horizon if until is None else min(until, horizon)) - since)

    paid = sum(clipped(h.since, h.until) for h in hosts)
    replica_s = [0.0] * len(deps)
    for h in hosts:
        for i, a, b in h.spans:
            replica_s[i] += clipped(a, min(b, horizon if h.until is None else h.until))
    busy = sum(d.busy for d in deps)
    per_dep = []
    for d in deps:
        ds = sorted(d.delays)
        per_dep.append({
            "deployment": d.index, "served": len(ds), "replicas": d.static if static else None, "starts": d.starts,
            "busy_gpu_s": d.busy, "replica_gpu_s": replica_s[d.index],
            "replica_utilization": d.busy / replica_s[d.index] if replica_s[d.index] > 0 else float("nan"),
            "delay_p50_s": percentile(ds, 50), "delay_p99_s": percentile(ds, 99),
            "delay_max_s": ds[-1] if ds else float("nan")})
    delays_sorted = sorted(x for d in deps for x in d.delays)
    rep_total = sum(replica_s)
    return Result(
        policy=Policy("static", 0, sum(d.static for d in deps)).name if static else policy.name,
        kind=policy.kind, buffer=policy.buffer,
        replicas=sum(d.static for d in deps) if static else None,
        paid_gpu_s=paid, busy_gpu_s=busy, utilization=busy / paid if paid > 0 else float("nan"),
        delay_p50_s=percentile(delays_sorted, 50), delay_p99_s=percentile(delays_sorted, 99),
        delay_max_s=delays_sorted[-1] if delays_sorted else float("nan"),
        delay_mean_s=statistics.fmean(delays_sorted) if delays_sorted else float("nan"),
        served=len(delays_sorted), cost_usd=paid / 3600 * gpu_hour_usd, cold_starts=counts["cold"],
        restores=counts["restore"], hosts_acquired=counts["acquired"], peak_hosts=_peak_hosts(hosts, horizon),
        horizon_s=horizon, deployments=len(deps), replica_gpu_s=rep_total,
        replica_utilization=busy / rep_total if rep_total > 0 else float("nan"), per_deployment=per_dep,
        delays=delays_sorted, timeline=timeline)


def _peak_hosts(hosts: list[_Host], horizon: float) -> int:
    marks = []
    for h in hosts:
        end = horizon if h.until is None else min(h.until, horizon)
        if end > h.since:
            marks += [(h.since, 1), (end, -1)]
    cur = peak = 0
    for _, d in sorted(marks):  # at the same instant a release (-1) counts before an acquisition
        cur += d
        peak = max(peak, cur)
    return peak


def size_static(trace: Trace, scaler: Autoscaler, p99_target_s: float, gpu_hour_usd: float = 2.5) -> Result:
    """Static replicas per deployment: for each, the fewest always-on replicas whose p99 delay over its own
    requests is <= p99_target_s (up to max_replicas; a deployment without requests gets 1). Deployments share
    nothing under static, so each is sized alone; then the fleet is replayed with those counts (its pooled p99
    then meets the target too)."""
    def meets(sub: Trace, n: int) -> bool:
        p99 = simulate(sub, Policy("static", 0, n), scaler=scaler).delay_p99_s
        return math.isnan(p99) or p99 <= p99_target_s

    counts = []
    for i in range(trace.n_deployments):
        sub = trace.only(i)
        top = max(1, scaler.max_replicas)
        hi = 1  # doubling, then bisection in (hi / 2, hi]: few replays with many replicas
        while hi < top and not meets(sub, hi):
            hi = min(top, hi * 2)
        lo = hi // 2 + 1 if hi > 1 else 1
        if hi == top and not meets(sub, top):
            lo = top  # even max_replicas misses the target; report it as is
        while lo < hi:
            mid = (lo + hi) // 2
            if meets(sub, mid):
                hi = mid
            else:
                lo = mid + 1
        counts.append(hi)
    return simulate(trace, Policy("static", 0, tuple(counts)), scaler=scaler, gpu_hour_usd=gpu_hour_usd)


def run_policies(trace: Trace, policies: list[Policy], timings: Timings = Timings(),
                 scaler: Autoscaler = Autoscaler(), gpu_hour_usd: float = 2.5,
                 p99_target_s: float = 2.0) -> list[Result]:
    check_finite("p99_target_s", p99_target_s)
    out = []
    for p in policies:
        if p.kind == "static" and p.replicas is None:
            out.append(size_static(trace, scaler, p99_target_s, gpu_hour_usd))
        else:
            out.append(simulate(trace, p, timings, scaler, gpu_hour_usd))
    return out


DEFAULT_POLICIES = ("cold", "restore:buffer=1", "restore:buffer=2", "restore:buffer=4", "static")


# -- timings from the registry ----------------------------------------------------------------------------
def measured_timings(registry_url: str, snapshot_digest: str | None = None) -> dict:
    """Median measured start times from thaw's registry, in seconds, with where each came from.

    restore_s: median ``timings_ms["total"]`` of restore events with outcome "restored" (fetch + root + criu +
    hooks + health + golden replay: until the first correct answer).
    cold_start_s: median ``total`` of restore events that fell back to a cold boot; without any, the median over
    snapshots of their build's launch-to-first-answer (``root`` + ``cold_boot`` + ``golden`` in timings_ms).
    Returns {"restore_s": float|None, "cold_start_s": float|None, "sources": {name: text}}; None where the
    registry has nothing (or cannot be read; the reason is in sources).
    """
    out: dict = {"restore_s": None, "cold_start_s": None, "sources": {}}
    if registry_url.startswith("sqlite:///") and not Path(registry_url[len("sqlite:///"):]).exists():
        out["sources"] = {k: f"no registry at {registry_url}" for k in ("restore_s", "cold_start_s")}
        return out
    try:
        from thaw.registry import snapshots

        events = snapshots.restores(registry_url, snapshot_digest)
        snaps = snapshots.list_all(registry_url)
    except Exception as e:  # noqa: BLE001 - an unreachable registry only means "no measurements"
        msg = f"registry unavailable ({first_line(e, typed=True)})"
        out["sources"] = {"restore_s": msg, "cold_start_s": msg}
        return out
    if snapshot_digest:
        snaps = [s for s in snaps if s.digest == snapshot_digest]

    def totals(outcome: str) -> list[float]:
        return [e.timings_ms["total"] / 1000 for e in events
                if e.outcome == outcome and isinstance((e.timings_ms or {}).get("total"), (int, float))]

    restored = totals("restored")
    if restored:
        out["restore_s"] = statistics.median(restored)
        out["sources"]["restore_s"] = f"median total of {len(restored)} restored replicas in the registry"
    else:
        out["sources"]["restore_s"] = "no restored replicas in the registry"
    cold = totals("cold-boot")
    if cold:
        out["cold_start_s"] = statistics.median(cold)
        out["sources"]["cold_start_s"] = f"median total of {len(cold)} cold-booted replicas in the registry"
    else:
        builds = [sum(s.timings_ms.get(k, 0) for k in ("root", "cold_boot", "golden")) / 1000
                  for s in snaps if isinstance((s.timings_ms or {}).get("cold_boot"), (int, float))]
        if builds:
            out["cold_start_s"] = statistics.median(builds)
            out["sources"]["cold_start_s"] = (f"median launch-to-first-answer (root+cold_boot+golden) of "
                                              f"{len(builds)} snapshot builds in the registry")
        else:
            out["sources"]["cold_start_s"] = "no cold boots or snapshot builds in the registry"
    return out


def resolve_timings(registry_url: str | None, cold_start_s: float | None = None, restore_s: float | None = None,
                    provision_s: float | None = None) -> tuple[Timings, dict[str, str]]:
    """Flags > registry measurements > defaults. Returns the timings and where each number came from."""
    measured = {"restore_s": None, "cold_start_s": None, "sources": {}}
    if registry_url and (cold_start_s is None or restore_s is None):
        measured = measured_timings(registry_url)
    values, sources = {}, {}
    for name, flag, default in (("cold_start_s", cold_start_s, DEFAULT_COLD_START_S),
                                ("restore_s", restore_s, DEFAULT_RESTORE_S)):
        if flag is not None:
            values[name], sources[name] = flag, f"--{name.replace('_', '-')}"
        elif measured.get(name) is not None:
            values[name], sources[name] = measured[name], measured["sources"][name]
        else:
            why = measured["sources"].get(name)
            values[name], sources[name] = default, f"default ({why})" if why else "default"
    if provision_s is not None:
        values["provision_s"], sources["provision_s"] = provision_s, "--provision-s"
    else:
        values["provision_s"], sources["provision_s"] = DEFAULT_PROVISION_S, "default (assumed GPU host acquisition)"
    return Timings(**values), sources


# -- reports ----------------------------------------------------------------------------------------------
def format_table(results: list[Result]) -> str:
    """One row per result. util is the fleet's (busy / paid, buffer included); depl.util is the deployments'
    own view (busy / their replicas' GPU-seconds, without the shared buffer), for context."""
    head = (f"{'policy':<22} {'util':>6} {'depl.util':>9} {'p50 s':>8} {'p99 s':>8} {'max s':>8} {'paid GPU-h':>10} "
            f"{'busy GPU-h':>10} {'cost $':>9} {'starts':>7} {'peak':>5}")
    lines = [head]
    for r in results:
        starts = r.restores + r.cold_starts
        lines.append(f"{r.policy:<22} {r.utilization * 100:>5.1f}% {r.replica_utilization * 100:>8.1f}% "
                     f"{r.delay_p50_s:>8.2f} {r.delay_p99_s:>8.2f} "
                     f"{r.delay_max_s:>8.2f} {r.paid_gpu_s / 3600:>10.2f} {r.busy_gpu_s / 3600:>10.2f} "
                     f"{r.cost_usd:>9.2f} {starts:>7d} {r.peak_hosts:>5d}")
    return "\n".join(lines)


def plot(results: list[Result], trace: Trace, out_dir: str | Path, concurrency: int = 1) -> list[Path]:
    """timeline.png (hosts paid, by state, vs GPUs busy and requests queued; one panel per policy),
    delay_cdf.png, summary.png (utilization and p99 per policy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    n = len(results)
    fig, axes = plt.subplots(n, 1, figsize=(12, 2.4 * n + 0.6), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], results):
        if not r.timeline:
            continue
        cols = list(zip(*r.timeline))
        t = [x / 60 for x in cols[0]]
        ax.stackplot(t, cols[1], cols[2], cols[3], cols[4], step="post",
                     labels=["serving", "starting", "buffer (idle)", "buffer (acquiring)"],
                     colors=["#4c72b0", "#dd8452", "#55a868", "#a5d6a7"], alpha=0.85)
        busy = [x / concurrency for x in cols[6]]
        ax.step(t, busy, where="post", color="black", lw=0.7, label="busy (requests in flight)")
        paid = [a + b + d + e for a, b, d, e in zip(cols[1], cols[2], cols[3], cols[4])]
        ax.set_ylim(0, max(paid + busy + [1]) * 1.15)
        ax.set_ylabel("GPUs")
        queued = [n - f for n, f in zip(cols[5], cols[6])]
        if any(queued):
            ax2 = ax.twinx()
            ax2.plot(t, queued, color="#c44e52", lw=0.7, label="queued requests (right axis)")
            ax2.set_ylabel("queued", color="#c44e52", fontsize=8)
            ax2.tick_params(axis="y", labelcolor="#c44e52", labelsize=7)
            ax2.set_ylim(bottom=0)
            if ax is axes[0, 0]:
                ax2.legend(loc="upper left", fontsize=7)
        ax.set_title(f"{r.policy}: utilization {r.utilization * 100:.1f} %, p99 delay {r.delay_p99_s:.2f} s, "
                     f"${r.cost_usd:.2f}", fontsize=9, loc="left")
    axes[0, 0].legend(loc="upper right", fontsize=7, ncol=5)
    axes[-1, 0].set_xlabel("time (min)")
    fig.suptitle(f"thaw simulate: {trace.source}", fontsize=9)
    fig.tight_layout()
    p = out / "timeline.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if not r.delays:
            continue
        ys = [(i + 1) / len(r.delays) for i in range(len(r.delays))]
        ax.step([max(d, 1e-3) for d in r.delays], ys, where="post", label=r.policy)
    ax.set_xscale("log")
    ax.set_xlabel("queueing delay (s, log; 0 drawn at 1 ms)")
    ax.set_ylabel("fraction of requests")
    ax.axhline(0.99, color="grey", lw=0.5, ls="--")
    ax.legend(fontsize=8)
    ax.set_title("queueing delay CDF", fontsize=10)
    fig.tight_layout()
    p = out / "delay_cdf.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r.policy for r in results]
    a1.bar(names, [r.utilization * 100 for r in results], color="#4c72b0")
    a1.set_ylabel("GPU allocation utilization (%)")
    a2.bar(names, [r.delay_p99_s for r in results], color="#dd8452")
    a2.set_ylabel("p99 queueing delay (s)")
    a2.set_yscale("symlog", linthresh=1)
    for a in (a1, a2):
        a.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    p = out / "summary.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


# -- CLI --------------------------------------------------------------------------------------------------
def cli_command():
    """The `thaw simulate` click command; register with ``cli.add_command(simulate.cli_command())``."""
    import click

    def fail(msg: str) -> None:
        click.echo(f"error: {msg}", err=True)
        sys.exit(1)

    @click.command("simulate")
    @click.argument("trace", required=False, type=click.Path(path_type=Path))
    @click.option("--generate", is_flag=True, help="Replay a generated bursty trace (Poisson, seeded) instead.")
    @click.option("--deployments", type=int, help="--generate: deployments sharing the fleet; 1 (default): one "
                                                  "bursty deployment (--base-rps, --burst-rps); more: fleet_trace "
                                                  "(--base-rps-lo/hi, --burst-x).")
    @click.option("--policy", "policies", multiple=True, metavar="SPEC",
                  help="cold | cold:buffer=N | restore[:buffer=N] | static[:replicas=N]; repeatable "
                       f"[default: {' '.join(DEFAULT_POLICIES)}].")
    @click.option("--cold-start-s", type=float, help="Model cold boot on a host [default: registry median, else "
                                                     f"{DEFAULT_COLD_START_S:g}].")
    @click.option("--restore-s", type=float, help="Snapshot restore on a buffered host [default: registry median, "
                                                  f"else {DEFAULT_RESTORE_S:g}].")
    @click.option("--provision-s", type=float, help=f"Acquiring a new GPU host [default: {DEFAULT_PROVISION_S:g}].")
    @click.option("--service-s", type=float, default=0.5, show_default=True,
                  help="Service time of requests without a duration_s (and of generated ones).")
    @click.option("--concurrency", type=int, default=Autoscaler.concurrency, show_default=True,
                  help="Requests one replica (GPU) serves at once.")
    @click.option("--target-utilization", type=float, default=Autoscaler.target_utilization, show_default=True,
                  help="Autoscaler target: demand / replica slots.")
    @click.option("--tick-s", type=float, default=Autoscaler.tick_s, show_default=True)
    @click.option("--window-s", type=float, default=Autoscaler.window_s, show_default=True,
                  help="Offered load = work arrived in the last window / window.")
    @click.option("--panic-window-s", type=float, default=Autoscaler.panic_window_s, show_default=True,
                  help="While requests queue, the offered load of this shorter window counts too (0: off).")
    @click.option("--drain-s", type=float, default=Autoscaler.drain_s, show_default=True,
                  help="Queued work adds work / drain-s to the demand while no replica is starting (0: off).")
    @click.option("--cooldown-s", type=float, default=Autoscaler.cooldown_s, show_default=True,
                  help="Idle time before a replica is stopped.")
    @click.option("--min-replicas", type=int, default=Autoscaler.min_replicas, show_default=True)
    @click.option("--max-replicas", type=int, default=Autoscaler.max_replicas, show_default=True)
    @click.option("--gpu-hour-usd", type=float, default=2.5, show_default=True)
    @click.option("--p99-target-s", type=float, default=2.0, show_default=True,
                  help="Delay target that sizes the plain `static` policy.")
    @click.option("--seed", type=int, default=1, show_default=True, help="--generate: random seed.")
    @click.option("--duration-s", type=float, default=3600.0, show_default=True, help="--generate: length.")
    @click.option("--base-rps", type=float, default=2.0, show_default=True,
                  help="--generate, one deployment: calm rate.")
    @click.option("--burst-rps", type=float, default=20.0, show_default=True,
                  help="--generate, one deployment: burst rate.")
    @click.option("--base-rps-lo", type=float, default=0.1, show_default=True,
                  help="--generate, fleet: lowest base rate of a deployment (log-uniform to --base-rps-hi).")
    @click.option("--base-rps-hi", type=float, default=10.0, show_default=True,
                  help="--generate, fleet: highest base rate of a deployment.")
    @click.option("--burst-x", type=float, default=10.0, show_default=True,
                  help="--generate, fleet: burst rate / base rate.")
    @click.option("--burst-every-s", type=float, default=600.0, show_default=True, help="--generate: period.")
    @click.option("--burst-len-s", type=float, default=60.0, show_default=True, help="--generate: burst length.")
    @click.option("--ramp-s", type=float, default=0.0, show_default=True,
                  help="--generate: bursts ramp up and down over this long (0: steps).")
    @click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("thaw-simulate"),
                  show_default=True, help="Directory for the PNG plots.")
    @click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
    @click.pass_obj
    def simulate_cmd(cfg, trace, generate, deployments, policies, cold_start_s, restore_s, provision_s, service_s,
                     concurrency, target_utilization, tick_s, window_s, panic_window_s, drain_s, cooldown_s,
                     min_replicas, max_replicas, gpu_hour_usd, p99_target_s, seed, duration_s, base_rps, burst_rps,
                     base_rps_lo, base_rps_hi, burst_x, burst_every_s, burst_len_s, ramp_s, out, no_plots, as_json):
        """Replay a demand TRACE (CSV: timestamp[,duration_s][,deployment]) or --generate a bursty one (one
        deployment, or a fleet of --deployments sharing one buffer) against scaling policies; report GPU
        allocation utilization (GPU-seconds busy / paid), p50/p99 queueing delay and cost, and write PNG plots.
        Start times come from the registry's measured restores unless given."""
        try:
            if (trace is None) == (not generate):
                fail("give either a TRACE CSV file or --generate (not both)")
            if deployments is not None and not generate:
                fail("--deployments is for --generate; a CSV trace names deployments in a 'deployment' column")
            if deployments is not None and deployments < 1:
                fail(f"--deployments must be >= 1 (got {deployments})")
            if not 0 < service_s < math.inf:
                fail(f"--service-s must be > 0 and finite (got {service_s})")
            if not generate:
                tr = load_trace(trace, service_s)
            elif (deployments or 1) == 1:
                tr = bursty_trace(seed, duration_s, base_rps, burst_rps, burst_every_s, burst_len_s, service_s, ramp_s)
            else:
                tr = fleet_trace(seed, deployments, duration_s, base_rps_lo, base_rps_hi, burst_x, burst_every_s,
                                 burst_len_s, service_s, ramp_s)
            pols = [Policy.parse(s) for s in (policies or DEFAULT_POLICIES)]
            scaler = Autoscaler(concurrency=concurrency, target_utilization=target_utilization, tick_s=tick_s,
                                window_s=window_s, panic_window_s=panic_window_s, drain_s=drain_s,
                                cooldown_s=cooldown_s, min_replicas=min_replicas, max_replicas=max_replicas)
            scaler.check()
            timings, sources = resolve_timings(getattr(cfg, "registry_url", None), cold_start_s, restore_s,
                                               provision_s)
            results = run_policies(tr, pols, timings, scaler, gpu_hour_usd, p99_target_s)
        except SimError as e:
            fail(str(e))
        pngs = [] if no_plots else plot(results, tr, out, concurrency)
        if as_json:
            click.echo(json.dumps({
                "trace": {"source": tr.source, "requests": len(tr.requests), "end_s": tr.end_s,
                          "deployments": tr.n_deployments},
                "timings": {**asdict(timings), "sources": sources},
                "autoscaler": asdict(scaler), "gpu_hour_usd": gpu_hour_usd,
                "results": [r.summary() for r in results], "plots": [str(p) for p in pngs]}, indent=2))
            return
        click.echo(f"trace: {tr.source}")
        for name, label in (("cold_start_s", "cold start"), ("restore_s", "restore"), ("provision_s", "provision")):
            click.echo(f"{label}: {getattr(timings, name):g} s  ({sources[name]})")
        click.echo(format_table(results))
        click.echo("util = GPU-seconds busy / GPU-seconds paid (booting, restoring and buffered hosts are paid); "
                   "depl.util = busy / the deployments' replica GPU-seconds, without the shared buffer (context); "
                   "delay = arrival to start of service")
        for p in pngs:
            click.echo(f"plot: {p}")

    return simulate_cmd
