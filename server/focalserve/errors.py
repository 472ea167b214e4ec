"""Errors that end a request with a gRPC status, and their `google.rpc.Status` form."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2


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
        """The status with `google.rpc.BadRequest` field violations attached as details."""
        status = status_pb2.Status(code=self.code.value[0], message=str(self))
        if self.violations:
            detail = any_pb2.Any()
            detail.Pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                        for f, d in self.violations
                    ]
                )
            )
            status.details.append(detail)
        return status


def internal_status(message: str) -> status_pb2.Status:
    return status_pb2.Status(code=code_pb2.INTERNAL, message=message)
