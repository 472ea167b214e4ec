"""Every Prometheus metric of the service (SPEC §3), defined once; served on --metrics-port at /metrics.

RPC metrics use go-grpc-prometheus's names and labels so that existing dashboards and alerts work; they
are recorded by interceptors.MetricsInterceptor. Domain metrics are recorded by the servicer.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# 100 µs .. 60 s: a tiny batch answers in well under a millisecond, a 64M-element one in seconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BYTES_BUCKETS = tuple(float(1 << k) for k in range(10, 30, 2))  # 1 KiB .. 256 MiB
LOSS_BUCKETS = (1e-6, 1e-5, 1e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)

_RPC = ("grpc_type", "grpc_service", "grpc_method")

GRPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _RPC)
GRPC_HANDLED = Counter("grpc_server_handled_total", "RPCs completed on the server, by status code.",
                       _RPC + ("grpc_code",))
# timed by the interceptor from when the handler starts: for a unary call the request has then been received
# and parsed whole, so the upload is not counted (as in go-grpc-prometheus, which also starts at the handler)
GRPC_HANDLING_SECONDS = Histogram("grpc_server_handling_seconds",
                                  "Time from the start of the handler (for a unary call, once its request is "
                                  "received) to the call's status, in seconds.", _RPC, buckets=LATENCY_BUCKETS)
GRPC_MSG_RECEIVED = Counter("grpc_server_msg_received_total", "Messages received from clients.", _RPC)
GRPC_MSG_SENT = Counter("grpc_server_msg_sent_total", "Messages sent to clients.", _RPC)

ELEMENTS = Counter("focalloss_elements_total", "Logit elements computed.", ("backend", "label_format"))
COMPUTE_SECONDS = Histogram("focalloss_compute_seconds", "Backend time per item (loss and gradient), seconds.",
                            ("backend",), buckets=LATENCY_BUCKETS)
REQUEST_BYTES = Histogram("focalloss_request_bytes", "Size of each ComputeRequest, bytes.", buckets=BYTES_BUCKETS)
INFLIGHT = Gauge("focalloss_inflight_requests", "Items being computed now.")
NONFINITE_INPUTS = Counter("focalloss_nonfinite_inputs_total",
                           "Items whose logits held NaN or infinity (refused, or passed with --allow-nonfinite).")
ITEM_LOSS = Histogram("focalloss_item_loss", "Each item's mean element loss (before normalizer): data quality.",
                      buckets=LOSS_BUCKETS)
GPU_MEMORY = Gauge("focalloss_gpu_memory_bytes", "GPU memory of the device in use.", ("kind",))
BUILD_INFO = Gauge("focalloss_build_info", "Always 1; labels say what is running.", ("version", "backend", "device"))
GPU_FALLBACKS = Counter("focalloss_gpu_fallbacks_total", "Items the GPU had no memory for, computed on the CPU.")
REJECTED = Counter("focalloss_rejected_total", "Calls refused before any work, by reason.", ("reason",))
# For alerts (deploy/prometheus/alerts.yml): readiness as the health service reports it, and the configured
# call limit that saturation is measured against.
SERVING = Gauge("focalloss_serving", "1 while the health service says SERVING; 0 while warming up or draining.")
MAX_CONCURRENT_RPCS = Gauge("focalloss_max_concurrent_rpcs",
                            "The --max-concurrent-rpcs limit on FocalLossService calls (0: no limit).")
