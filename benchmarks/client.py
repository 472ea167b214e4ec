"""The public client API against the transport floor, measured side by side in one run.

    make bench-client         # or: .venv/bin/python benchmarks/client.py [--rounds N] [--split-bytes 1G] [--write BENCHMARKS.md]

What a user holds: float32 logits and float32 0/1 labels, as a framework hands them over. What the floor
(benchmarks/echo_server.py, a bare grpc.aio server) carries: the bytes of that plain float32 request (8 B in
per element) and as many bytes back as the answer (4 B per element with a gradient), sent pre-serialized
with identity serializers: moving the bytes and nothing else. The user's side is `FocalLossClient`
itself (encoding, label narrowing, decoding included), against `make serve`'s server (benchmarks/service.py's
`Servers`: focalserve and the floor as separate processes with the tuned allocator).

Rows: `compute` of 4M elements with and without gradient; 1K elements p50; `stream()` of 64 batches of
256K against the floor's 64 sequential calls; a batch over the message limit through the split path
(default 1 GiB of float32 request: throughput as a ratio to the floor's sequential calls of the same
bytes, and the client's peak memory beyond the caller's arrays and the result, from /proc VmHWM in a
subprocess); one 256 MiB call's peak memory; the CLI; the Node.js client (benchmarks/node_client.js, when
it exists). Every measurement runs in rounds, client and floor back to back in each; a ratio is the
median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from focalserve_client import FocalLossClient
from report import emit, machine_line, parse_size, size_label, table
from service import ENV, Servers, median_ratio, percentile, targets

HERE = Path(__file__).resolve().parent
PLAIN_OVERHEAD = 64  # a plain float32 request's fields around its two payloads, about


def user_batch(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 3, n).astype(np.float32), (rng.random(n) < 0.1).astype(np.float32)


def echo_request(n: int, answer: int) -> bytes:
    """The floor's request: as many bytes as the plain float32 request of n elements; asks for `answer` back."""
    return answer.to_bytes(8, "little") + bytes(8 * n + PLAIN_OVERHEAD - 8)


def answer_bytes(n: int, grad: bool) -> int:
    return 4 * n + 64 if grad else 64


def bench_compute(client, floor, n, grad, rounds, rows, target):
    logit, label = user_batch(n)
    request = echo_request(n, answer_bytes(n, grad))
    client.compute(logit, label, compute_grad=grad)  # warm
    floor(request, timeout=300)
    pairs = []
    for _ in range(rounds):
        started = time.perf_counter()
        client.compute(logit, label, compute_grad=grad)
        mine = time.perf_counter() - started
        started = time.perf_counter()
        floor(request, timeout=300)
        pairs.append((mine, time.perf_counter() - started))
    rate = n / statistics.median(p[0] for p in pairs) / 1e6
    floor_rate = n / statistics.median(p[1] for p in pairs) / 1e6
    ratio = median_ratio([(b, a) for a, b in pairs])
    rows.append((f"compute {size_label(n)} elements, {'with' if grad else 'without'} gradient",
                 f"{rate:,.0f} M el/s", f"{floor_rate:,.0f} M el/s", f"{ratio:.2f} (target {target})"))


def bench_small(client, floor, n, count, rounds, rows):
    logit, label = user_batch(n)
    request = echo_request(n, answer_bytes(n, True))
    mine_all, floor_all, pairs = [], [], []
    for _ in range(rounds):
        mine, theirs = [], []
        for _ in range(count // rounds):
            started = time.perf_counter()
            client.compute(logit, label, compute_grad=True)
            mine.append(time.perf_counter() - started)
            started = time.perf_counter()
            floor(request, timeout=60)
            theirs.append(time.perf_counter() - started)
        mine_all += mine
        floor_all += theirs
        pairs.append((percentile(mine, 50), percentile(theirs, 50)))
    rows.append((f"compute {size_label(n)} elements with gradient, p50", f"{percentile(mine_all, 50) * 1e3:.2f} ms",
                 f"{percentile(floor_all, 50) * 1e3:.2f} ms", f"{median_ratio(pairs):.2f}x (target <= 1.5x)"))


def bench_stream(client, floor, items, n, rounds, rows):
    batches = [user_batch(n, seed) for seed in range(4)]
    request = echo_request(n, answer_bytes(n, True))
    pairs = []
    list(client.stream([dict(logit=lg, label=lb, compute_grad=True) for lg, lb in batches]))  # warm
    for _ in range(rounds):
        started = time.perf_counter()
        for _item in client.stream(dict(logit=batches[i % 4][0], label=batches[i % 4][1], compute_grad=True)
                                   for i in range(items)):
            pass
        mine = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(items):
            floor(request, timeout=120)
        pairs.append((mine, time.perf_counter() - started))
    total = items * n
    rows.append((f"stream() {items} x {size_label(n)}, with gradient",
                 f"{total / statistics.median(p[0] for p in pairs) / 1e6:,.0f} M el/s",
                 f"{total / statistics.median(p[1] for p in pairs) / 1e6:,.0f} M el/s ({items} sequential calls)",
                 f"{median_ratio([(b, a) for a, b in pairs]):.2f} (target >= 0.75)"))


def probe(args) -> int:
    """Subprocess: one compute() of n elements (float32 logits and 0/1 labels) with gradient; prints JSON with
    the peak resident memory beyond the caller's arrays (VmHWM - VmRSS before the call) and the seconds."""
    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    n = args.probe
    with FocalLossClient(args.target, max_message_bytes=args.max_message_bytes, max_attempts=args.attempts,
                         timeout=600) as client:
        client.message_limit()
        logit = np.empty(n, np.float32)
        rng = np.random.default_rng(0)
        for start in range(0, n, 1 << 20):  # no temporary as large as the batch
            logit[start:start + (1 << 20)] = rng.normal(0, 3, min(1 << 20, n - start))
        label = np.zeros(n, np.float32)
        label[::10] = 1.0
        # VmHWM can only be reset through /proc/self/clear_refs: write 5 (Linux >= 4.0), then take the baseline
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        before = status("VmRSS")
        started = time.perf_counter()
        result = client.compute(logit, label, compute_grad=True)
        seconds = time.perf_counter() - started
        peak = status("VmHWM")
        result_bytes = result.grad.nbytes
    print(json.dumps({"elements": n, "seconds": seconds, "extra_peak_bytes": peak - before - result_bytes,
                      "result_bytes": result_bytes, "caller_bytes": logit.nbytes + label.nbytes,
                      "backend": result.backend}))
    return 0


def run_probe(target: str, n: int, max_message_bytes: int, attempts: int = 5) -> dict:
    # glibc's default allocator, as a training job has it: freed buffers leave the resident set, so VmHWM
    # counts what the call itself held (the server's tuned settings would keep earlier frees resident)
    env = {k: v for k, v in os.environ.items() if k not in ENV or not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, __file__, "--probe", str(n), "--target", target,
                           "--max-message-bytes", str(max_message_bytes), "--attempts", str(attempts)],
                          capture_output=True, text=True, timeout=1800, env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_split(target, floor, split_bytes, max_message_bytes, rounds, rows):
    """A batch of `split_bytes` of plain float32 request through the split path, in a subprocess (peak
    memory), against the floor's sequential calls of the same bytes in chunks of the client's chunk size."""
    from focalserve_client.client import SPLIT_CHUNK_BYTES
    n = split_bytes // 8
    chunk = min(SPLIT_CHUNK_BYTES, max_message_bytes) // 8
    request = echo_request(chunk, answer_bytes(chunk, True))
    pairs, probes = [], []
    for _ in range(rounds):
        result = run_probe(target, n, max_message_bytes)
        probes.append(result)
        started = time.perf_counter()
        for _ in range(-(-n // chunk)):
            floor(request, timeout=300)
        pairs.append((result["seconds"], time.perf_counter() - started))
    peak = max(p["extra_peak_bytes"] for p in probes)
    rows.append((f"split path, {size_label(split_bytes)}B batch ({n:,} elements), with gradient",
                 f"{n / statistics.median(p[0] for p in pairs) / 1e6:,.0f} M el/s; client peak beyond arrays "
                 f"and result {peak / 2**20:,.0f} MiB",
                 f"{n / statistics.median(p[1] for p in pairs) / 1e6:,.0f} M el/s ({size_label(chunk * 8)}B calls)",
                 f"{median_ratio([(b, a) for a, b in pairs]):.2f}"))


def bench_one_call_memory(target, message_bytes, rows):
    """One call of about `message_bytes` on the wire (uint8 labels: 5 B per element), retries on and off."""
    n = (message_bytes - 4096) // 5
    cells = []
    for attempts in (5, 1):
        p = run_probe(target, n, 256 << 20, attempts)
        cells.append(f"{p['extra_peak_bytes'] / 2**20:,.0f} MiB ({p['extra_peak_bytes'] / (5 * n):.2f} x the message)"
                     f" with max_attempts={attempts}")
    rows.append((f"one {size_label(message_bytes)}B call ({n:,} elements), client peak beyond arrays and result",
                 cells[0], cells[1], "-"))


def bench_cli(target, floor, n, rounds, rows):
    logit, label = user_batch(n)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/logit.npy", logit)
        np.save(f"{tmp}/label.npy", label)
        command = [sys.executable, "-m", "focalserve_client", "--target", target, "compute", "--logit",
                   f"{tmp}/logit.npy", "--label", f"{tmp}/label.npy", "--grad-out", f"{tmp}/grad.npy"]
        request = echo_request(n, answer_bytes(n, True))
        pairs = []
        for _ in range(rounds):
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, timeout=300)
            mine = time.perf_counter() - started
            started = time.perf_counter()
            floor(request, timeout=300)
            pairs.append((mine, time.perf_counter() - started))
    rows.append((f"CLI compute {size_label(n)} elements, --grad-out (process start, .npy in and out)",
                 f"{statistics.median(p[0] for p in pairs) * 1e3:,.0f} ms",
                 f"{statistics.median(p[1] for p in pairs) * 1e3:,.0f} ms (one call)",
                 f"{median_ratio([(b, a) for a, b in pairs]):.2f}"))


def bench_node(target, floor, n, rounds, rows):
    script = HERE / "node_client.js"
    if not script.exists():
        print(f"Node.js row skipped: {script.relative_to(HERE.parent)} does not exist", file=sys.stderr)
        rows.append(("Node.js compute, with gradient", "skipped: benchmarks/node_client.js does not exist", "-", "-"))
        return
    if not shutil.which("node"):
        print("Node.js row skipped: no `node` on PATH", file=sys.stderr)
        rows.append(("Node.js compute, with gradient", "skipped: no node on PATH", "-", "-"))
        return
    done = subprocess.run(["node", str(script), "--target", target, "--elements", str(n), "--repeat", str(rounds)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        rows.append(("Node.js compute, with gradient", f"failed: {done.stderr.strip()[-200:]}", "-", "-"))
        return
    figures = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    request = echo_request(n, answer_bytes(n, True))
    floor(request, timeout=300)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        floor(request, timeout=300)
        times.append(time.perf_counter() - started)
    floor_rate = n / statistics.median(times)
    rows.append((f"Node.js compute {size_label(n)} elements, with gradient",
                 f"{figures['elements_per_s'] / 1e6:,.0f} M el/s", f"{floor_rate / 1e6:,.0f} M el/s",
                 f"{figures['elements_per_s'] / floor_rate:.2f}"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="rounds per measurement, client and floor in each")
    ap.add_argument("--split-bytes", default="1G", help="plain float32 request bytes of the split-path batch")
    ap.add_argument("--write", help="append the table to this Markdown file")
    ap.add_argument("--smoke", action="store_true",
                    help="sizes / 64, one round, a 16 MiB split batch: checks that the script runs (the suite does)")
    ap.add_argument("--probe", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--max-message-bytes", type=int, default=256 << 20, help=argparse.SUPPRESS)
    ap.add_argument("--attempts", type=int, default=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe is not None:
        return probe(args)
    rounds = 1 if args.smoke else max(1, args.rounds)
    scale = 64 if args.smoke else 1
    split_bytes = 16 << 20 if args.smoke else parse_size(args.split_bytes)
    # the split batch must be over the message limit: the smoke run lowers the client's own
    split_limit = min(256 << 20, split_bytes // 4)

    rows: list[tuple[str, str, str, str]] = []
    servers = Servers()
    floor = targets(servers)["floor"]
    target = f"127.0.0.1:{servers.focal_port}"
    try:
        with FocalLossClient(target, timeout=600) as client:
            bench_compute(client, floor.unary, (4 << 20) // scale, True, rounds, rows, ">= 0.8")
            bench_compute(client, floor.unary, (4 << 20) // scale, False, rounds, rows, ">= 1.0")
            bench_small(client, floor.unary, 1 << 10, 20 if args.smoke else 1000, rounds, rows)
            bench_stream(client, floor.unary, 64 // (8 if args.smoke else 1), (256 << 10) // scale, rounds, rows)
        bench_split(target, floor.unary, split_bytes, split_limit, rounds if args.smoke else min(rounds, 3), rows)
        bench_one_call_memory(target, (4 << 20) if args.smoke else (256 << 20), rows)
        bench_cli(target, floor.unary, (4 << 20) // scale, rounds, rows)
        bench_node(target, floor.unary, (4 << 20) // scale, rounds, rows)
    finally:
        floor.close()
        servers.close()

    title = (f"{machine_line('Client over loopback')}: "
             f"`benchmarks/client.py{' --smoke' if args.smoke else f' --rounds {rounds} --split-bytes {args.split_bytes}'}`;"
             " ratios: median over the rounds of floor time / client time (client time / floor time for p50)")
    emit(table(title, ["measurement", "public client API", "transport floor", "ratio"], rows), args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
