"""The framework drop-ins' overhead, and a forward+backward through the service next to the frameworks' own
CPU ops, measured side by side in one run.

    make bench-frameworks     # or: .venv-frameworks/bin/python benchmarks/frameworks.py [--write BENCHMARKS.md]

One server (CPU backend, the tuned allocator) on loopback; float32 logits [N/128, 128] with float32 binary
labels, reduction SUM, loss and gradient. For each size, these take turns call by call (--calls of each;
the figures are medians):

  client.compute          FocalLossClient.compute(..., compute_grad=True) on NumPy arrays: the floor
  torch drop-in           focalserve_client.torch.sigmoid_focal_loss forward + loss.backward()
  paddle drop-in          focalserve_client.paddle.sigmoid_focal_loss forward + loss.backward()
  torch own op            torchvision's formula in torch ops + autograd (torch's CPU threads)
  paddle own op           paddle.nn.functional.sigmoid_focal_loss + autograd (Paddle's CPU threads)

OMP_WAIT_POLICY=PASSIVE unless set: with torch's OpenMP threads spinning after each op (the default), a
client sharing its cores with the server starves it (a 64K drop-in call: 2.6 -> 17 ms on 2 cores).

A drop-in's overhead is the median over i of (drop-in call i / client.compute call i) - 1: what it adds
to the plain call it makes (tensor to NumPy, the result back to a tensor, the backward's scaling).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads its OpenMP runtime

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.nn.functional as PF  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from focalserve_client import FocalLossClient  # noqa: E402
from focalserve_client.paddle import sigmoid_focal_loss as paddle_dropin  # noqa: E402
from focalserve_client.torch import sigmoid_focal_loss as torch_dropin  # noqa: E402
from report import cpu_model, emit, parse_size, size_label  # noqa: E402

ENV = {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736", "MALLOC_ARENA_MAX": "1"}
ALPHA, GAMMA = 0.25, 2.0


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "focalserve", "--host", "127.0.0.1", "--port", str(port),
                             "--metrics-port", "-1", "--backend", "cpu"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"127.0.0.1:{port}"
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError("the server did not start")


def variants(client: FocalLossClient, n: int) -> dict:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((n // 128, 128)) * 2).astype(np.float32)
    y = (rng.random((n // 128, 128)) < 0.1).astype(np.float32)
    # one leaf tensor each, its gradient cleared before every call: no clone inside the timed calls, which
    # client.compute does not pay either
    xt, yt = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(y)
    xp, yp = paddle.to_tensor(x, stop_gradient=False), paddle.to_tensor(y)

    def plain():
        client.compute(x, y, alpha=ALPHA, gamma=GAMMA, reduction="sum", compute_grad=True)

    def torch_service():
        xt.grad = None
        torch_dropin(xt, yt, alpha=ALPHA, gamma=GAMMA, reduction="sum", client=client).backward()

    def paddle_service():
        xp.clear_gradient(set_to_zero=False)
        paddle_dropin(xp, yp, alpha=ALPHA, gamma=GAMMA, reduction="sum", client=client).backward()

    def torch_own():
        xt.grad = None  # torchvision.ops.sigmoid_focal_loss, reduction="sum"
        p = torch.sigmoid(xt)
        ce = F.binary_cross_entropy_with_logits(xt, yt, reduction="none")
        p_t = p * yt + (1 - p) * (1 - yt)
        loss = ce * ((1 - p_t) ** GAMMA)
        loss = (ALPHA * yt + (1 - ALPHA) * (1 - yt)) * loss
        loss.sum().backward()

    def paddle_own():
        xp.clear_gradient(set_to_zero=False)
        PF.sigmoid_focal_loss(xp, yp, alpha=ALPHA, gamma=GAMMA, reduction="sum").backward()

    return {"client.compute": plain, "torch drop-in": torch_service, "paddle drop-in": paddle_service,
            "torch own op": torch_own, "paddle own op": paddle_own}


def interleaved(fns: dict, calls: int) -> dict[str, list[float]]:
    """`calls` timings of each variant, taking turns call by call: on a shared, loaded machine the load
    drifts over seconds, and turns put every variant's call i under about the same load."""
    for fn in fns.values():
        fn()  # warm: first-call allocations, the frameworks' kernel selection
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for turn in range(calls):
        # each turn starts one variant later, so that no variant always follows the same other one
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def paired_median(times: dict[str, list[float]], name: str, base: str) -> float:
    """The median of call i's ratio name / base: each ratio compares calls made one after the other."""
    return statistics.median(a / b for a, b in zip(times[name], times[base]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1M,4M", help="comma-separated element counts (K/M suffixes)")
    ap.add_argument("--calls", type=int, default=50, help="timed calls of each variant")
    ap.add_argument("--write", help="append the table to this Markdown file")
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    paddle.set_device("cpu")

    proc, target = start_server()
    try:
        with FocalLossClient(target) as client:
            results = {}
            for n in sizes:
                fns = variants(client, n)
                results[n] = interleaved(fns, args.calls)
    finally:
        proc.terminate()
        proc.wait(30)

    names = list(next(iter(results.values())))
    lines = [f"<!-- benchmarks/frameworks.py, {datetime.date.today()}, {cpu_model()}, {os.cpu_count()} CPUs, "
             f"torch {torch.__version__} ({torch.get_num_threads()} threads, OMP_WAIT_POLICY="
             f"{os.environ['OMP_WAIT_POLICY']}), paddle {paddle.__version__}, "
             f"{args.calls} calls of each, taking turns -->",
             "",
             "| forward + backward, float32, SUM | " + " | ".join(size_label(n) for n in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for name in names:
        cells = []
        for n in sizes:
            ms = statistics.median(results[n][name]) * 1e3
            cells.append(f"{ms:.2f} ms ({n / ms / 1e3:.0f} M elem/s)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name in ("torch drop-in", "paddle drop-in"):
        cells = [f"{(paired_median(results[n], name, 'client.compute') - 1) * 100:+.1f}%" for n in sizes]
        lines.append(f"| {name} overhead over client.compute | " + " | ".join(cells) + " |")
    for name, own in (("torch", "torch own op"), ("paddle", "paddle own op")):
        cells = [f"{paired_median(results[n], name + ' drop-in', own):.2f}x" for n in sizes]
        lines.append(f"| {name} drop-in / {own} | " + " | ".join(cells) + " |")
    emit(lines, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
