"""Small leaks and edges (issue 13.7): the NumPy ufunc engine's per-thread memory is one block whatever the
requests' shapes, stream items are framed without copying the response again, and a class-index logit
with more classes than the kernels can index is INVALID_ARGUMENT on every backend."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_status import rpc_status

from focalloss.v1 import focal_loss_pb2 as pb
from focalserve import request as rq
from focalserve.backends import BackendSet, NumpyBackend
from focalserve.errors import RequestError
from focalserve.service import FocalLossServicer, parse_request
from focalserve_client.client import build_request
from focalserve_client.tensor import decode

BLOCK = 1024


def allocated_by(call) -> tuple[int, int]:
    """(bytes still allocated after `call()`, its peak), from Python's and NumPy's allocations."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        call()
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return after - before, peak - before


# ---- the ufunc engine's memory ----

def class_index_job(rows: int, classes: int, dtype=np.float32) -> rq.Job:
    rng = np.random.default_rng(classes)
    label = rng.integers(-1, classes + 1, (rows, 1)).astype(np.int32)
    label[0] = -1
    return rq.parse(build_request(rng.normal(0, 3, (rows, classes)).astype(dtype), label,
                                  label_format="class_index", reduction="sum", compute_grad=True))


def test_ufunc_scratch_stays_one_block_for_rows_wider_than_a_block():
    """A 100K-class row used to size every buffer of the thread's scratch to 100K elements, kept for the
    thread's life (5 MB here; 1.3 GB per thread for a 10M-class request); now it is computed in pieces."""
    backend = NumpyBackend(block_elements=BLOCK)
    job = class_index_job(3, 100_000)
    outputs = job.elements * job.dtype.itemsize  # the gradient the call returns
    result = []
    kept, peak = allocated_by(lambda: result.append(backend.run(job)))
    scratch = 20 * BLOCK * 8  # one block's buffers, whatever the dtype, with room
    assert kept <= outputs + scratch, f"{kept} bytes kept"
    assert peak <= outputs + 2 * scratch + (1 << 16), f"{peak} bytes at the peak"
    # and the pieces compute what whole rows do
    whole = NumpyBackend(block_elements=1 << 20).run(job)
    np.testing.assert_array_equal(result[0].grad, whole.grad)
    assert result[0].loss_sum == pytest.approx(whole.loss_sum, rel=1e-12)


def test_ufunc_class_numbers_are_not_kept_per_class_count():
    """1..C was cached per (C, dtype) for the thread's life: every class count ever seen stayed."""
    backend = NumpyBackend(block_elements=BLOCK)
    jobs = [class_index_job(2, classes, np.float64) for classes in range(1, 401)]
    backend.run(jobs[-1])  # the thread's scratch, allocated once
    kept, _ = allocated_by(lambda: [backend.run(job) for job in jobs])
    assert kept <= 16 * 1024, f"{kept} bytes kept after 400 class counts"


# ---- stream items framed in the one join ----

class _Context:
    def time_remaining(self):
        return None


def test_stream_items_are_framed_without_another_copy():
    """Each ComputeStreamResponse is the bytes the item's compute joined, not a copy with the frame
    prepended (a second copy of every streamed response, 32 MB for a 2M-element float64 item)."""
    backends = BackendSet(NumpyBackend())
    servicer = FocalLossServicer(backends, ThreadPoolExecutor(1), rq.Limits(), 1 << 30, stream_window=2)
    answers = []
    compute = servicer.compute

    def recording(*args, **kwargs):
        answers.append(compute(*args, **kwargs))
        return answers[-1]

    servicer.compute = recording
    rng = np.random.default_rng(0)
    requests = [build_request(rng.normal(size=n).astype(np.float64), (rng.random(n) < 0.3).astype(np.float64),
                              reduction="none", compute_grad=True, request_id=f"item-{n}") for n in (10, 300_000)]
    requests.append(build_request(np.zeros(3), np.full(3, 7.0), request_id="bad"))

    async def stream():
        async def incoming():
            for request in requests:
                yield parse_request(request.SerializeToString())
        return [message async for message in servicer.ComputeStream(incoming(), _Context())]

    messages = asyncio.run(stream())
    assert len(messages) == 4
    assert messages[1] is answers[1].response, "the large item's response was copied to be framed"
    results = [m if isinstance(m, pb.ComputeStreamResponse) else pb.ComputeStreamResponse.FromString(m)
               for m in messages]  # (the summary goes to grpc's serializer as a message)
    assert [r.result.request_id for r in results[:3]] == ["item-10", "item-300000", "bad"]
    for result, request in zip(results[:2], requests):
        whole = backends.run(rq.parse(request))
        np.testing.assert_array_equal(decode(result.result.grad, "grad", (pb.DTYPE_FLOAT64,)), whole.grad)
    assert results[2].result.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert results[3].summary.items == 3 and results[3].summary.failed_items == 1


# ---- more classes than the kernels index ----

def _wide_request(classes: int, backend: int) -> pb.ComputeRequest:
    return pb.ComputeRequest(logit=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[0, classes]),
                             label=pb.Tensor(dtype=pb.DTYPE_INT32, shape=[0, 1]),
                             label_format=pb.LABEL_FORMAT_CLASS_INDEX, backend=backend, compute_grad=True)


@pytest.mark.parametrize("backend", [pb.BACKEND_GPU, pb.BACKEND_CPU, pb.BACKEND_AUTO])
def test_more_than_2_31_classes_is_invalid_argument_at_validation(backend):
    """[0, 2^31] used to pass validation; the CUDA plan then failed on np.int32(C) (INTERNAL), while the
    CPU answered an empty result."""
    with pytest.raises(RequestError) as info:
        rq.parse(_wide_request(2**31, backend))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.violations[0][0] == "logit.shape" and "2147483648" in info.value.violations[0][1]
    assert rq.parse(_wide_request(2**31 - 1, backend)).num_classes == 2**31 - 1


@pytest.mark.parametrize("backend", [pb.BACKEND_GPU, pb.BACKEND_CPU])
def test_more_than_2_31_classes_over_the_wire(stub, backend):
    with pytest.raises(grpc.RpcError) as info:
        stub.Compute(_wide_request(2**31, backend), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    status = rpc_status.from_call(info.value)
    assert status is not None and "logit.shape" in info.value.details()
