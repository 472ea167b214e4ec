"""The FocalLossService servicer: thin. A request goes bytes -> request.parse -> backend.run -> response bytes.

Requests up to INLINE_BYTES are computed right on the event loop (the hop to a thread costs more than
their work); larger ones in the thread pool (the compiled kernel, NumPy and CuPy release the GIL), so the
loop only moves their messages. Responses are serialized here, with each tensor's bytes copied once (a
stream item framed as its ComputeStreamResponse in the same join). ComputeStream keeps several items in
flight and answers them in request order.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from concurrent.futures import Executor
from typing import NamedTuple

import grpc
from google.protobuf.message import DecodeError
from grpc_status import rpc_status

from focalloss.v1 import focal_loss_pb2 as pb
from focalloss.v1 import focal_loss_pb2_grpc as pb_grpc
from focalserve_client import wire
from focalserve_client.combine import normalized_loss
from focalserve_client.tensor import length_delimited, tensor_field

from . import __version__, metrics, tracing
from .backends import BackendSet
from .errors import RequestError, internal_status
from .request import LOGIT_DTYPES, Limits, parse

log = logging.getLogger("focalserve")

# Requests up to this size (~100K float32 elements with uint8 labels, a few hundred µs of work for the
# compiled kernel, which still spreads it over the block threads) are computed right on the event loop:
# the hop to a pool thread and back costs ~200 µs here. Anything larger must not hold the loop.
INLINE_BYTES = 512 * 1024


class FocalLossServicer(pb_grpc.FocalLossServiceServicer):
    def __init__(self, backends: BackendSet, executor: Executor, limits: Limits, max_message_bytes: int,
                 stream_window: int):
        self._backends = backends
        self._executor = executor
        self._limits = limits
        self._max_message_bytes = max_message_bytes
        self._stream_window = max(1, stream_window)

    # ---- the work of one request, on a pool thread ----

    def compute(self, received: Received, deadline: float | None = None, framed: bool = False) -> "Answer":
        """The serialized ComputeResponse and its stats. Raises RequestError for a request the service
        refuses. `deadline`: time.monotonic() after which the caller has given up: the work is not started.
        `framed`: serialized as a ComputeStreamResponse whose `result` it is (for a stream item)."""
        request = received.message
        if request is None:
            raise RequestError.invalid("request", f"is not a valid focalloss.v1.ComputeRequest ({received.error})")
        if deadline is not None and time.monotonic() >= deadline:
            metrics.REJECTED.labels("deadline").inc()
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, ("grpc-timeout", "the deadline passed before the work started"))
        metrics.REQUEST_BYTES.observe(received.size)
        with metrics.INFLIGHT.track_inprogress(), tracing.compute_span(request.request_id) as span:
            try:
                job = parse(request, self._limits, received.payloads)
                result = self._backends.run(job)
            except RequestError as e:
                if e.reason == "nonfinite":
                    metrics.NONFINITE_INPUTS.inc()
                raise
            tracing.annotate(span, job.label_format, result)
        metrics.ELEMENTS.labels(result.backend, job.label_format).inc(result.elements)
        metrics.COMPUTE_SECONDS.labels(result.backend).observe(result.compute_seconds)
        if result.elements:
            if math.isfinite(result.loss_sum):
                metrics.ITEM_LOSS.observe(result.loss_sum / result.elements)
            else:  # only with --allow-nonfinite
                metrics.NONFINITE_INPUTS.inc()
        stats = pb.ItemStats(elements=result.elements, positives=result.positives, loss_sum=result.loss_sum,
                             compute_seconds=result.compute_seconds)
        # The small fields through protobuf, the tensors appended as raw wire bytes: one copy of each.
        head = pb.ComputeResponse(request_id=request.request_id, backend=result.backend, stats=stats)
        pieces = [head.SerializeToString(), *tensor_field(2, result.loss)]
        if result.grad is not None:
            pieces += tensor_field(3, result.grad)
        if framed:  # in the same join: framing the joined bytes afterwards copied the whole response again
            pieces.insert(0, _stream_result_key(sum(map(len, pieces))))
        return Answer(b"".join(pieces), stats)

    def _compute_item(self, request: Received, deadline: float | None) -> "Answer":
        """A stream item, as its serialized ComputeStreamResponse: failures become the item's `error`,
        never the stream's end."""
        try:
            return self.compute(request, deadline, framed=True)
        except RequestError as e:
            error = e.to_status_proto()
        except Exception:
            error = internal_status(_log_internal(request.request_id))
        failed = pb.ComputeResponse(request_id=request.request_id, error=error).SerializeToString()
        return Answer(_stream_result_key(len(failed)) + failed, None)

    async def _submit(self, request: Received, deadline: float | None, item: bool = False) -> "Answer":
        """Small requests are computed right here on the event loop (well under a millisecond): the hop
        to a pool thread and back costs more than their work. Larger ones go to the pool."""
        work = self._compute_item if item else self.compute
        if request.size <= INLINE_BYTES:
            return work(request, deadline)
        return await asyncio.get_running_loop().run_in_executor(self._executor, tracing.bind(work), request, deadline)

    # ---- RPCs ----

    # Calls are counted for the drain and the concurrency limit from their headers on, by
    # interceptors.CallGate, not here: a unary handler starts only once its whole body has arrived.

    async def Compute(self, request: Received, context: grpc.aio.ServicerContext) -> bytes:
        try:
            answer = await self._submit(request, _deadline(context))
            return answer.response
        except RequestError as e:
            await context.abort_with_status(rpc_status.to_status(e.to_status_proto()))
        except Exception:
            await context.abort_with_status(rpc_status.to_status(internal_status(_log_internal(request.request_id))))

    async def ComputeStream(self, request_iterator, context: grpc.aio.ServicerContext):
        deadline = _deadline(context)
        # Bounded: a client that sends faster than the server computes is held back by flow control. By count
        # (the window) and by bytes: the next item is read only while the items read and not yet answered
        # hold less than one message limit, so a stream never holds more than two full-size requests
        # (README "Memory"); small items still fill the window.
        in_flight: asyncio.Queue = asyncio.Queue(maxsize=self._stream_window)
        held = 0
        room = asyncio.Event()

        async def submit_all() -> None:
            nonlocal held
            try:
                async for request in request_iterator:
                    held += request.size
                    await in_flight.put((asyncio.ensure_future(self._submit(request, deadline, item=True)),
                                         request.size))
                    while held >= self._max_message_bytes:
                        room.clear()
                        await room.wait()
            finally:
                await in_flight.put(None)

        reader = asyncio.create_task(submit_all())
        summary = pb.StreamSummary()
        try:
            while (item := await in_flight.get()) is not None:
                pending, size = item
                answer = await pending
                _add_to_summary(summary, answer.stats)
                yield answer.response  # a ComputeStreamResponse already (_compute_item)
                held -= size
                room.set()
            await reader  # a broken request stream ends the call with its error
            summary.normalized_loss = normalized_loss(summary.loss_sum, summary.positives)
            yield pb.ComputeStreamResponse(summary=summary)
        finally:
            # a cancelled or failed call: stop reading, and drop queued items not started yet
            reader.cancel()
            while not in_flight.empty():
                item = in_flight.get_nowait()
                if item is not None:
                    item[0].cancel()

    async def GetServerInfo(self, request, context) -> pb.GetServerInfoResponse:
        return pb.GetServerInfoResponse(
            version=__version__,
            backends=self._backends.names,
            default_backend=self._backends.default_name,
            devices=self._backends.devices(),
            logit_dtypes=list(LOGIT_DTYPES),
            max_message_bytes=self._max_message_bytes,
            max_elements=self._limits.max_elements,
        )


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class Received(NamedTuple):
    """A request as the deserializer left it: the ComputeRequest, or None and why the bytes are not one
    (refused by the servicer with INVALID_ARGUMENT: a deserializer that raised would make grpc answer
    UNKNOWN and end a whole stream); its size on the wire, kept because upb's ByteSize() serializes the
    whole message again (~3 ms for a 4M-element request); and, for a large request, its tensors' payloads
    as views of the received bytes (wire.py), the message then holding everything else."""

    message: pb.ComputeRequest | None
    size: int
    error: str = ""
    payloads: dict | None = None

    @property
    def request_id(self) -> str:
        return self.message.request_id if self.message is not None else ""


# From this size a request's tensors are read in place (wire.py): below it protobuf's copies cost less
# than finding the fields in Python.
ZERO_COPY_BYTES = 64 * 1024


def parse_request(data: bytes) -> Received:
    """The request deserializer."""
    return read_request(data, in_place=len(data) >= ZERO_COPY_BYTES)


def read_request(data: bytes, in_place: bool) -> Received:
    try:
        parsed = wire.parse_in_place(pb.ComputeRequest, data) if in_place else None
        if parsed is None:
            return Received(pb.ComputeRequest.FromString(data), len(data))
        message, payloads = parsed
        return Received(message, len(data), payloads=payloads)
    except DecodeError as e:
        return Received(None, len(data), str(e)[:200])


class Answer(NamedTuple):
    """A serialized ComputeResponse (a ComputeStreamResponse around it for a stream item), and its stats
    (None for a failed stream item)."""

    response: bytes
    stats: pb.ItemStats | None


def serialize(message) -> bytes:
    """Response serializer: bytes pass through (already serialized by Answer), messages are serialized."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_to_server(servicer: "FocalLossServicer", server) -> None:
    """Like the generated add_FocalLossServiceServicer_to_server, with the pass-through response serializer."""
    handlers = {
        "Compute": grpc.unary_unary_rpc_method_handler(
            servicer.Compute, request_deserializer=parse_request, response_serializer=serialize),
        "ComputeStream": grpc.stream_stream_rpc_method_handler(
            servicer.ComputeStream, request_deserializer=parse_request, response_serializer=serialize),
        "GetServerInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetServerInfo, request_deserializer=pb.GetServerInfoRequest.FromString,
            response_serializer=serialize),
    }
    service = pb.DESCRIPTOR.services_by_name["FocalLossService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))


def _stream_result_key(length: int) -> bytes:
    """What turns a serialized ComputeResponse of `length` bytes into a ComputeStreamResponse{result: ...}."""
    return length_delimited(1, length)


def _add_to_summary(summary: pb.StreamSummary, stats: pb.ItemStats | None) -> None:
    summary.items += 1
    if stats is None:
        summary.failed_items += 1
        return
    summary.elements += stats.elements
    summary.positives += stats.positives
    summary.loss_sum += stats.loss_sum


def _log_internal(request_id: str) -> str:
    """Logs the traceback under a fresh error id; returns the message the client gets (no payload)."""
    error_id = uuid.uuid4().hex[:12]
    log.exception("internal error %s in request %r", error_id, request_id,
                  extra={"fields": {"event": "internal_error", "error_id": error_id, "request_id": request_id}})
    return f"internal error {error_id} (request_id {request_id!r}); the server logged the details"
