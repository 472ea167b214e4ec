"""Two or more builds of the CPU kernel (focal_loss_cpu.cpp) side by side, in one run: for kernel changes.

    g++ -std=c++17 -O3 -fno-math-errno -fno-trapping-math -shared -fPIC A.cpp -o /tmp/a.so   # server/setup.py's flags
    .venv/bin/python benchmarks/kernel_builds.py /tmp/a.so /tmp/b.so [--elements 2097152] [--rounds 7]

Each build runs the CPU backend on one thread over the same jobs (float32 and float64 logits; dense 0/1
labels at 10%, dense soft labels, class-index with C = 5 and C = 80; SUM with gradient), the builds taking
turns within each round; the figure is the best round, in M elements/s.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from focalserve import request as rq
from focalserve.backends import NumpyBackend, cpu_kernel
from focalserve_client.client import build_request


def jobs(n: int) -> dict[str, rq.Job]:
    rng = np.random.default_rng(1)
    out = {}
    for dtype in (np.float32, np.float64):
        name = np.dtype(dtype).name
        x = rng.normal(0, 4, n).astype(dtype)
        out[f"dense 0/1 {name}"] = rq.parse(build_request(x, (rng.random(n) < 0.1).astype(dtype), reduction="sum",
                                                          compute_grad=True))
        out[f"dense soft {name}"] = rq.parse(build_request(x, rng.random(n).astype(dtype), reduction="sum",
                                                           compute_grad=True))
        for classes in (5, 80):
            rows = n // classes
            out[f"class-index C={classes} {name}"] = rq.parse(build_request(
                x[: rows * classes].reshape(rows, classes), rng.integers(-1, classes + 1, (rows, 1)).astype(np.int32),
                label_format="class_index", reduction="sum", compute_grad=True))
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("libraries", nargs="+")
    parser.add_argument("--elements", type=int, default=1 << 21)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    backends = [NumpyBackend(kernel=cpu_kernel.CpuKernel(path)) for path in args.libraries]
    names = [path.rsplit("/", 1)[-1] for path in args.libraries]
    width = max(16, *(len(name) + 2 for name in names))
    print(f"{'M elements/s, 1 thread':30s}" + "".join(f"{name:>{width}s}" for name in names))
    for label, job in jobs(args.elements).items():
        best = [float("inf")] * len(backends)
        for _ in range(args.rounds):
            for i, backend in enumerate(backends):
                started = time.perf_counter()
                backend.run(job)
                best[i] = min(best[i], time.perf_counter() - started)
        print(f"{label:30s}" + "".join(f"{job.elements / b / 1e6:{width}.0f}" for b in best))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
