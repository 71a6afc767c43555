"""Tensor ranks a model's family cannot be sharded over are refused when the ModelDeployment is
written, by the scheduler's own check, naming spec.parallelism.tensor and the family; models this
node cannot read the config of are left to the scheduler."""
import json

import pytest

from exo_ctl.api.validation import InvalidObject
from exo_ctl.model_builder.build_model import build_model
from reconciler.scheduler.tensor_admission import tensor_admission


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("tiny")  # llama: 6 attention heads, 2 key-value heads


def md(source, tensor):
    return {"apiVersion": "exo.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "tp"},
            "spec": {"model": {"source": str(source)}, "parallelism": {"tensor": tensor}}}


def refusal(obj):
    with pytest.raises(InvalidObject) as caught:
        tensor_admission(obj)
    return caught.value


def test_a_family_without_shard_in_mlx_lm_is_refused_naming_the_field_and_the_family(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "cohere", "num_attention_heads": 8}))
    error = refusal(md(tmp_path, 2))
    assert error.kind == "ModelDeployment" and error.name == "tp"
    assert [c.field for c in error.causes] == ["spec.parallelism.tensor"]
    assert "'cohere'" in error.causes[0].message and "shard()" in error.causes[0].message
    assert 'ModelDeployment "tp" is invalid: spec.parallelism.tensor: ' in error.describe()


def test_head_counts_that_do_not_divide_by_the_ranks_are_refused(tiny_model):
    error = refusal(md(tiny_model, 4))
    assert "num_attention_heads (6)" in error.causes[0].message and "'llama'" in error.causes[0].message
    assert "num_key_value_heads (2)" in refusal(md(tiny_model, 3)).causes[0].message


def test_a_catalog_model_is_checked_from_its_cached_config_without_any_file():
    error = refusal(md("hf://mlx-community/Llama-3.3-70B-Instruct-4bit", 3))
    assert "num_attention_heads (64)" in error.causes[0].message


def test_shardable_models_one_rank_unknown_configs_and_other_kinds_pass(tiny_model, tmp_path):
    tensor_admission(md(tiny_model, 2))
    tensor_admission(md("hf://mlx-community/Llama-3.3-70B-Instruct-4bit", 4))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "cohere"}))
    tensor_admission(md(tmp_path, 1))
    tensor_admission(md("hf://nobody/not-cached-anywhere", 2))  # the scheduler says ModelNotFound
    tensor_admission(md(tmp_path / "no-such-dir", 2))
    tensor_admission({"kind": "Node", "metadata": {"name": "n"}, "spec": {}})
