"""Training steps whose focal loss comes from focalserve, in PaddlePaddle: `loss.backward()` just works.

    python examples/paddle_train_step.py --target localhost:50051

The same classification head as torch_train_step.py, with paddle.nn.functional.sigmoid_focal_loss's
signature (the number of positives as its normalizer), computed by the service.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import paddle

from focalserve_client import FocalLossClient
from focalserve_client.paddle import sigmoid_focal_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=os.environ.get("FOCALSERVE_TARGET", "localhost:50051"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--anchors", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=80)
    args = parser.parse_args()

    paddle.seed(0)
    rng = np.random.default_rng(0)
    features = paddle.to_tensor(rng.standard_normal((args.anchors, 256)).astype(np.float32))
    classes = np.where(rng.random(args.anchors) < 0.9, 0, rng.integers(1, args.classes + 1, args.anchors))
    labels = paddle.to_tensor(np.eye(args.classes + 1, dtype=np.float32)[classes][:, 1:])
    fg_num = paddle.to_tensor([max(float((classes > 0).sum()), 1.0)], dtype="float32")
    head = paddle.nn.Linear(256, args.classes,
                            bias_attr=paddle.ParamAttr(initializer=paddle.nn.initializer.Constant(-4.6)))
    optimizer = paddle.optimizer.SGD(learning_rate=0.5, parameters=head.parameters())

    with FocalLossClient(args.target) as client:
        for step in range(args.steps):
            logits = head(features)
            loss = sigmoid_focal_loss(logits, labels, normalizer=fg_num, alpha=0.25, gamma=2.0, reduction="sum",
                                      client=client)
            loss.backward()
            optimizer.step()
            optimizer.clear_grad()
            print(f"step {step} loss {float(loss):.6f}")


if __name__ == "__main__":
    main()
