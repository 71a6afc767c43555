"""Cut an mlx-lm model down to one pipeline stage while its own ``__call__`` still runs it.

No family's forward is re-implemented here. The layer list keeps its full length, so every
index-based rule of a family (sliding-window patterns, per-layer types, masks built from
``cache[k]``) sees the same indices as in one process; the layers a stage does not own become
``SkippedLayer``s (no weights, identity). Around the model's own code:

- a stage that is not first is called with dummy token ids and gets its hidden states
  through an ``Inlet``: whatever the family does to its embeddings (a scale, ...) only touches a
  throwaway value, and the skipped layer just before the stage's first layer hands the received
  hidden states on;
- a stage that is not last runs the inner model (the one holding ``layers``) with its final norm
  made an identity, and drops the head; the last stage runs the whole model, so its head, tied or
  untied, and any final soft-cap are the family's own;
- a skipped layer's cache is advanced by tiny keys after each step, with the family's own cache
  class, so every mask the family builds from any cache entry is what one process would build.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "norm_f", "final_norm")
_EMBEDDING_TYPES = (nn.Embedding, nn.QuantizedEmbedding)


class UnsplittableModel(ValueError):
    """The model cannot be cut into pipeline stages; the message says why."""


@dataclass(frozen=True)
class StageLayout:
    """Where the parts a split needs live in one loaded (or freshly built) model."""

    inner_path: tuple[str, ...]  # attribute path from the root to the module holding ``layers``
    embedding_name: str
    norm_name: str
    tied: bool  # no weight outside the inner model: the head is the embedding


def find_layout(model: nn.Module, *, num_layers: int) -> StageLayout:
    """Locate the layer list, embedding and final norm, or say why this model cannot be split."""
    family = type(model).__module__
    inner_path = _find_layers_owner(model, num_layers=num_layers)
    if inner_path is None:
        raise UnsplittableModel(f"architecture {family} has no module holding a list of {num_layers} layers")
    if not inner_path:
        raise UnsplittableModel(f"architecture {family} keeps its layers on the top-level model, beside its head")
    inner = _get(model, inner_path)
    embeddings = [name for name, child in inner.children().items() if isinstance(child, _EMBEDDING_TYPES)]
    if len(embeddings) != 1:
        raise UnsplittableModel(f"architecture {family}: expected one token embedding beside the layers, found {embeddings}")
    norms = [name for name in FINAL_NORM_NAMES if isinstance(inner.get(name), nn.Module)]
    if len(norms) != 1:
        raise UnsplittableModel(
            f"architecture {family}: expected one final norm named one of {', '.join(FINAL_NORM_NAMES)}, found {norms}"
        )
    prefix = ".".join(inner_path) + "."
    outside = [key for key, _ in tree_flatten(model.parameters()) if not key.startswith(prefix)]
    return StageLayout(inner_path=inner_path, embedding_name=embeddings[0], norm_name=norms[0], tied=not outside)


def check_caches(caches: list[Any], *, family: str, num_layers: int) -> None:
    """One cache per layer, each a key/value cache that can be advanced without its layer."""
    if len(caches) != num_layers:
        raise UnsplittableModel(f"architecture {family} keeps {len(caches)} caches for {num_layers} layers")
    for index, cache in enumerate(caches):
        if not (hasattr(cache, "update_and_fetch") and hasattr(cache, "offset")):
            raise UnsplittableModel(
                f"architecture {family}: layer {index} keeps a {type(cache).__name__}, not a key/value cache; "
                "only attention layers can be skipped by a stage"
            )


class SkippedLayer(nn.Module):
    """A layer another stage runs: no weights; passes the hidden states through, or, for the layer
    just before this stage's first one, hands on the hidden states the stage received."""

    def __init__(self, original: nn.Module, *, inlet: "Inlet | None" = None) -> None:
        super().__init__()
        # Families read plain flags off their layers (llama's use_sliding, is_sliding ...).
        for key, value in vars(original).items():
            plain = isinstance(value, (bool, int, float, str, type(None)))
            if plain and not key.startswith("_") and not hasattr(type(self), key):
                setattr(self, key, value)
        self._inlet = inlet

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        return self._inlet.take() if self._inlet is not None else x


class Inlet:
    """Hidden states received from the previous stage, for the duration of one forward."""

    def __init__(self) -> None:
        self._hidden: mx.array | None = None

    def put(self, hidden: mx.array | None) -> None:
        self._hidden = hidden

    def take(self) -> mx.array:
        if self._hidden is None:
            raise RuntimeError("no hidden states were given to this stage")
        return self._hidden


class HiddenStatesInput(nn.Module):
    """Stands in for the token embedding on a stage that receives hidden states (and holds no
    tied head): a throwaway value of the shape and dtype the family expects."""

    def __init__(self, inlet: Inlet) -> None:
        super().__init__()
        self._inlet = inlet

    def __call__(self, ids: mx.array) -> mx.array:
        hidden = self._inlet.take()
        # A new array, never the received one: families scale embeddings in place (gemma3's h *= ...).
        return mx.zeros(hidden.shape, dtype=hidden.dtype)


def split_model(model: nn.Module, layout: StageLayout, *, start: int, end: int, num_layers: int) -> Inlet | None:
    """Replace, in place, every part of ``model`` that stage [start, end) does not run.
    Returns the stage's inlet, or None on the first stage (it reads token ids)."""
    inner = _get(model, layout.inner_path)
    first, last = start == 0, end == num_layers
    inlet = None if first else Inlet()
    layers = list(inner.layers)
    for index in range(num_layers):
        if not start <= index < end:
            layers[index] = SkippedLayer(layers[index], inlet=inlet if index == start - 1 else None)
    inner.layers = layers
    if not first and not (last and layout.tied):  # a tied head keeps the embedding itself
        setattr(inner, layout.embedding_name, HiddenStatesInput(inlet))
    if not last:
        setattr(inner, layout.norm_name, nn.Identity())
        _drop_outside(model, layout.inner_path)
    return inlet


def advance_skipped(caches: list[Any], skipped: tuple[int, ...], *, batch: int, length: int) -> None:
    """Move the caches of skipped layers on by ``length`` positions. A plain KVCache's masks depend
    on its offset alone; any other cache stores one float per position, through its own code."""
    from mlx_lm.models.cache import KVCache

    if not skipped or length == 0:
        return
    filler, touched = None, []
    for index in skipped:
        cache = caches[index]
        if type(cache) is KVCache:
            cache.offset += length
            continue
        filler = filler if filler is not None else mx.zeros((batch, 1, length, 1), dtype=mx.float16)
        cache.update_and_fetch(filler, filler)
        touched += [cache.keys, cache.values]
    if touched:
        mx.eval(touched)


def build_unloaded(config: dict[str, Any]) -> nn.Module:
    """The mlx-lm model a config describes, with unevaluated random weights (nothing is allocated)."""
    from mlx_lm.utils import _get_classes

    try:
        model_class, args_class = _get_classes(config)
    except (KeyError, ValueError) as error:
        raise UnsplittableModel(f"model_type {config.get('model_type')!r}: {error}") from None
    try:
        return model_class(args_class.from_dict(config))
    except Exception as error:  # a family's own validation of its config
        raise UnsplittableModel(f"model_type {config.get('model_type')!r}: config rejected by mlx-lm: {error}") from None


def split_refusal(config: dict[str, Any], *, num_layers: int) -> str | None:
    """Why a model with this config cannot be served in pipeline stages, or None if it can."""
    try:
        model = build_unloaded(config)
        find_layout(model, num_layers=num_layers)
        from mlx_lm.models.cache import make_prompt_cache

        check_caches(make_prompt_cache(model), family=type(model).__module__, num_layers=num_layers)
    except UnsplittableModel as error:
        return str(error)
    return None


def _find_layers_owner(model: nn.Module, *, num_layers: int) -> tuple[str, ...] | None:
    """The shortest attribute path to a module whose ``layers`` is a list of ``num_layers`` modules."""
    frontier: list[tuple[tuple[str, ...], nn.Module]] = [((), model)]
    while frontier:
        next_frontier = []
        for path, module in frontier:
            layers = module.get("layers")
            if isinstance(layers, list) and len(layers) == num_layers and all(isinstance(l, nn.Module) for l in layers):
                return path
            next_frontier += [(path + (name,), child) for name, child in module.children().items()
                              if isinstance(child, nn.Module)]
        frontier = next_frontier
    return None


def _get(model: nn.Module, path: tuple[str, ...]) -> nn.Module:
    module = model
    for name in path:
        module = module[name]
    return module


def _drop_outside(model: nn.Module, inner_path: tuple[str, ...]) -> None:
    """Delete every weight-holding module beside the path to the inner model (the head)."""
    module = model
    for name in inner_path:
        for other, child in list(module.items()):
            if other != name and isinstance(child, nn.Module) and tree_flatten(child.parameters()):
                del module[other]
        module = module[name]
