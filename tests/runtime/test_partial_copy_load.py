"""A partial copy in the node's model cache (only some layers' tensors, written by ModelCache) loads
as its stage and computes what the same stage of the original copy computes; a partial copy
lacking a tensor of the stage is refused, naming it, instead of running with random weights."""
import mlx.core as mx
import numpy as np
import pytest

from exo_ctl.model_builder.build_model import build_model
from reconciler.models.metadata import num_layers_of, tensor_part
from reconciler.models.model_info import info_from_directory, stage_tensors
from reconciler.runtime import ShardLoadError, load_shard
from reconciler.weights.store import ModelCache, is_partial_copy


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("tiny")


def partial_copy(original, root, *, parts):
    """A model cache directory holding ``parts`` of ``original``, bytes copied from its files."""
    info = info_from_directory(original, source=str(original), revision=None, origin="node/a", digests=False)
    cache = ModelCache(root)
    layers = num_layers_of(info.config)
    for part in parts:
        tensors = {}
        for file in info.weightFiles:
            data = (original / file.name).read_bytes()
            for name, entry in file.tensors.items():
                if tensor_part(name, num_layers=layers) == part:
                    tensors[name] = data[file.offset(name):file.offset(name) + entry.size]
        cache.write_part(info, part, tensors)
    cache.write_side_file(info, "config.json", (original / "config.json").read_bytes())
    [directory] = [root / name for name in cache.names()]
    return info, directory


def logits_of(shard, hidden):
    """The stage's output for ``hidden`` (a numpy array), computed on the stage's own thread."""
    def run():
        out = shard.forward(mx.array(hidden).astype(mx.bfloat16), cache=shard.make_cache())
        return np.array(out.astype(mx.float32))
    return shard.compute.call(run)


def test_a_partial_copy_of_the_last_layers_and_head_loads_as_the_last_stage_and_computes_as_the_original(
        tiny_model, tmp_path):
    info, directory = partial_copy(tiny_model, tmp_path / "cache", parts=[6, 7, "head", "lm_head"])
    assert is_partial_copy(directory) and not (directory / "model.safetensors").exists()
    needed = stage_tensors(info, start=6, end=8, first=False, last=True)
    partial = load_shard(directory, start=6, end=8, tensors=needed)
    original = load_shard(tiny_model, start=6, end=8)
    try:
        hidden = np.random.default_rng(3).standard_normal((1, 5, partial.hidden_size)).astype(np.float32)
        assert partial.is_last and partial.nbytes == original.nbytes
        expected = logits_of(original, hidden)
        assert expected.shape == (1, 5, original.config["vocab_size"])
        assert np.array_equal(logits_of(partial, hidden), expected)
    finally:
        partial.close()
        original.close()


def test_a_partial_copy_without_a_tensor_of_the_stage_is_refused_naming_the_tensor(tiny_model, tmp_path):
    info, directory = partial_copy(tiny_model, tmp_path / "cache", parts=[6, 7, "head"])  # no lm_head
    with pytest.raises(ShardLoadError, match=r"lacks 1 tensors this stage needs: lm_head\.weight"):
        load_shard(directory, start=6, end=8, tensors=stage_tensors(info, start=6, end=8, first=False, last=True))


def test_a_partial_copy_is_not_loaded_without_the_list_of_tensors_its_stage_needs(tiny_model, tmp_path):
    _, directory = partial_copy(tiny_model, tmp_path / "cache", parts=[6, 7, "head", "lm_head"])
    with pytest.raises(ShardLoadError, match="which tensors the stage needs was not given"):
        load_shard(directory, start=6, end=8)
