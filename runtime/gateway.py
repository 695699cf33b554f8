"""Gateway: an HTTP reverse proxy in front of one deployment's replicas.

* Balances by in-flight requests: each request goes to the healthy replica with the fewest requests in
  flight (ties broken round robin). ``max_inflight_per_replica`` optionally caps a replica's in-flight
  requests; past the cap requests queue at the gateway (like Knative's containerConcurrency).
* Holds requests while the deployment has no ready replica (scale from zero, like Knative's activator): the
  request waits in a FIFO queue, a scale signal to at least one replica is emitted at once, and queued
  requests are released as soon as ``Backends.endpoints()`` lists a replica (polled every ``refresh_s``;
  the pool may call :meth:`Gateway.refresh` to release them without waiting for the next poll). A request
  held for ``hold_timeout_s`` in total (connects that timed out count) is answered 503 with Retry-After and a
  one-line JSON error (which names the last scale signal's failure, if it failed: Temporal down, say). A
  deployment whose maximum is 0 answers 503 without holding. A deployment that cannot have replicas at
  all (undeployed: ``Backends.scale`` raises :class:`NotServing`) has its held requests answered 503 at once. A
  later request is held only while one more scale signal asks again (a deploy may have come since; at most one
  such signal per ``NOT_SERVING_RECHECK_S``, and requests in between are answered 503 at once). The first
  request held after every replica went (died, or undeployed) says the count again at once, rather than after
  ``resend_s``, so an undeploy is found then; one undeployed while its first replica restores is found by the
  resend.
* Loses no request it holds when a replica dies. The request body is read in full before proxying so it
  can be re-sent. A failure before any response byte came back is retried:
    - the connection could not be made (refused, unreachable, connect timeout): the request never reached
      the replica, so it is always safe to re-send. The endpoint is dropped from the current list and
      quarantined (until the pool stops listing it, or ``quarantine_s`` passes) and the request goes to
      another replica, or is held again until one appears.
    - the connection broke after the request was sent but before a response (replica died mid-request,
      or a stale keep-alive connection): the replica may have seen the request, so this is re-sent only
      because this system's requests are idempotent JSON POSTs (inference: same input, same output). At most
      ``max_delivery_attempts`` such deliveries are made, so a request that itself kills replicas cannot
      take the whole deployment down; after that it is answered 502. With 1 (`thaw gateway --deliveries 1`,
      for an API whose requests have side effects) such a request is never sent again.
  Once response headers came back the response is streamed through and never retried; if the replica dies
  mid-body the client connection is closed so the client sees a truncated response, not a short success.
* Autoscales like Knative's KPA (:class:`Autoscaler`): every ``tick_s`` it samples the time-weighted
  concurrency (in-flight + queued) over the tick and keeps stable- and panic-window averages;
  desired = ceil(stable_avg / target). When panic_avg / (max(ready, 1) * target) >= panic_threshold it enters
  panic mode for ``stable_window_s`` (re-armed while the condition holds): desired = max(stable, panic,
  previous), i.e. never scale down while panicking. It scales to zero only when the whole stable window saw
  no traffic and there was none for ``scale_to_zero_grace_s``. Desired is clamped to [min, max] and
  ``Backends.scale`` is called only when it changes (a failed call is retried the next tick). A gateway adopts
  the replicas ready at its start and scales nothing down in its first stable window. A scale-up asks for "at
  least" N: the gateway cannot see replicas still restoring (`thaw scale NAME 4` just before), and a plain N
  would stop them; a scale-down says N. After an "at least", once more replicas are ready than it wants (past
  its first window, not panicking), it says its count again, plainly.
* ``GET /-/gateway``: JSON state. ``GET /metrics``: Prometheus text from a registry of its own per Gateway. Every
  other method and path (``POST /metrics`` too) is proxied. Request bodies arrive decompressed (so
  Content-Encoding is not passed on; a coding aiohttp does not decode, or more than one header, gets 415);
  X-Forwarded-For gains the client's address and X-Forwarded-Host/Proto are the gateway's own view. At most
  ``max_queued`` requests hold or are reading a body (each up to ``max_body_bytes``, else 413), and at most
  ``max_body_memory`` bytes of bodies are being read, held or in flight (a body is reserved before it is read:
  its Content-Length, or the most it may be when that is unknown or it is compressed); past either a request gets
  503 with Retry-After. A body not received within ``body_timeout_s`` gets 408, a malformed one (bad chunking or
  gzip) 400, and so does a request target that is not a path (absolute form, ``*``). A request whose client hangs
  up is cancelled: its replica slot is free.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import posixpath
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Protocol, runtime_checkable

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from multidict import CIMultiDict
from yarl import URL

from thaw.errors import first_line
from thaw.snapshot import sdk

log = logging.getLogger("thaw.gateway")

# RFC 7230 section 6.1 hop-by-hop headers (plus Host and Content-Length, which the client library sets, and
# Content-Encoding: the server side decompresses request bodies, so the replica gets them plain).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "trailers", "transfer-encoding", "upgrade", "proxy-connection"})
_NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "expect", "content-encoding"}
# the request Content-Encodings aiohttp's server decodes (one header, this exact name); others are refused (415):
# their bodies would go on still encoded, and the header that says so is not forwarded
DECODED = frozenset({"gzip", "deflate", "br", "zstd", "identity"})

HOLD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


NOT_SERVING_RECHECK_S = 1.0  # a deployment found not serving: how often a request may ask its pool again


class NotServing(RuntimeError):
    """Raised by ``Backends.scale``: the deployment cannot have replicas at all (it was undeployed), so holding a
    request would only delay its 503."""


@runtime_checkable
class Backends(Protocol):
    """What the gateway needs from a deployment's pool."""

    async def endpoints(self) -> list[str]:
        """Base URLs (``http://127.0.0.1:PORT``) of the replicas that are healthy now."""
        ...

    async def scale(self, replicas: int, reason: str, at_least: bool = False) -> None:
        """The gateway's scale signal: the deployment should run ``replicas`` replicas (``at_least``: or more,
        if its pool wants more). NotServing where the deployment cannot have any."""
        ...


# --------------------------------------------------------------------------------------------- autoscaler

@dataclass
class Decision:
    desired: int
    reason: str
    kind: str            # "stable" | "panic" | "zero" | "hold" | "warm-up" | "activate"
    stable_avg: float
    panic_avg: float
    panicking: bool


@dataclass
class Autoscaler:
    """Knative-KPA-like decisions from concurrency samples (pure: time is passed in, for tests)."""

    target_concurrency: float = 1.0
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    min_replicas: int = 0
    max_replicas: int | None = None
    scale_to_zero_grace_s: float = 30.0
    desired: int = 0                                   # the previous decision
    samples: deque = field(default_factory=deque)      # (t, concurrency)
    panic_until: float | None = None
    last_active: float = -math.inf
    stable_avg: float = 0.0
    panic_avg: float = 0.0
    since: float | None = None                         # the first decision (or the gateway's start)

    def warming(self, now: float) -> bool:
        """Less than one stable window of samples yet: too little to scale down on (as Knative's KPA)."""
        return self.since is not None and now - self.since < self.stable_window_s

    def clamp(self, n: int) -> int:
        n = max(self.min_replicas, n)
        return n if self.max_replicas is None else min(self.max_replicas, n)

    @property
    def panicking(self) -> bool:
        return self.panic_until is not None

    def touch(self, now: float) -> None:
        """Traffic seen now (a request arrived), even if no tick sampled it yet."""
        self.last_active = now

    def decide(self, now: float, concurrency: float, ready: int) -> Decision:
        if self.since is None:
            self.since = now
        self.samples.append((now, concurrency))
        while self.samples and self.samples[0][0] <= now - self.stable_window_s:
            self.samples.popleft()
        if concurrency > 0:
            self.last_active = now
        stable = [c for _, c in self.samples]
        panic = [c for t, c in self.samples if t > now - self.panic_window_s] or [concurrency]
        self.stable_avg = sum(stable) / len(stable)
        self.panic_avg = sum(panic) / len(panic)
        want_stable = _ceil(self.stable_avg / self.target_concurrency)
        want_panic = _ceil(self.panic_avg / self.target_concurrency)

        ratio = self.panic_avg / (max(ready, 1) * self.target_concurrency)
        if self.panic_avg > 0 and ratio >= self.panic_threshold:
            self.panic_until = now + self.stable_window_s       # enter, or stay, in panic mode
        elif self.panic_until is not None and now >= self.panic_until:
            self.panic_until = None

        if self.panic_until is not None:
            desired, kind = max(want_stable, want_panic, self.desired), "panic"
            reason = (f"panic: concurrency {self.panic_avg:.2f} over {self.panic_window_s:g}s on {ready} ready "
                      f"(target {self.target_concurrency:g})")
        else:
            desired, kind = want_stable, "stable"
            reason = f"stable: concurrency {self.stable_avg:.2f} over {self.stable_window_s:g}s " \
                     f"(target {self.target_concurrency:g})"
            if desired == 0:
                idle = now - self.last_active
                if self.desired > 0 and idle < self.scale_to_zero_grace_s:
                    desired, kind = 1, "hold"
                    reason = f"idle {idle:.1f}s < scale-to-zero grace {self.scale_to_zero_grace_s:g}s"
                else:
                    kind, reason = "zero", f"scale to zero: no traffic for {idle:.1f}s"
        desired = self.clamp(desired)
        if desired < self.desired and self.warming(now):
            desired, kind = self.desired, "warm-up"
            reason = f"{reason}; no scale-down before {self.stable_window_s:g}s of samples"
        self.desired = desired
        return Decision(self.desired, reason, kind, self.stable_avg, self.panic_avg, self.panicking)


def _ceil(x: float) -> int:
    return max(0, math.ceil(x - 1e-6))


# ------------------------------------------------------------------------------------------------ gateway

class _Retry(Exception):
    def __init__(self, delivered: bool, cause: BaseException):
        super().__init__(str(cause))
        self.delivered = delivered
        self.cause = cause


def _host_only(path: str) -> bool:
    """Whether ``path`` (decoded) names one of the SDK's paths, however written ("//thaw/x", "/a/../thaw/x")."""
    path = posixpath.normpath("/" + path.lstrip("/"))
    return path == sdk.PATHS or path.startswith(sdk.PATHS + "/")


class Gateway:
    """The reverse proxy, hold queue and autoscaler of one deployment (see the module docstring).

    Beyond the issue's knobs: ``max_inflight_per_replica`` (None: no cap) queues requests at the gateway
    while every replica has that many in flight; ``quarantine_s`` keeps an endpoint that refused a connection
    out of the list while the pool still reports it; ``connect_timeout_s`` bounds a connect (a replica whose
    host vanished); ``max_delivery_attempts`` bounds re-sends after a connection broke mid-request;
    ``max_queued`` bounds the requests held at once (more are answered 503 with Retry-After, since each holds its
    body in memory), and ``max_body_memory`` the bytes of bodies held or in flight (each is kept for a re-send
    until its answer comes: a request that would go past it gets the same 503); ``read_timeout_s`` bounds the
    wait for a replica's answer to begin, from the start of the request (sending it the body included), then for
    each piece of it (a wedged replica: 504, not sent again, since the replica may be doing the work), and a
    client's taking of each piece (one that stays connected and reads nothing is dropped); ``resend_s``: while
    requests are held with no replica, the scale signal is sent again that often (the pool may have been scaled
    down or deployed afresh behind the gateway's back: `thaw scale NAME 0`, an undeploy and deploy); ``drain_s``:
    when the gateway stops (SIGTERM), it takes no new connections and gives the requests under way (held ones
    too) this long to end.
    """

    def __init__(self, deployment: str, backends: Backends, *, target_concurrency: float = 1.0,
                 stable_window_s: float = 60, panic_window_s: float = 6, panic_threshold: float = 2.0,
                 tick_s: float = 0.5, hold_timeout_s: float = 120, max_replicas: int | None = None,
                 min_replicas: int = 0, scale_to_zero_grace_s: float = 30, refresh_s: float = 0.5,
                 max_inflight_per_replica: int | None = None, quarantine_s: float = 5.0,
                 connect_timeout_s: float = 5.0, max_delivery_attempts: int = 3,
                 max_body_bytes: int = 64 << 20, max_queued: int = 1000, read_timeout_s: float | None = 600.0,
                 body_timeout_s: float = 60.0, resend_s: float = 10.0, max_body_memory: int = 1 << 30,
                 drain_s: float = 30.0):
        if target_concurrency <= 0:
            raise ValueError("target_concurrency must be > 0")
        self.deployment = deployment
        self.backends = backends
        self.tick_s = tick_s
        self.refresh_s = refresh_s
        self.hold_timeout_s = hold_timeout_s
        self.max_inflight_per_replica = max_inflight_per_replica
        self.quarantine_s = quarantine_s
        self.connect_timeout_s = connect_timeout_s
        self.max_delivery_attempts = max_delivery_attempts
        self.max_body_bytes = max_body_bytes
        self.max_queued = max_queued
        self.read_timeout_s = read_timeout_s
        self.body_timeout_s = body_timeout_s
        self.resend_s = resend_s
        self.drain_s = drain_s
        self.max_body_memory = max_body_memory
        self._body_cap = min(max_body_bytes, max_body_memory)   # a body bigger than all of them could never be held
        self.autoscaler = Autoscaler(target_concurrency, stable_window_s, panic_window_s, panic_threshold,
                                     min_replicas, max_replicas, scale_to_zero_grace_s)
        self.last_decision: Decision | None = None

        self._endpoints: list[str] = []
        self._quarantine: dict[str, float] = {}       # endpoint -> monotonic time it may come back
        self._inflight: dict[str, int] = {}
        self._waiters: deque[tuple[asyncio.Future, set[str]]] = deque()
        self._held = 0                                # waiters not done yet (done ones leave at the head)
        self._reading = 0                             # requests whose bodies are being read
        self._body_bytes = 0                          # bodies being read, held or in flight (kept for re-sends)
        self._rr = 0
        self._signaled: int | None = None             # last replica count Backends.scale accepted
        self._signaled_loose = False                  # ... as "at least" (the pool may run more)
        self._signaled_at = time.monotonic()          # ... and when
        self._scale_error: str | None = None          # why the last scale signal failed (None: it did not)
        self._refresh_error: str | None = None        # why the last endpoint refresh failed (None: it did not)
        self._not_serving: str | None = None          # why the deployment cannot have replicas (NotServing) ...
        self._not_serving_at = 0.0                    # ... as the last scale signal found, and when
        self._lost_all = False                        # every replica went since a request was last held
        self._pending = 0                             # scale signals spawned and not done (queued on the lock too)
        self._scale_lock: asyncio.Lock | None = None
        self._kick: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self._session: aiohttp.ClientSession | None = None
        self._running = False
        # time-weighted concurrency (in flight + queued) since the last tick
        self._conc = 0
        self._area = 0.0
        self._area_since = time.monotonic()
        self._last_change = self._area_since
        # GPU-seconds (a replica holds one accelerator): ready = allocated to this deployment, busy = serving
        self._busy_since: dict[str, float] = {}       # endpoint -> since when its busy time is not counted yet
        self._ready_since = self._area_since
        # what other threads (the KEDA scaler) read: replaced whole on the loop each tick, never changed in place
        self.demand = {"desired": 0, "queued": 0, "inflight": 0, "ready": 0}

        self.registry = CollectorRegistry()
        lbl = ["deployment"]
        d = deployment
        Gauge("thaw_gateway_queue_depth", "Requests held at the gateway waiting for a replica", lbl,
              registry=self.registry).labels(d).set_function(lambda: self.queued)
        Gauge("thaw_gateway_inflight", "Requests proxied to a replica and not finished", lbl,
              registry=self.registry).labels(d).set_function(lambda: self.inflight_total)
        Gauge("thaw_gateway_replicas", "Ready replicas the gateway balances over", lbl,
              registry=self.registry).labels(d).set_function(lambda: len(self._endpoints))
        Gauge("thaw_gateway_desired_replicas", "The autoscaler's desired replica count", lbl,
              registry=self.registry).labels(d).set_function(lambda: self.autoscaler.desired)
        Gauge("thaw_gateway_panic", "1 while the autoscaler is in panic mode", lbl,
              registry=self.registry).labels(d).set_function(lambda: int(self.autoscaler.panicking))
        self._m_requests = Counter("thaw_gateway_requests", "Requests answered, by status code",
                                   lbl + ["code"], registry=self.registry)
        self._m_hold = Histogram("thaw_gateway_hold_seconds", "Time requests were held waiting for a replica "
                                 "(only requests that had to wait)", lbl, buckets=HOLD_BUCKETS,
                                 registry=self.registry).labels(d)
        self._m_scale = Counter("thaw_gateway_scale_signals", "Scale signals sent to the pool", lbl + ["kind"],
                                registry=self.registry)
        self._m_retries = Counter("thaw_gateway_upstream_retries", "Requests re-sent after an upstream failure",
                                  lbl + ["reason"], registry=self.registry)
        self._m_ready_s = Counter("thaw_gateway_gpu_seconds_ready", "Replica-seconds of ready replicas (GPU-seconds "
                                  "allocated to the deployment)", lbl, registry=self.registry).labels(d)
        self._m_busy_s = Counter("thaw_gateway_gpu_seconds_busy", "Replica-seconds with at least one request in "
                                 "flight (GPU-seconds busy)", lbl, registry=self.registry).labels(d)

    # ---------------------------------------------------------------------------------------- state

    @property
    def queued(self) -> int:
        return self._held

    @property
    def inflight_total(self) -> int:
        return sum(self._inflight.values())

    @property
    def endpoints(self) -> list[str]:
        return list(self._endpoints)

    def state(self) -> dict:
        a = self.autoscaler
        return {
            "deployment": self.deployment,
            "queued": self.queued,
            "inflight": {ep: self._inflight.get(ep, 0) for ep in self._endpoints}
            | {ep: n for ep, n in self._inflight.items() if n},
            "inflight_total": self.inflight_total,
            "endpoints": list(self._endpoints),
            "quarantined": sorted(self._quarantine),
            "ready": len(self._endpoints),
            "desired": a.desired,
            "signaled": self._signaled,
            "signaled_at_least": self._signaled_loose,
            "panic": a.panicking,
            "stable_avg": round(a.stable_avg, 4),
            "panic_avg": round(a.panic_avg, 4),
            "target_concurrency": a.target_concurrency,
            "stable_window_s": a.stable_window_s,
            "panic_window_s": a.panic_window_s,
            "last_reason": self.last_decision.reason if self.last_decision else None,
            "not_serving": self._not_serving,
        }

    # ------------------------------------------------------------------------------------ lifecycle

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._body_cap)
        app.router.add_get("/-/gateway", self._handle_state)
        app.router.add_get("/metrics", self._handle_metrics)
        app.router.add_route("*", "/{tail:.*}", self._handle_proxy)
        app.cleanup_ctx.append(self._lifecycle)
        return app

    async def _lifecycle(self, _app: web.Application) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        """Open the upstream session and start the refresh and autoscaler loops (``app()`` does this)."""
        if self._running:
            return
        self._running = True
        self._scale_lock = asyncio.Lock()
        self._kick = asyncio.Event()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s,
                                          sock_read=self.read_timeout_s),
            auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
        with contextlib.suppress(Exception):
            await self._refresh_once()
        # adopt what runs, without a signal. With nothing ready (none, or some still restoring, or the registry not
        # answering) what the pool runs is unknown: only scale-ups are sent until a stable window has passed
        self.autoscaler.desired = len(self._endpoints)
        self._signaled = len(self._endpoints) or None
        self.autoscaler.last_active = self.autoscaler.since = time.monotonic()   # grace and warm-up count from here
        self._area_since = self._last_change = time.monotonic()
        self._spawn(self._refresh_loop())
        self._spawn(self._tick_loop())

    async def stop(self) -> None:
        self._running = False
        self._count_ready()  # the seconds since the last tick count too
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        for fut, _ in self._waiters:
            if not fut.done():
                fut.cancel()
        if self._session:
            await self._session.close()
            self._session = None

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    # ------------------------------------------------------------------------------------ endpoints

    async def refresh(self) -> None:
        """Ask for the endpoint list now (the pool may call this when a replica became healthy)."""
        if self._kick:
            self._kick.set()

    async def _refresh_loop(self) -> None:
        while self._running:
            try:   # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation (stop() hangs)
                async with asyncio.timeout(self.refresh_s):
                    await self._kick.wait()
            except TimeoutError:
                pass
            self._kick.clear()
            try:
                await self._refresh_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # keep serving the last known list
                error = first_line(e, typed=True)[:250]
                if error != self._refresh_error:  # once, not twice a second while the registry is down
                    log.warning("gateway %s: listing replicas failed (serving the last list): %s",
                                self.deployment, error)
                self._refresh_error = error
                continue
            if self._refresh_error:
                log.info("gateway %s: listing replicas works again", self.deployment)
                self._refresh_error = None

    async def _refresh_once(self) -> None:
        async with asyncio.timeout(max(10.0, 4 * self.refresh_s)):
            listed = list(dict.fromkeys(await self.backends.endpoints()))
        now = time.monotonic()
        for ep, until in list(self._quarantine.items()):
            if ep not in listed or now >= until:   # gone from the pool (a later one is new), or time to retry
                del self._quarantine[ep]
        self._set_endpoints([ep for ep in listed if ep not in self._quarantine])

    def _count_ready(self) -> None:
        """Add the ready replicas' seconds, and the busy ones', since the last count (before the set changes,
        and every tick: a replica that is never idle still shows busy time as it goes)."""
        now = time.monotonic()
        self._m_ready_s.inc(len(self._endpoints) * (now - self._ready_since))
        self._ready_since = now
        for ep, since in self._busy_since.items():
            self._m_busy_s.inc(now - since)
            self._busy_since[ep] = now

    def _set_endpoints(self, eps: list[str]) -> None:
        if eps != self._endpoints:
            log.info("gateway %s: endpoints %s", self.deployment, eps)
            self._count_ready()
        if eps and not self._endpoints:
            self._not_serving = None  # a replica serves: it was deployed again
        elif self._endpoints and not eps:
            self._lost_all = True  # died, or undeployed: the next request held says the count again (_acquire)
        self._endpoints = eps
        for ep in [ep for ep, n in self._inflight.items() if n == 0 and ep not in eps]:
            del self._inflight[ep]
        self._pump()

    def _drop(self, ep: str) -> None:
        """The endpoint refused a connection: out of the list until the pool stops listing it, or a while."""
        self._quarantine[ep] = time.monotonic() + self.quarantine_s
        if ep in self._endpoints:
            log.warning("gateway %s: dropping unreachable endpoint %s", self.deployment, ep)
            self._set_endpoints([e for e in self._endpoints if e != ep])
        if not self._endpoints and self._kick:
            self._kick.set()

    # ------------------------------------------------------------------------------- balancing/hold

    def _pick(self, avoid: set[str] = frozenset()) -> str | None:
        cap = self.max_inflight_per_replica
        cands = [e for e in self._endpoints if cap is None or self._inflight.get(e, 0) < cap]
        if not cands:
            return None
        pref = [e for e in cands if e not in avoid] or cands
        start = self._rr % len(pref)
        self._rr += 1
        return min(pref[start:] + pref[:start], key=lambda e: self._inflight.get(e, 0))

    def _take(self, ep: str) -> None:
        self._inflight[ep] = self._inflight.get(ep, 0) + 1
        self._busy_since.setdefault(ep, time.monotonic())

    def _release(self, ep: str) -> None:
        self._inflight[ep] -= 1
        if self._inflight[ep] <= 0:  # idle now: its busy span ends
            self._m_busy_s.inc(time.monotonic() - self._busy_since.pop(ep))
            if ep not in self._endpoints:
                del self._inflight[ep]
        self._pump()

    def _unhold(self, _fut: asyncio.Future) -> None:
        self._held -= 1

    def _pump(self) -> None:
        """Hand endpoints to queued requests, first come first served."""
        while self._waiters:
            fut, avoid = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            ep = self._pick(avoid)
            if ep is None:
                return
            self._waiters.popleft()
            self._take(ep)
            fut.set_result(ep)

    def _conc_change(self, delta: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._area += self._conc * (now - self._last_change)
        self._last_change = now
        self._conc += delta

    async def _acquire(self, request: web.Request, avoid: set[str], budget: float) -> tuple[str | None, float]:
        """An endpoint with a slot taken on it (``None`` when held past ``budget``, or the deployment is not
        serving), and seconds held."""
        if not self._waiters:
            ep = self._pick(avoid)
            if ep is not None:
                self._take(ep)
                return ep, 0.0
        recheck = self._not_serving is not None and not self._endpoints and not self._pending
        if recheck and time.monotonic() - self._not_serving_at < NOT_SERVING_RECHECK_S:
            return None, 0.0  # the pool has just said it has none to give
        recheck |= self._lost_all and not self._endpoints
        self._lost_all = False
        fut = asyncio.get_running_loop().create_future()
        self._held += 1
        fut.add_done_callback(self._unhold)
        if avoid:
            self._waiters.appendleft((fut, avoid))   # a retried request keeps its place: it came first
        else:
            self._waiters.append((fut, avoid))
        self._pump()
        if not self._endpoints:
            if recheck:  # held while the pool hears the count again: it may be gone, or deployed anew since
                self._signaled = None
            if not self._activate() and recheck:
                self._ask()
        t0 = time.monotonic()
        try:
            while not fut.done():
                remaining = budget - (time.monotonic() - t0)
                if remaining <= 0:
                    break
                await asyncio.wait({fut}, timeout=min(remaining, 0.25))
                if not fut.done() and (request.transport is None or request.transport.is_closing()):
                    break  # the client went away while held
        except BaseException:  # cancelled (client gone): give back a slot handed over meanwhile
            if fut.done() and not fut.cancelled() and fut.result() is not None:
                self._release(fut.result())
            fut.cancel()
            raise
        held = time.monotonic() - t0
        if not fut.done():
            fut.cancel()  # _pump skips it
            return None, held
        return fut.result(), held

    def _activate(self) -> bool:
        """A request is held with no replica: ask for one now, not at the next tick (True: asked)."""
        a = self.autoscaler
        if a.desired < 1:
            n = a.clamp(1)
            if n >= 1:
                a.desired = n
                a.touch(time.monotonic())
                self.last_decision = Decision(n, "activate: request held with no ready replica", "activate",
                                              a.stable_avg, a.panic_avg, a.panicking)
                self._ask()
                return True
        return False

    def _ask(self) -> None:
        """Send the autoscaler's count to the pool, after any signal under way (each reads the count anew)."""
        self._pending += 1
        self._spawn(self._asked())

    async def _asked(self) -> None:
        try:
            await self._sync_scale()
        finally:
            self._pending -= 1

    async def _sync_scale(self) -> None:
        async with self._scale_lock:
            want, d = self.autoscaler.desired, self.last_decision
            if not self._unsaid(want) or (want == 0 and self._conc):  # a request came since the tick chose zero:
                return  # the pool would stop its replica under it (the next tick decides again)
            reason = d.reason if d else "autoscaler"
            kind = d.kind if d else "stable"
            at_least = self._at_least(want)
            try:
                await self.backends.scale(want, reason, at_least)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # retried on the next tick; NotServing: by the next request, or after resend_s
                error = f"scale to {want} failed: {first_line(e, typed=True)[:250]}"
                if error != self._scale_error:  # once, not every tick while Temporal is down
                    log.warning("gateway %s: %s", self.deployment, error)
                self._scale_error = error
                if isinstance(e, NotServing):
                    self._not_serving, self._not_serving_at = first_line(e)[:250], time.monotonic()
                    self._turn_away()
                return
            if self._scale_error:
                log.info("gateway %s: scale signals go through again", self.deployment)
            self._scale_error = self._not_serving = None
            log.info("gateway %s: scale %s -> %s%d (%s)", self.deployment, self._signaled,
                     "at least " if at_least else "", want, reason)
            self._signaled, self._signaled_loose, self._signaled_at = want, at_least, time.monotonic()
            self._m_scale.labels(self.deployment, kind).inc()

    def _turn_away(self) -> None:
        """Answer every held request now (503): the deployment is not serving."""
        while self._waiters:
            fut, _ = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    def _at_least(self, want: int) -> bool:
        """Whether a scale signal for ``want`` replicas is "at least": a scale-up is. The gateway does not see
        replicas still restoring (a replica is listed once it serves), and its scale-up must not stop them."""
        return want > (self._signaled or 0)

    def _unsaid(self, want: int) -> bool:
        """Whether the pool is to hear ``want``: another count than the last one said, or the same one said as
        "at least" while more replicas are ready than that (past the first window, not panicking)."""
        a = self.autoscaler
        return want != self._signaled or (self._signaled_loose and len(self._endpoints) > want
                                          and not a.warming(time.monotonic()) and not a.panicking)

    # ------------------------------------------------------------------------------------ autoscale

    def _sample(self) -> float:
        """Time-weighted mean concurrency since the previous sample."""
        now = time.monotonic()
        self._conc_change(0, now)
        dt = now - self._area_since
        sample = self._area / dt if dt > 0 else float(self._conc)
        self._area, self._area_since = 0.0, now
        return sample

    async def tick(self) -> Decision:
        """One autoscaler step (the tick loop calls this every ``tick_s``)."""
        self._count_ready()
        now = time.monotonic()
        d = self.autoscaler.decide(now, self._sample(), len(self._endpoints))
        if self._held and not self._endpoints and now - self._signaled_at >= self.resend_s:
            d = replace(d, reason=f"resend: requests held {now - self._signaled_at:.0f}s with no ready replica")
            self._signaled = None  # the pool may want fewer than this gateway last said: say it again
        self.last_decision = d
        self.demand = {"desired": d.desired, "queued": self.queued, "inflight": self.inflight_total,
                       "ready": len(self._endpoints)}
        quiet = self._not_serving is not None and now - self._not_serving_at < self.resend_s  # requests ask
        if (self._unsaid(d.desired) and not self._pending and not quiet  # one under way: the next tick looks again
                and (self._at_least(d.desired) or not self.autoscaler.warming(now))):  # first window: ups only
            self._ask()  # not awaited: a slow Temporal must not stop the ticks (KEDA's numbers)
        return d

    async def _tick_loop(self) -> None:
        while self._running:
            await asyncio.sleep(self.tick_s)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("gateway %s: autoscaler tick failed", self.deployment)

    # ---------------------------------------------------------------------------------------- HTTP

    async def _handle_state(self, _request: web.Request) -> web.Response:
        return web.json_response(self.state())

    async def _handle_metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _error(self, status: int, message: str, retry_after: int | None = None) -> web.Response:
        self._m_requests.labels(self.deployment, str(status)).inc()
        body = json.dumps({"error": message, "deployment": self.deployment}) + "\n"
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return web.Response(status=status, text=body, content_type="application/json", headers=headers)

    def _upstream_headers(self, request: web.Request) -> dict:
        drop = set(_NOT_FORWARDED)
        for h in request.headers.getall("Connection", []):
            drop |= {t.strip().lower() for t in h.split(",")}
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in drop)
        peer = request.remote or ""
        prior = ", ".join(request.headers.getall("X-Forwarded-For", []))  # a proxy chain may send several lines
        headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        headers["X-Forwarded-Host"] = request.host  # what this gateway saw, not what a client claims
        headers["X-Forwarded-Proto"] = request.scheme
        return headers

    async def _handle_proxy(self, request: web.Request) -> web.StreamResponse:
        if not request.raw_path.startswith("/"):  # absolute-form, "*" or CONNECT targets: not for a replica
            return self._error(400, f"request target {request.raw_path[:80]!r} is not a path")
        if _host_only(request.path):  # the SDK's snapshot hooks: a client could park a replica's weights, or
            # give it env it takes as secrets
            return self._error(404, f"{request.path[:80]} is for the replica's host, not served through the gateway")
        said = request.headers.getall("Content-Encoding", [])  # aiohttp decodes by the last line alone
        codings = [c for c in said if c.strip()]  # "": no coding
        if len(said) > 1 or codings and codings[0].lower() not in DECODED:
            return self._error(415, f"request Content-Encoding {', '.join(codings)[:80]!r} is not one the gateway "
                                    f"decodes (one of {', '.join(sorted(DECODED))})")
        size = request.content_length
        if size is not None and size > self._body_cap:
            return self._error(413, f"request body of {size:,} bytes is over the limit of {self._body_cap:,}")
        if not request.body_exists:
            size = 0
        elif size is None or request.headers.get("Content-Encoding", "identity").lower() != "identity":
            size = self._body_cap  # chunked, or decompressed to a size unknown until read: the most it may be
        busy = None
        if self.queued + self._reading >= self.max_queued:  # bodies held in memory, or being read into it
            busy = f"{self.queued + self._reading} requests are already held"
        elif self._body_bytes + size > self.max_body_memory:  # bodies being read and in flight too
            busy = f"{self._body_bytes:,} bytes of request bodies are already held or in flight"
        if busy:
            return self._error(503, f"{busy} for {self.deployment}; retry shortly", retry_after=1)
        # counted from arrival: concurrent uploads see each other's bytes before any is read, and a request still
        # uploading is demand (the autoscaler must not scale to zero under it)
        self._body_bytes += size
        self._conc_change(+1)      # a request counts as concurrency from arrival to answer, held or in flight
        self.autoscaler.touch(time.monotonic())
        held_total, deliveries, avoid = 0.0, 0, set()
        try:
            self._reading += 1
            try:
                async with asyncio.timeout(self.body_timeout_s):
                    body = await request.read()
            except TimeoutError:
                return self._error(408, f"the request body did not arrive within {self.body_timeout_s:g}s")
            except web.RequestPayloadError as e:  # its text is aiohttp's "400, message:\n  <why>"
                why = getattr(e.__cause__, "message", None) or first_line(e)
                return self._error(400, f"malformed request body: {first_line(Exception(why))}")
            except web.HTTPRequestEntityTooLarge:  # chunked or compressed: its size showed only as it was read
                return self._error(413, f"request body over the limit of {self._body_cap:,} bytes")
            except asyncio.CancelledError:  # the client hung up while sending it
                self._m_requests.labels(self.deployment, "499").inc()
                raise
            finally:
                self._reading -= 1
            self._body_bytes += len(body) - size  # the reservation settles to the body's size, kept until the answer:
            size = len(body)                      # a request is sent again if its connection breaks
            headers = self._upstream_headers(request)
            while True:
                if not self._endpoints and self.autoscaler.clamp(1) < 1:  # held, it would wait out hold_timeout_s
                    return self._error(503, f"{self.deployment} runs no replicas: its maximum is 0",
                                       retry_after=5)  # the limits are followed every few seconds
                waiting = time.monotonic()
                try:
                    ep, held = await self._acquire(request, avoid, self.hold_timeout_s - held_total)
                except asyncio.CancelledError:   # the client hung up while held: its wait counts in the histogram
                    held_total += time.monotonic() - waiting
                    self._m_requests.labels(self.deployment, "499").inc()
                    raise
                held_total += held
                if ep is None:
                    if request.transport is None or request.transport.is_closing():
                        self._m_requests.labels(self.deployment, "499").inc()
                        return web.Response(status=499)
                    if self._not_serving is not None:
                        return self._error(503, f"{self.deployment} is not serving: {self._not_serving}",
                                           retry_after=1)
                    why = f"; {self._scale_error}" if self._scale_error else ""
                    return self._error(503, f"no replica of {self.deployment} was ready within "
                                            f"{self.hold_timeout_s:g}s{why}", retry_after=1)
                tried = time.monotonic()
                try:
                    return await self._forward(request, ep, body, headers)
                except _Retry as r:
                    if r.delivered:
                        deliveries += 1
                        self._m_retries.labels(self.deployment, "disconnect").inc()
                        if deliveries >= self.max_delivery_attempts:
                            return self._error(502, f"replica connection broke {deliveries} times before a "
                                                    f"response: {r.cause}")
                        log.warning("gateway %s: %s broke before responding (%s); re-sending",
                                    self.deployment, ep, r.cause)
                    else:
                        self._m_retries.labels(self.deployment, "connect").inc()
                        self._drop(ep)
                        held_total += time.monotonic() - tried  # a connect that timed out is time held too
                        if held_total >= self.hold_timeout_s:
                            return self._error(503, f"no replica of {self.deployment} could be reached within "
                                                    f"{self.hold_timeout_s:g}s: {first_line(r.cause)[:200]}",
                                               retry_after=1)
                    avoid.add(ep)
                finally:
                    self._release(ep)
        finally:
            self._conc_change(-1)
            self._body_bytes -= size
            if held_total > 0:
                self._m_hold.observe(held_total)   # once per request that had to wait, however it ended

    async def _forward(self, request: web.Request, ep: str, body: bytes, headers) -> web.StreamResponse:
        url = URL(ep.rstrip("/") + request.raw_path, encoded=True)
        try:
            async with asyncio.timeout(self.read_timeout_s):  # aiohttp's read timeout starts once the body is
                up = await self._session.request(  # sent: a replica that reads none of it would hold this forever
                    request.method, url, headers=headers, data=body if body else None, allow_redirects=False,
                    skip_auto_headers=("Content-Type", "User-Agent", "Accept-Encoding"))
        except asyncio.CancelledError:   # the client hung up before the replica answered
            self._m_requests.labels(self.deployment, "499").inc()
            raise
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
            raise _Retry(False, e) from e
        except TimeoutError:  # (aiohttp's ServerTimeoutError is one) it took the request and went quiet: not sent
            return self._error(504, f"replica {ep} sent nothing for {self.read_timeout_s:g}s")  # again, could be twice
        except (aiohttp.ClientConnectionError, aiohttp.ClientOSError) as e:
            raise _Retry(True, e) from e
        except aiohttp.ClientError as e:
            return self._error(502, f"bad response from replica: {e}")
        code = str(up.status)
        outcome = "499"      # unless it is answered in full: the client went away (or the handler was cancelled)
        try:
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            drop = set(HOP_BY_HOP)
            for h in up.headers.getall("Connection", []):
                drop |= {t.strip().lower() for t in h.split(",")}
            for k, v in up.headers.items():
                if k.lower() not in drop:
                    resp.headers.add(k, v)
            written = 0
            try:
                await resp.prepare(request)
                while True:
                    try:
                        chunk = await up.content.readany()
                    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                        log.warning("gateway %s: %s broke mid-response: %s", self.deployment, ep, e)
                        outcome = f"{code}-truncated"
                        if request.transport:
                            request.transport.close()     # the client must see a truncated response
                        raise ConnectionResetError(f"replica {ep} broke mid-response") from e
                    if not chunk:
                        break
                    written += len(chunk)
                    if up.content_length is not None and written >= up.content_length:
                        outcome = code   # the last bytes go to the client in this write
                    try:
                        async with asyncio.timeout(self.read_timeout_s):  # a client that stays connected and
                            await resp.write(chunk)  # reads nothing would hold its replica slot forever
                    except TimeoutError:
                        log.warning("gateway %s: a client took none of %s's answer for %gs: dropped",
                                    self.deployment, ep, self.read_timeout_s)
                        outcome = "499"
                        if request.transport:
                            request.transport.close()
                        raise ConnectionResetError("the client stopped reading") from None
                outcome = code
                await resp.write_eof()
            except (ConnectionError, aiohttp.ClientConnectionError):
                pass  # the client hung up (499), or the replica broke and the client's connection is closed:
            return resp  # either way nothing more is written to it (aiohttp writes nothing on a closing one)
        finally:
            self._m_requests.labels(self.deployment, outcome).inc()
            if outcome == code and up.content.at_eof():
                up.release()
            else:
                up.close()


# ------------------------------------------------------------------------------------------------ running

def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


@contextlib.asynccontextmanager
async def serving(gateway: Gateway, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve ``gateway`` on the running loop; yields its base URL (``port=0`` picks a free port)."""
    sock = _bind(host, port)  # first: a port in use then starts nothing that would need stopping
    # handler_cancellation: a request whose client hung up stops holding a replica slot and counting as demand
    runner = web.AppRunner(gateway.app(), access_log=None, shutdown_timeout=gateway.drain_s,
                           handler_cancellation=True)
    try:
        await runner.setup()
    except BaseException:
        sock.close()
        raise
    try:
        await web.SockSite(runner, sock).start()
        h, p = sock.getsockname()[:2]
        yield f"http://{'[' + h + ']' if ':' in h else h}:{p}"
    finally:
        await runner.cleanup()


async def run(gateway: Gateway, host: str = "0.0.0.0", port: int = 8080) -> None:
    """Serve ``gateway`` until cancelled."""
    async with serving(gateway, host, port) as url:
        log.info("gateway %s listening on %s", gateway.deployment, url)
        await asyncio.Event().wait()


class GatewayThread:
    """A gateway served on its own event loop thread (``Backends`` coroutines run on that loop)."""

    def __init__(self, gateway: Gateway, host: str = "127.0.0.1", port: int = 0, timeout: float = 30):
        self.gateway = gateway
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.url = ""
        self.thread = threading.Thread(target=self._main, args=(host, port), daemon=True,
                                       name=f"gateway-{gateway.deployment}")
        self.thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("gateway did not start")
        if self._error:
            raise self._error

    def _main(self, host: str, port: int) -> None:
        async def main():
            self._stop = asyncio.Event()
            try:
                async with serving(self.gateway, host, port) as url:
                    self.url = url
                    self._started.set()
                    await self._stop.wait()
            except BaseException as e:
                self._error = e
                self._started.set()
        self.loop.run_until_complete(main())
        self.loop.close()

    def call(self, coro, timeout: float = 30):
        """Run ``coro`` on the gateway's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, timeout: float | None = None) -> None:
        """Stop serving; waits up to ``timeout`` (default: the gateway's drain_s, and 10 s more)."""
        if self._stop and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(self.gateway.drain_s + 10 if timeout is None else timeout)

    def __enter__(self) -> "GatewayThread":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_in_thread(gateway: Gateway, host: str = "127.0.0.1", port: int = 0) -> GatewayThread:
    return GatewayThread(gateway, host, port)
