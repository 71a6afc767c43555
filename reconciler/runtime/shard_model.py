"""One stage's slice of a model: lazily loads layers [start, end) and runs them on its own thread.

Only the layers this stage owns (plus embeddings on the first stage, norm + head on the last)
are ever evaluated, so the other layers' weights are never read from disk into memory. The
stage runs the family's own mlx-lm forward code (see ``stage_split``). A partial copy in the
node's model cache (``reconciler.weights.store``) holds only the stage's tensors: it is loaded
non-strictly, once every tensor the stage needs is known to be in its files.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, TypeVar

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from reconciler.runtime.layer_overlap import overlap_layers
from reconciler.runtime.stage_split import (
    Inlet,
    StageLayout,
    UnsplittableModel,
    advance_skipped,
    check_caches,
    find_layout,
    split_model,
)
from reconciler.runtime.weight_dtype import WeightDtypeError, apply_dtype

T = TypeVar("T")


class ShardLoadError(ValueError):
    """The model directory or the requested layer range cannot be loaded as a shard."""


class ShardLoadCancelled(Exception):
    """The shard's compute thread was closed while it was loading."""


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
        self.closing = threading.Event()  # set by close(); a running load stops at its next layer
        self._closed: concurrent.futures.Future[None] | None = None

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        return self._executor.submit(fn, *args, **kwargs)

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run `fn` on the thread and block until it returns (for scripts and tests)."""
        return self.submit(fn, *args, **kwargs).result()

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def close(self) -> concurrent.futures.Future[None]:
        """Stop taking jobs and drop the queued ones without waiting: the running job (a load stops
        at its next layer) finishes on the thread, which is joined off the caller's thread, and
        MLX's freed buffers go back to the system then. The future resolves once it has joined."""
        if self._closed is None:
            self.closing.set()
            self._closed = concurrent.futures.Future()
            self._closed.set_running_or_notify_cancel()  # a waiter that gives up cannot cancel it
            self._executor.shutdown(wait=False, cancel_futures=True)
            threading.Thread(target=self._join, name=f"mlx-{self.name}-join", daemon=True).start()
        return self._closed

    def _join(self) -> None:
        assert self._closed is not None
        self._executor.shutdown(wait=True)
        gc.collect()  # the last job's references to the weights are gone now
        mx.clear_cache()
        self._closed.set_result(None)


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
    layout: StageLayout = field(repr=False)
    inlet: Inlet | None = field(default=None, repr=False)  # None on the first stage (it reads token ids)
    path: Path | None = None  # the model directory (the last stage reads its tokenizer for grammars)

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.num_layers

    @property
    def hidden_size(self) -> int:
        text = self.config.get("text_config") or {}  # multimodal wrappers nest the language model
        return int(text.get("hidden_size") or self.config["hidden_size"])

    @property
    def skipped(self) -> tuple[int, ...]:
        """Indices of the layers other stages run (their caches only track positions)."""
        return tuple(i for i in range(self.num_layers) if not self.start <= i < self.end)

    def make_cache(self) -> list[Any]:
        """A fresh cache, the family's own: one entry per layer of the whole model."""
        return _make_cache(self.model)

    @property
    def supports_batching(self) -> bool:
        """Whether several requests' decode steps can run as one forward (every cache of the family
        has mlx-lm's batched twin). The stage server serves a shard without it one request at a time."""
        return all(hasattr(cache, "merge") for cache in self.make_cache())

    # ``forward(..., hidden=True)`` gives the normed hidden states (embedding requests pool them).
    pools_hidden_states = True

    def merge_caches(self, caches: list[list[Any]]) -> list[Any]:
        """Several requests' caches as one list of mlx-lm batched caches (row i = ``caches[i]``),
        for ``forward`` with a batch of rows. Left-padded as mlx-lm's BatchGenerator does."""
        return [_merge_layer([cache[index] for cache in caches]) for index in range(len(caches[0]))]

    def extract_cache(self, batch: list[Any], row: int) -> list[Any]:
        """One row of a merged cache, back as that request's own cache."""
        return [_extract_layer(cache, row) for cache in batch]

    def filter_caches(self, batch: list[Any], rows: list[int]) -> None:
        """Keep only ``rows`` of a merged cache, in that order (in place)."""
        for cache in batch:
            cache.filter(rows)

    def forward(self, x: mx.array, *, cache: list[Any], hidden: bool = False) -> mx.array:
        """Token ids (1, L) on the first stage or hidden states (1, L, D) otherwise, to hidden
        states (1, L, D), or logits (1, L, vocab) on the last stage (its normed hidden states with
        ``hidden``: the inner model ends with the final norm). Lazy: the caller evaluates."""
        tokens = x
        if self.inlet is not None:  # the family's code runs from dummy token ids up to the inlet
            self.inlet.put(x)
            tokens = mx.zeros(x.shape[:2], dtype=mx.int32)
        try:
            run = self.model if self.is_last and not hidden else _inner(self.model, self.layout)
            out = run(tokens, cache=cache)
        finally:
            if self.inlet is not None:
                self.inlet.put(None)
        _advance_positions(cache, self.skipped, batch=x.shape[0], length=x.shape[1])
        return out

    def close(self) -> concurrent.futures.Future[None]:
        """Stop the compute thread without waiting (see ``ComputeThread.close``); the weights are
        freed when the last reference goes."""
        return self.compute.close()


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


def _inner(model: nn.Module, layout: StageLayout) -> nn.Module:
    """The module holding the layer list (``model.model`` for most families)."""
    module = model
    for name in layout.inner_path:
        module = module[name]
    return module


Progress = Callable[[float, int], None]  # (fraction done, bytes loaded), called on the compute thread


def _check_partial_copy(model_path: Path, tensors: Collection[str] | None) -> None:
    """A partial copy must hold every checkpoint tensor the stage needs (``tensors``): loaded
    non-strictly, a missing one would silently keep its random initial value."""
    from reconciler.models.metadata import ModelMetadataError, read_safetensors_header

    if tensors is None:
        raise ShardLoadError(f"{model_path}: a partial copy in the model cache, and which tensors the stage "
                             "needs was not given")
    held: set[str] = set()
    for file in sorted(model_path.glob("model*.safetensors")):  # what mlx-lm's load_model reads
        try:
            held |= set(read_safetensors_header(file)) - {"__metadata__"}
        except (OSError, ModelMetadataError) as error:
            raise ShardLoadError(f"{file}: unreadable: {error}") from None
    missing = sorted(set(tensors) - held)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ShardLoadError(f"{model_path}: the partial copy lacks {len(missing)} tensors this stage needs: {shown}")


def load_stage_model(model_path: Path, *, tensors: Collection[str] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """mlx-lm's ``load_model`` (lazy) of a model directory: strict for an original copy; for a
    partial copy, non-strict once ``_check_partial_copy`` found every tensor of ``tensors``."""
    from reconciler.weights.store import is_partial_copy  # here: reconciler.models imports this module

    partial = is_partial_copy(model_path)
    if partial:
        _check_partial_copy(model_path, tensors)
    # mlx_lm is imported here, not at module level: the package takes seconds to import (it pulls
    # in transformers) and a node should not pay that before it holds any shard.
    from mlx_lm.utils import load_model

    try:
        return load_model(model_path, lazy=True, strict=not partial)
    except (RuntimeError, ValueError, TypeError, KeyError, OSError) as error:  # config fields or weight files
        detail = f"{type(error).__name__}: {error}" if isinstance(error, (TypeError, KeyError)) else str(error)
        raise ShardLoadError(f"{model_path}: mlx-lm cannot load this model: {detail}") from None


def _load_on_this_thread(model_path: Path, *, start: int, end: int, compute: ComputeThread,
                         progress: Progress | None = None, dtype: str | None = None,
                         tensors: Collection[str] | None = None) -> ShardModel:
    num_layers = _read_num_layers(model_path)
    _check_range(start=start, end=end, num_layers=num_layers, model_path=model_path)
    model, config = load_stage_model(model_path, tensors=tensors)
    try:
        layout = find_layout(model, num_layers=num_layers)
        check_caches(_make_cache(model), family=type(model).__module__, num_layers=num_layers)
    except UnsplittableModel as error:
        raise ShardLoadError(f"{model_path}: {error}") from None
    inlet = split_model(model, layout, start=start, end=end, num_layers=num_layers)
    try:
        config = apply_dtype(model, config, dtype=dtype, model_path=model_path)
    except WeightDtypeError as error:
        raise ShardLoadError(str(error)) from None
    overlap_layers(_inner(model, layout).layers[start:end])  # graph building overlaps compute
    total, done = max(parameter_bytes(model), 1), 0   # nbytes is known before evaluation
    try:
        for layer in _inner(model, layout).layers[start:end]:  # layer by layer so progress can be reported
            if compute.closing.is_set():
                raise ShardLoadCancelled(f"{model_path}: load of layers [{start}, {end}) cancelled")
            mx.eval(layer.parameters())
            done += parameter_bytes(layer)
            if progress is not None:
                progress(done / total, done)
        mx.eval(model.parameters())
    except RuntimeError as error:  # MLX reports unreadable weight data this way
        raise ShardLoadError(f"{model_path}: reading the weights failed: {error}") from None
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
        layout=layout,
        inlet=inlet,
        path=model_path,
    )


def _position_only(cache: Any) -> bool:
    """A merged cache of layers that hold no keys (skipped ones): it tracks positions only."""
    from mlx_lm.models.cache import BatchKVCache

    return type(cache) is BatchKVCache and cache.keys is None


def _advance_positions(caches: list[Any], skipped: tuple[int, ...], *, batch: int, length: int) -> None:
    """``advance_skipped``, and for merged position-only caches the same move of their offsets."""
    rest = []
    for index in skipped:
        cache = caches[index]
        if _position_only(cache):
            cache.offset = cache.offset + length
            cache._idx += length
        else:
            rest.append(index)
    advance_skipped(caches, tuple(rest), batch=batch, length=length)


def _merge_layer(column: list[Any]) -> Any:
    from mlx_lm.models.cache import BatchKVCache, KVCache

    if all(type(c) is KVCache and c.keys is None for c in column):  # skipped (or empty) layer: positions
        lengths = [c.offset for c in column]
        merged = BatchKVCache([max(lengths) - n for n in lengths])
        merged.offset, merged._idx = mx.array(lengths), max(lengths)
        return merged
    return type(column[0]).merge(column)


def _extract_layer(cache: Any, row: int) -> Any:
    from mlx_lm.models.cache import KVCache

    if not _position_only(cache):
        return cache.extract(row)
    single = KVCache()
    single.offset = int(cache.offset[row].item())
    return single


def _make_cache(model: nn.Module) -> list[Any]:
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)


def load_shard(model_path: Path, *, start: int, end: int, dtype: str | None = None,
               tensors: Collection[str] | None = None) -> ShardModel:
    """Load layers [start, end) of the mlx-lm model in `model_path` onto a new compute thread,
    in ``dtype`` (spec.model.dtype) when given; ``tensors``: what a partial copy must hold."""
    compute = ComputeThread(f"{Path(model_path).name}-{start}-{end}")
    try:
        return compute.call(_load_on_this_thread, Path(model_path), start=start, end=end, compute=compute,
                            dtype=dtype, tensors=tensors)
    except BaseException:
        compute.close()
        raise


async def open_shard(model_path: Path, *, start: int, end: int, progress: Progress | None = None,
                     dtype: str | None = None, tensors: Collection[str] | None = None) -> ShardModel:
    """`load_shard` for asyncio callers: the load runs on the shard's thread, not the loop.
    ``progress`` is called on that thread as layers are read."""
    compute = ComputeThread(f"{Path(model_path).name}-{start}-{end}")
    try:
        return await compute.run(_load_on_this_thread, Path(model_path), start=start, end=end, compute=compute,
                                 progress=progress, dtype=dtype, tensors=tensors)
    except BaseException:
        compute.close()
        raise
