"""Gateway: real HTTP end to end.

A real aiohttp gateway proxies to real HTTP servers, each a separate Python process (so a replica can die by
SIGKILL, like a restored replica whose host goes away). They stand in for restored replicas; a fake
``Backends`` records scale signals and "starts" a replica after a delay when scaled from zero, which is the
pool's job in thaw.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import sys
import threading
import time
import urllib.request

import aiohttp
import pytest
from aiohttp import web

from thaw.runtime.gateway import (NOT_SERVING_RECHECK_S, Autoscaler, Backends, Gateway, NotServing, serving,
                                  start_in_thread)

pytestmark = pytest.mark.timeout(60)

REPLICA = r"""
import json, os, sys, time
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
name, delay = sys.argv[1], float(sys.argv[2])

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def handle_any(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        time.sleep(float(self.headers.get("X-Sleep", delay)))
        if self.headers.get("X-Die") == "before-response":
            os._exit(1)
        out = json.dumps({"replica": name, "method": self.command, "path": self.path, "body": body.decode(),
                          "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if self.headers.get("X-Die") == "mid-chunks":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"a\r\n" + out[:10] + b"\r\n")
            self.wfile.flush()
            os._exit(1)
        self.send_header("Content-Length", str(len(out)))
        self.send_header("Connection", "keep-alive")
        self.send_header("X-Replica", name)
        self.end_headers()
        if self.headers.get("X-Die") == "mid-body":
            self.wfile.write(out[:10])
            self.wfile.flush()
            os._exit(1)
        self.wfile.write(out)
    do_GET = do_POST = do_PUT = do_DELETE = handle_any

ThreadingHTTPServer.request_queue_size = 256   # the default backlog of 5 drops SYNs under a burst
srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
srv.daemon_threads = True
print(srv.server_address[1], flush=True)
srv.serve_forever()
"""


class Replica:
    """A fake model replica: an HTTP server in its own process."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, port: int):
        self.name, self.proc, self.url = name, proc, f"http://127.0.0.1:{port}"

    @classmethod
    async def start(cls, name: str, delay: float = 0.0) -> "Replica":
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", REPLICA, name, str(delay),
                                                    stdout=asyncio.subprocess.PIPE)
        port = int((await asyncio.wait_for(proc.stdout.readline(), 10)).strip())
        return cls(name, proc, port)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


class FakeBackends:
    """Records scale signals; with ``start_delay`` it starts a replica that long after a scale from zero."""

    def __init__(self, start_delay: float | None = None):
        self.urls: list[str] = []
        self.replicas: list[Replica] = []
        self.scales: list[tuple[float, int, str]] = []
        self.at_least: list[bool] = []  # of each scale signal
        self.start_delay = start_delay
        self._starting = False
        self._tasks: set[asyncio.Task] = set()
        self._n = 0

    async def endpoints(self) -> list[str]:
        return list(self.urls)

    async def scale(self, replicas: int, reason: str, at_least: bool = False) -> None:
        self.scales.append((time.monotonic(), replicas, reason))
        self.at_least.append(at_least)
        if self.start_delay is not None and replicas >= 1 and not self.urls and not self._starting:
            self._starting = True
            t = asyncio.ensure_future(self._start_later())
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _start_later(self) -> None:
        await asyncio.sleep(self.start_delay)
        await self.add(f"restored-{self._n}")
        self._starting = False

    async def add(self, name: str, delay: float = 0.0) -> Replica:
        self._n += 1
        r = await Replica.start(name, delay)
        self.replicas.append(r)
        self.urls.append(r.url)
        return r

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for r in self.replicas:
            await r.kill()


FAST = dict(tick_s=0.1, refresh_s=0.1, stable_window_s=2.0, panic_window_s=0.3, scale_to_zero_grace_s=1.0)


@contextlib.asynccontextmanager
async def stack(backends: FakeBackends, replicas: tuple[tuple[str, float], ...] = (), **kw):
    """Replicas running before the gateway starts, then the gateway and a client."""
    try:
        for name, delay in replicas:
            await backends.add(name, delay)
        gw = Gateway("demo", backends, **{**FAST, **kw})
        async with serving(gw) as url, aiohttp.ClientSession() as client:
            yield gw, url, client
    finally:
        await backends.close()


async def post(client: aiohttp.ClientSession, url: str, body: dict | None = None, **headers):
    async with client.post(url, json=body or {}, headers=headers) as r:
        return r.status, await r.text()


async def start_upload(url: str, length: int | None, sent: bytes = b""):
    """A slow client: it sends a POST's headers (``length`` None: chunked) and ``sent`` of its body, then waits."""
    host, port = url.split("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    writer.write(f"POST /embed HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n".encode() + sent)
    await writer.drain()
    return reader, writer


async def until(cond, timeout: float = 5.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not met in time"
        await asyncio.sleep(0.01)


async def settled_metrics(gw: Gateway, client: aiohttp.ClientSession, url: str) -> str:
    """/metrics once the gateway finished accounting for answered requests (a client may read the whole
    response a moment before the handler that wrote it returns)."""
    for _ in range(100):
        if gw.inflight_total == 0 and gw.queued == 0:
            break
        await asyncio.sleep(0.02)
    return await (await client.get(f"{url}/metrics")).text()


def metric(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return None


def test_backends_protocol():
    assert isinstance(FakeBackends(), Backends)


def test_held_at_zero_until_first_replica():
    async def main():
        backends = FakeBackends(start_delay=1.0)
        # a tick far away: the scale signal must come from the held request itself, not the autoscaler
        async with stack(backends, tick_s=5.0) as (gw, url, client):
            t0 = time.monotonic()
            task = asyncio.ensure_future(client.post(
                f"{url}/embed?a=1&b=x%20y", json={"text": "hi"},
                headers={"X-Custom": "yes", "Connection": "keep-alive, X-Hop", "X-Hop": "1", "Keep-Alive": "5",
                         "Proxy-Authorization": "Basic eDp5"}))
            await asyncio.sleep(0.3)
            assert [(n, r) for _, n, r in backends.scales] == [(1, "activate: request held with no ready replica")]
            assert backends.scales[0][0] - t0 < 0.2
            assert backends.at_least == [True]  # the pool may be restoring more: it must not stop them
            state = await (await client.get(f"{url}/-/gateway")).json()
            assert state["queued"] == 1 and state["ready"] == 0 and state["desired"] == 1
            async with await task as r:
                body = await r.json()
                assert r.status == 200 and r.headers["X-Replica"] == "restored-0"
            elapsed = time.monotonic() - t0
            assert 1.0 <= elapsed < 3.0
            assert body["replica"] == "restored-0" and body["method"] == "POST"
            assert body["path"] == "/embed?a=1&b=x%20y" and json.loads(body["body"]) == {"text": "hi"}
            assert body["headers"]["x-custom"] == "yes" and body["headers"]["x-forwarded-for"] == "127.0.0.1"
            assert not {"x-hop", "keep-alive", "proxy-authorization"} & set(body["headers"])   # hop-by-hop
            assert body["headers"]["x-forwarded-host"] == url.removeprefix("http://")
            metrics = await settled_metrics(gw, client, url)
            assert metric(metrics, "thaw_gateway_hold_seconds_count", deployment="demo") == 1
            assert 0.9 < metric(metrics, "thaw_gateway_hold_seconds_sum", deployment="demo") < elapsed
            assert metric(metrics, "thaw_gateway_requests_total", code="200") == 1
            assert metric(metrics, "thaw_gateway_scale_signals_total", kind="activate") == 1
            # the next request is not held
            t1 = time.monotonic()
            assert (await post(client, f"{url}/embed"))[0] == 200 and time.monotonic() - t1 < 0.5
    asyncio.run(main())


def test_a_scale_up_is_at_least_and_the_count_is_said_plainly_once_more_replicas_are_ready():
    """The gateway's scale-ups ask for "at least" N: the pool may be restoring more than it sees (`thaw scale
    NAME 3` just before a request arrives at zero). Once those are ready and its first window is over, its own
    count (1 here) is said plainly, once: the pool would otherwise keep 3 for as long as the count stays 1."""
    async def main():
        backends = FakeBackends()
        async with stack(backends, scale_to_zero_grace_s=30) as (gw, url, client):
            task = asyncio.ensure_future(post(client, url))
            await asyncio.sleep(0.3)
            for name in ("r0", "r1", "r2"):  # what `thaw scale NAME 3` was restoring
                await backends.add(name)
            assert (await task)[0] == 200
            assert [(n, a) for (_, n, _), a in zip(backends.scales, backends.at_least)] == [(1, True)]
            while time.monotonic() - gw.autoscaler.since < gw.autoscaler.stable_window_s + 1.0:
                await asyncio.sleep(0.1)
            assert [(n, a) for (_, n, _), a in zip(backends.scales, backends.at_least)] == [(1, True), (1, False)]
            assert backends.scales[1][0] - gw.autoscaler.since >= gw.autoscaler.stable_window_s - 0.2
            assert gw.state()["signaled_at_least"] is False
    asyncio.run(main())


def test_a_scale_up_with_replicas_ready_is_at_least_too():
    """Past its first window, with a replica ready: the burst's scale-ups still ask for "at least" (the pool may be
    restoring more, for a burst an operator saw coming); a plain count would stop those."""
    async def main():
        backends = FakeBackends()
        async with stack(backends, (("a", 0.5),), scale_to_zero_grace_s=30) as (gw, url, client):
            while gw.autoscaler.warming(time.monotonic()):
                await asyncio.sleep(0.1)
            assert backends.scales == []
            burst = [asyncio.ensure_future(post(client, url)) for _ in range(8)]
            while not backends.scales:
                await asyncio.sleep(0.05)
            assert backends.scales[0][1] > 1 and backends.at_least[0] is True, (backends.scales, backends.at_least)
            assert all(status == 200 for status, _ in await asyncio.gather(*burst))
    asyncio.run(main())


def test_a_held_request_asks_again_when_the_pool_was_scaled_down_behind_the_gateway():
    """The gateway asked for 1 replica; the pool was then scaled to 0 another way (`thaw scale NAME 0`, an
    undeploy and deploy), so none comes. Requests held with no replica send the scale signal again every
    resend_s instead of waiting out their hold (503) while the gateway believes 1 was asked for."""
    async def main():
        backends = FakeBackends()
        async with stack(backends, resend_s=0.5) as (gw, url, client):
            task = asyncio.ensure_future(post(client, url, {"i": 1}))
            for _ in range(200):  # two resends come about 0.5 s apart
                await asyncio.sleep(0.05)
                if len(backends.scales) >= 3:
                    break
            asked = [(n, r.split(":")[0]) for _, n, r in backends.scales]
            assert asked[0] == (1, "activate") and asked[1:3] == [(1, "resend")] * 2, asked
            t = [at for at, _, _ in backends.scales]
            assert t[2] - t[1] >= 0.4, t  # not sooner than resend_s
            await backends.add("late", delay=0.0)
            status, body = await task
            assert status == 200 and json.loads(body)["replica"] == "late"
            n = len(backends.scales)
            await asyncio.sleep(0.8)  # a replica serves: no more resends
            assert all(r.split(":")[0] != "resend" for _, _, r in backends.scales[n:]), backends.scales[n:]
    asyncio.run(main())


def test_replicas_gone_behind_the_gateway_are_asked_back_by_the_next_request_not_before():
    """Every replica went another way (`thaw scale NAME 0`, an undeploy) while the gateway still wants 1: with no
    traffic it says nothing (a scale to zero by hand stays), and the first request held then says the count again
    at once, not after resend_s (an undeploy is found then, not by a 503 after the hold)."""
    async def main():
        backends = FakeBackends(start_delay=0.2)
        async with stack(backends, (("a", 0.0),), resend_s=30, scale_to_zero_grace_s=30) as (gw, url, client):
            assert (await post(client, url))[0] == 200 and gw.autoscaler.desired == 1
            backends.urls.clear()  # scaled to zero behind the gateway's back
            await until(lambda: gw.state()["ready"] == 0)
            await asyncio.sleep(1.0)  # ticks
            assert backends.scales == [], backends.scales
            t0 = time.monotonic()
            status, body = await post(client, url)
            assert status == 200 and json.loads(body)["replica"].startswith("restored-"), body
            assert time.monotonic() - t0 < 5 and [(n, a) for (_, n, _), a in zip(backends.scales, backends.at_least)
                                                  ] == [(1, True)], backends.scales
    asyncio.run(main())


def test_the_gateway_follows_the_deployments_limits(tmp_path):
    """`thaw deploy NAME --max 4` while its gateway runs: the autoscaler may ask for 4 from then on (it read
    --min/--max once at start before, and never asked for more than the old --max)."""
    from test_registry import _snapshots
    from thaw.config import Config
    from thaw.registry import deployments
    from thaw.registry.models import Deployment
    from thaw.runtime.frontdoor import follow_limits

    cfg = Config(state_dir=tmp_path / "state")
    _snapshots(cfg.registry_url, "a" * 64)
    deployments.upsert(cfg.registry_url, Deployment(name="demo", snapshot_digest="a" * 64, max_replicas=1))

    async def main():
        gw = Gateway("demo", FakeBackends(), min_replicas=0, max_replicas=1)
        task = asyncio.ensure_future(follow_limits(cfg, gw, every_s=0.05))
        try:
            assert gw.autoscaler.clamp(3) == 1
            deployments.upsert(cfg.registry_url, Deployment(name="demo", snapshot_digest="a" * 64, min_replicas=1,
                                                            max_replicas=4))
            for _ in range(100):
                await asyncio.sleep(0.05)
                if gw.autoscaler.max_replicas == 4:
                    break
            assert (gw.autoscaler.min_replicas, gw.autoscaler.clamp(3), gw.autoscaler.clamp(0)) == (1, 3, 1)
        finally:
            task.cancel()
    asyncio.run(main())


def test_no_scale_to_zero_is_sent_while_a_request_is_in_flight():
    """The tick chose zero (idle past the grace); a request arrives before the signal goes out: the signal is
    not sent (the pool would stop the replica under the request), and the next tick decides again."""
    async def main():
        backends = FakeBackends()
        async with stack(backends, (("a", 0.0),), tick_s=60) as (gw, url, client):
            await gw.refresh()
            task = asyncio.ensure_future(post(client, url, **{"X-Sleep": "0.5"}))
            for _ in range(100):
                if gw.inflight_total:
                    break
                await asyncio.sleep(0.01)
            gw.autoscaler.desired = 0  # what the tick decided a moment before the request came
            await gw._sync_scale()
            assert [n for _, n, _ in backends.scales] == []
            assert (await task)[0] == 200
    asyncio.run(main())


def test_no_scale_to_zero_is_sent_while_a_request_is_uploading_its_body():
    """A request counts from its arrival, not once its body is read: while a slow client is still sending it, it
    is demand (and traffic for the grace), so a scale to zero chosen a moment before is not sent."""
    async def main():
        backends = FakeBackends()
        async with stack(backends, (("a", 0.0),), tick_s=60) as (gw, url, client):
            await gw.refresh()
            before = gw.autoscaler.last_active
            reader, writer = await start_upload(url, 100, b"x" * 10)
            await until(lambda: gw._reading == 1)
            assert gw.autoscaler.last_active > before
            gw.autoscaler.desired = 0  # what the tick decided a moment before the request came
            await gw._sync_scale()
            assert [n for _, n, _ in backends.scales] == []
            writer.write(b"x" * 90)
            await writer.drain()
            assert (await asyncio.wait_for(reader.readline(), 5)).split()[1] == b"200"
            writer.close()
            await until(lambda: gw._conc == 0 and gw._body_bytes == 0)
    asyncio.run(main())


def test_a_replica_that_reads_no_body_is_a_504_not_a_hang():
    """A wedged replica accepts connections and reads nothing: a body bigger than the socket buffers cannot be
    sent. The wait is bounded by read_timeout_s like a replica that says nothing (aiohttp's read timeout only
    starts once the body is sent)."""
    async def main():
        backends = FakeBackends()
        with socket.socket() as wedged:
            wedged.bind(("127.0.0.1", 0))
            wedged.listen(8)  # connections complete in the backlog; nobody accepts or reads them
            backends.urls.append(f"http://127.0.0.1:{wedged.getsockname()[1]}")
            async with stack(backends, read_timeout_s=1.0) as (gw, url, client):
                await gw.refresh()
                t0 = time.monotonic()
                async with client.post(url, data=b"x" * (48 << 20)) as r:
                    assert r.status == 504 and "sent nothing for 1s" in (await r.json())["error"]
                assert time.monotonic() - t0 < 10
    asyncio.run(asyncio.wait_for(main(), 60))


def test_bodies_in_flight_count_against_the_gateways_memory_bound():
    """Each request's body is kept until its answer (it is sent again if the connection breaks): the bytes of
    bodies held or in flight are bounded, not only the number of requests held."""
    async def main():
        backends = FakeBackends()
        async with stack(backends, (("a", 0.0),), max_body_memory=1000) as (gw, url, client):
            await gw.refresh()
            slow = asyncio.ensure_future(post(client, url, {"pad": "x" * 700}, **{"X-Sleep": "1.0"}))
            for _ in range(100):
                if gw.inflight_total:
                    break
                await asyncio.sleep(0.01)
            status, text = await post(client, url, {"pad": "y" * 400})
            assert status == 503 and "bytes of request bodies are already held or in flight" in text, text
            assert (await slow)[0] == 200
            assert (await post(client, url, {"pad": "y" * 400}))[0] == 200 and gw._body_bytes == 0
    asyncio.run(main())


def test_bodies_being_read_count_against_the_memory_bound():
    """A body is reserved before it is read (its Content-Length, or the most it may be when chunked): slow uploads
    are not all let in because none has finished yet, and a reservation is given back however its upload ends."""
    async def main():
        backends = FakeBackends()
        async with stack(backends, (("a", 0.0),), max_body_memory=1000) as (gw, url, client):
            await gw.refresh()
            uploads = [await start_upload(url, 400, b"x" * 10) for _ in range(2)]
            await until(lambda: gw._reading == 2)
            assert gw._body_bytes == 800
            for length in (400, None):   # one more with a length, or a chunked one (up to 1000 bytes): refused at once
                reader, writer = await start_upload(url, length)
                t0 = time.monotonic()
                status = (await asyncio.wait_for(reader.readline(), 2)).split()[1]
                writer.close()
                assert status == b"503" and time.monotonic() - t0 < 1.0, status
            (_, gone), (reader, writer) = uploads
            gone.close()   # this client hangs up mid-upload
            await until(lambda: gw._body_bytes == 400 and gw._reading == 1)
            writer.write(b"x" * 390)
            await writer.drain()
            assert (await asyncio.wait_for(reader.readline(), 5)).split()[1] == b"200"
            writer.close()
            await until(lambda: gw._body_bytes == 0 and gw._reading == 0 and gw._conc == 0)
            assert (await post(client, url, {"pad": "y" * 900}))[0] == 200
    asyncio.run(main())


def test_a_chunked_body_over_the_limit_is_a_counted_413_and_a_hang_up_mid_body_a_499():
    async def main():
        backends = FakeBackends()
        async with stack(backends, (("a", 0.0),), max_body_bytes=1000) as (gw, url, client):
            await gw.refresh()
            async def body():  # chunked: no length up front
                yield b"x" * 600
                yield b"y" * 600

            async with client.post(url, data=body()) as r:
                assert r.status == 413 and "over the limit of 1,000 bytes" in (await r.json())["error"]
            reader, writer = await start_upload(url, 400, b"x" * 10)
            await until(lambda: gw._reading == 1)
            writer.close()  # hangs up mid-body
            await until(lambda: gw._reading == 0)
            metrics = await settled_metrics(gw, client, url)
            assert metric(metrics, "thaw_gateway_requests_total", code="413") == 1
            assert metric(metrics, "thaw_gateway_requests_total", code="499") == 1
    asyncio.run(main())


def test_balances_by_inflight():
    async def main():
        backends = FakeBackends()
        async with stack(backends) as (gw, url, client):
            await backends.add("slow", delay=0.5)
            await backends.add("fast", delay=0.0)
            await gw.refresh()
            await asyncio.sleep(0.2)
            assert len(gw.endpoints) == 2
            # idle replicas: ties go round robin
            seen = [json.loads((await post(client, url, **{"X-Sleep": "0"}))[1])["replica"] for _ in range(6)]
            assert sorted(seen) == ["fast"] * 3 + ["slow"] * 3
            assert all(a != b for a, b in zip(seen, seen[1:]))

            counts = {"slow": 0, "fast": 0}

            async def worker():
                for _ in range(10):
                    status, text = await post(client, url)
                    assert status == 200
                    counts[json.loads(text)["replica"]] += 1

            await asyncio.gather(*(worker() for _ in range(4)))
            assert sum(counts.values()) == 40
            assert counts["fast"] >= 30, counts
    asyncio.run(main())


def test_gpu_seconds_busy_and_ready():
    """Each replica holds one GPU: ready replica-seconds are what the deployment is allocated, and replica-seconds
    with a request in flight are what it used (two overlapping requests on one replica count once)."""
    async def main():
        backends = FakeBackends()
        async with stack(backends, (("a", 0.0), ("b", 0.0))) as (gw, url, client):
            await gw.refresh()
            t0 = time.monotonic()
            await asyncio.gather(*(post(client, url, **{"X-Sleep": "0.6"}) for _ in range(2)))  # one on each
            await asyncio.gather(*(post(client, url, **{"X-Sleep": "0.5"}) for _ in range(3)))  # two share one
            await asyncio.sleep(0.6)  # idle but ready
            metrics = await settled_metrics(gw, client, url)
            elapsed = time.monotonic() - t0
            busy = metric(metrics, "thaw_gateway_gpu_seconds_busy_total", deployment="demo")
            ready = metric(metrics, "thaw_gateway_gpu_seconds_ready_total", deployment="demo")
            assert 2.2 <= busy < 2.6, busy  # 0.6 + 0.6, then 0.5 + 0.5 (not 0.5 + 1.0: the overlap counts once)
            assert 2 * (elapsed - 0.25) <= ready <= 2 * (elapsed + 1.0), (ready, elapsed)  # counted every tick
    asyncio.run(main())


def test_busy_seconds_grow_while_a_replica_is_never_idle():
    """A replica busy the whole time shows busy seconds as they pass (counted every tick), not only once it
    idles; the KEDA scaler reads the demand the last tick published."""
    async def main():
        backends = FakeBackends()
        async with stack(backends, (("a", 0.0),)) as (gw, url, client):
            await gw.refresh()
            slow = asyncio.ensure_future(post(client, url, **{"X-Sleep": "1.5"}))
            await asyncio.sleep(1.0)
            text = await (await client.get(f"{url}/metrics")).text()
            assert metric(text, "thaw_gateway_gpu_seconds_busy_total", deployment="demo") >= 0.7
            assert gw.demand == {"desired": 1, "queued": 0, "inflight": 1, "ready": 1}
            assert (await slow)[0] == 200
    asyncio.run(main())


def test_the_hold_queue_is_bounded():
    """Held requests each keep their body in memory: past max_queued, a request is answered 503 at once with
    Retry-After (and nothing is held for it)."""
    async def main():
        backends = FakeBackends()  # never starts anything
        async with stack(backends, hold_timeout_s=3, max_queued=2) as (gw, url, client):
            held = [asyncio.ensure_future(post(client, f"{url}/embed")) for _ in range(2)]
            for _ in range(100):
                if gw.queued == 2:
                    break
                await asyncio.sleep(0.02)
            t0 = time.monotonic()
            async with client.post(f"{url}/embed", json={}) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "1", r.status
                assert "2 requests are already held" in json.loads(await r.text())["error"]
            assert time.monotonic() - t0 < 0.5 and gw.queued == 2
            await backends.add("late")  # a replica comes: the held two are answered
            assert [s for s, _ in await asyncio.gather(*held)] == [200, 200]
    asyncio.run(main())


def test_a_wedged_replica_does_not_hold_a_slot_forever():
    """A replica that accepts a request and never answers: after read_timeout_s the caller gets a 504 (the
    request is not sent again: the replica may be doing the work), and the in-flight slot is given back."""
    async def main():
        backends = FakeBackends()
        async with stack(backends, (("wedged", 30.0),), read_timeout_s=0.5) as (gw, url, client):
            await gw.refresh()
            t0 = time.monotonic()
            status, body = await post(client, url)
            assert status == 504 and "sent nothing for 0.5s" in json.loads(body)["error"], body
            assert time.monotonic() - t0 < 5 and gw.inflight_total == 0
    asyncio.run(main())


def test_replica_dies_with_requests_in_flight_and_queued():
    """Two replicas at capacity, more requests queued; one is SIGKILLed: every request still gets a 200."""
    async def main():
        backends = FakeBackends()
        async with stack(backends, max_inflight_per_replica=2) as (gw, url, client):
            a = await backends.add("a", delay=1.0)
            await backends.add("b", delay=1.0)
            await gw.refresh()
            await asyncio.sleep(0.2)
            tasks = [asyncio.ensure_future(post(client, url, {"i": i})) for i in range(8)]
            # all 8 arrived (a fixed 0.3 s was too short on a loaded CI machine); the first answers come 1 s in
            await until(lambda: (gw.state()["inflight_total"], gw.state()["queued"]) == (4, 4))
            await a.kill()                      # the pool has not noticed yet: it still lists a
            await asyncio.sleep(0.5)
            backends.urls.remove(a.url)         # now it has; a replacement comes a little later
            await asyncio.sleep(0.5)
            await backends.add("c", delay=1.0)
            results = await asyncio.gather(*tasks)
            assert [s for s, _ in results] == [200] * 8
            served = [json.loads(t) for _, t in results]
            assert sorted(s["body"] for s in served) == sorted(json.dumps({"i": i}) for i in range(8))
            assert {s["replica"] for s in served} <= {"b", "c"}
            metrics = await settled_metrics(gw, client, url)
            assert metric(metrics, "thaw_gateway_upstream_retries_total", reason="disconnect") >= 2
            assert metric(metrics, "thaw_gateway_requests_total", code="200") == 8
    asyncio.run(main())


def test_only_replica_dies_requests_held_until_replacement():
    async def main():
        backends = FakeBackends()
        async with stack(backends, quarantine_s=30) as (gw, url, client):
            a = await backends.add("a", delay=1.0)
            await gw.refresh()
            await asyncio.sleep(0.2)
            tasks = [asyncio.ensure_future(post(client, url, {"i": i})) for i in range(5)]
            await until(lambda: gw.state()["inflight_total"] == 5)  # all on a, answered 1 s in
            await a.kill()                      # still listed by the pool for a while: the gateway drops it
            await asyncio.sleep(0.5)
            state = gw.state()
            assert state["ready"] == 0 and state["queued"] == 5 and state["quarantined"] == [a.url]
            more = [asyncio.ensure_future(post(client, url, {"i": i})) for i in range(5, 8)]
            await asyncio.sleep(0.3)
            assert gw.state()["queued"] == 8
            await backends.add("b", delay=0.1)
            results = await asyncio.gather(*tasks, *more)
            assert [s for s, _ in results] == [200] * 8
            assert {json.loads(t)["replica"] for _, t in results} == {"b"}
            metrics = await settled_metrics(gw, client, url)
            assert metric(metrics, "thaw_gateway_upstream_retries_total", reason="connect") >= 1
            assert metric(metrics, "thaw_gateway_hold_seconds_count") == 8
    asyncio.run(main())


def test_with_one_delivery_a_request_a_replica_may_have_seen_is_not_sent_again():
    """`thaw gateway --deliveries 1`, for APIs whose requests have side effects: the replica broke after the
    request reached it, so the client gets 502 and no other replica gets it."""
    async def main():
        backends = FakeBackends()
        async with stack(backends, (("a", 0.0), ("b", 0.0)), max_delivery_attempts=1) as (gw, url, client):
            status, text = await post(client, url, **{"X-Die": "before-response"})
            assert status == 502 and "broke 1 times" in json.loads(text)["error"], text
            await until(lambda: sum(r.proc.returncode is not None for r in backends.replicas) == 1)
            await asyncio.sleep(0.3)
            assert sum(r.proc.returncode is None for r in backends.replicas) == 1  # the other never got it
    asyncio.run(main())


def test_request_that_kills_replicas_is_not_retried_forever():
    """A connection broken before a response is re-sent (the replica may have died of something else), but a
    request that kills every replica it reaches gets 502 after max_delivery_attempts deliveries."""
    async def main():
        backends = FakeBackends()
        async with stack(backends, (("a", 0.0), ("b", 0.0), ("c", 0.0)), max_delivery_attempts=2) as (gw, url, client):
            status, text = await post(client, url, **{"X-Die": "before-response"})
            assert status == 502 and "broke 2 times" in json.loads(text)["error"]
            alive = lambda: sum(r.proc.returncode is None for r in backends.replicas)  # noqa: E731
            for _ in range(40):   # the exits are reaped asynchronously
                if alive() <= 1:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            assert alive() == 1                                    # one replica survives
            status, text = await post(client, url)
            assert status == 200
    asyncio.run(main())


def test_replica_dies_mid_body_is_not_retried(caplog):
    """The client sees a truncated response (with a length: short; chunked: no last chunk), the gateway logs
    one line, not aiohttp's traceback of an unhandled error."""
    async def main():
        backends = FakeBackends()
        async with stack(backends, (("a", 0.0), ("b", 0.0), ("c", 0.0))) as (gw, url, client):
            for how in ("mid-body", "mid-chunks"):
                with pytest.raises(aiohttp.ClientPayloadError):
                    async with client.post(url, json={}, headers={"X-Die": how}) as r:
                        assert r.status == 200
                        await r.read()
            metrics = await settled_metrics(gw, client, url)
            assert metric(metrics, "thaw_gateway_requests_total", code="200-truncated") == 2
            assert metric(metrics, "thaw_gateway_upstream_retries_total") is None
            assert (await post(client, url))[0] == 200
    asyncio.run(main())
    assert [r.getMessage() for r in caplog.records if "broke mid-response" in r.getMessage()], caplog.text
    assert not [r for r in caplog.records if r.exc_info], caplog.text


def test_streams_chunked_responses_as_they_come():
    """Token streaming: chunks reach the client as the replica writes them, not when it finishes."""
    async def main():
        async def stream(request):
            r = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await r.prepare(request)
            for i in range(3):
                await r.write(f"data: tok{i}\n\n".encode())
                await asyncio.sleep(0.3)
            await r.write_eof()
            return r

        upstream = web.Application()
        upstream.router.add_get("/stream", stream)
        runner = web.AppRunner(upstream)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        backends = FakeBackends()
        backends.urls.append(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}")
        try:
            async with stack(backends) as (gw, url, client):
                t0 = time.monotonic()
                async with client.get(f"{url}/stream") as r:
                    assert r.headers["Content-Type"] == "text/event-stream"
                    first = await r.content.readuntil(b"\n\n")
                    assert first == b"data: tok0\n\n" and time.monotonic() - t0 < 0.25
                    assert (await r.read()) == b"data: tok1\n\ndata: tok2\n\n"
                assert time.monotonic() - t0 >= 0.6
        finally:
            await runner.cleanup()
    asyncio.run(main())


def test_keda_scaler_reads_the_gateways_demand():
    """``thaw gateway --keda-port``'s pairing: KEDA's scaler over a live gateway (GatewayDemand) sees a request
    held at zero replicas as activity and counts it in its metric, then the replica that serves it."""
    import grpc

    from thaw.runtime.frontdoor import GatewayDemand
    from thaw.runtime.keda import externalscaler_pb2 as pb
    from thaw.runtime.keda import externalscaler_pb2_grpc as pb_grpc
    from thaw.runtime.keda import serve as keda_serve

    async def main():
        backends = FakeBackends(start_delay=1.5)
        async with stack(backends) as (gw, url, client):
            server, port = keda_serve(GatewayDemand(gw), interval=0.05, registry=gw.registry)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            stub = pb_grpc.ExternalScalerStub(channel)
            ref = pb.ScaledObjectRef(name="so", namespace="default", scalerMetadata={"deployment": "demo"})
            try:
                assert (await stub.IsActive(ref, timeout=5)).result is False
                held = asyncio.ensure_future(client.post(url, json={}))
                active, values = False, []
                for _ in range(20):  # well before the replica starts (1.5 s)
                    active = (await stub.IsActive(ref, timeout=5)).result
                    got = await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref), timeout=5)
                    values.append(got.metricValues[0].metricValue)
                    if active and values[-1] >= 1:
                        break
                    await asyncio.sleep(0.05)
                assert active and values[-1] >= 1 and not held.done(), values
                resp = await held
                assert resp.status == 200 and (await resp.json())["replica"] == "restored-0"
                assert (await stub.IsActive(ref, timeout=5)).result is True  # a replica is wanted now
                with pytest.raises(grpc.aio.AioRpcError) as unknown:
                    await stub.IsActive(pb.ScaledObjectRef(name="so", namespace="default",
                                                           scalerMetadata={"deployment": "other"}), timeout=5)
                assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
            finally:
                await channel.close()
                server.stop(None)
    asyncio.run(main())


def test_compressed_bodies_forwarded_headers_and_odd_targets():
    """The gateway's server decompresses a gzip request body: the replica gets it plain, without the
    Content-Encoding that would make it decompress again. X-Forwarded-Host/Proto are what the gateway saw, not
    what a client claims. A request target that is not a path (absolute form) is a 400, not a traceback."""
    import gzip

    import brotli
    import zstandard

    async def main():
        backends = FakeBackends()
        async with stack(backends, (("a", 0.0),)) as (gw, url, client):
            raw = json.dumps({"texts": ["hello"] * 50}).encode()
            async with client.post(url + "/embed", data=gzip.compress(raw),
                                   headers={"Content-Encoding": "gzip", "X-Forwarded-Host": "evil.example",
                                            "Content-Type": "application/json"}) as r:
                got = await r.json()
            assert r.status == 200 and got["body"] == raw.decode()
            assert "content-encoding" not in got["headers"]
            assert got["headers"]["x-forwarded-host"] == url.split("//", 1)[1]
            reader, writer = await asyncio.open_connection(*url.split("//", 1)[1].split(":"))
            writer.write(b"GET http://elsewhere.example/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            status = (await reader.readline()).split()[1]
            writer.close()
            assert status == b"400"
            # codings aiohttp leaves encoded: the replica would get the encoded bytes without the header saying so
            for codings in (["x-gzip"], ["compress"], ["gzip, gzip"], ["gzip", "identity"], ["gzip", ""]):
                headers = [("Content-Encoding", c) for c in codings]
                async with client.post(url + "/embed", data=gzip.compress(raw), headers=headers) as r:
                    assert r.status == 415 and "Content-Encoding" in (await r.json())["error"], codings
            encoded = {"GZIP": gzip.compress(raw), "br": brotli.compress(raw), "zstd": zstandard.compress(raw)}
            for coding in ("Identity", "", "GZIP", "br", "zstd"):  # "": no coding; aiohttp lowercases names
                body = encoded.get(coding, raw)
                async with client.post(url + "/embed", data=body, headers={"Content-Encoding": coding}) as r:
                    assert r.status == 200 and (await r.json())["body"] == raw.decode(), coding
            # a proxy chain's X-Forwarded-For lines are kept, in order, before the gateway's peer
            async with client.post(url + "/embed", data=raw, headers=[("X-Forwarded-For", "1.1.1.1"),
                                                                      ("X-Forwarded-For", "2.2.2.2")]) as r:
                assert (await r.json())["headers"]["x-forwarded-for"] == "1.1.1.1, 2.2.2.2, 127.0.0.1"
            assert len(backends.replicas) == 1 and gw.state()["inflight_total"] == 0
    asyncio.run(main())


def test_connects_that_time_out_count_against_the_hold_timeout():
    """A listed replica whose host stopped answering makes each connect wait out connect_timeout_s. Only the
    time held between tries was counted, so the request went round for minutes instead of hold_timeout_s."""
    import socket

    async def main():
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(0)  # never accepted: once its queue is full, connects hang (the SYN is dropped)
        port = lsock.getsockname()[1]
        fillers = []
        for _ in range(4):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.1", port))
            fillers.append(f)
        await asyncio.sleep(0.2)
        backends = FakeBackends()
        backends.urls.append(f"http://127.0.0.1:{port}")
        try:
            async with stack(backends, connect_timeout_s=0.3, hold_timeout_s=1.5, quarantine_s=0.05) as (
                    gw, url, client):
                t0 = time.monotonic()
                async with client.post(url, json={"i": 1}) as r:
                    status, text, retry = r.status, await r.text(), r.headers.get("Retry-After")
                took = time.monotonic() - t0
            assert status == 503 and "could be reached within 1.5s" in json.loads(text)["error"], text
            assert retry == "1"
            assert 1.4 < took < 3.0, took
        finally:
            for f in (*fillers, lsock):
                f.close()
    asyncio.run(main())


def test_a_deployment_whose_maximum_is_0_answers_at_once():
    async def main():
        async with stack(FakeBackends(), max_replicas=0, min_replicas=0, hold_timeout_s=30) as (gw, url, client):
            t0 = time.monotonic()
            async with client.post(url, json={"i": 1}) as r:
                status, text, retry = r.status, await r.text(), r.headers.get("Retry-After")
            assert status == 503 and "its maximum is 0" in json.loads(text)["error"] and retry == "5", text
            assert time.monotonic() - t0 < 2
    asyncio.run(main())


def test_the_sdks_snapshot_hooks_are_not_served_through_the_gateway():
    """/thaw/before-snapshot parks a replica's weights (it then failed every request while its health check
    passed) and /thaw/after-restore gives it env it takes as secrets: the replica's host calls them, not
    clients. However the path is written; a path that only starts with the letters goes through."""
    async def raw(url: str, target: str) -> tuple[int, bytes]:
        host, port = url.split("//", 1)[1].split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
                     .encode())
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    async def main():
        async with stack(FakeBackends(), (("a", 0.0),)) as (gw, url, client):
            await until(lambda: gw.state()["ready"] == 1, timeout=5)
            for target in ("/thaw/before-snapshot", "/thaw/after-restore", "//thaw/after-restore", "/thaw",
                           "/%74haw/after-restore", "/x/../thaw/before-snapshot", "/./thaw/ready?x=1"):
                status, body = await raw(url, target)
                assert status == 404 and b"is for the replica's host, not served through the gateway" in body, \
                    (target, status, body)
            for target in ("/thawed", "/embed", "/x/thaw/y"):
                status, body = await raw(url, target)
                assert status == 200 and json.loads(body)["path"] == target, (target, status, body)
    asyncio.run(main())


def test_a_registry_that_fails_the_endpoint_listing_is_logged_once_in_one_line(caplog):
    """The gateway lists replicas every refresh_s (here 0.1 s): a registry down was a warning each time, its
    SQLAlchemy text over two lines. Once per distinct error, once when it works again; the last list serves."""
    class Failing(FakeBackends):
        error: Exception | None = None

        async def endpoints(self):
            if self.error:
                raise self.error
            return await super().endpoints()

    async def main():
        backends = Failing()
        async with stack(backends, (("a", 0.0),)) as (gw, url, client):
            await until(lambda: gw.state()["ready"] == 1, timeout=5)
            backends.error = RuntimeError("(sqlite3.OperationalError) unable to open database file\n"
                                          "(Background on this error at: https://sqlalche.me/e/20/e3q8)")
            await asyncio.sleep(1.0)
            assert (await post(client, url, {"i": 1}))[0] == 200  # from the last list
            backends.error = None
            await asyncio.sleep(0.5)
    with caplog.at_level(logging.INFO, logger="thaw.gateway"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if "listing replicas" in r.getMessage()]
    assert lines == ["gateway demo: listing replicas failed (serving the last list): RuntimeError: "
                     "(sqlite3.OperationalError) unable to open database file",
                     "gateway demo: listing replicas works again"], lines


def test_client_gone_while_held_leaves_the_queue():
    async def main():
        backends = FakeBackends()
        async with stack(backends) as (gw, url, client):
            held = asyncio.ensure_future(client.post(url, json={}))
            for _ in range(40):
                if gw.state()["queued"] == 1:
                    break
                await asyncio.sleep(0.05)
            assert gw.state()["queued"] == 1, "the request is held at zero replicas"
            await asyncio.sleep(0.3)
            held.cancel()  # the client goes away
            with pytest.raises(asyncio.CancelledError):
                await held
            for _ in range(40):
                if gw.state()["queued"] == 0:
                    break
                await asyncio.sleep(0.05)
            assert gw.state()["queued"] == 0
            metrics = await settled_metrics(gw, client, url)  # its wait is in the histogram (it was left out)
            assert metric(metrics, "thaw_gateway_requests_total", code="499") == 1
            assert metric(metrics, "thaw_gateway_hold_seconds_count") == 1
            assert metric(metrics, "thaw_gateway_hold_seconds_sum") >= 0.3
    asyncio.run(main())


def test_a_client_that_hangs_up_frees_its_replica_slot():
    """A client gives up on a slow answer: its request is cancelled at once, so it neither holds the replica's
    slot (max_inflight_per_replica) nor counts as demand until the replica would have answered."""
    async def main():
        backends = FakeBackends()
        async with stack(backends, (("slow", 5.0),), max_inflight_per_replica=1) as (gw, url, client):
            await gw.refresh()
            with pytest.raises(asyncio.TimeoutError):
                await client.post(url, json={}, timeout=aiohttp.ClientTimeout(total=0.3))
            t0 = time.monotonic()
            while gw.inflight_total:
                assert time.monotonic() - t0 < 1.5, "the slot stays taken while the replica works"
                await asyncio.sleep(0.05)
            metrics = await settled_metrics(gw, client, url)
            assert metric(metrics, "thaw_gateway_requests_total", code="499") == 1
    asyncio.run(main())


def test_a_client_that_stops_reading_its_answer_frees_its_replica_slot():
    """A client that stays connected but takes none of a large answer: after read_timeout_s it is dropped,
    and neither holds the replica's slot nor counts as demand (the deployment could never scale to zero)."""
    async def main():
        backends = FakeBackends()
        async with stack(backends, (("a", 0.0),), read_timeout_s=1.0) as (gw, url, client):
            await gw.refresh()
            host, port = url.split("//", 1)[1].split(":")
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, int(port)))
            reader, writer = await asyncio.open_connection(sock=sock)
            body = b"x" * (16 << 20)  # echoed back: far more than the sockets' buffers hold
            writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
            await until(lambda: gw.inflight_total == 1, timeout=10)  # its answer is on its way
            await until(lambda: gw.inflight_total == 0, timeout=10)  # and given up on: the slot is free
            writer.close()
            metrics = await settled_metrics(gw, client, url)
            assert metric(metrics, "thaw_gateway_requests_total", code="499") == 1
            assert (await post(client, url, {"after": 1}))[0] == 200  # the replica serves the next one
    asyncio.run(main())


def test_a_stalled_or_malformed_body_is_answered_not_held():
    """A client that sends headers and then not the body it announced gets 408 after body_timeout_s (it would
    hold one of max_queued's places forever); a body that cannot be decoded (bad gzip) gets 400, not 500."""
    async def main():
        backends = FakeBackends()
        async with stack(backends, (("a", 0.0),), body_timeout_s=0.5) as (gw, url, client):
            host, port = url.split("//", 1)[1].split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
            await writer.drain()
            t0 = time.monotonic()
            status = (await asyncio.wait_for(reader.readline(), 5)).split()[1]
            writer.close()
            assert status == b"408" and time.monotonic() - t0 < 2.0
            assert gw.state()["queued"] == 0 and gw._reading == 0
            async with client.post(f"{url}/embed", data=b"not gzip at all",
                                   headers={"Content-Encoding": "gzip"}) as r:
                assert r.status == 400 and (await r.json())["error"] == (
                    "malformed request body: Can not decode content-encoding: gzip")
    asyncio.run(main())


def test_a_gateway_started_before_its_replicas_are_ready_scales_them_down_when_idle():
    """At its start the gateway saw no ready replica (they were still restoring, or the registry did not
    answer): it does not know what the pool runs, so after a stable window without traffic it says 0 once,
    and never scales down before that window has passed."""
    async def main():
        backends = FakeBackends()
        async with stack(backends, scale_to_zero_grace_s=0.5) as (gw, url, client):
            t0 = time.monotonic()
            await backends.add("restored-late")
            while not backends.scales:
                assert time.monotonic() - t0 < 5, "the idle replica is never scaled down"
                await asyncio.sleep(0.05)
            assert [n for _, n, _ in backends.scales] == [0]
            assert backends.scales[0][0] - t0 >= gw.autoscaler.stable_window_s - 0.3
    asyncio.run(main())


def test_ticks_go_on_while_a_scale_signal_hangs():
    """Temporal slow or down: the scale signal waits, but the autoscaler keeps sampling and publishing its numbers
    (what KEDA reads) every tick, and a signal goes out once Temporal answers."""
    async def main():
        backends = FakeBackends()
        answer = asyncio.Event()
        scale = backends.scale

        async def slow_scale(replicas, reason, at_least=False):
            await answer.wait()
            await scale(replicas, reason, at_least)

        backends.scale = slow_scale
        async with stack(backends, hold_timeout_s=5) as (gw, url, client):
            decisions = []
            decide = gw.autoscaler.decide
            gw.autoscaler.decide = lambda *a: decisions.append(1) or decide(*a)
            held = asyncio.ensure_future(post(client, url))   # held at zero: the activation's signal hangs
            await asyncio.sleep(1.0)
            assert len(decisions) >= 5, f"{len(decisions)} ticks in 1 s at tick_s 0.1"
            assert gw.demand["queued"] == 1 and gw.demand["desired"] == 1
            answer.set()
            for _ in range(50):
                if backends.scales:
                    break
                await asyncio.sleep(0.05)
            assert [n for _, n, _ in backends.scales] == [1]
            held.cancel()
    asyncio.run(main())


def test_panic_then_stable_then_zero():
    async def main():
        backends = FakeBackends()
        grace = 3.0
        async with stack(backends, (("a", 1.0),), scale_to_zero_grace_s=grace) as (gw, url, client):
            await asyncio.sleep(0.3)
            assert gw.state()["desired"] == 1 and backends.scales == []   # adopts what runs, no signal
            t0 = time.monotonic()
            burst = [asyncio.ensure_future(post(client, url)) for _ in range(8)]
            await asyncio.sleep(0.45)
            assert backends.scales, "no scale signal within a few ticks of the burst"
            first_t, first_n, first_reason = backends.scales[0]
            assert first_n >= 3 and first_reason.startswith("panic") and first_t - t0 < 0.45
            assert gw.state()["panic"] is True
            assert all(s == 200 for s, _ in await asyncio.gather(*burst))
            t_end = time.monotonic()
            top = max(n for _, n, _ in backends.scales)
            assert top == 8

            # wait for scale to zero (panic lasts a stable window past the burst, then grace)
            while not backends.scales or backends.scales[-1][1] != 0:
                assert time.monotonic() - t_end < 8
                await asyncio.sleep(0.1)
            ns = [n for _, n, _ in backends.scales]
            ups = ns[:ns.index(top) + 1]
            assert ups == sorted(ups)                               # only up while panicking
            downs = [(t, n) for t, n, _ in backends.scales[ns.index(top) + 1:]]
            assert downs[0][0] - t_end >= gw.autoscaler.stable_window_s - 0.3  # none while panicking
            assert not any(r.startswith("panic") for _, n, r in backends.scales[ns.index(top) + 1:])
            assert [n for _, n in downs] == [1, 0]                  # 1 until the grace passed, then 0
            # the burst came in the gateway's first stable window: its scale-ups were "at least" (replicas it
            # could not see yet must not stop); the downs, after it, are plain
            assert backends.at_least == [True] * (len(backends.scales) - 2) + [False, False], backends.at_least
            assert downs[1][0] - t_end >= grace - 0.2
            metrics = await settled_metrics(gw, client, url)
            assert metric(metrics, "thaw_gateway_scale_signals_total", kind="zero") == 1
            assert metric(metrics, "thaw_gateway_desired_replicas") == 0
    asyncio.run(main())


@pytest.mark.parametrize("drain_s", [5.0, 0.5])
def test_a_stopping_gateway_gives_the_requests_under_way_drain_s(drain_s):
    """When the gateway stops (SIGTERM: the end of ``serving``), it takes no new connections, and a request under
    way gets ``drain_s`` to end: with 5 s its 1.5 s answer arrives whole, with 0.5 s it is cut off (as it was
    after 1 s before ``drain_s`` existed)."""
    async def go():
        backends = FakeBackends()
        await backends.add("r0")
        try:
            gw = Gateway("demo", backends, **FAST, drain_s=drain_s)
            async with aiohttp.ClientSession() as client:
                served = serving(gw)
                url = await served.__aenter__()
                call = asyncio.ensure_future(post(client, url + "/embed", **{"X-Sleep": "1.5"}))
                await until(lambda: gw.inflight_total == 1)
                stopping = asyncio.ensure_future(served.__aexit__(None, None, None))
                await asyncio.sleep(0.2)
                with pytest.raises(aiohttp.ClientConnectionError):  # a new connection: refused
                    async with aiohttp.ClientSession() as other:
                        await post(other, url + "/embed")
                if drain_s > 1.5:
                    status, text = await call
                    assert status == 200 and json.loads(text)["replica"] == "r0"
                else:
                    with pytest.raises(aiohttp.ClientError):
                        await call
                await stopping
        finally:
            await backends.close()

    asyncio.run(go())


def test_hold_timeout_is_503_json():
    async def main():
        backends = FakeBackends()   # never starts anything
        async with stack(backends, hold_timeout_s=0.5) as (gw, url, client):
            t0 = time.monotonic()
            async with client.post(f"{url}/embed", json={}) as r:
                text = await r.text()
                assert r.status == 503 and r.content_type == "application/json"
            assert 0.5 <= time.monotonic() - t0 < 1.5
            assert text.endswith("\n") and text.count("\n") == 1
            err = json.loads(text)
            assert "demo" in err["error"] and "0.5s" in err["error"]
            assert [n for _, n, _ in backends.scales][:1] == [1]
            assert gw.state()["queued"] == 0
            metrics = await settled_metrics(gw, client, url)
            assert metric(metrics, "thaw_gateway_requests_total", code="503") == 1
            assert metric(metrics, "thaw_gateway_hold_seconds_count") == 1
    asyncio.run(main())


def test_hold_timeout_names_why_no_replica_came():
    """scale() keeps failing (Temporal down, say): the 503 after the hold says why, in one line, not only that
    no replica came."""
    async def main():
        backends = FakeBackends()

        async def broken_scale(replicas, reason, at_least=False):
            raise RuntimeError("deployment demo is not deployed\n  (more detail)")

        backends.scale = broken_scale
        async with stack(backends, hold_timeout_s=0.5) as (gw, url, client):
            async with client.post(f"{url}/embed", json={}) as r:
                text = await r.text()
                assert r.status == 503 and r.headers["Retry-After"] == "1", r.status
            err = json.loads(text)["error"]
            assert "within 0.5s" in err and "scale to 1 failed: RuntimeError: deployment demo is not deployed" in err
            assert "more detail" not in err and text.count("\n") == 1
    asyncio.run(main())


def test_an_undeployed_deployments_requests_are_answered_at_once_until_it_is_deployed_again(caplog):
    """scale() says the deployment cannot have replicas (NotServing: undeployed): the requests held are answered
    503 at once, not after hold_timeout_s, and so are the next ones, with one more scale signal at most every
    NOT_SERVING_RECHECK_S (not one per request or per tick). Once a scale goes through again (deployed anew),
    a request is held and served as at any scale from zero."""
    async def main():
        backends = FakeBackends(start_delay=0.2)
        accept = backends.scale
        said_no = []

        async def undeployed(replicas, reason, at_least=False):
            said_no.append(time.monotonic())
            await asyncio.sleep(0.3)  # the held request waits for this answer, no longer
            raise NotServing("deployment 'demo' has no running pool (workflow execution already completed)")

        backends.scale = undeployed
        async with stack(backends, hold_timeout_s=30, resend_s=30) as (gw, url, client):
            t0 = time.monotonic()
            first = [asyncio.ensure_future(post(client, url, {"i": i})) for i in range(3)]
            answers = await asyncio.gather(*first)
            assert time.monotonic() - t0 < 2, "answered when the pool said so, not after the 30 s hold"
            for status, text in answers:
                assert status == 503 and json.loads(text)["error"] == (
                    "demo is not serving: deployment 'demo' has no running pool (workflow execution already "
                    "completed)"), text
            assert len(said_no) == 1 and gw.state()["queued"] == 0
            assert gw.state()["not_serving"].startswith("deployment 'demo' has no running pool")
            for _ in range(20):  # within NOT_SERVING_RECHECK_S of that answer: answered at once, nobody asked again
                t = time.monotonic()
                assert (await post(client, url, {}))[0] == 503 and time.monotonic() - t < 0.2
            assert len(said_no) == 1 and len(backends.scales) == 0
            await asyncio.sleep(NOT_SERVING_RECHECK_S)
            backends.scale = accept  # deployed again: the next request's signal goes through
            status, text = await post(client, url, {"i": "again"})
            assert status == 200 and json.loads(text)["replica"].startswith("restored-"), text
            assert len(backends.scales) == 1, backends.scales  # the request's own signal (none from the ticks)
            assert gw.state()["not_serving"] is None
        warned = [m for r in caplog.records if "failed: NotServing" in (m := r.getMessage())]
        assert len(warned) == 1, warned  # logged once, not at every signal that said the same
    asyncio.run(main())


def test_metrics_and_state_in_thread():
    """start_in_thread() serves on its own loop; a plain blocking client reads /metrics and /-/gateway."""
    lt_loop = asyncio.new_event_loop()
    threading.Thread(target=lt_loop.run_forever, daemon=True).start()
    backends = FakeBackends()
    replica = asyncio.run_coroutine_threadsafe(backends.add("a"), lt_loop).result(20)
    gw = Gateway("demo", backends, **FAST)
    try:
        with start_in_thread(gw) as srv:
            def get(path):
                with urllib.request.urlopen(srv.url + path, timeout=10) as r:
                    return r.status, r.headers.get("Content-Type"), r.read().decode()

            statuses = []

            def slow():
                req = urllib.request.Request(srv.url + "/x", data=b"{}", headers={"X-Sleep": "1.0"})
                with urllib.request.urlopen(req, timeout=10) as r:
                    statuses.append(r.status)

            t = threading.Thread(target=slow)
            t.start()
            for _ in range(50):
                status, ctype, text = get("/-/gateway")
                if json.loads(text)["inflight_total"]:
                    break
                time.sleep(0.05)
            state = json.loads(text)
            assert status == 200 and ctype.startswith("application/json")
            assert state["inflight"] == {replica.url: 1} and state["queued"] == 0 and state["ready"] == 1
            for key in ("desired", "panic", "stable_avg", "panic_avg", "endpoints", "signaled"):
                assert key in state
            status, ctype, text = get("/metrics")
            assert status == 200 and ctype.startswith("text/plain")
            assert metric(text, "thaw_gateway_inflight", deployment="demo") == 1
            assert metric(text, "thaw_gateway_queue_depth", deployment="demo") == 0
            assert metric(text, "thaw_gateway_replicas", deployment="demo") == 1
            for name in ("thaw_gateway_requests_total", "thaw_gateway_hold_seconds",
                         "thaw_gateway_scale_signals_total"):
                assert f"# TYPE {name.removesuffix('_total')} " in text or f"# TYPE {name} " in text
            t.join(10)
            assert statuses == [200]
            for _ in range(50):
                status, _, text = get("/metrics")
                if metric(text, "thaw_gateway_inflight") == 0:
                    break
                time.sleep(0.05)
            assert metric(text, "thaw_gateway_requests_total", code="200") == 1
            assert metric(text, "thaw_gateway_inflight") == 0
            # any other path, method included, is proxied
            assert json.loads(get("/v1/models?x=1")[2]) | {"headers": None} == {
                "replica": "a", "method": "GET", "path": "/v1/models?x=1", "body": "", "headers": None}
    finally:
        asyncio.run_coroutine_threadsafe(backends.close(), lt_loop).result(20)
        lt_loop.call_soon_threadsafe(lt_loop.stop)


# --------------------------------------------------------------------------- autoscaler decisions (no I/O)

def run_ticks(a: Autoscaler, t: float, until: float, conc: float, ready: int, step: float = 0.5):
    out = []
    while t < until - 1e-9:
        t += step
        out.append((t, a.decide(t, conc, ready)))
    return t, out


def test_autoscaler_stable_panic_and_zero():
    a = Autoscaler(target_concurrency=2, stable_window_s=10, panic_window_s=1, panic_threshold=2,
                   scale_to_zero_grace_s=20, desired=1, last_active=0)
    t, out = run_ticks(a, 0, 5, conc=3, ready=1)          # 3 / (1 * 2) < 2: no panic, desired ceil(3/2)
    assert all(not d.panicking for _, d in out) and out[-1][1].desired == 2
    t, out = run_ticks(a, t, 6, conc=20, ready=2)         # 20 / (2 * 2) >= 2: panic on the next tick
    assert out[0][1].panicking and out[0][1].kind == "panic" and out[0][1].desired == 6   # ceil(11.5 / 2)
    assert out[1][1].desired == 10                        # the panic window is all burst now
    t, out = run_ticks(a, t, 16, conc=0, ready=10)        # traffic gone: never down while panicking
    assert all(d.desired == 10 for _, d in out if d.panicking)
    assert not out[-1][1].panicking and out[-1][1].desired < 10
    t, out = run_ticks(a, t, 30, conc=0, ready=1)
    zero_at = next(tt for tt, d in out if d.desired == 0)
    assert zero_at >= 6 + 20 and all(d.desired == 1 for tt, d in out if 16 < tt < zero_at)   # grace from last traffic


def test_autoscaler_scales_nothing_down_in_its_first_stable_window():
    """A restarted gateway adopts 3 replicas: half a second of idle samples must not take them to 1."""
    a = Autoscaler(target_concurrency=1, stable_window_s=10, panic_window_s=1, scale_to_zero_grace_s=5,
                   desired=3, last_active=0, since=0)
    t, out = run_ticks(a, 0, 9.5, conc=0, ready=3)
    assert all(d.desired == 3 and d.kind == "warm-up" for _, d in out)
    _, out = run_ticks(a, t, 10, conc=0, ready=3)
    assert out[-1][1].desired == 0 and out[-1][1].kind == "zero"
    up = Autoscaler(target_concurrency=1, stable_window_s=10, panic_window_s=1, desired=1, since=0)
    assert up.decide(0.5, 4, 1).desired == 4    # scaling up is not held back


def test_autoscaler_clamps():
    a = Autoscaler(target_concurrency=1, stable_window_s=4, panic_window_s=1, min_replicas=1, max_replicas=3,
                   scale_to_zero_grace_s=0)
    _, out = run_ticks(a, 0, 2, conc=50, ready=1)
    assert out[-1][1].desired == 3
    _, out = run_ticks(a, 2, 40, conc=0, ready=3)
    assert out[-1][1].desired == 1


def test_thaw_gateway_passes_deliveries_to_the_gateway(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from thaw.cli import cli
    from thaw.config import Config
    from thaw.runtime import frontdoor

    got = {}

    async def run(cfg, name, port, keda_port, bind, **options):
        got.update(options, name=name)

    monkeypatch.setattr(frontdoor, "run", run)
    cfg = Config(state_dir=tmp_path)
    res = CliRunner().invoke(cli, ["gateway", "web", "--deliveries", "1"], obj=cfg)
    assert res.exit_code == 0 and got["name"] == "web" and got["max_delivery_attempts"] == 1, (res.output, got)
    res = CliRunner().invoke(cli, ["gateway", "web", "--deliveries", "0"], obj=cfg)
    assert res.exit_code == 2 and "--deliveries" in res.output
