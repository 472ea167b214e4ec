"""Training steps whose focal loss comes from focalserve: `loss.backward()` just works.

    python examples/torch_train_step.py --target localhost:50051

A RetinaNet-style classification head (a linear layer over anchor features) trained for a few steps on
one batch; the loss is torchvision's sigmoid_focal_loss, computed by the service (one round trip per step:
the forward brings the gradient back with the loss, the backward only scales it).
"""

from __future__ import annotations

import argparse
import os

import torch

from focalserve_client import FocalLossClient
from focalserve_client.torch import sigmoid_focal_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=os.environ.get("FOCALSERVE_TARGET", "localhost:50051"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--anchors", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=80)
    args = parser.parse_args()

    torch.manual_seed(0)
    features = torch.randn(args.anchors, 256)
    classes = torch.randint(0, args.classes + 1, (args.anchors,))  # 0: background
    classes[torch.rand(args.anchors) < 0.9] = 0
    targets = torch.nn.functional.one_hot(classes, args.classes + 1)[:, 1:].float()
    head = torch.nn.Linear(256, args.classes)
    torch.nn.init.constant_(head.bias, -4.6)  # RetinaNet's prior: p = 0.01 for every class at the start
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)

    with FocalLossClient(args.target) as client:
        for step in range(args.steps):
            optimizer.zero_grad()
            logits = head(features)
            loss = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="sum", client=client)
            loss = loss / max(float(targets.sum()), 1.0)
            loss.backward()
            optimizer.step()
            print(f"step {step} loss {loss.item():.6f}")


if __name__ == "__main__":
    main()
