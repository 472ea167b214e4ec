"""The GPU backend: focal_loss.cu through cupy.RawModule, compiled once per process (and cached on disk by CuPy).

One launch per request reads logit and label and writes loss and gradient; a reduced request writes only
per-block sums, never the per-element loss. Each worker thread has its own non-blocking CUDA stream, and
copies go through pinned host buffers (CuPy's pinned memory pool), so the copy-in, kernel and copy-out of
consecutive stream items, computed by different workers, overlap. The host waits once per request, when
the answer is copied back.
"""

from __future__ import annotations

import threading
import time

import cupy as cp
import cupyx
import numpy as np

from focalserve_client.combine import reduced_loss

from ..request import Job
from . import cuda_kernel
from .base import BackendOutOfMemory, Result
from .kernel_host import finish


class CupyBackend:
    name = "cupy"

    def __init__(self, device_id: int = 0, allow_nonfinite: bool = False):
        self.device_id = device_id
        self.allow_nonfinite = allow_nonfinite
        self._device = cp.cuda.Device(device_id)
        with self._device:
            module = cp.RawModule(code=cuda_kernel.SOURCE.read_text(), options=("--std=c++17",))
            self._kernels = {name: module.get_function(name) for name in cuda_kernel.KERNELS}
            props = cp.cuda.runtime.getDeviceProperties(device_id)
            # enough resident blocks to fill every SM; the grid-stride loop covers the rest
            self._max_blocks = props["multiProcessorCount"] * (props["maxThreadsPerMultiProcessor"] // cuda_kernel.BLOCK)
            name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            self._description = (f"cuda:{device_id} {name}, {props['totalGlobalMem'] / 2**30:.1f} GiB, "
                                 f"sm_{props['major']}{props['minor']}")
            self._dummy = {dt: cp.zeros(1, dt) for dt in (np.float32, np.float64)}
        self._local = threading.local()

    def devices(self) -> list[str]:
        return [self._description]

    def memory(self) -> tuple[int, int]:
        """(used, total) bytes of device memory."""
        with self._device:
            free, total = cp.cuda.runtime.memGetInfo()
        return total - free, total

    def _stream(self) -> cp.cuda.Stream:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            with self._device:
                stream = self._local.stream = cp.cuda.Stream(non_blocking=True)
        return stream

    def run(self, job: Job) -> Result:
        try:
            return self._run(job)
        except cp.cuda.memory.OutOfMemoryError as e:
            raise BackendOutOfMemory(str(e)) from e

    def launch(self, plan: cuda_kernel.KernelPlan, logit: cp.ndarray, label: cp.ndarray,
               grad_output: cp.ndarray | None = None, loss: cp.ndarray | None = None,
               grad: cp.ndarray | None = None) -> tuple[cp.ndarray, cp.ndarray]:
        """One kernel launch on the current stream over device arrays; returns (block_sums, flags), on the device."""
        grid = plan.grid(self._max_blocks)
        block_sums = cp.empty(2 * grid, np.float64)
        flags = cp.zeros(1, np.int32)
        dummy = self._dummy[plan.dtype.type]
        if plan.class_index:
            leading = (logit, label, np.int64(plan.rows), np.int32(plan.classes))
        else:
            leading = (logit, label, np.int64(plan.elements))
        self._kernels[plan.kernel](
            (grid,), (cuda_kernel.BLOCK,),
            (*leading, *plan.scalars, dummy if grad_output is None else grad_output,
             dummy if loss is None else loss, dummy if grad is None else grad, block_sums, flags))
        return block_sums, flags

    def _run(self, job: Job) -> Result:
        started = time.perf_counter()
        plan = cuda_kernel.plan(job, check_finite=not self.allow_nonfinite)
        dtype = job.dtype
        stream = self._stream()
        staged: list[np.ndarray] = []  # pinned sources of in-flight copies: alive until synchronize()
        with self._device, stream:
            logit = _to_device(job.logit.reshape(-1), staged)
            label = _to_device(plan.label, staged)
            grad_output = (_to_device(np.ascontiguousarray(job.grad_output.reshape(-1), dtype), staged)
                           if plan.mode & cuda_kernel.GRAD_OUTPUT else None)
            loss = cp.empty(job.elements, dtype) if plan.mode & cuda_kernel.WRITE_LOSS else None
            grad = cp.empty(job.elements, dtype) if plan.mode & cuda_kernel.WRITE_GRAD else None
            block_sums, flags = self.launch(plan, logit, label, grad_output, loss, grad)
            host_sums = _to_host(block_sums)
            host_flags = _to_host(flags)
            host_loss = _to_host(loss) if loss is not None else None
            host_grad = _to_host(grad) if grad is not None else None
            stream.synchronize()

        loss_sum, positives = finish(job, host_sums, int(host_flags[0]))
        if host_loss is None:
            host_loss = np.asarray(reduced_loss(loss_sum, job.normalizer, job.elements, job.reduction), dtype)
        else:
            host_loss = host_loss.reshape(job.logit.shape)
        return Result(loss=host_loss, grad=host_grad.reshape(job.logit.shape) if host_grad is not None else None,
                      elements=job.elements, positives=positives, loss_sum=loss_sum,
                      compute_seconds=time.perf_counter() - started, backend=self.name)


def _to_device(host: np.ndarray, staged: list) -> cp.ndarray:
    """Host -> device on the current stream, through a pinned staging buffer so the copy is asynchronous."""
    staging = cupyx.empty_pinned(host.shape, host.dtype)
    np.copyto(staging, host)
    staged.append(staging)
    return cp.asarray(staging, blocking=False)


def _to_host(device: cp.ndarray) -> np.ndarray:
    """Device -> pinned host memory, asynchronously on the current stream; valid after synchronize()."""
    out = cupyx.empty_pinned(device.shape, device.dtype)
    return cp.asnumpy(device, out=out, blocking=False)


def load(allow_nonfinite: bool = False) -> tuple[CupyBackend | None, str]:
    """The GPU backend if CuPy sees a device and the kernels compile for it, else None and why. Nothing is
    launched here: the server's warm-up (app.warm_up) runs the first batch before it reports SERVING."""
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            return None, "CuPy sees no CUDA device"
        backend = CupyBackend(0, allow_nonfinite=allow_nonfinite)
        return backend, ""
    except Exception as e:  # no driver, no device, compile failure: the CPU serves
        return None, f"GPU backend unusable: {type(e).__name__}: {e}"
