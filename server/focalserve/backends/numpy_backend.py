"""The CPU backend: sigmoid focal loss and gradient over cache-sized blocks, in one of two engines.

- The compiled kernel (focal_loss_cpu.cpp through cpu_kernel.py), the default: one vectorised pass per
  block in double precision, called without the GIL, so threads scale with cores.
- The fused ufunc pipeline below, the fallback where the kernel is not built and the independent reference
  the kernel is tested against: about 15 passes of NumPy ufuncs over a block held in L2.

Both compute the same formulas and report bad values the same way.

Per element, with x the logit, y the label (soft labels allowed), p = σ(x) (SPEC §1):

    CE      = softplus(-|x|) + y·relu(-x) + (1-y)·relu(x)          # y·softplus(-x) + (1-y)·softplus(x)
    q       = 1 - p_t = σ(-x)·y + σ(x)·(1-y)
    α_t     = α·y + (1-α)·(1-y)                                   # as written: y·(2α-1) + (1-α) cancels
    loss    = α_t · q^γ · CE
    dloss/dx = α_t · q^γ · [ (p - y) + γ·(1-2y)·r·CE ],   r = σ(x)·σ(-x) / q  (0 where q = 0)

Numerically (SPEC §1.5): σ(x) and σ(-x) both come from e = exp(-|x|) as r·max(e, h) and r·max(e, 1-h)
with r = 1/(1+e) and h = [x >= 0], so neither is formed as 1 minus the other; every sum above adds
non-negative terms except p - y = σ(x)·(1-y) - σ(-x)·y, whose cancellation is the true value's. The
result is finite for every finite logit and every γ >= 0, with no negative power of q.

In the ufunc pipeline each block's intermediates live in per-thread scratch buffers that stay in L2. In
both engines the per-element loss is only written out for reduction NONE, the loss sum is accumulated per
block in float64 and the blocks' sums are added with math.fsum, so the result does not depend on how
blocks are split among threads.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from focalserve_client.combine import reduced_loss

from .. import request as rq
from ..request import Job
from .base import Result
from .cpu_kernel import CpuKernel
from .kernel_host import finish, gamma_halves

# One thread: 32K-element blocks keep every buffer in L2. Several threads: each ufunc call releases and
# retakes the GIL, so blocks must be large enough (128K) that the handoffs cost little next to the work.
BLOCK_ELEMENTS_ONE_THREAD = 32 * 1024
BLOCK_ELEMENTS_THREADED = 128 * 1024
# The compiled kernel keeps a block's intermediates in registers: blocks only set how finely a request is
# shared among threads (from 64K elements, ~100 µs of work a block) and the granularity of the loss sums.
BLOCK_ELEMENTS_COMPILED = 32 * 1024
_SCRATCH_BUFFERS = 8


class _Scratch:
    """Per-thread block buffers of one dtype, allocated once and reused by every request: the size of one
    block (a class-index row wider than a block is computed in pieces), whatever the requests' shapes."""

    def __init__(self, dtype: np.dtype, block: int):
        self.buffers = [np.empty(block, dtype) for _ in range(_SCRATCH_BUFFERS)]
        self.label = np.empty(block, dtype)
        self.keep = np.empty(block, dtype)
        self.neg_abs = np.empty(block, dtype)
        self.zeros = np.zeros(block, dtype)
        self.p_t = np.empty(block, dtype)
        self.mask = np.empty(block, np.bool_)
        self.mask2 = np.empty(block, np.bool_)
        self._classes = np.empty(0, np.int32)

    def class_numbers(self, width: int, dtype: np.dtype) -> np.ndarray:
        """1..C as the labels' dtype, made once per request rather than per block; only the last one is
        kept (one per (C, dtype) ever seen grew without bound)."""
        if self._classes.size != width or self._classes.dtype != dtype:
            self._classes = np.arange(1, width + 1, dtype=dtype)
        return self._classes

    def views(self, n: int) -> list[np.ndarray]:
        return [b[:n] for b in self.buffers]


def _power(q: np.ndarray, gamma: float, out: np.ndarray) -> np.ndarray:
    """q**gamma, by multiplication for the common integer and half-integer γ (faster and exact-er than pow).
    γ = 2 is one pass (q·q); callers skip γ = 0."""
    halves = gamma_halves(gamma)
    if halves >= 0:
        whole = halves // 2
        if halves % 2:
            np.sqrt(q, out=out)
        elif whole >= 2:
            np.multiply(q, q, out=out)
            whole -= 2
        else:  # γ = 1
            np.copyto(out, q)
            whole = 0
        for _ in range(whole):
            out *= q
        return out
    return np.power(q, gamma, out=out)


def focal_block(x: np.ndarray, neg_abs_x: np.ndarray, y: np.ndarray, alpha: float, gamma: float,
                want_grad: bool, scratch: _Scratch) -> tuple[np.ndarray, np.ndarray | None]:
    """Loss and dloss/dx of one block (before normalizer, reduction and grad_output), in scratch buffers.

    Written for few passes and few live buffers (at most 8 besides the label and p_t), so that a block of
    block stays in L2 (BLOCK_ELEMENTS_ONE_THREAD) or nearly (BLOCK_ELEMENTS_THREADED).
    """
    n = x.size
    b = scratch.views(n)
    e = np.exp(neg_abs_x, out=b[0])                    # e = exp(-|x|)
    ce = np.log1p(e, out=b[1])                         # softplus(-|x|), the start of CE
    r = np.add(e, 1.0, out=b[2])
    np.reciprocal(r, out=r)                            # 1/(1+e)
    h = np.greater_equal(x, 0.0, out=b[3])             # [x >= 0] as 0/1
    p = np.maximum(e, h, out=b[4])
    p *= r                                             # σ(x)
    np.subtract(1.0, h, out=h)
    omp = np.maximum(e, h, out=b[3])
    omp *= r                                           # σ(-x) = 1 - p, never by subtraction

    omy = np.subtract(1.0, y, out=b[5])
    relu_x = np.maximum(x, scratch.zeros[:n], out=b[0])
    relu_neg_x = np.subtract(relu_x, x, out=b[2])      # exact: 0 - x or x - x
    relu_neg_x *= y
    ce += relu_neg_x
    relu_x *= omy
    ce += relu_x                                       # CE = sp + y·relu(-x) + (1-y)·relu(x)

    omp_y = np.multiply(omp, y, out=b[0])
    p_omy = np.multiply(p, omy, out=b[2])
    q = np.add(omp_y, p_omy, out=b[6])                 # 1 - p_t
    if want_grad:
        np.subtract(p_omy, omp_y, out=p_omy)           # p - y, from the products: no cancellation but its own
    weight = np.multiply(y, alpha, out=b[0])
    weight += np.multiply(omy, 1.0 - alpha, out=b[7])  # α_t = α·y + (1-α)·(1-y): exact for small α
    if gamma != 0.0:
        weight *= _power(q, gamma, out=b[7])           # α_t · q^γ
    loss = np.multiply(weight, ce, out=b[7])
    if not want_grad:
        return loss, None

    grad = p_omy                                       # p - y
    if gamma != 0.0:
        # a 0/1 label's r is p_t itself, taken as focal_block_hard takes it: the quotient can differ from it
        # by an ulp, and whether a block is all hard depends on where the request's blocks start
        p_t = scratch.p_t[:n]
        np.copyto(p_t, omp)
        np.copyto(p_t, p, where=np.greater(y, 0.5, out=scratch.mask[:n]))
        focus = np.multiply(p, omp, out=b[4])
        den = np.equal(q, 0.0, out=b[3])
        den += q
        focus /= den                                   # r = p(1-p)/q, 0 where q == 0
        hard = np.equal(y, 0.0, out=scratch.mask[:n])
        hard |= np.equal(y, 1.0, out=scratch.mask2[:n])
        np.copyto(focus, p_t, where=hard)
        focus *= ce
        one_m_2y = np.subtract(omy, y, out=b[5])
        focus *= one_m_2y
        focus *= gamma
        grad += focus
    grad *= weight
    return loss, grad

def focal_block_hard(x: np.ndarray, neg_abs_x: np.ndarray, y: np.ndarray, alpha: float, gamma: float,
                     want_grad: bool, scratch: _Scratch) -> tuple[np.ndarray, np.ndarray | None]:
    """focal_block for labels that are all 0 or 1, in about two thirds of the passes.

    With s = 1 - 2y (±1) and t = s·x:  1 - p_t = σ(t),  CE = softplus(t),  and
        dloss/dx = s · α_t · σ(t)^γ · [σ(t) + γ·σ(-t)·CE]
    (for y = 1 the legacy op's -α(1-p)^γ[(1-p) - γ·p·log p]); every term is non-negative, so there is
    no subtraction at all, and t is exact.
    """
    n = x.size
    b = scratch.views(n)
    sign = np.multiply(y, -2.0, out=b[0])
    sign += 1.0                                        # s = 1 - 2y
    t = np.multiply(x, sign, out=b[1])
    e = np.exp(neg_abs_x, out=b[2])                    # exp(-|t|): |t| = |x|
    ce = np.log1p(e, out=b[3])
    r = np.add(e, 1.0, out=b[4])
    np.reciprocal(r, out=r)
    h = np.greater_equal(t, 0.0, out=b[5])
    q = np.maximum(e, h, out=b[6])
    q *= r                                             # σ(t) = 1 - p_t
    if want_grad:
        np.subtract(1.0, h, out=h)
        np.maximum(e, h, out=h)
        h *= r                                         # σ(-t) = p_t
    relu_t = np.maximum(t, scratch.zeros[:n], out=b[2])
    ce += relu_t                                       # softplus(t)
    weight = np.multiply(y, alpha, out=b[1])
    omy = np.subtract(1.0, y, out=b[4])
    omy *= 1.0 - alpha
    weight += omy                                      # α_t, exact: one of the two terms is 0
    if gamma != 0.0:
        weight *= _power(q, gamma, out=b[4])           # α_t · q^γ
    loss = np.multiply(weight, ce, out=b[4])
    if not want_grad:
        return loss, None
    grad = np.multiply(h, ce, out=b[5])
    grad *= gamma
    grad += q
    grad *= weight
    grad *= sign
    return loss, grad


class NumpyBackend:
    """The CPU backend. Computes with the compiled kernel (focal_loss_cpu.cpp) when `kernel` is given,
    else with the fused ufunc pipeline above; `threads` > 1 splits a large request's blocks over a pool."""

    # what responses, GetServerInfo and metric labels call it: the --backend flag's and BACKEND_CPU's name,
    # whichever engine computes (the device string says which)
    name = "cpu"

    def __init__(self, threads: int = 1, block_elements: int | None = None,
                 allow_nonfinite: bool = False, kernel: CpuKernel | None = None):
        self.threads = max(1, threads)
        self.kernel = kernel
        self.block_elements = block_elements or (
            BLOCK_ELEMENTS_COMPILED if kernel is not None
            else BLOCK_ELEMENTS_THREADED if self.threads > 1 else BLOCK_ELEMENTS_ONE_THREAD)
        self.allow_nonfinite = allow_nonfinite
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(self.threads, "focal-block") if self.threads > 1 else None

    @property
    def engine(self) -> str:
        return "compiled kernel" if self.kernel is not None else "NumPy ufuncs"

    def devices(self) -> list[str]:
        # the engine too: a replica whose kernel did not build computes 2-4x slower, and says so here
        return [f"cpu ({_cpu_model()}; {self.engine})"]

    def _scratch(self, dtype: np.dtype) -> _Scratch:
        """This thread's buffers for `dtype`: one block's worth, for as long as the thread lives."""
        cache = self._local.__dict__.setdefault("scratch", {})
        scratch = cache.get(dtype)
        if scratch is None:
            scratch = cache[dtype] = _Scratch(dtype, self.block_elements)
        return scratch

    def _over_blocks(self, blocks: int, run_span) -> list:
        """run_span(first, last) over [0, blocks), in contiguous spans shared among the threads."""
        if blocks == 0:
            return []
        if self._pool is None or blocks == 1:
            return [run_span(0, blocks)]
        step = -(-blocks // self.threads)
        futures = [self._pool.submit(run_span, i, min(i + step, blocks)) for i in range(step, blocks, step)]
        first = run_span(0, min(step, blocks))  # the calling thread takes a span too: one hop fewer
        return [first] + [f.result() for f in futures]

    def run(self, job: Job) -> Result:
        started = time.perf_counter()
        loss_out = np.empty(job.logit.shape, job.dtype) if job.reduction == "none" else None
        grad_out = np.empty(job.logit.shape, job.dtype) if job.compute_grad else None
        if self.kernel is not None:
            loss_sum, positives = self._run_compiled(job, loss_out, grad_out)
        else:
            loss_sum, positives = self._run_ufuncs(job, loss_out, grad_out)
        if loss_out is None:
            loss_out = np.asarray(reduced_loss(loss_sum, job.normalizer, job.elements, job.reduction), job.dtype)
        return Result(loss=loss_out, grad=grad_out, elements=job.elements, positives=positives,
                      loss_sum=loss_sum, compute_seconds=time.perf_counter() - started, backend=self.name)

    def _run_compiled(self, job: Job, loss_out: np.ndarray | None,
                      grad_out: np.ndarray | None) -> tuple[float, float]:
        call = self.kernel.prepare(job, loss_out, grad_out, check_finite=not self.allow_nonfinite,
                                   block_elements=self.block_elements)
        flags = 0
        for span_flags in self._over_blocks(call.blocks, call.run):
            flags |= span_flags
        return finish(job, call.sums, flags)

    def _run_ufuncs(self, job: Job, loss_out: np.ndarray | None,
                    grad_out: np.ndarray | None) -> tuple[float, float]:
        dtype = job.dtype
        width = job.num_classes if job.label_format == rq.CLASS_INDEX else 1
        rows = job.elements // width if width else 0
        # blocks of whole rows, at most block_elements; a wider row is cut into `pieces` blocks of its own
        pieces = max(1, -(-width // self.block_elements))
        piece = -(-width // pieces)
        rows_per_block = max(1, self.block_elements // max(width, 1))
        blocks = rows * pieces if pieces > 1 else -(-rows // rows_per_block)
        block_sums = np.zeros(blocks, np.float64)
        block_positives = np.zeros(blocks, np.int64)
        outputs = (loss_out.reshape(-1) if loss_out is not None else None,
                   grad_out.reshape(-1) if grad_out is not None else None)

        def elements_of(k: int) -> tuple[int, int]:
            if pieces > 1:
                row, part = divmod(k, pieces)
                start = row * width + part * piece
                return start, min(start + piece, (row + 1) * width)
            return k * rows_per_block * width, min((k + 1) * rows_per_block, rows) * width

        def run_blocks(first: int, last: int) -> None:
            scratch = self._scratch(dtype)
            for k in range(first, last):
                block_sums[k], block_positives[k] = self._block(job, *elements_of(k), width, scratch, outputs)

        self._over_blocks(blocks, run_blocks)
        loss_sum = math.fsum(block_sums)
        positives = job.positives if job.positives is not None else float(block_positives.sum())
        return loss_sum, positives

    def _block(self, job: Job, s: int, t: int, width: int, scratch: _Scratch,
               outputs: tuple[np.ndarray | None, np.ndarray | None]) -> tuple[float, int]:
        """Elements [s, t): whole rows of a class-index request, or a piece of one row."""
        n = t - s
        x = job.logit.reshape(-1)[s:t]
        neg_abs_x = np.copysign(x, -1.0, out=scratch.neg_abs[:n])
        # -|x| is finite iff x is, and min() propagates NaN: one reduction tells
        if not self.allow_nonfinite and not neg_abs_x.min() >= -np.finfo(x.dtype).max:
            rq.raise_nonfinite_logits(s, x)
        if job.label_format == rq.CLASS_INDEX:
            if s % width == 0 and n % width == 0:
                y, keep, positives = self._class_index_labels(job.label[s // width:t // width], width, scratch)
            else:
                y, keep, positives = self._class_index_piece(job.label, s, n, width, scratch)
            hard = True
        else:
            y, keep, positives = self._dense_labels(job.label.reshape(-1)[s:t], s, scratch)
            hard = job.label.dtype in (np.uint8, np.bool_) or _all_hard(y, scratch)

        kernel = focal_block_hard if hard else focal_block
        loss, grad = kernel(x, neg_abs_x, y, job.alpha, job.gamma, job.compute_grad, scratch)
        if keep is not None:
            loss *= keep
            if grad is not None:
                grad *= keep
        loss_out, grad_out = outputs
        if loss_out is not None:
            np.multiply(loss, 1.0 / job.normalizer, out=loss_out[s:t])
        if grad_out is not None:
            np.multiply(grad, job.grad_scale, out=grad_out[s:t])
            if job.grad_output is not None:
                grad_out[s:t] *= job.grad_output.reshape(-1)[s:t]
        return float(np.add.reduce(loss, dtype=np.float64)), positives

    def _dense_labels(self, label: np.ndarray, start: int, scratch: _Scratch):
        """The block's labels in the compute dtype, checked; -100 (ignored) becomes 0 with keep = 0."""
        n = label.size
        keep = None
        if label.dtype == np.bool_:
            y = scratch.label[:n]
            np.copyto(y, label)
        elif label.dtype == np.uint8:
            if n and label.max() > 1:
                rq.raise_bad_dense_labels(start, label)
            y = scratch.label[:n]
            np.copyto(y, label)
        else:
            low, high = (label.min(), label.max()) if n else (0, 0)
            if low >= 0 and high <= 1:  # NaN fails both
                if label.dtype == scratch.label.dtype:
                    y = label
                else:
                    y = scratch.label[:n]
                    np.copyto(y, label, casting="unsafe")
            else:
                ignored = label == rq.IGNORE_LABEL
                if not (((label >= 0) & (label <= 1)) | ignored).all():
                    rq.raise_bad_dense_labels(start, label)
                y = scratch.label[:n]
                np.copyto(y, label, casting="unsafe")
                y[ignored] = 0
                keep = np.logical_not(ignored, out=scratch.keep[:n], casting="unsafe")
        positives = int(np.count_nonzero(y > 0.5))
        return y, keep, positives

    def _class_index_labels(self, label: np.ndarray, width: int, scratch: _Scratch):
        """One-hot labels of a block of rows, made in scratch (never for the whole batch)."""
        rows = label.size
        n = rows * width
        classes = scratch.class_numbers(width, label.dtype)
        y = scratch.label[:n]
        np.equal(label[:, None], classes[None, :], out=y.reshape(rows, width))
        keep = None
        ignored = label == -1
        if ignored.any():
            keep = scratch.keep[:n].reshape(rows, width)
            keep[...] = np.logical_not(ignored)[:, None]
            keep = keep.reshape(n)
        return y, keep, 0

    def _class_index_piece(self, label: np.ndarray, start: int, n: int, width: int, scratch: _Scratch):
        """One-hot labels of columns [start % C, + n) of row start // C (a row wider than a block)."""
        row, column = divmod(start, width)
        y = scratch.label[:n]
        y.fill(0)
        lab = int(label[row])
        if column < lab <= column + n:
            y[lab - 1 - column] = 1
        keep = None
        if lab == -1:
            keep = scratch.keep[:n]
            keep.fill(0)
        return y, keep, 0


def _all_hard(y: np.ndarray, scratch: _Scratch) -> bool:
    """Are these labels (checked to lie in [0, 1]) all 0 or 1? y·(1-y) is 0 exactly then, > 0 otherwise."""
    product = np.subtract(1.0, y, out=scratch.buffers[0][:y.size])  # free until the kernel runs
    product *= y
    return y.size == 0 or not product.max() > 0


_CPU_MODEL: str | None = None


def _cpu_model() -> str:
    global _CPU_MODEL
    if _CPU_MODEL is None:
        import platform
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        _CPU_MODEL = model
    return _CPU_MODEL
