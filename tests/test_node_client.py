"""The Node.js client (client/node) against the session's server: its own `node --test` suite and its example.

Needs `node` and `npm` on PATH (skipped, with the reason, where they are absent). A fresh clone has no
client/node/node_modules: `npm ci` installs the locked packages first (network access to the npm registry).
The golden .npz cases the Node tests check are exported here as JSON (FOCALSERVE_NODE_CASES).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import GOLDEN_DIR, REPO, golden_cases, load_golden, start_server

NODE_DIR = REPO / "client" / "node"
NODE = shutil.which("node")
NPM = shutil.which("npm")
NODE_CASES = ("doc_example", "dense_00", "dense_40", "class_index_00", "class_index_08")
# What `npm ci` must have put in node_modules (an interrupted install leaves some of them out).
PACKAGES = ("@grpc/grpc-js", "@grpc/proto-loader", "protobufjs")
NPM_TIMEOUT = 600

pytestmark = [
    pytest.mark.skipif(not (NODE and NPM), reason="node and npm are not on PATH: the Node.js client is not tested"),
    # `npm ci` on a fresh clone downloads packages: more than the suite's default per-test timeout may pass
    pytest.mark.timeout(NPM_TIMEOUT + 300),
]


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=NODE_DIR, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout}s:\n{e.stdout or ''}\n{e.stderr or ''}")


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """client/node/node_modules, installed from package-lock.json by `npm ci` when missing."""
    modules = NODE_DIR / "node_modules"
    if not all((modules / p / "package.json").is_file() for p in PACKAGES):
        result = _run([NPM, "ci", "--no-audit", "--no-fund"], NPM_TIMEOUT)
        if result.returncode != 0:
            pytest.fail(f"npm ci in {NODE_DIR} failed ({result.returncode}); the Node.js client needs its packages "
                        f"from the npm registry:\n{result.stdout}\n{result.stderr}")
    return modules


def _case_json(case: dict) -> dict:
    data = load_golden(case)
    logit, label, loss, grad = data["logit"], data["label"], data["loss"], data["grad"]
    assert logit.dtype == case["dtype"], f"{case['name']}: logit {logit.dtype}, manifest says {case['dtype']}"
    # float32 values widen to float64 exactly, and JSON (Python's float repr) round-trips a float64 exactly
    floats = lambda a: np.asarray(a, np.float64).ravel().tolist()  # noqa: E731
    return {
        "name": case["name"], "dtype": case["dtype"], "label_format": case["label_format"],
        "alpha": case["alpha"], "gamma": case["gamma"], "normalizer": case["normalizer"],
        "reduction": case["reduction"],
        "shape": list(logit.shape), "logit": floats(logit),
        "label_dtype": label.dtype.name, "label_shape": list(label.shape),
        "label": label.ravel().tolist() if label.dtype.kind in "iu" else floats(label),
        "loss_shape": list(loss.shape), "loss": floats(loss),
        "grad": floats(grad),
    }


@pytest.fixture(scope="module")
def node_cases(tmp_path_factory) -> Path:
    by_name = {c["name"]: c for c in golden_cases()}
    missing = [n for n in NODE_CASES if n not in by_name]
    assert not missing, f"golden cases {missing} not in {GOLDEN_DIR / 'manifest.json'}"
    path = tmp_path_factory.mktemp("node") / "cases.json"
    path.write_text(json.dumps({"cases": [_case_json(by_name[n]) for n in NODE_CASES]}, allow_nan=False))
    return path


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A server that wants a bearer token (the Node client's token option)."""
    token = "node-" + os.urandom(8).hex()
    srv = start_server(tmp_path_factory.mktemp("auth"), env={"FOCALSERVE_AUTH_TOKEN": token})
    yield srv, token
    assert srv.stop() == 0, srv.log()


def test_node_client_suite(server, auth_server, node_modules, node_cases):
    tests = sorted(str(p.relative_to(NODE_DIR)) for p in (NODE_DIR / "test").glob("*.test.js"))
    assert tests, f"no *.test.js in {NODE_DIR / 'test'}"
    auth, token = auth_server
    result = _run([NODE, "--test", "--test-reporter=tap", *tests], 240,
                  env={"FOCALSERVE_TARGET": server.target, "FOCALSERVE_NODE_CASES": str(node_cases),
                       "FOCALSERVE_GOLDEN_DIR": str(GOLDEN_DIR), "FOCALSERVE_AUTH_TARGET": auth.target,
                       "FOCALSERVE_AUTH_TOKEN": token})
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"node --test failed ({result.returncode}):\n{output}"
    counts = {k: int(v) for k, v in re.findall(r"^# (pass|fail|skipped|cancelled) (\d+)$", output, re.M)}
    assert counts.get("fail") == 0 and counts.get("cancelled") == 0, output
    # everything ran: the server and the golden cases were given, so no test may skip
    assert counts.get("pass", 0) >= 4 and counts.get("skipped") == 0, output
    for name in ("CANCELLED by the server is retried", "token: a server that wants one",
                 "the refusal cause: google.rpc.ErrorInfo", "encodeRequest writes what protobufjs reads"):
        assert re.search(rf"^ok \d+ - {re.escape(name)}", output, re.M), f"{name!r} did not pass:\n{output}"
    for name in NODE_CASES[1:]:
        assert re.search(rf"^\s*ok \d+ - {name}$", output, re.M), f"golden case {name} did not pass:\n{output}"


def test_node_example(server, node_modules):
    result = _run([NODE, "example.js", server.target], 60)
    assert result.returncode == 0, f"node example.js failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    assert "loss 0.65782464" in result.stdout, result.stdout
    assert re.search(r"^grad \[\[-0\.0069988\d*, ", result.stdout, re.M), result.stdout


def test_node_benchmark_script(server, node_modules):
    """benchmarks/node_client.js (read by benchmarks/client.py): one JSON line with its three keys, at a small size."""
    script = str(REPO / "benchmarks" / "node_client.js")
    for extra in ([], ["--no-grad"]):
        result = _run([NODE, script, "--target", server.target, "--elements", "4096", "--repeat", "3", *extra], 120)
        assert result.returncode == 0, result.stdout + result.stderr
        lines = result.stdout.strip().splitlines()
        assert len(lines) == 1, result.stdout
        figures = json.loads(lines[0])
        assert set(figures) == {"elements_per_s", "elements", "repeat"}, figures
        assert figures["elements"] == 4096 and figures["repeat"] == 3 and figures["elements_per_s"] > 0, figures
    bad = _run([NODE, script, "--target", server.target, "--elements", "0", "--repeat", "3"], 60)
    assert bad.returncode == 2 and "--elements must be a positive integer" in bad.stderr, bad.stderr
