"""Python client of focalserve, the sigmoid focal loss gRPC service.

    from focalserve_client import FocalLossClient
    with FocalLossClient("localhost:50051") as client:
        result = client.compute(logit, label, normalizer=2.0, compute_grad=True)
"""

from .client import (ComputeResult, FocalLossClient, FocalLossError, ItemStats, StreamSummary, build_request,
                     service_config)
from .evaluator import Evaluator

__all__ = ["ComputeResult", "FocalLossClient", "FocalLossError", "ItemStats", "StreamSummary", "build_request",
           "service_config"]
__all__ += ["Evaluator"]
