"""Synthetic RetinaNet-style batches for the examples: class-index logits, anchors x classes.

Each batch depends only on (seed, batch index), so any split of the batches over ranks evaluates the
same data as one process does.
"""

from __future__ import annotations

import numpy as np


def batch(index: int, anchors: int = 2000, classes: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """logit [anchors, classes] float32; label [anchors, 1] int32: mostly 0 (background), some 1..classes
    (a foreground class), some -1 (ignored anchors, between the IoU thresholds)."""
    rng = np.random.default_rng([seed, index])
    logit = (rng.standard_normal((anchors, classes)) - 4.6).astype(np.float32)
    kind = rng.random(anchors)
    label = np.where(kind < 0.05, rng.integers(1, classes + 1, anchors), np.where(kind < 0.10, -1, 0))
    return logit, label.astype(np.int32).reshape(anchors, 1)


def shard(rank: int, world: int, batches: int, **kwargs):
    """The batches of one rank: every world-th one from its rank."""
    for index in range(rank, batches, world):
        yield batch(index, **kwargs)
