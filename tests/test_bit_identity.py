"""An element's loss and gradient depend only on its own logit, label (and grad_output) and the request's
parameters: not on where it sits in the request, nor on which other elements share the request (issue 15.2).

The same batch is computed whole, from many offsets (x[k:]) and in two pieces split at many points, and
every returned per-element value is compared bit for bit, in every label form, logit dtype and
reduction, with and without gradient, on each engine: the compiled CPU kernel, the NumPy ufunc
pipeline (both with small blocks, so that block and 512-element chunk boundaries move through the data)
and the CUDA kernel run on the CPU (tests/cuda). A reduced request returns no per-element loss; its
gradient is compared, its pieces sent as the Python client sends them (MEAN as SUM with normalizer·numel).
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import start_server
from focalloss.v1 import focal_loss_pb2 as pb
from focalserve import request as rq
from focalserve.backends import BackendSet, NumpyBackend, cpu_kernel
from focalserve.errors import RequestError
from focalserve_client import FocalLossClient
from focalserve_client.client import MESSAGE_OVERHEAD, build_request
from test_cuda_kernel import compile_on_cpu, run_on_cpu

ROWS, CLASSES = 1500, 5  # 7500 elements: 15 chunks of the compiled kernel, 10 ufunc blocks of 768
OFFSETS = (1, 2, 3, 5, 7, 8, 13, 31, 63, 64, 65, 101, 511, 512, 513, 767, 769, 1029, 4001)  # in elements
SPLITS = (1, 7, 64, 333, 512, 1000, 2049, 3750, 7499)  # in elements
# mostly 0/1 labels with a soft one every ~700 elements: chunks and blocks are all hard or not depending
# on where they start, and the engines take a cheaper path for all-hard ones
FORMS = ("soft", "hard", "sparse soft", "uint8", "bool", "float16 labels", "other float labels", "class_index int32",
         "class_index int64")
DTYPES = (np.float16, np.float32, np.float64)
MODES = (("none", True), ("none", False), ("sum", True), ("mean", True))  # SUM/MEAN without gradient: no per-element output


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    kernel, why_not = cpu_kernel.load()
    assert kernel is not None, why_not
    cuda_on_cpu = compile_on_cpu(tmp_path_factory.mktemp("cuda"))
    compiled = NumpyBackend(kernel=kernel, threads=2, block_elements=1000)
    ufuncs = NumpyBackend(block_elements=768)

    def run(backend):
        def compute(job):
            result = backend.run(job)
            return result.loss, result.grad
        return compute

    return {"compiled": run(compiled), "ufunc": run(ufuncs),
            "cuda on cpu": lambda job: run_on_cpu(cuda_on_cpu, job)[:2]}


def batch(form: str, dtype, seed: int = 0):
    """(logit, label, label_format) of one test batch: [ROWS, CLASSES] logits, wide enough to saturate."""
    rng = np.random.default_rng(seed)
    logit = rng.normal(0, 4, (ROWS, CLASSES))
    logit[rng.random(logit.shape) < 0.02] = 0.0
    logit = logit.astype(dtype)
    if form.startswith("class_index"):
        label = rng.integers(-1, CLASSES + 1, (ROWS, 1)).astype(np.int32 if form.endswith("int32") else np.int64)
        return logit, label, "class_index"
    compute = np.float64 if dtype == np.float64 else np.float32
    hard = rng.random(logit.shape) < 0.3
    if form in ("uint8", "bool"):
        return logit, hard.astype(form), "dense"
    label_dtype = {"float16 labels": np.float16, "other float labels": np.float32 if compute == np.float64 else np.float64}
    label = hard.astype(label_dtype.get(form, compute))
    if form == "soft":
        label = rng.random(logit.shape).astype(label.dtype)
    elif form == "sparse soft":
        label.reshape(-1)[rng.integers(0, 700, 1)[0]::700] = 0.375
    label[rng.random(logit.shape) < 0.05] = -100
    return logit, label, "dense"


def request(logit, label, label_format, reduction, compute_grad, grad_output, whole_elements):
    """A request for (a piece of) the batch, as the Python client sends a chunk: the batch's normalizer,
    and MEAN as SUM over normalizer·numel of the whole batch."""
    normalizer = 3.0
    if reduction == "mean":
        reduction, normalizer = "sum", normalizer * whole_elements
    return rq.parse(build_request(logit, label, label_format=label_format, alpha=0.3, gamma=2.0,
                                  normalizer=normalizer, reduction=reduction, compute_grad=compute_grad,
                                  grad_output=grad_output))


def assert_same_bits(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    differ = np.flatnonzero(got.view(f"u{got.itemsize}") != want.view(f"u{want.itemsize}"))
    assert differ.size == 0, (f"{what}: {differ.size} elements differ, the first at {differ[0]}: "
                              f"{got[differ[0]]!r} != {want[differ[0]]!r}")


@pytest.mark.parametrize("reduction, compute_grad", MODES, ids=[f"{r}{'+grad' if g else ''}" for r, g in MODES])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("engine", ["compiled", "ufunc", "cuda on cpu"])
def test_offsets_and_splits_give_the_same_bits(engines, engine, form, dtype, reduction, compute_grad):
    check_offsets_and_splits(engines[engine], form, dtype, reduction, compute_grad)


def check_offsets_and_splits(compute, form, dtype, reduction, compute_grad) -> None:
    logit, label, label_format = batch(form, dtype)
    class_index = label_format == "class_index"
    grad_output = None
    if compute_grad and reduction == "none":
        grad_output = np.random.default_rng(1).normal(size=logit.shape).astype(
            np.float64 if dtype == np.float64 else np.float32)
    whole_elements = logit.size

    def run(rows: slice):
        """Loss (NONE) and gradient of the batch's rows `rows` (elements, for the dense form), flat."""
        if class_index:
            x, y = logit[rows], label[rows]
        else:
            x, y = logit.reshape(-1)[rows], label.reshape(-1)[rows]
        g = None if grad_output is None else grad_output[rows] if class_index else grad_output.reshape(-1)[rows]
        loss, grad = compute(request(x, y, label_format, reduction, compute_grad, g, whole_elements))
        return (loss.reshape(-1) if reduction == "none" else None), (grad.reshape(-1) if grad is not None else None)

    def cut(k: int) -> int:
        """k elements as a cut point: whole rows for the class-index form."""
        return -(-k // CLASSES) if class_index else k

    unit = CLASSES if class_index else 1
    whole_loss, whole_grad = run(slice(None))
    assert (whole_loss is not None) or (whole_grad is not None)
    for k in OFFSETS:
        start = cut(k)
        loss, grad = run(slice(start, None))
        for got, want, name in ((loss, whole_loss, "loss"), (grad, whole_grad, "grad")):
            if want is not None:
                assert_same_bits(got, want[start * unit:], f"{name} of x[{start}:]")
    for k in SPLITS:
        at = cut(k)
        (loss_a, grad_a), (loss_b, grad_b) = run(slice(None, at)), run(slice(at, None))
        for a, b, want, name in ((loss_a, loss_b, whole_loss, "loss"), (grad_a, grad_b, whole_grad, "grad")):
            if want is not None:
                assert_same_bits(np.concatenate([a, b]), want, f"{name} split at {at}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("engine", ["compiled", "ufunc", "cuda on cpu"])
def test_class_index_is_the_dense_form_on_one_hot_labels_to_the_bit(engines, engine, dtype):
    """SPEC §1.2: the class-index form equals the dense form on the one-hot labels (ignored rows -100)."""
    logit, label, _ = batch("class_index int32", dtype, seed=5)
    one_hot = (label == np.arange(1, CLASSES + 1)[None, :]).astype(dtype)
    one_hot[label[:, 0] == -1] = -100
    compute = engines[engine]
    kwargs = dict(reduction="none", compute_grad=True, grad_output=None, whole_elements=logit.size)
    got = compute(request(logit, label, "class_index", **kwargs))
    want = compute(request(logit, one_hot, "dense", **kwargs))
    for g, w, name in zip(got, want, ("loss", "grad")):
        assert_same_bits(g, w, name)


# The installed kernel runs the one of its builds (AVX-512, AVX2+FMA, baseline x86-64) that this machine
# supports; the others, built on their own, must hold the same promise on the machines that run them.
OTHER_BUILDS = {"x86-64-v3": ("avx2", "fma"), "x86-64": ()}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


@pytest.fixture(scope="module", params=sorted(OTHER_BUILDS))
def other_build(request, tmp_path_factory):
    arch = request.param
    if platform.machine() != "x86_64" or not shutil.which("g++"):
        pytest.skip("the kernel's per-target builds are x86-64 builds made with g++")
    missing = set(OTHER_BUILDS[arch]) - _cpu_flags()
    if missing:
        pytest.skip(f"this CPU cannot run the {arch} build (no {', '.join(sorted(missing))})")
    library = tmp_path_factory.mktemp("cpu-kernel") / f"focal_loss_cpu_{arch}.so"
    # the installed library's flags (server/setup.py), for one target instead of three
    out = subprocess.run(["g++", "-std=c++17", "-O3", "-fno-math-errno", "-fno-trapping-math", f"-march={arch}",
                          "-DFOCAL_CLONES=__attribute__((flatten))", "-shared", "-fPIC", str(cpu_kernel.LIBRARY_SOURCE),
                          "-o", str(library)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    backend = NumpyBackend(kernel=cpu_kernel.CpuKernel(str(library)), block_elements=1000)

    def compute(job):
        result = backend.run(job)
        return result.loss, result.grad

    return compute


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("form", FORMS)
def test_every_build_of_the_cpu_kernel_gives_the_same_bits(other_build, form, dtype):
    check_offsets_and_splits(other_build, form, dtype, "none", True)


# ---- a split batch runs on the engine the whole batch gets (issue 13.6) ----

def test_auto_counts_a_chunk_at_its_whole_batch_size():
    cpu, gpu = NumpyBackend(), NumpyBackend()
    backends = BackendSet(cpu, gpu=gpu, default="auto", gpu_min_elements=1000)
    chunk = build_request(np.zeros(600, np.float32), np.zeros(600, np.float32))
    assert backends.select(rq.parse(chunk)) is cpu  # alone, 600 elements stay on the CPU
    chunk.batch_elements = 5000
    assert backends.select(rq.parse(chunk)) is gpu  # a chunk of 5000: where the whole batch goes
    chunk.batch_elements, chunk.backend = 5000, pb.BACKEND_CPU
    assert backends.select(rq.parse(chunk)) is cpu  # an explicit choice still wins


@pytest.mark.parametrize("value", [-1, 1, 599])
def test_batch_elements_below_the_chunk_is_refused(value):
    chunk = build_request(np.zeros(600, np.float32), np.zeros(600, np.float32))
    chunk.batch_elements = value
    with pytest.raises(RequestError) as info:
        rq.parse(chunk)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.violations[0][0] == "batch_elements" and str(value) in info.value.violations[0][1]


GPU_MIN_ELEMENTS = 20_000


@pytest.fixture(scope="module")
def gpu_on_cpu_server(tmp_path_factory):
    """BACKEND_AUTO between the compiled CPU kernel and the GPU kernel (run on the CPU, tests/fault_server.py)
    from GPU_MIN_ELEMENTS: two engines whose float32 results differ in the last bits."""
    if not shutil.which("g++"):
        pytest.skip("g++ is needed to run the GPU kernel on the CPU")
    srv = start_server(tmp_path_factory.mktemp("gpu-on-cpu"), "--backend", "auto", "--gpu-min-elements",
                       str(GPU_MIN_ELEMENTS), "--workers", "2",
                       command=[sys.executable, str(Path(__file__).with_name("fault_server.py")), "--inject", "gpu-on-cpu"])
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


@pytest.mark.parametrize("form, reduction", [("dense", "none"), ("dense", "mean"), ("class_index", "sum")])
def test_split_batch_runs_on_the_engine_of_the_whole_batch(gpu_on_cpu_server, form, reduction):
    """The client splits a 60K-element batch into chunks under GPU_MIN_ELEMENTS; the whole batch goes to the
    GPU, so must every chunk, and the gradients (and NONE losses) are the whole batch's, bit for bit."""
    rng = np.random.default_rng(11)
    rows, classes = 12_000, 5
    logit = rng.normal(0, 4, (rows, classes)).astype(np.float32)
    if form == "dense":
        label = rng.random((rows, classes)).astype(np.float32)
    else:
        label = rng.integers(-1, classes + 1, (rows, 1)).astype(np.int32)
    kwargs = dict(label_format=form, reduction=reduction, compute_grad=True, alpha=0.3, gamma=2.0)
    chunk_bytes = 2 * 4 * GPU_MIN_ELEMENTS // 3  # requests and responses of well under GPU_MIN_ELEMENTS
    with FocalLossClient(gpu_on_cpu_server.target) as client, FocalLossClient(
            gpu_on_cpu_server.target, max_message_bytes=MESSAGE_OVERHEAD + chunk_bytes) as splitting:
        whole = client.compute(logit, label, **kwargs)
        chunks = []
        split = splitting.compute(logit, label, progress=lambda done, total: chunks.append(done), **kwargs)
        cpu = client.compute(logit, label, backend="cpu", **kwargs)
    assert len(chunks) >= 4 and chunks[0] < GPU_MIN_ELEMENTS, chunks
    assert whole.backend == "cupy" and split.backend == "cupy"
    assert_same_bits(split.grad, whole.grad, "grad")
    if reduction == "none":
        assert_same_bits(split.loss, whole.loss, "loss")
    else:
        assert split.loss == pytest.approx(float(whole.loss), rel=1e-6)
    # the premise: the two engines do differ (else this test would prove nothing)
    assert np.count_nonzero(cpu.grad != whole.grad) > 0
