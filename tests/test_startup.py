"""What an operator sees at start and in the logs: the token as Kubernetes Secrets deliver it, the warning for
a token over plaintext, reflection v1 and v1alpha (and under auth), a busy port, and log lines in both forms.
Real server processes."""

from __future__ import annotations

import importlib.util
import json
import re
import socket
import subprocess
import sys
import time

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from conftest import start_server
from focalloss.v1 import focal_loss_pb2 as pb
from focalloss.v1 import focal_loss_pb2_grpc as pb_grpc
from focalserve_client import FocalLossClient
from focalserve_client.client import build_request
from test_security import DOC_LABEL, DOC_LOGIT, DOC_LOSS, SERVER_ARGS, issue, start_tls_server
from test_tls_rotation import channel_credentials

TOKEN = "s3cret-token.for_tests"
SERVICE_NAMES = {"focalloss.v1.FocalLossService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                 "grpc.reflection.v1alpha.ServerReflection"}


def _wait_for(server, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    return server.log()


# ---- reflection, v1 and v1alpha, with grpc_reflection's own client ----

class ReflectionDatabase(ProtoReflectionDescriptorDatabase):
    """grpc_reflection's descriptor database (the client grpcurl-like tools are built on), asking
    `version`'s service: v1 and v1alpha exchange the same messages under two service names."""

    def __init__(self, channel: grpc.Channel, version: str, metadata=None):
        super().__init__(channel)
        if version != "v1alpha" or metadata:
            call = channel.stream_stream(
                f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)

            class Stub:
                @staticmethod
                def ServerReflectionInfo(requests):
                    return call(requests, timeout=10, metadata=metadata)

            self._stub = Stub


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_describes_the_service(channel, version):
    database = ReflectionDatabase(channel, version)
    assert set(database.get_services()) == SERVICE_NAMES
    service = DescriptorPool(database).FindServiceByName("focalloss.v1.FocalLossService")
    assert {m.name for m in service.methods} == {"Compute", "ComputeStream", "GetServerInfo"}
    compute = service.methods_by_name["Compute"]
    assert compute.input_type.fields_by_name["logit"].message_type.full_name == "focalloss.v1.Tensor"


def test_reflection_describes_both_reflection_services(channel):
    database = ReflectionDatabase(channel, "v1")
    for version in ("v1", "v1alpha"):
        proto = database.FindFileContainingSymbol(f"grpc.reflection.{version}.ServerReflection")
        assert isinstance(proto, descriptor_pb2.FileDescriptorProto)
        assert proto.package == f"grpc.reflection.{version}"
        (method,) = proto.service[0].method
        assert (method.name, method.input_type, method.client_streaming, method.server_streaming) == \
            ("ServerReflectionInfo", f".grpc.reflection.{version}.ServerReflectionRequest", True, True)
    unknown = list(channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.such.Symbol")]), timeout=10))
    assert unknown[0].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


# ---- a token server, as Kubernetes runs it: the token from a Secret (trailing newline), JSON logs ----

@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    # --backend auto: where CuPy is missing the start logs "no GPU backend", whose JSON form is checked below
    srv = start_server(tmp_path_factory.mktemp("token-env"), *SERVER_ARGS, "--backend", "auto", "--log-format",
                       "json", env={"FOCALSERVE_AUTH_TOKEN": f"{TOKEN}\n"})
    yield srv
    assert srv.stop() == 0, srv.log()


def test_env_token_with_a_trailing_newline_is_stripped(token_server):
    with FocalLossClient(token_server.target, token=TOKEN) as client:
        r = client.compute(DOC_LOGIT, DOC_LABEL, normalizer=2.0)
    assert f"{float(r.loss):.8f}" == DOC_LOSS


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_needs_the_token(token_server, version):
    with grpc.insecure_channel(token_server.target) as channel:
        with pytest.raises(grpc.RpcError) as e:
            ReflectionDatabase(channel, version, metadata=(("authorization", "Bearer wrong"),)).get_services()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        database = ReflectionDatabase(channel, version, metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert set(database.get_services()) == SERVICE_NAMES


def test_token_over_plaintext_warns_at_start(token_server):
    events = [json.loads(line) for line in token_server.log().splitlines()]
    (warning,) = [e for e in events if e["event"] == "token_without_tls"]
    assert warning["level"] == "warning" and "--tls-cert" in warning["msg"]
    assert TOKEN not in token_server.log()


def test_every_json_log_line_has_an_event(token_server):
    with grpc.insecure_channel(token_server.target) as channel:
        with pytest.raises(grpc.RpcError):
            pb_grpc.FocalLossServiceStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    log = _wait_for(token_server, "/GetServerInfo\"")
    events = [json.loads(line) for line in log.splitlines()]  # every line is one JSON object
    assert all(isinstance(e.get("event"), str) and e["event"] for e in events), log
    names = [e["event"] for e in events]
    if importlib.util.find_spec("cupy") is None:
        assert names[0] == "no_gpu_backend", names
        assert "CuPy is not installed" in events[0]["reason"]
    assert "serving" in names and "call_failed" in names
    (serving,) = [e for e in events if e["event"] == "serving"]
    assert (serving["tls"], serving["auth"], serving["port"]) == ("plaintext", "token", token_server.port)
    failed = [e for e in events if e["event"] == "call_failed"][-1]
    assert failed["method"] == "/focalloss.v1.FocalLossService/GetServerInfo"
    assert failed["code"] == "UNAUTHENTICATED" and failed["peer"].startswith("ipv4:127.0.0.1:")
    assert failed["seconds"] >= 0 and failed["details"].startswith("authorization: ")


def test_token_over_tls_does_not_warn(tmp_path, monkeypatch):
    issue(tmp_path, "server", issue(tmp_path, "ca"), server=True)
    monkeypatch.setenv("FOCALSERVE_AUTH_TOKEN", TOKEN)
    srv = start_tls_server(tmp_path, *SERVER_ARGS, "--tls-cert", str(tmp_path / "server.pem"), "--tls-key",
                           str(tmp_path / "server.key"), credentials=channel_credentials(tmp_path, "ca"))
    assert srv.stop() == 0, srv.log()
    assert "auth=token" in srv.log() and "clear text" not in srv.log(), srv.log()


@pytest.mark.parametrize("value, message", [
    ("  \n", "FOCALSERVE_AUTH_TOKEN holds only whitespace"),
    ("caf\u00e9", "FOCALSERVE_AUTH_TOKEN: the token has a character gRPC metadata cannot carry")])
def test_unusable_env_token_is_refused_at_start(value, message):
    proc = subprocess.run([sys.executable, "-m", "focalserve", "--port", "0", "--metrics-port", "-1"],
                          capture_output=True, text=True, timeout=60, env={"FOCALSERVE_AUTH_TOKEN": value,
                                                                           "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


# ---- the text log's failed-call line carries what the JSON one does ----

def test_text_failed_call_line_has_seconds_peer_and_message(server):
    request = build_request(DOC_LOGIT, DOC_LABEL, alpha=1.984375, request_id="bad-alpha")  # no other test sends it
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.FocalLossServiceStub(channel).Compute(request, timeout=10)
    details = e.value.details()
    log = _wait_for(server, details)
    lines = [line for line in log.splitlines() if "call failed:" in line and details in line]
    assert len(lines) == 1, log
    pattern = (r" WARNING focalserve: call failed: /focalloss\.v1\.FocalLossService/Compute INVALID_ARGUMENT "
               r"after (\d+\.\d{6})s from ipv4:127\.0\.0\.1:\d+: '(.*)'$")
    match = re.search(pattern, lines[0])
    assert match, lines[0]
    assert match.group(2) == details and float(match.group(1)) >= 0


# ---- a busy port ----

def _start_on_busy_port(*args: str) -> tuple[subprocess.CompletedProcess, str]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "focalserve", "--backend", "cpu", "--workers", "1", "--host",
                               "127.0.0.1", "--port", str(port), *args], capture_output=True, text=True, timeout=120)
    return proc, f"127.0.0.1:{port}"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_busy_port_is_one_line_and_exit_2(log_format):
    proc, address = _start_on_busy_port("--metrics-port", "-1", "--log-format", log_format)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, lines
    assert f"cannot listen on {address}: address already in use" in lines[0]
    if log_format == "json":
        entry = json.loads(lines[0])
        assert (entry["level"], entry["event"]) == ("error", "startup_failed")


def test_busy_metrics_port_is_one_line_and_exit_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics_port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "focalserve", "--backend", "cpu", "--workers", "1", "--host",
                               "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port",
                               str(metrics_port)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 2 and len(lines) == 1, lines
    assert f"cannot serve metrics on 127.0.0.1:{metrics_port}" in lines[0]
