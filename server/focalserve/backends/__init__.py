"""Compute backends: NumPy on the CPU (always), CuPy on a GPU (where one is usable), and the choice per request."""

from __future__ import annotations

import grpc

from focalloss.v1 import focal_loss_pb2 as pb

from ..errors import RequestError
from ..request import Job
from .base import Backend, Result
from .numpy_backend import NumpyBackend

__all__ = ["Backend", "BackendSet", "NumpyBackend", "Result"]


class BackendSet:
    """The backends this server has, and which one runs a request.

    BACKEND_CPU / BACKEND_GPU in a request are obeyed (GPU without one: FAILED_PRECONDITION);
    BACKEND_AUTO follows the server's --backend, where `auto` sends a batch to the GPU when it has at
    least `gpu_min_elements` elements (smaller ones do not pay for the transfer).
    """

    def __init__(self, cpu: Backend, gpu: Backend | None = None, default: str = "auto",
                 gpu_min_elements: int = 0):
        if default == "gpu" and gpu is None:
            raise ValueError("--backend gpu: no GPU is usable (CuPy missing or no CUDA device)")
        self.cpu = cpu
        self.gpu = gpu
        self.default = default if gpu is not None else "cpu"
        self.gpu_min_elements = gpu_min_elements

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
        if self.default == "gpu" or job.elements >= self.gpu_min_elements:
            return self.gpu
        return self.cpu
