"""Shard runtime: loading a contiguous range of a model's layers and running it on one thread."""

from reconciler.runtime.shard_model import (
    ComputeThread,
    ShardLoadError,
    ShardModel,
    load_shard,
    open_shard,
    parameter_bytes,
)
from reconciler.runtime.stage_split import UnsplittableModel, split_refusal

__all__ = ["ComputeThread", "ShardLoadError", "ShardModel", "UnsplittableModel", "load_shard", "open_shard",
           "parameter_bytes", "split_refusal"]
