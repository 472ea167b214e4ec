"""The compiled CPU kernel (focal_loss_cpu.cpp), called through ctypes.

ctypes releases the GIL for the length of each call, so the CPU backend's threads compute their spans of
blocks truly in parallel, with one call per span instead of ~15 ufunc calls per block. The library is
built when the server is installed (server/setup.py); where it is missing (a source tree nobody built),
`load()` says why and the CPU backend keeps its NumPy ufunc pipeline.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np

from .. import request as rq
from ..request import Job
from .kernel_host import SUFFIX, gamma_halves

LIBRARY = "focalserve.backends._focal_loss_cpu"
LIBRARY_SOURCE = Path(__file__).with_name("focal_loss_cpu.cpp")


class Params(ctypes.Structure):
    """`Params` in focal_loss_cpu.cpp, field for field."""

    _fields_ = [("alpha", ctypes.c_double), ("gamma", ctypes.c_double), ("gamma_halves", ctypes.c_int),
                ("check_finite", ctypes.c_int), ("loss_scale", ctypes.c_double), ("grad_scale", ctypes.c_double),
                ("loss_out", ctypes.c_void_p), ("grad_out", ctypes.c_void_p), ("grad_output", ctypes.c_void_p)]


class KernelCall:
    """One request prepared for the library: `run(first, last)` computes blocks [first, last), writes
    their (loss, positives) pairs into `sums[first:last]` and returns the kernel's flags. The arrays
    behind its pointers are held here, so they live as long as the call can run."""

    def __init__(self, function, logit: np.ndarray, label: np.ndarray, units: int, block_units: int,
                 classes: int | None, params: Params, outputs: tuple):
        self.function = function
        self.units, self.block_units = units, block_units      # elements (dense) or rows (class-index)
        self.blocks = -(-units // block_units)
        self.sums = np.zeros((self.blocks, 2), np.float64)
        self._alive = (logit, label, params, outputs)
        self._head = (logit.ctypes.data, label.ctypes.data)
        per_block = (block_units,) if classes is None else (classes, block_units)
        self._tail = (*per_block, ctypes.byref(params), self.sums.ctypes.data)

    def run(self, first: int, last: int) -> int:
        return self.function(*self._head, first * self.block_units, min(last * self.block_units, self.units),
                             *self._tail)


class CpuKernel:
    """The library's entry points, typed."""

    def __init__(self, path: str):
        self.path = path
        lib = ctypes.CDLL(path)
        self._functions = {}
        common = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong]
        tail = [ctypes.c_longlong, ctypes.POINTER(Params), ctypes.c_void_p]
        for t in ("f32", "f64"):
            for lab in ("f32", "f64", "u8"):
                self._functions[f"dense_{t}_{lab}"] = self._typed(lib, f"focal_cpu_dense_{t}_{lab}", common + tail)
            self._functions[f"class_index_{t}"] = self._typed(
                lib, f"focal_cpu_class_index_{t}", common + [ctypes.c_longlong] + tail)
        self.exp_log1p = self._typed(lib, "focal_cpu_exp_log1p",
                                     [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_void_p], None)

    @staticmethod
    def _typed(lib: ctypes.CDLL, name: str, argtypes: list, restype=ctypes.c_uint):
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = restype
        return function

    def prepare(self, job: Job, loss_out: np.ndarray | None, grad_out: np.ndarray | None,
                check_finite: bool, block_elements: int) -> KernelCall:
        """Arguments for `job`; loss_out / grad_out are the (contiguous) outputs or None."""
        dtype = job.dtype
        logit = np.ascontiguousarray(job.logit).reshape(-1)
        grad_output = job.grad_output if job.compute_grad else None
        if grad_output is not None:
            grad_output = np.ascontiguousarray(grad_output, dtype=dtype)
        params = Params(job.alpha, job.gamma, gamma_halves(job.gamma), int(check_finite), 1.0 / job.normalizer,
                        job.grad_scale, _pointer(loss_out), _pointer(grad_out), _pointer(grad_output))
        if job.label_format == rq.CLASS_INDEX:
            rows, classes = job.logit.shape
            label = np.ascontiguousarray(job.label, dtype=np.int32)  # checked to lie in [-1, C]
            units, block_units = (rows if classes else 0), max(1, block_elements // max(classes, 1))
            function = self._functions[f"class_index_{SUFFIX[dtype]}"]
        else:
            label = job.label.reshape(-1)
            if label.dtype == np.bool_:
                label = label.view(np.uint8)  # 0/1 bytes (request.parse)
            elif label.dtype not in SUFFIX:  # float16 labels: rare, converted whole
                label = label.astype(dtype)
            label = np.ascontiguousarray(label)
            classes, units, block_units = None, logit.size, block_elements
            function = self._functions[f"dense_{SUFFIX[dtype]}_{SUFFIX[label.dtype]}"]
        return KernelCall(function, logit, label, units, block_units, classes, params, (loss_out, grad_out, grad_output))


def _pointer(array: np.ndarray | None) -> int | None:
    return None if array is None else array.ctypes.data


def load() -> tuple[CpuKernel | None, str]:
    """The kernel, or None and why not."""
    spec = importlib.util.find_spec(LIBRARY)
    if spec is None or not spec.origin:
        return None, f"{LIBRARY} is not built (pip install the server, e.g. `make setup`)"
    try:
        return CpuKernel(spec.origin), ""
    except OSError as e:
        return None, f"{spec.origin} does not load: {e}"
