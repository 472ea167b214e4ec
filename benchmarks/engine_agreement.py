"""How far each engine is from the exact values, in ulps, by γ: the figures behind README "What it computes".

    .venv/bin/python benchmarks/engine_agreement.py [--elements 40000] [--seed 5]

For each γ, float32 and float64 logits (half N(0, 3), half N(0, 30)), 0/1 labels and soft labels, α drawn in
[0, 1], REDUCTION_NONE with gradient: the worst error of the loss and the gradient against a long-double
evaluation of the same formulas, counted as tests/test_engine_agreement.py counts it (which asserts the
bounds printed in the last column). Engines: the compiled CPU kernel, the NumPy ufunc fallback, and the GPU
kernel (focal_loss.cu) built as C++ and run on the CPU with glibc's expf/log1pf.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from focalserve import request as rq  # noqa: E402
from focalserve.backends import NumpyBackend, cpu_kernel  # noqa: E402
from focalserve_client.client import build_request  # noqa: E402
from test_cuda_kernel import compile_on_cpu, run_on_cpu  # noqa: E402
from test_engine_agreement import reference, ulps  # noqa: E402

GAMMAS = (0.0, 0.5, 1.0, 2.0, 2.7, 3.5, 5.0, 8.0)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=40_000)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args(argv)
    kernel, why_not = cpu_kernel.load()
    if kernel is None:
        print(f"the compiled kernel is not built: {why_not}", file=sys.stderr)
        return 1
    directory = tempfile.mkdtemp(prefix="focal-cu-")
    atexit.register(shutil.rmtree, directory, True)
    gpu_kernel = compile_on_cpu(Path(directory))
    engines = {"compiled": NumpyBackend(kernel=kernel).run, "ufunc": NumpyBackend().run,
               "GPU kernel on CPU": lambda job: _result(run_on_cpu(gpu_kernel, job))}
    rng = np.random.default_rng(args.seed)
    n = args.elements
    print(f"worst error in ulps over {n} elements per cell (0/1 labels | soft labels); tested bound: "
          "1 for the compiled kernel's float32, 8 + 6γ otherwise")
    print(f"{'γ':>4} {'dtype':>8} " + " ".join(f"{name:>19}" for name in engines) + f" {'8 + 6γ':>7}")
    for gamma in GAMMAS:
        for dtype in (np.float32, np.float64):
            x = np.concatenate([rng.normal(0, 3, n // 2), rng.normal(0, 30, n - n // 2)]).astype(dtype)
            alpha = float(rng.uniform(0, 1))
            cells = []
            for name, run in engines.items():
                worst = []
                for label in ((rng.random(n) < 0.4).astype(dtype), rng.random(n).astype(dtype)):
                    job = rq.parse(build_request(x, label, alpha=alpha, gamma=gamma, reduction="none",
                                                 compute_grad=True))
                    result = run(job)
                    exact_loss, exact_grad, largest = reference(job)
                    worst.append(max(float(ulps(result.loss, exact_loss).max()),
                                     float(ulps(result.grad, exact_grad, largest).max())))
                cells.append(f"{worst[0]:8.1f} | {worst[1]:8.1f}")
            print(f"{gamma:>4} {np.dtype(dtype).name:>8} " + " ".join(f"{c:>19}" for c in cells) + f" {8 + 6 * gamma:>7.0f}")
    return 0


class _result:
    def __init__(self, outputs):
        self.loss, self.grad = outputs[0], outputs[1]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
