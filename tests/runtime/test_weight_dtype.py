"""spec.model.dtype is applied when a stage loads (cast or quantized by mlx-lm), or refused."""
import pytest
from mlx_lm.utils import load_model, quantize_model

from exo_ctl.model_builder.build_family import build_family_model
from reconciler.models.catalog import resolve_profile
from reconciler.models.metadata import ModelMetadataError
from reconciler.runtime import ShardLoadError, load_shard
from tests.runtime.chain import chained_tokens, ranges, reference_tokens


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_family_model("llama", tmp_path_factory.mktemp("dtype") / "llama")


@pytest.fixture(scope="module")
def llama_4bit(tmp_path_factory):
    return build_family_model("llama", tmp_path_factory.mktemp("dtype") / "llama-4bit", quantize_bits=4)


@pytest.mark.parametrize("dtype", ["4bit", "8bit", "float32"])
def test_every_stage_holds_the_asked_dtype_within_five_percent_of_its_plan(llama, dtype):
    profile = resolve_profile(str(llama), dtype=dtype)
    for start, end in ranges(profile.num_layers, 3):
        shard = load_shard(llama, start=start, end=end, dtype=dtype)
        try:
            planned = profile.stage_bytes(start, end, first=start == 0, last=end == profile.num_layers)
            assert abs(shard.nbytes - planned) <= 0.05 * planned, (start, end, shard.nbytes, planned)
        finally:
            shard.close()


def test_a_bf16_model_served_as_4bit_generates_what_mlx_lm_generates_after_quantizing_it(llama):
    model, config = load_model(llama)
    quantize_model(model, config, group_size=64, bits=4)
    expected = reference_tokens(model)
    assert expected != reference_tokens(load_model(llama)[0]), "quantizing should change something"
    assert chained_tokens(llama, stages=2, dtype="4bit") == expected


def test_quantized_files_asked_for_another_dtype_are_refused_when_planned_and_when_loaded(llama_4bit):
    with pytest.raises(ModelMetadataError, match=r"spec.model.dtype: bfloat16 cannot be honoured: .* is quantized \(4bit\)"):
        resolve_profile(str(llama_4bit), dtype="bfloat16")
    with pytest.raises(ShardLoadError, match=r"spec.model.dtype 8bit cannot be honoured: the files are quantized \(4bit\)"):
        load_shard(llama_4bit, start=0, end=2, dtype="8bit")
    resolve_profile(str(llama_4bit), dtype="4bit")  # its own dtype is fine
