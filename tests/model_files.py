"""Small random-weight model directories from any config, written by mlx-lm's own model classes."""
import json
from pathlib import Path
from typing import Any

# A state-space model: its layers keep no key/value cache, so it cannot be split into stages.
MAMBA = {"model_type": "mamba", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "state_size": 4,
         "num_hidden_layers": 2, "conv_kernel": 4, "use_bias": False, "use_conv_bias": True, "time_step_rank": 4}
# Fewer layers than the three nodes of a test cluster.
TWO_LAYER_LLAMA = {"model_type": "llama", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64,
                   "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                   "rms_norm_eps": 1e-5, "max_position_embeddings": 512, "tie_word_embeddings": False}


def write_model(out: Path, config: dict[str, Any], *, dtype: str = "bfloat16", tokenizer: bool = False,
                seed: int = 0) -> Path:
    """config.json + model.safetensors (+ the local tokenizer) for ``config``; returns ``out``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    mx.random.seed(seed)
    model_class, args_class = _get_classes(json.loads(json.dumps(config)))
    model = model_class(args_class.from_dict(json.loads(json.dumps(config))))
    weights = {name: value.astype(getattr(mx, dtype)) if mx.issubdtype(value.dtype, mx.floating) else value
               for name, value in tree_flatten(model.parameters())}
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}))
    if tokenizer:
        from exo_ctl.model_builder.build_model import write_tokenizer

        write_tokenizer(out, vocab_size=config["vocab_size"], max_length=512)
    return out
