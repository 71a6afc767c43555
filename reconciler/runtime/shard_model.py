"""One stage's slice of a model: lazily loads layers [start, end) and runs them on its own thread.

Only the layers this stage owns (plus embeddings on the first stage, norm + lm_head on the last)
are ever evaluated, so the other layers' weights are never read from disk into memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

T = TypeVar("T")


class ShardLoadError(ValueError):
    """The model directory or the requested layer range cannot be loaded as a shard."""


class ComputeThread:
    """A single worker thread that owns every MLX call of one loaded shard.

    MLX streams are thread-local and MLX calls block, so the event loop never runs them itself;
    jobs run one at a time in submission order.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"mlx-{name}"
        )

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        return self._executor.submit(fn, *args, **kwargs)

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run `fn` on the thread and block until it returns (for scripts and tests)."""
        return self.submit(fn, *args, **kwargs).result()

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


@dataclass
class ShardModel:
    """Layers [start, end) of a model out of `num_layers`; call its methods on `compute` only."""

    model: nn.Module
    config: dict[str, Any]
    start: int
    end: int
    num_layers: int
    nbytes: int
    compute: ComputeThread = field(repr=False)

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.num_layers

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    def make_cache(self) -> list[Any]:
        """A fresh KV cache for this shard's layers (one entry per owned layer)."""
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model)

    def forward(self, x: mx.array, *, cache: list[Any]) -> mx.array:
        """Token ids (1, L) on the first stage or hidden states (1, L, D) otherwise, to hidden
        states (1, L, D), or logits (1, L, vocab) on the last stage. Lazy: the caller evaluates."""
        from mlx_lm.models.base import create_attention_mask  # loaded with the model already

        inner = self.model.model
        h = inner.embed_tokens(x) if self.is_first else x
        mask = create_attention_mask(h, cache[0] if cache else None)
        for layer, layer_cache in zip(inner.layers, cache):
            h = layer(h, mask, cache=layer_cache)
        if not self.is_last:
            return h
        h = inner.norm(h)
        if "lm_head" in self.model:
            return self.model.lm_head(h)
        return inner.embed_tokens.as_linear(h)

    def close(self) -> None:
        """Stop the compute thread; the weights are freed when the last reference goes."""
        self.compute.close()


def parameter_bytes(module: nn.Module) -> int:
    return sum(value.nbytes for _, value in tree_flatten(module.parameters()))


def _read_num_layers(model_path: Path) -> int:
    config_file = model_path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise ShardLoadError(f"{config_file}: not found") from None
    except json.JSONDecodeError as exc:
        raise ShardLoadError(f"{config_file}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    source = config.get("text_config", config)
    layers = source.get("num_hidden_layers")
    if not isinstance(layers, int) or layers < 1:
        raise ShardLoadError(f"{config_file}: num_hidden_layers must be a positive integer, got {layers!r}")
    return layers


def _check_range(*, start: int, end: int, num_layers: int, model_path: Path) -> None:
    if not 0 <= start < end <= num_layers:
        raise ShardLoadError(
            f"{model_path}: layer range [{start}, {end}) must satisfy 0 <= start < end <= {num_layers}"
        )


def _slice_model(model: nn.Module, *, start: int, end: int, num_layers: int, model_path: Path) -> None:
    """Drop every module this stage does not run, before anything is evaluated."""
    inner = getattr(model, "model", None)
    missing = [n for n in ("layers", "embed_tokens", "norm") if inner is None or n not in inner]
    if missing:
        raise ShardLoadError(
            f"{model_path}: architecture {type(model).__module__} lacks model.{', model.'.join(missing)}; "
            "only models shaped like mlx_lm's llama (embed_tokens, layers, norm, lm_head) can be sharded"
        )
    first, last = start == 0, end == num_layers
    tied = "lm_head" not in model
    inner.layers = inner.layers[start:end]
    if not first and not (last and tied):
        del inner.embed_tokens
    if not last:
        del inner.norm
        if not tied:
            del model.lm_head


Progress = Callable[[float, int], None]  # (fraction done, bytes loaded), called on the compute thread


def _load_on_this_thread(model_path: Path, *, start: int, end: int, compute: ComputeThread,
                         progress: Progress | None = None) -> ShardModel:
    num_layers = _read_num_layers(model_path)
    _check_range(start=start, end=end, num_layers=num_layers, model_path=model_path)
    # mlx_lm is imported here, not at module level: the package takes seconds to import (it pulls
    # in transformers) and a node should not pay that before it holds any shard.
    from mlx_lm.utils import load_model

    model, config = load_model(model_path, lazy=True)
    _slice_model(model, start=start, end=end, num_layers=num_layers, model_path=model_path)
    total, done = max(parameter_bytes(model), 1), 0   # nbytes is known before evaluation
    for layer in model.model.layers:  # read layer by layer so progress can be reported
        mx.eval(layer.parameters())
        done += parameter_bytes(layer)
        if progress is not None:
            progress(done / total, done)
    mx.eval(model.parameters())
    if progress is not None:
        progress(1.0, total)
    return ShardModel(
        model=model,
        config=config,
        start=start,
        end=end,
        num_layers=num_layers,
        nbytes=parameter_bytes(model),
        compute=compute,
    )


def load_shard(model_path: Path, *, start: int, end: int) -> ShardModel:
    """Load layers [start, end) of the mlx-lm model in `model_path` onto a new compute thread."""
    compute = ComputeThread(f"{Path(model_path).name}-{start}-{end}")
    try:
        return compute.call(_load_on_this_thread, Path(model_path), start=start, end=end, compute=compute)
    except BaseException:
        compute.close()
        raise


async def open_shard(model_path: Path, *, start: int, end: int, progress: Progress | None = None) -> ShardModel:
    """`load_shard` for asyncio callers: the load runs on the shard's thread, not the loop.
    ``progress`` is called on that thread as layers are read."""
    compute = ComputeThread(f"{Path(model_path).name}-{start}-{end}")
    try:
        return await compute.run(_load_on_this_thread, Path(model_path), start=start, end=end, compute=compute,
                                 progress=progress)
    except BaseException:
        compute.close()
        raise
