"""The service end to end over loopback, next to the transport floor, measured side by side in one run.

    make bench-service        # or: .venv/bin/python benchmarks/service.py [--quick] [--write BENCHMARKS.md]

Both servers run as separate processes with the tuned allocator; one Python client sends pre-serialized
requests and receives raw bytes from each (identity serializers), so both pay the same client costs.
The floor (benchmarks/echo_server.py) receives the same request bytes and answers with as many bytes as
focalserve's answer has. Work: float32 logits, uint8 binary labels, SUM with gradient (5 B in, 4 B out
per element), unless said otherwise.

1. large batches (4M, 16M elements): elements/s, median of the rounds' calls;
2. small batches (1K, 64K): p50 / p99 latency over many calls;
3. a ComputeStream of 64 batches of 256K against 64 sequential Compute calls, and the same for the floor
   (its own stream / sequential gain is what the transport allows);
4. 1, 4 and 16 concurrent clients sending 1M-element batches: throughput, p99, and the CPU the server
   processes and this client process used (in cores: CPU seconds / wall seconds); also focalserve as
   2 processes sharing the port (--reuse-port), against 2 echo processes.

Every measurement runs in rounds (--rounds, default 5), focalserve and the floor back to back in each
round; a ratio is the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from focalloss.v1 import focal_loss_pb2 as pb
from focalserve_client.client import build_request
from report import emit, machine_line, size_label, table

HERE = Path(__file__).resolve().parent
LIMIT = 256 * 1024 * 1024
OPTIONS = [("grpc.max_send_message_length", LIMIT), ("grpc.max_receive_message_length", LIMIT)]
ENV = {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736", "MALLOC_ARENA_MAX": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


class Servers:
    """focalserve and the echo floor, each as 1 (or N, sharing the port) processes."""

    def __init__(self, processes: int = 1):
        self.procs = []
        self.kinds: dict[str, list[subprocess.Popen]] = {"focalserve": [], "floor": []}
        self.focal_port, self.echo_port = free_port(), free_port()
        extra = ["--reuse-port"] if processes > 1 else []
        for _ in range(processes):
            self.kinds["focalserve"].append(subprocess.Popen(
                [sys.executable, "-m", "focalserve", "--host", "127.0.0.1", "--port", str(self.focal_port),
                 "--metrics-port", "-1", "--backend", "cpu", "--max-concurrent-rpcs", "0", *extra],
                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            self.kinds["floor"].append(subprocess.Popen(
                [sys.executable, str(HERE / "echo_server.py"), str(self.echo_port), *extra],
                env=ENV, stdout=subprocess.DEVNULL))
        self.procs = self.kinds["focalserve"] + self.kinds["floor"]
        wait_port(self.focal_port)
        wait_port(self.echo_port)
        time.sleep(2.0)  # focalserve warms up after binding

    def cpu_seconds(self, kind: str) -> float:
        """User + system CPU time so far of the server processes of `kind` (all their threads)."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for p in self.kinds[kind]:
            with open(f"/proc/{p.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        return total

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(60)


class Workload:
    """One request's bytes for focalserve, and the matching echo request (same size in, same size out)."""

    def __init__(self, n: int, reduction: str = "sum"):
        rng = np.random.default_rng(n)
        logit = rng.normal(0, 3, n).astype(np.float32)
        label = (rng.random(n) < 0.1).astype(np.uint8)
        self.n = n
        self.focal = build_request(logit, label, reduction=reduction, compute_grad=True).SerializeToString()
        answer = 4 * n + (4 * n if reduction == "none" else 0) + 64
        self.echo = answer.to_bytes(8, "little") + bytes(len(self.focal) - 8)


class Target:
    def __init__(self, port: int, unary: str, stream: str):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", OPTIONS)
        self.unary = self.channel.unary_unary(unary, request_serializer=None, response_deserializer=None)
        self.stream = self.channel.stream_stream(stream, request_serializer=None, response_deserializer=None)

    def close(self):
        self.channel.close()


def targets(servers: Servers) -> dict[str, Target]:
    return {"focalserve": Target(servers.focal_port, "/focalloss.v1.FocalLossService/Compute",
                                 "/focalloss.v1.FocalLossService/ComputeStream"),
            "floor": Target(servers.echo_port, "/bench.Echo/Unary", "/bench.Echo/Stream")}


def payload(name: str, work: Workload) -> bytes:
    return work.focal if name == "focalserve" else work.echo


def timed_calls(call, request: bytes, count: int, warm: bool = True) -> list[float]:
    if warm:
        call(request, timeout=120)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        call(request, timeout=120)
        times.append(time.perf_counter() - started)
    return times


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def median_ratio(pairs: list[tuple[float, float]]) -> float:
    """The median over rounds of a / b, for each round's pair (a, b) measured back to back."""
    return statistics.median(a / b for a, b in pairs)


# On a shared VM the machine's speed drifts by 2x within minutes (the floor's own stream rate ranged from
# 114 to 239 M/s between runs): every measurement runs in `rounds`, focalserve and the floor back to back
# in each, and a ratio is the median of the rounds' ratios, so drift hits both sides alike.

def bench_large(ts, sizes, rounds, rows):
    for n in sizes:
        work = Workload(n)
        seconds = {name: [] for name in ts}
        for name, t in ts.items():
            t.unary(payload(name, work), timeout=120)  # warm
        for _ in range(rounds):
            for name, t in ts.items():
                seconds[name] += timed_calls(t.unary, payload(name, work), 1, warm=False)
        rate = {name: n / statistics.median(v) / 1e6 for name, v in seconds.items()}
        # elements/s of focalserve / of the floor = the floor's seconds / focalserve's
        ratio = median_ratio(list(zip(seconds["floor"], seconds["focalserve"])))
        rows.append((f"unary {size_label(n)} elements, SUM+grad", f"{rate['focalserve']:,.0f} M/s",
                     f"{rate['floor']:,.0f} M/s", f"{ratio:.2f} (target >= 0.75)"))


def bench_small(ts, sizes, count, rounds, rows):
    for n in sizes:
        work = Workload(n)
        lat = {name: [] for name in ts}
        p50_pairs = []
        for _ in range(rounds):
            this_round = {name: timed_calls(t.unary, payload(name, work), count // rounds) for name, t in ts.items()}
            for name, v in this_round.items():
                lat[name] += v
            p50_pairs.append(tuple(percentile(this_round[name], 50) for name in ("focalserve", "floor")))
        p50 = {k: percentile(v, 50) * 1e3 for k, v in lat.items()}
        p99 = {k: percentile(v, 99) * 1e3 for k, v in lat.items()}
        rows.append((f"unary {size_label(n)} elements, p50 / p99", f"{p50['focalserve']:.2f} / {p99['focalserve']:.2f} ms",
                     f"{p50['floor']:.2f} / {p99['floor']:.2f} ms",
                     f"p50 {median_ratio(p50_pairs):.2f} (target <= 1.2)"))


def bench_stream(ts, items, n, rounds, rows):
    """One ComputeStream of `items` batches against as many sequential calls, for both servers."""
    work = Workload(n)
    rates = {(name, kind): [] for name in ts for kind in ("stream", "sequential")}
    for name, t in ts.items():
        list(t.stream(iter([payload(name, work)] * 4), timeout=120))  # warm
    for _ in range(rounds):
        for name, t in ts.items():
            request = payload(name, work)
            started = time.perf_counter()
            list(t.stream(iter([request] * items), timeout=300))
            rates[name, "stream"].append(items * n / (time.perf_counter() - started) / 1e6)
            started = time.perf_counter()
            for _ in range(items):
                t.unary(request, timeout=120)
            rates[name, "sequential"].append(items * n / (time.perf_counter() - started) / 1e6)
    rate = {key: statistics.median(v) for key, v in rates.items()}
    of_floor = median_ratio(list(zip(rates["focalserve", "stream"], rates["floor", "stream"])))
    gain = {name: median_ratio(list(zip(rates[name, "stream"], rates[name, "sequential"]))) for name in ts}
    rows.append((f"ComputeStream {items} x {size_label(n)}", f"{rate['focalserve', 'stream']:,.0f} M/s",
                 f"{rate['floor', 'stream']:,.0f} M/s", f"{of_floor:.2f} of the floor (target >= 0.9)"))
    rows.append((f"{items} sequential Compute x {size_label(n)}", f"{rate['focalserve', 'sequential']:,.0f} M/s",
                 f"{rate['floor', 'sequential']:,.0f} M/s",
                 f"stream / sequential {gain['focalserve']:.2f} (target >= 1.5; the floor's own: {gain['floor']:.2f})"))


def load(port: int, method: str, request: bytes, clients: int, seconds: float) -> tuple[list[float], float]:
    """`clients` threads, each on its own channel, calling back to back for `seconds`: (latencies, elapsed)."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client():
        with grpc.insecure_channel(f"127.0.0.1:{port}", OPTIONS) as channel:
            call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            call(request, timeout=120)
            mine = []
            while time.monotonic() < stop:
                started = time.perf_counter()
                call(request, timeout=120)
                mine.append(time.perf_counter() - started)
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.monotonic() - started


def bench_concurrency(servers_factory, clients_list, n, seconds, rounds, rows, label=""):
    servers = servers_factory()
    endpoints = {"focalserve": (servers.focal_port, "/focalloss.v1.FocalLossService/Compute"),
                 "floor": (servers.echo_port, "/bench.Echo/Unary")}
    try:
        work = Workload(n)
        for clients in clients_list:
            latencies = {name: [] for name in endpoints}
            totals = {name: [0.0, 0.0, 0.0, 0] for name in endpoints}  # wall, server CPU, client CPU, calls
            rates = {name: [] for name in endpoints}
            for _ in range(rounds):
                for name, (port, method) in endpoints.items():
                    cpu_before, client_before = servers.cpu_seconds(name), sum(os.times()[:2])
                    done, elapsed = load(port, method, payload(name, work), clients, seconds / rounds)
                    total = totals[name]
                    total[0] += elapsed
                    total[1] += servers.cpu_seconds(name) - cpu_before
                    total[2] += sum(os.times()[:2]) - client_before
                    total[3] += len(done)
                    latencies[name] += done
                    rates[name].append(len(done) * n / elapsed / 1e6)
            figures = {name: (statistics.median(rates[name]), percentile(latencies[name], 99) * 1e3,
                              totals[name][1] / totals[name][0], totals[name][2] / totals[name][0])
                       for name in endpoints}
            ratio = median_ratio(list(zip(rates["focalserve"], rates["floor"])))
            f, e = figures["focalserve"], figures["floor"]
            rows.append((f"{clients} concurrent clients x {size_label(n)}{label}",
                         f"{f[0]:,.0f} M/s, p99 {f[1]:.0f} ms, server {f[2]:.2f} / client {f[3]:.2f} cores",
                         f"{e[0]:,.0f} M/s, p99 {e[1]:.0f} ms, server {e[2]:.2f} / client {e[3]:.2f} cores",
                         f"{ratio:.2f}" + (" (target >= 0.9 at 4)" if clients == 4 else "")))
    finally:
        servers.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, shorter concurrency runs")
    ap.add_argument("--write", help="append the table to this Markdown file")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per measurement, both servers in each")
    ap.add_argument("--smoke", action="store_true",
                    help="every size / 64, one round, 1 s of load: checks that the script runs (the suite does); "
                         "its figures mean nothing")
    args = ap.parse_args()
    rounds = 1 if args.smoke else 2 if args.quick else max(1, args.rounds)
    count, seconds = (20, 1.0) if args.smoke else (100, 3.0) if args.quick else (1000, 12.0)
    scale = 64 if args.smoke else 1

    rows: list[tuple[str, str, str, str]] = []
    servers = Servers()
    ts = targets(servers)
    try:
        bench_large(ts, [(4 << 20) // scale, (16 << 20) // scale], rounds, rows)
        bench_small(ts, [1 << 10, 64 << 10], count, rounds, rows)
        bench_stream(ts, 64 // (8 if args.smoke else 1), (256 << 10) // scale, rounds, rows)
    finally:
        for t in ts.values():
            t.close()
        servers.close()
    bench_concurrency(Servers, [1, 4, 16], (1 << 20) // scale, seconds, rounds, rows)
    bench_concurrency(lambda: Servers(processes=2), [4, 16], (1 << 20) // scale, seconds, rounds, rows,
                      label=", 2 processes")

    title = (f"{machine_line('Service over loopback')}: "
             f"`benchmarks/service.py{' --quick' if args.quick else ' --smoke' if args.smoke else ''}`, {rounds} rounds; "
             "ratios: median over the rounds of focalserve / floor measured back to back")
    emit(table(title, ["measurement", "focalserve", "transport floor", "ratio"], rows), args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
