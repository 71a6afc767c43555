"""Data path: hidden states stage -> stage over TCP, tokens back to the request's origin."""

from reconciler.datapath.pipeline import (PREFILL_CHUNK, PipelineClient, RequestStalled, RouteError, StageLost,
                                          StagesBusy)
from reconciler.datapath.stage import StageServer
from reconciler.datapath.wire import SamplingParams, StageAddress

__all__ = [
    "PREFILL_CHUNK",
    "PipelineClient",
    "RouteError",
    "RequestStalled",
    "SamplingParams",
    "StageAddress",
    "StageLost",
    "StagesBusy",
    "StageServer",
]
