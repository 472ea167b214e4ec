"""Command-line flags, each with a FOCALSERVE_* environment fallback (flag > environment > default)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Config:
    host: str
    port: int
    metrics_host: str
    metrics_port: int
    backend: str
    cpu_kernel: str
    workers: int
    max_message_mb: int
    max_elements: int
    gpu_min_elements: int
    allow_nonfinite: bool
    grace_seconds: float
    drain_delay_s: float
    log_format: str
    max_concurrent_rpcs: int
    max_connection_age_s: float
    reuse_port: bool
    tls_cert: str
    tls_key: str
    tls_client_ca: str
    auth_token: str = field(default="", repr=False)  # never printed
    tls_client_allow: tuple[str, ...] = ()

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
    p.add_argument("--cpu-kernel", choices=("compiled", "ufunc"), default=_env("CPU_KERNEL", "compiled"),
                   help="the CPU backend's loop: the compiled kernel (default; NumPy ufuncs if it is not built) "
                        "or NumPy ufuncs")
    p.add_argument("--workers", type=int, default=_env("WORKERS", cpus),
                   help=f"requests computed at once, and threads one large request is split over (default {cpus})")
    p.add_argument("--max-message-mb", type=int, default=_env("MAX_MESSAGE_MB", 256),
                   help="largest request or response message in MiB (default 256); larger: RESOURCE_EXHAUSTED")
    p.add_argument("--max-elements", type=int, default=_env("MAX_ELEMENTS", 0),
                   help="largest logit in elements per request (default 0: bounded by the message size only)")
    p.add_argument("--gpu-min-elements", type=int, default=_env("GPU_MIN_ELEMENTS", -1),
                   help="with --backend auto, batches from this size go to the GPU (default -1: measured at start)")
    p.add_argument("--allow-nonfinite", action="store_true", default=_env("ALLOW_NONFINITE", False),
                   help="compute NaN/inf logits instead of rejecting them with INVALID_ARGUMENT")
    p.add_argument("--grace-seconds", type=float, default=_env("GRACE_SECONDS", 30.0),
                   help="on SIGTERM/SIGINT, how long in-flight calls may finish (default 30)")
    p.add_argument("--drain-delay-s", type=float, default=_env("DRAIN_DELAY_S", 0.0),
                   help="on SIGTERM, keep serving this long while health says NOT_SERVING, so that load balancers "
                        "and health-checking clients move away before new calls are refused (default 0)")
    p.add_argument("--log-format", choices=("text", "json"), default=_env("LOG_FORMAT", "text"))
    p.add_argument("--max-concurrent-rpcs", type=int, default=_env("MAX_CONCURRENT_RPCS", 64),
                   help="FocalLossService calls at once; more get RESOURCE_EXHAUSTED (default 64; 0: no limit)")
    p.add_argument("--max-connection-age-s", type=float, default=_env("MAX_CONNECTION_AGE_S", 0.0),
                   help="close connections after this many seconds so clients re-resolve and rebalance "
                        "(default 0: never; 300 behind a load balancer)")
    p.add_argument("--reuse-port", action="store_true", default=_env("REUSE_PORT", False),
                   help="let several server processes share --port (SO_REUSEPORT), to use every core")
    p.add_argument("--tls-cert", default=_env("TLS_CERT", ""), help="PEM server certificate: serve TLS")
    p.add_argument("--tls-key", default=_env("TLS_KEY", ""), help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=_env("TLS_CLIENT_CA", ""),
                   help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    p.add_argument("--tls-client-allow", default=_env("TLS_CLIENT_ALLOW", ""),
                   help="with --tls-client-ca, only clients whose certificate names one of these comma-separated "
                        "identities (a subject alternative name or the common name, exactly) may call; others get "
                        "PERMISSION_DENIED (health stays open)")
    p.add_argument("--auth-token-file", default=_env("AUTH_TOKEN_FILE", ""),
                   help="file holding the bearer token every call but health must carry "
                        "(or the token itself in FOCALSERVE_AUTH_TOKEN)")
    a = p.parse_args(argv)
    if a.workers < 1:
        p.error("--workers must be >= 1")
    if a.max_message_mb < 1:
        p.error("--max-message-mb must be >= 1")
    if bool(a.tls_cert) != bool(a.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if a.tls_client_ca and not a.tls_cert:
        p.error("--tls-client-ca needs --tls-cert and --tls-key")
    allow = tuple(name.strip() for name in a.tls_client_allow.split(",") if name.strip())
    if allow and not a.tls_client_ca:
        p.error("--tls-client-allow needs --tls-client-ca (client certificates to read the identities from)")
    # stripped wherever it comes from: a Kubernetes Secret or `echo` leaves a trailing newline, which no
    # client sends (gRPC metadata cannot even carry one)
    source, token = "FOCALSERVE_AUTH_TOKEN", os.environ.get("FOCALSERVE_AUTH_TOKEN", "")
    if a.auth_token_file:
        source = "--auth-token-file"
        try:
            with open(a.auth_token_file) as f:
                token = f.read()
        except OSError as e:
            p.error(f"--auth-token-file: {e.strerror}")
        if not token.strip():
            p.error("--auth-token-file is empty")
    elif token and not token.strip():
        # set but blank: failing beats silently serving without authentication
        p.error("FOCALSERVE_AUTH_TOKEN holds only whitespace")
    token = token.strip()
    if any(not " " <= c <= "~" for c in token):
        p.error(f"{source}: the token has a character gRPC metadata cannot carry (printable ASCII only)")
    return Config(host=a.host, port=a.port, metrics_host=a.metrics_host, metrics_port=a.metrics_port,
                  backend=a.backend, cpu_kernel=a.cpu_kernel, workers=a.workers, max_message_mb=a.max_message_mb,
                  max_elements=a.max_elements, gpu_min_elements=a.gpu_min_elements, allow_nonfinite=a.allow_nonfinite,
                  grace_seconds=a.grace_seconds, drain_delay_s=a.drain_delay_s, log_format=a.log_format, max_concurrent_rpcs=a.max_concurrent_rpcs,
                  max_connection_age_s=a.max_connection_age_s, reuse_port=a.reuse_port, tls_cert=a.tls_cert, tls_key=a.tls_key,
                  tls_client_ca=a.tls_client_ca, auth_token=token, tls_client_allow=allow)
