"""Compute backends: `cpu` (always: the compiled kernel, or NumPy ufuncs where it is not built), `cupy` on a
GPU (where one is usable), and the choice per request."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc

from focalloss.v1 import focal_loss_pb2 as pb

from ..errors import RequestError
from ..request import Job
from .base import Backend, BackendOutOfMemory, Result
from .numpy_backend import NumpyBackend

__all__ = ["Backend", "BackendOutOfMemory", "BackendSet", "NumpyBackend", "Result", "measure_crossover"]

log = logging.getLogger("focalserve")


class BackendSet:
    """The backends this server has, and which one runs a request.

    BACKEND_CPU / BACKEND_GPU in a request are obeyed (GPU without one: FAILED_PRECONDITION);
    BACKEND_AUTO follows the server's --backend, where `auto` sends a batch to the GPU when it has at
    least `gpu_min_elements` elements (smaller ones do not pay for the transfer). A chunk of a split batch
    is counted at the whole batch's size (`batch_elements`), so that all its chunks run on one engine:
    the engines agree to a few ulps, not to the bit.
    """

    def __init__(self, cpu: Backend, gpu: Backend | None = None, default: str = "auto",
                 gpu_min_elements: int = 0, on_gpu_fallback: Callable[[], None] | None = None):
        if default == "gpu" and gpu is None:
            raise ValueError("--backend gpu: no GPU is usable (CuPy missing or no CUDA device)")
        self.cpu = cpu
        self.gpu = gpu
        self.default = default if gpu is not None else "cpu"
        self.gpu_min_elements = gpu_min_elements
        self._on_gpu_fallback = on_gpu_fallback

    @property
    def names(self) -> list[str]:
        return [b.name for b in (self.cpu, self.gpu) if b is not None]

    @property
    def default_name(self) -> str:
        return self.gpu.name if self.default in ("gpu", "auto") and self.gpu is not None else self.cpu.name

    def devices(self) -> list[str]:
        return [d for b in (self.cpu, self.gpu) if b is not None for d in b.devices()]

    def select(self, job: Job) -> Backend:
        if job.backend == pb.BACKEND_CPU:
            return self.cpu
        if job.backend == pb.BACKEND_GPU:
            if self.gpu is None:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                   ("backend", "BACKEND_GPU was asked for but this server has no usable GPU "
                                               f"(its backends: {', '.join(self.names)})"))
            return self.gpu
        if self.gpu is None or self.default == "cpu":
            return self.cpu
        if self.default == "gpu" or job.engine_elements >= self.gpu_min_elements:
            return self.gpu
        return self.cpu

    def run(self, job: Job) -> Result:
        """Runs `job` on its backend; a GPU out of memory for it hands it to the CPU instead of failing."""
        backend = self.select(job)
        try:
            return backend.run(job)
        except BackendOutOfMemory as e:
            log.warning("GPU out of memory for request %r (%d elements): computed on the CPU (%s)",
                        job.request_id, job.elements, e, extra={"fields": {
                            "event": "gpu_out_of_memory", "request_id": job.request_id, "elements": job.elements}})
            if self._on_gpu_fallback is not None:
                self._on_gpu_fallback()
            return self.cpu.run(job)


def measure_crossover(cpu: Backend, gpu: Backend, make_job: Callable[[int], Job],
                      sizes: tuple[int, ...] = tuple(1 << k for k in range(10, 25, 2)), repeats: int = 3) -> int:
    """The smallest batch (elements) from `sizes` at which `gpu`, transfers included, beats `cpu`.

    BACKEND_AUTO's threshold is measured on the machine at start-up rather than guessed: it depends on
    the GPU, the PCIe link and the CPU alike. Returns a size beyond `sizes` if the GPU never wins.
    """
    def best(backend: Backend, job: Job) -> float:
        backend.run(job)  # warm: pools, caches
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            backend.run(job)
            times.append(time.perf_counter() - started)
        return min(times)

    for size in sizes:
        job = make_job(size)
        if best(gpu, job) < best(cpu, job):
            return size
    return sizes[-1] * 2
