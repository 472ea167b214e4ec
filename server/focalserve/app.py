"""Server assembly: backends, servicer, health, reflection, metrics endpoint, signals. `main()` is `make serve`."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from focalloss.v1 import focal_loss_pb2 as pb
from focalserve_client.client import build_request
from focalserve_client.tensor import encode

from . import __version__, metrics, reflection, tls, tracing
from .backends import BackendSet, NumpyBackend, cpu_kernel, measure_crossover
from .config import Config, parse_args
from .interceptors import AuthInterceptor, CallGate, MetricsInterceptor
from .request import Limits, parse
from .service import FocalLossServicer, add_to_server

log = logging.getLogger("focalserve")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FocalLossService"].full_name
STREAM_HEADROOM = 8
STREAM_LOOKAHEAD_BYTES = 4 << 20


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                 "msg": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def build_backends(config: Config) -> BackendSet:
    """The CPU backend always; the GPU one unless --backend cpu, when CuPy sees a usable device."""
    kernel = None
    if config.cpu_kernel == "compiled":
        kernel, why_not = cpu_kernel.load()
        if kernel is None:
            log.warning("CPU backend: computing with NumPy ufuncs (2-4x slower): %s", why_not,
                        extra={"fields": {"event": "cpu_kernel_fallback", "reason": why_not}})
    cpu = NumpyBackend(threads=config.workers, allow_nonfinite=config.allow_nonfinite, kernel=kernel)
    gpu = None
    if config.backend != "cpu":
        gpu, why_not = _load_gpu(config)
        if gpu is None:
            (log.error if config.backend == "gpu" else log.info)(
                "no GPU backend: %s", why_not, extra={"fields": {"event": "no_gpu_backend", "reason": why_not}})
    threshold = config.gpu_min_elements
    if gpu is not None and config.backend == "auto" and threshold < 0:
        threshold = measure_crossover(cpu, gpu, _calibration_job)
        log.info("BACKEND_AUTO sends batches of >= %d elements to the GPU (measured at start-up)", threshold,
                 extra={"fields": {"event": "gpu_threshold", "gpu_min_elements": threshold}})
    return BackendSet(cpu, gpu=gpu, default=config.backend, gpu_min_elements=max(threshold, 0),
                      on_gpu_fallback=metrics.GPU_FALLBACKS.inc)


def _load_gpu(config: Config):
    try:
        from .backends import cupy_backend
    except ImportError as e:
        return None, f"CuPy is not installed ({e.name})"
    return cupy_backend.load(allow_nonfinite=config.allow_nonfinite)


def _calibration_job(size: int):
    rng = np.random.default_rng(0)
    logit = rng.normal(0, 3, size).astype(np.float32)
    label = (rng.random(size) < 0.1).astype(np.float32)
    return parse(build_request(logit, label, reduction="sum", compute_grad=True))


def warm_up(backends: BackendSet) -> None:
    """One tiny batch through parse, every backend and encode before the health check says SERVING
    (not counted in the metrics: it is not traffic)."""
    request = build_request(np.array([[0.5, -1.0]], np.float32), np.array([[1.0, 0.0]], np.float32),
                            compute_grad=True)
    for backend in filter(None, (backends.cpu, backends.gpu)):
        result = backend.run(parse(request))
        encode(result.loss), encode(result.grad)


def server_credentials(config: Config) -> grpc.ServerCredentials | None:
    """TLS when a certificate is given; mutual TLS (client certificates required) with --tls-client-ca. The
    files are read again when they change (certificate rotation), for the connections opened after."""
    if not config.tls_cert:
        return None
    return tls.CertificateFiles(config.tls_cert, config.tls_key, config.tls_client_ca).credentials()


def _bind_error(host: str, port: int, reuse_port: bool, *, only_in_use: bool = False) -> str | None:
    """Why gRPC cannot bind `host:port`, in the operating system's words, found by binding its addresses as
    gRPC does (SO_REUSEADDR, SO_REUSEPORT with --reuse-port; the IPv4 wildcard where IPv6 is off); None when
    one of them binds, which is all gRPC needs. Before gRPC tries (whose own error is a traceback-sized
    "Failed to bind"), `only_in_use` leaves every other cause to gRPC."""
    name = host.strip("[]")
    try:
        addresses = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        if name in ("", "::"):
            addresses += socket.getaddrinfo("0.0.0.0", port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        return None if only_in_use else f"cannot resolve {host!r} ({e.strerror or e})"
    errors = []
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                s.bind(address)
            return None
        except OSError as e:
            errors.append(e)
    if any(e.errno == errno.EADDRINUSE for e in errors):
        return "address already in use (another server has this port; --reuse-port shares it on purpose)"
    if only_in_use or not errors:
        return None
    return errors[0].strerror or str(errors[0])


def start_metrics(config: Config, backends: BackendSet) -> None:
    metrics.BUILD_INFO.labels(__version__, backends.default_name, "; ".join(backends.devices())).set(1)
    metrics.MAX_CONCURRENT_RPCS.set(max(config.max_concurrent_rpcs, 0))
    if backends.gpu is not None:
        metrics.GPU_MEMORY.labels("used").set_function(lambda: backends.gpu.memory()[0])
        metrics.GPU_MEMORY.labels("total").set_function(lambda: backends.gpu.memory()[1])
    if config.metrics_port >= 0:
        try:
            prometheus_client.start_http_server(config.metrics_port, addr=config.metrics_host)
        except OSError as e:
            raise ValueError(f"cannot serve metrics on {config.metrics_host}:{config.metrics_port}: "
                             f"{e.strerror or e}") from None


async def serve(config: Config, ready: asyncio.Event | None = None) -> int:
    backends = build_backends(config)
    executor = ThreadPoolExecutor(config.workers, thread_name_prefix="focal-request")
    max_bytes = config.max_message_bytes
    options = [("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", max_bytes),
               # gRPC sets SO_REUSEPORT by default: a second server on a taken port would then share it
               # silently; fail to bind instead, unless several processes are meant to share it
               ("grpc.so_reuseport", 1 if config.reuse_port else 0),
               # A fixed 4 MiB read-ahead per stream instead of BDP-grown windows: a stream's unread bytes
               # (a refused body, the next item of a stream) stay within it, so memory has a bound; a message
               # being read still gets the window it needs (README "Memory")
               ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", STREAM_LOOKAHEAD_BYTES)]
    if config.max_connection_age_s > 0:
        # clients re-resolve on reconnect, so new replicas get traffic; in-flight calls get a grace period
        options += [("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(config.grace_seconds * 1000))]
    if config.max_concurrent_rpcs > 0:
        # per connection: one peer cannot open more streams than the whole server would admit, plus a few
        # for health Watch, reflection and refusals (a refused stream's unread body waits in flow control)
        options.append(("grpc.max_concurrent_streams", config.max_concurrent_rpcs + STREAM_HEADROOM))
    interceptors = [MetricsInterceptor()]
    if config.tls_client_allow:
        interceptors.append(tls.ClientIdentityInterceptor(config.tls_client_allow))
    if tracing.setup():
        interceptors[:0] = tracing.server_interceptors()
    if config.auth_token:
        interceptors.append(AuthInterceptor(config.auth_token))
    gate = CallGate(config.max_concurrent_rpcs, SERVICE_NAME)
    interceptors.append(gate)
    server = grpc.aio.server(interceptors=interceptors, options=options)
    servicer = FocalLossServicer(backends, executor, Limits(max_elements=config.max_elements), max_bytes,
                                 stream_window=2 * config.workers)
    add_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable(server, (SERVICE_NAME, health.SERVICE_NAME))
    for name in ("", SERVICE_NAME):  # until warmed up: probes see the port open but not ready
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    address = f"{config.host}:{config.port}"
    credentials = server_credentials(config)
    why_not = _bind_error(config.host, config.port, config.reuse_port, only_in_use=True)
    if why_not is not None:
        raise ValueError(f"cannot listen on {address}: {why_not}")
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # e.g. not an address of this machine, or taken since the check
        port = 0
    if port == 0:
        why_not = _bind_error(config.host, config.port, config.reuse_port) or "gRPC could not bind it"
        raise ValueError(f"cannot listen on {address}: {why_not}")
    if config.auth_token and credentials is None:
        log.warning("the bearer token is sent in clear text over plaintext gRPC: serve TLS (--tls-cert, --tls-key) "
                    "unless a proxy or service mesh in front of this server terminates TLS",
                    extra={"fields": {"event": "token_without_tls"}})
    start_metrics(config, backends)
    await server.start()
    await asyncio.get_running_loop().run_in_executor(executor, warm_up, backends)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics.SERVING.set(1)
    transport = "mtls" if config.tls_client_ca else "tls" if credentials else "plaintext"
    auth = "token" if config.auth_token else "none"
    log.info("focalserve %s serving: backend=%s devices=%s cpu_kernel=%s grpc=%s:%d (%s) metrics=%s workers=%d "
             "max_message_mb=%d auth=%s", __version__, backends.default_name, "; ".join(backends.devices()),
             "compiled" if backends.cpu.kernel is not None else "ufunc", config.host, port, transport,
             f"{config.metrics_host}:{config.metrics_port}" if config.metrics_port >= 0 else "off",
             config.workers, config.max_message_mb, auth,
             extra={"fields": {"event": "serving", "version": __version__, "backend": backends.default_name,
                               "port": port, "metrics_port": config.metrics_port, "tls": transport, "auth": auth,
                               "workers": config.workers}})

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    if ready is not None:
        ready.set()
    await stopping.wait()

    started = time.monotonic()
    log.info("drain: health NOT_SERVING, refusing new calls after %.1fs, up to %.1fs for calls in flight",
             config.drain_delay_s, config.grace_seconds,
             extra={"fields": {"event": "drain_start", "drain_delay_s": config.drain_delay_s,
                               "grace_seconds": config.grace_seconds}})
    await health_servicer.enter_graceful_shutdown()
    metrics.SERVING.set(0)
    if config.drain_delay_s > 0:
        await asyncio.sleep(config.drain_delay_s)  # still serving: balancers see NOT_SERVING and move away
    gate.draining = True  # calls whose headers arrive from here on: UNAVAILABLE (DRAINING)
    # The one stop: gRPC refuses new calls from here on, and cancels what is left when the grace period runs
    # out. (A second stop racing this one at that instant crashed the process in gRPC's core.)
    stopped = asyncio.ensure_future(server.stop(config.grace_seconds))
    try:  # calls are counted from their headers: an upload still arriving is waited for too
        await asyncio.wait_for(gate.wait_idle(), config.grace_seconds)
        cut = 0
    except asyncio.TimeoutError:
        cut = gate.active
    seconds = round(time.monotonic() - started, 3)
    # health Watch streams never end by themselves: end them now rather than wait out the grace period
    gate.release_watches()
    await stopped
    if cut:
        log.warning("drain: grace period of %.1fs ran out after %.2fs: %d calls still in flight were cancelled",
                    config.grace_seconds, seconds, cut,
                    extra={"fields": {"event": "drain_calls_done", "seconds": seconds, "cancelled_calls": cut}})
    else:
        log.info("drain: calls finished after %.2fs", seconds,
                 extra={"fields": {"event": "drain_calls_done", "seconds": seconds, "cancelled_calls": 0}})
    executor.shutdown(wait=True)
    tracing.shutdown()
    log.info("drain: stopped", extra={"fields": {"event": "drain_done"}})
    return 0


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    configure_logging(config.log_format)
    try:
        return asyncio.run(serve(config))
    except ValueError as e:  # a configuration the machine cannot honour, e.g. --backend gpu without a GPU
        log.error("%s", e, extra={"fields": {"event": "startup_failed"}})
        return 2
