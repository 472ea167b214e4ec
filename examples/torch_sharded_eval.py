"""Sharded evaluation over torch.distributed: each rank sends its shard to focalserve, one global loss.

    torchrun --nproc-per-node 4 examples/torch_sharded_eval.py --target localhost:50051

Each rank pipelines its batches over one ComputeStream (Evaluator); summary(distributed=True) all-reduces
the un-normalized totals over the gloo group, so every rank gets the global loss_sum / max(positives, 1).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from anchors import shard
from focalserve_client import Evaluator, FocalLossClient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=os.environ.get("FOCALSERVE_TARGET", "localhost:50051"))
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--anchors", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    with FocalLossClient(args.target) as client:
        evaluator = Evaluator(client, label_format="class_index", alpha=0.25, gamma=2.0, progress=rank == 0)
        for logit, label in shard(rank, world, args.batches, anchors=args.anchors, classes=args.classes,
                                  seed=args.seed):
            # a real loop has the model's output here: torch tensors, on any device
            evaluator.add(torch.from_numpy(logit), torch.from_numpy(label))
        summary = evaluator.summary(distributed=True)
    for error in evaluator.errors:
        print(f"rank {rank}: batch {error.request_id} refused: {error}")
    if rank == 0:
        print(f"global focal loss {summary.normalized_loss:.6f} over {summary.items} batches, "
              f"{summary.elements} elements, {summary.positives:.0f} positives ({world} ranks)")
        print("summary " + json.dumps(vars(summary)))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
