"""How closely each engine agrees with the exact values (issue 13.6; README "What it computes").

The three engines compute the same formulas in different arithmetic: the compiled CPU kernel in double
whatever the input dtype (float32 results rounded once), the NumPy ufunc fallback and the GPU kernel in
the input dtype (float32 with expf/log1pf). Each is compared here with the same formulas evaluated in
long double (x87, 64-bit mantissa), on every golden case and on hypothesis inputs, and must stay within:

- compiled kernel, float32:  1 ulp;
- every other engine/dtype:  8 + 6γ ulps (γ ∈ [0, 8]): exp and log1p err by a few ulps, and q^γ multiplies
  the relative error of q by γ.

Ulps are those of the output dtype at the reference value; the gradient's are counted at the size of its
largest term (α_t·q^γ·[p(1-y) + (1-p)y + γ|1-2y|·r·CE], times the scale), because p - y cancels for a soft
label y near p (for 0/1 labels that is |grad| itself). Values below 2^(mantissa bits + 1) times the
smallest normal count in ulps of that size: their intermediates may underflow into subnormals. The GPU
kernel runs on the CPU here (tests/cuda) with glibc's expf/log1pf; CUDA's own are within 2 ulps as well.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import golden_cases, golden_request, load_golden
from focalserve import request as rq
from focalserve.backends import NumpyBackend, cpu_kernel
from focalserve_client.client import build_request
from test_cuda_kernel import compile_on_cpu, run_on_cpu

L = np.longdouble
pytestmark = pytest.mark.skipif(np.finfo(L).nmant < 60, reason="long double is no wider than double here: no reference")
ENGINES = ("compiled", "ufunc", "cuda on cpu")


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    kernel, why_not = cpu_kernel.load()
    assert kernel is not None, why_not
    gpu_kernel = compile_on_cpu(tmp_path_factory.mktemp("cuda"))
    compiled, ufuncs = NumpyBackend(kernel=kernel, block_elements=700), NumpyBackend(block_elements=700)

    def backend(b):
        return lambda job: (lambda r: (r.loss, r.grad))(b.run(job))

    return {"compiled": backend(compiled), "ufunc": backend(ufuncs),
            "cuda on cpu": lambda job: run_on_cpu(gpu_kernel, job)[:2]}


def bound(engine: str, job: rq.Job) -> float:
    """The most ulps `engine` may be off on `job`."""
    if engine == "compiled" and job.dtype == np.float32:
        return 1.0
    return 8.0 + 6.0 * job.gamma


def reference(job: rq.Job) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per-element loss after the normalizer, gradient, the gradient's largest term), flat, in long double:
    SPEC §1's formulas as numpy_backend.py writes them, labels counted as their compute-dtype value."""
    x = job.logit.reshape(-1).astype(L)
    if job.label_format == rq.CLASS_INDEX:
        rows, classes = job.logit.shape
        label = job.label.reshape(-1)
        y = (label[:, None] == np.arange(1, classes + 1)[None, :]).astype(L).reshape(-1)
        keep = np.repeat(label != -1, classes)
    else:
        raw = job.label.reshape(-1)
        keep = raw != rq.IGNORE_LABEL
        y = np.where(keep, raw.astype(job.dtype), 0).astype(L)
    e = np.exp(-np.abs(x))
    r = 1 / (1 + e)
    p, omp = np.where(x >= 0, r, e * r), np.where(x >= 0, e * r, r)
    ce = np.log1p(e) + np.maximum(-x, 0) * y + np.maximum(x, 0) * (1 - y)
    q = omp * y + p * (1 - y)
    alpha, gamma = L(job.alpha), L(job.gamma)
    weight = (alpha * y + (1 - alpha) * (1 - y)) * (q ** gamma if job.gamma else 1)
    focus = np.where(q == 0, 0, p * omp / np.where(q == 0, 1, q))
    second = gamma * (1 - 2 * y) * focus * ce
    loss = weight * ce * keep / L(job.normalizer)
    scale = L(job.grad_scale) * (job.grad_output.reshape(-1).astype(L) if job.grad_output is not None else 1)
    grad = (p * (1 - y) - omp * y + second) * weight * keep * scale
    largest = (p * (1 - y) + omp * y + np.abs(second)) * weight * keep * np.abs(scale)
    return loss, grad, largest


def ulps(got: np.ndarray, exact: np.ndarray, size: np.ndarray | None = None) -> np.ndarray:
    """|got - exact| in ulps of got's dtype at `size` (default |exact|), floored as the module says."""
    info = np.finfo(got.dtype)
    floor = L(info.tiny) * L(2) ** (info.nmant + 1)
    at = np.maximum(np.abs(exact if size is None else size), floor).astype(got.dtype)
    return np.abs(got.reshape(-1).astype(L) - exact) / np.spacing(at).astype(L)


def assert_agrees(engine: str, compute, job: rq.Job) -> None:
    loss, grad = compute(job)
    exact_loss, exact_grad, largest = reference(job)
    most = bound(engine, job)
    if job.reduction == "none":
        off = ulps(loss, exact_loss)
        assert off.max(initial=0) <= most, f"loss {float(off.max()):.1f} ulps off (at {int(off.argmax())}), bound {most}"
    else:
        # float64 sums of per-element values: add an ulp per element of the output dtype at most
        total = exact_loss.sum() / (job.elements if job.reduction == "mean" else 1)
        off = ulps(np.asarray(loss).reshape(1), np.asarray([total]))[0]
        assert off <= most + job.elements, f"reduced loss {float(off):.1f} ulps off, bound {most} + {job.elements}"
    if grad is not None:
        off = ulps(grad, exact_grad, largest)
        assert off.max(initial=0) <= most, f"grad {float(off.max()):.1f} ulps off (at {int(off.argmax())}), bound {most}"


CASES = golden_cases()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_golden_inputs(engines, engine, case):
    job = rq.parse(golden_request(case, load_golden(case)))
    assert_agrees(engine, engines[engine], job)


_LOGITS = st.one_of(st.floats(-40, 40), st.sampled_from([0.0, -0.0, 17.0, -17.0, 88.0, -88.0, 700.0, -745.5, 1e4, -1e4]))
_GAMMAS = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5, 8.0]), st.floats(0, 8))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data(), engine=st.sampled_from(ENGINES), dtype=st.sampled_from([np.float32, np.float64]),
       n=st.integers(1, 300), gamma=_GAMMAS, alpha=st.floats(0, 1), reduction=st.sampled_from(["none", "sum", "mean"]),
       label_kind=st.sampled_from(["soft", "hard", "uint8"]), with_grad_output=st.booleans())
def test_dense_inputs(engines, data, engine, dtype, n, gamma, alpha, reduction, label_kind, with_grad_output):
    logit = np.array(data.draw(st.lists(_LOGITS, min_size=n, max_size=n)), dtype)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    if label_kind == "uint8":
        label = (rng.random(n) < 0.4).astype(np.uint8)
    else:
        label = (rng.random(n) if label_kind == "soft" else rng.random(n) < 0.4).astype(dtype)
        label[rng.random(n) < 0.1] = -100
    grad_output = None
    if with_grad_output:
        grad_output = rng.normal(size=n).astype(dtype) if reduction == "none" else dtype(rng.normal())
    job = rq.parse(build_request(logit, label, alpha=alpha, gamma=gamma, reduction=reduction, compute_grad=True,
                                 normalizer=float(rng.integers(1, 50)), grad_output=grad_output))
    assert_agrees(engine, engines[engine], job)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data(), engine=st.sampled_from(ENGINES), dtype=st.sampled_from([np.float32, np.float64]),
       rows=st.integers(1, 40), classes=st.integers(1, 30), gamma=_GAMMAS, alpha=st.floats(0, 1),
       reduction=st.sampled_from(["none", "sum", "mean"]))
def test_class_index_inputs(engines, data, engine, dtype, rows, classes, gamma, alpha, reduction):
    logit = np.array(data.draw(st.lists(_LOGITS, min_size=rows * classes, max_size=rows * classes)),
                     dtype).reshape(rows, classes)
    label = np.array(data.draw(st.lists(st.integers(-1, classes), min_size=rows, max_size=rows)),
                     np.int32).reshape(rows, 1)
    job = rq.parse(build_request(logit, label, label_format="class_index", alpha=alpha, gamma=gamma,
                                 reduction=reduction, compute_grad=True))
    assert_agrees(engine, engines[engine], job)
