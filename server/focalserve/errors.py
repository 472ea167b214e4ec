"""Errors that end a request with a gRPC status, and their `google.rpc.Status` form.

Every status the service itself sends carries a `google.rpc.ErrorInfo` (domain `focalserve`, a reason
from REASONS), so that clients branch on the cause without parsing text; a status about a request field
also carries a `google.rpc.BadRequest` naming it.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "focalserve"

# reason -> when (README "Errors" lists the same table)
REASONS = {
    "INVALID_FIELD": "a request field is invalid (INVALID_ARGUMENT, with BadRequest)",
    "TOO_MANY_ELEMENTS": "the logit exceeds --max-elements (RESOURCE_EXHAUSTED, with BadRequest)",
    "BACKEND_UNAVAILABLE": "BACKEND_GPU asked of a server without a usable GPU (FAILED_PRECONDITION)",
    "DEADLINE_BEFORE_START": "the call's deadline passed before its work started (DEADLINE_EXCEEDED)",
    "TOKEN_MISSING": "no 'authorization: Bearer <token>' metadata (UNAUTHENTICATED)",
    "TOKEN_INVALID": "a bearer token that is not the server's (UNAUTHENTICATED)",
    "OVERLOADED": "--max-concurrent-rpcs calls already in progress (RESOURCE_EXHAUSTED)",
    "DRAINING": "the server is shutting down (UNAVAILABLE): retry, on another replica",
    "CLIENT_NOT_ALLOWED": "a client certificate naming no identity of --tls-client-allow (PERMISSION_DENIED)",
    "INTERNAL_ERROR": "an unexpected failure, logged with the error id (INTERNAL)",
}

_REASON_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: "INVALID_FIELD",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "TOO_MANY_ELEMENTS",
    grpc.StatusCode.FAILED_PRECONDITION: "BACKEND_UNAVAILABLE",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DEADLINE_BEFORE_START",
}


def _pack(message) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


def error_info(reason: str, **metadata: str) -> any_pb2.Any:
    assert reason in REASONS, reason
    return _pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN,
                                             metadata={k: str(v) for k, v in metadata.items()}))


def status_proto(code: grpc.StatusCode, message: str, reason: str, **metadata: str) -> status_pb2.Status:
    return status_pb2.Status(code=code.value[0], message=message, details=[error_info(reason, **metadata)])


def refusal(code: grpc.StatusCode, message: str, reason: str, **metadata: str) -> grpc.Status:
    """A status for `context.abort_with_status`, ErrorInfo attached (in the grpc-status-details-bin trailer)."""
    return rpc_status.to_status(status_proto(code, message, reason, **metadata))


class RequestError(Exception):
    """A request the service refuses. `violations` are (field, description) pairs naming the culprit."""

    def __init__(self, code: grpc.StatusCode, violations: list[tuple[str, str]] | tuple[str, str],
                 reason: str = ""):
        if isinstance(violations, tuple):
            violations = [violations]
        self.code = code
        self.violations = violations
        self.reason = reason  # for metrics, e.g. "nonfinite"
        super().__init__("; ".join(f"{field}: {why}" for field, why in violations))

    @classmethod
    def invalid(cls, field: str, why: str, reason: str = "") -> "RequestError":
        return cls(grpc.StatusCode.INVALID_ARGUMENT, (field, why), reason)

    def to_status_proto(self) -> status_pb2.Status:
        """The status with `google.rpc.BadRequest` field violations and an ErrorInfo attached as details."""
        fields = ",".join(f for f, _ in self.violations)
        status = status_pb2.Status(code=self.code.value[0], message=str(self))
        if self.violations:  # first: clients written before ErrorInfo read details[0] as the BadRequest
            status.details.append(_pack(error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in self.violations])))
        status.details.append(error_info(_REASON_BY_CODE.get(self.code, "INVALID_FIELD"),
                                         **({"field": fields} if fields else {})))
        return status


def internal_status(message: str) -> status_pb2.Status:
    return status_proto(grpc.StatusCode.INTERNAL, message, "INTERNAL_ERROR")
