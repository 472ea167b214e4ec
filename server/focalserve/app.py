"""Server assembly: backends, servicer, health, reflection, metrics endpoint, signals. `main()` is `make serve`."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from focalloss.v1 import focal_loss_pb2 as pb
from focalloss.v1 import focal_loss_pb2_grpc as pb_grpc
from focalserve_client.tensor import encode

from . import __version__
from .backends import BackendSet, NumpyBackend
from .config import Config, parse_args
from .request import Limits
from .service import FocalLossServicer

log = logging.getLogger("focalserve")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FocalLossService"].full_name


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
    cpu = NumpyBackend(threads=config.workers, allow_nonfinite=config.allow_nonfinite)
    return BackendSet(cpu, gpu=None, default=config.backend)


def warm_up(servicer: FocalLossServicer) -> None:
    """One tiny batch through the whole path (parse, backend, encode) before the health check says SERVING."""
    logit = np.array([[0.5, -1.0]], np.float32)
    servicer.compute(pb.ComputeRequest(logit=encode(logit), label=encode(np.array([[1.0, 0.0]], np.float32)),
                                       compute_grad=True))


async def serve(config: Config, ready: asyncio.Event | None = None) -> int:
    backends = build_backends(config)
    executor = ThreadPoolExecutor(config.workers, thread_name_prefix="focal-request")
    max_bytes = config.max_message_bytes
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
    ])
    servicer = FocalLossServicer(backends, executor, Limits(max_elements=config.max_elements), max_bytes,
                                 stream_window=2 * config.workers)
    pb_grpc.add_FocalLossServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise SystemExit(f"focalserve: cannot bind {config.host}:{config.port}")
    await server.start()
    await asyncio.get_running_loop().run_in_executor(executor, warm_up, servicer)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("focalserve %s serving: backend=%s devices=%s grpc=%s:%d metrics=%s workers=%d max_message_mb=%d",
             __version__, backends.default_name, "; ".join(backends.devices()), config.host, port,
             f"{config.metrics_host}:{config.metrics_port}" if config.metrics_port >= 0 else "off",
             config.workers, config.max_message_mb)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    if ready is not None:
        ready.set()
    await stopping.wait()

    started = time.monotonic()
    log.info("drain: health NOT_SERVING, refusing new calls, grace %.1fs", config.grace_seconds)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(config.grace_seconds)
    executor.shutdown(wait=True)
    log.info("drain: stopped after %.2fs", time.monotonic() - started)
    return 0


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    configure_logging(config.log_format)
    try:
        return asyncio.run(serve(config))
    except ValueError as e:  # a configuration the machine cannot honour, e.g. --backend gpu without a GPU
        log.error("%s", e)
        return 2
