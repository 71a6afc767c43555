import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model

from reconciler.runtime import ShardLoadError, load_shard, parameter_bytes


def parameter_names(shard):
    return {name for name, _ in tree_flatten(shard.model.parameters())}


def test_stages_hold_only_their_layers_and_together_the_whole_model(tiny_model):
    full_bytes = parameter_bytes(load_model(tiny_model, lazy=True)[0])
    first = load_shard(tiny_model, start=0, end=3)
    last = load_shard(tiny_model, start=3, end=6)
    try:
        assert first.nbytes + last.nbytes == full_bytes
        assert first.nbytes < 0.6 * full_bytes and last.nbytes < 0.6 * full_bytes
        names = parameter_names(first)
        assert any(n.startswith("model.embed_tokens") for n in names)
        assert not any(n.startswith(("lm_head", "model.norm")) for n in names)
        assert {n.split(".")[2] for n in names if n.startswith("model.layers.")} == {"0", "1", "2"}
        assert any(n.startswith("lm_head") for n in parameter_names(last))
        assert not any(n.startswith("model.embed_tokens") for n in parameter_names(last))
    finally:
        first.close()
        last.close()


def test_a_middle_stage_never_materializes_the_other_layers(tiny_model):
    full_bytes = parameter_bytes(load_model(tiny_model, lazy=True)[0])
    mx.clear_cache()
    before = mx.get_active_memory()
    middle = load_shard(tiny_model, start=2, end=4)
    try:
        grown = mx.get_active_memory() - before
        assert middle.nbytes < 0.4 * full_bytes
        assert grown < 0.5 * full_bytes, f"loading 2 of 6 layers grew memory by {grown} of {full_bytes} bytes"
        assert not middle.is_first and not middle.is_last
    finally:
        middle.close()


def test_tied_embeddings_are_kept_on_the_last_stage_for_the_output_projection(tiny_tied_model):
    last = load_shard(tiny_tied_model, start=4, end=6)
    try:
        names = parameter_names(last)
        assert "model.embed_tokens.weight" in names and "model.norm.weight" in names
        hidden = last.compute.call(lambda: _logits_shape(last))
        assert hidden == (1, 2, 512)
    finally:
        last.close()


def _logits_shape(shard):
    cache = shard.make_cache()
    out = shard.forward(mx.zeros((1, 2, shard.hidden_size), dtype=mx.bfloat16), cache=cache)
    mx.eval(out)
    return tuple(out.shape)


@pytest.mark.parametrize("start, end", [(3, 3), (-1, 2), (4, 7)])
def test_an_impossible_layer_range_names_the_model_and_the_bounds(tiny_model, start, end):
    with pytest.raises(ShardLoadError, match=rf"\[{start}, {end}\) must satisfy 0 <= start < end <= 6"):
        load_shard(tiny_model, start=start, end=end)


def test_a_directory_without_config_is_reported_by_path(tmp_path):
    with pytest.raises(ShardLoadError, match=r"config.json: not found"):
        load_shard(tmp_path, start=0, end=1)
