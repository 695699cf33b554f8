"""The KEDA external scaler over real gRPC: a server on a free port, a client stub from KEDA's proto."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import pytest
from prometheus_client import REGISTRY

from thaw.runtime.keda import Demand, serve
from thaw.runtime.keda import externalscaler_pb2 as pb
from thaw.runtime.keda import externalscaler_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)

IDLE = Demand(desired_replicas=0, queued=0, inflight=0, ready_replicas=0)


class DictSource:
    """A DemandSource over a dict the test mutates; unknown names raise KeyError."""

    def __init__(self, **demands: Demand):
        self.demands = dict(demands)

    def demand(self, deployment: str) -> Demand:
        return self.demands[deployment]


@pytest.fixture
def scaler():
    source = DictSource(minilm=IDLE)
    server, port = serve(source, interval=0.05)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=5)
    try:
        yield source, pb_grpc.ExternalScalerStub(channel)
    finally:
        channel.close()
        server.stop(grace=None).wait(5)


def ref(name="so-minilm", **metadata) -> pb.ScaledObjectRef:
    return pb.ScaledObjectRef(name=name, namespace="default", scalerMetadata=metadata)


def requests_count(method: str) -> float:
    return REGISTRY.get_sample_value("thaw_keda_requests_total", {"method": method}) or 0.0


def test_is_active(scaler):
    source, stub = scaler
    before = requests_count("IsActive")
    assert stub.IsActive(ref(deployment="minilm"), timeout=5).result is False
    source.demands["minilm"] = Demand(desired_replicas=0, queued=1, inflight=0, ready_replicas=0)
    assert stub.IsActive(ref(deployment="minilm"), timeout=5).result is True
    source.demands["minilm"] = Demand(desired_replicas=0, queued=0, inflight=2, ready_replicas=1)
    assert stub.IsActive(ref(deployment="minilm"), timeout=5).result is True
    source.demands["minilm"] = Demand(desired_replicas=1, queued=0, inflight=0, ready_replicas=1)
    assert stub.IsActive(ref(deployment="minilm"), timeout=5).result is True
    # no "deployment" in the metadata: the ScaledObject's name is the deployment
    assert stub.IsActive(ref(name="minilm"), timeout=5).result is True
    assert requests_count("IsActive") - before == 5


def test_metric_spec_and_metrics(scaler):
    source, stub = scaler
    spec = stub.GetMetricSpec(ref(deployment="minilm"), timeout=5).metricSpecs
    assert [(s.metricName, s.targetSize, s.targetSizeFloat) for s in spec] == [("thaw-minilm-concurrency", 1, 1.0)]
    spec = stub.GetMetricSpec(ref(deployment="minilm", targetConcurrency="4"), timeout=5).metricSpecs
    assert [(s.metricName, s.targetSize, s.targetSizeFloat) for s in spec] == [("thaw-minilm-concurrency", 4, 4.0)]
    spec = stub.GetMetricSpec(ref(deployment="minilm", targetConcurrency="2.5"), timeout=5).metricSpecs
    assert (spec[0].targetSize, spec[0].targetSizeFloat) == (3, 2.5)
    for bad in ("zero", "1e19", "0.0004", "1e16"):  # past int64, or 0 or past it in KEDA's int64 thousandths
        with pytest.raises(grpc.RpcError) as e:
            stub.GetMetricSpec(ref(deployment="minilm", targetConcurrency=bad), timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    source.demands["minilm"] = Demand(desired_replicas=2, queued=5, inflight=3, ready_replicas=2)
    req = pb.GetMetricsRequest(scaledObjectRef=ref(deployment="minilm", targetConcurrency="4"),
                               metricName="thaw-minilm-concurrency")
    values = stub.GetMetrics(req, timeout=5).metricValues
    assert [(v.metricName, v.metricValue, v.metricValueFloat) for v in values] == \
        [("thaw-minilm-concurrency", 8, 8.0)]
    with pytest.raises(grpc.RpcError) as e:
        stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref(deployment="minilm"), metricName="other"),
                        timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # a deployment named with capitals: KEDA asks for its metric as GetMetricSpec named it, or in lower case
    source.demands["MiniLM"] = source.demands["minilm"]
    assert stub.GetMetricSpec(ref(deployment="MiniLM"), timeout=5).metricSpecs[0].metricName == \
        "thaw-MiniLM-concurrency"
    for asked in ("thaw-MiniLM-concurrency", "thaw-minilm-concurrency"):
        req = pb.GetMetricsRequest(scaledObjectRef=ref(deployment="MiniLM", targetConcurrency="4"), metricName=asked)
        assert [(v.metricName, v.metricValue) for v in stub.GetMetrics(req, timeout=5).metricValues] == [(asked, 8)]


def test_unknown_deployment_is_not_found(scaler):
    _, stub = scaler
    calls = [
        lambda: stub.IsActive(ref(deployment="nope"), timeout=5),
        lambda: stub.GetMetricSpec(ref(deployment="nope"), timeout=5),
        lambda: stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref(deployment="nope")), timeout=5),
        lambda: next(stub.StreamIsActive(ref(deployment="nope"), timeout=5)),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "nope" in e.value.details() and "\n" not in e.value.details()


def test_stream_metric_spec_falls_back(scaler):
    """The optional StreamMetricSpec stays UNIMPLEMENTED, which KEDA treats as 'use GetMetricSpec'."""
    _, stub = scaler
    with pytest.raises(grpc.RpcError) as e:
        next(stub.StreamMetricSpec(ref(deployment="minilm"), timeout=5))
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_stream_is_active_transitions(scaler):
    source, stub = scaler
    stream = stub.StreamIsActive(ref(deployment="minilm"), timeout=30)
    got: queue.Queue = queue.Queue()

    def read():
        try:
            for msg in stream:
                got.put(msg.result)
        except grpc.RpcError as e:
            got.put(e.code())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert got.get(timeout=5) is False  # the state now, sent at once
    source.demands["minilm"] = Demand(desired_replicas=0, queued=3, inflight=0, ready_replicas=0)
    assert got.get(timeout=5) is True
    source.demands["minilm"] = Demand(desired_replicas=0, queued=0, inflight=1, ready_replicas=1)  # still active
    with pytest.raises(queue.Empty):  # several polls (every 0.05 s) see no flip: nothing is pushed
        got.get(timeout=0.3)
    source.demands["minilm"] = IDLE
    assert got.get(timeout=5) is False
    source.demands["minilm"] = Demand(desired_replicas=1, queued=0, inflight=0, ready_replicas=0)
    assert got.get(timeout=5) is True
    # only flips are pushed: several polls with no change send nothing
    with pytest.raises(queue.Empty):
        got.get(timeout=0.3)
    stream.cancel()
    reader.join(5)
    assert not reader.is_alive()
    assert got.get(timeout=1) == grpc.StatusCode.CANCELLED


def test_cancelled_streams_free_their_threads():
    """Each open StreamIsActive holds a server thread; a client cancel must give it back."""
    source = DictSource(minilm=IDLE)
    server, port = serve(source, interval=0.05, max_workers=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ExternalScalerStub(channel)
            for _ in range(5):  # more streams than threads: hangs if a cancelled one kept its thread
                stream = stub.StreamIsActive(ref(deployment="minilm"), timeout=5)
                assert next(stream).result is False
                stream.cancel()
            assert stub.IsActive(ref(deployment="minilm"), timeout=5).result is False
            # streams that stay open hold every thread: a call past them is refused at once, not queued for ever
            held = [stub.StreamIsActive(ref(deployment="minilm"), timeout=10) for _ in range(2)]
            assert [next(s).result for s in held] == [False, False]
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                stub.IsActive(ref(deployment="minilm"), timeout=5)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - t0 < 2
            for s in held:
                s.cancel()
    finally:
        server.stop(grace=None).wait(5)


def test_rpcs_are_counted_in_the_gateways_registry():
    """`thaw gateway --keda-port` serves one /metrics, the gateway's registry: the scaler counts there."""
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    server, port = serve(DictSource(minilm=IDLE), registry=reg)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = pb_grpc.ExternalScalerStub(channel)
        stub.IsActive(ref(deployment="minilm"), timeout=5)
        stub.IsActive(ref(deployment="minilm"), timeout=5)
        assert reg.get_sample_value("thaw_keda_requests_total", {"method": "IsActive"}) == 2
    finally:
        channel.close()
        server.stop(0)
