"""KEDA external scaler: lets a Kubernetes ScaledObject scale a deployment on thaw's demand, unchanged KEDA.

Point a ScaledObject trigger of type ``external`` (or ``external-push``) at :func:`serve`'s address::

    triggers:
      - type: external-push
        metadata:
          scalerAddress: thaw-keda.thaw.svc:9090
          deployment: minilm          # thaw deployment; defaults to the ScaledObject's name
          targetConcurrency: "4"      # queued + in-flight requests one replica should take (default 1)

- ``IsActive``: the deployment wants replicas (queued + in-flight > 0, or desired replicas > 0).
- ``GetMetricSpec``: one metric, ``thaw-<deployment>-concurrency``, target ``targetConcurrency``.
- ``GetMetrics``: queued + in-flight requests, so the HPA asks for ceil(value / target) replicas.
- ``StreamIsActive``: the activity now, then a new message each time it flips (polled every ``interval``
  seconds) until KEDA cancels the stream.
- ``StreamMetricSpec`` (an optional RPC of newer KEDA) is left UNIMPLEMENTED: the target comes from the
  ScaledObject's own metadata and never changes under a stream, and KEDA falls back to ``GetMetricSpec``.

An unknown deployment answers gRPC NOT_FOUND; a bad ``targetConcurrency`` answers INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Iterator, Protocol

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter

from . import externalscaler_pb2 as pb
from . import externalscaler_pb2_grpc as pb_grpc

def _requests(registry: CollectorRegistry) -> Counter:
    return Counter("thaw_keda_requests_total", "KEDA external scaler RPCs received", ["method"], registry=registry)


REQUESTS = _requests(REGISTRY)  # the default registry's


def requests_counter(registry: CollectorRegistry | None) -> Counter:
    """The RPC counter in ``registry`` (the gateway's, so its /metrics shows it), or the default one."""
    return REQUESTS if registry is None else _requests(registry)


@dataclass(frozen=True)
class Demand:
    """What one deployment wants right now."""

    desired_replicas: int
    queued: int
    inflight: int
    ready_replicas: int

    @property
    def concurrency(self) -> int:
        """Requests waiting or being served: the value KEDA scales on."""
        return self.queued + self.inflight

    @property
    def active(self) -> bool:
        return self.concurrency > 0 or self.desired_replicas > 0


class UnknownDeployment(KeyError):
    """A DemandSource may raise this (or any KeyError) for a deployment it does not know."""


class DemandSource(Protocol):
    def demand(self, deployment: str) -> Demand:
        """The deployment's current demand; raises KeyError when there is no such deployment.

        Called from the gRPC server's worker threads, concurrently: it must be thread-safe and quick."""
        ...


def metric_name(deployment: str) -> str:
    return f"thaw-{deployment}-concurrency"


class ExternalScaler(pb_grpc.ExternalScalerServicer):
    """The ``externalscaler.ExternalScaler`` service over a :class:`DemandSource`."""

    def __init__(self, source: DemandSource, interval: float = 1.0, requests: Counter = REQUESTS):
        self.source = source
        self.interval = interval
        self.requests = requests

    # -- helpers ---------------------------------------------------------------------------------------

    @staticmethod
    def _deployment(ref: pb.ScaledObjectRef, context: grpc.ServicerContext) -> str:
        name = ref.scalerMetadata.get("deployment") or ref.name
        if not name:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "no deployment: set scalerMetadata.deployment or the ScaledObject name")
        return name

    def _demand(self, deployment: str, context: grpc.ServicerContext) -> Demand:
        try:
            return self.source.demand(deployment)
        except KeyError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"thaw has no deployment {deployment!r}")

    @staticmethod
    def _target(ref: pb.ScaledObjectRef, context: grpc.ServicerContext) -> float:
        raw = ref.scalerMetadata.get("targetConcurrency", "1")
        try:
            target = float(raw)
        except ValueError:
            target = math.nan
        if not 0.001 <= target < 2 ** 63 / 1000:  # also NaN and infinity: KEDA keeps it in int64 thousandths
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"targetConcurrency must be a number from 0.001 to below 2^63/1000, got {raw!r}")
        return target

    # -- RPCs ------------------------------------------------------------------------------------------

    def IsActive(self, request: pb.ScaledObjectRef, context: grpc.ServicerContext) -> pb.IsActiveResponse:
        self.requests.labels("IsActive").inc()
        demand = self._demand(self._deployment(request, context), context)
        return pb.IsActiveResponse(result=demand.active)

    def StreamIsActive(self, request: pb.ScaledObjectRef,
                       context: grpc.ServicerContext) -> Iterator[pb.IsActiveResponse]:
        self.requests.labels("StreamIsActive").inc()
        deployment = self._deployment(request, context)
        done = threading.Event()
        context.add_callback(done.set)  # runs when the RPC ends, including a client cancel
        last: bool | None = None
        while context.is_active() and not done.is_set():
            active = self._demand(deployment, context).active
            if active != last:
                last = active
                yield pb.IsActiveResponse(result=active)
            done.wait(self.interval)

    def GetMetricSpec(self, request: pb.ScaledObjectRef,
                      context: grpc.ServicerContext) -> pb.GetMetricSpecResponse:
        self.requests.labels("GetMetricSpec").inc()
        deployment = self._deployment(request, context)
        target = self._target(request, context)
        self._demand(deployment, context)  # NOT_FOUND for an unknown deployment
        spec = pb.MetricSpec(metricName=metric_name(deployment), targetSize=max(1, math.ceil(target)),
                             targetSizeFloat=target)
        return pb.GetMetricSpecResponse(metricSpecs=[spec])

    def GetMetrics(self, request: pb.GetMetricsRequest, context: grpc.ServicerContext) -> pb.GetMetricsResponse:
        self.requests.labels("GetMetrics").inc()
        deployment = self._deployment(request.scaledObjectRef, context)
        name = metric_name(deployment)
        if request.metricName and request.metricName.lower() != name.lower():  # KEDA may ask in lower case
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown metric {request.metricName!r}, serving {name!r}")
        value = self._demand(deployment, context).concurrency
        return pb.GetMetricsResponse(metricValues=[pb.MetricValue(
            metricName=request.metricName or name, metricValue=value, metricValueFloat=float(value))])


def serve(source: DemandSource, address: str = "127.0.0.1:0", *, interval: float = 1.0,
          max_workers: int = 32, registry: CollectorRegistry | None = None) -> tuple[grpc.Server, int]:
    """Start the scaler on ``address`` (port 0: any free port); returns the started server and its port.

    Each open StreamIsActive holds one of the ``max_workers`` threads (one per ScaledObject using
    ``external-push``), so size it above the number of ScaledObjects. A call past ``max_workers`` is refused
    (RESOURCE_EXHAUSTED) rather than queued behind the streams; keepalive pings end the stream of a client that
    vanished without closing its connection (a KEDA pod on a dead node). Stop with ``server.stop(grace)``.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="thaw-keda"),
                         maximum_concurrent_rpcs=max_workers,
                         options=[("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000)])
    pb_grpc.add_ExternalScalerServicer_to_server(
        ExternalScaler(source, interval, requests_counter(registry)), server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:  # newer grpcio raises; older ones return 0
        raise OSError(f"cannot bind the KEDA scaler to {address}: {e}") from e
    if port == 0:
        raise OSError(f"cannot bind the KEDA scaler to {address}")
    server.start()
    return server, port
