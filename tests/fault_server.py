"""Test-only launcher: focalserve with a fault injected, for tests/test_faults.py. Never used in production.

    python tests/fault_server.py --inject boom    <focalserve flags>
    python tests/fault_server.py --inject gpu-oom <focalserve flags>   (with --backend gpu --gpu-min-elements 0)

The server's own code has no test hooks: this script patches it from the outside, then runs
`focalserve.app.main` with the remaining flags.

- boom: the NumPy backend raises RuntimeError("injected") for every request whose request_id starts with
  "boom" (the server must answer INTERNAL with an error id, log the traceback and keep serving), and
  takes 1.5 s longer for one whose request_id starts with "slow" (a compute that outlasts a deadline).
- gpu-oom: the server gets a GPU backend (named "cupy", like the real one) whose every run raises
  BackendOutOfMemory, as the CuPy backend does on cupy.cuda.memory.OutOfMemoryError. Its first run, the
  server's warm-up batch, is computed by NumPy so that the server can start.
- gpu-on-cpu: the server gets a GPU backend (named "cupy") that runs the GPU kernel itself, focal_loss.cu,
  compiled as C++ and launched on the CPU as tests/test_cuda_kernel.py does: the GPU engine's arithmetic
  (float32 in float32), where no GPU is, for what depends on which engine runs a request.
"""

from __future__ import annotations

import argparse
import sys
import time

from focalserve import app
from focalserve.backends import BackendOutOfMemory, NumpyBackend, Result

SLOW_SECONDS = 1.5


def inject_boom() -> None:
    run = NumpyBackend.run

    def run_or_raise(self, job):
        if job.request_id.startswith("boom"):
            raise RuntimeError("injected")
        if job.request_id.startswith("slow"):
            time.sleep(SLOW_SECONDS)
        return run(self, job)

    NumpyBackend.run = run_or_raise


class FakeOomGpu:
    """A GPU backend that never has memory for a request."""

    name = "cupy"

    def __init__(self) -> None:
        self.warmed_up = False
        self._cpu = NumpyBackend()

    def devices(self) -> list[str]:
        return ["cuda:0 fake GPU (test double: always out of memory)"]

    def memory(self) -> tuple[int, int]:
        return 0, 1

    def run(self, job):
        if not self.warmed_up:  # the server's warm-up batch, before it says SERVING
            self.warmed_up = True
            return self._cpu.run(job)
        raise BackendOutOfMemory(f"injected: out of memory allocating {job.elements * 8} bytes")


def inject_gpu_oom() -> None:
    app._load_gpu = lambda config: (FakeOomGpu(), "")


class GpuKernelOnCpu:
    """focal_loss.cu, built as C++ and run on the CPU, behind the GPU backend's interface."""

    name = "cupy"

    def __init__(self) -> None:
        import atexit
        import shutil
        import tempfile
        from pathlib import Path

        from test_cuda_kernel import compile_on_cpu  # tests/ is this script's directory
        directory = tempfile.mkdtemp(prefix="focal-cu-")
        atexit.register(shutil.rmtree, directory, True)
        self._library = compile_on_cpu(Path(directory))

    def devices(self) -> list[str]:
        return ["cuda:0 focal_loss.cu run on the CPU (test double)"]

    def memory(self) -> tuple[int, int]:
        return 0, 1

    def run(self, job):
        from test_cuda_kernel import run_on_cpu
        started = time.perf_counter()
        loss, grad, loss_sum, positives = run_on_cpu(self._library, job)
        return Result(loss=loss, grad=grad, elements=job.elements, positives=positives, loss_sum=loss_sum,
                      compute_seconds=time.perf_counter() - started, backend=self.name)


def inject_gpu_on_cpu() -> None:
    app._load_gpu = lambda config: (GpuKernelOnCpu(), "")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inject", choices=("boom", "gpu-oom", "gpu-on-cpu"), required=True)
    ours, rest = parser.parse_known_args(argv)
    {"boom": inject_boom, "gpu-oom": inject_gpu_oom, "gpu-on-cpu": inject_gpu_on_cpu}[ours.inject]()
    return app.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
