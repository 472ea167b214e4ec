"""FocalLossClient: NumPy arrays in, NumPy arrays out, over gRPC.

- `compute()` sends one batch; a batch too large for one message is split into chunks sent over one
  `ComputeStream`, and their results combined exactly as one request would give (see `_split`).
- `stream()` sends many batches over one `ComputeStream` and yields each result as it arrives, then the
  `StreamSummary`.
- Every call has a deadline; UNAVAILABLE is retried with exponential backoff by gRPC itself, through the
  channel's service config, throttled channel-wide (`retryThrottling`) when most calls fail.
- Requests are written as wire bytes by wire.py (each array copied once, labels narrowed losslessly:
  README "Wire dtypes") and responses read in place; streams and split batches keep a bounded number
  of requests in flight, encoding the next while earlier ones are on the wire.
"""

from __future__ import annotations

import collections
import json
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from focalloss.v1 import focal_loss_pb2 as pb
from focalloss.v1 import focal_loss_pb2_grpc as pb_grpc

from . import tracing, wire
from .combine import normalized_loss, reduced_loss
from .tensor import decode, encode, narrow_class_label, narrow_dense_label, wire_array

SERVICE = "focalloss.v1.FocalLossService"
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# Room for a message's own fields (ids, shapes, scalars, stats) next to its tensor bytes.
MESSAGE_OVERHEAD = 4096
# A batch over the message limit is sent in chunks of at most this many bytes: large enough that a chunk's
# fixed costs do not count, small enough that the chunks in flight stay a small part of the batch.
SPLIT_CHUNK_BYTES = 64 * 1024 * 1024
# Requests (chunks, stream items) sent and not yet answered, at most; each holds its wire bytes until sent.
MAX_IN_FLIGHT = 4
# From this size a response's tensors are read in place (wire.split): below it protobuf's copies cost less.
ZERO_COPY_BYTES = 64 * 1024

_LABEL_FORMATS = {"dense": pb.LABEL_FORMAT_DENSE, "class_index": pb.LABEL_FORMAT_CLASS_INDEX,
                  "class-index": pb.LABEL_FORMAT_CLASS_INDEX}
_REDUCTIONS = {"none": pb.REDUCTION_NONE, "mean": pb.REDUCTION_MEAN, "sum": pb.REDUCTION_SUM}
_BACKENDS = {"auto": pb.BACKEND_AUTO, "cpu": pb.BACKEND_CPU, "gpu": pb.BACKEND_GPU}
_FLOAT_DTYPES = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64)


def service_config(max_attempts: int = 5) -> str:
    """Retry UNAVAILABLE (server restarting, connection refused, draining) and CANCELLED by the server
    with exponential backoff; and, with
    a balancing policy such as round_robin, skip replicas whose health service says NOT_SERVING (draining).

    retryThrottling: when most calls of a channel fail (an outage, not a restart) retries stop, so that
    thousands of training workers do not multiply the load on a struggling service by max_attempts. Each
    failed attempt costs a token, each success gives back 0.1; retries stop while 50 or fewer of the 100 are
    left. 100, not gRPC's example 10: a draining replica fails every call in flight on the channel at once
    (16 threads sharing one client in tests/test_faults.py), and those must still be retried.
    """
    method = {"name": [{"service": SERVICE}]}
    if max_attempts > 1:  # gRPC refuses a retryPolicy of fewer than 2 attempts (the channel would not start)
        method["retryPolicy"] = {
            "maxAttempts": max_attempts, "initialBackoff": "0.1s", "maxBackoff": "2s", "backoffMultiplier": 2,
            # CANCELLED too: a server shutting down cancels calls it received but had not started
            # (grpc/grpc#41785). Every call here is a pure function, so a retry is always safe;
            # gRPC never retries once response headers came, nor a cancellation by this client.
            "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]}
    return json.dumps({"healthCheckConfig": {"serviceName": SERVICE},
                       "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1}, "methodConfig": [method]})


class FocalLossError(Exception):
    """The service refused or failed a request. `violations`: (field, description) pairs (BadRequest).

    `reason`, `domain`, `metadata`: the machine-readable cause from a `google.rpc.ErrorInfo` in the status
    details (e.g. reason "OVERLOADED", "TOKEN_MISSING", "TOKEN_INVALID", "DEADLINE_BEFORE_START"); empty
    where the status carries none (refusals made by gRPC itself, such as a message over its size limit).
    """

    def __init__(self, code: grpc.StatusCode, message: str, violations: list[tuple[str, str]] | None = None,
                 request_id: str = "", *, reason: str = "", domain: str = "", metadata: dict | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.violations = violations or []
        self.request_id = request_id
        self.reason = reason
        self.domain = domain
        self.metadata = dict(metadata or {})

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, request_id: str = "") -> "FocalLossError":
        status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
        if status is None:
            return cls(error.code(), error.details() or "", request_id=request_id)
        return cls.from_status(status, request_id)

    @classmethod
    def from_status(cls, status, request_id: str = "") -> "FocalLossError":
        violations = []
        info = None
        for detail in status.details:
            bad_request = error_details_pb2.BadRequest()
            error_info = error_details_pb2.ErrorInfo()
            if detail.Unpack(bad_request):
                violations += [(v.field, v.description) for v in bad_request.field_violations]
            elif info is None and detail.Unpack(error_info):
                info = error_info
        code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
        if info is None:
            return cls(code, status.message, violations, request_id)
        return cls(code, status.message, violations, request_id, reason=info.reason, domain=info.domain,
                   metadata=dict(info.metadata))


@dataclass
class ItemStats:
    """Before normalizer and reduction, so that results of shards combine (SPEC §2)."""

    elements: int = 0
    positives: float = 0.0
    loss_sum: float = 0.0
    compute_seconds: float = 0.0


@dataclass
class ComputeResult:
    """loss: logit-shaped for reduction "none", 0-d otherwise; grad: logit-shaped or None.

    Arrays decoded from a single response are read-only views of its bytes (no copy).
    `error` is set instead, for a stream item the server refused.
    """

    request_id: str = ""
    loss: np.ndarray | None = None
    grad: np.ndarray | None = None
    backend: str = ""
    stats: ItemStats = field(default_factory=ItemStats)
    error: FocalLossError | None = None


@dataclass
class StreamSummary:
    items: int = 0
    failed_items: int = 0
    elements: int = 0
    positives: float = 0.0
    loss_sum: float = 0.0
    normalized_loss: float = 0.0


def build_request(logit, label, *, label_format: str = "dense", alpha: float | None = None,
                  gamma: float | None = None, normalizer: float | None = None, reduction: str = "sum",
                  compute_grad: bool = False, grad_output=None, backend: str = "auto",
                  request_id: str = "") -> pb.ComputeRequest:
    """A ComputeRequest from NumPy arrays and the keyword arguments of `FocalLossClient.compute`."""
    request = pb.ComputeRequest(
        request_id=request_id, logit=encode(logit), label=encode(label),
        label_format=_choice(_LABEL_FORMATS, label_format, "label_format"),
        reduction=_choice(_REDUCTIONS, reduction, "reduction"), compute_grad=compute_grad,
        backend=_choice(_BACKENDS, backend, "backend"))
    for name, value in (("alpha", alpha), ("gamma", gamma), ("normalizer", normalizer)):
        if value is not None:
            setattr(request, name, float(value))
    if grad_output is not None:
        request.grad_output.CopyFrom(encode(np.asarray(grad_output)))
    return request


def _choice(table: dict[str, int], value: str, name: str) -> int:
    try:
        return table[value.lower()]
    except KeyError:
        raise ValueError(f"{name} must be one of {sorted(set(table))}, got {value!r}") from None


def parse_response(response: pb.ComputeResponse, payloads: dict | None = None) -> ComputeResult:
    """`payloads`: the tensors' data where it was read in place (read_response), else in the message."""
    if response.HasField("error"):
        return ComputeResult(request_id=response.request_id,
                             error=FocalLossError.from_status(response.error, response.request_id))
    s = response.stats
    payloads = payloads or {}
    return ComputeResult(
        request_id=response.request_id,
        loss=decode(response.loss, "loss", _FLOAT_DTYPES, payloads.get("loss")),
        grad=decode(response.grad, "grad", _FLOAT_DTYPES, payloads.get("grad")) if response.HasField("grad") else None,
        backend=response.backend,
        stats=ItemStats(s.elements, s.positives, s.loss_sum, s.compute_seconds),
    )


def read_response(data: bytes, start: int = 0, end: int | None = None) -> ComputeResult:
    """A ComputeResponse from its wire bytes (data[start:end]); a large one's tensors are read-only views
    of `data`, not copies."""
    end = len(data) if end is None else end
    if end - start >= ZERO_COPY_BYTES:
        parsed = wire.parse_in_place(pb.ComputeResponse, data, wire.RESPONSE_TENSOR_FIELDS, start, end)
        if parsed is not None:
            return parse_response(*parsed)
    return parse_response(pb.ComputeResponse.FromString(data[start:end] if start or end != len(data) else data))


def _read_stream_message(data: bytes) -> ComputeResult | pb.StreamSummary:
    span = wire.only_field(data, 1) if len(data) >= ZERO_COPY_BYTES else None
    if span is not None:
        return read_response(data, *span)
    message = pb.ComputeStreamResponse.FromString(data)
    return message.summary if message.HasField("summary") else parse_response(message.result)


def _refusal(code: grpc.StatusCode, field_name: str, why: str, request_id: str) -> FocalLossError:
    """A refusal found before sending, shaped as the server's would be."""
    return FocalLossError(code, f"{field_name}: {why}", [(field_name, why)], request_id)


class _Request:
    """One batch, ready for the wire: arrays in their wire dtypes (labels narrowed), enums as numbers."""

    def __init__(self, logit, label, *, label_format: str = "dense", alpha: float | None = None,
                 gamma: float | None = None, normalizer: float | None = None, reduction: str = "sum",
                 compute_grad: bool = False, grad_output=None, backend: str = "auto", request_id: str = ""):
        self.logit = np.asarray(logit)
        self.request_id = request_id
        self.label_format = _choice(_LABEL_FORMATS, label_format, "label_format")
        self.reduction_name = reduction.lower()
        self.reduction = _choice(_REDUCTIONS, reduction, "reduction")
        self.backend = _choice(_BACKENDS, backend, "backend")
        self.alpha, self.gamma = _optional_float(alpha), _optional_float(gamma)
        self.normalizer = _optional_float(normalizer)
        self.compute_grad = bool(compute_grad)
        self.class_index = self.label_format == pb.LABEL_FORMAT_CLASS_INDEX
        # the caller's labels as they would travel un-narrowed (no copy when already wire-ready); the whole
        # batch is narrowed only when it travels as one request, a split one chunk by chunk (`encode`), so a
        # split batch never holds a narrowed copy of all its labels
        self.label_raw = wire_array(label)
        self._label: tuple[int, np.ndarray] | None = None
        self.logit_wire = wire_array(self.logit)
        self.grad_output = None if grad_output is None else wire_array(grad_output)

    @property
    def label(self) -> tuple[int, np.ndarray]:
        """(wire dtype, labels) of the whole batch, narrowed where lossless (README "Wire dtypes")."""
        if self._label is None:
            self._label = self._narrow(self.label_raw)
        return self._label

    def _narrow(self, label: tuple[int, np.ndarray]) -> tuple[int, np.ndarray]:
        array = label[1]
        narrowed = narrow_class_label(array) if self.class_index else narrow_dense_label(array)
        return narrowed or label

    def request_bytes(self, label_bytes: int | None = None) -> int:
        """The larger of the request's and the response's size, with room for the fields around the tensors
        (`label_bytes`: the labels' size on the wire, by default after narrowing)."""
        out_item = 8 if self.logit.dtype == np.float64 else 4
        label_bytes = self.label[1].nbytes if label_bytes is None else label_bytes
        request = self.logit_wire[1].nbytes + label_bytes + (
            self.grad_output[1].nbytes if self.grad_output is not None else 0)
        response = out_item * self.logit.size * ((self.reduction == pb.REDUCTION_NONE) + self.compute_grad)
        return max(request, response) + MESSAGE_OVERHEAD

    def encode(self, request_id: str | None = None, rows: slice | None = None, *, width: int = 1,
               normalizer: float | None = None, reduction: int | None = None, grad_output=None,
               batch_elements: int = 0) -> bytes:
        """The request's wire bytes; `rows` of the row view (width elements a row) for a chunk."""
        logit, grad_output = self.logit_wire, self.grad_output if grad_output is None else grad_output
        if rows is None:
            label = self.label
        else:
            logit = (logit[0], logit[1].reshape(-1, width)[rows])
            label = self._label or self.label_raw
            label = (label[0], label[1].reshape(-1, 1 if self.class_index else width)[rows])
            if self._label is None:
                label = self._narrow(label)
        return wire.encode_request(
            logit=logit, label=label, request_id=self.request_id if request_id is None else request_id,
            label_format=self.label_format, alpha=self.alpha, gamma=self.gamma,
            normalizer=self.normalizer if normalizer is None else normalizer,
            reduction=self.reduction if reduction is None else reduction, compute_grad=self.compute_grad,
            grad_output=grad_output, backend=self.backend, batch_elements=batch_elements)


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


class _Plan:
    """How one batch travels: one request, or row chunks over ComputeStream combined exactly as the single
    request would be (`add` each answer in order; `result` once `add` returned True).

    Every chunk gets the batch's final normalizer (the class-index fg_num counted over the whole batch,
    clamped to >= 1). NONE chunks keep reduction NONE. SUM and MEAN chunks are sent as SUM with
    normalizer·numel for MEAN, so each chunk's gradient is already scaled as the whole batch's; the loss
    is the float64 sum of the chunks' un-normalized `loss_sum`, reduced as the server does.
    """

    def __init__(self, request: _Request, limit_bytes: int, max_elements: int,
                 progress: Callable[[int, int], None] | None = None):
        self.request = request
        self.progress = progress
        self.error: FocalLossError | None = None
        self.parts: list[ComputeResult] = []
        logit = request.logit
        self.size = logit.size
        if not (max_elements and logit.size > max_elements) and (
                request.request_bytes(request.label_raw[1].size) <= limit_bytes  # could fit, narrowed
                and request.request_bytes() <= limit_bytes):
            self.chunks = 1
            return
        label = request.label_raw[1]
        if request.class_index:
            if logit.ndim != 2 or label.shape != (logit.shape[0], 1):
                raise _refusal(grpc.StatusCode.INVALID_ARGUMENT, "label",
                               "class-index form needs logit [N, C] and label [N, 1]", request.request_id)
            norm = (float(np.count_nonzero(label >= 1)) if request.normalizer is None
                    else request.normalizer)
            norm = max(norm, 1.0) if math.isfinite(norm) else norm
            self.rows, self.width = logit.shape
        else:
            if label.shape != logit.shape:
                raise _refusal(grpc.StatusCode.INVALID_ARGUMENT, "label",
                               f"shape {list(label.shape)} does not match logit {list(logit.shape)}",
                               request.request_id)
            # dense is element-wise: any flat split of the elements is a valid one
            norm = 1.0 if request.normalizer is None else request.normalizer
            self.rows, self.width = logit.size, 1
        self.norm = norm
        none = request.reduction == pb.REDUCTION_NONE
        self.grad_rows = None
        if request.grad_output is not None and none:
            dtype, g = request.grad_output
            if g.size != logit.size:
                raise _refusal(grpc.StatusCode.INVALID_ARGUMENT, "grad_output",
                               f"shape {list(g.shape)} does not match the loss's {list(logit.shape)}",
                               request.request_id)
            self.grad_rows = (dtype, g.reshape(self.rows, self.width))
        self.out_dtype = np.float64 if logit.dtype == np.float64 else np.float32
        width = self.width
        row_bytes = max(
            # the labels un-narrowed: a chunk that is not all 0/1 must fit too
            request.logit_wire[1].itemsize * width + label.itemsize * (1 if request.class_index else width)
            + (self.grad_rows[1].itemsize * width if self.grad_rows is not None else 0),
            np.dtype(self.out_dtype).itemsize * width * (none + request.compute_grad))
        budget = min(limit_bytes, SPLIT_CHUNK_BYTES) - MESSAGE_OVERHEAD
        rows_per_chunk = budget // row_bytes if row_bytes else self.rows
        if max_elements:
            rows_per_chunk = min(rows_per_chunk, max_elements // width)
        if rows_per_chunk < 1:
            raise _refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "logit",
                           f"one row needs {row_bytes} bytes ({width} elements), over the limits of "
                           f"{budget} bytes and {max_elements or 'any'} elements per message", request.request_id)
        self.rows_per_chunk = rows_per_chunk
        self.starts = range(0, self.rows, rows_per_chunk)
        self.chunks = len(self.starts)
        self.chunk_reduction = pb.REDUCTION_NONE if none else pb.REDUCTION_SUM
        self.chunk_norm = norm * logit.size if request.reduction == pb.REDUCTION_MEAN else norm
        self.chunk_grad_output = None if none else request.grad_output
        self.loss_rows = np.empty((self.rows, width), self.out_dtype) if none else None
        self.grad_out = np.empty((self.rows, width), self.out_dtype) if request.compute_grad else None
        self.sums: list[float] = []
        self.stats = ItemStats()
        self.backends: set[str] = set()

    @classmethod
    def refused(cls, result: ComputeResult) -> "_Plan":
        """A batch refused before sending: no request, `result` in its turn."""
        plan = cls.__new__(cls)
        plan.chunks, plan.parts = 0, [result]
        return plan

    def requests(self) -> Iterator[bytes]:
        if self.chunks == 0:
            return
        if self.chunks == 1:
            yield self.request.encode()
            return
        for i, start in enumerate(self.starts):
            rows = slice(start, min(start + self.rows_per_chunk, self.rows))
            g = self.chunk_grad_output
            if self.grad_rows is not None:
                g = (self.grad_rows[0], self.grad_rows[1][rows])
            # batch_elements: the server picks every chunk's engine by the whole batch's size, so the chunks'
            # results are bit-identical to the whole batch's
            yield self.request.encode(f"{self.request.request_id}#{i}", rows, width=self.width,
                                      normalizer=self.chunk_norm, reduction=self.chunk_reduction, grad_output=g,
                                      batch_elements=self.size)

    def add(self, part: ComputeResult) -> bool:
        """Takes the next answer; True once every chunk is answered."""
        index = len(self.parts)
        self.parts.append(part)
        if self.chunks == 1:
            if self.progress and part.error is None:
                self.progress(self.size, self.size)
            self.parts = [part]
            return True
        if part.error is not None:
            if self.error is None:
                self.error = part.error
                self.error.request_id = self.request.request_id
        elif self.error is None:
            start = self.starts[index]
            stop = min(start + self.rows_per_chunk, self.rows)
            if self.loss_rows is not None:
                self.loss_rows[start:stop] = part.loss.reshape(stop - start, self.width)
            if self.grad_out is not None:
                self.grad_out[start:stop] = part.grad.reshape(stop - start, self.width)
            self.sums.append(part.stats.loss_sum)
            self.stats.elements += part.stats.elements
            self.stats.positives += part.stats.positives
            self.stats.compute_seconds += part.stats.compute_seconds
            self.backends.add(part.backend)
            if self.progress:
                self.progress(self.stats.elements, self.size)
        self.parts[-1] = None  # the chunk's arrays are copied into the batch's: let its bytes go
        return len(self.parts) == self.chunks

    def result(self) -> ComputeResult:
        if self.chunks <= 1:
            return self.parts[0]
        request_id = self.request.request_id
        if self.error is not None:
            return ComputeResult(request_id=request_id, error=self.error)
        stats = self.stats
        stats.loss_sum = math.fsum(self.sums)
        shape = self.request.logit.shape
        if self.loss_rows is not None:
            loss = self.loss_rows.reshape(shape)
        else:
            loss = np.asarray(reduced_loss(stats.loss_sum, self.norm, self.size, self.request.reduction_name),
                              self.out_dtype)
        return ComputeResult(request_id=request_id, loss=loss,
                             grad=self.grad_out.reshape(shape) if self.grad_out is not None else None,
                             backend=",".join(sorted(self.backends)), stats=stats)


def _stream_kwargs(index: int, batch) -> dict:
    kwargs = dict(batch) if isinstance(batch, dict) else {"logit": batch[0], "label": batch[1]}
    kwargs.setdefault("request_id", str(index))
    kwargs.pop("timeout", None)
    kwargs.pop("progress", None)
    return kwargs


class FocalLossClient:
    """A client of one focalserve target ("host:port", "ipv4:a:p,b:q", "dns:///name:port").

    max_message_bytes: the client's own limit; the effective one is the smaller of it and the server's
    (GetServerInfo), and larger batches are split (so are batches over the server's max_elements).
    timeout: default deadline of every call, in seconds. credentials: TLS, e.g.
    grpc.ssl_channel_credentials(ca, key, cert) (with a client certificate for mutual TLS). token: sent as
    `authorization: Bearer <token>` with every call. max_in_flight: requests of a stream or a split batch
    sent and not yet answered, at most.
    """

    def __init__(self, target: str, *, timeout: float = DEFAULT_TIMEOUT,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_attempts: int = 5,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
                 options: Iterable[tuple] = (), max_in_flight: int = MAX_IN_FLIGHT):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.max_message_bytes = max_message_bytes
        channel_options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # Without retries gRPC keeps no copy of a request for them (README "Memory of a call")
            ("grpc.enable_retries", int(max_attempts > 1)),
            ("grpc.service_config", service_config(max_attempts)),
            # a request must fit the retry buffer to be retried: let batches of any accepted size be
            ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
            *options,
        ]
        self._channel = (grpc.secure_channel(target, credentials, channel_options) if credentials
                         else grpc.insecure_channel(target, channel_options))
        traced = tracing.intercept(self._channel)  # carries the caller's trace context where OpenTelemetry is
        self._stub = pb_grpc.FocalLossServiceStub(traced)
        # requests are written as bytes by wire.py and responses read in place: identity (de)serializers
        self._compute = traced.unary_unary(f"/{SERVICE}/Compute", request_serializer=None,
                                           response_deserializer=None)
        self._compute_stream = traced.stream_stream(f"/{SERVICE}/ComputeStream", request_serializer=None,
                                                    response_deserializer=None)
        self._server_limits: tuple[int, int] | None = None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "FocalLossClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- calls ----

    def server_info(self, timeout: float | None = None) -> pb.GetServerInfoResponse:
        try:
            return self._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=timeout or self.timeout,
                                            metadata=self._metadata)
        except grpc.RpcError as e:
            raise FocalLossError.from_rpc_error(e) from None

    def _limits(self) -> tuple[int, int]:
        """(the largest message both sides accept, the server's max elements per request or 0)."""
        if self._server_limits is None:
            try:
                info = self.server_info()
            except FocalLossError as e:
                if e.code != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                info = pb.GetServerInfoResponse()  # a server without it (a proxy, a test double): our own limit
            self._server_limits = (info.max_message_bytes or self.max_message_bytes, info.max_elements)
        server_bytes, max_elements = self._server_limits
        return min(self.max_message_bytes, server_bytes), max_elements

    def message_limit(self) -> int:
        """The largest message both sides accept."""
        return self._limits()[0]

    def compute(self, logit, label, *, label_format: str = "dense", alpha: float | None = None,
                gamma: float | None = None, normalizer: float | None = None, reduction: str = "sum",
                compute_grad: bool = False, grad_output=None, backend: str = "auto", request_id: str = "",
                timeout: float | None = None,
                progress: Callable[[int, int], None] | None = None) -> ComputeResult:
        """The focal loss of one batch (and its gradient with compute_grad). Raises FocalLossError.

        label_format: "dense" (labels shaped like logit) or "class_index" (labels [N, 1]);
        reduction: "none", "mean" or "sum"; alpha/gamma/normalizer: None means the service's default.
        A batch larger than the message limit (or the server's max_elements) is split;
        `progress(done, total)` then reports elements.
        """
        request = _Request(logit, label, label_format=label_format, alpha=alpha, gamma=gamma,
                           normalizer=normalizer, reduction=reduction, compute_grad=compute_grad,
                           grad_output=grad_output, backend=backend, request_id=request_id)
        limit, max_elements = self._limits()
        plan = _Plan(request, limit, max_elements, progress)
        if plan.chunks == 1:
            data = request.encode()
            del request, plan  # no reference to the arrays' copies beyond `data` while the call runs
            try:
                response = self._compute(data, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                raise FocalLossError.from_rpc_error(e, request_id) from None
            result = read_response(response)
            if progress and result.error is None:
                progress(result.stats.elements, result.stats.elements)
            return result
        result = None
        for item in self._exchange(iter([plan]), timeout or self.timeout * max(1, plan.chunks)):
            if isinstance(item, ComputeResult):
                if item.error is not None:
                    raise item.error  # (closing the exchange cancels the call: the server stops its work)
                result = item
            # and on to the end: leaving before the call's status would cancel a finished call
        if result is None:
            raise FocalLossError(grpc.StatusCode.INTERNAL, "the stream ended without the batch's result",
                                 request_id=request_id)
        return result

    def stream(self, batches: Iterable, *, timeout: float | None = None) -> Iterator[ComputeResult | StreamSummary]:
        """Computes many batches over one ComputeStream; yields each ComputeResult in order, then the summary.

        A batch is a dict of `compute()`'s arguments (logit, label, and keywords) or a (logit, label) pair.
        A refused batch yields a result with `error` set; the stream goes on. A batch over the message
        limit (or the server's max_elements) travels as chunks and yields one combined result; the summary
        then counts it as one item. Up to `max_in_flight` requests are on the wire at once.
        """
        limit, max_elements = self._limits()
        adjusted = False  # the server's summary counts chunks, or misses batches refused here

        def plans() -> Iterator[_Plan]:
            nonlocal adjusted
            for i, batch in enumerate(batches):
                kwargs = _stream_kwargs(i, batch)
                try:
                    plan = _Plan(_Request(**kwargs), limit, max_elements)
                except FocalLossError as e:  # an oversize batch that cannot be split: this item fails
                    plan = _Plan.refused(ComputeResult(request_id=kwargs["request_id"], error=e))
                adjusted = adjusted or plan.chunks != 1
                yield plan

        results: list[ComputeResult] = []
        for item in self._exchange(plans(), timeout or self.timeout):
            if isinstance(item, ComputeResult):
                results.append(item)
                yield item
            elif adjusted:
                yield _summary_of(results)
            else:
                yield StreamSummary(item.items, item.failed_items, item.elements, item.positives, item.loss_sum,
                                    item.normalized_loss)

    def _exchange(self, plans: Iterator[_Plan], timeout: float) -> Iterator[ComputeResult | pb.StreamSummary]:
        """Runs plans over one ComputeStream: gRPC's sending thread pulls the requests (encoding the next
        while earlier ones are on the wire), at most max_in_flight of them unanswered. Yields each plan's
        result in order, then the server's summary (after the call has ended)."""
        pending: collections.deque[_Plan] = collections.deque()
        slots = threading.Semaphore(self.max_in_flight)
        stopped = threading.Event()
        failure: list[BaseException] = []

        def requests() -> Iterator[bytes]:
            try:
                for plan in plans:
                    pending.append(plan)
                    for data in plan.requests():
                        while not slots.acquire(timeout=0.1):
                            if stopped.is_set():
                                return
                        if stopped.is_set():
                            return
                        yield data
                        del data  # gRPC has its own copy once the next one is asked for
            except BaseException as e:  # raised to the caller after the call ends (not as gRPC's CANCELLED)
                failure.append(e)

        call = self._compute_stream(requests(), timeout=timeout, metadata=self._metadata)
        summary = None
        try:
            for data in call:  # read to the end: leaving after the summary would cancel a finished call
                message = _read_stream_message(data)
                del data
                if isinstance(message, pb.StreamSummary):
                    summary = message
                    continue
                slots.release()
                while pending[0].chunks == 0:  # refused here, nothing sent: its turn came
                    yield pending.popleft().result()
                if pending[0].add(message):
                    yield pending.popleft().result()
                while pending and pending[0].chunks == 0:  # refused here, nothing sent: its turn now
                    yield pending.popleft().result()
        except grpc.RpcError as e:
            if failure:
                raise failure[0]
            raise FocalLossError.from_rpc_error(e) from None
        finally:
            stopped.set()
            call.cancel()  # no-op once the call has finished; stops the server's work after an error
        if failure:
            raise failure[0]
        while pending and pending[0].chunks == 0:
            yield pending.popleft().result()
        if summary is not None:
            yield summary


def _summary_of(results: list[ComputeResult]) -> StreamSummary:
    """The summary of a stream whose batches were split, over the caller's batches (not the chunks),
    summed in order as the server does."""
    summary = StreamSummary(items=len(results))
    for r in results:
        if r.error is not None:
            summary.failed_items += 1
            continue
        summary.elements += r.stats.elements
        summary.positives += r.stats.positives
        summary.loss_sum += r.stats.loss_sum
    summary.normalized_loss = normalized_loss(summary.loss_sum, summary.positives)
    return summary
