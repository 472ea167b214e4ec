"""The examples in examples/ run as their docstrings say, against a real server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port
from focalserve_client import Evaluator
from fwfixtures import client, fw_server  # noqa: F401 - fixtures

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BIN = Path(sys.executable).parent
SIZE = ["--batches", "8", "--anchors", "500", "--classes", "20"]

sys.path.insert(0, str(EXAMPLES))
from anchors import batch  # noqa: E402


def run(command: list[str], cwd: Path) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=cwd)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return done.stdout


@pytest.mark.parametrize("framework", ["torch", "paddle"])
def test_sharded_evaluation_example_prints_the_global_loss(client, fw_server, framework, tmp_path):
    script = EXAMPLES / f"{framework}_sharded_eval.py"
    if framework == "torch":
        command = [str(BIN / "torchrun"), "--nproc-per-node", "4", "--master-addr", "127.0.0.1",
                   "--master-port", str(free_port()), str(script)]
    else:
        command = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "4",
                   "--master", f"127.0.0.1:{free_port()}", "--start_port", str(free_port()),
                   "--log_dir", str(tmp_path / "log"), str(script)]
    out = run([*command, "--target", fw_server.target, *SIZE], tmp_path)
    if framework == "paddle":  # the launcher keeps each rank's output in its log
        out += (tmp_path / "log" / "workerlog.0").read_text()
    summary = json.loads(re.search(r"^summary (\{.*\})$", out, re.M).group(1))
    one_process = Evaluator(client, label_format="class_index", alpha=0.25, gamma=2.0)
    for i in range(8):
        one_process.add(*batch(i, anchors=500, classes=20))
    expected = vars(one_process.summary())
    assert summary["items"] == 8 and summary["failed_items"] == 0
    assert summary["elements"] == expected["elements"] == 8 * 500 * 20
    assert summary["positives"] == expected["positives"] > 0
    assert summary["normalized_loss"] == pytest.approx(expected["normalized_loss"], rel=1e-9)
    assert f"global focal loss {expected['normalized_loss']:.6f} over 8 batches" in out


@pytest.mark.parametrize("framework", ["torch", "paddle"])
def test_training_step_example_learns(fw_server, framework, tmp_path):
    out = run([sys.executable, str(EXAMPLES / f"{framework}_train_step.py"), "--target", fw_server.target,
               "--steps", "4", "--anchors", "1024"], tmp_path)
    losses = [float(v) for v in re.findall(r"^step \d+ loss (\S+)$", out, re.M)]
    assert len(losses) == 4
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # backward() moved the head downhill


def test_frameworks_benchmark_prints_every_row(tmp_path):
    """benchmarks/frameworks.py still runs (figures not checked: benchmarks are never timed assertions)."""
    out = run([sys.executable, str(EXAMPLES.parent / "benchmarks" / "frameworks.py"), "--sizes", "64K",
               "--calls", "2"], tmp_path)
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in out.splitlines() if line.startswith("| ") and not line.startswith("|---")}
    for name in ("client.compute", "torch drop-in", "paddle drop-in", "torch own op", "paddle own op"):
        assert re.fullmatch(r"\d+\.\d\d ms \(\d+ M elem/s\)", rows[name]), (name, rows.get(name))
        assert float(rows[name].split()[0]) > 0
    for name in ("torch drop-in overhead over client.compute", "paddle drop-in overhead over client.compute"):
        assert re.fullmatch(r"[+-]\d+\.\d%", rows[name]), (name, rows.get(name))
