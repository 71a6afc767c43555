"""A family that cannot be cut into stages is refused before any weight is read, with a reason."""
import json

import pytest

from exo_ctl.model_builder.build_family import FAMILIES
from reconciler.runtime import ShardLoadError, load_shard
from reconciler.runtime.stage_split import split_refusal

MAMBA = {"model_type": "mamba", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "state_size": 4,
         "num_hidden_layers": 2, "conv_kernel": 4, "use_bias": False, "use_conv_bias": True, "time_step_rank": 4}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_the_tests_cover_can_be_split(family):
    config = json.loads(json.dumps(FAMILIES[family][0]))
    layers = (config.get("text_config") or config)["num_hidden_layers"]
    assert split_refusal(config, num_layers=layers) is None


def test_a_state_space_model_is_refused_because_its_layers_keep_no_key_value_cache():
    reason = split_refusal(MAMBA, num_layers=2)
    assert reason is not None and "mlx_lm.models.mamba" in reason and "ArraysCache" in reason


def test_an_unknown_model_type_is_refused_by_name():
    reason = split_refusal({"model_type": "no_such_family", "num_hidden_layers": 2}, num_layers=2)
    assert reason is not None and "no_such_family" in reason


def test_loading_a_shard_of_an_unsplittable_model_names_the_directory_and_the_reason(tmp_path):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import mamba

    model = mamba.Model(mamba.ModelArgs.from_dict(MAMBA))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (tmp_path / "config.json").write_text(json.dumps(MAMBA))
    with pytest.raises(ShardLoadError, match=rf"{tmp_path}: architecture mlx_lm.models.mamba: layer 0 keeps a ArraysCache"):
        load_shard(tmp_path, start=0, end=1)
