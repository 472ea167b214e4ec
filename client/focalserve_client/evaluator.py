"""Evaluator: the focal loss of an evaluation loop's batches over one ComputeStream, pipelined.

    evaluator = Evaluator(client, label_format="class_index", alpha=0.25, gamma=2.0)
    for logit, label in loader:
        evaluator.add(logit, label)          # returns at once; the batch is computed in the background
    summary = evaluator.summary(distributed=True)   # totals over every rank
"""

from __future__ import annotations

import math
import queue
import sys
import threading
import time
from collections.abc import Callable

from ._shared import to_numpy
from .client import FocalLossClient, FocalLossError, StreamSummary

# A day: an evaluation may run long, while a call with no deadline would hang on a lost server forever.
DEFAULT_STREAM_TIMEOUT = 24 * 3600.0
_END = object()


class Evaluator:
    """Sends every batch given to `add` over one ComputeStream of `client` and adds up the results.

    compute_options: `FocalLossClient.compute`'s keywords (label_format, alpha, gamma, normalizer, ...) for
    every batch; `add(..., **overrides)` changes them for one batch. compute_grad is never asked for.
    max_in_flight: batches added but not yet answered; `add` waits while that many are, so memory stays
    a few batches however long the loop. progress: True prints a status line to stderr about once a
    second, or a callable `progress(done_batches, added_batches)` called as each result arrives.
    timeout: deadline of the whole stream, in seconds.

    A batch the service refuses does not end the evaluation: its FocalLossError is kept in `errors`
    (with the batch's request_id, its index from 0) and `summary()` counts it in failed_items.
    A batch's arrays are read when it is sent, not when `add` returns: do not write into them until
    `summary()` (a loop that makes new tensors for every batch never does).
    """

    def __init__(self, client: FocalLossClient, *, max_in_flight: int = 4,
                 progress: bool | Callable[[int, int], None] = False, timeout: float = DEFAULT_STREAM_TIMEOUT,
                 **compute_options):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        compute_options.pop("compute_grad", None)
        self.client = client
        self.compute_options = compute_options
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self.errors: list[FocalLossError] = []
        self._progress = progress
        self._slots = threading.Semaphore(max_in_flight)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._added = 0
        self._done = 0
        self._failure: BaseException | None = None
        self._summary: StreamSummary | None = None
        self._closed = False
        self._last_print = 0.0

    # ---- the loop's side ----

    def add(self, logit, label, **overrides) -> None:
        """Queues one batch (NumPy arrays, torch or Paddle tensors) and returns, unless max_in_flight
        batches are still unanswered. Raises the stream's error if the stream itself failed."""
        if self._closed:
            raise RuntimeError("Evaluator.add after summary(): make a new Evaluator")
        self._raise_failure()
        batch = {**self.compute_options, **overrides, "logit": to_numpy(logit), "label": to_numpy(label),
                 "request_id": str(self._added)}
        batch.pop("compute_grad", None)
        while not self._slots.acquire(timeout=0.5):
            self._raise_failure()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="focalserve-evaluator", daemon=True)
            self._thread.start()
        self._added += 1
        self._queue.put(batch)

    def summary(self, distributed: bool = False) -> StreamSummary:
        """Waits for every batch added and returns the StreamSummary of them all; with distributed=True,
        the totals summed over every rank of the initialised torch.distributed or paddle.distributed
        default group (every rank must call it), identical on every rank. Ends the stream."""
        if not self._closed:
            self._closed = True
            if self._thread is not None:
                self._queue.put(_END)
                self._thread.join()
            else:
                self._summary = StreamSummary()
            if self._progress is True:
                self._print_progress(force=True)
                print(file=sys.stderr)
        self._raise_failure()  # again on every call: a failed stream has no summary to give
        if self._summary is None:
            raise FocalLossError(_unknown_code(), "the stream ended without a summary")
        local = self._summary
        return all_reduce_summary(local) if distributed else StreamSummary(**vars(local))

    @property
    def pending(self) -> int:
        """Batches added and not yet answered."""
        return self._added - self._done

    # ---- the background thread ----

    def _requests(self):
        while True:
            batch = self._queue.get()
            if batch is _END:
                return
            yield batch

    def _run(self) -> None:
        try:
            for item in self.client.stream(self._requests(), timeout=self.timeout):
                if isinstance(item, StreamSummary):
                    self._summary = item
                    continue
                if item.error is not None:
                    self.errors.append(item.error)
                self._done += 1
                self._slots.release()
                self._report()
        except BaseException as e:  # noqa: BLE001 - handed to the loop's thread by add() and summary()
            self._failure = e
            # wake an add() waiting for a slot, and gRPC's thread if it still waits for a request
            for _ in range(self.max_in_flight):
                self._slots.release()
            self._queue.put(_END)

    def _report(self) -> None:
        if callable(self._progress):
            self._progress(self._done, self._added)
        elif self._progress:
            self._print_progress()

    def _print_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_print >= 1.0:
            self._last_print = now
            print(f"\rfocalserve: {self._done}/{self._added} batches, {len(self.errors)} refused",
                  end="", file=sys.stderr, flush=True)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure


def _unknown_code():
    import grpc
    return grpc.StatusCode.UNKNOWN


def all_reduce_summary(local: StreamSummary) -> StreamSummary:
    """`local`'s totals summed over the default group of torch.distributed or paddle.distributed, whichever
    this process initialised; normalized_loss recomputed from the sums (SPEC §2)."""
    counts = [local.items, local.failed_items, local.elements]
    sums = [local.positives, local.loss_sum]
    torch_dist = _initialised_torch_distributed()
    if torch_dist is not None:
        import torch
        device = "cpu"
        if torch_dist.get_backend() == "nccl":  # NCCL reduces only tensors on the rank's GPU
            device = f"cuda:{torch.cuda.current_device()}"
        c = torch.tensor(counts, dtype=torch.int64, device=device)
        s = torch.tensor(sums, dtype=torch.float64, device=device)
        torch_dist.all_reduce(c)
        torch_dist.all_reduce(s)
        counts, sums = c.tolist(), s.tolist()
    else:
        paddle_dist = _initialised_paddle_distributed()
        if paddle_dist is None:
            raise RuntimeError("summary(distributed=True) needs an initialised torch.distributed or "
                               "paddle.distributed default group")
        import paddle
        c = paddle.to_tensor(counts, dtype="int64")
        s = paddle.to_tensor(sums, dtype="float64")
        paddle_dist.all_reduce(c)
        paddle_dist.all_reduce(s)
        counts, sums = c.numpy().tolist(), s.numpy().tolist()
    items, failed, elements = (int(v) for v in counts)
    positives, loss_sum = (float(v) for v in sums)
    return StreamSummary(items, failed, elements, positives, loss_sum,
                         loss_sum / max(positives, 1.0) if math.isfinite(positives) else math.nan)


def _initialised_torch_distributed():
    # only a framework the program already imported can have been initialised: never import one here
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def _initialised_paddle_distributed():
    paddle = sys.modules.get("paddle")
    if paddle is None:
        return None
    dist = paddle.distributed
    return dist if dist.is_initialized() else None
