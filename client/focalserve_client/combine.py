"""How per-item statistics combine into the answer one request would give (SPEC §1.3, §2).

The server finishes every reduced request with these functions and the client finishes a request it split
into chunks with the same ones, so both give the same float64 before the final rounding.
"""

from __future__ import annotations

import math


def reduced_loss(loss_sum: float, normalizer: float, elements: int, reduction: str) -> float:
    """SUM: loss_sum / normalizer; MEAN: that / elements (ignored elements counted, as Paddle)."""
    if reduction == "mean":
        return loss_sum / (normalizer * elements) if elements else math.nan
    return loss_sum / normalizer


def normalized_loss(loss_sum: float, positives: float) -> float:
    """StreamSummary.normalized_loss: the global loss of a sharded evaluation."""
    return loss_sum / max(positives, 1.0)
