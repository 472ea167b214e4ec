"""The CuPy backend on a real GPU. Skipped, saying so, where CuPy sees no CUDA device (CI has none:
tests/test_cuda_kernel.py checks the same kernel source on the CPU there). `FOCALSERVE_TEST_BACKEND=gpu`
also runs the whole suite's servers with --backend gpu."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_golden_close, golden_cases, golden_request, load_golden, start_server


def _gpu_usable() -> tuple[bool, str]:
    try:
        import cupy
    except ImportError:
        return False, "CuPy is not installed"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver
        return False, f"CuPy sees no CUDA driver ({type(e).__name__})"
    return (count > 0, "CuPy sees no CUDA device") if count == 0 else (True, "")


_USABLE, _WHY = _gpu_usable()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _USABLE, reason=f"needs a GPU: {_WHY}")]

from focalloss.v1 import focal_loss_pb2 as pb  # noqa: E402
from focalserve import request as rq  # noqa: E402
from focalserve.backends import BackendSet, NumpyBackend  # noqa: E402
from focalserve_client import FocalLossClient  # noqa: E402
from focalserve_client.client import build_request  # noqa: E402
from focalserve_client.tensor import encode  # noqa: E402


@pytest.fixture(scope="module")
def gpu():
    from focalserve.backends.cupy_backend import CupyBackend
    return CupyBackend(0)


CASES = golden_cases()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_gpu_golden(gpu, case):
    data = load_golden(case)
    request = golden_request(case, data)
    result = gpu.run(rq.parse(request))
    assert result.backend == "cupy"
    assert_golden_close(result.loss, data["loss"], "loss")
    assert_golden_close(result.grad, data["grad"], "grad")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("label_kind", ["soft", "uint8", "class_index"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_gpu_matches_numpy(gpu, dtype, label_kind, reduction):
    rng = np.random.default_rng(3)
    n, classes = 300_007, 13
    logit = (rng.normal(0, 6, (n, classes)) * 10 ** rng.uniform(-2, 3, (n, classes))).astype(dtype)
    if label_kind == "class_index":
        label, fmt = rng.integers(-1, classes + 1, (n, 1)).astype(np.int64), "class_index"
    elif label_kind == "uint8":
        label, fmt = (rng.random((n, classes)) < 0.2).astype(np.uint8), "dense"
    else:
        label, fmt = rng.random((n, classes)).astype(dtype), "dense"
        label[rng.random((n, classes)) < 0.05] = -100
    grad_output = rng.normal(size=(n, classes)).astype(dtype) if reduction == "none" else np.asarray(0.7, dtype)
    job = rq.parse(build_request(logit, label, label_format=fmt, gamma=1.5, alpha=0.3, reduction=reduction,
                                 compute_grad=True, grad_output=grad_output))
    got, want = gpu.run(job), NumpyBackend(threads=2).run(job)
    rtol = 2e-5 if dtype == np.float32 else 1e-12
    tiny = np.finfo(dtype).tiny
    np.testing.assert_allclose(got.loss, want.loss, rtol=rtol, atol=tiny)
    np.testing.assert_allclose(got.grad, want.grad, rtol=rtol, atol=tiny + 8 * np.finfo(dtype).eps * np.abs(want.grad).max())
    assert got.loss_sum == pytest.approx(want.loss_sum, rel=rtol)
    assert got.positives == want.positives


def test_gpu_out_of_memory_falls_back_to_the_cpu(gpu):
    import cupy
    fallbacks = []
    backends = BackendSet(NumpyBackend(), gpu=gpu, default="gpu", on_gpu_fallback=lambda: fallbacks.append(1))
    pool = cupy.get_default_memory_pool()
    logit = np.random.default_rng(0).normal(size=4_000_000).astype(np.float32)
    job = rq.parse(build_request(logit, (logit > 0).astype(np.float32), compute_grad=True))
    pool.free_all_blocks()
    pool.set_limit(size=1 << 20)  # 1 MiB: the 16 MB logit cannot be placed
    try:
        result = backends.run(job)
    finally:
        pool.set_limit(size=0)
    assert result.backend == "cpu" and fallbacks == [1]
    assert backends.run(job).backend == "cupy"  # and the GPU serves again once memory is there


def test_server_reports_the_gpu_and_computes_on_it(tmp_path):
    srv = start_server(tmp_path, "--backend", "gpu")
    try:
        with FocalLossClient(srv.target) as client:
            info = client.server_info()
            assert "cupy" in info.backends and info.default_backend == "cupy"
            assert any(d.startswith("cuda:0 ") and "GiB, sm_" in d for d in info.devices)
            result = client.compute(np.array([[0.97, 0.91, 0.03], [0.55, 0.43, 0.71]], np.float32),
                                    np.array([[1.0, 0, 0], [0, 1, 0]], np.float32), normalizer=2.0, compute_grad=True)
        assert result.backend == "cupy" and f"{float(result.loss):.8f}" == "0.65782464"
    finally:
        assert srv.stop() == 0
