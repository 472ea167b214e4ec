"""Shared fixtures: real focalserve processes on free ports, channels and stubs to them, golden cases."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from focalloss.v1 import focal_loss_pb2 as pb
from focalloss.v1 import focal_loss_pb2_grpc as pb_grpc
from focalserve_client.tensor import encode

REPO = Path(__file__).resolve().parents[1]
# FOCALSERVE_TEST_BACKEND=gpu runs every server of the suite with --backend gpu (on a machine with a GPU).
TEST_BACKEND = os.environ.get("FOCALSERVE_TEST_BACKEND", "cpu")
EXPECTED_BACKEND = "cupy" if TEST_BACKEND == "gpu" else "cpu"
BACKENDS = ["cpu", "cupy"] if TEST_BACKEND == "gpu" else ["cpu"]
GOLDEN_DIR = Path(os.environ.get("FOCALSERVE_GOLDEN_DIR", REPO.parent / "shared" / "golden"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def metrics_text(port: int, timeout: float = 10.0) -> str:
    """A server's /metrics page (Prometheus text format) on `port` of 127.0.0.1."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as reply:
        return reply.read().decode()


def wait_serving(target: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode} before serving")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"server at {target} not SERVING after {timeout}s")


def start_server(tmp_path: Path, *args: str, env: dict | None = None,
                 command: list[str] | None = None) -> ServerProcess:
    """Starts `python -m focalserve` (or `command`, a launcher taking the same flags) on a free port with
    `args`; returns once health says SERVING."""
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    cmd = [*(command or [sys.executable, "-m", "focalserve"]), "--host", "127.0.0.1", "--port", str(port),
           "--metrics-port", "-1", "--backend", TEST_BACKEND, *args]
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = ServerProcess(process, port, log_path)
    try:
        wait_serving(server.target, process)
    except Exception:
        server.stop()
        raise RuntimeError(f"server did not start:\n{server.log()}")
    return server


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> ServerProcess:
    """One real server for the session (CPU backend, 2 workers)."""
    srv = start_server(tmp_path_factory.mktemp("server"), "--workers", "2")
    yield srv
    code = srv.stop()
    assert code == 0, f"server exited with {code}:\n{srv.log()}"


@pytest.fixture(scope="session")
def channel(server) -> grpc.Channel:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel) -> pb_grpc.FocalLossServiceStub:
    return pb_grpc.FocalLossServiceStub(channel)


def debian_tool(binary: str, package: str) -> str | None:
    """`binary` from PATH, installing Debian's `package` first when it is missing and this runs as root
    (as CI does): the suite starts real Prometheus and docker-compose rather than stand-ins."""
    found = shutil.which(binary)
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]
    if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(install, env=env, capture_output=True, timeout=600)
    return shutil.which(binary)


# ---- golden cases (../shared/golden, SPEC §4) ----

def golden_cases() -> list[dict]:
    manifest = GOLDEN_DIR / "manifest.json"
    if not manifest.exists():
        return []
    return json.loads(manifest.read_text())["cases"]


def load_golden(case: dict) -> dict[str, np.ndarray]:
    with np.load(GOLDEN_DIR / case["file"]) as z:
        return {k: z[k] for k in z.files}


def assert_golden_close(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    """SPEC §4 tolerance: float32 rtol=1e-5, atol=1e-6·max|expected|; float64 rtol=1e-10."""
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != {expected.dtype}"
    if expected.dtype == np.float32:
        atol = 1e-6 * float(np.max(np.abs(expected))) if expected.size else 0.0
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=atol, err_msg=what)
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=0.0, err_msg=what)


GOLDEN_REDUCTIONS = {"none": pb.REDUCTION_NONE, "mean": pb.REDUCTION_MEAN, "sum": pb.REDUCTION_SUM}
GOLDEN_FORMATS = {"dense": pb.LABEL_FORMAT_DENSE, "class_index": pb.LABEL_FORMAT_CLASS_INDEX}


def golden_request(case: dict, data: dict[str, np.ndarray]) -> pb.ComputeRequest:
    """The ComputeRequest of a golden case, with compute_grad (the golden files hold loss and grad)."""
    request = pb.ComputeRequest(
        request_id=case["name"], logit=encode(data["logit"]), label=encode(data["label"]),
        label_format=GOLDEN_FORMATS[case["label_format"]], alpha=case["alpha"], gamma=case["gamma"],
        reduction=GOLDEN_REDUCTIONS[case["reduction"]], compute_grad=True)
    if case["normalizer"] is not None:
        request.normalizer = case["normalizer"]
    return request
