"""`exoctl model build --family` writes a tiny model of that family that mlx-lm loads as published."""
import json

from mlx.utils import tree_flatten
from mlx_lm.utils import load_model

from exo_ctl.cli.main import main


def test_a_gemma3_text_build_is_tied_like_the_published_checkpoints(tmp_path, capsys):
    out = tmp_path / "gemma"
    assert main(["model", "build", "--family", "gemma3_text", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and "tie_word_embeddings" not in config
    model, _ = load_model(out)
    assert not any(name.startswith("lm_head") for name, _ in tree_flatten(model.parameters()))
    assert (out / "tokenizer.json").exists()


def test_a_4bit_build_is_quantized_by_mlx_lms_converter(tmp_path, capsys):
    out = tmp_path / "llama-4bit"
    assert main(["model", "build", "--family", "llama", "--bits", "4", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4


def test_a_family_build_over_an_existing_directory_needs_force(tmp_path, capsys):
    assert main(["model", "build", "--family", "qwen3", "--out", str(tmp_path)]) == 1
    assert "already exists (use --force to replace it)" in capsys.readouterr().err


def test_bits_without_a_family_is_refused(tmp_path, capsys):
    assert main(["model", "build", "--bits", "4", "--out", str(tmp_path / "x")]) == 1
    assert "--bits: only with --family" in capsys.readouterr().err
