"""Prometheus metrics of a host agent (prometheus_client's default registry; one agent per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RESTORES = Counter("thaw_restores_total", "Replica starts by outcome (restored, cold-boot)", ["outcome"])
FALLBACKS = Counter("thaw_fallbacks_total", "Replica starts that fell back to a cold boot")
STAGE = Histogram("thaw_restore_stage_seconds", "Duration of each replica start stage", ["outcome", "stage"],
                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
REPLICAS_ENDED = Counter("thaw_replicas_ended_total", "Serving replicas that ended on their own: their process "
                         "died, or their health checks failed (unhealthy)", ["reason"])
REPLICAS = Gauge("thaw_agent_replicas", "Replicas this agent serves")
PINNED = Gauge("thaw_pinned_bytes", "Snapshot memory pages this agent keeps locked in RAM for restores")
# one replica holds one accelerator; the busy share is counted where requests are seen: each deployment's gateway
GPU_REPLICAS = Gauge("thaw_gpu_replicas", "Replicas (and snapshot launches) on each of this host's GPUs, numbered "
                     "in the order of the host's gpu_uuids fact", ["gpu"])
GPU_SECONDS_ALLOCATED = Counter("thaw_gpu_seconds_allocated_total", "GPU-seconds held by this host's replicas")


def observe_restore(outcome: str, timings_ms: dict[str, int]) -> None:
    RESTORES.labels(outcome).inc()
    if outcome != "restored":
        FALLBACKS.inc()
    from thaw.snapshot.host import COUNTS

    for stage, ms in timings_ms.items():
        if not stage.endswith(COUNTS):  # prefetch_chunks, prefetch_kb: counts, not durations
            STAGE.labels(outcome, stage).observe(ms / 1000)


def serve(port: int | None, host: str = "127.0.0.1") -> int | None:
    """Expose /metrics on ``port`` (0: any free port); returns the port, or None when off."""
    if port is None:
        return None
    server, _ = start_http_server(port, addr=host)
    return server.server_port
