"""The shipping artefacts: Dockerfile (hadolint), docker-compose.yml (compose-spec schema), deploy/k8s (Kubernetes
schemas, strict), the container health check, and, with FOCALSERVE_DOCKER_TEST=1, the image end to end
(scripts/docker-smoke.sh: builds it, runs it, calls it, stops it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import debian_tool

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
# CRD-based manifests (e.g. a ServiceMonitor) have no schema in kubernetes-validate; the PrometheusRule is
# checked by tests/test_alerts.py.
K8S_MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name not in ("servicemonitor.yaml", "prometheusrule.yaml"))


def tool(name: str) -> str:
    """A command installed by requirements.lock into the running interpreter's environment (or on PATH)."""
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail(f"{name} is not installed: it is pinned in requirements.lock (`make setup`)")
    return found


def run(*cmd: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True, timeout=timeout)


# ---- Dockerfile ----

def test_hadolint_dockerfile_clean():
    r = run(tool("hadolint"), "--failure-threshold", "style", "Dockerfile")
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr


def test_dockerfile_targets_and_runtime_settings():
    text = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M)
    assert {"wheels", "cpu-builder", "cpu", "gpu-builder", "gpu"} <= set(stages)
    assert stages[-1] == "cpu", "a plain `docker build .` should give the CPU image"
    assert "ARG BASE_IMAGE=python:3.12-slim" in text and re.search(r"cupy-cuda12x==[\d.]+", text)
    for final in ("gpu", "cpu"):
        body = re.search(rf"^FROM \S+ AS {final}\n(.*?)(?=^FROM |\Z)", text, re.M | re.S).group(1)
        for line in ("USER 10001:10001", "EXPOSE 50051 8000", "STOPSIGNAL SIGTERM", "MALLOC_MMAP_MAX_=0",
                     "MALLOC_TRIM_THRESHOLD_=68719476736", "MALLOC_ARENA_MAX=1", "PYTHONUNBUFFERED=1", "focalserve.healthcheck"):
            assert line in body, f"{final}: {line}"
        assert "COPY --from=" in body and "pip install" not in body, f"{final}: runtime copies the venv only"
    # requirements-runtime.lock is a subset of requirements.lock with the same pins, and no tools.
    lock = {ln for ln in (REPO / "requirements.lock").read_text().splitlines() if ln and not ln.startswith("#")}
    runtime = [ln for ln in (REPO / "requirements-runtime.lock").read_text().splitlines()
               if ln and not ln.startswith("#")]
    assert set(runtime) <= lock, set(runtime) - lock
    assert not {ln for ln in runtime if ln.split("==")[0] in ("grpcio-tools", "pytest", "hypothesis")}
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git"} <= set(ignored)
    assert "client/focalloss" not in ignored, "the image ships the committed stubs (tests/test_packaging.py)"


# ---- docker-compose.yml and what it mounts ----

def test_compose_file_matches_the_compose_spec_schema():
    r = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"]], ids=["default", "gpu-profile"])
def test_docker_compose_config_validates(profile):
    compose = debian_tool("docker-compose", "docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed and could not be installed (apt-get install docker-compose)")
    r = run(compose, "-f", "docker-compose.yml", *profile, "config", "--services")
    assert r.returncode == 0, r.stdout + r.stderr
    services = set(r.stdout.split())
    assert {"focalserve", "prometheus", "grafana"} <= services
    assert services <= {"focalserve", "prometheus", "grafana", "focalserve-gpu"}
    if profile:
        assert "focalserve-gpu" in services


def test_compose_services():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    svc = compose["services"]
    assert {"focalserve", "focalserve-gpu", "prometheus", "grafana"} <= set(svc)
    cpu, gpu = svc["focalserve"], svc["focalserve-gpu"]
    assert cpu["build"]["target"] == "cpu" and gpu["build"]["target"] == "gpu"
    assert {"50051:50051", "8000:8000"} <= set(cpu["ports"])
    assert cpu["stop_grace_period"] == "35s" and "healthcheck" in cpu
    assert "profiles" not in cpu and gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    for name in ("prometheus", "grafana"):
        image = svc[name]["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name} image not pinned: {image}"
        for volume in svc[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts a missing {source}"

    prom = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "focalserve")
    assert job["scrape_interval"] == "5s" and job["static_configs"][0]["targets"] == ["focalserve:8000"]

    datasources = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasources["datasources"][0]["type"] == "prometheus"
    providers = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/focalserve.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"


def test_grafana_dashboard_queries():
    dashboard = json.loads((REPO / "deploy/grafana/dashboards/focalserve.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    joined = "\n".join(exprs)
    assert "sum(rate(grpc_server_handled_total[1m])) by (grpc_method)" in exprs
    assert 'grpc_code!="OK"' in joined
    assert re.search(r"histogram_quantile\(0\.50, .*grpc_server_handling_seconds_bucket", joined)
    assert re.search(r"histogram_quantile\(0\.99, .*grpc_server_handling_seconds_bucket", joined)
    assert "sum(rate(focalloss_elements_total[1m])) by (backend)" in exprs
    assert "focalloss_gpu_memory_bytes" in joined


# ---- Kubernetes manifests ----

@pytest.mark.parametrize("manifest", K8S_MANIFESTS, ids=lambda p: p.name)
def test_k8s_manifest_validates_strictly(manifest):
    r = run(tool("kubernetes-validate"), "--strict", "--quiet", manifest)
    assert r.returncode == 0, r.stdout + r.stderr


def test_k8s_deployments():
    docs = {(d["kind"], d["metadata"]["name"]): d
            for p in K8S_MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d}
    for name, gpu in (("focalserve", False), ("focalserve-gpu", True)):
        pod = docs[("Deployment", name)]["spec"]["template"]
        spec = pod["spec"]
        (c,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["FOCALSERVE_GRACE_SECONDS"] == "30" and env["FOCALSERVE_MAX_CONNECTION_AGE_S"] == "300"
        assert spec["terminationGracePeriodSeconds"] == 40
        assert c["readinessProbe"]["grpc"]["port"] == 50051 and c["livenessProbe"]["grpc"]["port"] == 50051
        assert spec["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert ("nvidia.com/gpu" in c["resources"]["limits"]) == gpu
        # the token from a Secret that may be absent (then no auth), never inline in the manifest
        (token,) = [e for e in c["env"] if e["name"] == "FOCALSERVE_AUTH_TOKEN"]
        assert token["valueFrom"]["secretKeyRef"] == {"name": "focalserve-auth", "key": "token", "optional": True}
    assert docs[("Deployment", "focalserve")]["spec"]["replicas"] == 2
    assert docs[("Service", "focalserve-headless")]["spec"]["clusterIP"] == "None"
    assert {p["port"] for p in docs[("Service", "focalserve")]["spec"]["ports"]} == {50051, 8000}
    assert docs[("PodDisruptionBudget", "focalserve")]["spec"]["minAvailable"] == 1


# ---- the image's HEALTHCHECK command against a real server ----

def test_healthcheck_module(server):
    ok = run(sys.executable, "-m", "focalserve.healthcheck", "--target", server.target, timeout=30)
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout + ok.stderr
    closed = run(sys.executable, "-m", "focalserve.healthcheck", "--target", "127.0.0.1:1", timeout=30)
    assert closed.returncode == 1 and "UNAVAILABLE" in closed.stderr


# ---- the image end to end ----

@pytest.mark.timeout(3600)
@pytest.mark.skipif(os.environ.get("FOCALSERVE_DOCKER_TEST") != "1",
                    reason="builds and runs the Docker image (minutes, needs root or docker): set FOCALSERVE_DOCKER_TEST=1")
def test_docker_smoke():
    r = run("bash", REPO / "scripts" / "docker-smoke.sh", timeout=3500)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for expected in ("health: healthy", "loss 0.65782464", "exit code 0", "SMOKE OK"):
        assert expected in out, f"{expected!r} missing:\n{out}"
