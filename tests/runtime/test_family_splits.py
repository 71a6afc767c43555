"""Every family split into stages gives mlx-lm's own greedy tokens, token for token."""
import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.utils import load_model

from exo_ctl.model_builder.build_family import FAMILIES, build_family_model
from reconciler.models.metadata import profile_from_directory, safetensors_files
from tests.runtime.chain import chained_tokens, reference_tokens

SPLITS = {1: "whole", 2: "even", 3: "uneven"}
QUANTIZED = [("llama", 4), ("llama", 8), ("qwen3", 4), ("gemma3_text", 4)]  # by mlx-lm's converter
OTHER_FORMATS = {"llama-mxfp4": {"quantize_bits": 4, "quantize_mode": "mxfp4"},
                 "llama-mixed_4_6": {"quantize_bits": 4, "recipe": "mixed_4_6"}}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    built = {family: build_family_model(family, root / family) for family in FAMILIES}
    for family, bits in QUANTIZED:
        built[f"{family}-{bits}bit"] = build_family_model(family, root / f"{family}-{bits}bit", quantize_bits=bits)
    for name, options in OTHER_FORMATS.items():
        built[name] = build_family_model(name.split("-")[0], root / name, **options)
    return built


@pytest.mark.parametrize("stages", sorted(SPLITS))
@pytest.mark.parametrize("family", [*FAMILIES, *(f"{family}-{bits}bit" for family, bits in QUANTIZED), *OTHER_FORMATS])
def test_a_model_split_into_stages_generates_exactly_mlx_lm_tokens(models, family, stages):
    path = models[family]
    expected = reference_tokens(load_model(path)[0])
    assert len(set(expected)) > 1, "a degenerate model would hide a wrong split"
    assert chained_tokens(path, stages=stages) == expected


def test_a_model_sharded_over_files_with_an_index_splits_and_plans_like_one_file(models, tmp_path):
    sharded = shutil.copytree(models["llama"], tmp_path / "sharded")
    weights = mx.load(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        mx.save_safetensors(str(sharded / file), {name: weights[name] for name in part}, metadata={"format": "mlx"})
    index = {"metadata": {}, "weight_map": {name: file for file, part in halves.items() for name in part}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert len(safetensors_files(sharded)) == 2
    assert profile_from_directory(sharded).total_bytes == profile_from_directory(models["llama"]).total_bytes
    assert chained_tokens(sharded, stages=3) == reference_tokens(load_model(models["llama"])[0])


def test_the_other_weight_formats_are_what_their_names_say(models):
    import json

    mxfp4 = json.loads((models["llama-mxfp4"] / "config.json").read_text())["quantization"]
    assert mxfp4["mode"] == "mxfp4"
    mixed = json.loads((models["llama-mixed_4_6"] / "config.json").read_text())["quantization"]
    per_layer = {value["bits"] for value in mixed.values() if isinstance(value, dict)}
    assert per_layer == {4, 6}, per_layer
