"""The compiled CPU kernel (server/focalserve/backends/focal_loss_cpu.cpp), which the CPU backend runs by
default, checked against the NumPy ufunc pipeline it replaced (an independent implementation of the same
formulas) and against the golden values; its exp/log1p approximations against long double.

The server-level suites (golden, properties, validation, ...) run through it as well, since it is the
default; this file adds what only an in-process check can see: block and chunk boundaries, thread-count
independence, the approximations on their own.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_golden_close, free_port, golden_cases, golden_request, load_golden, start_server
from focalserve import request as rq
from focalserve.backends import NumpyBackend, cpu_kernel
from focalserve.backends.numpy_backend import BLOCK_ELEMENTS_COMPILED
from focalserve.errors import RequestError
from focalserve_client import FocalLossClient
from focalserve_client.client import build_request
from test_operations import _sample, scrape

SOURCE = cpu_kernel.LIBRARY_SOURCE
CHUNK = 512  # kChunk in the .cpp: sizes around it cross the vector loop's chunk boundary


@pytest.fixture(scope="module")
def kernel() -> cpu_kernel.CpuKernel:
    loaded, why_not = cpu_kernel.load()
    assert loaded is not None, why_not  # `make setup` builds it: a missing library is a broken install
    return loaded


def compiled(kernel, **kwargs) -> NumpyBackend:
    return NumpyBackend(kernel=kernel, **kwargs)


def _job(logit, label, **kwargs) -> rq.Job:
    return rq.parse(build_request(logit, label, **kwargs))


# ---- the source ----

def test_source_compiles_without_warnings(tmp_path):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler here (the installed library was built elsewhere)")
    out = subprocess.run([compiler, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Wshadow", "-Werror", "-fsyntax-only",
                          str(SOURCE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_server_uses_the_compiled_kernel_by_default(kernel):
    from focalserve.config import parse_args
    assert parse_args([]).cpu_kernel == "compiled"
    assert compiled(kernel).engine == "compiled kernel" and NumpyBackend().engine == "NumPy ufuncs"


# ---- exp and log1p: within 2 ulp of the exact values ----

def _ulps(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    return np.abs(got.astype(np.longdouble) - exact) / np.spacing(np.abs(exact.astype(np.float64))).astype(np.longdouble)


def test_exp_and_log1p_approximations_are_within_two_ulp(kernel):
    if np.finfo(np.longdouble).nmant < 60:
        pytest.skip("long double is no wider than double on this platform: no exact reference")
    rng = np.random.default_rng(7)
    edges = [0.0, 1.0, 0.41421356237309503, 0.414213562373095, np.log(2) / 2, 708.39, 709.78, 744.44, 745.13,
             745.2, 746.0, 1e4, 1e-310, 5e-324, np.inf]
    x = np.concatenate([rng.uniform(0, 1, 200_000), rng.uniform(0, 760, 200_000),
                        10.0 ** rng.uniform(-320, 2.9, 200_000), edges])
    got_exp, got_log1p = np.empty_like(x), np.empty_like(x)
    kernel.exp_log1p(x.ctypes.data, x.size, got_exp.ctypes.data, got_log1p.ctypes.data)

    exact_exp = np.exp(-x.astype(np.longdouble))
    assert _ulps(got_exp, exact_exp).max() <= 2.0
    assert ((got_exp == 0) == (np.exp(-x) == 0)).all()  # underflows where libm's does
    unit = x <= 1.0
    exact_log1p = np.log1p(x[unit].astype(np.longdouble))
    nonzero = exact_log1p > 0
    assert _ulps(got_log1p[unit][nonzero], exact_log1p[nonzero]).max() <= 2.0
    assert got_log1p[x == 0.0][0] == 0.0


def test_approximations_propagate_nan(kernel):
    x = np.array([np.nan, -np.nan])
    e, lp = np.empty(2), np.empty(2)
    kernel.exp_log1p(x.ctypes.data, 2, e.ctypes.data, lp.ctypes.data)
    assert np.isnan(e).all() and np.isnan(lp).all()


# ---- against the golden values and the ufunc pipeline ----

CASES = golden_cases()


@pytest.mark.parametrize("engine", ["compiled", "ufunc"])
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_both_engines_match_golden(kernel, case, engine):
    data = load_golden(case)
    job = rq.parse(golden_request(case, data))
    backend = compiled(kernel, block_elements=700) if engine == "compiled" else NumpyBackend(block_elements=700)
    result = backend.run(job)
    assert_golden_close(result.loss, data["loss"], f"{engine} loss")
    assert_golden_close(result.grad, data["grad"], f"{engine} grad")


def assert_matches_ufuncs(kernel, job: rq.Job, block_elements: int) -> None:
    got = compiled(kernel, block_elements=block_elements).run(job)
    want = NumpyBackend(block_elements=block_elements).run(job)
    # The compiled kernel computes in double and rounds once; the ufuncs compute float32 in float32.
    rtol = 2e-5 if job.dtype == np.float32 else 1e-12
    for name in ("loss", "grad"):
        g, w = getattr(got, name), getattr(want, name)
        if w is None:
            assert g is None
            continue
        assert g.dtype == w.dtype and g.shape == w.shape
        atol = 8 * np.finfo(job.dtype).eps * float(np.max(np.abs(w), initial=0.0)) + np.finfo(job.dtype).tiny
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=name)
    assert got.loss_sum == pytest.approx(want.loss_sum, rel=rtol, abs=1e-300)
    assert got.positives == want.positives
    assert got.elements == want.elements


_LOGITS = st.one_of(st.floats(-40, 40), st.sampled_from([0.0, -0.0, 17.0, -17.0, 88.0, -88.0, 700.0, -745.5,
                                                         1e4, -1e4, 1e30, -1e30]))
# not γ = 1e30: there float32 rounds q = σ(17) to 1 in the ufunc pipeline, so q^γ = 1 instead of 0
_GAMMAS = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 3.5, 8.0]), st.floats(0, 9))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), dtype=st.sampled_from([np.float32, np.float64]), n=st.integers(0, 3 * CHUNK + 5),
       gamma=_GAMMAS, alpha=st.floats(0, 1), reduction=st.sampled_from(["none", "sum", "mean"]),
       label_kind=st.sampled_from(["soft", "hard", "mixed", "uint8", "bool", "float16", "other float"]),
       compute_grad=st.booleans(), with_grad_output=st.booleans(), block=st.sampled_from([3, 97, CHUNK, 4096]))
def test_dense_matches_ufuncs(kernel, data, dtype, n, gamma, alpha, reduction, label_kind, compute_grad,
                              with_grad_output, block):
    logit = np.array(data.draw(st.lists(_LOGITS, min_size=n, max_size=n)), dtype)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    hard = (rng.random(n) < 0.4)
    if label_kind in ("uint8", "bool"):
        label = hard.astype(label_kind)
    else:
        label_dtype = {"float16": np.float16, "other float": np.float64 if dtype == np.float32 else np.float32}.get(
            label_kind, dtype)
        label = (rng.random(n) if label_kind == "soft" else hard).astype(label_dtype)
        if label_kind == "mixed":  # hard chunks and soft chunks in one request
            label[: n // 2] = rng.random(n // 2)
        label[rng.random(n) < 0.1] = -100
    grad_output = None
    if with_grad_output:
        grad_output = rng.normal(size=n).astype(dtype) if reduction == "none" else dtype(rng.normal())
    if n == 0 and reduction == "mean":
        reduction = "sum"  # MEAN over nothing is NaN in both; nothing to compare
    job = _job(logit, label, alpha=alpha, gamma=gamma, reduction=reduction, compute_grad=compute_grad,
               normalizer=float(rng.integers(1, 50)), grad_output=grad_output)
    assert_matches_ufuncs(kernel, job, block)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), dtype=st.sampled_from([np.float32, np.float64]), rows=st.integers(1, 12),
       classes=st.sampled_from([1, 2, 7, 80, CHUNK - 1, CHUNK, CHUNK + 1, 1100]), gamma=_GAMMAS,
       reduction=st.sampled_from(["none", "sum", "mean"]), label_dtype=st.sampled_from([np.int32, np.int64]),
       fg_num=st.one_of(st.none(), st.floats(0, 100)), block=st.sampled_from([1, 300, 5000]))
def test_class_index_matches_ufuncs(kernel, data, dtype, rows, classes, gamma, reduction, label_dtype, fg_num,
                                    block):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    logit = rng.normal(0, 6, (rows, classes)).astype(dtype)
    label = np.array(data.draw(st.lists(st.integers(-1, classes), min_size=rows, max_size=rows)),
                     label_dtype).reshape(rows, 1)
    job = _job(logit, label, label_format="class_index", gamma=gamma, reduction=reduction, compute_grad=True,
               normalizer=fg_num)
    assert_matches_ufuncs(kernel, job, block)


# ---- threads, errors, non-finite inputs ----

def test_threads_split_blocks_without_changing_a_bit(kernel):
    rng = np.random.default_rng(3)
    n = 5 * BLOCK_ELEMENTS_COMPILED + 123
    job = _job(rng.normal(0, 5, n).astype(np.float32), rng.random(n).astype(np.float32), reduction="sum",
               compute_grad=True)
    one, two = compiled(kernel, threads=1).run(job), compiled(kernel, threads=2).run(job)
    assert one.loss_sum == two.loss_sum and one.positives == two.positives
    np.testing.assert_array_equal(one.grad, two.grad)
    np.testing.assert_array_equal(one.loss, two.loss)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nonfinite_logits_are_reported_like_the_ufunc_pipeline(kernel, bad, dtype):
    logit = np.zeros(3 * CHUNK, dtype)
    logit[CHUNK + 3] = bad
    job = _job(logit, np.ones(logit.size, dtype))
    errors = []
    for backend in (compiled(kernel, block_elements=256), NumpyBackend(block_elements=256)):
        with pytest.raises(RequestError) as info:
            backend.run(job)
        errors.append((info.value.violations, info.value.reason))
    assert errors[0] == errors[1]
    assert errors[0][0][0][0] == "logit" and f"flat index {CHUNK + 3}" in errors[0][0][0][1]


@pytest.mark.parametrize("bad", [1.5, -0.1, np.nan, -99.0, np.inf])
def test_bad_dense_labels_are_reported_like_the_ufunc_pipeline(kernel, bad):
    label = np.zeros(2 * CHUNK)
    label[CHUNK + 1] = bad
    job = _job(np.zeros(label.size), label)
    errors = []
    for backend in (compiled(kernel), NumpyBackend()):
        with pytest.raises(RequestError) as info:
            backend.run(job)
        errors.append(info.value.violations)
    assert errors[0] == errors[1] and errors[0][0][0] == "label" and f"flat index {CHUNK + 1}" in errors[0][0][1]


def test_bool_label_bytes_other_than_one_are_true(kernel):
    """A BOOL tensor's byte 2 is True, as NumPy reads it (and the ufunc pipeline computes it)."""
    label = np.frombuffer(bytes([0, 1, 2, 255]), np.bool_)
    job = _job(np.array([0.5, -0.5, 1.5, -2.0], np.float32), label, reduction="none", compute_grad=True)
    got = compiled(kernel).run(job)
    want = compiled(kernel).run(_job(job.logit, np.array([0, 1, 1, 1], np.uint8), reduction="none", compute_grad=True))
    np.testing.assert_array_equal(got.loss, want.loss)
    np.testing.assert_array_equal(got.grad, want.grad)
    assert got.positives == 3


def test_uint8_labels_above_one_are_refused(kernel):
    job = _job(np.zeros(4, np.float32), np.array([0, 1, 2, 1], np.uint8))
    with pytest.raises(RequestError) as info:
        compiled(kernel).run(job)
    assert info.value.violations[0][0] == "label" and "flat index 2" in info.value.violations[0][1]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_allowed_nonfinite_logits_leave_the_other_elements_alone(kernel, bad):
    logit = np.linspace(-5, 5, 40).astype(np.float32)
    label = (np.arange(40) % 3 == 0).astype(np.float32)
    clean = compiled(kernel, allow_nonfinite=True).run(_job(logit, label, reduction="none", compute_grad=True))
    logit[11] = bad
    dirty = compiled(kernel, allow_nonfinite=True).run(_job(logit, label, reduction="none", compute_grad=True))
    others = np.arange(40) != 11
    np.testing.assert_array_equal(dirty.loss[others], clean.loss[others])
    np.testing.assert_array_equal(dirty.grad[others], clean.grad[others])
    if np.isnan(bad):
        assert np.isnan(dirty.loss[11]) and np.isnan(dirty.grad[11])


def _at_offset(array: np.ndarray, offset: int) -> np.ndarray:
    """A copy of `array` that starts `offset` bytes into a buffer: misaligned for its dtype."""
    raw = np.frombuffer(bytearray(array.nbytes + offset), np.uint8)[offset:]
    moved = raw.view(array.dtype).reshape(array.shape)
    moved[...] = array
    return moved


@pytest.mark.parametrize("offset", [1, 3, 6])
@pytest.mark.parametrize("dtype, label_dtype, form", [(np.float32, np.float32, "dense"), (np.float64, np.float32, "dense"),
                                                      (np.float32, np.float64, "dense"), (np.float64, np.uint8, "dense"),
                                                      (np.float32, np.int32, "class_index")])
def test_misaligned_arrays_give_the_same_bits(kernel, offset, dtype, label_dtype, form):
    """Tensors are views of the received message, at whatever byte offset protobuf put them."""
    rng = np.random.default_rng(offset)
    rows, classes = 3001, 7
    logit = rng.normal(0, 4, (rows, classes)).astype(dtype)
    if form == "dense":
        label = (rng.random((rows, classes)) < 0.3).astype(label_dtype)
        grad_output = rng.normal(size=(rows, classes)).astype(dtype)
        job = _job(logit, label, reduction="none", compute_grad=True, grad_output=grad_output)
    else:
        label = rng.integers(-1, classes + 1, (rows, 1)).astype(label_dtype)
        job = _job(logit, label, label_format="class_index", reduction="none", compute_grad=True)
    aligned = compiled(kernel, block_elements=4096).run(job)
    job.logit = _at_offset(job.logit, offset)
    job.label = _at_offset(job.label, offset + 1)
    if job.grad_output is not None:
        job.grad_output = _at_offset(job.grad_output, offset + 2)
    assert not job.logit.flags.aligned
    moved = compiled(kernel, block_elements=4096).run(job)
    np.testing.assert_array_equal(moved.loss, aligned.loss)
    np.testing.assert_array_equal(moved.grad, aligned.grad)
    assert moved.loss_sum == aligned.loss_sum


def test_float64_labels_count_as_their_float32_value_with_float32_logits(kernel):
    """Found by hypothesis (test_properties): the kernel used a float64 label as sent, the other backends
    round it to the compute dtype first; near 1, 1-y then differed by 1e-4 relative."""
    label = np.array([0.99999, 0.5000000001, 1e-9, 1.0 - 1e-12])
    job = _job(np.array([7.0, 0.0, -3.0, 2.0], np.float32), label, reduction="none", compute_grad=True)
    got, want = compiled(kernel).run(job), NumpyBackend().run(job)
    np.testing.assert_allclose(got.loss, want.loss, rtol=2e-6)
    np.testing.assert_allclose(got.grad, want.grad, rtol=2e-6)
    assert got.positives == want.positives == 2  # 0.5000000001 is 0.5 in float32: not positive


# ---- one name for the CPU backend (issue 15.7) ----

@pytest.mark.parametrize("engine, device", [("compiled", "compiled kernel"), ("ufunc", "NumPy ufuncs")])
def test_the_cpu_backend_is_called_cpu_whichever_engine_computes(tmp_path, engine, device):
    """--backend cpu, BACKEND_CPU, responses, GetServerInfo and metric labels: one name, `cpu`; the device
    string says which engine computes."""
    metrics_port = free_port()
    srv = start_server(tmp_path, "--backend", "cpu", "--cpu-kernel", engine, "--workers", "1",
                       "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1")
    try:
        with FocalLossClient(srv.target) as client:
            info = client.server_info()
            answers = [client.compute(np.array([0.5, -2.0], np.float32), np.array([1.0, 0.0], np.float32),
                                      backend=backend, compute_grad=True) for backend in ("cpu", "auto")]
        assert list(info.backends) == ["cpu"] and info.default_backend == "cpu"
        assert len(info.devices) == 1 and info.devices[0].startswith("cpu (") and device in info.devices[0]
        assert [a.backend for a in answers] == ["cpu", "cpu"]
        samples = scrape(metrics_port)
        assert _sample(samples, "focalloss_elements_total", backend="cpu") == 4
        assert _sample(samples, "focalloss_compute_seconds_count", backend="cpu") == 2
        assert _sample(samples, "focalloss_build_info", backend="cpu") == 1
        assert not [key for key in samples if 'backend="numpy"' in key]
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]
