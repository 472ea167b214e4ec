"""What every backend returns, and the interface the servicer relies on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..request import Job


@dataclass
class Result:
    """loss: logit-shaped for NONE, a 0-d array otherwise; grad: logit-shaped or None. Both in the
    compute dtype. elements/positives/loss_sum are before normalizer and reduction (ItemStats)."""

    loss: np.ndarray
    grad: np.ndarray | None
    elements: int
    positives: float
    loss_sum: float
    compute_seconds: float
    backend: str


class BackendOutOfMemory(RuntimeError):
    """The device could not hold this request; the CPU computes it instead."""


class Backend(Protocol):
    name: str

    def run(self, job: Job) -> Result: ...

    def devices(self) -> list[str]: ...
