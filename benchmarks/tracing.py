"""What tracing costs per call: focalserve with tracing off, on (every call sampled, spans exported over
OTLP/gRPC to a receiver in this process), and on with the sampler dropping every trace; measured side by
side in one run, in rounds, the servers taking turns within each round.

    .venv/bin/python benchmarks/tracing.py [--rounds 5] [--smoke]

Also the client's side: calls through the trace-propagating interceptor (focalserve_client.tracing) inside
an active span, against plain calls. Work: float32 logits, float32 labels, SUM with gradient; 1K elements
(computed on the event loop) and 256K (on a pool thread). A figure is the median over rounds of each
round's median call latency; an overhead is the median of the rounds' differences.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from focalloss.v1 import focal_loss_pb2_grpc as pb_grpc
from focalserve_client import tracing as client_tracing
from focalserve_client.client import build_request

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736", "MALLOC_ARENA_MAX": "1"}
for _name in [k for k in ENV if k.startswith("OTEL_")]:
    del ENV[_name]


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.spans = 0
        self._lock = threading.Lock()

    def Export(self, request, context):
        with self._lock:
            self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(env: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "focalserve", "--host", "127.0.0.1", "--port", str(port),
                                "--metrics-port", "-1", "--backend", "cpu", "--workers", "2"],
                               env={**ENV, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
    return process, target


def latencies(call, request, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        call(request, timeout=30)
        out.append(time.perf_counter() - t0)
    return out


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="one round of few calls: that it runs, not figures")
    args = parser.parse_args()
    rounds = 1 if args.smoke else args.rounds
    calls = {1024: 20 if args.smoke else 1000, 256 * 1024: 5 if args.smoke else 100}

    sink = Sink()
    receiver = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, receiver)
    otlp_port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    otlp = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    servers = {"off": start({}), "on": start(otlp), "unsampled": start({**otlp, "OTEL_TRACES_SAMPLER": "always_off"})}
    channels = {name: grpc.insecure_channel(target) for name, (_, target) in servers.items()}
    stubs = {name: pb_grpc.FocalLossServiceStub(channel) for name, channel in channels.items()}
    propagating = pb_grpc.FocalLossServiceStub(client_tracing.intercept(channels["off"]))
    tracer = TracerProvider().get_tracer("benchmark")
    rng = np.random.default_rng(0)
    requests = {n: build_request(rng.normal(0, 2, n).astype(np.float32), (rng.random(n) < 0.2).astype(np.float32),
                                 compute_grad=True) for n in calls}
    medians: dict[tuple, list[float]] = {}
    try:
        for stub in [*stubs.values(), propagating]:  # warm every connection and code path
            latencies(stub.Compute, requests[1024], 20)
        order = [*stubs, "propagating"]
        for r in range(rounds):
            for n, count in calls.items():
                for name in order[r % len(order):] + order[:r % len(order)]:  # each goes first in turn
                    with tracer.start_as_current_span("caller") if name == "propagating" else contextlib.nullcontext():
                        call = (propagating if name == "propagating" else stubs[name]).Compute
                        medians.setdefault((n, name), []).append(statistics.median(latencies(call, requests[n], count)))
        time.sleep(1.0)  # the batch processor's schedule delay is 5 s by default: let a batch go out
    finally:
        for channel in channels.values():
            channel.close()
        for process, _ in servers.values():
            process.terminate()  # the drain flushes the spans still queued
        for process, _ in servers.values():
            process.wait(60)
        receiver.stop(0)

    def overhead(n: int, name: str, base: str = "off") -> str:
        diffs = [a - b for a, b in zip(medians[(n, name)], medians[(n, base)])]
        ratio = statistics.median(a / b for a, b in zip(medians[(n, name)], medians[(n, base)]))
        return f"{statistics.median(diffs) * 1e6:+,.0f} µs ({(ratio - 1) * 100:+.1f} %)"

    print(f"Tracing overhead, {rounds} round(s), {os.cpu_count()} CPUs, {sink.spans} spans received\n")
    print("| measurement | tracing off | tracing on | overhead per call |")
    print("|---|---|---|---|")
    for n in calls:
        label = f"{n // 1024}K"
        off = us(statistics.median(medians[(n, "off")]))
        print(f"| Compute {label}, p50, every call sampled and exported | {off} | "
              f"{us(statistics.median(medians[(n, 'on')]))} | {overhead(n, 'on')} |")
        print(f"| Compute {label}, p50, sampler always_off | {off} | "
              f"{us(statistics.median(medians[(n, 'unsampled')]))} | {overhead(n, 'unsampled')} |")
        print(f"| Compute {label}, p50, client propagating its span (server off) | {off} | "
              f"{us(statistics.median(medians[(n, 'propagating')]))} | {overhead(n, 'propagating')} |")


if __name__ == "__main__":
    main()
