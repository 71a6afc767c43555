"""A broken model directory fails the load with a message that names the directory and the problem."""
import json
import shutil

import pytest

from exo_ctl.model_builder.build_family import build_family_model
from reconciler.runtime import ShardLoadError, load_shard


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return build_family_model("llama", tmp_path_factory.mktemp("errors") / "llama")


@pytest.fixture
def model(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "model")


def test_a_truncated_safetensors_file_is_reported_as_corrupt(model):
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ShardLoadError, match=rf"{model}: mlx-lm cannot load this model: .*corrupt file"):
        load_shard(model, start=0, end=2)


def test_a_config_without_a_required_field_names_the_field(model):
    config = json.loads((model / "config.json").read_text())
    del config["hidden_size"]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ShardLoadError, match=rf"{model}: mlx-lm cannot load this model: TypeError: .*'hidden_size'"):
        load_shard(model, start=0, end=2)
