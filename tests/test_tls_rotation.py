"""TLS as operators run it: certificates rotated under a running server (as cert-manager does), mutual TLS
limited to named client identities, and the client CLI's TLS flags. Real server processes, certificates
made here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from focalloss.v1 import focal_loss_pb2 as pb
from focalloss.v1 import focal_loss_pb2_grpc as pb_grpc
from focalserve_client.client import FocalLossError, build_request
from focalserve_client.tensor import decode
from test_security import DOC_LABEL, DOC_LOGIT, DOC_LOSS, SERVER_ARGS, issue, start_tls_server

# every test channel opens its own connection: a channel sharing another's (gRPC's global subchannel pool)
# would not show which certificate a new connection gets
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def read(d: Path, name: str) -> bytes:
    return (d / name).read_bytes()


def channel_credentials(d: Path, ca: str, client: str | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(read(d, f"{ca}.pem"), read(d, f"{client}.key") if client else None,
                                        read(d, f"{client}.pem") if client else None)


def loss_text(reply: pb.ComputeResponse) -> str:
    return f"{float(decode(reply.loss, 'loss', (pb.DTYPE_FLOAT32,))):.8f}"


def compute(channel: grpc.Channel) -> str:
    return loss_text(pb_grpc.FocalLossServiceStub(channel).Compute(
        build_request(DOC_LOGIT, DOC_LABEL, normalizer=2.0), timeout=10))


def connects(d: Path, port: int, ca: str, client: str | None = None) -> bool:
    """Whether a new connection trusting `ca` (presenting `client`) computes the documented example."""
    with grpc.secure_channel(f"localhost:{port}", channel_credentials(d, ca, client), OWN_CONNECTION) as channel:
        try:
            assert compute(channel) == DOC_LOSS
            return True
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            return False


def replace(src: Path, dst: Path) -> None:
    """Atomically, as a Kubernetes Secret volume updates (a new file, then a rename)."""
    tmp = dst.with_suffix(".new")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki-rotation")
    old_ca, new_ca = issue(d, "old-ca"), issue(d, "new-ca")
    issue(d, "old-server", old_ca, server=True)
    issue(d, "new-server", new_ca, server=True)
    issue(d, "client-a", old_ca, cn="batch-trainer", sans=[x509.DNSName("trainer.ml.svc"),
                                                           x509.UniformResourceIdentifier("spiffe://ml/trainer")])
    issue(d, "client-b", old_ca, cn="notebook", sans=[x509.DNSName("notebook.ml.svc")])
    issue(d, "client-cn-only", old_ca, cn="legacy-job")
    return d


# ---- certificate rotation ----

def _stream_items(first_answered: threading.Event, rotated: threading.Event):
    yield build_request(DOC_LOGIT, DOC_LABEL, normalizer=2.0, request_id="before")
    first_answered.wait(60)
    rotated.wait(60)
    yield build_request(DOC_LOGIT, DOC_LABEL, normalizer=2.0, request_id="after")


def secret_volume(pki: Path, live: Path, version: str) -> None:
    """Lays out `version`-server's pair as the kubelet updates a Secret volume: the files in a fresh
    timestamped folder, `..data` a link to it swapped by a rename, `tls.crt` and `tls.key` links through it."""
    folder = live / f"..{version}"
    folder.mkdir()
    shutil.copyfile(pki / f"{version}-server.pem", folder / "tls.crt")
    shutil.copyfile(pki / f"{version}-server.key", folder / "tls.key")
    os.symlink(folder.name, live / "..data_tmp")
    os.replace(live / "..data_tmp", live / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (live / name).is_symlink():
            os.symlink(f"..data/{name}", live / name)


@pytest.mark.parametrize("layout", ["files", "secret-volume"])
def test_rotated_certificate_serves_new_connections_and_keeps_open_streams(pki, tmp_path, layout):
    live = tmp_path / "live"
    live.mkdir()
    if layout == "files":
        shutil.copyfile(pki / "old-server.pem", live / "tls.crt")
        shutil.copyfile(pki / "old-server.key", live / "tls.key")
    else:
        secret_volume(pki, live, "old")
    srv = start_tls_server(tmp_path, *SERVER_ARGS, "--tls-cert", str(live / "tls.crt"), "--tls-key",
                           str(live / "tls.key"), credentials=channel_credentials(pki, "old-ca"))
    try:
        assert connects(pki, srv.port, "old-ca") and not connects(pki, srv.port, "new-ca")

        # a stream opened on the old certificate, its second item sent only after the rotation
        first_answered, rotated = threading.Event(), threading.Event()
        with grpc.secure_channel(f"localhost:{srv.port}", channel_credentials(pki, "old-ca"),
                                 OWN_CONNECTION) as old_channel:
            stream = pb_grpc.FocalLossServiceStub(old_channel).ComputeStream(
                _stream_items(first_answered, rotated), timeout=120)
            first = next(stream)
            assert first.result.request_id == "before"
            first_answered.set()

            if layout == "files":
                # half a rotation (the certificate written, its key not yet): the old pair goes on serving
                replace(pki / "new-server.pem", live / "tls.crt")
                assert connects(pki, srv.port, "old-ca") and not connects(pki, srv.port, "new-ca")
                replace(pki / "new-server.key", live / "tls.key")
            else:
                secret_volume(pki, live, "new")

            # new connections get the new certificate; the old CA's clients can no longer connect
            assert connects(pki, srv.port, "new-ca") and not connects(pki, srv.port, "old-ca")

            rotated.set()
            rest = list(stream)
            assert [m.result.request_id for m in rest if m.HasField("result")] == ["after"]
            assert loss_text(rest[0].result) == DOC_LOSS
            assert rest[-1].HasField("summary") and rest[-1].summary.items == 2
            # the connection opened before the rotation still carries new calls
            assert compute(old_channel) == DOC_LOSS
    finally:
        code = srv.stop()
    log = srv.log()
    assert code == 0, log
    assert ("certificate files changed but cannot be used yet" in log) == (layout == "files"), log
    assert log.count("TLS: certificate reloaded") == 1, log


def test_rotated_client_ca_is_used_for_new_connections(pki, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    issue(pki, "new-client", (x509.load_pem_x509_certificate(read(pki, "new-ca.pem")),
                              serialization.load_pem_private_key(read(pki, "new-ca.key"), None)))
    shutil.copyfile(pki / "old-ca.pem", live / "ca.crt")
    srv = start_tls_server(tmp_path, *SERVER_ARGS, "--tls-cert", str(pki / "old-server.pem"), "--tls-key",
                           str(pki / "old-server.key"), "--tls-client-ca", str(live / "ca.crt"),
                           credentials=channel_credentials(pki, "old-ca", "client-a"))
    try:
        assert connects(pki, srv.port, "old-ca", "client-a") and not connects(pki, srv.port, "old-ca", "new-client")
        replace(pki / "new-ca.pem", live / "ca.crt")
        assert connects(pki, srv.port, "old-ca", "new-client") and not connects(pki, srv.port, "old-ca", "client-a")
    finally:
        assert srv.stop() == 0, srv.log()


@pytest.mark.parametrize("broken", ["cert", "key", "mismatch"])
def test_unusable_certificate_at_start_is_one_line_and_exit_2(pki, tmp_path, broken):
    cert, key = pki / "old-server.pem", pki / "old-server.key"
    if broken == "cert":
        cert = tmp_path / "missing.pem"
    elif broken == "key":
        key = tmp_path / "garbage.key"
        key.write_text("not a key\n")
    else:
        key = pki / "new-server.key"
    proc = subprocess.run([sys.executable, "-m", "focalserve", "--port", "0", "--metrics-port", "-1", "--backend",
                           "cpu", "--workers", "1", "--tls-cert", str(cert), "--tls-key", str(key)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert ("missing.pem" in lines[0]) if broken == "cert" else ("--tls-cert/--tls-key" in lines[0]), lines


# ---- mutual TLS limited to named clients ----

@pytest.fixture(scope="module")
def allow_server(pki, tmp_path_factory):
    srv = start_tls_server(tmp_path_factory.mktemp("allow"), *SERVER_ARGS, "--tls-cert", str(pki / "old-server.pem"),
                           "--tls-key", str(pki / "old-server.key"), "--tls-client-ca", str(pki / "old-ca.pem"),
                           "--tls-client-allow", "spiffe://ml/trainer, legacy-job",
                           credentials=channel_credentials(pki, "old-ca", "client-a"))
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.mark.parametrize("client", ["client-a", "client-cn-only"])
def test_allowed_client_identities_compute(allow_server, pki, client):
    # client-a is allowed by its URI SAN (its CN is not listed), client-cn-only by its common name
    assert connects(pki, allow_server.port, "old-ca", client)


def test_other_client_identity_is_permission_denied(allow_server, pki):
    with grpc.secure_channel(f"localhost:{allow_server.port}", channel_credentials(pki, "old-ca", "client-b"),
                             OWN_CONNECTION) as channel:
        for call in (lambda: compute(channel),
                     lambda: pb_grpc.FocalLossServiceStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10),
                     lambda: list(pb_grpc.FocalLossServiceStub(channel).ComputeStream(
                         iter([build_request(DOC_LOGIT, DOC_LABEL)]), timeout=10))):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "client certificate" in e.value.details() and "--tls-client-allow" in e.value.details()
            assert "notebook.ml.svc" in e.value.details(), e.value.details()  # says who it saw
            assert FocalLossError.from_rpc_error(e.value).reason == "CLIENT_NOT_ALLOWED"
        # probes need no allowed identity, as they need no token
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    deadline = time.monotonic() + 10
    while "PERMISSION_DENIED" not in allow_server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "PERMISSION_DENIED" in allow_server.log()


def test_client_allow_needs_client_ca(pki):
    proc = subprocess.run([sys.executable, "-m", "focalserve", "--port", "0", "--metrics-port", "-1",
                           "--tls-cert", str(pki / "old-server.pem"), "--tls-key", str(pki / "old-server.key"),
                           "--tls-client-allow", "batch-trainer"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--tls-client-allow needs --tls-client-ca" in proc.stderr, proc.stderr


# ---- the client CLI ----

@pytest.mark.parametrize("given", ["--tls-key", "--tls-cert"])
def test_cli_refuses_half_a_client_certificate(pki, tmp_path, given):
    np.save(tmp_path / "l.npy", DOC_LOGIT)
    np.save(tmp_path / "y.npy", DOC_LABEL)
    path = pki / ("client-a.key" if given == "--tls-key" else "client-a.pem")
    proc = subprocess.run([sys.executable, "-m", "focalserve_client", "--target", "127.0.0.1:1", given, str(path),
                           "compute", "--logit", str(tmp_path / "l.npy"), "--label", str(tmp_path / "y.npy")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "--tls-cert and --tls-key go together" in proc.stderr, proc.stderr
