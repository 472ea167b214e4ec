"""One rank of the distributed Evaluator test, started 4 times by torchrun or paddle.distributed.launch.

Rank r evaluates batches r, r+4, r+8, ... of `shard_batch` and writes its summary(distributed=True) and
its local summary to OUT/rank-r.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from focalserve_client import Evaluator, FocalLossClient

BATCHES = 22
REFUSED = 9  # a batch with a class label out of range: the service refuses it, the evaluation goes on


def shard_batch(index: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([7, index])
    rows, classes = 50 + 13 * index, 9
    logit = (rng.standard_normal((rows, classes)) * 2 - 3).astype(np.float32 if index % 3 else np.float64)
    label = rng.integers(-1, classes + 1, (rows, 1)).astype(np.int64)
    if index == REFUSED:
        label[3, 0] = classes + 5
    return logit, label


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--framework", choices=["torch", "paddle"], required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.framework == "torch":
        import torch
        import torch.distributed as dist
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        wrap = torch.from_numpy
    else:
        import paddle
        import paddle.distributed as dist
        dist.init_parallel_env()
        rank, world = dist.get_rank(), dist.get_world_size()
        wrap = paddle.to_tensor
    with FocalLossClient(args.target) as client:
        evaluator = Evaluator(client, label_format="class_index", alpha=0.25, gamma=2.0, max_in_flight=2)
        for index in range(rank, BATCHES, world):
            logit, label = shard_batch(index)
            evaluator.add(wrap(logit), wrap(label))
        total = evaluator.summary(distributed=True)
        local = evaluator.summary()
    (args.out / f"rank-{rank}.json").write_text(json.dumps({
        "world": world, "total": vars(total), "local": vars(local),
        "errors": [e.request_id for e in evaluator.errors]}))
    if args.framework == "torch":
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
