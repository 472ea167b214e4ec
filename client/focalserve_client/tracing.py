"""Carries the caller's OpenTelemetry trace context (W3C `traceparent`, or whatever the application's
propagators say) on every call, so that the server's spans join the caller's trace.

Only when `opentelemetry-api` is importable; without it `intercept` returns the channel unchanged: the
client has no dependency on OpenTelemetry. With it but no span current, nothing is added to a call.
"""

from __future__ import annotations

from typing import NamedTuple

import grpc

try:
    from opentelemetry import propagate
except ImportError:  # the client works without OpenTelemetry
    propagate = None


def intercept(channel: grpc.Channel) -> grpc.Channel:
    """`channel`, with the trace context added to each call's metadata where OpenTelemetry is installed."""
    return channel if propagate is None else grpc.intercept_channel(channel, _Propagate())


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: tuple | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _Propagate(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):

    @staticmethod
    def _details(details):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        if not carrier:
            return details
        return _Details(details.method, details.timeout, (*(details.metadata or ()), *carrier.items()),
                        details.credentials, getattr(details, "wait_for_ready", None),
                        getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)
