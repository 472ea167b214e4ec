"""Command-line flags, each with a FOCALSERVE_* environment fallback (flag > environment > default)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    host: str
    port: int
    metrics_host: str
    metrics_port: int
    backend: str
    workers: int
    max_message_mb: int
    max_elements: int
    allow_nonfinite: bool
    grace_seconds: float
    log_format: str

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024


def _env(name: str, default):
    value = os.environ.get(f"FOCALSERVE_{name}")
    if value is None:
        return default
    if isinstance(default, bool):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return type(default)(value)


def parse_args(argv: list[str] | None = None) -> Config:
    cpus = os.cpu_count() or 1
    p = argparse.ArgumentParser(
        prog="focalserve", description="Sigmoid focal loss + gradient as a gRPC service.",
        epilog="Every flag falls back to the environment variable FOCALSERVE_<NAME> (e.g. FOCALSERVE_PORT).")
    p.add_argument("--host", default=_env("HOST", "[::]"), help="gRPC bind address (default [::])")
    p.add_argument("--port", type=int, default=_env("PORT", 50051), help="gRPC port (default 50051; 0 picks a free one)")
    p.add_argument("--metrics-host", default=_env("METRICS_HOST", "0.0.0.0"),
                   help="Prometheus /metrics bind address (default 0.0.0.0)")
    p.add_argument("--metrics-port", type=int, default=_env("METRICS_PORT", 8000),
                   help="Prometheus /metrics port (default 8000; -1 disables)")
    p.add_argument("--backend", choices=("auto", "cpu", "gpu"), default=_env("BACKEND", "auto"),
                   help="auto: the GPU when CuPy sees one, else the CPU (default auto)")
    p.add_argument("--workers", type=int, default=_env("WORKERS", cpus),
                   help=f"requests computed at once, and threads one large request is split over (default {cpus})")
    p.add_argument("--max-message-mb", type=int, default=_env("MAX_MESSAGE_MB", 256),
                   help="largest request or response message in MiB (default 256); larger: RESOURCE_EXHAUSTED")
    p.add_argument("--max-elements", type=int, default=_env("MAX_ELEMENTS", 0),
                   help="largest logit in elements per request (default 0: bounded by the message size only)")
    p.add_argument("--allow-nonfinite", action="store_true", default=_env("ALLOW_NONFINITE", False),
                   help="compute NaN/inf logits instead of rejecting them with INVALID_ARGUMENT")
    p.add_argument("--grace-seconds", type=float, default=_env("GRACE_SECONDS", 30.0),
                   help="on SIGTERM/SIGINT, how long in-flight calls may finish (default 30)")
    p.add_argument("--log-format", choices=("text", "json"), default=_env("LOG_FORMAT", "text"))
    a = p.parse_args(argv)
    if a.workers < 1:
        p.error("--workers must be >= 1")
    if a.max_message_mb < 1:
        p.error("--max-message-mb must be >= 1")
    return Config(host=a.host, port=a.port, metrics_host=a.metrics_host, metrics_port=a.metrics_port,
                  backend=a.backend, workers=a.workers, max_message_mb=a.max_message_mb,
                  max_elements=a.max_elements, allow_nonfinite=a.allow_nonfinite,
                  grace_seconds=a.grace_seconds, log_format=a.log_format)
