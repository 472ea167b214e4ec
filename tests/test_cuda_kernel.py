"""The GPU kernel proven without a GPU.

1. server/focalserve/backends/focal_loss.cu compiles for sm_80 and sm_90 with every warning an error
   (nvcc where installed, else NVRTC from the `cuda-bindings` package).
2. Its arithmetic: the same file is compiled as C++ with tests/cuda/host_shim.h, launched on the CPU
   through the backend's own launch plans (cuda_kernel.plan / finish), and compared with the NumPy backend
   and the golden values, on every golden case and on hypothesis-generated inputs.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_golden_close, golden_cases, golden_request, load_golden
from focalloss.v1 import focal_loss_pb2 as pb
from focalserve import request as rq
from focalserve.backends import NumpyBackend
from focalserve.backends import cuda_kernel
from focalserve.backends.kernel_host import finish
from focalserve.errors import RequestError
from focalserve_client.client import build_request
from focalserve_client.combine import reduced_loss
from focalserve_client.tensor import encode

SHIM_DIR = Path(__file__).parent / "cuda"
GRID = 7  # several blocks, so the grid-stride loop and the per-block sums are exercised


# ---- 1. it compiles ----

@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernel_source_compiles_without_warnings(arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc:
        out = subprocess.run([nvcc, "--ptx", f"-arch={arch}", "-std=c++17", "-Werror", "all-warnings",
                              "-o", str(tmp_path / "k.ptx"), str(cuda_kernel.SOURCE)],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        ptx = (tmp_path / "k.ptx").read_text()
    else:
        nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="neither nvcc nor NVRTC (cuda-bindings) here")
        ptx = _nvrtc_compile(nvrtc, arch)
    for kernel in cuda_kernel.KERNELS:
        assert f".entry {kernel}(" in ptx, kernel


def _nvrtc_compile(nvrtc, arch: str) -> str:
    err, program = nvrtc.nvrtcCreateProgram(cuda_kernel.SOURCE.read_bytes(), b"focal_loss.cu", 0, [], [])
    options = [f"--gpu-architecture=compute_{arch[3:]}".encode(), b"--std=c++17", b"--Werror"]
    (err,) = nvrtc.nvrtcCompileProgram(program, len(options), options)
    _, size = nvrtc.nvrtcGetProgramLogSize(program)
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(program, log)
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, log.decode(errors="replace")
    _, size = nvrtc.nvrtcGetPTXSize(program)
    ptx = b" " * size
    nvrtc.nvrtcGetPTX(program, ptx)
    return ptx.decode()


# ---- 2. its arithmetic, on the CPU ----

def compile_on_cpu(directory: Path) -> ctypes.CDLL:
    """focal_loss.cu built as C++ with the CPU launcher (skips where there is no g++)."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is needed to compile focal_loss.cu as C++ for the CPU check")
    lib = directory / "focal_loss_cpu.so"
    out = subprocess.run([gxx, "-O2", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                          f"-I{SHIM_DIR}", f'-DFOCAL_LOSS_CU="{cuda_kernel.SOURCE}"',
                          str(SHIM_DIR / "launch_on_cpu.cpp"), "-o", str(lib)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return ctypes.CDLL(str(lib))


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return compile_on_cpu(tmp_path_factory.mktemp("cuda"))


def _pointer(array: np.ndarray | None):
    return ctypes.c_void_p(array.ctypes.data if array is not None else 0)


def run_on_cpu(kernels, job: rq.Job):
    """What the CuPy backend does, with host arrays and a CPU launch: (loss, grad, loss_sum, positives)."""
    p = cuda_kernel.plan(job, check_finite=True)
    logit = np.ascontiguousarray(job.logit.reshape(-1))
    loss = np.empty(job.elements, job.dtype) if p.mode & cuda_kernel.WRITE_LOSS else None
    grad = np.empty(job.elements, job.dtype) if p.mode & cuda_kernel.WRITE_GRAD else None
    grad_output = (np.ascontiguousarray(job.grad_output.reshape(-1), job.dtype)
                   if p.mode & cuda_kernel.GRAD_OUTPUT else None)
    block_sums = np.zeros(2 * GRID, np.float64)
    flags = np.zeros(1, np.int32)
    c_scalar = ctypes.c_float if job.dtype == np.float32 else ctypes.c_double
    alpha, one_minus_alpha, gamma, halves, mode, loss_scale, grad_scale, check = p.scalars
    common = [c_scalar(alpha), c_scalar(one_minus_alpha), c_scalar(gamma), ctypes.c_int(halves), ctypes.c_uint(mode),
              c_scalar(loss_scale), c_scalar(grad_scale), ctypes.c_int(check), _pointer(grad_output), _pointer(loss), _pointer(grad),
              _pointer(block_sums), _pointer(flags)]
    if p.class_index:
        leading = [_pointer(logit), _pointer(p.label), ctypes.c_longlong(p.rows), ctypes.c_int(p.classes)]
    else:
        leading = [_pointer(logit), _pointer(p.label), ctypes.c_longlong(p.elements)]
    getattr(kernels, f"cpu_{p.kernel}")(ctypes.c_uint(GRID), *leading, *common)
    loss_sum, positives = finish(job, block_sums, int(flags[0]))
    if loss is None:
        loss = np.asarray(reduced_loss(loss_sum, job.normalizer, job.elements, job.reduction), job.dtype)
    else:
        loss = loss.reshape(job.logit.shape)
    return loss, (grad.reshape(job.logit.shape) if grad is not None else None), loss_sum, positives


def _job(logit, label, **kwargs) -> rq.Job:
    return rq.parse(build_request(logit, label, **kwargs))


CASES = golden_cases()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_kernel_on_cpu_matches_golden_and_numpy(kernels, case):
    data = load_golden(case)
    request = golden_request(case, data)
    job = rq.parse(request)
    loss, grad, loss_sum, positives = run_on_cpu(kernels, job)
    assert_golden_close(loss, data["loss"], "kernel loss")
    assert_golden_close(grad, data["grad"], "kernel grad")
    reference = NumpyBackend().run(job)
    assert loss_sum == pytest.approx(reference.loss_sum, rel=1e-6 if job.dtype == np.float32 else 1e-12)
    assert positives == reference.positives


_DTYPES = st.sampled_from([np.float32, np.float64])
_LOGITS = st.one_of(st.floats(-30, 30), st.sampled_from([0.0, -0.0, 17.0, -17.0, 88.0, -88.0, 1e4, -1e4]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), dtype=_DTYPES, n=st.integers(1, 300), gamma=st.one_of(
    st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5, 8.0]), st.floats(0, 8)), alpha=st.floats(0, 1),
    reduction=st.sampled_from(["none", "sum", "mean"]), label_kind=st.sampled_from(["soft", "hard", "uint8"]),
    with_grad_output=st.booleans())
def test_kernel_on_cpu_matches_numpy_dense(kernels, data, dtype, n, gamma, alpha, reduction, label_kind,
                                           with_grad_output):
    logit = np.array(data.draw(st.lists(_LOGITS, min_size=n, max_size=n)), dtype)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    if label_kind == "uint8":
        label = (rng.random(n) < 0.4).astype(np.uint8)
    else:
        label = rng.random(n).astype(dtype) if label_kind == "soft" else (rng.random(n) < 0.4).astype(dtype)
        label[rng.random(n) < 0.1] = -100
    grad_output = None
    if with_grad_output:
        grad_output = rng.normal(size=n).astype(dtype) if reduction == "none" else dtype(rng.normal())
    job = _job(logit, label, alpha=alpha, gamma=gamma, reduction=reduction, compute_grad=True,
               normalizer=float(rng.integers(1, 50)), grad_output=grad_output)
    _assert_kernel_matches_numpy(kernels, job)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), dtype=_DTYPES, rows=st.integers(1, 40), classes=st.integers(1, 30),
       gamma=st.floats(0, 8), reduction=st.sampled_from(["none", "sum", "mean"]),
       fg_num=st.one_of(st.none(), st.floats(0, 100)))
def test_kernel_on_cpu_matches_numpy_class_index(kernels, data, dtype, rows, classes, gamma, reduction, fg_num):
    logit = np.array(data.draw(st.lists(_LOGITS, min_size=rows * classes, max_size=rows * classes)),
                     dtype).reshape(rows, classes)
    label = np.array(data.draw(st.lists(st.integers(-1, classes), min_size=rows, max_size=rows)),
                     np.int64).reshape(rows, 1)
    job = _job(logit, label, label_format="class_index", gamma=gamma, reduction=reduction, compute_grad=True,
               normalizer=fg_num)
    _assert_kernel_matches_numpy(kernels, job)


def _assert_kernel_matches_numpy(kernels, job: rq.Job) -> None:
    loss, grad, loss_sum, positives = run_on_cpu(kernels, job)
    reference = NumpyBackend(block_elements=64).run(job)
    # Same formulas in the same order; only libm's exp/log1p and the summation order may differ by an ulp.
    rtol = 2e-5 if job.dtype == np.float32 else 1e-12
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    np.testing.assert_allclose(loss, reference.loss, rtol=rtol, atol=_atol(reference.loss, job))
    np.testing.assert_allclose(grad, reference.grad, rtol=rtol, atol=_atol(reference.grad, job))
    assert loss_sum == pytest.approx(reference.loss_sum, rel=rtol, abs=1e-300)
    assert positives == reference.positives


def _atol(values: np.ndarray, job: rq.Job) -> float:
    eps = np.finfo(job.dtype).eps
    return 8 * eps * float(np.max(np.abs(values), initial=0.0)) + np.finfo(job.dtype).tiny


def test_alpha_just_below_one_keeps_its_complement(kernels):
    """Found by hypothesis: α = 1 - 2^-53 is 1.0f in float32, so 1-α formed in the kernel was 0 and the
    loss of a negative 0 instead of (1-α)·softplus(x)."""
    job = _job(np.array([3.0, -2.0], np.float32), np.array([0.0, 0.0], np.float32), alpha=0.9999999999999999,
               gamma=0.0, reduction="none", compute_grad=True)
    loss, grad, _, _ = run_on_cpu(kernels, job)
    reference = NumpyBackend().run(job)
    assert (loss > 0).all() and (grad > 0).all()
    np.testing.assert_allclose(loss, reference.loss, rtol=2e-5)
    np.testing.assert_allclose(grad, reference.grad, rtol=2e-5)


@pytest.mark.parametrize("bad, field", [(np.nan, "logit"), (np.inf, "logit"), (-np.inf, "logit")])
def test_kernel_flags_nonfinite_logits(kernels, bad, field):
    logit = np.array([0.5, bad, 1.0], np.float32)
    with pytest.raises(RequestError) as info:
        run_on_cpu(kernels, _job(logit, np.ones(3, np.float32)))
    assert info.value.violations[0][0] == field and "flat index 1" in str(info.value)


@pytest.mark.parametrize("bad", [1.5, -0.1, np.nan, -99.0])
def test_kernel_flags_bad_dense_labels(kernels, bad):
    label = np.array([0.0, 1.0, bad, -100.0], np.float64)
    with pytest.raises(RequestError) as info:
        run_on_cpu(kernels, _job(np.zeros(4), label))
    assert info.value.violations[0][0] == "label" and "flat index 2" in str(info.value)
