"""What the framework drop-ins share: the default client and turning tensors into NumPy arrays."""

from __future__ import annotations

import os
import threading

import numpy as np

from .client import FocalLossClient

DEFAULT_TARGET = "localhost:50051"

_lock = threading.Lock()
_client: FocalLossClient | None = None


def default_client() -> FocalLossClient:
    """One FocalLossClient for FOCALSERVE_TARGET (default localhost:50051), made on first use.

    A gRPC channel is safe to share between threads, so every thread of the process uses this one client
    (and its one connection) rather than opening its own.
    """
    global _client
    if _client is None:
        with _lock:
            if _client is None:
                _client = FocalLossClient(os.environ.get("FOCALSERVE_TARGET", DEFAULT_TARGET))
    return _client


def reset_default_client() -> None:
    """Closes the default client; the next call makes a new one (after FOCALSERVE_TARGET changed, in tests)."""
    global _client
    with _lock:
        if _client is not None:
            _client.close()
        _client = None


def to_numpy(value) -> np.ndarray:
    """A host NumPy array of a NumPy array, a torch tensor (any device) or a Paddle tensor (any place)."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch: no copy for a CPU tensor
        return value.detach().cpu().numpy()
    if hasattr(value, "numpy"):  # paddle: numpy() copies to the host from any place
        return value.numpy()
    return np.asarray(value)
