"""The locally built test model: deterministic, cached, and loadable by mlx-lm."""
import json

import pytest

from exo_ctl.model_builder import build_model as builder
from exo_ctl.model_builder.build_model import SIZES, build_model, build_model_at, main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_model("tiny", cache_dir=tmp_path_factory.mktemp("models"))


def test_building_twice_gives_byte_identical_files(tiny, tmp_path):
    again = build_model_at(tmp_path / "again", size="tiny", force=True)
    names = sorted(p.name for p in tiny.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    for name in names:
        assert (tiny / name).read_bytes() == (again / name).read_bytes(), name


def test_a_cached_build_is_reused_until_the_recipe_version_changes(tiny, monkeypatch):
    weights = tiny / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_model("tiny", cache_dir=tiny.parent) == tiny
    assert weights.stat().st_mtime_ns == before
    monkeypatch.setattr(builder, "RECIPE_VERSION", builder.RECIPE_VERSION + 1)
    build_model("tiny", cache_dir=tiny.parent)
    assert json.loads((tiny / builder.STAMP_FILE).read_text())["recipeVersion"] == builder.RECIPE_VERSION
    assert weights.stat().st_mtime_ns != before


def test_the_cache_dir_defaults_to_exo_model_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EXO_MODEL_CACHE", str(tmp_path))
    assert builder.default_cache_dir() == tmp_path


def test_mlx_lm_loads_the_model_and_generates_tokens(tiny):
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(tiny))
    assert len(model.layers) == SIZES["tiny"].num_hidden_layers
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is free software?"}], add_generation_prompt=True)
    tokens = [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt=prompt, max_tokens=6)]
    assert 1 <= len(tokens) <= 6
    assert all(0 <= t < SIZES["tiny"].vocab_size for t in tokens)


def test_the_tokenizer_round_trips_text_and_applies_the_chat_template(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny))
    text = "The Zen of Python: naïve café — 東京 ✓\n\tindented"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id == 0
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer.encode("the license", add_special_tokens=False)) <= 3  # learned merges, not bytes
    chat = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "}],
        tokenize=False, add_generation_prompt=True,
    )
    assert chat == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert tokenizer.eos_token == "<|eot_id|>"


@pytest.mark.parametrize("size, low, high, min_layers", [
    ("tiny", 10e6, 20e6, 6),
    ("small", 100e6, 300e6, 12),
])
def test_parameter_counts_are_in_range(size, low, high, min_layers):
    recipe = SIZES[size]
    assert low <= recipe.parameter_count() <= high
    assert recipe.num_hidden_layers >= min_layers


def test_the_weights_file_holds_every_parameter_in_bfloat16(tiny):
    from safetensors import safe_open

    with safe_open(str(tiny / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
    assert names == set(SIZES["tiny"].tensor_shapes())
    raw = (tiny / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    header.pop("__metadata__")
    assert {info["dtype"] for info in header.values()} == {"BF16"}
    stored = sum(end - begin for begin, end in (info["data_offsets"] for info in header.values()))
    assert stored == 2 * SIZES["tiny"].parameter_count()


def test_the_cli_prints_the_model_path(tmp_path, capsys):
    assert main(["--size", "tiny", "--out", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out.strip() == str((tmp_path / "m").resolve())
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "llama"


def test_an_unknown_size_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown model size 'huge'; known sizes: tiny, small"):
        build_model("huge", cache_dir=tmp_path)
