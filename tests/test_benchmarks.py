"""The benchmark scripts still run and print every row of their tables.

Their figures are not checked (benchmarks are never timed assertions: this machine is shared and noisy),
only that each row is there with positive finite numbers, so that a change to the server, the client or
the scripts cannot break `make bench-cpu` / `make bench-service` unnoticed.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def run_script(*args: str, timeout: float) -> dict[str, list[str]]:
    """Runs a benchmark script; returns its Markdown table rows as {first cell: other cells}."""
    done = subprocess.run([sys.executable, str(BENCHMARKS / args[0]), *args[1:]], capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {}
    for line in done.stdout.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def numbers(cell: str) -> list[float]:
    return [float(n.replace(",", "")) for n in NUMBER.findall(cell)]


def test_cpu_kernel_benchmark_prints_every_engine_and_ratio():
    rows = run_script("cpu_kernel.py", "--sizes", "64K", "--repeats", "1", "--no-frameworks", timeout=120)
    assert rows["implementation"] == ["64K"]
    for name in ("copy floor", "exp+log1p floor", "naive NumPy", "focalserve 1 thread", "focalserve 2 threads",
                 "focalserve ufunc 1 thread", "focalserve ufunc 2 threads",
                 "1 thread / naive NumPy (target >= 2.5)", "2 threads / 1 thread (target >= 1.7)",
                 "compiled / ufunc, 1 thread"):
        values = numbers(rows[name][0])
        assert values and all(math.isfinite(v) and v > 0 for v in values), (name, rows[name])


def test_service_benchmark_prints_every_measurement():
    rows = run_script("service.py", "--smoke", timeout=300)
    expected = ["unary 64K elements, SUM+grad", "unary 256K elements, SUM+grad", "unary 1K elements, p50 / p99",
                "unary 64K elements, p50 / p99", "ComputeStream 8 x 4K", "8 sequential Compute x 4K",
                "1 concurrent clients x 16K", "4 concurrent clients x 16K", "16 concurrent clients x 16K",
                "4 concurrent clients x 16K, 2 processes", "16 concurrent clients x 16K, 2 processes"]
    assert [name for name in rows if name != "measurement"] == expected
    for name in expected:
        focalserve, floor, ratio = rows[name]
        for cell in (focalserve, floor, ratio):
            values = numbers(cell)
            assert values and all(math.isfinite(v) and v > 0 for v in values), (name, cell)
    # the CPU columns of the concurrency rows: server and client cores of both sides
    assert re.search(r"server \d+\.\d\d / client \d+\.\d\d cores", rows["4 concurrent clients x 16K"][0])
    assert "the floor's own:" in rows["8 sequential Compute x 4K"][2]


def test_client_benchmark_prints_every_row():
    rows = run_script("client.py", "--smoke", timeout=300)
    expected = ["compute 64K elements, with gradient", "compute 64K elements, without gradient",
                "compute 1K elements with gradient, p50", "stream() 8 x 4K, with gradient",
                "split path, 16MB batch (2,097,152 elements), with gradient",
                "one 4MB call (838,041 elements), client peak beyond arrays and result",
                "CLI compute 64K elements, --grad-out (process start, .npy in and out)"]
    assert [name for name in rows if name != "measurement"][:len(expected)] == expected
    for name in expected:
        for cell in rows[name][:2]:
            values = numbers(cell)
            assert values and all(math.isfinite(v) and v >= 0 for v in values), (name, cell)
    # the Node.js row: measured where benchmarks/node_client.js exists, else skipped with the reason
    node = [name for name in rows if name.startswith("Node.js compute")]
    assert len(node) == 1
    assert (BENCHMARKS / "node_client.js").exists() or rows[node[0]][0].startswith("skipped:")
