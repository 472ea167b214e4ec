"""The GPU kernel against the GPU's memory speed and against PyTorch, measured side by side in one run.

    python benchmarks/gpu_kernel.py [--sizes 1M,16M,256M] [--write BENCHMARKS.md]

For each size (float32, binary labels, α = 0.25, γ = 2) it times, with CUDA events (cupyx.profiler):
- the focal kernel alone (device-resident inputs) for SUM + gradient (reads 8 B, writes 4 B per element)
  and NONE + gradient (writes 8 B), and its effective bandwidth: bytes read + written / time;
- a device-to-device cudaMemcpy moving the same number of bytes (read + written): the memory floor;
- the same loss + gradient as a PyTorch composition (torchvision's sigmoid_focal_loss + autograd), where
  PyTorch with CUDA is installed.
Ratios are of figures taken in this run. Needs CuPy and a CUDA device.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import cupy as cp
import numpy as np
from cupyx.profiler import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "client"))

from focalserve.backends import cuda_kernel  # noqa: E402
from focalserve.backends.cupy_backend import CupyBackend  # noqa: E402
from focalserve.request import Job  # noqa: E402
from report import emit, parse_size  # noqa: E402

ALPHA, GAMMA = 0.25, 2.0



def median_ms(result) -> float:
    return float(np.median(result.gpu_times[0])) * 1e3


def host_job(n: int, reduction: str) -> Job:
    """A job whose host arrays are never touched (np.empty): only the launch plan is taken from it."""
    return Job(request_id="bench", logit=np.empty(n, np.float32), label=np.empty(n, np.float32),
               label_format="dense", alpha=ALPHA, gamma=GAMMA, normalizer=1.0, reduction=reduction,
               compute_grad=True, grad_output=None, grad_scale=1.0, backend=0)


def torch_focal(repeats: int, x_cp: cp.ndarray, y_cp: cp.ndarray) -> float | None:
    """Median ms of torchvision-style sigmoid_focal_loss (sum) forward + backward, or None without torch."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    x = torch.from_dlpack(x_cp).detach().clone().requires_grad_(True)
    y = torch.from_dlpack(y_cp)

    def step():
        x.grad = None
        p = torch.sigmoid(x)
        ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        p_t = p * y + (1 - p) * (1 - y)
        loss = ce * ((1 - p_t) ** GAMMA)
        alpha_t = ALPHA * y + (1 - ALPHA) * (1 - y)
        (alpha_t * loss).sum().backward()

    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1M,16M,256M")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--write", help="append the table to this Markdown file (e.g. BENCHMARKS.md)")
    args = ap.parse_args()

    backend = CupyBackend(0)
    device = backend.devices()[0]
    rows = []
    for n in map(parse_size, args.sizes.split(",")):
        x = cp.random.standard_normal(n, dtype=cp.float32) * 4
        y = (cp.random.random(n) < 0.1).astype(cp.float32)
        grad = cp.empty(n, cp.float32)
        loss = cp.empty(n, cp.float32)
        figures = {}
        for reduction, out_bytes in (("sum", 4), ("none", 8)):
            plan = cuda_kernel.plan(host_job(n, reduction), check_finite=True)
            kernel = benchmark(backend.launch, (plan, x, y, None, loss if reduction == "none" else None, grad),
                               n_repeat=args.repeats, n_warmup=3)
            moved = n * (8 + out_bytes)
            src = cp.empty(moved // 2, cp.uint8)
            dst = cp.empty(moved // 2, cp.uint8)
            copy = benchmark(cp.cuda.runtime.memcpyAsync,
                             (dst.data.ptr, src.data.ptr, moved // 2, cp.cuda.runtime.memcpyDeviceToDevice,
                              cp.cuda.get_current_stream().ptr), n_repeat=args.repeats, n_warmup=3)
            figures[reduction] = (median_ms(kernel), moved, median_ms(copy))
            del src, dst
        torch_ms = torch_focal(args.repeats, x, y)
        rows.append((n, figures, torch_ms))
        del x, y, grad, loss
        cp.get_default_memory_pool().free_all_blocks()

    date = datetime.date.today().isoformat()
    lines = [f"GPU kernel, {device}, CuPy {cp.__version__}, {date}, `python benchmarks/gpu_kernel.py --sizes {args.sizes}`",
             "",
             "| elements | work | kernel ms | GB/s (read+written) | copy GB/s | kernel / copy | PyTorch ms | speed-up vs PyTorch |",
             "|---|---|---|---|---|---|---|---|"]
    for n, figures, torch_ms in rows:
        for reduction, (ms, moved, copy_ms) in figures.items():
            bandwidth, copy_bandwidth = moved / ms / 1e6, moved / copy_ms / 1e6
            speedup = f"{torch_ms / ms:.1f}x" if torch_ms and reduction == "sum" else "-"
            torch_text = f"{torch_ms:.3f}" if torch_ms and reduction == "sum" else "-"
            lines.append(f"| {n:,} | {reduction.upper()} + grad | {ms:.3f} | {bandwidth:,.0f} | {copy_bandwidth:,.0f} | "
                         f"{bandwidth / copy_bandwidth:.0%} | {torch_text} | {speedup} |")
    emit(lines, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
