"""GetServerInfo, grpc.health.v1 and server reflection on a real server."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import BACKENDS, EXPECTED_BACKEND
from focalloss.v1 import focal_loss_pb2 as pb
from focalserve import __version__


def test_server_info(stub):
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert info.version == __version__
    assert list(info.backends) == BACKENDS
    assert info.default_backend == EXPECTED_BACKEND
    assert len(info.devices) == len(BACKENDS) and info.devices[0].startswith("cpu (")
    assert info.devices[0].endswith("; compiled kernel)"), info.devices  # not the ufunc fallback
    assert list(info.logit_dtypes) == [pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16]
    assert info.max_message_bytes == 256 * 1024 * 1024
    assert info.max_elements == 0


def test_health_serving(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "focalloss.v1.FocalLossService"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


def test_health_unknown_service_is_not_found(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND
    else:
        raise AssertionError("an unknown service must be NOT_FOUND")


def test_reflection_lists_and_describes_the_service(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="focalloss.v1.FocalLossService")]
    responses = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"focalloss.v1.FocalLossService", "grpc.health.v1.Health"} <= names
    files = responses[1].file_descriptor_response.file_descriptor_proto
    assert files and b"FocalLossService" in files[0] and b"ComputeStream" in files[0]
