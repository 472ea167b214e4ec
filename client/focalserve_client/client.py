"""FocalLossClient: NumPy arrays in, NumPy arrays out, over gRPC.

- `compute()` sends one batch; a batch too large for one message is split into chunks sent over one
  `ComputeStream`, and their results combined exactly as one request would give (see `_split`).
- `stream()` sends many batches over one `ComputeStream` and yields each result as it arrives, then the
  `StreamSummary`.
- Every call has a deadline; UNAVAILABLE is retried with exponential backoff by gRPC itself, through the
  channel's service config.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from focalloss.v1 import focal_loss_pb2 as pb
from focalloss.v1 import focal_loss_pb2_grpc as pb_grpc

from .combine import reduced_loss
from .tensor import decode, encode

SERVICE = "focalloss.v1.FocalLossService"
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# Room for a message's own fields (ids, shapes, scalars, stats) next to its tensor bytes.
MESSAGE_OVERHEAD = 4096

_LABEL_FORMATS = {"dense": pb.LABEL_FORMAT_DENSE, "class_index": pb.LABEL_FORMAT_CLASS_INDEX,
                  "class-index": pb.LABEL_FORMAT_CLASS_INDEX}
_REDUCTIONS = {"none": pb.REDUCTION_NONE, "mean": pb.REDUCTION_MEAN, "sum": pb.REDUCTION_SUM}
_BACKENDS = {"auto": pb.BACKEND_AUTO, "cpu": pb.BACKEND_CPU, "gpu": pb.BACKEND_GPU}
_FLOAT_DTYPES = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64)


def service_config(max_attempts: int = 5) -> str:
    """Retry UNAVAILABLE (server restarting, connection refused, draining) and CANCELLED by the server
    with exponential backoff; and, with
    a balancing policy such as round_robin, skip replicas whose health service says NOT_SERVING (draining)."""
    return json.dumps({"healthCheckConfig": {"serviceName": SERVICE}, "methodConfig": [{
        "name": [{"service": SERVICE}],
        "retryPolicy": {"maxAttempts": max_attempts, "initialBackoff": "0.1s", "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        # CANCELLED too: a server shutting down cancels calls it received but had not started
                        # (grpc/grpc#41785). Every call here is a pure function, so a retry is always safe;
                        # gRPC never retries once response headers came, nor a cancellation by this client.
                        "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]},
    }]})


class FocalLossError(Exception):
    """The service refused or failed a request. `violations`: (field, description) pairs."""

    def __init__(self, code: grpc.StatusCode, message: str, violations: list[tuple[str, str]] | None = None,
                 request_id: str = ""):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.violations = violations or []
        self.request_id = request_id

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, request_id: str = "") -> "FocalLossError":
        status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
        if status is None:
            return cls(error.code(), error.details() or "", request_id=request_id)
        return cls.from_status(status, request_id)

    @classmethod
    def from_status(cls, status, request_id: str = "") -> "FocalLossError":
        violations = []
        for detail in status.details:
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(bad_request):
                violations += [(v.field, v.description) for v in bad_request.field_violations]
        code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
        return cls(code, status.message, violations, request_id)


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


def parse_response(response: pb.ComputeResponse) -> ComputeResult:
    if response.HasField("error"):
        return ComputeResult(request_id=response.request_id,
                             error=FocalLossError.from_status(response.error, response.request_id))
    s = response.stats
    return ComputeResult(
        request_id=response.request_id,
        loss=decode(response.loss, "loss", _FLOAT_DTYPES),
        grad=decode(response.grad, "grad", _FLOAT_DTYPES) if response.HasField("grad") else None,
        backend=response.backend,
        stats=ItemStats(s.elements, s.positives, s.loss_sum, s.compute_seconds),
    )


class FocalLossClient:
    """A client of one focalserve target ("host:port", "ipv4:a:p,b:q", "dns:///name:port").

    max_message_bytes: the client's own limit; the effective one is the smaller of it and the server's
    (GetServerInfo), and larger batches are split. timeout: default deadline of every call, in seconds.
    credentials: TLS, e.g. grpc.ssl_channel_credentials(ca, key, cert) (with a client certificate for
    mutual TLS). token: sent as `authorization: Bearer <token>` with every call.
    """

    def __init__(self, target: str, *, timeout: float = DEFAULT_TIMEOUT,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_attempts: int = 5,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
                 options: Iterable[tuple] = ()):
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.max_message_bytes = max_message_bytes
        channel_options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", service_config(max_attempts)),
            # a request must fit the retry buffer to be retried: let batches of any accepted size be
            ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
            *options,
        ]
        self._channel = (grpc.secure_channel(target, credentials, channel_options) if credentials
                         else grpc.insecure_channel(target, channel_options))
        self._stub = pb_grpc.FocalLossServiceStub(self._channel)
        self._server_max: int | None = None

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

    def message_limit(self) -> int:
        """The largest message both sides accept."""
        if self._server_max is None:
            self._server_max = self.server_info().max_message_bytes or self.max_message_bytes
        return min(self.max_message_bytes, self._server_max)

    def compute(self, logit, label, *, label_format: str = "dense", alpha: float | None = None,
                gamma: float | None = None, normalizer: float | None = None, reduction: str = "sum",
                compute_grad: bool = False, grad_output=None, backend: str = "auto", request_id: str = "",
                timeout: float | None = None,
                progress: Callable[[int, int], None] | None = None) -> ComputeResult:
        """The focal loss of one batch (and its gradient with compute_grad). Raises FocalLossError.

        label_format: "dense" (labels shaped like logit) or "class_index" (labels [N, 1]);
        reduction: "none", "mean" or "sum"; alpha/gamma/normalizer: None means the service's default.
        A batch larger than the message limit is split; `progress(done, total)` then reports elements.
        """
        logit = np.asarray(logit)
        label = np.asarray(label)
        kwargs = dict(label_format=label_format, alpha=alpha, gamma=gamma, normalizer=normalizer,
                      reduction=reduction, compute_grad=compute_grad, grad_output=grad_output, backend=backend)
        if _request_bytes(logit, label, grad_output, reduction, compute_grad) <= self.message_limit():
            request = build_request(logit, label, request_id=request_id, **kwargs)
            try:
                response = self._stub.Compute(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                raise FocalLossError.from_rpc_error(e, request_id) from None
            result = parse_response(response)
            if progress:
                progress(logit.size, logit.size)
            return result
        return self._compute_split(logit, label, request_id=request_id, timeout=timeout, progress=progress,
                                   **kwargs)

    def stream(self, batches: Iterable, *, timeout: float | None = None) -> Iterator[ComputeResult | StreamSummary]:
        """Computes many batches over one ComputeStream; yields each ComputeResult in order, then the summary.

        A batch is a dict of `compute()`'s arguments (logit, label, and keywords) or a (logit, label) pair.
        A refused batch yields a result with `error` set; the stream goes on.
        """
        def requests() -> Iterator[pb.ComputeRequest]:
            for i, batch in enumerate(batches):
                kwargs = dict(batch) if isinstance(batch, dict) else {"logit": batch[0], "label": batch[1]}
                kwargs.setdefault("request_id", str(i))
                kwargs.pop("timeout", None)
                kwargs.pop("progress", None)
                yield build_request(**kwargs)

        call = self._stub.ComputeStream(requests(), timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            for message in call:
                if message.HasField("summary"):
                    s = message.summary
                    yield StreamSummary(s.items, s.failed_items, s.elements, s.positives, s.loss_sum,
                                        s.normalized_loss)
                else:
                    yield parse_response(message.result)
        except grpc.RpcError as e:
            raise FocalLossError.from_rpc_error(e) from None
        finally:
            call.cancel()  # no-op once finished; stops the server's work if the caller stopped early

    # ---- splitting a batch over ComputeStream ----

    def _compute_split(self, logit: np.ndarray, label: np.ndarray, *, label_format: str, alpha, gamma,
                       normalizer, reduction: str, compute_grad: bool, grad_output, backend: str,
                       request_id: str, timeout: float | None,
                       progress: Callable[[int, int], None] | None) -> ComputeResult:
        """One batch as row chunks, combined exactly as the single request would be.

        Every chunk gets the batch's final normalizer (the class-index fg_num counted over the whole
        batch, clamped to >= 1). NONE chunks keep reduction NONE. SUM and MEAN chunks are sent as SUM
        with normalizer·numel for MEAN, so each chunk's gradient is already scaled as the whole batch's;
        the loss is the float64 sum of the chunks' un-normalized `loss_sum`, reduced as the server does.
        """
        reduction = reduction.lower()
        class_index = _LABEL_FORMATS[label_format.lower()] == pb.LABEL_FORMAT_CLASS_INDEX
        if class_index:
            if logit.ndim != 2 or label.shape != (logit.shape[0], 1):
                raise ValueError("class-index form needs logit [N, C] and label [N, 1]")
            norm = float(np.count_nonzero(label >= 1)) if normalizer is None else float(normalizer)
            norm = max(norm, 1.0) if math.isfinite(norm) else norm
            rows, width = logit.shape
            logit_rows, label_rows = logit, label
        else:
            # dense is element-wise: any flat split of the elements is a valid one
            norm = 1.0 if normalizer is None else float(normalizer)
            rows, width = logit.size, 1
            logit_rows, label_rows = logit.reshape(rows, 1), label.reshape(rows, 1)
        grad_rows = None
        if grad_output is not None and reduction == "none":
            grad_rows = np.asarray(grad_output).reshape(rows, width)

        out_dtype = np.float64 if logit.dtype == np.float64 else np.float32
        row_bytes = max(
            logit.itemsize * width + label.itemsize + (grad_rows.itemsize * width if grad_rows is not None else 0),
            out_dtype().itemsize * width * ((reduction == "none") + compute_grad))
        budget = self.message_limit() - MESSAGE_OVERHEAD
        rows_per_chunk = budget // row_bytes if row_bytes else rows
        if rows_per_chunk < 1:
            raise ValueError(f"one row needs {row_bytes} bytes, over the message limit of {budget}")

        chunk_reduction = "none" if reduction == "none" else "sum"
        chunk_norm = norm * logit.size if reduction == "mean" else norm
        chunk_grad_output = None if reduction == "none" or grad_output is None else grad_output
        starts = range(0, rows, rows_per_chunk)

        def chunk_requests() -> Iterator[pb.ComputeRequest]:
            for i, start in enumerate(starts):
                stop = min(start + rows_per_chunk, rows)
                g = grad_rows[start:stop] if grad_rows is not None else chunk_grad_output
                chunk = build_request(logit_rows[start:stop], label_rows[start:stop], label_format=label_format,
                                      alpha=alpha, gamma=gamma, normalizer=chunk_norm, reduction=chunk_reduction,
                                      compute_grad=compute_grad, grad_output=g, backend=backend,
                                      request_id=f"{request_id}#{i}")
                # the server picks every chunk's engine by the whole batch's size: bit-identical results
                chunk.batch_elements = logit.size
                yield chunk

        loss_rows = np.empty((rows, width), out_dtype) if reduction == "none" else None
        grad_out = np.empty((rows, width), out_dtype) if compute_grad else None
        sums, stats, backends = [], ItemStats(), set()
        timeout = timeout or self.timeout * max(1, len(starts))
        call = self._stub.ComputeStream(chunk_requests(), timeout=timeout, metadata=self._metadata)
        chunk_starts = iter(starts)
        try:
            for message in call:  # read to the end: leaving after the summary would cancel a finished call
                if message.HasField("summary"):
                    continue
                part = parse_response(message.result)
                if part.error is not None:
                    part.error.request_id = request_id
                    raise part.error
                start = next(chunk_starts)
                stop = min(start + rows_per_chunk, rows)
                if loss_rows is not None:
                    loss_rows[start:stop] = part.loss.reshape(stop - start, width)
                if grad_out is not None:
                    grad_out[start:stop] = part.grad.reshape(stop - start, width)
                sums.append(part.stats.loss_sum)
                stats.elements += part.stats.elements
                stats.positives += part.stats.positives
                stats.compute_seconds += part.stats.compute_seconds
                backends.add(part.backend)
                if progress:
                    progress(stats.elements, logit.size)
        except grpc.RpcError as e:
            raise FocalLossError.from_rpc_error(e, request_id) from None
        finally:
            call.cancel()  # no-op once the call has finished; stops the server's work after an error

        stats.loss_sum = math.fsum(sums)
        if loss_rows is not None:
            loss = loss_rows.reshape(logit.shape)
        else:
            loss = np.asarray(reduced_loss(stats.loss_sum, norm, logit.size, reduction), out_dtype)
        return ComputeResult(request_id=request_id, loss=loss,
                             grad=grad_out.reshape(logit.shape) if grad_out is not None else None,
                             backend=",".join(sorted(backends)), stats=stats)


def _request_bytes(logit: np.ndarray, label: np.ndarray, grad_output, reduction: str, compute_grad: bool) -> int:
    """The larger of the request's and the response's size, with room for the fields around the tensors."""
    out_item = 8 if logit.dtype == np.float64 else 4
    request = logit.nbytes + label.nbytes + (np.asarray(grad_output).nbytes if grad_output is not None else 0)
    response = out_item * logit.size * ((reduction.lower() == "none") + bool(compute_grad))
    return max(request, response) + MESSAGE_OVERHEAD
