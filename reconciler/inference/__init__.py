"""Inference behind the OpenAI API: the backend interface, and a single-process MLX backend."""
from reconciler.inference.backend import (
    InferenceBackend,
    ModelCard,
    ModelHandle,
    NotReady,
    PipelineError,
    SamplingParams,
)

__all__ = ["InferenceBackend", "ModelCard", "ModelHandle", "NotReady", "PipelineError", "SamplingParams"]
