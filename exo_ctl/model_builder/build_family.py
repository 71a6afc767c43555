"""Tiny random-weight models of several mlx-lm families, written by mlx-lm's own model classes.

Each model is the family's ``Model`` built from a small config with mlx's default (seeded) init,
saved as ``config.json`` + ``model.safetensors`` + the local byte-level tokenizer, so mlx-lm and
this project load it exactly like a published checkpoint. ``quantize_bits`` runs mlx-lm's
converter on the result.

    python -m exo_ctl.model_builder.build_family --family gemma3_text --out DIR [--bits 4]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

VOCAB_SIZE = 512
_ATTENTION = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "vocab_size": VOCAB_SIZE, "rms_norm_eps": 1e-5, "max_position_embeddings": 512}
_GEMMA3_TEXT = {**_ATTENTION, "model_type": "gemma3_text", "num_hidden_layers": 4, "rope_theta": 1e6,
                "rope_local_base_freq": 1e4, "query_pre_attn_scalar": 16, "sliding_window": 8,
                "sliding_window_pattern": 2}

# family → (config.json, weights in the files are tied to the embedding (no lm_head), dtype)
FAMILIES: dict[str, tuple[dict[str, Any], bool, str]] = {
    "llama": ({**_ATTENTION, "model_type": "llama", "num_hidden_layers": 4, "tie_word_embeddings": False}, False, "bfloat16"),
    "qwen3": ({**_ATTENTION, "model_type": "qwen3", "num_hidden_layers": 3, "rope_theta": 1e6,
               "tie_word_embeddings": True}, True, "bfloat16"),
    "gemma2": ({**_ATTENTION, "model_type": "gemma2", "num_hidden_layers": 3, "query_pre_attn_scalar": 16,
                "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}, True, "bfloat16"),
    # Like the published checkpoints: no tie_word_embeddings in config, no lm_head in the files.
    "gemma3_text": (_GEMMA3_TEXT, True, "bfloat16"),
    "gemma3": ({"model_type": "gemma3", "vocab_size": VOCAB_SIZE, "text_config": _GEMMA3_TEXT}, True, "bfloat16"),
    "qwen2": ({**_ATTENTION, "model_type": "qwen2", "num_hidden_layers": 3, "rope_theta": 1e6,
               "tie_word_embeddings": True}, True, "bfloat16"),
    "mistral": ({**_ATTENTION, "model_type": "mistral", "num_hidden_layers": 3, "rope_theta": 1e6,
                 "tie_word_embeddings": False}, False, "bfloat16"),
    "phi3": ({**_ATTENTION, "model_type": "phi3", "num_hidden_layers": 3, "tie_word_embeddings": False},
             False, "bfloat16"),
    "starcoder2": ({**_ATTENTION, "model_type": "starcoder2", "num_hidden_layers": 3, "tie_word_embeddings": True},
                   True, "bfloat16"),
    "mixtral": ({**_ATTENTION, "model_type": "mixtral", "num_hidden_layers": 3, "num_local_experts": 4,
                 "num_experts_per_tok": 2, "tie_word_embeddings": False}, False, "float32"),
    "deepseek_v3": ({**_ATTENTION, "model_type": "deepseek_v3", "num_hidden_layers": 3, "moe_intermediate_size": 32,
                     "n_shared_experts": 1, "n_routed_experts": 4, "num_experts_per_tok": 2, "kv_lora_rank": 16,
                     "q_lora_rank": 32, "qk_rope_head_dim": 8, "v_head_dim": 16, "qk_nope_head_dim": 16,
                     "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "rope_theta": 1e4}, False, "float32"),
    "qwen3_moe": ({**_ATTENTION, "model_type": "qwen3_moe", "num_hidden_layers": 3, "num_experts": 4,
                   "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [0],
                   "moe_intermediate_size": 32, "rope_theta": 1e6, "tie_word_embeddings": False,
                   "norm_topk_prob": True}, False, "float32"),
}


def build_family_model(family: str, out: Path, *, quantize_bits: int | None = None, quantize_mode: str = "affine",
                       recipe: str | None = None, seed: int = 0) -> Path:
    """Write the tiny ``family`` model into ``out`` (which must not exist) and return it. With
    ``quantize_bits``, mlx-lm's converter quantizes it (``quantize_mode`` affine or mxfp4; ``recipe``
    one of its mixed per-layer predicates, e.g. "mixed_4_6")."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known families: {', '.join(FAMILIES)}")
    out = Path(out)
    if quantize_bits is None:
        _write_float_model(family, out, seed=seed)
        return out
    with tempfile.TemporaryDirectory(dir=out.parent) as staging:
        source = _write_float_model(family, Path(staging) / "float", seed=seed)
        from mlx_lm import convert

        convert(hf_path=str(source), mlx_path=str(out), quantize=True, q_bits=quantize_bits, q_group_size=32,
                q_mode=quantize_mode, quant_predicate=recipe)
    return out


def _write_float_model(family: str, out: Path, *, seed: int) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    from exo_ctl.model_builder.build_model import write_tokenizer

    config, tied, dtype = FAMILIES[family]
    config = json.loads(json.dumps(config))  # a copy mlx-lm may not alter
    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(json.loads(json.dumps(config))))
    weights = {name: _randomize(name, value).astype(getattr(mx, dtype)) for name, value in tree_flatten(model.parameters())}
    if tied:
        weights = {name: value for name, value in weights.items() if not name.endswith("lm_head.weight")}
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=2) + "\n")
    write_tokenizer(out, vocab_size=VOCAB_SIZE, max_length=512)
    return out


def _randomize(name: str, value):
    """Matrices ~ N(0, 1/fan_in) so that the tiny model's greedy output varies; norms etc. as built."""
    import mlx.core as mx

    if value.ndim < 2 or not mx.issubdtype(value.dtype, mx.floating):
        return value
    return mx.random.normal(value.shape) * (value.shape[-1] ** -0.5) * (1.0 if "embed" not in name else 0.25)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exo_ctl.model_builder.build_family", description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--out", type=Path, required=True, help="model directory to create")
    parser.add_argument("--bits", type=int, choices=(4, 8), help="quantize with mlx-lm's converter")
    args = parser.parse_args(argv)
    if args.out.exists():
        shutil.rmtree(args.out)
    print(build_family_model(args.family, args.out, quantize_bits=args.bits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
