"""The CPU backend against the machine's limits and other implementations, side by side in one run.

    make bench-cpu            # or: .venv-bench/bin/python benchmarks/cpu_kernel.py [--sizes 1M,16M,64M] [--write BENCHMARKS.md]

Work: loss + gradient + SUM of float32 logits with binary labels (α = 0.25, γ = 2). For each size, the
median of several runs, in M elements/s, of:
  copy floor      np.copyto of the two inputs into two outputs (16 B per element of memory traffic)
  exp+log1p floor one np.exp and one np.log1p over the same elements, in 32K-element blocks
  naive NumPy     the formulas with whole-array temporaries
  PyTorch         torchvision's sigmoid_focal_loss composition + autograd (1 and 2 threads), if installed
  PaddlePaddle    paddle.nn.functional.sigmoid_focal_loss + autograd (1 and 2 threads), if installed
  focalserve      the CPU backend with its compiled kernel (the default), 1 and 2 threads
  focalserve ufunc the same backend with its NumPy ufunc pipeline (--cpu-kernel ufunc), 1 and 2 threads
Frameworks run in subprocesses so that their thread settings hold from import.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from report import cpu_model, emit, parse_size, size_label

ALPHA, GAMMA = 0.25, 2.0
BLOCK = 32 * 1024


def data(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(0, 3, n).astype(np.float32), (rng.random(n) < 0.1).astype(np.float32)


def median_seconds(run, repeats: int) -> float:
    run()  # warm: allocator, caches, lazy initialisation
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def copy_floor(x, y):
    a, b = np.empty_like(x), np.empty_like(y)
    return lambda: (np.copyto(a, x), np.copyto(b, y))


def transcendental_floor(x, y):
    e, l = np.empty(BLOCK, x.dtype), np.empty(BLOCK, x.dtype)

    def run():
        for s in range(0, x.size, BLOCK):
            m = min(BLOCK, x.size - s)
            np.exp(x[s:s + m], out=e[:m])
            np.log1p(e[:m], out=l[:m])
    return run


def naive(x, y):
    def run():
        p = 1 / (1 + np.exp(-x))
        ce = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
        p_t = p * y + (1 - p) * (1 - y)
        a_t = ALPHA * y + (1 - ALPHA) * (1 - y)
        q = 1 - p_t
        loss = a_t * q ** GAMMA * ce
        grad = a_t * ((p - y) * q ** GAMMA + GAMMA * q ** (GAMMA - 1) * (1 - 2 * y) * p * (1 - p) * ce)
        return float(loss.sum(dtype=np.float64)), grad
    return run


def focalserve_backend(threads: int, compiled: bool = True):
    from focalserve import request as rq
    from focalserve.backends import NumpyBackend, cpu_kernel
    from focalserve_client.client import build_request

    kernel = None
    if compiled:
        kernel, why_not = cpu_kernel.load()
        if kernel is None:
            raise SystemExit(f"the compiled kernel is not built: {why_not}")
    backend = NumpyBackend(threads=threads, kernel=kernel)

    def make(x, y):
        job = rq.parse(build_request(x, y, reduction="sum", compute_grad=True))
        return lambda: backend.run(job)
    return make


FRAMEWORK_SCRIPT = r'''
import json, statistics, sys, time
import numpy as np
framework, threads, sizes, repeats = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
ALPHA, GAMMA = 0.25, 2.0
out = {}
if framework == "torch":
    import torch, torch.nn.functional as F
    torch.set_num_threads(threads)
    def make(x, y):
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        def run():
            xg = xt.clone().requires_grad_(True)   # torchvision.ops.sigmoid_focal_loss, reduction="sum"
            p = torch.sigmoid(xg)
            ce = F.binary_cross_entropy_with_logits(xg, yt, reduction="none")
            p_t = p * yt + (1 - p) * (1 - yt)
            loss = ce * ((1 - p_t) ** GAMMA)
            loss = (ALPHA * yt + (1 - ALPHA) * (1 - yt)) * loss
            loss.sum().backward()
        return run
else:
    import paddle
    paddle.set_device("cpu")
    def make(x, y):
        xp, yp = paddle.to_tensor(x), paddle.to_tensor(y)
        def run():
            xg = xp.clone(); xg.stop_gradient = False
            loss = paddle.nn.functional.sigmoid_focal_loss(xg, yp, alpha=ALPHA, gamma=GAMMA, reduction="sum")
            loss.backward()
        return run
for n in sizes:
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 3, n).astype(np.float32), (rng.random(n) < 0.1).astype(np.float32)
    if framework == "paddle":
        x, y = x.reshape(-1, 1), y.reshape(-1, 1)  # paddle's functional form rejects rank-1 logits
    run = make(x, y); run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
    out[n] = statistics.median(times)
print(json.dumps(out))
'''


def framework_seconds(framework: str, threads: int, sizes: list[int], repeats: int) -> dict[int, float] | None:
    module = {"torch": "torch", "paddle": "paddle"}[framework]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "CPU_NUM": str(threads), "GLOG_minloglevel": "2"}
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, env=env)
    if probe.returncode != 0:
        return None
    out = subprocess.run([sys.executable, "-c", FRAMEWORK_SCRIPT, framework, str(threads), json.dumps(sizes),
                          str(repeats)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(f"{framework} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}




def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1M,16M,64M")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-frameworks", action="store_true", help="skip PyTorch and PaddlePaddle")
    ap.add_argument("--write", help="append the table to this Markdown file")
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]

    columns: dict[str, dict[int, float]] = {}
    local = [("copy floor", copy_floor), ("exp+log1p floor", transcendental_floor), ("naive NumPy", naive),
             ("focalserve 1 thread", focalserve_backend(1)), ("focalserve 2 threads", focalserve_backend(2)),
             ("focalserve ufunc 1 thread", focalserve_backend(1, compiled=False)),
             ("focalserve ufunc 2 threads", focalserve_backend(2, compiled=False))]
    for n in sizes:
        x, y = data(n)
        repeats = args.repeats if n <= (16 << 20) else max(3, args.repeats // 2)
        for name, make in local:
            columns.setdefault(name, {})[n] = median_seconds(make(x, y), repeats)
        del x, y
    if not args.no_frameworks:
        for framework, label in (("torch", "PyTorch"), ("paddle", "PaddlePaddle")):
            for threads in (1, 2):
                seconds = framework_seconds(framework, threads, sizes, max(3, args.repeats // 2))
                if seconds:
                    columns[f"{label} {threads} thread{'s' * (threads > 1)}"] = seconds

    rate = {name: {n: n / s / 1e6 for n, s in col.items()} for name, col in columns.items()}
    ours1, ours2 = rate["focalserve 1 thread"], rate["focalserve 2 threads"]
    header = f"CPU kernel, {cpu_model()}, {os.cpu_count()} cores, NumPy {np.__version__}, " \
             f"{datetime.date.today().isoformat()}: `benchmarks/cpu_kernel.py --sizes {args.sizes}` (M elements/s, median)"
    lines = [header, "", "| implementation | " + " | ".join(size_label(n) for n in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for name, col in rate.items():
        lines.append(f"| {name} | " + " | ".join(f"{col[n]:,.0f}" for n in sizes) + " |")
    lines += ["", "| ratio | " + " | ".join(size_label(n) for n in sizes) + " |", "|---|" + "---|" * len(sizes)]

    def ratio(label: str, num: dict, den: dict | None, invert: bool = False) -> None:
        if den is None:
            return
        cells = [f"{(den[n] / num[n]) if invert else (num[n] / den[n]):.2f}x" for n in sizes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    ratio("1 thread / naive NumPy (target >= 2.5)", ours1, rate["naive NumPy"])
    for other in ("PyTorch 1 thread", "PyTorch 2 threads", "PaddlePaddle 1 thread", "PaddlePaddle 2 threads"):
        if other in rate:
            mine = ours2 if other.endswith("2 threads") else ours1
            ratio(f"focalserve / {other} (target >= 2)", mine, rate[other])
    ratio("exp+log1p floor / 1 thread (target <= 6)", ours1, rate["exp+log1p floor"], invert=True)
    ratio("2 threads / 1 thread (target >= 1.7)", ours2, ours1)
    ratio("1 thread / copy floor", ours1, rate["copy floor"])
    ratio("compiled / ufunc, 1 thread", ours1, rate["focalserve ufunc 1 thread"])
    ratio("ufunc: 2 threads / 1 thread", rate["focalserve ufunc 2 threads"], rate["focalserve ufunc 1 thread"])
    emit(lines, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
