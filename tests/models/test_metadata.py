"""Model profiles from files (safetensors headers) and from configs (the catalog)."""
import json
import math
import shutil

import pytest

from exo_ctl.model_builder.build_model import SIZES, build_model
from reconciler.models import (
    CATALOG, ModelMetadataError, ModelNotFound, catalog_profile, profile_from_config, profile_from_directory,
    resolve_profile,
)

GIB = 1024**3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_model("tiny", cache_dir=tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def tiny_4bit(tiny, tmp_path_factory):
    from mlx_lm import convert

    out = tmp_path_factory.mktemp("q") / "tiny-4bit"
    convert(str(tiny), mlx_path=str(out), quantize=True, q_bits=4, q_group_size=64)
    return out


def stored_bytes(file):
    raw = file.read_bytes()
    return len(raw) - 8 - int.from_bytes(raw[:8], "little")


def test_the_tiny_models_profile_matches_its_real_file_sizes(tiny):
    recipe = SIZES["tiny"]
    profile = profile_from_directory(tiny)
    assert profile.num_layers == recipe.num_hidden_layers and profile.dtype == "bfloat16"
    assert profile.total_bytes == stored_bytes(tiny / "model.safetensors") == 2 * recipe.parameter_count()
    assert profile.embedding_bytes == 2 * recipe.vocab_size * recipe.hidden_size
    assert profile.head_bytes == 2 * (recipe.vocab_size * recipe.hidden_size + recipe.hidden_size)
    per_layer = 2 * sum(math.prod(shape) for name, shape in recipe.tensor_shapes().items()
                        if name.startswith("model.layers.0."))
    assert profile.layer_bytes == [per_layer] * recipe.num_hidden_layers


def test_the_config_estimate_equals_the_measured_profile(tiny):
    config = json.loads((tiny / "config.json").read_text())
    assert profile_from_config(config, name="tiny") == profile_from_directory(tiny)


def test_an_mlx_4bit_model_is_measured_from_its_packed_weights_scales_and_biases(tiny_4bit):
    profile = profile_from_directory(tiny_4bit)
    assert (profile.dtype, profile.quantization_bits, profile.quantization_group_size) == ("4bit", 4, 64)
    files = sorted(tiny_4bit.glob("*.safetensors"))
    assert profile.total_bytes == sum(stored_bytes(f) for f in files)
    config = json.loads((tiny_4bit / "config.json").read_text())
    assert profile_from_config(config, name=tiny_4bit.name) == profile


def test_a_sharded_checkpoint_is_read_through_its_index(tiny, tmp_path):
    import mlx.core as mx

    weights = mx.load(str(tiny / "model.safetensors"))
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in shards.items():
        mx.save_safetensors(str(tmp_path / file), {n: weights[n] for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: file for file, part in shards.items() for n in part}}))
    shutil.copy(tiny / "config.json", tmp_path / "config.json")
    assert profile_from_directory(tmp_path).model_copy(update={"name": "tiny"}) == profile_from_directory(tiny)


@pytest.mark.parametrize("repo, low_gib, high_gib", [
    ("mlx-community/Llama-3.3-70B-Instruct-4bit", 36.5, 40),   # 39.7 GB on the hub
    ("meta-llama/Llama-3.3-70B-Instruct", 130, 132.5),         # 141 GB
    ("meta-llama/Llama-3.1-8B-Instruct", 14.5, 15.5),          # 16.1 GB
    ("meta-llama/Llama-3.2-1B-Instruct", 2.2, 2.4),            # 2.47 GB
    ("mlx-community/Llama-3.2-1B-Instruct-4bit", 0.6, 0.7),    # 695 MB
    ("Qwen/Qwen2.5-7B-Instruct", 14, 14.5),                    # 15.2 GB
    ("Qwen/Qwen2.5-72B-Instruct", 135, 136),                   # 145 GB
    ("mlx-community/Qwen2.5-72B-Instruct-4bit", 37.5, 39),     # 40.9 GB
    ("Qwen/Qwen3-8B", 15, 15.5),                               # 16.4 GB
])
def test_catalog_models_have_their_published_sizes(repo, low_gib, high_gib):
    profile = catalog_profile(repo)
    assert low_gib <= profile.total_bytes / GIB <= high_gib
    assert profile.total_bytes == sum(profile.layer_bytes) + profile.embedding_bytes + profile.head_bytes


@pytest.mark.parametrize("repo, dtype", [
    ("meta-llama/Llama-3.2-1B-Instruct", "bfloat16"),
    ("meta-llama/Llama-3.1-8B-Instruct", "bfloat16"),
    ("meta-llama/Llama-3.3-70B-Instruct", "bfloat16"),
    ("mlx-community/Llama-3.3-70B-Instruct-4bit", "4bit"),
    ("Qwen/Qwen2.5-72B-Instruct", "bfloat16"),
    ("mlx-community/Qwen2.5-7B-Instruct-4bit", "4bit"),
])
def test_the_catalog_knows_llama_and_qwen_in_bf16_and_4bit(repo, dtype):
    assert CATALOG[repo][1] == dtype == catalog_profile(repo).dtype


def test_tied_embeddings_add_no_lm_head():
    profile = catalog_profile("meta-llama/Llama-3.2-1B-Instruct")
    assert profile.tie_word_embeddings and profile.head_bytes == 2 * 2048
    assert profile.stage_bytes(8, 16, first=False, last=True) == sum(profile.layer_bytes[8:]) + profile.head_bytes + profile.embedding_bytes


@pytest.mark.parametrize("source, dtype, expected_gib", [
    ("hf://meta-llama/Llama-3.3-70B-Instruct", None, 131.4),
    ("hf://META-LLAMA/llama-3.3-70b-instruct", "4bit", 37.0),
    ("hf://mlx-community/Llama-3.3-70B-Instruct-4bit", None, 37.0),
])
def test_resolve_profile_falls_back_to_the_catalog(source, dtype, expected_gib, tmp_path):
    profile = resolve_profile(source, dtype=dtype, hf_cache=tmp_path)
    assert round(profile.total_bytes / GIB, 1) == expected_gib


def test_resolve_profile_reads_a_local_path_and_the_hugging_face_cache(tiny, tmp_path):
    assert resolve_profile(str(tiny)).total_bytes == profile_from_directory(tiny).total_bytes
    snapshot = tmp_path / "models--example--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny, snapshot)
    (tmp_path / "models--example--tiny" / "refs").mkdir()
    (tmp_path / "models--example--tiny" / "refs" / "main").write_text("abc123")
    cached = resolve_profile("hf://example/tiny", hf_cache=tmp_path)
    assert cached.name == "example/tiny" and cached.total_bytes == profile_from_directory(tiny).total_bytes
    assert resolve_profile(str(tiny), dtype="float32").total_bytes == 2 * cached.total_bytes


@pytest.mark.parametrize("source, message", [
    ("hf://nobody/unknown-model", "model 'hf://nobody/unknown-model' is not in the local Hugging Face cache"),
    ("/no/such/model", "model '/no/such/model': no such local directory"),
])
def test_an_unknown_model_is_a_clear_error_naming_the_source(source, message, tmp_path):
    with pytest.raises(ModelNotFound, match=message.replace("(", r"\(")):
        resolve_profile(source, hf_cache=tmp_path)


def test_bad_model_files_are_reported_with_the_file_and_line(tiny, tmp_path):
    (tmp_path / "config.json").write_text('{\n  "num_hidden_layers": 8,\n  oops\n}')
    with pytest.raises(ModelMetadataError, match=r"config.json: line 3: invalid JSON"):
        profile_from_directory(tmp_path)
    shutil.copy(tiny / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(ModelMetadataError, match=r"model.safetensors: too short to be a safetensors file"):
        profile_from_directory(tmp_path)
    config = json.loads((tiny / "config.json").read_text()) | {"num_hidden_layers": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(tiny / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ModelMetadataError, match=r"is in layer 4, but config.json says num_hidden_layers=4"):
        profile_from_directory(tmp_path)


def test_an_unknown_dtype_is_rejected():
    with pytest.raises(ModelMetadataError, match="dtype '3bit' is not one of bfloat16, float16, float32, 4bit, 8bit"):
        catalog_profile("Qwen/Qwen3-8B", dtype="3bit")
