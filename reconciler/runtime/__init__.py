"""Shard runtime: loading a contiguous range of a model's layers and running it on one thread."""

from reconciler.runtime.shard_model import (
    ComputeThread,
    ShardLoadError,
    ShardModel,
    load_shard,
    open_shard,
    parameter_bytes,
)

__all__ = ["ComputeThread", "ShardLoadError", "ShardModel", "load_shard", "open_shard", "parameter_bytes"]
