"""A stage's layers start evaluating as soon as their graph is built, with unchanged results."""
import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from exo_ctl.model_builder.build_model import build_model
from reconciler.runtime import load_shard
from reconciler.runtime.layer_overlap import overlap_layers


def test_overlapping_layers_keep_their_class_name_attributes_and_hidden_states():
    model = load_model(build_model("tiny"))[0]
    layers = model.model.layers
    x = mx.random.normal((1, 5, model.args.hidden_size), key=mx.random.key(0)).astype(mx.bfloat16)
    expected = [layer(x, mask="causal", cache=None) for layer in layers]
    unwrapped = type(layers[0])
    flags = [vars(layer).get("use_sliding") for layer in layers]
    overlap_layers(layers)
    overlap_layers(layers)  # idempotent: never wrapped twice
    assert all(type(layer).__name__ == "TransformerBlock" for layer in layers)
    assert type(layers[0]).__mro__[1:3] == (unwrapped, nn.Module)  # wrapped once
    assert [vars(layer).get("use_sliding") for layer in layers] == flags
    for layer, want in zip(layers, expected):
        assert mx.array_equal(layer(x, mask="causal", cache=None), want).item()


def test_a_layer_returning_a_tuple_still_returns_it_whole():
    class Pair(nn.Module):
        def __call__(self, x):
            return x + 1, None

    pair = Pair()
    overlap_layers([pair])
    out, extra = pair(mx.array([1, 2]))
    assert out.tolist() == [2, 3] and extra is None


def test_a_loaded_stage_overlaps_only_its_own_layers_and_decodes_like_mlx_lm():
    path = build_model("tiny")
    reference = load_model(path)[0]
    shard = load_shard(path, start=2, end=8)  # the last stage; layers 0-1 are skipped
    try:
        layers = shard.model.model.layers
        assert [getattr(type(layer), "overlaps_compute", False) for layer in layers] == [False] * 2 + [True] * 6
        first = load_shard(path, start=0, end=2)
        try:
            prompt = mx.array([[3, 14, 15, 92, 65, 35]])

            def chained() -> list[int]:
                caches = (first.make_cache(), shard.make_cache())
                ids, out = prompt, []
                for _ in range(6):
                    logits = shard.forward(first.forward(ids, cache=caches[0]), cache=caches[1])
                    out.append(int(mx.argmax(logits[0, -1]).item()))
                    ids = mx.array([[out[-1]]])
                return out

            def single() -> list[int]:
                cache, ids, out = make_prompt_cache(reference), prompt, []
                for _ in range(6):
                    out.append(int(mx.argmax(reference(ids, cache=cache)[0, -1]).item()))
                    ids = mx.array([[out[-1]]])
                return out

            assert first.compute.call(chained) == single()
        finally:
            first.close()
    finally:
        shard.close()
