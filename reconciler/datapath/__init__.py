"""Data path: hidden states stage -> stage over TCP, tokens back to the request's origin."""

from reconciler.datapath.pipeline import PipelineClient, PipelineError, StageLost
from reconciler.datapath.stage import StageServer
from reconciler.datapath.wire import SamplingParams, StageAddress

__all__ = [
    "PipelineClient",
    "PipelineError",
    "SamplingParams",
    "StageAddress",
    "StageLost",
    "StageServer",
]
