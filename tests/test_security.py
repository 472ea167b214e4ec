"""TLS, mutual TLS and bearer-token auth, against real server processes with certificates made here."""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import ServerProcess, free_port, start_server
from focalloss.v1 import focal_loss_pb2 as pb
from focalloss.v1 import focal_loss_pb2_grpc as pb_grpc
from focalserve_client import FocalLossClient, FocalLossError
from focalserve_client.client import build_request

DOC_LOGIT = np.array([[0.97, 0.91, 0.03], [0.55, 0.43, 0.71]], np.float32)
DOC_LABEL = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
DOC_LOSS = "0.65782464"
SERVER_ARGS = ("--workers", "1", "--backend", "cpu", "--grace-seconds", "5")


# ---- certificates: a CA, a server and a client certificate it signs, and an unrelated CA and client ----

@dataclass
class Pki:
    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def read(self, name: str) -> bytes:
        return (self.dir / name).read_bytes()

    def credentials(self, ca: str = "ca", client: str | None = None) -> grpc.ChannelCredentials:
        """Trusting `ca`.pem; presenting `client`.pem/.key when given (mutual TLS)."""
        return grpc.ssl_channel_credentials(self.read(f"{ca}.pem"), self.read(f"{client}.key") if client else None,
                                            self.read(f"{client}.pem") if client else None)


def issue(pki_dir: Path, name: str, issuer: tuple | None = None, *, cn: str | None = None,
          sans: list | None = None, server: bool = False) -> tuple:
    """Writes name.pem and name.key: a self-signed CA without `issuer` (its (cert, key)), else a leaf it signs
    (common name `cn`, subject alternative names `sans`; a server's are localhost and 127.0.0.1).
    Returns (cert, key)."""
    ca = issuer is None
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "focalserve tests"),
                         x509.NameAttribute(NameOID.COMMON_NAME, cn or f"focalserve test {name}")])
    issuer_cert, issuer_key = issuer or (None, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(issuer_cert.subject if issuer_cert else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                              critical=False)
               .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False, key_agreement=False,
                                            key_cert_sign=ca, crl_sign=ca, encipher_only=False,
                                            decipher_only=False), critical=True))
    if not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    if server:
        sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    (pki_dir / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (pki_dir / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = issue(d, "ca")
    issue(d, "server", ca, server=True)
    issue(d, "client", ca)
    other_ca = issue(d, "other-ca")
    issue(d, "other-client", other_ca)
    return Pki(d)


@pytest.fixture(scope="module")
def npy(tmp_path_factory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("npy")
    np.save(d / "l.npy", DOC_LOGIT)
    np.save(d / "y.npy", DOC_LABEL)
    return str(d / "l.npy"), str(d / "y.npy")


# ---- servers: conftest's start_server checks health over plaintext, so TLS servers start here ----

def start_tls_server(tmp_path: Path, *args: str, credentials: grpc.ChannelCredentials,
                     timeout: float = 60.0) -> ServerProcess:
    """conftest.start_server, but waiting for SERVING over a TLS channel to localhost:PORT."""
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    cmd = [sys.executable, "-m", "focalserve", "--host", "127.0.0.1", "--port", str(port),
           "--metrics-port", "-1", *args]
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    srv = ServerProcess(process, port, log_path)
    deadline = time.monotonic() + timeout
    with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return srv
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    srv.stop()
    raise RuntimeError(f"TLS server did not start (exit {process.returncode}):\n{srv.log()}")


def _stopped_cleanly(srv: ServerProcess) -> None:
    code = srv.stop()
    assert code == 0, f"server exited with {code}:\n{srv.log()}"


@pytest.fixture(scope="module")
def tls_server(pki, tmp_path_factory):
    srv = start_tls_server(tmp_path_factory.mktemp("tls"), *SERVER_ARGS, "--tls-cert", pki.path("server.pem"),
                           "--tls-key", pki.path("server.key"), credentials=pki.credentials())
    yield srv
    _stopped_cleanly(srv)


@pytest.fixture(scope="module")
def mtls_server(pki, tmp_path_factory):
    srv = start_tls_server(tmp_path_factory.mktemp("mtls"), *SERVER_ARGS, "--tls-cert", pki.path("server.pem"),
                           "--tls-key", pki.path("server.key"), "--tls-client-ca", pki.path("ca.pem"),
                           credentials=pki.credentials(client="client"))
    yield srv
    _stopped_cleanly(srv)


@dataclass
class TokenServer:
    server: ServerProcess
    token: str
    token_file: str


@pytest.fixture(scope="module", params=["token-file", "env"])
def token_server(request, tmp_path_factory):
    """Plaintext with a bearer token: from --auth-token-file (text logs) or FOCALSERVE_AUTH_TOKEN (JSON logs)."""
    tmp = tmp_path_factory.mktemp(request.param)
    token = secrets.token_urlsafe(24)
    token_file = tmp / "token"
    token_file.write_text(token + "\n")  # a trailing newline, as editors and `echo` leave one
    if request.param == "token-file":
        srv = start_server(tmp, *SERVER_ARGS, "--auth-token-file", str(token_file))
    else:
        srv = start_server(tmp, *SERVER_ARGS, "--log-format", "json", env={"FOCALSERVE_AUTH_TOKEN": token})
    yield TokenServer(srv, token, str(token_file))
    _stopped_cleanly(srv)
    assert token not in srv.log(), "the token appears in the server's log"


def localhost(srv: ServerProcess) -> str:
    return f"localhost:{srv.port}"


def assert_refused(client: FocalLossClient, code: grpc.StatusCode) -> None:
    with pytest.raises(FocalLossError) as e:
        client.compute(DOC_LOGIT, DOC_LABEL, normalizer=2.0)
    assert e.value.code == code, e.value


def assert_doc_example(client: FocalLossClient) -> None:
    r = client.compute(DOC_LOGIT, DOC_LABEL, normalizer=2.0, compute_grad=True)
    assert f"{float(r.loss):.8f}" == DOC_LOSS
    assert r.grad.shape == DOC_LOGIT.shape


# ---- 1. TLS ----

def test_tls_client_trusting_the_ca_computes(tls_server, pki):
    with FocalLossClient(localhost(tls_server), credentials=pki.credentials()) as client:
        assert_doc_example(client)
    # the certificate also names IP 127.0.0.1
    with FocalLossClient(f"127.0.0.1:{tls_server.port}", credentials=pki.credentials()) as client:
        assert_doc_example(client)


def test_tls_refuses_a_plaintext_client(tls_server):
    with FocalLossClient(localhost(tls_server), timeout=10) as client:
        assert_refused(client, grpc.StatusCode.UNAVAILABLE)


def test_tls_client_trusting_another_ca_fails(tls_server, pki):
    with FocalLossClient(localhost(tls_server), credentials=pki.credentials(ca="other-ca"), timeout=10) as client:
        assert_refused(client, grpc.StatusCode.UNAVAILABLE)


def test_tls_client_checks_the_server_name(tls_server, pki):
    options = [("grpc.ssl_target_name_override", "not-localhost.example")]
    with FocalLossClient(localhost(tls_server), credentials=pki.credentials(), options=options,
                         timeout=10) as client:
        assert_refused(client, grpc.StatusCode.UNAVAILABLE)


def test_tls_without_client_ca_ignores_client_certificates(tls_server, pki):
    # the control for the mutual-TLS refusal below: these credentials are otherwise good
    with FocalLossClient(localhost(tls_server), credentials=pki.credentials(client="other-client")) as client:
        assert_doc_example(client)


def _healthcheck(target: str, **env: str) -> subprocess.CompletedProcess:
    """The container HEALTHCHECK command, with the environment a container of that server would have."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FOCALSERVE_")}
    return subprocess.run([sys.executable, "-m", "focalserve.healthcheck", "--target", target],
                          capture_output=True, text=True, timeout=60, env={**clean, **env})


def test_container_healthcheck_against_a_tls_server(tls_server, pki):
    env = dict(FOCALSERVE_TLS_CERT=pki.path("server.pem"), FOCALSERVE_TLS_KEY=pki.path("server.key"))
    for trust in ({}, {"FOCALSERVE_HEALTHCHECK_CA": pki.path("ca.pem")}):  # the server's certificate, or its CA
        proc = _healthcheck(localhost(tls_server), **env, **trust)
        assert proc.returncode == 0 and "SERVING" in proc.stdout, proc.stdout + proc.stderr
    assert _healthcheck(localhost(tls_server), **env, FOCALSERVE_HEALTHCHECK_CA=pki.path("other-ca.pem")).returncode == 1
    assert _healthcheck(localhost(tls_server)).returncode == 1  # plaintext against TLS: not healthy


# ---- 2. mutual TLS ----

def test_mtls_client_with_a_ca_signed_certificate_computes(mtls_server, pki):
    with FocalLossClient(localhost(mtls_server), credentials=pki.credentials(client="client")) as client:
        assert_doc_example(client)
        assert client.server_info().version


def test_mtls_refuses_a_client_without_a_certificate(mtls_server, pki):
    with FocalLossClient(localhost(mtls_server), credentials=pki.credentials(), timeout=10) as client:
        assert_refused(client, grpc.StatusCode.UNAVAILABLE)
    with grpc.secure_channel(localhost(mtls_server), pki.credentials()) as channel:
        with pytest.raises(grpc.RpcError) as e:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_container_healthcheck_against_an_mtls_server(mtls_server, pki):
    env = dict(FOCALSERVE_TLS_CERT=pki.path("server.pem"), FOCALSERVE_TLS_KEY=pki.path("server.key"),
               FOCALSERVE_TLS_CLIENT_CA=pki.path("ca.pem"), FOCALSERVE_HEALTHCHECK_CA=pki.path("ca.pem"))
    proc = _healthcheck(localhost(mtls_server), FOCALSERVE_HEALTHCHECK_CERT=pki.path("client.pem"),
                        FOCALSERVE_HEALTHCHECK_KEY=pki.path("client.key"), **env)
    assert proc.returncode == 0 and "SERVING" in proc.stdout, proc.stdout + proc.stderr
    # by default it presents the server's own pair, which is refused here: that certificate is for serverAuth only
    assert _healthcheck(localhost(mtls_server), **env).returncode == 1


def test_mtls_refuses_a_certificate_from_another_ca(mtls_server, pki):
    # the client trusts the right CA for the server, but its own certificate is signed by an unrelated one
    with FocalLossClient(localhost(mtls_server), credentials=pki.credentials(client="other-client"),
                         timeout=10) as client:
        assert_refused(client, grpc.StatusCode.UNAVAILABLE)


def test_mtls_refuses_a_plaintext_client(mtls_server):
    with FocalLossClient(localhost(mtls_server), timeout=10) as client:
        assert_refused(client, grpc.StatusCode.UNAVAILABLE)


def test_mtls_health_over_tls_with_a_client_certificate(mtls_server, pki):
    with grpc.secure_channel(localhost(mtls_server), pki.credentials(client="client")) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "focalloss.v1.FocalLossService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


# ---- 3. bearer token ----

def test_token_right_token_computes(token_server):
    with FocalLossClient(token_server.server.target, token=token_server.token) as client:
        assert_doc_example(client)
        assert client.server_info().version


@pytest.mark.parametrize("token", [None, "wrong"], ids=["no-token", "wrong-token"])
def test_token_client_without_the_right_token_is_unauthenticated(token_server, token):
    with FocalLossClient(token_server.server.target, token=token, timeout=10) as client:
        with pytest.raises(FocalLossError) as e:
            client.server_info()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert_refused(client, grpc.StatusCode.UNAUTHENTICATED)


def _call(channel: grpc.Channel, method: str, metadata):
    if method == "Compute":
        request = build_request(DOC_LOGIT, DOC_LABEL, normalizer=2.0)
        return pb_grpc.FocalLossServiceStub(channel).Compute(request, timeout=10, metadata=metadata)
    if method == "GetServerInfo":
        return pb_grpc.FocalLossServiceStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10,
                                                                   metadata=metadata)
    if method == "ComputeStream":
        requests = iter([build_request(DOC_LOGIT, DOC_LABEL, normalizer=2.0)])
        return list(pb_grpc.FocalLossServiceStub(channel).ComputeStream(requests, timeout=10, metadata=metadata))
    requests = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    return list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        requests, timeout=10, metadata=metadata))


@pytest.mark.parametrize("method", ["Compute", "ComputeStream", "GetServerInfo", "ServerReflectionInfo"])
def test_token_every_method_but_health_needs_it(token_server, method):
    token = token_server.token
    wrong = [None, "Bearer wrong", token, f"Bearer {token}x", f"Bearer {token[:-1]}", f"Basic {token}"]
    with grpc.insecure_channel(token_server.server.target) as channel:
        for value in wrong:
            with pytest.raises(grpc.RpcError) as e:
                _call(channel, method, (("authorization", value),) if value else None)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method, value)
        assert _call(channel, method, (("authorization", f"Bearer {token}"),))


def test_token_health_needs_no_token(token_server):
    with grpc.insecure_channel(token_server.server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "focalloss.v1.FocalLossService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


def test_token_never_appears_in_the_log(token_server):
    srv, token = token_server.server, token_server.token
    with FocalLossClient(srv.target, timeout=10) as client:
        assert_refused(client, grpc.StatusCode.UNAUTHENTICATED)
    with FocalLossClient(srv.target, token=token[:-1], timeout=10) as client:
        assert_refused(client, grpc.StatusCode.UNAUTHENTICATED)
    with FocalLossClient(srv.target, token=token) as client:
        assert_doc_example(client)
    deadline = time.monotonic() + 10
    while "UNAUTHENTICATED" not in srv.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = srv.log()
    assert "UNAUTHENTICATED" in log, f"no failed call logged:\n{log}"  # the log is written, and has those calls
    assert token not in log and token[:-1] not in log


# ---- 4. the command line ----

def _cli(target: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FOCALSERVE_")}
    return subprocess.run([sys.executable, "-m", "focalserve_client", "--target", target, *args],
                          capture_output=True, text=True, timeout=120, env={**clean, **(env or {})})


def _compute_args(npy) -> list[str]:
    return ["compute", "--logit", npy[0], "--label", npy[1], "--normalizer", "2"]


def test_cli_tls(tls_server, pki, npy):
    proc = _cli(localhost(tls_server), "--tls-ca", pki.path("ca.pem"), *_compute_args(npy))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == DOC_LOSS
    proc = _cli(localhost(tls_server), *_compute_args(npy))  # plaintext
    assert proc.returncode == 1 and "UNAVAILABLE" in proc.stderr, proc.stderr


def test_cli_mtls(mtls_server, pki, npy):
    proc = _cli(localhost(mtls_server), "--tls-ca", pki.path("ca.pem"), "--tls-cert", pki.path("client.pem"),
                "--tls-key", pki.path("client.key"), *_compute_args(npy))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == DOC_LOSS
    proc = _cli(localhost(mtls_server), "--tls-ca", pki.path("ca.pem"), *_compute_args(npy))
    assert proc.returncode == 1 and "UNAVAILABLE" in proc.stderr, proc.stderr


def test_cli_token(token_server, npy):
    srv, token = token_server.server, token_server.token
    proc = _cli(srv.target, "--token-file", token_server.token_file, *_compute_args(npy))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == DOC_LOSS
    proc = _cli(srv.target, *_compute_args(npy), env={"FOCALSERVE_TOKEN": token})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == DOC_LOSS
    proc = _cli(srv.target, *_compute_args(npy))
    assert proc.returncode == 1 and "UNAUTHENTICATED" in proc.stderr, proc.stderr
    assert token not in proc.stderr + proc.stdout
